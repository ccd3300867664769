"""In-process regressions of durable runs, found by the SIGKILL tests, on every store.

Each stands for a crash or a race of processes with engines in one process:
a second engine is a second process, a store wrapper a slow network or a
process that dies at a chosen point.
"""

from __future__ import annotations

import uuid
from typing import Any, cast

import anyio
import pytest
from conftest import PassThroughStore

import stepflow
from stepflow import Engine, Event, RunRecord, RunStatus, WorkflowStore

pytestmark = pytest.mark.anyio


async def _completed(engine: Engine, store: WorkflowStore, run_id: str) -> RunRecord:
    """The run's record once it completed (a stuck run fails at its execution)."""
    with anyio.move_on_after(2):
        await engine.wait(run_id)
    record = await store.get_run(run_id)
    assert record is not None
    assert record.status == RunStatus.COMPLETED, f"stuck at {record.current_execution_id}"
    return record


@stepflow.workflow("test-events-across-continue")
async def _ticks(ctx: stepflow.WorkflowContext, seen: list[Any]) -> list[Any]:
    seen = [*seen, await ctx.wait_for_event("tick")]
    if len(seen) == 2:
        return seen
    ctx.continue_as_new(seen)


class _SlowAppend(PassThroughStore):
    """A raising process's store whose appends reach the store late (network, a GC pause)."""

    def __init__(self, store: WorkflowStore, delay: float) -> None:
        super().__init__(store)
        self._delay = delay

    async def append_event(self, *args: Any, **kwargs: Any) -> Event:
        await anyio.sleep(self._delay)
        return await self.inner.append_event(*args, **kwargs)


async def test_event_raised_while_the_run_continues_as_new_is_not_lost(
    store: WorkflowStore,
) -> None:
    slow = Engine(cast(WorkflowStore, _SlowAppend(store, 0.3)))
    async with Engine(store) as engine, anyio.create_task_group() as tg:
        run_id = await engine.start(_ticks, [])
        # Reads execution 1 as current now, appends 0.3 s later...
        tg.start_soon(slow.raise_event, run_id, "tick", "late")
        await anyio.sleep(0.05)
        # ...after execution 1 took this one and continued as new.
        await engine.raise_event(run_id, "tick", "first")
        record = await _completed(engine, store, run_id)
    assert record.output == ["first", "late"]


class _Died(Exception):
    """Stands for the process dying at that point."""


class _DiesAfterContinue(PassThroughStore):
    """A driver's store: the process dies right after ``continue_as_new`` is stored."""

    async def continue_as_new(self, *args: Any, **kwargs: Any) -> int:
        await self.inner.continue_as_new(*args, **kwargs)
        raise _Died("the process died right after continue_as_new")


async def test_events_pending_at_continue_as_new_survive_a_crash_right_after_it(
    store: WorkflowStore,
) -> None:
    run_id = f"carry-{uuid.uuid4().hex[:8]}"
    async with Engine(cast(WorkflowStore, _DiesAfterContinue(store))) as engine:
        await engine.start(_ticks, [], run_id=run_id)
        await engine.raise_event(run_id, "tick", "first")
        await engine.raise_event(run_id, "tick", "second")
        with pytest.raises(_Died):
            await engine.wait(run_id, timeout=5)
    async with Engine(store) as engine:  # a fresh process resumes the run
        await engine.resume(run_id)
        record = await _completed(engine, store, run_id)
    assert record.output == ["first", "second"]
