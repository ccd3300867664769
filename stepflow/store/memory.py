"""`MemoryStore`: the reference semantics of `WorkflowStore`, in one process.

Every method does all its work without awaiting in between, so on one event
loop each is atomic with respect to every other task, just as a Lua script
is on Redis. The step writes (claim, complete, fail) first let the other
tasks run once, as a round trip to Redis does: the engine runs a chain of
steps in one task and counts on its store calls to be where others get their
turn. Payloads are encoded to JSON on the way in and decoded on the
way out: the same values are refused as on Redis, and a caller mutating a
dict after handing it over changes nothing stored.

The counters behind `get_metrics` follow the same rules as on Redis:
executions are counted with every change, a run's events when it finishes,
continues as new or is pruned (see `_settle`). The admin operations are in
`stepflow.store.memory_admin`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio.lowlevel

from stepflow import _json
from stepflow.errors import (
    ConflictError,
    ExecutionNotFoundError,
    LeaseHeldError,
    RunCancelledError,
    RunNotFoundError,
    StaleLeaseError,
    StepAlreadyCompletedError,
    StepflowError,
)
from stepflow.models import (
    Event,
    EventKind,
    ExecutionInfo,
    Lease,
    NewEvent,
    PruneOptions,
    PruneResult,
    RunRecord,
    RunStatus,
    StepClaim,
    StepState,
    StepStatus,
    now_ms,
    parse_run_status,
)
from stepflow.store.base import (
    DEFAULT_LEASE_MS,
    check_claim,
    check_int,
    validate_run_id,
    validate_step_id,
)
from stepflow.store.codec import Codec
from stepflow.store.ids import new_token
from stepflow.store.memory_admin import MemoryAdmin


@dataclass
class _StepLease:
    epoch: int = 0
    owner: str = ""
    token: str = ""
    expires_at: int = 0


@dataclass
class _Execution:
    execution_id: int
    status: RunStatus
    input: bytes
    started_at: int
    output: bytes = b"null"
    error: bytes = b"null"
    completed_at: int | None = None
    events: list[Event] = field(default_factory=list)


@dataclass
class _Run:
    record: RunRecord  # payload fields hold decoded copies; context is kept apart
    context: dict[str, bytes] = field(default_factory=dict)
    steps: dict[str, StepState] = field(default_factory=dict)  # insertion ordered
    leases: dict[str, _StepLease] = field(default_factory=dict)
    executions: dict[int, _Execution] = field(default_factory=dict)
    events_counted: int = 0
    """How many of the run's stored events the global event counter holds (see `_settle`)."""

    def events_stored(self) -> int:
        return sum(len(execution.events) for execution in self.executions.values())


_AFTER_CANCEL = (RunStatus.RUNNING, RunStatus.CANCELLED)
"""A cancelled run stays cancelled unless resumed: a late finish must not overwrite it."""
_NOT_CANCELLED = (RunStatus.COMPLETED, RunStatus.FAILED)
"""A finished run is not cancelled: a late cancel must not overwrite its outcome."""


def _refuse_if_cancelled(run: _Run) -> None:
    """A cancelled run starts no step, renews no lease and records no event until a resume."""
    if run.record.status == RunStatus.CANCELLED:
        raise RunCancelledError(run.record.run_id)


def _status_refusal(
    record: RunRecord, status: RunStatus, execution_id: int
) -> StepflowError | None:
    """Why the run may not move to ``status`` from ``execution_id`` (None: it may).

    A cancelled run stays cancelled unless resumed (to running); a finished
    run is not cancelled; only the current execution moves the run.
    ``set_run_status.lua`` and ``complete_step.lua`` ask the same through
    ``sf_status_refusal``.
    """
    if record.status == RunStatus.CANCELLED and status not in _AFTER_CANCEL:
        return RunCancelledError(record.run_id)
    if status == RunStatus.CANCELLED and record.status in _NOT_CANCELLED:
        return ConflictError(
            f"run {record.run_id!r}: it is {record.status}, and a finished run is not cancelled"
        )
    if record.current_execution_id != execution_id:
        return ConflictError(
            f"run {record.run_id!r} is at execution {record.current_execution_id}, "
            f"not {execution_id}"
        )
    return None


def _unseen_raised(run_id: str, execution: _Execution, seen_events: int | None) -> list[Event]:
    """The events after the first ``seen_events``, all raised ones; else `ConflictError`.

    The check of a writer that read that many events (see
    `WorkflowStore.append_event`): raised events arrive from outside at any
    rate and settle nothing it records, any other event means it must read
    again. ``append_event.lua`` and ``continue_as_new.lua`` ask the same
    through ``sf_unseen_raised``.
    """
    if seen_events is None:
        return []
    late = execution.events[seen_events:]
    if len(execution.events) < seen_events or not all(
        e.kind == EventKind.EVENT_RAISED and isinstance(e.payload, dict) for e in late
    ):
        raise ConflictError(
            f"run {run_id!r}: events arrived in execution {execution.execution_id} meanwhile"
        )
    return late


class MemoryStore(MemoryAdmin):
    """In-process store: the quick start, the tests, and the definition of correct."""

    def __init__(self, *, max_payload_bytes: int = _json.DEFAULT_MAX_PAYLOAD_BYTES) -> None:
        self.max_payload_bytes = max_payload_bytes
        self._codec = Codec(max_payload_bytes)
        self._runs: dict[str, _Run] = {}
        self._children: dict[str, set[str]] = {}
        """Parent id -> ids of runs created with it as parent (stale ids are filtered on read)."""
        self._status_counts: Counter[RunStatus] = Counter()
        self._executions_total = 0
        self._events_total = 0

    async def __aenter__(self) -> MemoryStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Nothing to release; present so both stores are used the same way."""

    async def time_ms(self) -> int:
        return now_ms()

    def _run(self, run_id: str) -> _Run:
        validate_run_id(run_id)
        run = self._runs.get(run_id)
        if run is None:
            raise RunNotFoundError(run_id)
        return run

    def _copy(self, data: bytes) -> Any:
        return _json.loads(data)

    def _set_record(self, run: _Run, record: RunRecord) -> None:
        """Replace the run's record, keeping the status counts in step."""
        self._status_counts[run.record.status] -= 1
        self._status_counts[record.status] += 1
        run.record = record

    # -- runs -----------------------------------------------------------------

    async def create_run(
        self, record: RunRecord, *, only_if_absent: bool = False, event: NewEvent | None = None
    ) -> bool:
        validate_run_id(record.run_id)
        if record.parent_run_id is not None:
            validate_run_id(record.parent_run_id)
        encoded = self._codec.encode_run(record)
        context = self._codec.encode_context(record.context, "context")
        event_json = self._codec.encode_event(event) if event is not None else None
        stored = record.model_copy(
            update={
                "input": self._copy(encoded.input),
                "output": self._copy(encoded.output),
                "error": self._copy(encoded.error),
                "context": {},
            }
        )
        if only_if_absent and record.run_id in self._runs:
            return False
        if record.parent_run_id is not None:
            self._children.setdefault(record.parent_run_id, set()).add(record.run_id)
        run = self._runs.get(record.run_id)
        if run is None:
            run = self._runs[record.run_id] = _Run(record=stored)
            self._status_counts[stored.status] += 1
        else:
            self._set_record(run, stored)
        run.context = context
        xid = record.current_execution_id
        execution = run.executions.get(xid)
        if execution is None:
            execution = run.executions[xid] = _Execution(
                execution_id=xid,
                status=record.status,
                input=encoded.input,
                started_at=record.created_at,
            )
            self._executions_total += 1
        else:
            execution.status = record.status
        if event is not None and event_json is not None:
            self._append(execution, event.kind, event_json, now_ms())
        return True

    async def create_and_claim(
        self,
        record: RunRecord,
        first: StepClaim,
        *,
        owner: str,
        event: NewEvent | None = None,
    ) -> tuple[bool, Lease | None]:
        validate_step_id(first.step_id)
        check_claim(owner, first.lease_ms, first.name)
        # create_run never yields, so nothing runs between the create and the claim.
        if not await self.create_run(record, only_if_absent=True, event=event):
            return False, None
        run = self._runs[record.run_id]
        if run.record.status == RunStatus.CANCELLED:
            return True, None
        lease = self._claim(
            run,
            first.step_id,
            first.name,
            owner,
            first.lease_ms,
            record.current_execution_id,
            b"null",
        )
        return True, lease

    async def get_run(self, run_id: str) -> RunRecord | None:
        validate_run_id(run_id)
        run = self._runs.get(run_id)
        if run is None:
            return None
        context = {key: self._copy(value) for key, value in run.context.items()}
        return self._snapshot(run.record).model_copy(update={"context": context})

    def _snapshot(self, record: RunRecord) -> RunRecord:
        return record.model_copy(
            update={
                "input": self._copy(_json.dumps(record.input)),
                "output": self._copy(_json.dumps(record.output)),
                "error": self._copy(_json.dumps(record.error)),
            }
        )

    async def set_run_status(
        self,
        run_id: str,
        status: RunStatus,
        *,
        execution_id: int,
        output: Any = None,
        error: Any = None,
        event: NewEvent | None = None,
    ) -> RunRecord:
        status = RunStatus(status)
        validate_run_id(run_id)
        output_json = self._codec.encode(output, "run output")
        error_json = self._codec.encode(error, "run error")
        event_json = self._codec.encode_event(event) if event is not None else None
        run = self._run(run_id)
        refusal = _status_refusal(run.record, status, execution_id)
        if refusal is not None:
            raise refusal
        if status.is_terminal and run.record.status in (status, RunStatus.COMPLETED):
            self._settle(run)  # a second finish: only events recorded since are counted
        else:
            self._set_status(run, status, output_json, error_json, event, event_json)
        return await self._get_existing(run_id)

    def _set_status(
        self,
        run: _Run,
        status: RunStatus,
        output_json: bytes,
        error_json: bytes,
        event: NewEvent | None,
        event_json: bytes | None,
    ) -> None:
        """Move a run checked by the caller, and its current execution, to ``status``."""
        execution_id = run.record.current_execution_id
        now = now_ms()
        completed_at = now if status.is_terminal else None
        self._set_record(
            run,
            run.record.model_copy(
                update={
                    "status": status,
                    "output": self._copy(output_json),
                    "error": self._copy(error_json),
                    "updated_at": now,
                    "completed_at": completed_at,
                }
            ),
        )
        execution = run.executions[execution_id]
        execution.status = status
        execution.output = output_json
        execution.error = error_json
        execution.completed_at = completed_at
        if event is not None and event_json is not None:
            self._append(execution, event.kind, event_json, now)
        if status.is_terminal:
            self._settle(run)

    async def _get_existing(self, run_id: str) -> RunRecord:
        record = await self.get_run(run_id)
        assert record is not None
        return record

    async def update_context(self, run_id: str, context: Mapping[str, Any]) -> None:
        validate_run_id(run_id)
        encoded = self._codec.encode_context(context, "context")
        self._run(run_id).context = encoded

    async def merge_context(self, run_id: str, patch: Mapping[str, Any]) -> None:
        validate_run_id(run_id)
        encoded = self._codec.encode_context(patch, "context patch")
        self._run(run_id).context.update(encoded)

    async def delete_run(self, run_id: str) -> bool:
        validate_run_id(run_id)
        return self._remove(run_id) is not None

    async def list_runs(
        self, *, limit: int = 100, offset: int = 0, oldest_first: bool = False
    ) -> list[RunRecord]:
        return self._page(self._runs.values(), limit, offset, oldest_first)

    async def list_runs_by_status(
        self,
        status: RunStatus | str,
        *,
        limit: int = 100,
        offset: int = 0,
        oldest_first: bool = False,
    ) -> list[RunRecord]:
        wanted = parse_run_status(status)
        runs = (run for run in self._runs.values() if run.record.status == wanted)
        return self._page(runs, limit, offset, oldest_first)

    def _page(self, runs: Any, limit: int, offset: int, oldest_first: bool) -> list[RunRecord]:
        check_int(limit, "limit", 0)
        check_int(offset, "offset", 0)
        ordered = sorted(runs, key=lambda run: (run.record.created_at, run.record.run_id))
        if not oldest_first:
            ordered.reverse()
        page = ordered[offset : offset + limit] if limit > 0 else []
        return [
            self._snapshot(run.record).model_copy(
                update={"context": {k: self._copy(v) for k, v in run.context.items()}}
            )
            for run in page
        ]

    # -- steps ----------------------------------------------------------------

    async def upsert_step(
        self, run_id: str, step: StepState, *, keep_completed: bool = False
    ) -> bool:
        validate_run_id(run_id)
        validate_step_id(step.step_id)
        isolated = self._codec.isolate_step(step)
        steps = self._run(run_id).steps
        stored = steps.get(step.step_id)
        if keep_completed and stored is not None and stored.status == StepStatus.COMPLETED:
            return False
        steps[step.step_id] = isolated
        return True

    async def get_step(self, run_id: str, step_id: str) -> StepState | None:
        validate_run_id(run_id)
        run = self._runs.get(run_id)
        step = run.steps.get(step_id) if run is not None else None
        return self._codec.isolate_step(step) if step is not None else None

    async def list_steps(self, run_id: str) -> list[StepState]:
        validate_run_id(run_id)
        run = self._runs.get(run_id)
        if run is None:
            return []
        return [self._codec.isolate_step(step) for step in run.steps.values()]

    async def claim_step(
        self,
        run_id: str,
        step_id: str,
        *,
        name: str,
        owner: str,
        lease_ms: int = DEFAULT_LEASE_MS,
        execution_id: int = 1,
        input: Any = None,
    ) -> Lease:
        await anyio.lowlevel.checkpoint()  # where other tasks run (see above)
        validate_run_id(run_id)
        validate_step_id(step_id)
        check_claim(owner, lease_ms, name)
        input_json = self._codec.encode(input, "step input")
        run = self._run(run_id)
        _refuse_if_cancelled(run)
        self._execution(run, execution_id)
        return self._claim(run, step_id, name, owner, lease_ms, execution_id, input_json)

    def _claim(
        self,
        run: _Run,
        step_id: str,
        name: str,
        owner: str,
        lease_ms: int,
        execution_id: int,
        input_json: bytes,
    ) -> Lease:
        """Claim a step of a run already checked (exists, not cancelled, execution there)."""
        run_id = run.record.run_id
        lease = run.leases.setdefault(step_id, _StepLease())
        previous = run.steps.get(step_id)
        now = now_ms()
        if previous is not None and previous.status == StepStatus.COMPLETED:
            raise StepAlreadyCompletedError(run_id, step_id)
        if lease.token and lease.expires_at > now:
            raise LeaseHeldError(run_id, step_id, lease.owner, lease.expires_at)
        lease.epoch += 1
        lease.owner = owner
        lease.token = new_token()
        lease.expires_at = now + lease_ms
        run.steps[step_id] = StepState(
            step_id=step_id,
            name=name,
            status=StepStatus.RUNNING,
            attempt=(previous.attempt if previous else 0) + 1,
            input=self._copy(input_json),
            started_at=now,
            worker_id=owner,
            execution_id=execution_id,
        )
        return Lease(
            run_id=run_id,
            step_id=step_id,
            owner=owner,
            token=lease.token,
            epoch=lease.epoch,
            expires_at=lease.expires_at,
            execution_id=execution_id,
            attempt=run.steps[step_id].attempt,
        )

    def _current_lease(
        self, lease: Lease, *, allow_expired: bool = False
    ) -> tuple[_Run, _StepLease]:
        """The run and the live lease ``lease`` stands for, else the refusal to raise."""
        run = self._runs.get(lease.run_id)
        if run is None:
            raise StaleLeaseError(lease.run_id, lease.step_id, "the run no longer exists")
        held = run.leases.get(lease.step_id)
        if held is None or held.token != lease.token or held.epoch != lease.epoch:
            step = run.steps.get(lease.step_id)
            if step is not None and step.status == StepStatus.COMPLETED:
                raise StepAlreadyCompletedError(lease.run_id, lease.step_id)
            raise StaleLeaseError(lease.run_id, lease.step_id, "the lease was taken over")
        if not allow_expired and held.expires_at <= now_ms():
            raise StaleLeaseError(lease.run_id, lease.step_id, "the lease expired")
        if run.steps[lease.step_id].execution_id != lease.execution_id:
            raise StaleLeaseError(lease.run_id, lease.step_id, "the lease is for another execution")
        return run, held

    async def renew_lease(self, lease: Lease, *, lease_ms: int = DEFAULT_LEASE_MS) -> Lease:
        validate_run_id(lease.run_id)
        check_int(lease_ms, "lease_ms", 1)
        run, held = self._current_lease(lease, allow_expired=True)  # unclaimed since: still ours
        _refuse_if_cancelled(run)
        held.expires_at = now_ms() + lease_ms
        return lease.model_copy(update={"expires_at": held.expires_at})

    async def complete_step(
        self,
        lease: Lease,
        *,
        output: Any = None,
        context_patch: Mapping[str, Any] | None = None,
        event: NewEvent | None = None,
    ) -> Event | None:
        await anyio.lowlevel.checkpoint()  # where other tasks run (see above)
        validate_run_id(lease.run_id)
        output_json, patch = self._codec.encode_completion(output, context_patch)
        event_json = self._codec.encode_event(event) if event is not None else None
        run, held = self._current_lease(lease)
        step = run.steps[lease.step_id]
        execution = self._execution(run, lease.execution_id)
        now = now_ms()
        held.token = ""
        run.steps[lease.step_id] = step.model_copy(
            update={
                "status": StepStatus.COMPLETED,
                "output": self._copy(output_json),
                "error": None,
                "finished_at": now,
            }
        )
        run.context.update(patch)
        if event is None or event_json is None:
            return None
        return self._isolate_event(self._append(execution, event.kind, event_json, now))

    async def complete_and_claim(
        self,
        lease: Lease,
        next_step: StepClaim,
        *,
        output: Any = None,
        context_patch: Mapping[str, Any] | None = None,
        event: NewEvent | None = None,
    ) -> tuple[Event | None, Lease | None]:
        validate_step_id(next_step.step_id)
        check_claim(lease.owner, next_step.lease_ms, next_step.name)
        # No await suspends in between: the pair is atomic like every method here.
        recorded = await self.complete_step(
            lease, output=output, context_patch=context_patch, event=event
        )
        run = self._runs[lease.run_id]
        if run.record.status == RunStatus.CANCELLED:
            return recorded, None
        try:
            claimed = self._claim(
                run,
                next_step.step_id,
                next_step.name,
                lease.owner,
                next_step.lease_ms,
                lease.execution_id,
                b"null",
            )
        except (StepAlreadyCompletedError, LeaseHeldError):
            return recorded, None
        return recorded, claimed

    async def complete_and_finish(
        self,
        lease: Lease,
        *,
        output: Any = None,
        context_patch: Mapping[str, Any] | None = None,
        event: NewEvent | None = None,
        run_output: Any = None,
        run_event: NewEvent | None = None,
    ) -> tuple[Event | None, RunRecord | None]:
        validate_run_id(lease.run_id)  # ids before payloads, as everywhere
        run_output_json = self._codec.encode(run_output, "run output")
        run_event_json = self._codec.encode_event(run_event) if run_event is not None else None
        # No await suspends in between (complete_step's only one comes first): atomic.
        recorded = await self.complete_step(
            lease, output=output, context_patch=context_patch, event=event
        )
        run = self._runs[lease.run_id]
        if _status_refusal(run.record, RunStatus.COMPLETED, lease.execution_id) is not None:
            return recorded, None  # the step's completion stands; the run is left as it is
        self._set_status(
            run, RunStatus.COMPLETED, run_output_json, b"null", run_event, run_event_json
        )
        return recorded, await self._get_existing(lease.run_id)

    async def fail_step(
        self,
        lease: Lease,
        *,
        error: Any,
        final: bool,
        event: NewEvent | None = None,
        ran: bool = True,
    ) -> None:
        await anyio.lowlevel.checkpoint()  # where other tasks run (see above)
        validate_run_id(lease.run_id)
        error_json = self._codec.encode(error, "step error")
        event_json = self._codec.encode_event(event) if event is not None else None
        run, held = self._current_lease(lease)
        step = run.steps[lease.step_id]
        execution = self._execution(run, lease.execution_id)
        now = now_ms()
        held.token = ""
        held.expires_at = 0
        run.steps[lease.step_id] = step.model_copy(
            update={
                "status": StepStatus.FAILED if final else StepStatus.PENDING,
                "error": self._copy(error_json),
                "finished_at": now,
                "attempt": step.attempt if ran else step.attempt - 1,
            }
        )
        if event is not None and event_json is not None:
            self._append(execution, event.kind, event_json, now)

    # -- history and executions -----------------------------------------------

    def _execution(self, run: _Run, execution_id: int) -> _Execution:
        execution = run.executions.get(execution_id)
        if execution is None:
            raise ExecutionNotFoundError(run.record.run_id, execution_id)
        return execution

    def _append(self, execution: _Execution, kind: EventKind, payload: bytes, now: int) -> Event:
        event = Event(
            event_id=len(execution.events) + 1,
            kind=kind,
            timestamp=now,
            payload=self._copy(payload),
        )
        execution.events.append(event)
        return event

    def _settle(self, run: _Run) -> None:
        """Bring the global event counter up to date with the run's stored events.

        Appending an event does not touch the global counter (on Redis that
        would be a write in another slot on every step); a run's events are
        counted when it finishes, continues as new or is pruned, and a
        delete takes back what was counted.
        """
        stored = run.events_stored()
        self._events_total += stored - run.events_counted
        run.events_counted = stored

    async def append_event(
        self,
        run_id: str,
        event: NewEvent,
        *,
        execution_id: int,
        only_if_current: bool = False,
        seen_events: int | None = None,
    ) -> Event:
        validate_run_id(run_id)
        if seen_events is not None:
            check_int(seen_events, "seen_events", 0)
        payload = self._codec.encode_event(event)
        run = self._run(run_id)
        _refuse_if_cancelled(run)
        execution = self._execution(run, execution_id)
        if only_if_current and run.record.current_execution_id != execution_id:
            raise ConflictError(f"run {run_id!r}: execution {execution_id} is no longer current")
        _unseen_raised(run_id, execution, seen_events)
        return self._isolate_event(self._append(execution, event.kind, payload, now_ms()))

    def _isolate_event(self, event: Event) -> Event:
        return event.model_copy(update={"payload": self._copy(_json.dumps(event.payload))})

    async def read_history(
        self, run_id: str, execution_id: int | None = None, *, after_event_id: int = 0
    ) -> list[Event]:
        validate_run_id(run_id)
        check_int(after_event_id, "after_event_id", 0)
        if execution_id is not None:
            check_int(execution_id, "execution_id", 1)
        run = self._run(run_id)
        xid = run.record.current_execution_id if execution_id is None else execution_id
        events = self._execution(run, xid).events[after_event_id:]  # ids run 1..N
        return [self._isolate_event(e) for e in events]

    async def list_executions(self, run_id: str) -> list[ExecutionInfo]:
        run = self._run(run_id)
        return [
            ExecutionInfo(
                execution_id=x.execution_id,
                status=x.status,
                input=self._copy(x.input),
                output=self._copy(x.output),
                error=self._copy(x.error),
                started_at=x.started_at,
                completed_at=x.completed_at,
                event_count=len(x.events),
            )
            for x in sorted(run.executions.values(), key=lambda x: x.execution_id)
        ]

    async def continue_as_new(
        self,
        run_id: str,
        input: Any,
        *,
        execution_id: int,
        prune: PruneOptions | None = None,
        carry: Sequence[NewEvent] = (),
        seen_events: int | None = None,
    ) -> int:
        validate_run_id(run_id)
        if seen_events is not None:
            check_int(seen_events, "seen_events", 0)
        input_json = self._codec.encode(input, "continue-as-new input")
        carried = [(event.kind, self._codec.encode_carried(event)) for event in carry]
        run = self._run(run_id)
        _refuse_if_cancelled(run)
        if run.record.current_execution_id != execution_id:
            raise ConflictError(
                f"run {run_id!r} is at execution {run.record.current_execution_id}, "
                f"not {execution_id}"
            )
        old = self._execution(run, execution_id)
        # Raised events the caller did not read go along (see the protocol).
        carried += [
            (
                EventKind.EVENT_RAISED,
                _json.dumps({**e.payload, "carried_from": [execution_id, e.event_id]}),
            )
            for e in _unseen_raised(run_id, old, seen_events)
        ]
        now = now_ms()
        old.status = RunStatus.CONTINUED_AS_NEW
        old.completed_at = now
        new_id = execution_id + 1
        self._append(old, EventKind.CONTINUED_AS_NEW, _json.dumps({"next": new_id}), now)
        if new_id not in run.executions:  # else left from before a create_run moved the
            self._executions_total += 1  # run back: replaced, history included
        new = run.executions[new_id] = _Execution(
            execution_id=new_id, status=RunStatus.RUNNING, input=input_json, started_at=now
        )
        self._append(new, EventKind.RUN_STARTED, input_json, now)
        if prune is not None:
            result = self._prune(run, new_id, prune)
            counts = {
                "reason": "continue_as_new",
                "executions_deleted": result.executions_deleted,
                "events_deleted": result.events_deleted,
            }
            self._append(new, EventKind.HISTORY_PRUNED, _json.dumps(counts), now)
        for kind, payload in carried:
            self._append(new, kind, payload, now)
        self._settle(run)
        self._set_record(
            run,
            run.record.model_copy(
                update={
                    "current_execution_id": new_id,
                    "status": RunStatus.RUNNING,
                    "input": self._copy(input_json),
                    "output": None,
                    "error": None,
                    "updated_at": now,
                    "completed_at": None,
                }
            ),
        )
        return new_id

    async def prune_executions(self, run_id: str, options: PruneOptions) -> PruneResult:
        run = self._run(run_id)
        result = self._prune(run, run.record.current_execution_id, options)
        self._settle(run)
        return result

    def _prune(self, run: _Run, current: int, options: PruneOptions) -> PruneResult:
        """Delete what `prune_executions` selects, with the step rows of those executions."""
        keep = max(options.keep_last or 1, 1)
        newest_first = sorted(run.executions, reverse=True)
        newest_first.remove(current)
        newest_first.insert(0, current)
        deleted = events = 0
        for position, xid in enumerate(newest_first, start=1):
            execution = run.executions[xid]
            finished = execution.status not in (RunStatus.RUNNING, RunStatus.PENDING)
            old_enough = options.completed_before is None or (
                execution.completed_at is not None
                and execution.completed_at < options.completed_before
            )
            if xid != current and position > keep and finished and old_enough:
                events += len(execution.events)
                deleted += 1
                del run.executions[xid]
                for sid in [s.step_id for s in run.steps.values() if s.execution_id == xid]:
                    del run.steps[sid]
                    run.leases.pop(sid, None)
        self._executions_total -= deleted
        return PruneResult(instances_processed=1, executions_deleted=deleted, events_deleted=events)
