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
        self.diverged: NonDeterminismError | None = None
        """The first mismatch; raised again by every later command, so code that
        catches it cannot go on doing (or skipping) work as if nothing happened."""
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
        if self.diverged is not None:
            raise self.diverged
        self.position += 1
        recorded = self.check(self.position, command, name)
        if recorded:
            self.passed(self.position)
        return self.position, recorded

    def check(self, seq: int, command: str, name: str) -> dict[EventKind, Event]:
        """What command ``seq`` recorded, by kind, checked to be ``command`` ``name``.

        Also for a record read while the command ran: another process driving
        the run recorded it meanwhile.
        """
        recorded = self._by_seq.get(seq, [])
        if recorded:
            first = recorded[0].payload
            if first.get("command") != command or first.get("name") != name:
                self.diverged = NonDeterminismError(
                    self.run_id,
                    seq,
                    expected=f"{first.get('command')} {first.get('name')!r}",
                    actual=f"{command} {name!r}",
                )
                raise self.diverged
        return {event.kind: event for event in recorded}

    def ended(self, seq: int, command: str, name: str, ends: tuple[EventKind, ...]) -> Event | None:
        """The first of ``ends`` command ``seq`` recorded (checked, see `check`), or None."""
        recorded = self.check(seq, command, name)
        return next((recorded[kind] for kind in ends if kind in recorded), None)

    def recorded(self, seq: int) -> dict[EventKind, Event]:
        """What command ``seq`` recorded so far, by kind."""
        return {event.kind: event for event in self._by_seq.get(seq, [])}

    def passed(self, seq: int) -> None:
        """The workflow moved past what command ``seq`` recorded: its clock follows."""
        recorded = self._by_seq.get(seq)
        if recorded:
            self.clock = max(self.clock, recorded[-1].timestamp)

    def divergence(self) -> NonDeterminismError | None:
        """Why the code did not replay its history, checked when the workflow ends.

        Besides a mismatch it caught, a workflow that ends (returns, fails or
        continues as new) before reaching commands it recorded took another path.
        """
        if self.diverged is not None:
            return self.diverged
        later = [seq for seq, events in self._by_seq.items() if seq > self.position and events]
        if later:
            first = self._by_seq[min(later)][0].payload
            self.diverged = NonDeterminismError(
                self.run_id,
                min(later),
                expected=f"{first.get('command')} {first.get('name')!r}",
                actual="no further command (the workflow ended)",
            )
        return self.diverged

    def tags(self, seq: int, command: str, name: str) -> dict[str, Any]:
        """The payload fields every event of a command carries."""
        return {"seq": seq, "command": command, "name": name}

    def pending_events(self) -> list[Event]:
        """Raised events no wait has consumed yet, in the order raised."""
        return [event for event in self._raised if event.event_id not in self._consumed]

    def pending_event(self, name: str) -> Event | None:
        """The oldest raised event of this name that no wait has consumed yet."""
        return next((e for e in self.pending_events() if e.payload.get("name") == name), None)
