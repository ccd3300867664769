"""JSON encoding for everything stepflow stores.

orjson is fast but writes NaN and infinities as ``null``, which would change a
user's value silently on the way through the store. Every payload therefore
passes one check here before it is encoded, and every size limit is applied
to the encoded bytes, so the error points at the value that was too large.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from stepflow.errors import InvalidPayloadError, PayloadTooLargeError

DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024

_MAX_DEPTH = 256


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


def dumps(value: Any, *, what: str = "value", limit: int | None = None) -> bytes:
    """Encode ``value`` as JSON bytes, refusing non-JSON values and oversized results."""
    _check(value, what, 0)
    try:
        data = orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError) as exc:  # e.g. int over 64 bits
        raise InvalidPayloadError(what, str(exc)) from exc
    if limit is not None and len(data) > limit:
        raise PayloadTooLargeError(what, len(data), limit)
    return data


def loads(data: bytes | str) -> Any:
    """Decode JSON written by `dumps`."""
    return orjson.loads(data)
