"""In-process regressions of durable runs, found by the SIGKILL tests, on every store.

Each stands for a crash or a race of processes with engines in one process:
a second engine is a second process, a store wrapper a slow network or a
process that dies at a chosen point.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from typing import Any, cast

import anyio
import pytest

import stepflow
from stepflow import Engine, Event, RunRecord, RunStatus, WorkflowStore

pytestmark = pytest.mark.anyio

_CALLS: Counter[str] = Counter()


async def _count(name: str) -> str:
    _CALLS[name] += 1
    await anyio.sleep(0.05)
    return name


async def _completed(engine: Engine, store: WorkflowStore, run_id: str) -> RunRecord:
    """The run's record once it completed (a stuck run fails at its execution)."""
    with anyio.move_on_after(2):
        await engine.wait(run_id)
    record = await store.get_run(run_id)
    assert record is not None
    assert record.status == RunStatus.COMPLETED, f"stuck at {record.current_execution_id}"
    return record


@stepflow.workflow("test-resume-completed")
async def _finished_flow(ctx: stepflow.WorkflowContext, job: str) -> dict[str, Any]:
    return {"step": await ctx.step(_count, job), "at": time.time()}  # plain code: not replayed


async def test_resume_of_a_completed_durable_run_is_a_no_op(store: WorkflowStore) -> None:
    with anyio.fail_after(10):
        async with Engine(store) as engine:
            run_id = await engine.start(_finished_flow, "done-once")
            first = await engine.wait(run_id)
        history = await store.read_history(run_id)
        async with Engine(store) as engine:  # e.g. an operator's resume in a fresh process
            await engine.resume(run_id)
            second = await engine.wait(run_id)
    assert first.status == second.status == RunStatus.COMPLETED
    assert await store.read_history(run_id) == history
    assert second.completed_at == first.completed_at
    assert second.output == first.output


@stepflow.workflow("test-two-drivers")
async def _two_drivers_flow(ctx: stepflow.WorkflowContext, job: str) -> str:
    first = await ctx.step(_count, f"{job}-a", name="a")
    second = await ctx.step(_count, f"{job}-b", name="b")
    return f"{first}+{second}"


async def test_two_processes_resuming_one_durable_run_complete_it(store: WorkflowStore) -> None:
    # Two engines stand for two processes that both resume the run (an operator's
    # retry, or a start process that was only paused, not dead).
    job = uuid.uuid4().hex[:8]
    with anyio.fail_after(10):
        run_id = f"two-{job}"
        record = RunRecord(run_id=run_id, workflow=_two_drivers_flow.name, input=job)
        await store.create_run(record)  # stored, not driven yet
        async with Engine(store, lease_ms=300) as one, Engine(store, lease_ms=300) as two:
            await one.resume(run_id)
            await two.resume(run_id)
            record = await one.wait(run_id)
            await two.wait(run_id)
    assert record.status == RunStatus.COMPLETED, record.error
    assert record.output == f"{job}-a+{job}-b"
    assert _CALLS[f"{job}-a"] == _CALLS[f"{job}-b"] == 1


@stepflow.workflow("test-events-across-continue")
async def _ticks(ctx: stepflow.WorkflowContext, seen: list[Any]) -> list[Any]:
    seen = [*seen, await ctx.wait_for_event("tick")]
    if len(seen) == 2:
        return seen
    ctx.continue_as_new(seen)


async def test_event_raised_before_continue_as_new_reaches_the_next_wait(
    store: WorkflowStore,
) -> None:
    # raise_event: "kept ... and delivered to the next wait for name, in the order raised".
    async with Engine(store) as engine:
        run_id = await engine.start(_ticks, [])
        await engine.raise_event(run_id, "tick", "first")
        await engine.raise_event(run_id, "tick", "second")
        record = await _completed(engine, store, run_id)
    assert record.output == ["first", "second"]


class _SlowAppend:
    """A raising process's store whose appends reach the store late (network, a GC pause)."""

    def __init__(self, store: WorkflowStore, delay: float) -> None:
        self._store = store
        self._delay = delay

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def append_event(self, *args: Any, **kwargs: Any) -> Event:
        await anyio.sleep(self._delay)
        return await self._store.append_event(*args, **kwargs)


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


class _DiesAfterContinue:
    """A driver's store: the process dies right after ``continue_as_new`` is stored."""

    def __init__(self, store: WorkflowStore) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def continue_as_new(self, *args: Any, **kwargs: Any) -> int:
        await self._store.continue_as_new(*args, **kwargs)
        raise _Died("the process died right after continue_as_new")


async def test_events_pending_at_continue_as_new_survive_a_crash_right_after_it(
    store: WorkflowStore,
) -> None:
    run_id = f"carry-{uuid.uuid4().hex[:8]}"
    with pytest.RaisesGroup(_Died, flatten_subgroups=True):
        async with Engine(cast(WorkflowStore, _DiesAfterContinue(store))) as engine:
            await engine.start(_ticks, [], run_id=run_id)
            await engine.raise_event(run_id, "tick", "first")
            await engine.raise_event(run_id, "tick", "second")
            await engine.wait(run_id, timeout=5)
    async with Engine(store) as engine:  # a fresh process resumes the run
        await engine.resume(run_id)
        record = await _completed(engine, store, run_id)
    assert record.output == ["first", "second"]
