"""What a durable run recorded, indexed for replay.

Each ``ctx`` command (step, sleep, event wait, child run, history prune) gets
the next sequence position when the workflow code calls it; every history
event it writes carries that position as ``seq`` together with the command
and its name. Replaying, the n-th command must find the n-th recorded one
with the same command and name, or the run fails with
`NonDeterminismError`: guessing would silently apply one call's result to
another.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from stepflow.errors import NonDeterminismError
from stepflow.models import Event, EventKind


class Replay:
    """The history of one execution, as the workflow code consumes it."""

    def __init__(self, run_id: str, events: list[Event]) -> None:
        self.run_id = run_id
        self._by_seq: dict[int, list[Event]] = defaultdict(list)
        self._raised: list[Event] = []
        self._consumed: set[int] = set()
        self.clock = events[0].timestamp if events else 0
        self.position = 0
        for event in events:
            self.add(event)

    def add(self, event: Event) -> None:
        """Take in an event this runner appended or read."""
        payload = event.payload if isinstance(event.payload, dict) else {}
        if event.kind == EventKind.EVENT_RAISED:
            if all(e.event_id != event.event_id for e in self._raised):
                self._raised.append(event)
            return
        seq = payload.get("seq")
        if isinstance(seq, int):
            if all(e.event_id != event.event_id for e in self._by_seq[seq]):
                self._by_seq[seq].append(event)
            if event.kind == EventKind.EVENT_RECEIVED:
                self._consumed.add(int(payload["raised_id"]))

    def next_command(self, command: str, name: str) -> tuple[int, dict[EventKind, Event]]:
        """Claim the next position; return it with what was recorded there, checked.

        The recorded events come back by kind. Moving past a recorded event
        moves the workflow's clock to its timestamp, so ``ctx.now()`` gives
        the same value on every replay.
        """
        self.position += 1
        recorded = self._by_seq.get(self.position, [])
        if recorded:
            first = recorded[0].payload
            if first.get("command") != command or first.get("name") != name:
                raise NonDeterminismError(
                    self.run_id,
                    self.position,
                    expected=f"{first.get('command')} {first.get('name')!r}",
                    actual=f"{command} {name!r}",
                )
            self.clock = max(self.clock, recorded[-1].timestamp)
        return self.position, {event.kind: event for event in recorded}

    def tags(self, seq: int, command: str, name: str) -> dict[str, Any]:
        """The payload fields every event of a command carries."""
        return {"seq": seq, "command": command, "name": name}

    def pending_event(self, name: str) -> Event | None:
        """The oldest raised event of this name that no wait has consumed yet."""
        for event in self._raised:
            if event.payload.get("name") == name and event.event_id not in self._consumed:
                return event
        return None
