"""Encoding of records and payloads, shared by every store.

Both stores encode the same way and apply the same size limit, so a value
refused by one is refused by the other, and the error names the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from stepflow import _json
from stepflow.errors import InvalidArgumentError, InvalidPayloadError
from stepflow.models import EventKind, NewEvent, RunRecord, StepState


class EncodedRun(NamedTuple):
    input: bytes
    output: bytes
    error: bytes


_WRAPPER_ROOM = 256
"""Bytes over the limit allowed to an event that holds a stored raised event's payload
with a few fields of its own: carried along (``carried_from``) or received by a wait."""


class Codec:
    """JSON encoding with one payload size limit."""

    def __init__(self, max_payload_bytes: int) -> None:
        if (
            isinstance(max_payload_bytes, bool)
            or not isinstance(max_payload_bytes, int)
            or max_payload_bytes < _json.MIN_PAYLOAD_BYTES
        ):
            raise InvalidArgumentError(
                f"max_payload_bytes must be an int >= {_json.MIN_PAYLOAD_BYTES} (a failed "
                f"step's error record must always fit), got {max_payload_bytes!r}"
            )
        self.limit = max_payload_bytes

    def encode(self, value: Any, what: str) -> bytes:
        return _json.dumps(value, what=what, limit=self.limit)

    def encode_run(self, record: RunRecord) -> EncodedRun:
        return EncodedRun(
            self.encode(record.input, "run input"),
            self.encode(record.output, "run output"),
            self.encode(record.error, "run error"),
        )

    def encode_context(self, patch: Mapping[str, Any], what: str) -> dict[str, bytes]:
        """Encode each value of a bag or patch; the whole patch counts against the limit."""
        if not isinstance(patch, Mapping):
            raise InvalidPayloadError(what, f"must be a mapping, not {type(patch).__name__}")
        self.encode(dict(patch), what)
        return _encode_values(patch, what)

    def encode_completion(
        self, output: Any, patch: Mapping[str, Any] | None
    ) -> tuple[bytes, dict[str, bytes]]:
        """A step completion's output and context patch (None for none), encoded.

        A DAG step's patch is its output itself (the mapping it returned):
        that value has just passed the limit as the output, so only its
        values are encoded again, not the whole of it a second time.
        """
        output_json = self.encode(output, "step output")
        if patch is None:
            return output_json, {}
        if patch is output and isinstance(patch, dict):
            return output_json, _encode_values(patch, "context patch")
        return output_json, self.encode_context(patch, "context patch")

    def encode_event(self, event: NewEvent) -> bytes:
        # A wait's event_received holds the raised event's payload, which met the limit,
        # with the wait's own fields: refused, the wait could never take the event.
        room = _WRAPPER_ROOM if event.kind == EventKind.EVENT_RECEIVED else 0
        return _json.dumps(
            event.payload, what=f"{event.kind.value} event payload", limit=self.limit + room
        )

    def encode_carried(self, event: NewEvent) -> bytes:
        """A raised event carried into the next execution: stored once, it is carried.

        Its ``carried_from`` marker may take a payload that met the limit a
        few bytes over it; refusing it there would hold the run's continue
        off for good.
        """
        return _json.dumps(
            event.payload,
            what=f"carried {event.kind.value} event payload",
            limit=self.limit + _WRAPPER_ROOM,
        )

    def encode_step(self, step: StepState) -> bytes:
        """The whole step row as JSON, its payload fields checked against the limit."""
        self.encode(step.input, "step input")
        self.encode(step.output, "step output")
        self.encode(step.error, "step error")
        return _json.dumps(step.model_dump(mode="json"), what="step")

    def decode_step(self, data: bytes | str) -> StepState:
        return StepState.model_validate_json(data)

    def isolate_step(self, step: StepState) -> StepState:
        """A copy sharing no mutable value with ``step`` (what a store round trip gives)."""
        return self.decode_step(self.encode_step(step))


def _encode_values(patch: Mapping[str, Any], what: str) -> dict[str, bytes]:
    """Each value of a bag or patch on its own (stored as a hash field each)."""
    return {key: _json.dumps(value, what=f"{what}[{key!r}]") for key, value in patch.items()}
