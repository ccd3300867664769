"""`WorkflowContext`: the only door from a durable workflow to the outside world.

Every method records what happened in the execution's history before it
returns, and on replay returns the recorded result instead of doing it
again. So a workflow resumed after a crash, or after waiting days for an
event, re-runs its code but none of its side effects.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import random
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Concatenate, NoReturn, ParamSpec, TypeVar, cast

import anyio

from stepflow.dag import is_async_callable, step_options
from stepflow.engine.attempts import LeaseLost, StepCall, execute_step
from stepflow.engine.runners import is_definition
from stepflow.engine.slots import Slot
from stepflow.errors import (
    ChildRunFailedError,
    EventTimeoutError,
    InvalidArgumentError,
    RunCancelledError,
    StepAlreadyCompletedError,
    StepFailedError,
    StoreError,
)
from stepflow.models import (
    Event,
    EventKind,
    Lease,
    PruneOptions,
    PruneResult,
    RunStatus,
    optional_record,
)
from stepflow.retry import RetryPolicy

if TYPE_CHECKING:
    from stepflow.durable.definition import DurableWorkflow
    from stepflow.durable.runner import DurableRunner

logger = logging.getLogger("stepflow.durable")

_EVENT_POLL_MAX = 1.0
_EVENT_WAIT_ENDS = (EventKind.EVENT_RECEIVED, EventKind.TIMER_FIRED)
"""How a wait for an event ends: the event taken, or its timeout's timer fired."""


def _seconds(what: str, value: object) -> float:
    """A duration in seconds: a finite number from 0, or `InvalidArgumentError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentError(f"{what} must be a number of seconds, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise InvalidArgumentError(f"{what} must be a finite number >= 0, got {value!r}")
    return float(value)


def _event_wait_result(end: Event, name: str, timeout: float | None) -> Any:
    """The event's payload for a wait that ended ``end``, or `EventTimeoutError`."""
    if end.kind == EventKind.EVENT_RECEIVED:
        return end.payload.get("payload")
    raise EventTimeoutError(name, float(timeout or 0))


def _deadline(created: Event) -> int:
    """When the timer ``created`` recorded fires (store-clock ms), never before its full time.

    The recorded timestamp is the creation time rounded down to a whole
    millisecond, so the deadline adds one millisecond and rounds the duration up.
    """
    seconds = float(created.payload["seconds"])
    return created.timestamp + math.ceil(round(seconds * 1000, 6)) + 1


class ContinueAsNew(BaseException):
    """Raised by ``ctx.continue_as_new``; a BaseException so ``except Exception`` can't eat it."""

    def __init__(self, input: Any, prune: PruneOptions | None) -> None:
        super().__init__("continue as new")
        self.input = input
        self.prune = prune


_P = ParamSpec("_P")
_R = TypeVar("_R")


_ONE_AT_A_TIME = (
    "a durable workflow awaits its ctx calls one at a time (run work in parallel inside "
    "one ctx.step, or in child runs started one by one)"
)


def _command(
    method: Callable[Concatenate[WorkflowContext, _P], Awaitable[_R]],
) -> Callable[Concatenate[WorkflowContext, _P], Awaitable[_R]]:
    """A ctx command: refused while another is in flight (``asyncio.gather`` of steps, say).

    A command's place in the history is the order it is called in, and on
    replay a recorded command returns without waiting, so commands running
    side by side would be numbered otherwise on a replay and take one
    another's results. Refused at once, on the first run, rather than found
    out (or not) after a restart.
    """

    @functools.wraps(method)
    async def one_at_a_time(self: WorkflowContext, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        if self._command_running is not None:
            running, scope = self._command_running
            scope.cancel()  # the other stops too: neither is recorded past the run's end
            raise InvalidArgumentError(
                f"ctx.{method.__name__} was called while ctx.{running} had not returned: "
                f"{_ONE_AT_A_TIME}"
            )
        scope = anyio.CancelScope()
        self._command_running = (method.__name__, scope)
        try:
            with scope:
                return await method(self, *args, **kwargs)
            raise InvalidArgumentError(
                f"ctx.{method.__name__} was stopped: another ctx call was made before it "
                f"returned. {_ONE_AT_A_TIME}"
            )
        finally:
            self._command_running = None

    return one_at_a_time


class WorkflowContext:
    """Passed to a durable workflow as ``ctx``; see the module docstring."""

    def __init__(self, runner: DurableRunner) -> None:
        self._runner = runner
        self._command_running: tuple[str, anyio.CancelScope] | None = None
        """The ctx command in flight, if any, and its scope (see `_command`)."""
        self._replay = runner.replay
        seed = hashlib.sha256(f"{runner.run_id}/{runner.execution_id}".encode()).digest()
        self._random = random.Random(seed)
        self.logger = logging.LoggerAdapter(logger, {"run_id": runner.run_id})

    @property
    def run_id(self) -> str:
        return self._runner.run_id

    @property
    def execution_id(self) -> int:
        return self._runner.execution_id

    # -- deterministic values -----------------------------------------------------

    def now(self) -> int:
        """Milliseconds since the epoch, as of the last recorded command: same on replay."""
        return self._replay.clock

    def random(self) -> random.Random:
        """A random generator seeded by the run and execution: same values on replay."""
        return self._random

    def uuid(self) -> str:
        """A UUID (hex) from `random`: the same sequence of ids on every replay."""
        return uuid.UUID(int=self._random.getrandbits(128), version=4).hex

    # -- commands ---------------------------------------------------------------------

    @_command
    async def step(
        self,
        fn: Callable[..., Any],
        *args: Any,
        name: str | None = None,
        retries: int = 0,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Run ``fn(*args)`` once (sync functions in a thread) and record its result.

        On replay the recorded result is returned and ``fn`` is not called. A
        step that fails for good raises `StepFailedError` here, on replay too.
        Once another process cancelled the run, `RunCancelledError` (a step
        in flight is stopped at its next lease renewal first).
        """
        if not callable(fn):
            raise InvalidArgumentError(f"ctx.step takes a function to call, got {fn!r}")
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise InvalidArgumentError(f"ctx.step name must be a non-empty string, got {name!r}")
        policy, timeout = step_options(retries, retry, timeout)
        step_name: str = name or getattr(fn, "__name__", None) or "step"
        seq, recorded = self._replay.next_command("step", step_name)
        if EventKind.STEP_COMPLETED in recorded:
            return recorded[EventKind.STEP_COMPLETED].payload.get("output")
        if EventKind.STEP_FAILED in recorded:
            raise StepFailedError(step_name, recorded[EventKind.STEP_FAILED].payload["error"])
        runner = self._runner

        async def recorded_failure(lease: Lease) -> dict[str, Any] | None:
            """The error if another driver of the run failed this step for good: that stands.

            The workflow goes on as a replay would. Only a step claimed
            before can have failed (its first claim has attempt 1).
            """
            if lease.attempt < 2:
                return None
            await runner.refresh()
            failed = self._replay.check(seq, "step", step_name).get(EventKind.STEP_FAILED)
            return None if failed is None else cast(dict[str, Any], failed.payload["error"])

        call = StepCall(
            run_id=runner.run_id,
            step_id=f"x{runner.execution_id}-{seq}",
            name=step_name,
            execution_id=runner.execution_id,
            invoke=lambda _attempt: fn(*args),
            policy=policy,
            timeout=timeout,
            is_async=is_async_callable(fn),
            merge_mapping=False,
            history_tags=self._replay.tags(seq, "step", step_name),
            record_output=True,
            on_claimed=recorded_failure,
        )
        while True:
            try:
                # A slot of the engine's max_concurrency, as a DAG step holds one.
                slot = Slot(runner.services.limiter)
                await slot.take()
                try:
                    outcome = await execute_step(
                        runner.store, call, owner=runner.owner, keeper=runner.keeper, slot=slot
                    )
                finally:
                    slot.give_back()
            except LeaseLost:
                continue  # another driver took the step over: await its result or lapse
            except StoreError as exc:  # a store that stopped answering a claim, say
                runner.note_store_failure(exc)  # left as stored, not failed by it
                raise
            except RunCancelledError:  # stopped in flight or in its backoff, or not begun
                runner.note_cancelled_elsewhere()
                raise
            except StepAlreadyCompletedError:
                # Another driver of this run (a second resume) completed it: its result counts.
                await runner.refresh()
                completed = self._replay.check(seq, "step", step_name).get(EventKind.STEP_COMPLETED)
                if completed is None:  # completion and its event are one atomic write
                    raise
                self._replay.passed(seq)
                return completed.payload.get("output")
            except StepFailedError:  # raised from what the step raised, for the workflow
                await runner.refresh()  # take in the recorded failure (rare path)
                self._replay.passed(seq)  # ctx.now() as a replay will see it
                raise
            runner.note_recorded(outcome.event)
            return outcome.output

    @_command
    async def sleep(self, seconds: float) -> None:
        """A durable timer: the wake-up time is recorded, so restarts don't reset it."""
        seconds = _seconds("ctx.sleep seconds", seconds)
        seq, recorded = self._replay.next_command("sleep", "sleep")
        if EventKind.TIMER_FIRED in recorded:
            return
        created = recorded.get(EventKind.TIMER_CREATED)
        if created is None:
            created = await self._runner.append(
                EventKind.TIMER_CREATED,
                {**self._replay.tags(seq, "sleep", "sleep"), "seconds": seconds},
            )
        await self._runner.sleep_until(_deadline(created))
        await self._runner.append(EventKind.TIMER_FIRED, self._replay.tags(seq, "sleep", "sleep"))

    @_command
    async def wait_for_event(self, name: str, timeout: float | None = None) -> Any:
        """Wait for ``Engine.raise_event(run_id, name, payload)`` and return its payload.

        Events raised before the wait are kept and delivered in order, one per
        wait. With ``timeout`` (seconds, measured from the first time this
        wait ran, so restarts don't extend it) raises `EventTimeoutError`; an
        event raised after the deadline (by the store's clock) does not count
        for this wait, even if no process ran it at the deadline.
        """
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"event name must be a non-empty str, got {name!r}")
        if timeout is not None:
            timeout = _seconds("ctx.wait_for_event timeout", timeout)
        seq, recorded = self._replay.next_command("event", name)
        tags = self._replay.tags(seq, "event", name)
        outcome = self._replay.ended(seq, "event", name, _EVENT_WAIT_ENDS)
        if outcome is not None:
            return _event_wait_result(outcome, name, timeout)
        deadline: int | None = None
        if timeout is not None:
            created = recorded.get(EventKind.TIMER_CREATED)
            if created is None:
                created = await self._runner.append(
                    EventKind.TIMER_CREATED, {**tags, "seconds": timeout}
                )
            deadline = _deadline(created)
        delay = 0.02
        while True:
            # Another process driving the run may have recorded this wait's end.
            outcome = self._replay.ended(seq, "event", name, _EVENT_WAIT_ENDS)
            if outcome is not None:
                self._replay.passed(seq)  # ctx.now() as the other driver's and a replay's
                return _event_wait_result(outcome, name, timeout)
            raised = self._replay.pending_event(name)
            if raised is not None and deadline is not None and raised.timestamp >= deadline:
                # Raised after the deadline (while no process ran the wait, say): the
                # wait timed out first, as it would have with a process there; the
                # event stays for a later wait.
                raised = None
            if raised is not None:
                received = await self._runner.try_append(
                    EventKind.EVENT_RECEIVED,
                    {
                        **tags,
                        "raised_id": raised.event_id,
                        "payload": raised.payload.get("payload"),
                    },
                    settled_by=_EVENT_WAIT_ENDS,
                )
                if received is None:  # news read: another wait may have taken the event
                    continue
                return _event_wait_result(received, name, timeout)
            wait = delay
            if deadline is not None:  # the store's clock decides, read only when it matters
                now = await self._runner.store.time_ms()
                if now >= deadline:
                    fired = await self._runner.append(
                        EventKind.TIMER_FIRED,
                        {**tags, "timed_out": True},
                        settled_by=_EVENT_WAIT_ENDS,
                    )
                    return _event_wait_result(fired, name, timeout)
                wait = min(delay, (deadline - now) / 1000)
            await self._runner.wait_for_news(wait)
            await self._runner.refresh()
            delay = min(delay * 2, _EVENT_POLL_MAX)

    @_command
    async def child(self, workflow: DurableWorkflow, input: Any = None) -> Any:
        """Run ``workflow`` as a sub-run of this one and return its output.

        The child has its own run id (derived from this run and the call's
        position, so a replay finds the same child) and records this run as
        its parent. Its failure raises `ChildRunFailedError` here.
        """
        if not is_definition(workflow):
            raise InvalidArgumentError(f"ctx.child takes a workflow definition, got {workflow!r}")
        seq, recorded = self._replay.next_command("child", workflow.name)
        tags = self._replay.tags(seq, "child", workflow.name)
        if EventKind.CHILD_COMPLETED in recorded:
            return recorded[EventKind.CHILD_COMPLETED].payload.get("output")
        started = recorded.get(EventKind.CHILD_STARTED)
        if EventKind.CHILD_FAILED in recorded and started is not None:
            error = recorded[EventKind.CHILD_FAILED].payload.get("error")
            raise ChildRunFailedError(started.payload["child_run_id"], error)
        runner = self._runner
        child_id = started.payload["child_run_id"] if started else runner.child_run_id(seq)
        if started is None:
            runner.services.runnable(workflow)  # before anything is stored
            await runner.create_child(workflow, child_id, input)
            await runner.append(EventKind.CHILD_STARTED, {**tags, "child_run_id": child_id})
        record = await runner.drive_child(child_id)
        if record.status == RunStatus.COMPLETED:
            ended = await runner.append(
                EventKind.CHILD_COMPLETED,
                {**tags, "output": record.output},
                settled_by=(EventKind.CHILD_FAILED,),
            )
        else:
            error = record.error or {"type": "Cancelled", "message": f"child run {record.status}"}
            ended = await runner.append(
                EventKind.CHILD_FAILED,
                {**tags, "error": error},
                settled_by=(EventKind.CHILD_COMPLETED,),
            )
        # As recorded: another driver of this run may have recorded the child's end first.
        if ended.kind == EventKind.CHILD_COMPLETED:
            return ended.payload.get("output")
        raise ChildRunFailedError(child_id, ended.payload.get("error"))

    @_command
    async def prune_history(self, options: PruneOptions | None = None) -> PruneResult:
        """Delete this run's old finished executions now; recorded, so a replay doesn't redo it.

        A prune that fails is recorded and logged; it never fails the run.
        Options that are not `PruneOptions` (None: keep only the current
        execution) raise `InvalidArgumentError`, as a bad argument does.
        """
        options = optional_record(options, PruneOptions, "ctx.prune_history options")
        seq, recorded = self._replay.next_command("prune", "prune_history")
        done = recorded.get(EventKind.HISTORY_PRUNED)
        if done is None:
            result = await self._runner.prune(options or PruneOptions())
            payload: dict[str, Any] = {**self._replay.tags(seq, "prune", "prune_history")}
            if isinstance(result, PruneResult):
                payload["result"] = result.model_dump()
            else:
                payload["error"] = result
            # As recorded: another driver of this run may have pruned and recorded first.
            done = await self._runner.append(EventKind.HISTORY_PRUNED, payload)
        return PruneResult.model_validate(done.payload.get("result") or {})

    def continue_as_new(self, input: Any, *, prune: PruneOptions | None = None) -> NoReturn:
        """End this execution and start the next with ``input`` and a fresh history.

        ``prune`` (else the workflow's ``auto_prune``, else the engine's
        default) deletes old executions atomically with the continue.
        """
        raise ContinueAsNew(input, optional_record(prune, PruneOptions, "continue_as_new prune"))
