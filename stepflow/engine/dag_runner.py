"""Drives one run of a DAG `Workflow` to its end against a store.

The runner reads what the store already holds (completed steps and their
outputs, the context bag), so starting and resuming are the same code: a
completed step is never run again, anything else runs once its
dependencies are done. Ready steps run concurrently in one task group.

When a step fails for good the runner cancels the steps still running
(recorded ``cancelled``), marks every step that had not started ``skipped``
and fails the run with the step's error. Nothing completed is lost: a later
``Engine.resume`` re-runs only what did not complete.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Literal

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

from stepflow.dag import StepSpec, Workflow
from stepflow.engine.attempts import (
    CANCELLED_ERROR,
    Hold,
    LeaseKeeper,
    LeaseLost,
    StepCall,
    describe_error,
    execute_step,
    release,
)
from stepflow.engine.context import StepContext
from stepflow.engine.slots import Slot
from stepflow.errors import (
    ConflictError,
    InvalidPayloadError,
    RunCancelledError,
    StepAlreadyCompletedError,
    StepFailedError,
)
from stepflow.models import (
    EventKind,
    Lease,
    NewEvent,
    RunRecord,
    RunStatus,
    StepClaim,
    StepState,
    StepStatus,
)
from stepflow.store.base import WorkflowStore

StopReason = Literal["cancel", "shutdown"]


class DagRunner:
    """Executes (or resumes) one run of ``flow``; use once."""

    def __init__(
        self,
        store: WorkflowStore,
        flow: Workflow,
        record: RunRecord,
        *,
        owner: str,
        lease_ms: int,
        limiter: anyio.CapacityLimiter,
        stop_reason: Callable[[], StopReason | None],
        fresh: bool = False,
        first_lease: Lease | None = None,
    ) -> None:
        self.store = store
        self.flow = flow
        self.record = record
        self.owner = owner
        self.lease_ms = lease_ms
        self.limiter = limiter
        self.stop_reason = stop_reason
        self.fresh = fresh
        """Created just now: no step rows to load."""
        self.first_lease = first_lease
        """A lease on the opening step claimed with the run's creation, until its task takes
        it (a fresh run's opening step is always among the steps it launches first)."""
        # Replaced, never mutated: a step's context is a read-only view of the bag
        # as it was, while the loop may merge another step's output meanwhile.
        self.bag: dict[str, Any] = dict(record.context)
        self._set_by: dict[str, int] = {}
        """Per key of the bag: the id of the completion event that last set it (see `_merge`)."""
        self.outputs: dict[str, Any] = {}
        """Output of every step done (completed, or skipped by its condition)."""
        self.started: set[str] = set()
        self.interrupted: set[str] = set()
        self._own_attempts: dict[str, int] = {}
        """Per step: the newest attempt this runner held its lease for (see `_record`)."""
        self.attempts: dict[str, int] = {}
        self.failure: StepFailedError | None = None
        self.crash: Exception | None = None
        """What stopped the runner itself (the store failed): raised as is from `execute`."""
        self.lost_lease = False
        self.finished: RunRecord | None = None
        """The run as completed by its last step's completion (see `_finish_with`)."""
        self.keeper = LeaseKeeper(store, lease_ms)
        self._waiting: dict[str, int] = {}
        """Per step not done when the run started: how many of its dependencies are not done."""
        self._in_flight = 0
        """Step tasks running; the keeper stops when none is left."""

    @property
    def run_id(self) -> str:
        return self.record.run_id

    @property
    def execution_id(self) -> int:
        return self.record.current_execution_id

    async def execute(self) -> RunRecord:
        if not self.fresh:
            await self._load_steps()
        if self.record.status != RunStatus.RUNNING:
            self.record = await self.store.set_run_status(
                self.run_id,
                RunStatus.RUNNING,
                execution_id=self.execution_id,
                event=NewEvent(kind=EventKind.RUN_STARTED, payload=self.record.input),
            )
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.keeper.run, name=f"stepflow lease keeper {self.run_id}")
                self._launch(tg, self._initially_ready())
                if not self._in_flight:
                    self.keeper.stop()
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                # A run its last step completed meanwhile stays completed.
                if self.stop_reason() == "cancel" and self.finished is None:
                    await self._finish_cancelled()
            raise
        if self.crash is not None:
            # Not wrapped in the task group's exception group: a caller catches the
            # store's error as it would from any store call. The run stays as stored.
            raise self.crash
        if self.finished is not None:
            return self.finished
        try:
            if self.failure is not None:
                return await self._finish_failed(self.failure)
            if self.lost_lease:
                # Another owner runs this run now, or it was cancelled: report the store's view.
                return await self._lost()
            return await self._complete()
        except RunCancelledError:
            return await self._reload()  # another process cancelled it: that stands

    async def _complete(self) -> RunRecord:
        """Complete the run with its output; an output the store refuses fails the run.

        Each step's output was stored, but the run's holds every sink's
        together and can be too large where each alone was not: the run
        then fails with that error (every step stays completed), rather
        than stay running with nothing left to run.
        """
        try:
            return await self.store.set_run_status(
                self.run_id,
                RunStatus.COMPLETED,
                execution_id=self.execution_id,
                output=self._run_output(self.outputs),
                event=NewEvent(kind=EventKind.RUN_COMPLETED, payload=None),
            )
        except InvalidPayloadError as exc:  # no traceback: it would only show the engine
            return await self._fail_run(describe_error(exc, traceback=False, phase="run output"))

    async def _fail_run(self, error: dict[str, Any]) -> RunRecord:
        return await self.store.set_run_status(
            self.run_id,
            RunStatus.FAILED,
            execution_id=self.execution_id,
            error=error,
            event=NewEvent(kind=EventKind.RUN_FAILED, payload=error),
        )

    async def _load_steps(self) -> None:
        for step in await self.store.list_steps(self.run_id):
            if step.step_id not in self.flow.steps:
                continue
            self.attempts[step.step_id] = step.attempt
            skipped_by_condition = step.status == StepStatus.SKIPPED and step.error is None
            if step.status == StepStatus.COMPLETED or skipped_by_condition:
                self.outputs[step.step_id] = step.output

    async def _lost(self) -> RunRecord:
        """The run as stored, once another owner took a step over or another process cancelled it.

        After a cancel, the steps not done are marked ``cancelled``, those this
        runner stopped and those it had not started, as a cancel by this engine
        marks them (but not one another process runs already, see `_record`);
        a takeover leaves every row to the new owner.
        """
        record = await self._reload()
        if record.status != RunStatus.CANCELLED:
            return record
        for name in self.flow.step_names:
            if name not in self.outputs:
                await self._record(name, StepStatus.CANCELLED, error=CANCELLED_ERROR)
        return record

    async def _reload(self) -> RunRecord:
        record = await self.store.get_run(self.run_id)
        return record if record is not None else self.record

    def _initially_ready(self) -> list[str]:
        """Count each step's unfinished dependencies; return the steps free to start."""
        ready = []
        for name, spec in self.flow.steps.items():
            if name in self.outputs:
                continue
            self._waiting[name] = sum(dep not in self.outputs for dep in spec.after)
            if not self._waiting[name]:
                ready.append(name)
        return ready

    def _launch(self, tg: TaskGroup, names: list[str]) -> None:
        for name in names:
            self.started.add(name)
            self._in_flight += 1
            claimed = None
            if self.first_lease is not None and self.first_lease.step_id == name:
                claimed, self.first_lease = self.keeper.hold(self.first_lease), None
            tg.start_soon(self._run_step, tg, name, claimed, name=f"stepflow step {name}")

    def _context(self, name: str, attempt: int) -> StepContext:
        return StepContext.for_attempt(
            run_id=self.run_id,
            step_id=name,
            attempt=attempt,
            input=self.record.input,
            context=MappingProxyType(self.bag),
            execution_id=self.execution_id,
        )

    async def _run_step(self, tg: TaskGroup, name: str, claimed: Hold | None) -> None:
        """Run ``name``, then in this same task the first of the steps it unblocked, and so on.

        A chain of steps so costs one task, not one per step; the other
        unblocked steps get tasks of their own. The step run next in this
        task is claimed by the completion of the one before it, in the same
        store call. The task's `Slot` of the engine's concurrency is taken
        for each step's run and given back after it.
        """
        slot = Slot(self.limiter)
        try:
            ready, claimed = await self._step(tg, name, claimed, slot)
            while ready:
                self._launch(tg, ready[1:])
                self.started.add(ready[0])
                ready, claimed = await self._step(tg, ready[0], claimed, slot)
        except Exception as exc:  # the store failed (a step's own errors are recorded)
            self.crash = self.crash or exc
            tg.cancel_scope.cancel()
        finally:
            self._in_flight -= 1
            if not self._in_flight:  # nothing can start any more: no lease to keep
                self.keeper.stop()

    async def _hand_back(self, claimed: Hold | None) -> None:
        """Release a lease claimed ahead for a step that will not run now."""
        if claimed is not None:
            self.keeper.drop(claimed)
            with anyio.CancelScope(shield=True):
                await release(self.store, claimed.lease, ran=False)

    async def _step(
        self, tg: TaskGroup, name: str, claimed: Hold | None, slot: Slot
    ) -> tuple[list[str], Hold | None]:
        """Run one step (under ``claimed``, a lease taken ahead, if given).

        Returns the steps its completion unblocked, the one to run next in
        this task first, with the lease claimed for that one, if any.
        """
        spec = self.flow.steps[name]
        next_hold: Hold | None = None
        recorded_as: int | None = None
        if claimed is not None:
            self._own_attempts[name] = claimed.lease.attempt
        try:
            if spec.when is not None:  # never claimed ahead (see _claim_ahead)
                first_attempt = self.attempts.get(name, 0) + 1
                try:
                    wanted = spec.when(self._context(name, first_attempt))
                except Exception as exc:  # the step fails, not the whole runner
                    error = describe_error(exc, step=name, attempt=first_attempt, phase="when")
                    await self._record(name, StepStatus.FAILED, error=error)
                    self.failure = self.failure or StepFailedError(name, error)
                    tg.cancel_scope.cancel()
                    return [], None
                if not wanted:
                    await self._record(name, StepStatus.SKIPPED, error=None)
                    ready = self._finished(name, None)
                    # No step call recorded it, so nothing has yielded: a chain of
                    # skipped steps in this task must not hold the loop (done first,
                    # a cancel here finds the step skipped, not interrupted).
                    await anyio.lowlevel.checkpoint()
                    return ready, None
            try:
                await slot.take()
            except BaseException:
                self.started.discard(name)  # never ran: recorded as a step not started
                await self._hand_back(claimed)
                raise
            then_claim = self._claim_ahead(name)
            try:
                outcome = await execute_step(
                    self.store,
                    self._call(spec),
                    owner=self.owner,
                    keeper=self.keeper,
                    slot=slot,
                    claimed=claimed,
                    then_claim=then_claim,
                    then_finish=None if then_claim is not None else self._finish_with(name),
                )
            finally:
                slot.give_back()
            output, next_hold = outcome.output, outcome.next_hold
            recorded_as = outcome.event.event_id if outcome.event is not None else None
            self.finished = self.finished or outcome.finished
        except StepAlreadyCompletedError:
            step = await self.store.get_step(self.run_id, name)
            output = step.output if step is not None else None  # merged by _finished
            recorded_as = await self._completion_event_id(name)
        except StepFailedError as failure:
            self.failure = self.failure or failure
            tg.cancel_scope.cancel()
            return [], None
        except LeaseLost:  # taken over by another owner: it carries the step on
            self.lost_lease = True
            tg.cancel_scope.cancel()
            return [], None
        except RunCancelledError:  # by another process
            # Stopped at a lease renewal or in its backoff, or never begun: marked
            # cancelled however the run ends here (`_lost`, or a failure beside it).
            self.interrupted.add(name)
            self.lost_lease = True
            tg.cancel_scope.cancel()
            return [], None
        except BaseException:
            if name in self.started:
                self.interrupted.add(name)
            raise
        ready = self._finished(name, output, recorded_as)
        if next_hold is not None:
            following = next_hold.lease.step_id
            ready.remove(following)  # ready now: this step was all it waited for
            ready.insert(0, following)
        return ready, next_hold

    def _claim_ahead(self, name: str) -> StepClaim | None:
        """The step to claim with ``name``'s completion: the first it alone still holds back.

        Not a step with a ``when`` condition (it may be skipped), and only
        while the run goes on normally.
        """
        if not self._going_on():
            return None
        for dependent in self.flow.dependents(name):
            if (
                self._waiting.get(dependent) == 1
                and dependent not in self.started
                and self.flow.steps[dependent].when is None
            ):
                return StepClaim(step_id=dependent, name=dependent, lease_ms=self.lease_ms)
        return None

    def _finish_with(self, name: str) -> Callable[[Any], Any] | None:
        """For the run's last step: its output -> the run's, so its completion completes the run.

        The last step is the one every other step is done before; only while
        the run goes on normally (else the run ends another way).
        """
        if not self._going_on() or len(self.outputs) != len(self.flow.steps) - 1:
            return None
        return lambda output: self._run_output({**self.outputs, name: output})

    def _going_on(self) -> bool:
        """No step failed for good, no lease was lost, and the engine has not stopped the run."""
        return self.failure is None and not self.lost_lease and self.stop_reason() is None

    def _run_output(self, outputs: Mapping[str, Any]) -> dict[str, Any]:
        """The run's output: each sink step's (a step nothing depends on)."""
        return {
            name: outputs.get(name) for name in self.flow.steps if not self.flow.dependents(name)
        }

    def _call(self, spec: StepSpec) -> StepCall:
        def invoke(attempt: int) -> Any:
            self._own_attempts[spec.name] = attempt  # (a sync step's thread: one dict store)
            return spec.fn(self._context(spec.name, attempt))

        return StepCall(
            run_id=self.run_id,
            step_id=spec.name,
            name=spec.name,
            execution_id=self.execution_id,
            invoke=invoke,
            policy=spec.retry,
            timeout=spec.timeout,
            is_async=spec.is_async,
        )

    def _finished(self, name: str, output: Any, recorded_as: int | None = None) -> list[str]:
        """Take in a step's output; return its dependents that have nothing left to wait for.

        ``recorded_as`` is the id of the step's completion event, if known.
        """
        self.outputs[name] = output
        if isinstance(output, Mapping):
            self._merge(output, recorded_as)
        ready = []
        for dependent in self.flow.dependents(name):
            if dependent in self._waiting:
                self._waiting[dependent] -= 1
                if not self._waiting[dependent] and dependent not in self.started:
                    ready.append(dependent)
        return ready

    async def _completion_event_id(self, name: str) -> int | None:
        """The id of step ``name``'s completion event, which another driver recorded."""
        for event in reversed(await self.store.read_history(self.run_id, self.execution_id)):
            payload = event.payload if isinstance(event.payload, dict) else {}
            if event.kind == EventKind.STEP_COMPLETED and payload.get("step") == name:
                return event.event_id
        return None

    def _merge(self, patch: Mapping[str, Any], recorded_as: int | None) -> None:
        """Merge a completed step's output into the bag as the store merged it: in commit order.

        Steps running side by side commit in some order, and each commit
        merges its output into the stored bag. Their replies can come back
        in another order (over separate connections), so a key two of them
        set is taken from the one committed last, by its completion event's
        id, which the store hands out in commit order: the steps after them
        see the bag as stored, as a resume would. An output whose event is
        not found (its history pruned) is taken as the newest.
        """
        newest = recorded_as if recorded_as is not None else max(self._set_by.values(), default=0)
        kept = {key: value for key, value in patch.items() if self._set_by.get(key, 0) <= newest}
        self.bag = {**self.bag, **kept}
        self._set_by.update(dict.fromkeys(kept, newest))

    async def _record(self, name: str, status: StepStatus, *, error: Any) -> None:
        """Write a step row that no attempt wrote: skipped, or cancelled after release.

        A row running under an attempt claimed since this runner started, and
        not by it, is another owner's (a resume by another process after a
        cancel, a takeover): it is left to that owner. One running under the
        attempt the runner found at its start is a driver's that is gone.
        """
        current = await self.store.get_step(self.run_id, name)
        if (
            current is not None
            and current.status == StepStatus.RUNNING
            and current.attempt not in (self._own_attempts.get(name), self.attempts.get(name))
        ):
            return
        base = current or StepState(step_id=name, name=name, execution_id=self.execution_id)
        await self.store.upsert_step(
            self.run_id,
            base.model_copy(update={"status": status, "error": error}),
            keep_completed=True,  # completed after all (another owner, a late commit): keep it
        )

    async def _mark_unfinished(
        self, *, interrupted: StepStatus, unstarted: StepStatus, reason: dict[str, Any]
    ) -> None:
        for name in self.flow.step_names:
            if name in self.outputs:
                continue
            if name in self.interrupted:
                await self._record(name, interrupted, error=reason)
            elif name not in self.started:
                await self._record(name, unstarted, error=reason)

    async def _finish_failed(self, failure: StepFailedError) -> RunRecord:
        reason = {"type": "Skipped", "message": f"step {failure.name!r} failed"}
        await self._mark_unfinished(
            interrupted=StepStatus.CANCELLED, unstarted=StepStatus.SKIPPED, reason=reason
        )
        return await self._fail_run(failure.error)

    async def _finish_cancelled(self) -> None:
        await self._mark_unfinished(
            interrupted=StepStatus.CANCELLED, unstarted=StepStatus.CANCELLED, reason=CANCELLED_ERROR
        )
        # Refused when another driver finished the run (or continued it) meanwhile: that stands.
        with contextlib.suppress(ConflictError):
            await self.store.set_run_status(
                self.run_id,
                RunStatus.CANCELLED,
                execution_id=self.execution_id,
                error=CANCELLED_ERROR,
                event=NewEvent(kind=EventKind.RUN_CANCELLED, payload=None),
            )
