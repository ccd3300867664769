"""One run driven by two engines at once: another process resumed it while its driver still ran.

Nothing stops that today (there is no run-level ownership), so it must at
least end well: every step runs once, the second driver follows the first
step by step instead of waiting out each lease it finds held, and the run
is finished once; a durable run records each command once. The leases here
are ten minutes long: a driver that waited one out would fail the test's
time limit. The last test is the same mechanism met by one driver: an event
raised between its reading the history and its recording a command.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any, cast

import anyio
import pytest
from conftest import PassThroughStore

import stepflow
from stepflow import (
    Engine,
    Event,
    EventKind,
    RunRecord,
    RunStatus,
    StepContext,
    Workflow,
    WorkflowContext,
    WorkflowStore,
)

pytestmark = pytest.mark.anyio

LEASE_MS = 600_000
LIMIT = 15.0
STEP_SECONDS = 0.2


async def driven_twice(
    store: WorkflowStore, definition: Any, in_flight: anyio.Event
) -> tuple[str, RunRecord, RunRecord]:
    """Start ``definition`` on one engine; once ``in_flight`` is set, resume it on another.

    Returns the run id and the run as each engine's `wait` returned it.
    """
    with anyio.fail_after(LIMIT):
        async with (
            Engine(store, lease_ms=LEASE_MS, owner="first") as first,
            Engine(store, lease_ms=LEASE_MS, owner="second") as second,
        ):
            run_id = await first.start(definition)
            await in_flight.wait()
            await second.resume(run_id)
            return run_id, await first.wait(run_id), await second.wait(run_id)


async def history_kinds(store: WorkflowStore, run_id: str) -> Counter[EventKind]:
    return Counter(event.kind for event in await store.read_history(run_id))


async def test_a_dag_run_driven_twice_runs_each_step_once_and_finishes_once(
    store: WorkflowStore, names: Callable[[str], str]
) -> None:
    flow = Workflow(names("dag"))
    ran: Counter[str] = Counter()
    in_flight = anyio.Event()
    previous: list[str] = []
    for name in ("a", "b", "c"):

        async def body(ctx: StepContext) -> dict[str, int]:
            ran[ctx.step_id] += 1
            in_flight.set()
            await anyio.sleep(STEP_SECONDS)
            return {ctx.step_id: 1}

        flow.step(name, after=previous)(body)
        previous = [name]

    run_id, by_first, by_second = await driven_twice(store, flow, in_flight)

    assert by_first.status == by_second.status == RunStatus.COMPLETED
    assert by_second.context == {"a": 1, "b": 1, "c": 1}
    assert ran == {"a": 1, "b": 1, "c": 1}
    kinds = await history_kinds(store, run_id)
    assert kinds[EventKind.STEP_COMPLETED] == 3
    assert kinds[EventKind.RUN_COMPLETED] == 1


async def test_a_durable_run_driven_twice_runs_each_step_once_and_records_each_command_once(
    store: WorkflowStore, names: Callable[[str], str]
) -> None:
    """Both drivers replay the same record: one timer, one child, one finish."""
    ran: Counter[int] = Counter()
    in_flight = anyio.Event()

    async def work(n: int) -> int:
        ran[n] += 1
        in_flight.set()
        await anyio.sleep(STEP_SECONDS)
        return n * 10

    @stepflow.workflow(names("child"))
    async def child(ctx: WorkflowContext, n: int) -> int:
        return await ctx.step(work, n)

    @stepflow.workflow(names("durable"))
    async def parent(ctx: WorkflowContext, _: Any) -> int:
        first = await ctx.step(work, 1)
        await ctx.sleep(STEP_SECONDS)
        return first + await ctx.child(child, 2)

    run_id, by_first, by_second = await driven_twice(store, parent, in_flight)

    assert by_first.status == by_second.status == RunStatus.COMPLETED
    assert by_second.output == 30
    assert ran == {1: 1, 2: 1}
    history = await store.read_history(run_id)
    run_events = (EventKind.RUN_STARTED, EventKind.RUN_COMPLETED)
    commands = Counter((e.payload["seq"], e.kind) for e in history if e.kind not in run_events)
    assert commands == {
        (1, EventKind.STEP_COMPLETED): 1,
        (2, EventKind.TIMER_CREATED): 1,
        (2, EventKind.TIMER_FIRED): 1,
        (3, EventKind.CHILD_STARTED): 1,
        (3, EventKind.CHILD_COMPLETED): 1,
    }
    assert [e.kind for e in history].count(EventKind.RUN_COMPLETED) == 1
    assert history[-1].kind == EventKind.RUN_COMPLETED  # nothing recorded after the finish


async def test_an_event_raised_just_before_a_command_is_recorded_is_read_and_kept(
    store: WorkflowStore, names: Callable[[str], str]
) -> None:
    """The command's append is refused (the history moved on), made again after the news."""

    class RaiseBeforeTimer(PassThroughStore):
        """Raises "go" once, just before the workflow's timer reaches the store."""

        raised = False

        async def append_event(self, run_id: str, event: Any, **options: Any) -> Event:
            if event.kind == EventKind.TIMER_CREATED and not self.raised:
                self.raised = True
                await Engine(store).raise_event(run_id, "go", "early")
            appended: Event = await self.inner.append_event(run_id, event, **options)
            return appended

    @stepflow.workflow(names("durable"))
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        await ctx.sleep(0.01)
        return await ctx.wait_for_event("go")

    with anyio.fail_after(LIMIT):
        run = await Engine(cast(WorkflowStore, RaiseBeforeTimer(store))).run(flow)

    assert run.status == RunStatus.COMPLETED
    assert run.output == "early"
    kinds = [event.kind for event in await store.read_history(run.run_id)]
    assert kinds == [
        EventKind.RUN_STARTED,
        EventKind.EVENT_RAISED,
        EventKind.TIMER_CREATED,
        EventKind.TIMER_FIRED,
        EventKind.EVENT_RECEIVED,
        EventKind.RUN_COMPLETED,
    ]
