"""Records stepflow stores and returns: runs, steps, history, admin views.

All records are pydantic v2 models and frozen: a record is a snapshot of the
store at the moment it was read, and changing it changes nothing stored. To
write, build a new record (``record.model_copy(update=...)``) and hand it to
the store. Times are integer milliseconds since the epoch; payload fields
hold JSON values.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from stepflow.errors import InvalidArgumentError, InvalidStatusError


def now_ms() -> int:
    """Wall-clock milliseconds since the epoch (records' time unit)."""
    return time.time_ns() // 1_000_000


class _CaseInsensitiveEnum(StrEnum):
    """A status users may write in any case: ``"Completed" == "completed"``."""

    @classmethod
    def _missing_(cls, value: object) -> Any:
        if isinstance(value, str):
            lowered = value.strip().lower()
            for member in cls:
                if member.value == lowered:
                    return member
        return None


class RunStatus(_CaseInsensitiveEnum):
    """Where a run (or one of its executions) stands."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CONTINUED_AS_NEW = "continued_as_new"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        """True once the run will not change by itself any more."""
        return self in _TERMINAL_RUN


def parse_run_status(value: RunStatus | str) -> RunStatus:
    """``value`` as a `RunStatus` (any case), else `InvalidStatusError`."""
    try:
        return RunStatus(value)
    except ValueError:
        raise InvalidStatusError(value, [status.value for status in RunStatus]) from None


_TERMINAL_RUN = frozenset(
    {RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.CONTINUED_AS_NEW}
)


class StepStatus(_CaseInsensitiveEnum):
    """Where one step of a run stands."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


class EventKind(_CaseInsensitiveEnum):
    """Kinds of history events, one list per execution."""

    RUN_STARTED = "run_started"
    STEP_SCHEDULED = "step_scheduled"
    STEP_COMPLETED = "step_completed"
    STEP_FAILED = "step_failed"
    STEP_SKIPPED = "step_skipped"
    TIMER_CREATED = "timer_created"
    TIMER_FIRED = "timer_fired"
    EVENT_RAISED = "event_raised"
    EVENT_RECEIVED = "event_received"
    CHILD_STARTED = "child_started"
    CHILD_COMPLETED = "child_completed"
    CHILD_FAILED = "child_failed"
    CONTINUED_AS_NEW = "continued_as_new"
    HISTORY_PRUNED = "history_pruned"
    RUN_COMPLETED = "run_completed"
    RUN_FAILED = "run_failed"
    RUN_CANCELLED = "run_cancelled"


_R = TypeVar("_R", bound="BaseModel")


def optional_record(value: object, kind: type[_R], what: str) -> _R | None:
    """``value`` when it is a ``kind`` record or None, else `InvalidArgumentError`.

    For options taken as records (``PruneOptions``, ``InstanceFilter``): a
    plain dict in their place would otherwise fail later, deep inside, with
    an ``AttributeError``, or after part of the work was done.
    """
    if value is None or isinstance(value, kind):
        return value
    raise InvalidArgumentError(
        f"{what} must be a stepflow.{kind.__name__} or None, got {type(value).__name__} "
        f"(build one: stepflow.{kind.__name__}(...))"
    )


_FROZEN = ConfigDict(frozen=True, use_attribute_docstrings=True, extra="forbid")


class _HotRecord(BaseModel):
    """A frozen record built on every step (`Lease`, `Event`, `NewEvent`): pydantic's own
    construction, without `_Record`'s translation of its errors, a frame a step can spare."""

    model_config = _FROZEN


class _Record(BaseModel):
    """A frozen record whose construction from bad values raises `InvalidArgumentError`.

    pydantic's own `ValidationError` would reach a user who builds, say,
    ``PruneOptions(keep_last=-1)``, outside the `StepflowError` hierarchy.
    Both are `ValueError`s, so ``except ValueError`` still catches it.
    """

    model_config = _FROZEN

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, error['loc'])) or 'value'}: {error['msg']}"
                for error in exc.errors(include_url=False)
            )
            raise InvalidArgumentError(f"{type(self).__name__}: {problems}") from exc


class RunRecord(_Record):
    """One run (an "instance") of a workflow, with its context bag."""

    run_id: str
    """Unique id; every key of the run is built from it."""
    workflow: str
    """Registered name of the workflow definition."""
    version: str = "1"
    """Version of the definition that started the run."""
    status: RunStatus = RunStatus.PENDING
    input: Any = None
    """Input of the current execution (JSON)."""
    output: Any = None
    """Result once completed (JSON)."""
    error: Any = None
    """Error once failed: a JSON object with at least ``type`` and ``message``."""
    context: dict[str, Any] = Field(default_factory=dict)
    """The shared context bag; steps' returned mappings merge into it."""
    created_at: int = Field(default_factory=now_ms)
    updated_at: int = Field(default_factory=now_ms)
    completed_at: int | None = None
    parent_run_id: str | None = None
    """Set on child runs: the run that started this one."""
    current_execution_id: int = 1
    """Executions count up from 1; continue-as-new starts the next."""


class StepState(_Record):
    """The stored state of one step of a run."""

    step_id: str
    """Unique within the run; the DAG engine uses the step name."""
    name: str
    status: StepStatus = StepStatus.PENDING
    attempt: int = 0
    """Number of attempts started so far."""
    input: Any = None
    output: Any = None
    error: Any = None
    started_at: int | None = None
    finished_at: int | None = None
    worker_id: str | None = None
    """Owner of the lease under which the step last ran."""
    execution_id: int = 1


class Lease(_HotRecord):
    """A claim on one step: only the holder of the newest lease may record its result."""

    run_id: str
    step_id: str
    owner: str
    token: str
    """Unique per claim (see ``store/ids.py``): a lease from before a delete and re-create
    never matches."""
    epoch: int
    """Grows by one with every claim of the step; a write carrying an older one is refused."""
    expires_at: int
    """Store-clock milliseconds (Redis ``TIME``) after which another owner may claim."""
    execution_id: int = 1
    """Execution the attempt belongs to; its history receives the step's events."""
    attempt: int
    """Which attempt of the step this lease is for: every claim of a step counts one
    (the first claim is attempt 1). Retries and backoff are counted from it."""


@dataclass(frozen=True, slots=True)
class StepClaim:
    """The step to claim right after a completion (see `WorkflowStore.complete_and_claim`).

    A plain dataclass rather than a record: it is built once per step on the
    engine's hot path and never stored as such.
    """

    step_id: str
    name: str
    lease_ms: int


class Event(_HotRecord):
    """One entry of an execution's history."""

    event_id: int
    """1..N within its execution, in order of appending."""
    kind: EventKind
    timestamp: int
    payload: Any = None


class NewEvent(_HotRecord):
    """An event to append; the store assigns its id and timestamp."""

    kind: EventKind
    payload: Any = None


class ExecutionInfo(_Record):
    """One execution of a run (continue-as-new starts the next)."""

    execution_id: int
    status: RunStatus
    input: Any = None
    output: Any = None
    error: Any = None
    started_at: int
    completed_at: int | None = None
    event_count: int = 0


class InstanceInfo(_Record):
    """What an operator sees of one run."""

    instance_id: str
    workflow: str
    version: str
    status: RunStatus
    current_execution_id: int
    output: Any = None
    error: Any = None
    created_at: int
    updated_at: int
    completed_at: int | None = None
    parent_id: str | None = None


class SystemMetrics(_Record):
    """Counters kept with the transitions (never computed by a scan).

    Runs and executions count as they are created and removed; a run's
    history events count when it settles (finishes, continues as new, is
    pruned), so ``total_events`` lags behind runs still running. On
    `RedisStore` each counter is updated right after the run's own change,
    idempotently, so it is exact unless a process dies between the two
    writes (see the README's "Admin" section).
    """

    total_instances: int = 0
    """Runs stored, child runs included."""
    total_executions: int = 0
    """Executions stored, over all runs (pruned ones no longer count)."""
    running_instances: int = 0
    """Runs not finished yet: status ``pending`` or ``running``."""
    completed_instances: int = 0
    failed_instances: int = 0
    cancelled_instances: int = 0
    total_events: int = 0
    """History events stored, over all executions of all runs, as of each run's last settle."""


class QueueDepths(_Record):
    """Ready work per queue; zero where a queue does not exist yet."""

    orchestrator: int = 0
    """Runs waiting for a process to drive them."""
    worker: int = 0
    """Steps waiting for a worker."""
    timer: int = 0
    """Timers that are due."""


class PruneOptions(_Record):
    """Which finished executions of a run to delete.

    The current execution and running executions are never pruned;
    ``keep_last`` of None, 0 and 1 all mean "keep only the current".
    """

    keep_last: int | None = None
    """Keep this many newest executions (the current one counts)."""
    completed_before: int | None = None
    """Only prune executions completed before this time (ms)."""

    @field_validator("keep_last")
    @classmethod
    def _non_negative(cls, value: int | None) -> int | None:
        if value is not None and value < 0:
            raise ValueError("keep_last must be >= 0")
        return value


class InstanceFilter(_Record):
    """Selects runs for bulk deletes and prunes; the criteria given are ANDed."""

    instance_ids: list[str] | None = None
    """Only these runs (ids that do not exist are skipped); None = every run."""
    completed_before: int | None = None
    """Only runs that finished before this time (ms); an unfinished run never matches."""
    limit: int | None = None
    """At most this many runs, applied after the other criteria; None = no limit."""

    @field_validator("limit")
    @classmethod
    def _limit_non_negative(cls, value: int | None) -> int | None:
        if value is not None and value < 0:
            raise ValueError("limit must be >= 0")
        return value


class PruneResult(_Record):
    """What a prune removed."""

    instances_processed: int = 0
    executions_deleted: int = 0
    events_deleted: int = 0

    def __add__(self, other: PruneResult) -> PruneResult:
        return PruneResult(
            instances_processed=self.instances_processed + other.instances_processed,
            executions_deleted=self.executions_deleted + other.executions_deleted,
            events_deleted=self.events_deleted + other.events_deleted,
        )


class DeleteResult(_Record):
    """What a delete removed."""

    instances_deleted: int = 0
    executions_deleted: int = 0
    events_deleted: int = 0
    queue_messages_deleted: int = 0
    """Entries removed from the work queues (0 while runs are not queued in the store)."""

    def __add__(self, other: DeleteResult) -> DeleteResult:
        return DeleteResult(
            instances_deleted=self.instances_deleted + other.instances_deleted,
            executions_deleted=self.executions_deleted + other.executions_deleted,
            events_deleted=self.events_deleted + other.events_deleted,
            queue_messages_deleted=self.queue_messages_deleted + other.queue_messages_deleted,
        )


class InstanceTree(_Record):
    """A run and all its descendants (child runs, their children...)."""

    instance_id: str
    children: list[InstanceTree] = Field(default_factory=list)
    """Direct children, oldest first, each with its own subtree."""

    @property
    def root_id(self) -> str:
        """The id this tree was read from (its root)."""
        return self.instance_id

    def all_ids(self) -> list[str]:
        """The root first, then every descendant depth-first."""
        ids = [self.instance_id]
        for child in self.children:
            ids.extend(child.all_ids())
        return ids

    def size(self) -> int:
        """Number of runs in the tree, the root included."""
        return 1 + sum(child.size() for child in self.children)

    def is_root_only(self) -> bool:
        """True when the run has no children."""
        return not self.children
