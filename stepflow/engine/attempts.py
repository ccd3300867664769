"""Running one step under a lease: claim, call, heartbeat, record, retry.

Both the DAG runner and durable workflows' ``ctx.step`` go through
`execute_step`, so a step behaves the same wherever it is written: it is
claimed under a lease before it runs, the lease is renewed while it runs
(by a `LeaseKeeper`), and its result is recorded with one atomic store call
that the store refuses if the lease was lost meanwhile. A refused completion
means another owner took the step over; this process then drops its result.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import traceback as _traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import anyio.lowlevel

from stepflow.engine.slots import Slot
from stepflow.errors import (
    InvalidPayloadError,
    LeaseHeldError,
    RunCancelledError,
    StaleLeaseError,
    StepCancelledError,
    StepFailedError,
    StepflowError,
    StepTimeoutError,
    StoreError,
)
from stepflow.models import Event, EventKind, Lease, NewEvent, RunRecord, RunStatus, StepClaim
from stepflow.retry import RetryPolicy
from stepflow.store.base import WorkflowStore

_TRACEBACK_LIMIT = 4000
_MESSAGE_LIMIT = 4000
"""Characters of an error's traceback and message kept in its record (see `describe_error`)."""
_RENEW_RETRIES_PER_PERIOD = 4
"""After a failed renewal (the store, not a refusal) the keeper asks again this much sooner."""
_CLAIM_PATIENCE = 10.0
"""Seconds a claim is awaited, through a cancel too, before the store is given up on
(see `claimed_or_handed_back`); a claim takes a millisecond or so."""
_HELD_POLL_START = 0.05
_HELD_POLL_MAX = 1.0
"""Seconds between claims of a step another owner holds (see `_claim`)."""

_logger = logging.getLogger("stepflow.engine")

T = TypeVar("T")


def describe_error(exc: BaseException, *, traceback: bool = True, **extra: Any) -> dict[str, Any]:
    """A JSON record of an exception: what operators see in ``RunRecord.error``.

    ``traceback=False`` leaves the traceback out, for an error raised by
    stepflow itself whose traceback would show only the engine. The message
    and the traceback are cut to a few thousand characters each, so the
    record always fits the store's payload limit (`stepflow._json.MIN_PAYLOAD_BYTES`):
    a failure too large to record would leave its run ``running`` for good.
    """
    message = _message(exc)
    if isinstance(exc, BaseExceptionGroup):  # a task group's: say what is inside
        inner = "; ".join(f"{type(sub).__name__}: {_message(sub)}" for sub in exc.exceptions)
        message = f"{message}: {inner}"
    if len(message) > _MESSAGE_LIMIT:  # an API error quoting a whole response body, say
        cut = len(message) - _MESSAGE_LIMIT
        message = f"{message[:_MESSAGE_LIMIT]}... ({cut} more characters)"
    record: dict[str, Any] = {"type": type(exc).__name__, "message": _storable(message)}
    if traceback:
        trace = "".join(_traceback.format_exception(exc))
        record["traceback"] = _storable(trace[-_TRACEBACK_LIMIT:])
    return {**record, **extra}


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception as failed:  # a broken __str__ must not keep the failure from its record
        return f"<str() of the exception raised {type(failed).__name__}>"


def _storable(text: str) -> str:
    """``text`` with lone surrogates (``os.fsdecode`` of a non-UTF-8 file name) escaped:
    JSON cannot hold them, and an error record must always be stored."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class LeaseLost(StepflowError):
    """This process no longer owns the step; another owner carries it on."""


class RunCancelledElsewhere(RunCancelledError):
    """The store refused a step's lease renewal: another process cancelled the run.

    Raised by `execute_step` after it stopped the step (and handed its lease
    back, unless it had lapsed); a class of its own, so a step that raises
    `RunCancelledError` itself is a failed attempt, not taken for this.
    """


CANCELLED_ERROR = {"type": "Cancelled", "message": "the run was cancelled"}
"""``RunRecord.error`` (and each stopped step's) of a cancelled run."""


@dataclass(frozen=True, slots=True)
class StepCall:
    """One step to execute: identity, the user call, and how to retry it."""

    run_id: str
    step_id: str
    name: str
    execution_id: int
    invoke: Callable[[int], Any]
    """Called with the attempt number; returns the result or an awaitable of it."""
    policy: RetryPolicy
    timeout: float | None
    is_async: bool
    merge_mapping: bool = True
    """Merge a returned mapping into the context bag (DAG steps do, durable steps don't)."""
    history_tags: Mapping[str, Any] | None = None
    """Payload of the step's history events; None means ``{"step": name}``."""
    record_output: bool = False
    """Put the output in the completion event too (durable replay reads it from there)."""
    on_claimed: Callable[[Lease], Awaitable[dict[str, Any] | None]] | None = None
    """Called with each lease the step is claimed under, before its attempt: the error of
    a failure another driver of the run recorded, which then stands (durable steps; see
    `_take_recorded_failure`)."""

    def completed_payload(self, output: Any, attempt: int) -> dict[str, Any]:
        payload = {**self._tags(), "attempt": attempt}
        if self.record_output:
            payload["output"] = output
        return payload

    def failed_payload(self, error: dict[str, Any]) -> dict[str, Any]:
        return {**self._tags(), "error": error}

    def _tags(self) -> dict[str, Any]:
        return dict(self.history_tags) if self.history_tags is not None else {"step": self.name}


@dataclass(frozen=True, slots=True)
class StepOutcome:
    output: Any
    event: Event | None = None
    """The completion event as recorded (its timestamp is the store's clock)."""
    next_hold: Hold | None = None
    """The lease on the step asked for with ``then_claim``, kept by the keeper, if claimed."""
    finished: RunRecord | None = None
    """The run completed with the step (asked for with ``then_finish``), if it was."""


@dataclass(eq=False, slots=True)
class Hold:
    """A lease the `LeaseKeeper` keeps alive: an attempt's while it runs, or one claimed ahead."""

    lease: Lease
    renew_at: float = 0.0
    """`anyio.current_time` at which the keeper renews the lease next."""
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    """Wraps the user call only: the keeper cancels it when the lease is lost."""
    refusal: StepflowError | None = None
    """The store's refusal of a renewal, which ended the attempt: the lease is lost
    (`RunCancelledError`: the run was cancelled, and the step is still ours to hand back)."""
    outcome: tuple[Any, Exception | None] | None = None
    """(result, error) of the user call; None when the keeper cancelled it."""


class LeaseKeeper:
    """Renews the lease of every attempt in flight, from one task.

    One task per runner rather than one heartbeat task (and task group) per
    attempt: most steps finish well within a third of their lease, so per
    attempt the keeper costs a set insertion instead of a task spawn and
    cancellation. Start `run` in a task group before holding leases and
    `stop` it when the runner is done.

    A lease is renewed a third of ``lease_ms`` after it was taken or last
    renewed, so it has two thirds of its time left when renewed, as with a
    heartbeat per attempt. When the store refuses a renewal (the lease
    lapsed or another owner claimed the step), the attempt's own scope is
    cancelled and `execute_step` sorts out whether to give the step up.
    """

    def __init__(self, store: WorkflowStore, lease_ms: int) -> None:
        self.store = store
        self.lease_ms = lease_ms
        self._period = lease_ms / 3000
        self._holds: set[Hold] = set()
        self._scope = anyio.CancelScope()

    def stop(self) -> None:
        """End `run` (also when it has not started yet)."""
        self._scope.cancel()

    async def run(self) -> None:
        """Renew every lease when it is due, until `stop`.

        Sleeping until the earliest due renewal never misses a lease held
        meanwhile: a new lease is due a whole period after it is held,
        later than any wake-up already planned.
        """
        with self._scope:
            while True:
                now = anyio.current_time()
                for hold in [hold for hold in self._holds if hold.renew_at <= now]:
                    if hold in self._holds:  # its attempt may have ended during a renewal
                        await self._renew(hold)
                wake = min((hold.renew_at for hold in self._holds), default=now + self._period)
                await anyio.sleep(max(wake - anyio.current_time(), 0))

    async def _renew(self, hold: Hold) -> None:
        """Renew one lease; a store that fails (a lost connection) is asked again soon.

        Only the store's refusal ends the attempt: the step itself did not
        fail, and a lease lapsed meanwhile is still renewed while nobody
        claimed the step. A store that stays down fails the step's record.
        The refusal of a cancelled run is how a cancel from another process
        reaches a step in flight.
        """
        try:
            lease = await self.store.renew_lease(hold.lease, lease_ms=self.lease_ms)
        except StepflowError as refusal:
            self._give_up(hold, refusal)
        except Exception as exc:
            _logger.warning(
                "renewing the lease on step %r of run %r failed (%r); trying again",
                hold.lease.step_id,
                hold.lease.run_id,
                exc,
            )
            hold.renew_at = anyio.current_time() + self._period / _RENEW_RETRIES_PER_PERIOD
        else:
            hold.lease = lease
            hold.renew_at = anyio.current_time() + self._period

    def _give_up(self, hold: Hold, refusal: StepflowError) -> None:
        if hold in self._holds:  # else the attempt ended meanwhile: nothing to stop
            self._holds.discard(hold)
            hold.refusal = refusal
            hold.scope.cancel()

    def hold(self, lease: Lease) -> Hold:
        """Keep ``lease`` alive from now on, until the attempt run under it ends (or `drop`)."""
        hold = Hold(lease, renew_at=anyio.current_time() + self._period)
        self._holds.add(hold)
        return hold

    def drop(self, hold: Hold) -> None:
        """Stop renewing a lease that no attempt will run under."""
        self._holds.discard(hold)

    async def attempt(self, call: StepCall, attempt: int, hold: Hold) -> None:
        """Run one attempt of ``call`` under ``hold`` (from `hold`); see ``hold.outcome``."""
        try:
            with hold.scope:
                hold.outcome = await _capture(call, attempt)
        finally:
            self._holds.discard(hold)


async def with_lease_keeper(
    store: WorkflowStore, lease_ms: int, body: Callable[[LeaseKeeper], Awaitable[T]]
) -> T:
    """Await ``body(keeper)`` with a `LeaseKeeper` running beside it for its whole time.

    For a runner that drives its steps from one task (durable workflows). An
    exception of ``body`` is raised as is, not wrapped in an exception group
    by the keeper's task group; cancellation passes through it unwrapped anyway.
    """
    keeper = LeaseKeeper(store, lease_ms)
    failure: Exception | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(keeper.run, name="stepflow lease keeper")
        try:
            result = await body(keeper)
        except Exception as exc:
            failure = exc
        finally:
            keeper.stop()
    if failure is not None:
        raise failure
    return result


async def _call_user(call: StepCall, attempt: int) -> Any:
    if call.is_async:
        return await call.invoke(attempt)
    result = await anyio.to_thread.run_sync(call.invoke, attempt, abandon_on_cancel=True)
    if inspect.isawaitable(result):  # a sync wrapper around a coroutine function
        return await result
    return result


async def _claim(store: WorkflowStore, call: StepCall, owner: str, lease_ms: int) -> Lease:
    """Claim the step, waiting while another owner's lease on it is live.

    That owner may have died (its lease lapses at ``expires_at``), or may be
    alive and finish the step any moment: another process drives the run
    too, say, as after a resume of a run its driver had not given up. So the
    claim is tried again after a pause that grows to `_HELD_POLL_MAX`, never
    past the lapse: a step the other owner completes is seen within about
    that long (the claim raises `StepAlreadyCompletedError`), not after the
    whole lease, and a cancel of the run (`RunCancelledError`) as soon.
    """
    pause = _HELD_POLL_START
    expires_at, lapses_at = -1, 0.0  # the lease seen, and when it lapses by our clock
    while True:
        try:
            return await claimed_or_handed_back(
                store,
                store.claim_step(
                    call.run_id,
                    call.step_id,
                    name=call.name,
                    owner=owner,
                    lease_ms=lease_ms,
                    execution_id=call.execution_id,
                ),
                lambda lease: lease,
            )
        except LeaseHeldError as held:
            if held.expires_at != expires_at:  # the store's clock, read once per lease seen
                expires_at = held.expires_at
                lapses_at = anyio.current_time() + (expires_at - await store.time_ms()) / 1000
            await anyio.sleep(max(min(lapses_at - anyio.current_time(), pause), 0.01))
            pause = min(pause * 2, _HELD_POLL_MAX)


async def claimed_or_handed_back(
    store: WorkflowStore, claim: Awaitable[T], lease_of: Callable[[T], Lease | None]
) -> T:
    """Await ``claim`` through a cancel; if one came meanwhile, hand its lease back and stop.

    Over a network the claim may be made in the store while the caller is
    cancelled before the reply arrives: cut short there, the lease would be
    nobody's, the step left ``running`` until the lease lapsed, and a resume
    would wait that long for it. ``lease_of`` finds the lease in the reply.
    A store that does not answer is given up on after `_CLAIM_PATIENCE`
    (`StoreError`), so a cancel or a shutdown waits that long at most.
    """
    with anyio.CancelScope(shield=True, deadline=anyio.current_time() + _CLAIM_PATIENCE) as cut:
        reply = await claim
    if cut.cancelled_caught:
        await anyio.lowlevel.checkpoint_if_cancelled()  # a cancel that came meanwhile wins
        raise StoreError(f"the store did not answer a claim within {_CLAIM_PATIENCE:g} s")
    async with handed_back_if_interrupted(store, lease_of(reply)):
        await anyio.lowlevel.checkpoint_if_cancelled()
    return reply


@contextlib.asynccontextmanager
async def handed_back_if_interrupted(
    store: WorkflowStore, lease: Lease | None
) -> AsyncIterator[None]:
    """Hand ``lease`` back unrun if the block raises (a cancel, the store), then re-raise.

    Between a claim and the attempt run under it, so no step is left held
    by nobody until its lease lapses.
    """
    try:
        yield
    except BaseException:
        if lease is not None:
            with anyio.CancelScope(shield=True):
                await release(store, lease, ran=False)
        raise


async def _take_recorded_failure(
    store: WorkflowStore, call: StepCall, lease: Lease, lease_ms: int
) -> None:
    """Ask ``call.on_claimed`` about a fresh lease; raise the failure it finds recorded.

    A failure another driver recorded marks the step failed again under
    this lease (renewed if it lapsed meanwhile; the row's attempt and times
    are this claim's) and raises `StepFailedError`. Whatever else the
    question raises (a cancel, the store) hands the lease back first, as an
    interrupted attempt does, so no step is left held by nobody.
    """
    if call.on_claimed is None:
        return
    async with handed_back_if_interrupted(store, lease):
        error = await call.on_claimed(lease)
    if error is None:
        return
    with anyio.CancelScope(shield=True), contextlib.suppress(LeaseLost, RunCancelledError):
        # (Taken over or cancelled meanwhile: the row is not ours to mark.)
        await _record_failure(store, call, lease, error, True, lease_ms, recorded=True)
    raise StepFailedError(call.name, error)


async def execute_step(
    store: WorkflowStore,
    call: StepCall,
    *,
    owner: str,
    keeper: LeaseKeeper,
    slot: Slot | None = None,
    claimed: Hold | None = None,
    then_claim: StepClaim | None = None,
    then_finish: Callable[[Any], Any] | None = None,
) -> StepOutcome:
    """Run ``call`` until it succeeds or fails for good; record every attempt.

    Raises `StepFailedError` when it fails for good, `LeaseLost` when another
    owner took it over, `RunCancelledError` when the run was cancelled by
    another process (`RunCancelledElsewhere` when that stopped the step while
    it ran), and `StepAlreadyCompletedError` when it had already completed
    (the caller then reads the recorded output). ``keeper`` renews
    the leases (each taken for its ``lease_ms``); it runs in the caller's task group.

    Each attempt's number is its lease's (the store counts the step's claims,
    across resumes), so ``ctx.attempt`` tells a re-run from a first run. The
    retry budget is counted here, per driving of the step: a resume, say of
    a run that failed for good, gives the step its ``retries`` afresh, and a
    lease handed back unrun (claimed ahead, then cancelled) spends none of it.
    ``slot``, the caller's slot of the engine's concurrency, is given back
    while the step backs off before a retry, and taken again after.
    ``claimed`` is a lease on this step taken ahead (by the completion of the
    step before it); the first attempt runs under it. With ``then_claim``
    the completion also claims that step, in the same store call, and the
    outcome carries its lease (``next_hold``, kept by the keeper) for the
    caller to run next: a chain of steps costs one store call per step.
    With ``then_finish`` (for a run's last step; it maps the step's output to
    the run's) the completion also completes the run, and the outcome carries
    the run as completed (``finished``) unless the store left the run as it was.
    """
    hold = claimed
    tries = 0
    while True:
        if hold is None:
            lease = await _claim(store, call, owner, keeper.lease_ms)
            await _take_recorded_failure(store, call, lease, keeper.lease_ms)
            hold = keeper.hold(lease)
        attempt = hold.lease.attempt
        tries += 1
        # A lease claimed ahead can be refused while its step waits: then it never runs.
        ran = hold.refusal is None
        try:
            if ran:
                await keeper.attempt(call, attempt, hold)
            result = _result(call, hold)
        except RunCancelledElsewhere:
            with anyio.CancelScope(shield=True):
                await release(store, hold.lease, ran=ran)
            raise
        except LeaseLost:  # another owner claimed the step: it carries the step on
            raise
        except Exception as exc:
            await _failed_attempt(store, call, hold.lease, exc, tries, keeper, slot)
            hold = None
            continue
        except BaseException:
            # Cancelled (fail-fast, Engine.cancel, engine shutdown): hand the
            # step back at once, so a resume need not wait for the lease.
            with anyio.CancelScope(shield=True):
                await release(store, hold.lease)
            raise
        try:
            committed = await _commit(
                store,
                call,
                hold.lease,
                result,
                attempt,
                keeper.lease_ms,
                then_claim,
                then_finish,
            )
        except InvalidPayloadError as exc:
            # Not storable (a set, NaN, too large...): the store refused it before
            # writing anything, so the attempt failed like a step that raised.
            await _failed_attempt(store, call, hold.lease, exc, tries, keeper, slot)
            hold = None
            continue
        recorded, next_lease, finished = committed
        next_hold = keeper.hold(next_lease) if next_lease is not None else None
        return StepOutcome(output=result, event=recorded, next_hold=next_hold, finished=finished)


def _result(call: StepCall, hold: Hold) -> Any:
    """The attempt's result, or raise what ended it."""
    # A result that arrived anyway is kept: recording it finds out whether the step
    # was taken over meanwhile (then it is dropped) or just our lease ran out.
    if hold.refusal is not None and (hold.outcome is None or hold.outcome[1] is not None):
        if isinstance(hold.refusal, RunCancelledError):
            raise RunCancelledElsewhere(call.run_id) from hold.refusal
        raise LeaseLost(f"lost the lease on step {call.name!r} of run {call.run_id!r}")
    assert hold.outcome is not None, "an attempt cancelled by its keeper is lost or failed"
    result, error = hold.outcome
    if error is not None:
        raise error
    return result


async def _commit(
    store: WorkflowStore,
    call: StepCall,
    lease: Lease,
    result: Any,
    attempt: int,
    lease_ms: int,
    then_claim: StepClaim | None,
    then_finish: Callable[[Any], Any] | None,
) -> tuple[Event | None, Lease | None, RunRecord | None]:
    """Record the step completed, with ``then_claim`` or ``then_finish`` (see `execute_step`).

    Returns the event, the lease claimed and the run completed (each or None).
    `InvalidPayloadError` if the result is not storable.
    """
    patch = result if call.merge_mapping and isinstance(result, Mapping) else None
    event = NewEvent(kind=EventKind.STEP_COMPLETED, payload=call.completed_payload(result, attempt))
    while True:
        # The step has run: record it even if a cancel arrives meanwhile (renewing a
        # lapsed lease on the way), so a finished side effect is not done again.
        with anyio.CancelScope(shield=True):
            try:
                if then_claim is not None:
                    recorded, claimed = await store.complete_and_claim(
                        lease, then_claim, output=result, context_patch=patch, event=event
                    )
                    return recorded, claimed, None
                if then_finish is not None:
                    recorded, finished = await _complete_and_finish(
                        store, lease, result, patch, event, then_finish
                    )
                    return recorded, None, finished
                recorded = await store.complete_step(
                    lease, output=result, context_patch=patch, event=event
                )
                return recorded, None, None
            except StaleLeaseError as exc:
                # The result we have is recorded under the lease renewed, attempt
                # unchanged, rather than the step run again.
                lease = await _renew_lapsed(store, lease, lease_ms, exc)


async def _renew_lapsed(
    store: WorkflowStore, lease: Lease, lease_ms: int, refusal: StaleLeaseError
) -> Lease:
    """Renew a lease the store refused a write under, or raise `LeaseLost`.

    Our lease may only have run out (a stalled loop) with nobody claiming the
    step since: then renewing it succeeds and the write is made under it. When
    another owner claimed the step, or the run is gone, the step is not ours.
    When another process cancelled the run meanwhile, the lapsed lease cannot
    be renewed and the write is dropped (`RunCancelledElsewhere`): the step
    counts as stopped by the cancel, and a resume runs it again.
    """
    try:
        return await store.renew_lease(lease, lease_ms=lease_ms)
    except RunCancelledError as cancelled:
        raise RunCancelledElsewhere(lease.run_id) from cancelled
    except StepflowError:
        raise LeaseLost(str(refusal)) from refusal


async def _complete_and_finish(
    store: WorkflowStore,
    lease: Lease,
    result: Any,
    patch: Mapping[str, Any] | None,
    event: NewEvent,
    then_finish: Callable[[Any], Any],
) -> tuple[Event | None, RunRecord | None]:
    """Complete the step and its run; a payload the store refuses leaves the run to the caller.

    The run's output holds other steps' outputs too, so it can be refused
    (too large) where the step's own is not: the step is then completed
    alone, and finishing the run raises the refusal where it always has. A
    step output that is itself refused is refused again there, and the
    attempt fails.
    """
    completed = NewEvent(kind=EventKind.RUN_COMPLETED, payload=None)
    try:
        recorded, finished = await store.complete_and_finish(
            lease,
            output=result,
            context_patch=patch,
            event=event,
            run_output=then_finish(result),
            run_event=completed,
        )
    except InvalidPayloadError:
        recorded = await store.complete_step(lease, output=result, context_patch=patch, event=event)
        return recorded, None
    return recorded, finished


async def _failed_attempt(
    store: WorkflowStore,
    call: StepCall,
    lease: Lease,
    exc: Exception,
    tries: int,
    keeper: LeaseKeeper,
    slot: Slot | None,
) -> None:
    """Record a failed attempt; raise `StepFailedError` if final, else wait out the backoff.

    ``tries`` counts this driver's attempts, the retry budget's measure; the
    error records the step's attempt number as the step saw it.
    """
    error = describe_error(exc, step=call.name, attempt=lease.attempt)
    final = not call.policy.should_retry(exc, tries)
    with anyio.CancelScope(shield=True):  # a cancel must not leave the lease held
        await _record_failure(store, call, lease, error, final, keeper.lease_ms)
    if final:
        raise StepFailedError(call.name, error) from exc
    if slot is not None:
        slot.give_back()  # nothing runs during the backoff: others may
    # A step backing off holds no lease, so no refused renewal tells it of a
    # cancel: it looks at the run instead of sleeping out up to `max_delay`,
    # through the keeper's store, as its renewals go.
    if await sleep_watching_for_cancel(
        keeper.store, call.run_id, call.policy.delay(tries), keeper.lease_ms / 3000
    ):
        raise RunCancelledError(call.run_id)
    if slot is not None:
        await slot.take()


async def sleep_watching_for_cancel(
    store: WorkflowStore, run_id: str, seconds: float, period: float
) -> bool:
    """Sleep ``seconds``, looking at the run every ``period``; True once it is cancelled.

    ``period`` is how often a running step renews its lease, so waiting and
    running work hear of a cancel from another process as soon. A look the
    store fails (a dropped connection) is logged and skipped: the sleep goes
    on, as a lease renewal the store fails is only tried again.
    """
    deadline = anyio.current_time() + seconds
    while (left := deadline - anyio.current_time()) > 0:
        await anyio.sleep(min(left, period))
        if deadline - anyio.current_time() <= 0:
            return False
        try:
            record = await store.get_run(run_id)
        except StepflowError:
            raise
        except Exception as exc:
            _logger.warning("looking at run %r for a cancel failed (%r)", run_id, exc)
            continue
        if record is not None and record.status == RunStatus.CANCELLED:
            return True
    return False


async def _capture(call: StepCall, attempt: int) -> tuple[Any, Exception | None]:
    """The attempt's result or exception: a lost lease decides which of them counts."""
    try:
        if call.timeout is None:
            return await _call_user(call, attempt), None
        with anyio.move_on_after(call.timeout):
            return await _call_user(call, attempt), None
        return None, StepTimeoutError(call.name, call.timeout)  # the deadline cancelled it
    except Exception as exc:
        return None, exc
    except anyio.get_cancelled_exc_class() as exc:
        if _being_cancelled():
            raise
        error = StepCancelledError(call.name)
        error.__cause__ = exc  # its traceback says which await was cancelled
        return None, error


def _being_cancelled() -> bool:
    """Whether this task is being cancelled, rather than handed a CancelledError by its code.

    On asyncio a cancel scope (or a task.cancel) counts in ``cancelling()``
    until the cancel is taken back; a CancelledError from a future someone
    else cancelled does not. Other event loops deliver no such stray cancels.
    """
    try:
        task = asyncio.current_task()
    except RuntimeError:  # not asyncio
        return True
    return task is None or task.cancelling() > 0


async def _record_failure(
    store: WorkflowStore,
    call: StepCall,
    lease: Lease,
    error: dict[str, Any],
    final: bool,
    lease_ms: int,
    *,
    recorded: bool = False,
) -> None:
    """Record the failure under ``lease``, renewed first if it lapsed (see `_renew_lapsed`).

    Dropping a failure whose lease lapsed would leave the step held by nobody
    and its run ``running`` with nothing to drive it. A final failure appends
    its ``step_failed`` event unless it is ``recorded`` in the history already.
    """
    event = None
    if final and not recorded:
        event = NewEvent(kind=EventKind.STEP_FAILED, payload=call.failed_payload(error))
    while True:
        try:
            await store.fail_step(lease, error=error, final=final, event=event)
            return
        except StaleLeaseError as exc:
            lease = await _renew_lapsed(store, lease, lease_ms, exc)


async def release(store: WorkflowStore, lease: Lease, *, ran: bool = True) -> None:
    """Hand a lease back, so the step is free to claim at once.

    ``ran=False`` for a lease no attempt ran under: its claim is not counted,
    so the step's first run is attempt 1 however often it was claimed ahead
    and handed back.
    """
    error = {
        "type": "Interrupted",
        "message": "the attempt was interrupted" if ran else "handed back before it ran",
        "attempt": lease.attempt if ran else lease.attempt - 1,
    }
    with contextlib.suppress(StepflowError):  # lease already gone: nothing to hand back
        await store.fail_step(lease, error=error, final=False, ran=ran)
