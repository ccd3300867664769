"""Running one step under a lease: claim, call, heartbeat, record, retry.

Both the DAG runner and durable workflows' ``ctx.step`` go through
`execute_step`, so a step behaves the same wherever it is written: it is
claimed under a lease before it runs, the lease is renewed while it runs,
and its result is recorded with one atomic store call that the store
refuses if the lease was lost meanwhile. A refused completion means another
owner took the step over; this process then drops its result.
"""

from __future__ import annotations

import contextlib
import inspect
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio

from stepflow.errors import (
    LeaseHeldError,
    StaleLeaseError,
    StepflowError,
    StepTimeoutError,
)
from stepflow.models import EventKind, Lease, NewEvent
from stepflow.retry import RetryPolicy
from stepflow.store.base import WorkflowStore

_TRACEBACK_LIMIT = 4000


def describe_error(exc: BaseException, **extra: Any) -> dict[str, Any]:
    """A JSON record of an exception: what operators see in ``RunRecord.error``."""
    trace = "".join(traceback.format_exception(exc))
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": trace[-_TRACEBACK_LIMIT:],
        **extra,
    }


class StepFailed(StepflowError):
    """A step failed for good (retries exhausted or a never-retry error)."""

    def __init__(self, name: str, error: dict[str, Any], cause: BaseException | None) -> None:
        self.name = name
        self.error = error
        self.cause = cause
        super().__init__(f"step {name!r} failed: {error.get('type')}: {error.get('message')}")


class LeaseLost(StepflowError):
    """This process no longer owns the step; another owner carries it on."""


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


@dataclass(frozen=True, slots=True)
class StepOutcome:
    output: Any
    attempt: int


class _Heartbeat:
    """Renews a lease while a step runs; cancels the step if the lease is lost."""

    def __init__(self, store: WorkflowStore, lease: Lease, lease_ms: int) -> None:
        self.store = store
        self.lease = lease
        self.lease_ms = lease_ms
        self.lost = False

    async def run(self, scope: anyio.CancelScope) -> None:
        while True:
            await anyio.sleep(self.lease_ms / 3000)
            try:
                self.lease = await self.store.renew_lease(self.lease, lease_ms=self.lease_ms)
            except StepflowError:
                self.lost = True
                scope.cancel()
                return


async def _call_user(call: StepCall, attempt: int) -> Any:
    if call.is_async:
        return await call.invoke(attempt)
    result = await anyio.to_thread.run_sync(call.invoke, attempt, abandon_on_cancel=True)
    if inspect.isawaitable(result):  # a sync wrapper around a coroutine function
        return await result
    return result


async def _claim(store: WorkflowStore, call: StepCall, owner: str, lease_ms: int) -> Lease:
    """Claim the step, waiting out a live lease left by an owner that died."""
    while True:
        try:
            return await store.claim_step(
                call.run_id,
                call.step_id,
                name=call.name,
                owner=owner,
                lease_ms=lease_ms,
                execution_id=call.execution_id,
            )
        except LeaseHeldError as held:
            wait_ms = held.expires_at - await store.time_ms()
            await anyio.sleep(max(wait_ms, 10) / 1000)


async def execute_step(
    store: WorkflowStore,
    call: StepCall,
    *,
    owner: str,
    lease_ms: int,
    first_attempt: int,
) -> StepOutcome:
    """Run ``call`` until it succeeds or fails for good; record every attempt.

    Raises `StepFailed` when it fails for good, `LeaseLost` when another
    owner took it over, and `StepAlreadyCompletedError` when it had already
    completed (the caller then reads the recorded output).
    """
    attempt = first_attempt
    while True:
        lease = await _claim(store, call, owner, lease_ms)
        heartbeat = _Heartbeat(store, lease, lease_ms)
        try:
            result = await _attempt(call, attempt, heartbeat)
        except LeaseLost:
            raise
        except Exception as exc:
            error = describe_error(exc, step=call.name, attempt=attempt)
            final = not call.policy.should_retry(exc, attempt)
            await _record_failure(store, heartbeat.lease, error, final)
            if final:
                raise StepFailed(call.name, error, exc) from exc
            await anyio.sleep(call.policy.delay(attempt))
            attempt += 1
            continue
        except BaseException:
            # Cancelled (fail-fast, Engine.cancel, engine shutdown): hand the
            # step back at once, so a resume need not wait for the lease.
            with anyio.CancelScope(shield=True):
                await _release(store, heartbeat.lease, attempt)
            raise
        patch = result if call.merge_mapping and isinstance(result, Mapping) else None
        try:
            await store.complete_step(
                heartbeat.lease,
                output=result,
                context_patch=patch,
                event=NewEvent(
                    kind=EventKind.STEP_COMPLETED, payload={"step": call.name, "attempt": attempt}
                ),
            )
        except StaleLeaseError as exc:
            raise LeaseLost(str(exc)) from exc
        return StepOutcome(output=result, attempt=attempt)


async def _attempt(call: StepCall, attempt: int, heartbeat: _Heartbeat) -> Any:
    outcome: list[Any] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(heartbeat.run, tg.cancel_scope)
        outcome.append(await _capture(call, attempt))
        tg.cancel_scope.cancel()
    if heartbeat.lost:
        raise LeaseLost(f"lost the lease on step {call.name!r} of run {call.run_id!r}")
    result, error = outcome[0]
    if error is not None:
        raise error
    return result


async def _capture(call: StepCall, attempt: int) -> tuple[Any, Exception | None]:
    """The attempt's result or exception, so the heartbeat's task group never wraps it."""
    try:
        if call.timeout is None:
            return await _call_user(call, attempt), None
        with anyio.move_on_after(call.timeout):
            return await _call_user(call, attempt), None
        return None, StepTimeoutError(call.name, call.timeout)  # the deadline cancelled it
    except Exception as exc:
        return None, exc


async def _record_failure(
    store: WorkflowStore, lease: Lease, error: dict[str, Any], final: bool
) -> None:
    try:
        await store.fail_step(
            lease,
            error=error,
            final=final,
            event=NewEvent(kind=EventKind.STEP_FAILED, payload=error) if final else None,
        )
    except StaleLeaseError as exc:
        raise LeaseLost(str(exc)) from exc


async def _release(store: WorkflowStore, lease: Lease, attempt: int) -> None:
    error = {"type": "Interrupted", "message": "the attempt was interrupted", "attempt": attempt}
    with contextlib.suppress(StepflowError):  # lease already gone: nothing to hand back
        await store.fail_step(lease, error=error, final=False)
