"""JSON encoding for everything stepflow stores.

orjson is fast but writes NaN and infinities as ``null`` and encodes a few
non-JSON types (UUIDs, enums) as strings or numbers, which would change a
user's value silently on the way through the store. Every payload is
therefore checked against `_check`'s rules, and every size limit is applied
to the encoded bytes, so the error points at the value that was too large.

The check is the slow part, a Python walk over the whole value, so `dumps`
encodes first and decodes the bytes again: when that gives back a value
equal to the original, nothing was coerced and the walk is skipped. Only a
value that changed on the way (NaN, a UUID, a tuple...) or that orjson
refused is walked, which keeps the error messages of the walk.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from stepflow.errors import InvalidPayloadError, PayloadTooLargeError

DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024
MIN_PAYLOAD_BYTES = 64 * 1024
"""The lowest payload limit a store takes: a failed step's error record, its message
and traceback cut to a few thousand characters, always fits."""

_MAX_DEPTH = 256

# Dataclasses and datetimes are refused (orjson raises) rather than encoded:
# `_check` rejects them, and the round trip could not tell them apart.
_OPTIONS = orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME

# Types orjson encodes exactly or refuses: no round trip needed.
_EXACT = frozenset({str, int, bool, type(None)})


def _check(value: Any, what: str, depth: int) -> None:
    """Reject what JSON cannot carry faithfully; orjson would coerce or fail vaguely."""
    if depth > _MAX_DEPTH:
        raise InvalidPayloadError(what, f"nested deeper than {_MAX_DEPTH} levels")
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidPayloadError(what, f"{value!r} has no JSON form")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidPayloadError(what, f"object key {key!r} is not a string")
            _check(item, what, depth + 1)
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            _check(item, what, depth + 1)
        return
    raise InvalidPayloadError(what, f"a {type(value).__name__} is not a JSON value")


def _round_trips(value: Any, data: bytes) -> bool:
    """True when decoding ``data`` gives back ``value``: orjson coerced nothing.

    NaN and infinities come back as None, UUIDs as str, enums as their value,
    tuples as lists: all unequal, so they take the full `_check`. A value
    whose ``__eq__`` fails is simply checked the slow way.
    """
    if type(value) in _EXACT:
        return True
    try:
        return bool(orjson.loads(data) == value)
    except Exception:
        return False


def dumps(value: Any, *, what: str = "value", limit: int | None = None) -> bytes:
    """Encode ``value`` as JSON bytes, refusing non-JSON values and oversized results."""
    try:
        data = orjson.dumps(value, option=_OPTIONS)
    except (TypeError, orjson.JSONEncodeError) as exc:  # e.g. a set, an int over 64 bits
        refused = exc
    else:
        if not _round_trips(value, data):
            _check(value, what, 0)  # raises unless the change was harmless (a tuple)
        if limit is not None and len(data) > limit:
            raise PayloadTooLargeError(what, len(data), limit)
        return data
    # Outside the except block, so the walk's error does not chain orjson's.
    _check(value, what, 0)  # names the culprit the way the walk words it...
    raise InvalidPayloadError(what, str(refused)) from refused  # ...else orjson's reason


def loads(data: bytes | str) -> Any:
    """Decode JSON written by `dumps`."""
    return orjson.loads(data)
