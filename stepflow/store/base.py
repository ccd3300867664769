"""The storage contract every backend implements.

`WorkflowStore` is the hot path the engines use: runs, the context bag,
steps, leases and per-execution history. Each method is one atomic operation
on the backend (one Lua script on Redis), so a crash between two calls never
leaves a half-written change. `MemoryStore` is the reference semantics;
`RedisStore` must behave identically, which the conformance suite checks.

The management operations (list, delete trees, prune, metrics) form a second
protocol, `AdminStore`, on the same classes, so the hot path stays small.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from stepflow.errors import InvalidArgumentError, InvalidRunIdError, InvalidStepIdError
from stepflow.models import (
    DeleteResult,
    Event,
    ExecutionInfo,
    Lease,
    NewEvent,
    PruneOptions,
    PruneResult,
    QueueDepths,
    RunRecord,
    RunStatus,
    StepClaim,
    StepState,
    SystemMetrics,
)

MAX_RUN_ID_LENGTH = 200
_RUN_ID = re.compile(r"[A-Za-z0-9\-_.:@/+=]+")
DEFAULT_LEASE_MS = 30_000


def id_problem(value: object) -> str | None:
    """Why ``value`` cannot be a run or step id, or None when it can.

    Braces would change the Redis Cluster hash tag and whitespace or control
    characters make ids that cannot be typed back into the CLI, so the
    allowed alphabet is explicit rather than a list of exclusions.
    """
    if not isinstance(value, str):
        return f"must be a str, not {type(value).__name__}"
    if not value:
        return "is empty"
    if len(value) > MAX_RUN_ID_LENGTH:
        return f"is {len(value)} characters long, over the limit"
    if _RUN_ID.fullmatch(value) is None:
        bad = next(ch for ch in value if _RUN_ID.fullmatch(ch) is None)
        return f"contains the forbidden character {bad!r}"
    return None


def validate_run_id(run_id: object) -> str:
    """Return ``run_id`` if it can be part of a key name, else raise `InvalidRunIdError`."""
    problem = id_problem(run_id)
    if problem is not None:
        raise InvalidRunIdError(run_id, problem)
    return run_id  # type: ignore[return-value]  # id_problem checked it is a str


def validate_step_id(step_id: object) -> str:
    """Step ids live inside hash fields, not key names, but share the alphabet for sanity."""
    problem = id_problem(step_id)
    if problem is not None:
        raise InvalidStepIdError(step_id, problem)
    return step_id  # type: ignore[return-value]  # id_problem checked it is a str


def check_claim(owner: object, lease_ms: object, name: object = "") -> None:
    """The owner, lease length and step name of a claim, or `InvalidArgumentError`.

    Checked before anything is written: a non-text owner would be stored in
    the step's row and refused by every later read of it.
    """
    if not isinstance(owner, str) or not owner:
        raise InvalidArgumentError(f"owner must be a non-empty str, got {owner!r}")
    check_int(lease_ms, "lease_ms", 1)
    if not isinstance(name, str):
        raise InvalidArgumentError(f"step name must be a str, got {name!r}")


def check_int(value: object, name: str, minimum: int) -> int:
    """``value`` if it is an int (not a bool) from ``minimum``, else `InvalidArgumentError`.

    For counts, ids, lengths and pages: a float or a text there would find
    another record on one store and fail on the other, and a negative offset
    would count from the other end of a list.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgumentError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


@runtime_checkable
class WorkflowStore(Protocol):
    """Durable state of runs; every method is atomic on its backend.

    Unless noted, a method on a run that does not exist raises
    `RunNotFoundError`, and a method given bad input raises a
    `StepflowError` subclass without changing anything stored. Checks run
    in one order on every backend, so a call with several faults gets the
    same error everywhere: ids (`InvalidRunIdError`), then payloads
    (`InvalidPayloadError`), then the stored state (not found, lease, conflict).

    `claim_step`, `complete_step`, `complete_and_claim`, `complete_and_finish`
    and `fail_step` must let other tasks run once per call (a store over a
    network does; `MemoryStore` checkpoints before it reads anything): the
    engine runs a chain of steps in one task without a yield of its own, so a
    store that never suspends would let a chain starve every other task and
    ignore a cancel.
    """

    max_payload_bytes: int
    """Largest encoded JSON payload accepted (input, output, patch, event...)."""

    async def aclose(self) -> None:
        """Release connections; the store is unusable afterwards."""

    async def time_ms(self) -> int:
        """The store's clock in milliseconds, the one leases and timers follow."""

    # -- runs -----------------------------------------------------------------

    async def create_run(
        self, record: RunRecord, *, only_if_absent: bool = False, event: NewEvent | None = None
    ) -> bool:
        """Create the run, or overwrite the record of an existing one (create-or-resume).

        The context bag is replaced by ``record.context``; step rows and history
        of an existing run are kept, so a resumed run sees its completed steps.
        The run's current execution is created when missing. With
        ``only_if_absent`` an existing run is left untouched and False is
        returned: two processes starting the same run id cannot wipe each
        other's work. ``event`` is appended to the current execution's history
        in the same step, when the record is written: a run created already
        running records its ``run_started`` without a second write. Returns
        True when the record was written.
        """

    async def create_and_claim(
        self,
        record: RunRecord,
        first: StepClaim,
        *,
        owner: str,
        event: NewEvent | None = None,
    ) -> tuple[bool, Lease | None]:
        """`create_run` with ``only_if_absent``, then claim step ``first`` for ``owner``.

        One operation (one round trip on Redis) where an engine would
        otherwise create a run and claim the step it starts with. The claim
        is made only when this call created the run, in its current
        execution, as by `claim_step`; a claim the store refuses (the record
        was created cancelled) is not raised, the lease is then None. Returns
        whether the run was created (False: it existed, nothing was written
        or claimed) and the lease (or None).
        """

    async def get_run(self, run_id: str) -> RunRecord | None:
        """The run with its context bag, or None when absent."""

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
        """Move the run and its current execution to ``status`` in one step.

        A cancelled run only moves to ``running`` (a resume) or stays
        cancelled; anything else raises `RunCancelledError`, so a process still
        finishing a run another process cancelled cannot overwrite that. A
        completed or failed run is not cancelled (`ConflictError`), so a
        cancel that read the run before it finished cannot overwrite that.
        ``execution_id`` must be the run's current execution (else
        `ConflictError`): an engine that lost a race with continue-as-new
        cannot finish the newer execution. Terminal statuses set
        ``completed_at``. ``event`` is appended to that execution's history.
        A run already in the terminal ``status`` asked for, or completed (that
        is final), is returned as it is, no event appended: when two
        processes drive one run (one resumed it while the other still drove
        it), both finish it. A failed run may still be completed: the other
        driver ran the failed step again, as a resume would, and it succeeded.
        """

    async def update_context(self, run_id: str, context: Mapping[str, Any]) -> None:
        """Replace the whole context bag."""

    async def merge_context(self, run_id: str, patch: Mapping[str, Any]) -> None:
        """Set each key of ``patch`` in the bag, leaving other keys as they are."""

    async def delete_run(self, run_id: str) -> bool:
        """Remove the run and everything of it; False when it did not exist.

        This removes one run as it is, children or not; `AdminStore.delete_runs`
        is the checked, all-or-nothing delete of a tree or a batch.
        """

    async def list_runs(
        self, *, limit: int = 100, offset: int = 0, oldest_first: bool = False
    ) -> list[RunRecord]:
        """Runs newest first (by ``created_at``, then id), or oldest first."""

    async def list_runs_by_status(
        self,
        status: RunStatus | str,
        *,
        limit: int = 100,
        offset: int = 0,
        oldest_first: bool = False,
    ) -> list[RunRecord]:
        """Runs in ``status`` (any case), newest first, or oldest first."""

    # -- steps ----------------------------------------------------------------

    async def upsert_step(
        self, run_id: str, step: StepState, *, keep_completed: bool = False
    ) -> bool:
        """Write a step row as given (no lease check); a new step keeps insertion order.

        With ``keep_completed`` a step already completed is left as it is and
        False is returned: marking steps skipped or cancelled can never undo a
        completion another owner recorded meanwhile. True when written.
        """

    async def get_step(self, run_id: str, step_id: str) -> StepState | None:
        """The step, or None when the run has no such step."""

    async def list_steps(self, run_id: str) -> list[StepState]:
        """Every step of the run in insertion order ([] for an unknown run)."""

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
        """Start an attempt of the step under a fresh lease.

        The step is created if missing, set ``running`` with its attempt
        count raised by one; the lease carries that count (``Lease.attempt``,
        which the engine numbers attempts and retries by). Refused with
        `LeaseHeldError` while another lease is live and with
        `StepAlreadyCompletedError` once completed. The new lease's epoch is
        one above every earlier one of the step.
        `ExecutionNotFoundError` when the run has no execution ``execution_id``.
        """

    async def renew_lease(self, lease: Lease, *, lease_ms: int = DEFAULT_LEASE_MS) -> Lease:
        """Extend the lease (heartbeat); `StaleLeaseError` once another owner claimed the step.

        An expired lease is renewed too while nobody claimed the step since, so
        an owner whose event loop stalled keeps its step rather than run it twice.
        `RunCancelledError` once the run was cancelled: how a cancel from
        another process reaches a step in flight, at its next heartbeat.
        """

    async def complete_step(
        self,
        lease: Lease,
        *,
        output: Any = None,
        context_patch: Mapping[str, Any] | None = None,
        event: NewEvent | None = None,
    ) -> Event | None:
        """Record the step completed, merge ``context_patch`` and append ``event``, atomically.

        Refused with `StaleLeaseError` (nothing changes) when the lease
        expired, was taken over, is for another execution than the step's, or
        the run was deleted. ``event`` goes to the
        history of the lease's execution; the appended event is returned
        (durable replay takes its timestamp as the workflow's clock).
        """

    async def complete_and_claim(
        self,
        lease: Lease,
        next_step: StepClaim,
        *,
        output: Any = None,
        context_patch: Mapping[str, Any] | None = None,
        event: NewEvent | None = None,
    ) -> tuple[Event | None, Lease | None]:
        """`complete_step`, then claim ``next_step`` for the lease's owner, atomically.

        One operation (one round trip on Redis) where an engine would
        otherwise complete a step and claim the step it unblocked: a chain of
        steps then costs one store call per step. The completion behaves and
        is refused exactly as by `complete_step` (then nothing is claimed).
        The claim is `claim_step` in the same execution, except that a claim
        the store would refuse (the step completed, a live lease holds it,
        the run was cancelled) is not raised: the second item is then None,
        and the caller claims the usual way to learn why. Returns the
        appended event (or None) and the new lease (or None).
        """

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
        """`complete_step`, then complete the run with ``run_output``, atomically.

        For a run's last step: one operation (one round trip on Redis) where an
        engine would otherwise complete the step and then the run. The
        completion behaves and is refused exactly as by `complete_step` (then
        the run is not touched). The run then goes as by `set_run_status` to
        ``completed`` in the lease's execution, with ``run_event`` appended
        after the step's event; where `set_run_status` would refuse (the run
        was cancelled, or is at another execution) the run is left as it is,
        the second item is None, and the caller finishes the usual way to learn
        why. `InvalidPayloadError` for an unstorable ``run_output`` comes
        before anything is written. Returns the step's appended event (or
        None) and the completed run (or None).
        """

    async def fail_step(
        self,
        lease: Lease,
        *,
        error: Any,
        final: bool,
        event: NewEvent | None = None,
        ran: bool = True,
    ) -> None:
        """Record a failed attempt and release the lease.

        ``final`` marks the step ``failed``; otherwise it goes back to
        ``pending`` for the next attempt. ``ran=False`` hands back a lease
        no attempt ran under (claimed ahead, or claimed as a cancel came):
        the claim's count is taken back, so the next attempt has the number
        this one had and ``ctx.attempt`` counts runs, not claims. Same lease
        checks as `complete_step`.
        """

    # -- history and executions -----------------------------------------------

    async def append_event(
        self,
        run_id: str,
        event: NewEvent,
        *,
        execution_id: int,
        only_if_current: bool = False,
        seen_events: int | None = None,
    ) -> Event:
        """Append to the execution's history; the store assigns id and timestamp.

        With ``only_if_current``, `ConflictError` when the run moved on to
        another execution (an event raised during continue-as-new is then sent
        again to the new execution instead of landing in the finished one).
        With ``seen_events``, `ConflictError` when an event other than a
        raised one (`EventKind.EVENT_RAISED`) came after the first
        ``seen_events``, or there are fewer: a writer appends after what it
        has read, never beside another writer's event (two drivers of a
        durable run would otherwise both record its timer). Raised events
        arrive from outside at any rate and settle nothing a writer records,
        so they never refuse it.
        `RunCancelledError` when the run is cancelled: a process still driving
        it records nothing more (a resume, to ``running``, reopens it).
        """

    async def read_history(
        self, run_id: str, execution_id: int | None = None, *, after_event_id: int = 0
    ) -> list[Event]:
        """Events of one execution (default: the current one), oldest first.

        With ``after_event_id``, only those after it: a durable run waiting for
        an event reads what is new each time, not its whole history again.
        """

    async def list_executions(self, run_id: str) -> list[ExecutionInfo]:
        """The run's stored executions, ascending."""

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
        """End execution ``execution_id`` as continued-as-new and start the next one.

        Atomically: the old execution gets status ``continued_as_new``, its
        ``completed_at`` and a ``continued_as_new`` event; the new one starts
        ``running`` with ``input`` and a ``run_started`` event; the run points
        at it. With ``prune``, old executions are pruned (as by
        `prune_executions`) in the same atomic step, and the new execution's
        history starts with a ``history_pruned`` event holding the counts.
        ``carry`` events (raised events no wait consumed) are appended to the
        new execution in the same step, so a crash cannot lose them. With
        ``seen_events``, the events after the first ``seen_events`` (the
        caller did not read them) go along too when they are all raised
        events, each after ``carry`` with ``carried_from`` [execution, event
        id] added to its payload, as the runner carries them: a stream of raised
        events cannot hold a continue off. Any other event after them, or
        fewer events, is a `ConflictError` (the caller reads again).
        Returns the new execution id. `ConflictError` when
        ``execution_id`` is not the current execution; `RunCancelledError`
        when the run is cancelled (it does not go on in a new execution).
        """

    async def prune_executions(self, run_id: str, options: PruneOptions) -> PruneResult:
        """Delete old finished executions of the run with their histories, atomically.

        Never the current execution, never a running one. ``keep_last`` keeps
        that many newest executions, the current one included (None, 0 and 1
        all keep only the current); ``completed_before`` limits the prune to
        executions completed before that time. The context bag and step rows
        are kept. ``instances_processed`` is 1 even when nothing was deleted.
        """


@runtime_checkable
class AdminStore(WorkflowStore, Protocol):
    """Management operations, on the same classes as `WorkflowStore` (see `stepflow.Admin`).

    Runs form trees: a run created with ``parent_run_id`` is recorded as a
    child of that run (in an index the store keeps with each create). A run
    whose parent does not exist counts as a root.
    """

    async def list_run_ids(
        self,
        *,
        status: RunStatus | None = None,
        limit: int = 100,
        offset: int = 0,
        oldest_first: bool = False,
    ) -> list[str]:
        """The ids `list_runs` (or `list_runs_by_status`) would return, read more cheaply."""

    async def list_children(self, run_id: str) -> list[str]:
        """Ids of the run's direct children, oldest first; [] for none or an unknown run."""

    async def delete_runs(self, run_ids: Sequence[str], *, force: bool = False) -> DeleteResult:
        """Delete the listed runs with all their data, all or nothing.

        Refused with nothing changed, checked in this order: an unknown id
        (`RunNotFoundError`), a listed run whose parent exists and is not
        listed (`SubRunDeleteError`), a child of a listed run that is not
        listed (`OrphanRunError`), a run not finished (pending or running)
        without ``force`` (`RunStillRunningError`). Afterwards a late write
        to any of them (a worker that still held a lease) is refused and
        recreates nothing.
        """

    async def get_metrics(self) -> SystemMetrics:
        """Counters kept with the transitions, never computed by a scan (see `SystemMetrics`)."""

    async def get_queue_depths(self) -> QueueDepths:
        """Ready entries per work queue; 0 where a queue does not exist."""
