"""A cancel from another process, racing the driver's end: resumes, failures, store faults.

The simpler cases (a step in flight, a backoff, a timer, an event wait, a
child) are in test_engine and test_durable. These are the races a review
reproduced: another process resuming the run as the driver ends, a step
failing beside the cancel, and the store failing the driver's clean-up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, cast

import anyio
import pytest
from conftest import PassThroughStore, StoreDown

import stepflow
from stepflow import (
    ChildRunFailedError,
    Engine,
    RunStatus,
    StepContext,
    StepStatus,
    Workflow,
    WorkflowContext,
    WorkflowStore,
)

pytestmark = pytest.mark.anyio

LIMIT = 10.0


class NoChildList(PassThroughStore):
    """``list_children`` fails (the store lost past its retries) for the ids in ``failing``."""

    def __init__(self, inner: WorkflowStore, failing: set[str] | None = None) -> None:
        super().__init__(inner)
        self.failing = failing

    async def list_children(self, run_id: str) -> list[str]:
        if self.failing is None or run_id in self.failing:
            raise StoreDown("list_children")
        return cast(list[str], await self.inner.list_children(run_id))  # type: ignore[attr-defined]


async def test_run_returns_a_run_cancelled_elsewhere_when_its_sub_runs_cannot_be_listed(
    store: WorkflowStore, names: Callable[[str], str], caplog: pytest.LogCaptureFixture
) -> None:
    """The driver's look for sub-runs left going is best effort: the run is cancelled as stored."""
    flow = Workflow(names("dag"))
    parked = anyio.Event()

    @flow.step()
    async def long(ctx: StepContext) -> None:
        parked.set()
        await anyio.sleep(LIMIT * 2)

    driver = Engine(cast(WorkflowStore, NoChildList(store)), lease_ms=300)
    outcome: list[Any] = []

    async def drive() -> None:
        try:
            outcome.append(await driver.run(flow, run_id="r1"))
        except Exception as exc:
            outcome.append(exc)

    with anyio.fail_after(LIMIT), caplog.at_level(logging.WARNING, "stepflow.engine"):
        async with anyio.create_task_group() as tg:
            tg.start_soon(drive)
            await parked.wait()
            await Engine(store).cancel("r1")

    [record] = outcome
    assert not isinstance(record, Exception), f"Engine.run raised {record!r}"
    assert record.status == RunStatus.CANCELLED
    logged = [r for r in caplog.records if r.name == "stepflow.engine"]
    assert [r.levelname for r in logged] == ["WARNING"]


async def test_a_parent_that_handles_its_cancelled_child_is_not_failed_by_the_clean_up(
    store: WorkflowStore, names: Callable[[str], str]
) -> None:
    """Another process cancels the child; the child's driver cannot list its sub-runs.

    Before, that store error reached the parent's ``ctx.child`` and failed
    the parent for good, which catches `ChildRunFailedError` to go on.
    """
    parked = anyio.Event()

    @stepflow.workflow(names("child"))
    async def child(ctx: WorkflowContext, _: None) -> Any:
        parked.set()
        return await ctx.wait_for_event("never")

    @stepflow.workflow(names("parent"))
    async def parent(ctx: WorkflowContext, _: None) -> Any:
        try:
            return await ctx.child(child)
        except ChildRunFailedError:
            return "handled"

    faulty = NoChildList(store, failing=set())
    with anyio.fail_after(LIMIT):
        async with Engine(cast(WorkflowStore, faulty), lease_ms=300) as driver:
            run_id = await driver.start(parent, None)
            await parked.wait()
            [child_id] = await store.list_children(run_id)  # type: ignore[attr-defined]
            faulty.failing = {child_id}
            await Engine(store).cancel(child_id)
            final = await driver.wait(run_id)

    assert final.status == RunStatus.COMPLETED, final.error
    assert final.output == "handled"


async def test_a_driver_does_not_cancel_the_child_of_its_run_resumed_elsewhere_meanwhile(
    store: WorkflowStore, names: Callable[[str], str]
) -> None:
    """Cancelled elsewhere, then resumed by another engine while the driver ends.

    The driver cancels the sub-runs its cancelled run left going, but only
    while the run is still cancelled. Here the resume lands as the driver
    lists them (a hook widens that window): the child the resumed run now
    drives is left to it.
    """
    in_step, resume_now, child_running = anyio.Event(), anyio.Event(), anyio.Event()

    @stepflow.workflow(names("child"))
    async def child(ctx: WorkflowContext, _: None) -> Any:
        return await ctx.wait_for_event("go")

    async def work() -> None:
        in_step.set()
        await anyio.sleep(0.2)  # the cancel lands; no renewal (lease 3 s) tells the step

    @stepflow.workflow(names("parent"))
    async def parent(ctx: WorkflowContext, _: None) -> Any:
        await ctx.step(work)
        return await ctx.child(child)

    class ResumedAsChildrenAreListed(PassThroughStore):
        async def list_children(self, run_id: str) -> list[str]:
            if not resume_now.is_set():
                resume_now.set()
                await child_running.wait()
            return cast(list[str], await self.inner.list_children(run_id))  # type: ignore[attr-defined]

    async def running_child(run_id: str) -> str:
        while True:
            for child_id in await store.list_children(run_id):  # type: ignore[attr-defined]
                record = await store.get_run(child_id)
                if record is not None and record.status == RunStatus.RUNNING:
                    return cast(str, child_id)
            await anyio.sleep(0.01)

    hooked = cast(WorkflowStore, ResumedAsChildrenAreListed(store))
    with anyio.fail_after(LIMIT):
        async with Engine(store, lease_ms=3000) as other:
            async with Engine(hooked, lease_ms=3000) as driver:
                run_id = await driver.start(parent, None)
                await in_step.wait()
                await Engine(store).cancel(run_id)
                await resume_now.wait()  # the driver has its run back, cancelled
                await other.resume(run_id)
                child_id = await running_child(run_id)
                child_running.set()
                await anyio.sleep(0.3)  # the driver's clean-up, if any, runs now
            assert (await store.get_run(child_id)).status == RunStatus.RUNNING  # type: ignore[union-attr]
            await other.raise_event(child_id, "go", 7)
            final = await other.wait(run_id)

    assert final.status == RunStatus.COMPLETED
    assert final.output == 7


async def test_the_failure_path_leaves_a_step_another_owner_took_over_to_it(
    store: WorkflowStore, names: Callable[[str], str]
) -> None:
    """``long`` is stopped by a cancel elsewhere; another engine resumes the run and runs
    ``long`` again (attempt 2); only then does ``bad`` fail here.

    The failing driver marks the steps it stopped ``cancelled``, but not a row
    another owner claimed since it started.
    """
    flow = Workflow(names("dag"))
    resume_now, long_taken = anyio.Event(), anyio.Event()
    runs = 0

    @flow.step()
    async def long(ctx: StepContext) -> None:
        nonlocal runs
        runs += 1
        await anyio.sleep(LIMIT * 2 if runs == 1 else 1.0)

    @flow.step()
    async def starter(ctx: StepContext) -> None:
        await anyio.sleep(0.09)  # bad's renewals fall 90 ms after long's

    @flow.step(after=[starter])
    async def bad(ctx: StepContext) -> None:
        await Engine(store).cancel(ctx.run_id)
        with anyio.CancelScope(shield=True):
            await anyio.sleep(0.03)  # past long's renewal (100 ms), before bad's (~190 ms)
            resume_now.set()
            await long_taken.wait()
        raise RuntimeError("boom")

    with anyio.fail_after(LIMIT):
        async with Engine(store, lease_ms=300) as other:
            async with Engine(store, lease_ms=300) as driver:
                run_id = await driver.start(flow)
                await resume_now.wait()
                await other.resume(run_id)
                while True:
                    row = await store.get_step(run_id, "long")
                    if row is not None and row.status == StepStatus.RUNNING and row.attempt == 2:
                        break
                    await anyio.sleep(0.005)
                long_taken.set()
                await driver.wait(run_id)
                row_after_the_failure = await store.get_step(run_id, "long")
            await other.cancel(run_id)

    assert runs == 2
    assert row_after_the_failure is not None
    assert row_after_the_failure.status == StepStatus.RUNNING
