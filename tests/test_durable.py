"""Durable workflows on every store: replay, timers, events, child runs, continue-as-new, pruning.

A "restart" below is what a crash or a deploy does to a run: the engine that
drives it goes away (leaving its ``async with`` block stops the run and leaves
it ``running`` in the store) and a NEW engine resumes it by id. Every test then
checks what a user sees: outputs, errors, recorded history and how often the
user's functions were really called.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, cast

import anyio
import anyio.lowlevel
import pytest
from conftest import (
    FailingCompletions,
    FailingRenewals,
    GetRunFailsOnceArmed,
    PassThroughStore,
    StoreDown,
    cancelled_elsewhere,
    nth_calls,
)

import stepflow
from stepflow import (
    ChildRunFailedError,
    ConflictError,
    DurableWorkflow,
    Engine,
    Event,
    EventKind,
    EventTimeoutError,
    PruneOptions,
    PruneResult,
    RetryPolicy,
    RunNotFoundError,
    RunRecord,
    RunStatus,
    StepFailedError,
    StepflowError,
    StepStatus,
    WorkflowContext,
    WorkflowStore,
    registry,
)

# Marked here, not only by the anyio_mode hook: anyio then keeps the ``store`` parametrisation.
pytestmark = pytest.mark.anyio

LIMIT = 5.0
"""Seconds any one test may take before it is failed rather than hung (they take < 2 s)."""

Define = Callable[..., Callable[[Any], DurableWorkflow]]
HistoryCheck = Callable[[list[Event]], bool]


@pytest.fixture
def define() -> Iterator[Define]:
    """``@define(**options)``: a durable workflow with a unique name, unregistered afterwards."""
    names: list[str] = []

    def make(**options: Any) -> Callable[[Any], DurableWorkflow]:
        name = f"dwf-{uuid.uuid4().hex[:12]}"
        names.append(name)
        return stepflow.workflow(name, **options)

    yield make
    for name in names:
        registry.unregister(name)


@pytest.fixture
def calls() -> Counter[str]:
    """How often each user function was really entered; survives engines (restarts)."""
    return Counter()


CODE_VERSION = {"new": False}
"""Module-level switch that plays "the code was changed and redeployed"."""


@pytest.fixture
def code_version() -> Iterator[dict[str, bool]]:
    CODE_VERSION["new"] = False
    yield CODE_VERSION
    CODE_VERSION["new"] = False


# --- helpers ---------------------------------------------------------------------------------


def has(kind: EventKind, count: int = 1) -> HistoryCheck:
    return lambda events: sum(event.kind == kind for event in events) >= count


async def history_until(store: WorkflowStore, run_id: str, check: HistoryCheck) -> list[Event]:
    """Poll the current execution's history until ``check`` holds."""
    while True:
        events = await store.read_history(run_id)
        if check(events):
            return events
        await anyio.sleep(0.01)


async def start_then_stop(
    store: WorkflowStore, flow: DurableWorkflow, input: Any = None, *, until: HistoryCheck
) -> str:
    """Start a run, let it get as far as ``until``, then shut its engine down (a 'crash')."""
    async with Engine(store) as engine:
        run_id = await engine.start(flow, input)
        await history_until(store, run_id, until)
    record = await store.get_run(run_id)
    assert record is not None
    assert record.status == RunStatus.RUNNING, "the stopped run must stay resumable"
    return run_id


async def resume_in_new_engine(
    store: WorkflowStore, run_id: str, *events: tuple[str, Any], **engine_options: Any
) -> RunRecord:
    """A fresh engine (as in a new process) resumes the run, raises ``events``, waits."""
    async with Engine(store, **engine_options) as engine:
        assert await engine.resume(run_id) == run_id
        for name, payload in events:
            await engine.raise_event(run_id, name, payload)
        return await engine.wait(run_id, timeout=LIMIT)


async def kinds_of(store: WorkflowStore, run_id: str, execution_id: int | None = None) -> list[str]:
    return [str(event.kind) for event in await store.read_history(run_id, execution_id)]


async def execution_ids(store: WorkflowStore, run_id: str) -> list[int]:
    return [info.execution_id for info in await store.list_executions(run_id)]


def of_kind(events: list[Event], kind: EventKind) -> list[Event]:
    return [event for event in events if event.kind == kind]


# --- steps: recorded once, replayed after a restart --------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_completed_step_is_not_called_again_after_a_restart(
    store: WorkflowStore, define: Define, calls: Counter[str], kind: str
) -> None:
    def double_sync(x: int) -> int:
        calls["double"] += 1
        return x * 2

    async def double_async(x: int) -> int:
        calls["double"] += 1
        await anyio.lowlevel.checkpoint()
        return x * 2

    double = double_sync if kind == "sync" else double_async

    def add(a: int, b: int) -> int:
        calls["add"] += 1
        return a + b

    @define()
    async def flow(ctx: WorkflowContext, x: int) -> list[Any]:
        calls["workflow"] += 1
        doubled = await ctx.step(double, x, name="double")
        approval = await ctx.wait_for_event("approval")
        total = await ctx.step(add, doubled, approval["extra"])
        return [doubled, approval, total]

    with anyio.fail_after(LIMIT):
        run_id = await start_then_stop(store, flow, 21, until=has(EventKind.STEP_COMPLETED))
        assert calls == {"workflow": 1, "double": 1}
        record = await resume_in_new_engine(store, run_id, ("approval", {"extra": 1}))

    assert record.status == RunStatus.COMPLETED, record.error
    assert record.output == [42, {"extra": 1}, 43]
    assert calls == {"workflow": 2, "double": 1, "add": 1}
    completed = of_kind(await store.read_history(run_id), EventKind.STEP_COMPLETED)
    assert [(e.payload["name"], e.payload["output"]) for e in completed] == [
        ("double", 42),
        ("add", 43),
    ]
    steps = await store.list_steps(run_id)
    assert [(s.name, s.status, s.attempt) for s in steps] == [
        ("double", StepStatus.COMPLETED, 1),
        ("add", StepStatus.COMPLETED, 1),
    ]


async def test_an_event_raised_while_no_engine_drives_the_run_is_kept(
    store: WorkflowStore, define: Define, calls: Counter[str]
) -> None:
    def fetch() -> str:
        calls["fetch"] += 1
        return "page"

    @define()
    async def flow(ctx: WorkflowContext, _: None) -> list[Any]:
        page = await ctx.step(fetch)
        return [page, await ctx.wait_for_event("go")]

    with anyio.fail_after(LIMIT):
        run_id = await start_then_stop(store, flow, until=has(EventKind.STEP_COMPLETED))
        async with Engine(store) as engine:
            await engine.raise_event(run_id, "go", "later")  # before anyone resumes it
            await engine.resume(run_id)
            record = await engine.wait(run_id, timeout=LIMIT)

    assert record.status == RunStatus.COMPLETED, record.error
    assert record.output == ["page", "later"]
    assert calls["fetch"] == 1


async def test_steps_of_durable_runs_share_the_engines_max_concurrency(
    store: WorkflowStore, define: Define
) -> None:
    """``max_concurrency`` bounds every step the engine runs, DAG or durable."""
    spans: list[tuple[float, float]] = []

    async def work() -> None:
        start = time.monotonic()
        await anyio.sleep(0.1)
        spans.append((start, time.monotonic()))

    @define()
    async def flow(ctx: WorkflowContext, _: Any) -> None:
        await ctx.step(work)

    with anyio.fail_after(LIMIT):
        async with Engine(store, max_concurrency=1) as engine:
            run_ids = [await engine.start(flow) for _ in range(2)]
            for run_id in run_ids:
                assert (await engine.wait(run_id)).status == RunStatus.COMPLETED
    first, second = sorted(spans)
    assert first[1] <= second[0], "two steps ran at once despite max_concurrency=1"


async def test_a_durable_step_backing_off_frees_its_slot_for_other_steps(
    store: WorkflowStore, define: Define
) -> None:
    """With one slot, a durable step waiting to retry lets another run's step go first."""
    order: list[str] = []
    failed_once = anyio.Event()

    async def flaky() -> None:
        order.append("flaky")
        if not failed_once.is_set():
            failed_once.set()
            raise ConnectionError("rate limited")

    async def quick() -> None:
        order.append("quick")

    @define()
    async def retrying(ctx: WorkflowContext, _: Any) -> None:
        await ctx.step(flaky, retry=RetryPolicy(retries=1, initial_delay=0.3, jitter=0))

    @define()
    async def other(ctx: WorkflowContext, _: Any) -> None:
        await ctx.step(quick)

    with anyio.fail_after(LIMIT):
        async with Engine(store, max_concurrency=1) as engine:
            retrying_run = await engine.start(retrying)
            await failed_once.wait()
            other_run = await engine.start(other)
            assert (await engine.wait(other_run)).status == RunStatus.COMPLETED
            assert (await engine.wait(retrying_run)).status == RunStatus.COMPLETED

    assert order == ["flaky", "quick", "flaky"]


async def test_a_cancel_from_another_process_stops_a_durable_step_at_its_heartbeat(
    store: WorkflowStore, define: Define
) -> None:
    """The step in flight is stopped, and the workflow goes no further."""
    parked = anyio.Event()
    seen: list[str] = []

    async def long() -> None:
        parked.set()
        try:
            await anyio.sleep(LIMIT * 2)
        except anyio.get_cancelled_exc_class():
            seen.append("long interrupted")
            raise

    async def after_it() -> None:
        seen.append("after_it ran")

    @define()
    async def flow(ctx: WorkflowContext, _: Any) -> None:
        await ctx.step(long)
        await ctx.step(after_it)

    _, final = await cancelled_elsewhere(store, flow, parked)

    assert final.status == RunStatus.CANCELLED
    assert seen == ["long interrupted"]


async def test_a_workflow_retrying_around_ctx_step_stops_once_another_process_cancelled_it(
    store: WorkflowStore, define: Define
) -> None:
    """The workflow catches the `RunCancelledError` once; its next await stops it.

    Before, a retry loop with ``except Exception`` went on forever against
    the cancelled run, appending a timer per turn, and ``wait`` hung.
    """
    parked = anyio.Event()
    caught: list[str] = []

    async def long() -> None:
        parked.set()
        await anyio.sleep(LIMIT * 2)

    @define()
    async def flow(ctx: WorkflowContext, _: Any) -> None:
        while True:
            try:
                await ctx.step(long)
                return
            except Exception as exc:  # a workflow's own retry loop
                caught.append(type(exc).__name__)
                await ctx.sleep(0.05)

    run_id, final = await cancelled_elsewhere(store, flow, parked)

    assert final.status == RunStatus.CANCELLED
    assert caught == ["RunCancelledElsewhere"]
    kinds = [event.kind for event in await store.read_history(run_id)]
    assert kinds[-1] == EventKind.RUN_CANCELLED


@pytest.mark.parametrize("waits_on", ["event", "timer"])
async def test_a_workflow_waiting_stops_once_another_process_cancelled_it(
    store: WorkflowStore, define: Define, waits_on: str
) -> None:
    """Waiting for an event (no timeout) or on a long timer, it is stopped, not left waiting.

    The cancel lands once the wait has begun: for the timer, once its
    ``timer_created`` is stored (earlier, the refused append would stop it).
    """
    waiting = anyio.Event()

    class TimerSeen(PassThroughStore):
        async def append_event(self, run_id: str, event: Any, **options: Any) -> Event:
            appended: Event = await self.inner.append_event(run_id, event, **options)
            if event.kind == EventKind.TIMER_CREATED:
                waiting.set()
            return appended

    @define()
    async def flow(ctx: WorkflowContext, _: Any) -> None:
        if waits_on == "event":
            waiting.set()
            await ctx.wait_for_event("go")
        else:
            await ctx.sleep(LIMIT * 2)

    _, final = await cancelled_elsewhere(cast(WorkflowStore, TimerSeen(store)), flow, waiting)

    assert final.status == RunStatus.CANCELLED


async def test_step_retries_until_it_succeeds(
    store: WorkflowStore, define: Define, calls: Counter[str]
) -> None:
    def flaky(name: str) -> str:
        calls[name] += 1
        if calls[name] < 3:
            raise ConnectionError(f"attempt {calls[name]} failed")
        return f"{name} ok after {calls[name]}"

    @define()
    async def flow(ctx: WorkflowContext, _: None) -> list[str]:
        first = await ctx.step(flaky, "a", name="a", retry=RetryPolicy(retries=2, initial_delay=0))
        second = await ctx.step(flaky, "b", name="b", retries=2)
        return [first, second]

    with anyio.fail_after(LIMIT):
        record = await Engine(store).run(flow)

    assert record.status == RunStatus.COMPLETED, record.error
    assert record.output == ["a ok after 3", "b ok after 3"]
    steps = {step.name: step for step in await store.list_steps(record.run_id)}
    assert steps["a"].attempt == steps["b"].attempt == 3
    assert steps["a"].status == steps["b"].status == StepStatus.COMPLETED
    # Failed attempts that were retried leave no history event: only the outcome.
    assert await kinds_of(store, record.run_id) == [
        "run_started",
        "step_completed",
        "step_completed",
        "run_completed",
    ]


async def test_a_step_that_fails_for_good_raises_inside_the_workflow_also_on_replay(
    store: WorkflowStore, define: Define, calls: Counter[str]
) -> None:
    async def charge(amount: int) -> None:
        calls["charge"] += 1
        raise ValueError(f"card declined for {amount}")

    @define()
    async def flow(ctx: WorkflowContext, amount: int) -> dict[str, Any]:
        calls["workflow"] += 1
        try:
            await ctx.step(charge, amount, retry=RetryPolicy(retries=1, initial_delay=0))
        except StepFailedError as exc:
            caught = {"name": exc.name, "type": exc.error["type"], "message": exc.error["message"]}
        await ctx.wait_for_event("go")
        return caught

    with anyio.fail_after(LIMIT):
        run_id = await start_then_stop(store, flow, 5, until=has(EventKind.STEP_FAILED))
        assert calls["charge"] == 2  # the first attempt and one retry
        record = await resume_in_new_engine(store, run_id, ("go", None))

    assert record.status == RunStatus.COMPLETED, record.error
    assert record.output == {
        "name": "charge",
        "type": "ValueError",
        "message": "card declined for 5",
    }
    assert calls == {"charge": 2, "workflow": 2}  # the replay raised it without calling charge
    failed = of_kind(await store.read_history(run_id), EventKind.STEP_FAILED)
    assert len(failed) == 1
    assert failed[0].payload["error"]["message"] == "card declined for 5"


async def test_an_uncaught_step_failure_fails_the_run_with_its_error(
    store: WorkflowStore, define: Define, calls: Counter[str]
) -> None:
    def explode() -> None:
        calls["explode"] += 1
        raise KeyError("missing")

    def never() -> None:
        calls["never"] += 1

    @define()
    async def flow(ctx: WorkflowContext, _: None) -> None:
        await ctx.step(explode)
        await ctx.step(never)

    with anyio.fail_after(LIMIT):
        record = await Engine(store).run(flow)

    assert record.status == RunStatus.FAILED
    assert record.error["type"] == "StepFailedError"
    assert "explode" in record.error["message"]
    assert "KeyError" in record.error["message"]
    assert "missing" in record.error["message"]
    assert calls == {"explode": 1}
    assert (await kinds_of(store, record.run_id))[-2:] == ["step_failed", "run_failed"]


async def test_a_step_past_its_timeout_fails_with_step_timeout_error(
    store: WorkflowStore, define: Define
) -> None:
    async def slow() -> str:
        await anyio.sleep(10)
        return "too late"

    @define()
    async def flow(ctx: WorkflowContext, _: None) -> str:
        try:
            return str(await ctx.step(slow, timeout=0.05))
        except StepFailedError as exc:
            return str(exc.error["type"])

    with anyio.fail_after(LIMIT):
        record = await Engine(store).run(flow)

    assert record.status == RunStatus.COMPLETED, record.error
    assert record.output == "StepTimeoutError"


async def test_two_engines_driving_one_run_complete_it_running_each_step_once(
    store: WorkflowStore, define: Define, calls: Counter[str]
) -> None:
    async def work(name: str) -> str:
        calls[name] += 1
        await anyio.sleep(0.05)
        return name

    @define()
    async def flow(ctx: WorkflowContext, _: None) -> str:
        first = await ctx.step(work, "a", name="a")
        second = await ctx.step(work, "b", name="b")
        return f"{first}+{second}"

    run_id = f"two-{uuid.uuid4().hex[:8]}"
    await store.create_run(RunRecord(run_id=run_id, workflow=flow.name))  # stored, not driven
    with anyio.fail_after(LIMIT):
        # Two processes resume it at once (an operator's retry, a paused process waking up).
        async with Engine(store, lease_ms=300) as one, Engine(store, lease_ms=300) as two:
            await one.resume(run_id)
            await two.resume(run_id)
            first = await one.wait(run_id, timeout=LIMIT)
            second = await two.wait(run_id, timeout=LIMIT)

    assert first.status == second.status == RunStatus.COMPLETED, (first.error, second.error)
    assert first.output == second.output == "a+b"
    assert calls == {"a": 1, "b": 1}
    completed = of_kind(await store.read_history(run_id), EventKind.STEP_COMPLETED)
    assert [e.payload["name"] for e in completed] == ["a", "b"]


async def test_resuming_a_completed_run_leaves_it_as_it_is(
    store: WorkflowStore, define: Define, calls: Counter[str]
) -> None:
    @define()
    async def flow(ctx: WorkflowContext, _: None) -> dict[str, Any]:
        calls["workflow"] += 1
        return {"step": await ctx.step(lambda: "once", name="work"), "at": time.time()}

    with anyio.fail_after(LIMIT):
        first = await Engine(store).run(flow)
        history = await store.read_history(first.run_id)
        second = await resume_in_new_engine(store, first.run_id)

    assert first.status == second.status == RunStatus.COMPLETED
    assert second.output == first.output
    assert second.completed_at == first.completed_at
    assert await store.read_history(first.run_id) == history
    assert calls["workflow"] == 1


async def test_a_run_failed_by_a_workflow_bug_completes_when_resumed_with_fixed_code(
    store: WorkflowStore, define: Define, calls: Counter[str], code_version: dict[str, bool]
) -> None:
    def fetch() -> str:
        calls["fetch"] += 1
        return "data"

    @define()
    async def flow(ctx: WorkflowContext, _: None) -> str:
        data = await ctx.step(fetch)
        if not CODE_VERSION["new"]:
            raise RuntimeError("bug in the workflow code")
        return f"processed {data}"

    with anyio.fail_after(LIMIT):
        failed = await Engine(store).run(flow)
        assert failed.status == RunStatus.FAILED
        assert failed.error["message"] == "bug in the workflow code"
        code_version["new"] = True  # the fix is deployed
        record = await resume_in_new_engine(store, failed.run_id)

    assert record.status == RunStatus.COMPLETED, record.error
    assert record.output == "processed data"
    assert record.error is None
    assert calls["fetch"] == 1


# --- durable timers ----------------------------------------------------------------------------


async def test_sleep_waits_and_records_its_timer(store: WorkflowStore, define: Define) -> None:
    slept: list[float] = []

    @define()
    async def flow(ctx: WorkflowContext, _: None) -> str:
        started = time.monotonic()
        await ctx.sleep(0.2)
        slept.append(time.monotonic() - started)
        return "awake"

    with anyio.fail_after(LIMIT):
        record = await Engine(store).run(flow)

    assert record.status == RunStatus.COMPLETED, record.error
    assert record.output == "awake"
    assert 0.2 <= slept[0] < 0.4  # never early, even by the store clock's rounding
    history = await store.read_history(record.run_id)
    assert [str(e.kind) for e in history] == [
        "run_started",
        "timer_created",
        "timer_fired",
        "run_completed",
    ]
    created, fired = history[1], history[2]
    assert created.payload["seconds"] == 0.2
    assert fired.timestamp - created.timestamp >= 200


async def test_a_restart_mid_sleep_wakes_at_the_original_deadline(
    store: WorkflowStore, define: Define, calls: Counter[str]
) -> None:
    def prepare() -> str:
        calls["prepare"] += 1
        return "ready"

    @define()
    async def flow(ctx: WorkflowContext, _: None) -> str:
        state = await ctx.step(prepare)
        await ctx.sleep(0.5)
        return str(state)

    with anyio.fail_after(LIMIT):
        started = time.monotonic()
        run_id = await start_then_stop(store, flow, until=has(EventKind.TIMER_CREATED))
        await anyio.sleep(0.15)  # "down" for a while, mid-sleep
        record = await resume_in_new_engine(store, run_id)
        elapsed = time.monotonic() - started

    assert record.status == RunStatus.COMPLETED, record.error
    assert record.output == "ready"
    assert 0.5 <= elapsed < 0.8, "the timer must not restart from the resume"
    assert calls["prepare"] == 1
    kinds = await kinds_of(store, run_id)
    assert kinds.count("timer_created") == 1
    assert kinds.count("timer_fired") == 1


# --- events ------------------------------------------------------------------------------------


async def test_an_event_raised_before_the_wait_is_kept_and_delivered(
    store: WorkflowStore, define: Define
) -> None:
    @define()
    async def flow(ctx: WorkflowContext, _: None) -> Any:
        await ctx.sleep(0.1)  # the event arrives while the workflow is still asleep
        return await ctx.wait_for_event("approval")

    with anyio.fail_after(LIMIT):
        async with Engine(store) as engine:
            run_id = await engine.start(flow)
            await engine.raise_event(run_id, "approval", {"by": "ana", "ok": True})
            record = await engine.wait(run_id, timeout=LIMIT)

    assert record.status == RunStatus.COMPLETED, record.error
    assert record.output == {"by": "ana", "ok": True}
    kinds = await kinds_of(store, run_id)
    assert kinds.index("event_raised") < kinds.index("timer_fired") < kinds.index("event_received")


async def test_an_event_raised_after_the_wait_started_is_delivered(
    store: WorkflowStore, define: Define
) -> None:
    @define()
    async def flow(ctx: WorkflowContext, _: None) -> Any:
        await ctx.step(lambda: "before", name="before")
        return await ctx.wait_for_event("approval")

    with anyio.fail_after(LIMIT):
        async with Engine(store) as engine:
            run_id = await engine.start(flow)
            await history_until(store, run_id, has(EventKind.STEP_COMPLETED))
            await anyio.sleep(0.1)  # the workflow now sits in the wait
            await engine.raise_event(run_id, "approval", [1, 2, 3])
            record = await engine.wait(run_id, timeout=LIMIT)

    assert record.status == RunStatus.COMPLETED, record.error
    assert record.output == [1, 2, 3]


async def test_events_of_one_name_go_to_successive_waits_in_order(
    store: WorkflowStore, define: Define
) -> None:
    @define()
    async def flow(ctx: WorkflowContext, _: None) -> list[Any]:
        await ctx.sleep(0.1)
        first = await ctx.wait_for_event("msg")
        other = await ctx.wait_for_event("other")
        second = await ctx.wait_for_event("msg")
        return [first, other, second]

    with anyio.fail_after(LIMIT):
        async with Engine(store) as engine:
            run_id = await engine.start(flow)
            await engine.raise_event(run_id, "msg", "one")
            await engine.raise_event(run_id, "other", "x")
            await engine.raise_event(run_id, "msg", "two")
            record = await engine.wait(run_id, timeout=LIMIT)

    assert record.status == RunStatus.COMPLETED, record.error
    assert record.output == ["one", "x", "two"]


async def test_an_event_timeout_raises_inside_the_workflow_and_again_on_replay(
    store: WorkflowStore, define: Define, calls: Counter[str]
) -> None:
    @define()
    async def flow(ctx: WorkflowContext, _: None) -> list[Any]:
        try:
            answer = await ctx.wait_for_event("reply", timeout=0.3)
        except EventTimeoutError as exc:
            calls["timed out"] += 1
            answer = f"timeout {exc.name}"
        await ctx.step(lambda: None, name="after")
        go = await ctx.wait_for_event("go")
        return [answer, go]

    with anyio.fail_after(LIMIT):
        run_id = await start_then_stop(store, flow, until=has(EventKind.STEP_COMPLETED))
        resumed = time.monotonic()
        async with Engine(store) as engine:
            await engine.resume(run_id)
            # Raised now, the reply is too late: the recorded timeout stands on replay.
            await engine.raise_event(run_id, "reply", "late")
            await engine.raise_event(run_id, "go", "now")
            record = await engine.wait(run_id, timeout=LIMIT)
        replay_took = time.monotonic() - resumed

    assert record.status == RunStatus.COMPLETED, record.error
    assert record.output == ["timeout reply", "now"]
    assert calls["timed out"] == 2  # raised in the first run and again in the replay
    assert replay_took < 0.3, "the replay must not wait for the timeout again"
    kinds = await kinds_of(store, run_id)
    assert kinds.count("timer_created") == kinds.count("timer_fired") == 1
    assert kinds.count("event_received") == 1  # only 'go'; 'reply' stays undelivered


async def test_an_uncaught_event_timeout_fails_the_run(
    store: WorkflowStore, define: Define
) -> None:
    waited: list[float] = []

    @define()
    async def flow(ctx: WorkflowContext, _: None) -> Any:
        started = time.monotonic()
        try:
            return await ctx.wait_for_event("never", timeout=0.05)
        finally:
            waited.append(time.monotonic() - started)

    with anyio.fail_after(LIMIT):
        record = await Engine(store).run(flow)

    assert waited[0] >= 0.05
    assert record.status == RunStatus.FAILED
    assert record.error["type"] == "EventTimeoutError"
    assert "never" in record.error["message"]


async def test_a_run_waiting_for_an_event_reads_only_what_is_new(
    store: WorkflowStore, define: Define
) -> None:
    """Each look for the event reads the events after those read before.

    Before, every look (up to one a second per waiting run) read and parsed
    the whole history again: here 40 steps' worth of events per look.
    """

    class CountingReads(PassThroughStore):
        counting = False
        events_read = 0

        async def read_history(self, *args: Any, **kwargs: Any) -> list[Event]:
            events: list[Event] = await self.inner.read_history(*args, **kwargs)
            if self.counting:
                self.events_read += len(events)
            return events

    counting = CountingReads(store)

    async def work(n: int) -> int:
        return n

    @define()
    async def flow(ctx: WorkflowContext, _: None) -> Any:
        for n in range(40):
            await ctx.step(work, n)
        return await ctx.wait_for_event("go")

    with anyio.fail_after(LIMIT):
        async with Engine(cast(WorkflowStore, counting)) as engine:
            run_id = await engine.start(flow, None)
            await history_until(store, run_id, has(EventKind.STEP_COMPLETED, 40))
            counting.counting = True
            await anyio.sleep(0.5)  # several looks for the event
            await Engine(store).raise_event(run_id, "go", "went")
            record = await engine.wait(run_id)

    assert record.output == "went"
    assert 1 <= counting.events_read <= 3  # the raised event, not 40 steps' worth per look


async def test_an_engine_keeps_no_wake_up_per_finished_run(
    store: WorkflowStore, define: Define
) -> None:
    """A long-lived engine's memory must not grow with the runs that ever waited.

    Before, the wake-up a waiting run registers stayed in the engine for
    good unless this engine raised an event for that run.
    """

    @define()
    async def flow(ctx: WorkflowContext, _: None) -> None:
        with contextlib.suppress(EventTimeoutError):
            await ctx.wait_for_event("never", timeout=0.01)

    with anyio.fail_after(LIMIT):
        engine = Engine(store)
        for _ in range(5):
            assert (await engine.run(flow)).status == RunStatus.COMPLETED

    assert engine._news == {}  # the engine's per-run wake-ups (white box: no other trace)


async def test_raise_event_on_an_unknown_or_finished_run_is_refused(
    store: WorkflowStore, define: Define
) -> None:
    @define()
    async def flow(ctx: WorkflowContext, _: None) -> str:
        return "done"

    with anyio.fail_after(LIMIT):
        async with Engine(store) as engine:
            with pytest.raises(RunNotFoundError):
                await engine.raise_event("no-such-run", "go", 1)
            run_id = await engine.start(flow)
            record = await engine.wait(run_id, timeout=LIMIT)
            assert record.status == RunStatus.COMPLETED
            before = await store.read_history(run_id)
            with pytest.raises(ConflictError):
                await engine.raise_event(run_id, "go", 1)

    assert await store.read_history(run_id) == before  # nothing was recorded


# --- child runs --------------------------------------------------------------------------------


async def test_a_child_run_returns_its_output_and_records_its_parent(
    store: WorkflowStore, define: Define
) -> None:
    @define()
    async def child(ctx: WorkflowContext, text: str) -> str:
        return str(await ctx.step(str.upper, text, name="upper"))

    @define()
    async def parent(ctx: WorkflowContext, text: str) -> list[Any]:
        await ctx.step(lambda: 1, name="first")
        return [await ctx.child(child, text), await ctx.child(child, "b")]

    with anyio.fail_after(LIMIT):
        record = await Engine(store).run(parent, "a")

    assert record.status == RunStatus.COMPLETED, record.error
    assert record.output == ["A", "B"]
    run_id = record.run_id
    for seq, output in ((2, "A"), (3, "B")):
        sub = await store.get_run(f"{run_id}.1.{seq}")
        assert sub is not None
        assert sub.parent_run_id == run_id
        assert sub.workflow == child.name
        assert sub.status == RunStatus.COMPLETED
        assert sub.output == output
    started = of_kind(await store.read_history(run_id), EventKind.CHILD_STARTED)
    assert [e.payload["child_run_id"] for e in started] == [f"{run_id}.1.2", f"{run_id}.1.3"]
    parent_record = await store.get_run(run_id)
    assert parent_record is not None
    assert parent_record.parent_run_id is None


async def test_a_child_failure_raises_child_run_failed_error_in_the_parent(
    store: WorkflowStore, define: Define
) -> None:
    def broken() -> None:
        raise RuntimeError("child broke")

    @define()
    async def child(ctx: WorkflowContext, _: None) -> None:
        await ctx.step(broken)

    @define()
    async def catching(ctx: WorkflowContext, _: None) -> dict[str, Any]:
        try:
            await ctx.child(child)
        except ChildRunFailedError as exc:
            return {"child": exc.run_id, "type": exc.error["type"]}
        return {}

    @define()
    async def not_catching(ctx: WorkflowContext, _: None) -> None:
        await ctx.child(child)

    with anyio.fail_after(LIMIT):
        engine = Engine(store)
        caught = await engine.run(catching)
        uncaught = await engine.run(not_catching)

    assert caught.status == RunStatus.COMPLETED, caught.error
    assert caught.output == {"child": f"{caught.run_id}.1.1", "type": "StepFailedError"}
    sub = await store.get_run(f"{caught.run_id}.1.1")
    assert sub is not None
    assert sub.status == RunStatus.FAILED
    assert uncaught.status == RunStatus.FAILED
    assert uncaught.error["type"] == "ChildRunFailedError"
    assert f"{uncaught.run_id}.1.1" in uncaught.error["message"]


async def test_a_completed_child_is_not_run_again_when_the_parent_replays(
    store: WorkflowStore, define: Define, calls: Counter[str]
) -> None:
    def work(x: int) -> int:
        calls["child step"] += 1
        return x + 1

    @define()
    async def child(ctx: WorkflowContext, x: int) -> int:
        calls["child"] += 1
        return int(await ctx.step(work, x))

    @define()
    async def parent(ctx: WorkflowContext, x: int) -> list[Any]:
        calls["parent"] += 1
        result = await ctx.child(child, x)
        return [result, await ctx.wait_for_event("go")]

    with anyio.fail_after(LIMIT):
        run_id = await start_then_stop(store, parent, 1, until=has(EventKind.CHILD_COMPLETED))
        record = await resume_in_new_engine(store, run_id, ("go", "!"))

    assert record.status == RunStatus.COMPLETED, record.error
    assert record.output == [2, "!"]
    assert calls == {"parent": 2, "child": 1, "child step": 1}
    kinds = await kinds_of(store, run_id)
    assert kinds.count("child_started") == kinds.count("child_completed") == 1


@pytest.mark.parametrize("canceller", ["its driver", "another engine"])
async def test_cancelling_a_parent_cancels_the_child_it_awaits(
    store: WorkflowStore, define: Define, canceller: str
) -> None:
    """By the engine driving them, or from another process.

    Before, a cancel from another process left the child to run to its end.
    """

    @define()
    async def child(ctx: WorkflowContext, _: None) -> Any:
        return await ctx.wait_for_event("never")

    @define()
    async def parent(ctx: WorkflowContext, _: None) -> Any:
        return await ctx.child(child)

    with anyio.fail_after(LIMIT):
        async with Engine(store, lease_ms=300) as driver:
            run_id = await driver.start(parent, None)
            await history_until(store, run_id, has(EventKind.CHILD_STARTED))
            canceller_engine = driver if canceller == "its driver" else Engine(store)
            cancelled = await canceller_engine.cancel(run_id)
            parent_record = await driver.wait(run_id)
            child_record = await driver.wait(f"{run_id}.1.1")

    assert cancelled.status == RunStatus.CANCELLED
    assert parent_record.status == RunStatus.CANCELLED
    assert child_record.status == RunStatus.CANCELLED


async def test_a_child_created_as_the_parent_is_cancelled_elsewhere_is_cancelled_too(
    store: WorkflowStore, define: Define
) -> None:
    """The cancel lands during a short step; the parent then creates its child.

    A cancelled run's history takes no ``child_started``, so the parent stops
    there, and its driver cancels the child nobody will drive. Before
    cf9bd89 the child was driven to its end; between it and this fix it was
    left ``pending``, which also kept the tree from being deleted.
    """
    in_step = anyio.Event()

    @define()
    async def child(ctx: WorkflowContext, _: None) -> Any:
        return 1

    async def work() -> None:
        in_step.set()
        await anyio.sleep(0.2)  # the cancel lands; no renewal (lease 3 s) tells the step

    @define()
    async def parent(ctx: WorkflowContext, _: None) -> Any:
        await ctx.step(work)
        return await ctx.child(child)

    run_id, final = await cancelled_elsewhere(store, parent, in_step, lease_ms=3000)

    assert final.status == RunStatus.CANCELLED
    [child_id] = await store.list_children(run_id)  # type: ignore[attr-defined]
    assert (await store.get_run(child_id)).status == RunStatus.CANCELLED  # type: ignore[union-attr]
    kinds = [event.kind for event in await store.read_history(run_id)]
    assert EventKind.CHILD_STARTED not in kinds
    await stepflow.Admin(store).delete_instance(run_id)  # type: ignore[arg-type]
    assert await store.get_run(child_id) is None


async def test_one_failed_look_at_the_run_during_a_timer_does_not_stop_it(
    store: WorkflowStore, define: Define
) -> None:
    """A long timer looks at the run for a cancel; a look the store fails is only logged."""

    blippy = GetRunFailsOnceArmed(store)

    async def arm() -> None:
        blippy.armed = True

    @define()
    async def flow(ctx: WorkflowContext, _: None) -> int:
        await ctx.step(arm)
        await ctx.sleep(0.3)
        return 1

    with anyio.fail_after(LIMIT):
        final = await Engine(cast(WorkflowStore, blippy), lease_ms=150).run(flow)

    assert final.status == RunStatus.COMPLETED
    assert not blippy.armed, "the timer never looked at the run"


# --- continue-as-new ---------------------------------------------------------------------------


@pytest.mark.parametrize("each_execution", ["sleeps", "runs a step"])
async def test_continue_as_new_does_not_undo_a_cancel_from_another_process(
    store: WorkflowStore, define: Define, each_execution: str
) -> None:
    """An eternal workflow cancelled from another process stops; it is not revived.

    The cancel lands just before its third continue-as-new reaches the store,
    so the store's refusal is what stops it. Before, the store took the
    continue-as-new of the cancelled run and it ran on in a new execution,
    as ``running``.
    """

    class CancelledAtTheThirdContinue(PassThroughStore):
        continues = 0

        async def continue_as_new(self, run_id: str, *args: Any, **kwargs: Any) -> int:
            self.continues += 1
            if self.continues == 3:
                await Engine(store).cancel(run_id)
            return cast(int, await self.inner.continue_as_new(run_id, *args, **kwargs))

    async def work(n: int) -> int:
        return n

    @define()
    async def eternal(ctx: WorkflowContext, n: int) -> None:
        if each_execution == "sleeps":
            await ctx.sleep(0.01)
        else:
            await ctx.step(work, n)
        ctx.continue_as_new(n + 1)

    hooked = CancelledAtTheThirdContinue(store)
    with anyio.fail_after(LIMIT):
        final = await Engine(cast(WorkflowStore, hooked)).run(eternal, 0)

    assert final.status == RunStatus.CANCELLED
    assert final.current_execution_id == 3  # the refused continue started no fourth


async def test_continue_as_new_starts_executions_with_their_own_history(
    store: WorkflowStore, define: Define, calls: Counter[str]
) -> None:
    def visit(n: int) -> int:
        calls[f"visit {n}"] += 1
        return n

    @define()
    async def flow(ctx: WorkflowContext, n: int) -> dict[str, int]:
        await ctx.step(visit, n)
        if n < 2:
            ctx.continue_as_new(n + 1)
        return {"final": n, "execution": ctx.execution_id}

    with anyio.fail_after(LIMIT):
        record = await Engine(store).run(flow, 0)

    assert record.status == RunStatus.COMPLETED, record.error
    assert record.output == {"final": 2, "execution": 3}
    assert record.current_execution_id == 3
    assert record.input == 2
    assert calls == {"visit 0": 1, "visit 1": 1, "visit 2": 1}
    executions = await store.list_executions(record.run_id)
    assert [x.execution_id for x in executions] == [1, 2, 3]
    assert [x.status for x in executions] == [
        RunStatus.CONTINUED_AS_NEW,
        RunStatus.CONTINUED_AS_NEW,
        RunStatus.COMPLETED,
    ]
    assert [x.input for x in executions] == [0, 1, 2]
    assert all(x.completed_at is not None for x in executions)
    for xid in (1, 2, 3):
        history = await store.read_history(record.run_id, xid)
        assert history[0].kind == EventKind.RUN_STARTED
        assert history[0].payload == xid - 1
        assert [e.event_id for e in history] == list(range(1, len(history) + 1))
        step = of_kind(history, EventKind.STEP_COMPLETED)
        assert [e.payload["output"] for e in step] == [xid - 1]
        expected_end = EventKind.CONTINUED_AS_NEW if xid < 3 else EventKind.RUN_COMPLETED
        assert history[-1].kind == expected_end


@pytest.mark.parametrize("prune", [None, PruneOptions(keep_last=1)], ids=["kept", "pruned"])
async def test_events_no_wait_took_are_delivered_after_continue_as_new(
    store: WorkflowStore, define: Define, prune: PruneOptions | None
) -> None:
    @define()
    async def flow(ctx: WorkflowContext, seen: list[Any]) -> list[Any]:
        await ctx.sleep(0.05 if not seen else 0)
        seen = [*seen, await ctx.wait_for_event("tick")]
        if len(seen) < 3:
            ctx.continue_as_new(seen, prune=prune)
        return seen

    with anyio.fail_after(LIMIT):
        async with Engine(store) as engine:
            run_id = await engine.start(flow, [])
            for payload in ("first", "second", "third"):
                await engine.raise_event(run_id, "tick", payload)
            record = await engine.wait(run_id, timeout=LIMIT)

    assert record.status == RunStatus.COMPLETED, record.error
    assert record.output == ["first", "second", "third"]
    assert record.current_execution_id == 3


# --- pruning -----------------------------------------------------------------------------------


async def test_prune_history_records_its_counts_and_is_not_redone_on_replay(
    store: WorkflowStore,
    define: Define,
    calls: Counter[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_prune = store.prune_executions

    async def counting_prune(run_id: str, options: PruneOptions) -> PruneResult:
        calls["store prune"] += 1
        return await real_prune(run_id, options)

    monkeypatch.setattr(store, "prune_executions", counting_prune)
    seen: list[dict[str, int]] = []

    @define()
    async def flow(ctx: WorkflowContext, n: int) -> dict[str, int]:
        if n < 3:
            ctx.continue_as_new(n + 1)
        result = await ctx.prune_history(PruneOptions(keep_last=2))
        seen.append(result.model_dump())
        await ctx.wait_for_event("go")
        return result.model_dump()

    with anyio.fail_after(LIMIT):
        run_id = await start_then_stop(store, flow, 0, until=has(EventKind.HISTORY_PRUNED))
        record = await resume_in_new_engine(store, run_id, ("go", None))

    assert record.status == RunStatus.COMPLETED, record.error
    # Executions 1 and 2 went, each with its run_started and continued_as_new events.
    counts = {"instances_processed": 1, "executions_deleted": 2, "events_deleted": 4}
    assert record.output == counts
    assert seen == [counts, counts]  # the replay returned the recorded counts...
    assert calls["store prune"] == 1  # ...without pruning again
    assert await execution_ids(store, run_id) == [3, 4]
    pruned = of_kind(await store.read_history(run_id), EventKind.HISTORY_PRUNED)
    assert len(pruned) == 1
    assert pruned[0].payload["result"] == counts


async def test_continue_as_new_with_prune_keeps_only_the_newest_executions(
    store: WorkflowStore, define: Define
) -> None:
    async def remember(run_id: str) -> None:
        await store.merge_context(run_id, {"kept": True})

    @define()
    async def flow(ctx: WorkflowContext, n: int) -> int:
        if n == 0:
            await ctx.step(remember, ctx.run_id)
        await ctx.step(lambda: n, name=f"visit-{n}")
        if n < 4:
            ctx.continue_as_new(n + 1, prune=PruneOptions(keep_last=2))
        return n

    with anyio.fail_after(LIMIT):
        record = await Engine(store).run(flow, 0)

    assert record.status == RunStatus.COMPLETED, record.error
    assert record.output == 4
    assert await execution_ids(store, record.run_id) == [4, 5]
    history = await store.read_history(record.run_id)
    assert [str(e.kind) for e in history[:2]] == ["run_started", "history_pruned"]
    # Execution 3 (run_started, history_pruned, step_completed, continued_as_new) went.
    assert history[1].payload["executions_deleted"] == 1
    assert history[1].payload["events_deleted"] == 4
    # The context bag stays; the step rows of the pruned executions go.
    assert record.context == {"kept": True}
    steps = await store.list_steps(record.run_id)
    assert sorted(step.name for step in steps) == ["visit-3", "visit-4"]
    assert {step.execution_id for step in steps} == {4, 5}


async def test_auto_prune_applies_on_every_continue_as_new(
    store: WorkflowStore, define: Define
) -> None:
    @define(auto_prune=PruneOptions(keep_last=2))
    async def flow(ctx: WorkflowContext, n: int) -> int:
        if n < 4:
            ctx.continue_as_new(n + 1)
        return n

    with anyio.fail_after(LIMIT):
        record = await Engine(store).run(flow, 0)

    assert record.status == RunStatus.COMPLETED, record.error
    assert await execution_ids(store, record.run_id) == [4, 5]
    for xid in (4, 5):
        history = await store.read_history(record.run_id, xid)
        assert history[1].kind == EventKind.HISTORY_PRUNED
        assert history[1].payload["executions_deleted"] == 1


async def test_engine_default_prune_applies_unless_the_workflow_has_its_own(
    store: WorkflowStore, define: Define
) -> None:
    async def body(ctx: WorkflowContext, n: int) -> int:
        if n < 4:
            ctx.continue_as_new(n + 1)
        return n

    async def explicit_body(ctx: WorkflowContext, n: int) -> int:
        if n < 4:
            ctx.continue_as_new(n + 1, prune=PruneOptions(keep_last=4))
        return n

    plain = define()(body)
    own = define(auto_prune=PruneOptions(keep_last=3))(body)
    explicit = define(auto_prune=PruneOptions(keep_last=3))(explicit_body)

    with anyio.fail_after(LIMIT):
        engine = Engine(store, default_prune=PruneOptions(keep_last=2))
        by_default = await engine.run(plain, 0)
        by_workflow = await engine.run(own, 0)
        by_call = await engine.run(explicit, 0)
        unpruned = await Engine(store).run(plain, 0)

    for record in (by_default, by_workflow, by_call, unpruned):
        assert record.status == RunStatus.COMPLETED, record.error
        assert record.output == 4
    assert await execution_ids(store, by_default.run_id) == [4, 5]
    assert await execution_ids(store, by_workflow.run_id) == [3, 4, 5]
    assert await execution_ids(store, by_call.run_id) == [2, 3, 4, 5]
    assert await execution_ids(store, unpruned.run_id) == [1, 2, 3, 4, 5]
    assert EventKind.HISTORY_PRUNED not in await kinds_of(store, unpruned.run_id)


@pytest.mark.parametrize("keep_last", [None, 0, 1])
async def test_keep_last_none_zero_and_one_keep_only_the_current_execution(
    store: WorkflowStore, define: Define, keep_last: int | None
) -> None:
    options = PruneOptions(keep_last=keep_last)

    @define()
    async def by_call(ctx: WorkflowContext, n: int) -> dict[str, Any]:
        if n < 3:
            ctx.continue_as_new(n + 1)
        result = await ctx.prune_history(options)
        return {"n": n, "deleted": result.executions_deleted}

    @define()
    async def on_continue(ctx: WorkflowContext, n: int) -> int:
        if n < 3:
            ctx.continue_as_new(n + 1, prune=options)
        return n

    with anyio.fail_after(LIMIT):
        engine = Engine(store)
        pruned_now = await engine.run(by_call, 0)
        pruned_on_continue = await engine.run(on_continue, 0)

    assert pruned_now.status == RunStatus.COMPLETED, pruned_now.error
    assert pruned_now.output == {"n": 3, "deleted": 3}
    assert pruned_on_continue.status == RunStatus.COMPLETED, pruned_on_continue.error
    assert pruned_on_continue.output == 3
    for record in (pruned_now, pruned_on_continue):
        # The current execution is never pruned: it is there, whole, and it finished.
        assert await execution_ids(store, record.run_id) == [4]
        kinds = await kinds_of(store, record.run_id)
        assert kinds[0] == "run_started"
        assert kinds[-1] == "run_completed"
        assert "history_pruned" in kinds


async def test_completed_before_prunes_only_executions_finished_before_it(
    store: WorkflowStore, define: Define
) -> None:
    @define()
    async def flow(ctx: WorkflowContext, state: dict[str, Any]) -> dict[str, int]:
        if state["n"] == 1:
            # ctx.now() here is when execution 1 ended; execution 2 ends 50 ms later.
            cutoff = ctx.now() + 1
            await ctx.sleep(0.05)
            ctx.continue_as_new({"n": 2, "cutoff": cutoff})
        if state["n"] == 0:
            ctx.continue_as_new({"n": 1})
        result = await ctx.prune_history(PruneOptions(completed_before=state["cutoff"]))
        return result.model_dump()

    with anyio.fail_after(LIMIT):
        record = await Engine(store).run(flow, {"n": 0})

    assert record.status == RunStatus.COMPLETED, record.error
    assert record.output["executions_deleted"] == 1
    assert await execution_ids(store, record.run_id) == [2, 3]


async def test_a_failed_prune_is_recorded_and_logged_but_the_run_completes(
    store: WorkflowStore,
    define: Define,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken_prune(run_id: str, options: PruneOptions) -> PruneResult:
        raise StepflowError("prune backend unavailable")

    monkeypatch.setattr(store, "prune_executions", broken_prune)

    @define()
    async def flow(ctx: WorkflowContext, n: int) -> dict[str, int]:
        if n < 1:
            ctx.continue_as_new(n + 1)
        result = await ctx.prune_history(PruneOptions(keep_last=1))
        return result.model_dump()

    with anyio.fail_after(LIMIT), caplog.at_level(logging.WARNING, logger="stepflow.durable"):
        record = await Engine(store).run(flow, 0)

    assert record.status == RunStatus.COMPLETED, record.error
    assert record.output["executions_deleted"] == 0
    assert await execution_ids(store, record.run_id) == [1, 2]  # nothing was deleted
    pruned = of_kind(await store.read_history(record.run_id), EventKind.HISTORY_PRUNED)
    assert len(pruned) == 1
    assert pruned[0].payload["error"]["type"] == "StepflowError"
    assert pruned[0].payload["error"]["message"] == "prune backend unavailable"
    assert "result" not in pruned[0].payload
    assert any(
        "prune backend unavailable" in r.getMessage() and record.run_id in r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING
    )


# --- determinism -------------------------------------------------------------------------------


async def test_now_uuid_and_random_are_the_same_on_replay(
    store: WorkflowStore, define: Define
) -> None:
    seen: list[dict[str, Any]] = []

    @define()
    async def flow(ctx: WorkflowContext, _: None) -> dict[str, Any]:
        values: dict[str, Any] = {"start": ctx.now(), "uuid": ctx.uuid()}
        await ctx.step(lambda: None, name="work")
        values["after step"] = ctx.now()
        values["random"] = ctx.random().random()
        values["uuid2"] = ctx.uuid()
        seen.append(dict(values))
        await ctx.wait_for_event("go")
        values["after event"] = ctx.now()
        return values

    with anyio.fail_after(LIMIT):
        run_id = await start_then_stop(store, flow, until=lambda _: len(seen) == 1)
        await anyio.sleep(0.05)  # the wall clock moves on meanwhile
        record = await resume_in_new_engine(store, run_id, ("go", None))

    assert record.status == RunStatus.COMPLETED, record.error
    assert len(seen) == 2
    assert seen[0] == seen[1]
    output = record.output
    assert {key: output[key] for key in seen[0]} == seen[0]
    assert output["start"] <= output["after step"] <= output["after event"]
    assert output["uuid"] != output["uuid2"]
    assert len(output["uuid"]) == 32
    history = await store.read_history(run_id)
    assert output["start"] == history[0].timestamp  # the clock comes from the history

    # Another run gets other values.
    with anyio.fail_after(LIMIT):
        async with Engine(store) as engine:
            other = await engine.start(flow)
            await engine.raise_event(other, "go", None)
            other_record = await engine.wait(other, timeout=LIMIT)
    assert other_record.output["uuid"] != output["uuid"]
    assert other_record.output["random"] != output["random"]


async def test_now_after_a_caught_step_failure_is_the_same_on_replay(
    store: WorkflowStore, define: Define
) -> None:
    seen: list[int] = []

    def fail() -> None:
        raise RuntimeError("no")

    @define()
    async def flow(ctx: WorkflowContext, _: None) -> int:
        with contextlib.suppress(StepFailedError):
            await ctx.step(fail)
        seen.append(ctx.now())
        await ctx.wait_for_event("go")
        return ctx.now()

    with anyio.fail_after(LIMIT):
        run_id = await start_then_stop(store, flow, until=lambda _: len(seen) == 1)
        record = await resume_in_new_engine(store, run_id, ("go", None))

    assert record.status == RunStatus.COMPLETED, record.error
    assert len(seen) == 2
    assert seen[0] == seen[1]
    failed = of_kind(await store.read_history(run_id), EventKind.STEP_FAILED)
    assert seen[0] == failed[0].timestamp


# --- nondeterminism ----------------------------------------------------------------------------


async def test_a_changed_code_path_fails_the_run_with_non_determinism_error(
    store: WorkflowStore, define: Define, calls: Counter[str], code_version: dict[str, bool]
) -> None:
    def reserve_seat() -> str:
        calls["reserve_seat"] += 1
        return "seat"

    def charge_card() -> str:
        calls["charge_card"] += 1
        return "charged"

    @define()
    async def flow(ctx: WorkflowContext, _: None) -> Any:
        if CODE_VERSION["new"]:
            await ctx.step(charge_card)
        else:
            await ctx.step(reserve_seat)
        return await ctx.wait_for_event("go")

    with anyio.fail_after(LIMIT):
        run_id = await start_then_stop(store, flow, until=has(EventKind.STEP_COMPLETED))
        code_version["new"] = True
        record = await resume_in_new_engine(store, run_id, ("go", None))

    assert record.status == RunStatus.FAILED
    assert record.error["type"] == "NonDeterminismError"
    assert "reserve_seat" in record.error["message"]
    assert "charge_card" in record.error["message"]
    assert calls == {"reserve_seat": 1}  # the new code's step never ran


async def test_non_determinism_caught_by_the_workflow_still_fails_the_run(
    store: WorkflowStore, define: Define, calls: Counter[str], code_version: dict[str, bool]
) -> None:
    def step_a() -> str:
        return "a"

    def step_b() -> str:
        calls["step_b"] += 1
        return "b"

    def side_effect() -> None:
        calls["side_effect"] += 1

    @define()
    async def flow(ctx: WorkflowContext, _: None) -> str:
        with contextlib.suppress(Exception):  # too broad, as real code often is
            await ctx.step(step_b if CODE_VERSION["new"] else step_a)
        with contextlib.suppress(Exception):
            await ctx.step(side_effect)
        return str(await ctx.wait_for_event("go"))

    with anyio.fail_after(LIMIT):
        run_id = await start_then_stop(store, flow, until=has(EventKind.STEP_COMPLETED, 2))
        assert calls == {"side_effect": 1}
        code_version["new"] = True
        record = await resume_in_new_engine(store, run_id, ("go", None))

    assert record.status == RunStatus.FAILED
    assert record.error["type"] == "NonDeterminismError"
    assert "step_a" in record.error["message"]
    assert "step_b" in record.error["message"]
    assert calls == {"side_effect": 1}


async def test_a_workflow_that_ends_before_its_recorded_commands_fails(
    store: WorkflowStore, define: Define, code_version: dict[str, bool]
) -> None:
    @define()
    async def flow(ctx: WorkflowContext, _: None) -> str:
        if CODE_VERSION["new"]:
            return "skipped the work"
        await ctx.step(lambda: 1, name="work")
        return str(await ctx.wait_for_event("go"))

    with anyio.fail_after(LIMIT):
        run_id = await start_then_stop(store, flow, until=has(EventKind.STEP_COMPLETED))
        code_version["new"] = True
        record = await resume_in_new_engine(store, run_id, ("go", None))

    assert record.status == RunStatus.FAILED
    assert record.output is None
    assert record.error["type"] == "NonDeterminismError"
    assert "'work'" in record.error["message"]


@pytest.mark.parametrize("workflow_catches", [False, True])
async def test_a_store_failure_under_a_step_leaves_the_run_for_a_resume(
    store: WorkflowStore, workflow_catches: bool
) -> None:
    """Not recorded as the workflow's failure (or its output, if it caught the error).

    The store is back by the time the runner would record the end, so a
    recorded failure would be final; the run is left running instead, and
    running it again by id replays it: only the step whose completion was
    lost runs again.
    """
    calls: Counter[int] = Counter()

    async def work(i: int) -> int:
        calls[i] += 1
        return i

    @stepflow.workflow(name=f"blip-{uuid.uuid4().hex[:8]}")
    async def total(ctx: WorkflowContext, n: int) -> int:
        done = 0
        for i in range(n):
            try:
                done += await ctx.step(work, i, name=f"w{i}")
            except StoreDown:
                if not workflow_catches:
                    raise
                return -1  # a workflow that swallows the error and ends early
        return done

    run_id = f"blip-{uuid.uuid4().hex[:8]}"
    flaky = cast(WorkflowStore, FailingCompletions(store, nth_calls(lambda call: call == 2)))
    with anyio.fail_after(LIMIT), pytest.raises(StoreDown):
        await Engine(flaky, lease_ms=60).run(total, 5, run_id=run_id)
    stored = await store.get_run(run_id)
    assert stored is not None
    assert stored.status == RunStatus.RUNNING

    with anyio.fail_after(LIMIT):
        record = await Engine(store, lease_ms=60).run(total, 5, run_id=run_id)
    assert (record.status, record.output) == (RunStatus.COMPLETED, 10)
    assert calls == Counter({0: 1, 1: 1, 2: 2, 3: 1, 4: 1})


async def test_a_failed_lease_renewal_does_not_stop_a_durable_run(store: WorkflowStore) -> None:
    """Only the store's failures under the workflow's own calls leave the run for a resume."""

    runs: list[str] = []

    async def slow() -> str:
        runs.append("slow")
        await anyio.sleep(0.2)  # several renewals of a 60 ms lease
        return "done"

    @stepflow.workflow(name=f"renewal-blip-{uuid.uuid4().hex[:8]}")
    async def flow(ctx: WorkflowContext, _: None) -> str:
        return str(await ctx.step(slow))

    flaky = FailingRenewals(store, failures=1)
    with anyio.fail_after(LIMIT):
        record = await Engine(cast(WorkflowStore, flaky), lease_ms=60).run(flow)
    assert flaky.failures == 0  # the one renewal failure happened
    assert (record.status, record.output) == (RunStatus.COMPLETED, "done")
    assert runs == ["slow"]  # the blip did not end the attempt: the step ran once


async def _noop() -> int:
    return 1


BAD_CTX_CALLS: dict[str, tuple[Callable[[WorkflowContext], Awaitable[Any]], str, str]] = {
    "sleep -1": (lambda ctx: ctx.sleep(-1), "InvalidArgumentError", "ctx.sleep seconds"),
    "sleep nan": (lambda ctx: ctx.sleep(math.nan), "InvalidArgumentError", "finite"),
    "sleep text": (lambda ctx: ctx.sleep("5"), "InvalidArgumentError", "number of seconds"),
    "step timeout": (lambda ctx: ctx.step(_noop, timeout=-1), "DefinitionError", "timeout"),
    "step retries and retry": (
        lambda ctx: ctx.step(_noop, retries=3, retry=RetryPolicy(retries=1)),
        "DefinitionError",
        "not both",
    ),
    "step name": (lambda ctx: ctx.step(_noop, name=5), "InvalidArgumentError", "name"),
    "step not callable": (lambda ctx: ctx.step("fn"), "InvalidArgumentError", "function"),
    "wait timeout": (
        lambda ctx: ctx.wait_for_event("go", timeout=-1),
        "InvalidArgumentError",
        "timeout",
    ),
    "wait name": (lambda ctx: ctx.wait_for_event(""), "InvalidArgumentError", "event name"),
    "prune dict": (
        lambda ctx: ctx.prune_history({"keep_last": 1}),
        "InvalidArgumentError",
        "PruneOptions",
    ),
}


@pytest.mark.parametrize("call", list(BAD_CTX_CALLS))
async def test_a_bad_argument_to_a_ctx_call_fails_the_run_and_records_nothing(
    store: WorkflowStore, call: str
) -> None:
    """Raised before any store call: the workflow's own failure, recorded as such,
    with nothing of the call in the history (a resume would fail the same way)."""
    make_call, error_type, mentions = BAD_CTX_CALLS[call]

    @stepflow.workflow(name=f"bad-call-{uuid.uuid4().hex[:8]}")
    async def flow(ctx: WorkflowContext, _: None) -> None:
        await make_call(ctx)

    with anyio.fail_after(LIMIT):
        record = await Engine(store).run(flow)
    assert record.status == RunStatus.FAILED
    assert record.error is not None
    assert record.error["type"] == error_type
    assert mentions in record.error["message"]
    kinds = [event.kind for event in await store.read_history(record.run_id)]
    assert kinds == [EventKind.RUN_STARTED, EventKind.RUN_FAILED]


async def test_continue_as_new_with_prune_options_that_are_not_a_record_fails_the_run(
    store: WorkflowStore,
) -> None:
    @stepflow.workflow(name=f"bad-continue-{uuid.uuid4().hex[:8]}")
    async def flow(ctx: WorkflowContext, n: int | None) -> None:
        ctx.continue_as_new(1, prune={"keep_last": 1})  # type: ignore[arg-type]

    with anyio.fail_after(LIMIT):
        record = await Engine(store).run(flow)
    assert record.status == RunStatus.FAILED
    assert record.error is not None
    assert "PruneOptions" in record.error["message"]
    assert [info.execution_id for info in await store.list_executions(record.run_id)] == [1]


async def test_continue_as_new_goes_on_under_a_stream_of_raised_events(
    store: WorkflowStore, define: Define
) -> None:
    """Events raised all the while are carried along: none is lost, and none holds it off."""

    @define()
    async def rounds(ctx: WorkflowContext, n: int | None) -> int:
        n = n or 0
        if n < 5:
            await ctx.sleep(0.01)
            ctx.continue_as_new(n + 1)
        return n

    raised = 0
    async with Engine(store) as engine:
        run_id = await engine.start(rounds)

        async def noise() -> None:
            nonlocal raised
            while True:
                try:
                    await engine.raise_event(run_id, "noise", raised)
                except ConflictError:  # the run finished: it takes no more
                    return
                raised += 1
                await anyio.lowlevel.checkpoint()  # let the others in (memory never waits)

        with anyio.fail_after(LIMIT):
            async with anyio.create_task_group() as tg:
                for _ in range(8):
                    tg.start_soon(noise)
                run = await engine.wait(run_id)

    assert run.status == RunStatus.COMPLETED
    assert run.output == 5
    kept = [e for e in await store.read_history(run_id) if e.kind == EventKind.EVENT_RAISED]
    assert len(kept) == raised  # every event raised, carried into the last execution
