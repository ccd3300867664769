"""One run driven by two engines at once: another process resumed it while its driver still ran.

Nothing stops that (there is no run-level ownership), so it must end well:
a completed step is not run again, the second driver follows the first
step by step instead of waiting out each lease it finds held, the run is
finished once, and a durable run records each command once, both drivers
following the record made first (a store wrapper stands for the other
driver where the race needs exact timing). The leases here are ten minutes
long: a driver that waited one out would fail the test's time limit. Also
here: the same mechanisms met by one driver (an event raised as it records
a command; a step held by an owner that died).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, cast

import anyio
import pytest
from conftest import PassThroughStore

import stepflow
from stepflow import (
    Engine,
    Event,
    EventKind,
    EventTimeoutError,
    NewEvent,
    PruneOptions,
    RunRecord,
    RunStatus,
    StepContext,
    StepFailedError,
    StepStatus,
    Workflow,
    WorkflowContext,
    WorkflowStore,
)

pytestmark = pytest.mark.anyio

LEASE_MS = 600_000
LIMIT = 15.0
STEP_SECONDS = 0.2
DEAD_LEASE_MS = 1_500


async def driven_twice(
    store: WorkflowStore,
    definition: Any,
    in_flight: anyio.Event,
    *,
    meanwhile: Callable[[Engine, str], Awaitable[None]] | None = None,
    lease_ms: int = LEASE_MS,
    second_store: WorkflowStore | None = None,
) -> tuple[str, RunRecord, RunRecord]:
    """Start ``definition`` on one engine; once ``in_flight`` is set, resume it on another.

    ``meanwhile(first, run_id)`` runs once both drive it; the second engine
    uses ``second_store`` if given. Returns the run id and the run as each
    engine's `wait` returned it.
    """
    with anyio.fail_after(LIMIT):
        async with (
            Engine(store, lease_ms=lease_ms, owner="first") as first,
            Engine(second_store or store, lease_ms=lease_ms, owner="second") as second,
        ):
            run_id = await first.start(definition)
            await in_flight.wait()
            await second.resume(run_id)
            if meanwhile is not None:
                await meanwhile(first, run_id)
            return run_id, await first.wait(run_id), await second.wait(run_id)


def counted_work(
    ran: Counter[int], in_flight: anyio.Event, *, scale: int = 1
) -> Callable[[int], Awaitable[int]]:
    """A durable step ``work(n)``: counted per ``n``, setting ``in_flight``, a while long."""

    async def work(n: int) -> int:
        ran[n] += 1
        in_flight.set()
        await anyio.sleep(STEP_SECONDS)
        return n * scale

    return work


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
    work = counted_work(ran, in_flight, scale=10)

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
    """The command is recorded after the news, and the event raised is kept for the wait."""
    raised = NewEvent(kind=EventKind.EVENT_RAISED, payload={"name": "go", "payload": "early"})

    @stepflow.workflow(names("durable"))
    async def flow(ctx: WorkflowContext, _: Any) -> Any:
        await ctx.sleep(0.01)
        return await ctx.wait_for_event("go")

    with anyio.fail_after(LIMIT):
        racing = OtherDriverFirst(store, EventKind.TIMER_CREATED, raised)  # raised just before
        run = await Engine(cast(WorkflowStore, racing)).run(flow)

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


class CountingCalls(PassThroughStore):
    """Counts the calls of the store methods named in ``counted``."""

    def __init__(self, inner: WorkflowStore, *counted: str) -> None:
        super().__init__(inner)
        self.calls: Counter[str] = Counter()
        for name in counted:
            setattr(self, name, self._counting(name))

    def _counting(self, name: str) -> Callable[..., Any]:
        method = getattr(self.inner, name)

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return await method(*args, **kwargs)

        return counted


async def test_a_step_held_by_an_owner_that_died_is_claimed_again_at_most_once_a_second(
    store: WorkflowStore, names: Callable[[str], str]
) -> None:
    """Waiting out a dead owner's lease polls the step, not the store's clock too."""
    flow = Workflow(names("dag"))

    @flow.step()
    async def only(ctx: StepContext) -> dict[str, int]:
        return {"done": 1}

    run_id = "held-by-the-dead"
    await store.create_run(
        RunRecord(run_id=run_id, workflow=flow.name, version=flow.version, status=RunStatus.RUNNING)
    )
    await store.claim_step(run_id, "only", name="only", owner="died", lease_ms=DEAD_LEASE_MS)
    counting = CountingCalls(store, "claim_step", "time_ms")

    with anyio.fail_after(LIMIT):
        async with Engine(cast(WorkflowStore, counting)) as engine:
            await engine.resume(run_id)
            run = await engine.wait(run_id)

    assert run.status == RunStatus.COMPLETED
    assert counting.calls["time_ms"] == 1
    # 1.5 s of pauses from 50 ms, doubling up to a second: about six claims, none more often.
    assert 2 <= counting.calls["claim_step"] <= 9


class OtherDriverFirst(PassThroughStore):
    """Stands for another driver of the run: just before this driver's first append of
    ``kind`` reaches the store, the other driver's ``events`` are appended."""

    def __init__(self, inner: WorkflowStore, kind: EventKind, *events: NewEvent) -> None:
        super().__init__(inner)
        self.kind = kind
        self.events = list(events)

    async def append_event(self, run_id: str, event: NewEvent, **options: Any) -> Event:
        if event.kind == self.kind:
            theirs, self.events = self.events, []
            for first in theirs:
                await self.inner.append_event(run_id, first, execution_id=options["execution_id"])
        appended: Event = await self.inner.append_event(run_id, event, **options)
        return appended


async def test_a_wait_for_an_event_follows_the_end_another_driver_recorded_first(
    store: WorkflowStore, names: Callable[[str], str]
) -> None:
    """The other driver's wait timed out as this one took the event: both follow the timeout."""
    tags = {"seq": 1, "command": "event", "name": "go"}
    timed_out = NewEvent(kind=EventKind.TIMER_FIRED, payload={**tags, "timed_out": True})

    @stepflow.workflow(names("durable"))
    async def flow(ctx: WorkflowContext, _: Any) -> str:
        try:
            return f"got {await ctx.wait_for_event('go', timeout=LIMIT * 2)}"
        except EventTimeoutError:
            return "timed out"

    racing = OtherDriverFirst(store, EventKind.EVENT_RECEIVED, timed_out)
    async with Engine(cast(WorkflowStore, racing)) as engine:
        run_id = await engine.start(flow)
        await engine.raise_event(run_id, "go", "early")
        with anyio.fail_after(LIMIT):
            run = await engine.wait(run_id)

    assert run.status == RunStatus.COMPLETED
    assert run.output == "timed out"
    ends = [e.kind for e in await store.read_history(run_id) if e.payload and "seq" in e.payload]
    assert ends == [EventKind.TIMER_CREATED, EventKind.TIMER_FIRED]


async def test_a_step_another_driver_completed_as_another_step_is_a_divergence(
    store: WorkflowStore, names: Callable[[str], str]
) -> None:
    """Two drivers running different code: one's result is never taken for the other's step."""

    class OtherStepFirst(PassThroughStore):
        """Another driver, running other code, completes the first step as ``other``."""

        done = False

        async def claim_step(self, run_id: str, step_id: str, **options: Any) -> Any:
            if not self.done:
                self.done = True
                lease = await self.inner.claim_step(
                    run_id, step_id, **{**options, "name": "other", "owner": "other-code"}
                )
                recorded = {"seq": 1, "command": "step", "name": "other", "attempt": 1}
                await self.inner.complete_step(
                    lease,
                    output="theirs",
                    event=NewEvent(
                        kind=EventKind.STEP_COMPLETED, payload={**recorded, "output": "theirs"}
                    ),
                )
            return await self.inner.claim_step(run_id, step_id, **options)

    async def mine() -> str:
        return "mine"

    @stepflow.workflow(names("durable"))
    async def flow(ctx: WorkflowContext, _: Any) -> str:
        return str(await ctx.step(mine))

    with anyio.fail_after(LIMIT):
        run = await Engine(cast(WorkflowStore, OtherStepFirst(store))).run(flow)

    assert run.status == RunStatus.FAILED
    assert run.error is not None
    assert run.error["type"] == "NonDeterminismError"


SLEEP_TAGS = {"seq": 1, "command": "sleep", "name": "sleep"}


async def test_a_timer_another_driver_fired_first_is_taken_with_its_time(
    store: WorkflowStore, names: Callable[[str], str]
) -> None:
    """ctx.now() after the sleep is the recorded firing, as in the other driver and a replay."""
    fired = NewEvent(kind=EventKind.TIMER_FIRED, payload=SLEEP_TAGS)

    @stepflow.workflow(names("durable"))
    async def flow(ctx: WorkflowContext, _: Any) -> int:
        await anyio.sleep(0.05)  # the run started in another millisecond than the timer fires
        await ctx.sleep(0.01)
        return ctx.now()

    racing = OtherDriverFirst(store, EventKind.TIMER_FIRED, fired)
    with anyio.fail_after(LIMIT):
        run = await Engine(cast(WorkflowStore, racing)).run(flow)

    history = await store.read_history(run.run_id)
    [recorded] = [e for e in history if e.kind == EventKind.TIMER_FIRED]
    assert run.output == recorded.timestamp


async def test_a_whole_sleep_another_driver_recorded_first_is_not_recorded_again(
    store: WorkflowStore, names: Callable[[str], str]
) -> None:
    """Having taken the other driver's timer, this one finds its firing already read."""
    created = NewEvent(kind=EventKind.TIMER_CREATED, payload={**SLEEP_TAGS, "seconds": 0.01})
    fired = NewEvent(kind=EventKind.TIMER_FIRED, payload=SLEEP_TAGS)

    @stepflow.workflow(names("durable"))
    async def flow(ctx: WorkflowContext, _: Any) -> str:
        await ctx.sleep(0.01)
        return "slept"

    racing = OtherDriverFirst(store, EventKind.TIMER_CREATED, created, fired)
    with anyio.fail_after(LIMIT):
        run = await Engine(cast(WorkflowStore, racing)).run(flow)

    assert run.output == "slept"
    kinds = [e.kind for e in await store.read_history(run.run_id)]
    assert kinds == [
        EventKind.RUN_STARTED,
        EventKind.TIMER_CREATED,
        EventKind.TIMER_FIRED,
        EventKind.RUN_COMPLETED,
    ]


async def test_a_prune_another_driver_recorded_first_returns_its_result(
    store: WorkflowStore, names: Callable[[str], str]
) -> None:
    theirs = {"instances_processed": 1, "executions_deleted": 7, "events_deleted": 70}
    pruned = NewEvent(
        kind=EventKind.HISTORY_PRUNED,
        payload={"seq": 1, "command": "prune", "name": "prune_history", "result": theirs},
    )

    @stepflow.workflow(names("durable"))
    async def flow(ctx: WorkflowContext, _: Any) -> int:
        result = await ctx.prune_history(PruneOptions(keep_last=1))
        return result.executions_deleted

    racing = OtherDriverFirst(store, EventKind.HISTORY_PRUNED, pruned)
    with anyio.fail_after(LIMIT):
        run = await Engine(cast(WorkflowStore, racing)).run(flow)

    assert run.output == 7
    kinds = [e.kind for e in await store.read_history(run.run_id)]
    assert kinds.count(EventKind.HISTORY_PRUNED) == 1


async def test_two_drivers_waiting_for_events_take_each_event_once_and_alike(
    store: WorkflowStore, names: Callable[[str], str]
) -> None:
    """Both drivers wait; each raised event ends one wait, the same one in both, at one time."""
    waiting = anyio.Event()
    seen_by_driver: list[tuple[list[str], int]] = []

    @stepflow.workflow(names("durable"))
    async def flow(ctx: WorkflowContext, _: Any) -> list[str]:
        waiting.set()
        seen = [await ctx.wait_for_event("go"), await ctx.wait_for_event("go")]
        seen_by_driver.append((seen, ctx.now()))
        return seen

    async def raise_two(first: Engine, run_id: str) -> None:
        await anyio.sleep(0.3)  # both waiting
        await first.raise_event(run_id, "go", "one")
        await anyio.sleep(0.3)
        await first.raise_event(run_id, "go", "two")

    run_id, by_first, by_second = await driven_twice(store, flow, waiting, meanwhile=raise_two)

    assert by_first.output == by_second.output == ["one", "two"]
    received = [e for e in await store.read_history(run_id) if e.kind == EventKind.EVENT_RECEIVED]
    assert [e.payload["seq"] for e in received] == [1, 2]
    taken_at = received[-1].timestamp  # ctx.now() after the waits, in a replay too
    assert seen_by_driver == [(["one", "two"], taken_at), (["one", "two"], taken_at)]


async def test_two_drivers_of_a_run_that_continues_as_new_both_follow_it(
    store: WorkflowStore, names: Callable[[str], str], caplog: pytest.LogCaptureFixture
) -> None:
    """One continues the run; the other, refused, drives on in the new execution."""
    ran: Counter[int] = Counter()
    in_flight = anyio.Event()
    work = counted_work(ran, in_flight)

    @stepflow.workflow(names("durable"))
    async def rounds(ctx: WorkflowContext, round_: int | None) -> int:
        done = await ctx.step(work, round_ or 0)
        if done < 1:
            ctx.continue_as_new(done + 1)
        return done

    with caplog.at_level(logging.ERROR, logger="stepflow"):
        run_id, by_first, by_second = await driven_twice(store, rounds, in_flight)

    assert by_first.status == by_second.status == RunStatus.COMPLETED
    assert by_second.output == 1
    assert ran == {0: 1, 1: 1}
    executions = await store.list_executions(run_id)
    assert [x.status for x in executions] == [RunStatus.CONTINUED_AS_NEW, RunStatus.COMPLETED]
    assert not caplog.records  # neither driver stopped on an error


async def test_a_durable_step_one_driver_failed_is_failed_in_the_other_too(
    store: WorkflowStore, names: Callable[[str], str]
) -> None:
    """As on replay: the recorded failure stands, the other driver does not run the step again."""
    calls: Counter[str] = Counter()
    in_flight = anyio.Event()
    branches: list[str] = []

    async def charge() -> str:
        calls["charge"] += 1
        in_flight.set()
        await anyio.sleep(STEP_SECONDS)
        if calls["charge"] == 1:
            raise RuntimeError("card declined")
        return "charged"

    async def refund() -> str:
        calls["refund"] += 1
        return "refunded"

    @stepflow.workflow(names("durable"))
    async def order(ctx: WorkflowContext, _: Any) -> str:
        try:
            await ctx.step(charge)
        except StepFailedError:
            branches.append("failed")
            return str(await ctx.step(refund))
        branches.append("charged")
        return "shipped"

    run_id, by_first, by_second = await driven_twice(store, order, in_flight)

    assert by_first.output == by_second.output == "refunded"
    assert branches == ["failed", "failed"]
    assert calls == {"charge": 1, "refund": 1}
    history = await store.read_history(run_id)
    assert [(e.kind, e.payload["seq"]) for e in history if e.payload and "seq" in e.payload] == [
        (EventKind.STEP_FAILED, 1),
        (EventKind.STEP_COMPLETED, 2),
    ]


async def test_two_waits_of_one_workflow_at_once_are_refused(
    store: WorkflowStore, names: Callable[[str], str]
) -> None:
    """Commands side by side would be numbered otherwise on a replay (a recorded one
    returns at once), so they are refused on the first run: the run fails clearly
    rather than take another command's result after a restart."""

    @stepflow.workflow(names("durable"))
    async def flow(ctx: WorkflowContext, _: Any) -> list[Any]:
        got: list[Any] = []

        async def wait() -> None:
            got.append(await ctx.wait_for_event("go", timeout=1.0))

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            tg.start_soon(wait)
        return got

    with anyio.fail_after(LIMIT):
        run = await Engine(store).run(flow)

    assert run.status == RunStatus.FAILED
    assert run.error is not None
    assert "one at a time" in run.error["message"]
    kinds = [e.kind for e in await store.read_history(run.run_id)]
    assert EventKind.EVENT_RECEIVED not in kinds


class HeldUpRefresh(PassThroughStore):
    """Once ``armed``, the next read of news (``read_history(after_event_id=)``) is held up:
    for ``seconds``, or until the test ends (None)."""

    def __init__(self, inner: WorkflowStore, seconds: float | None) -> None:
        super().__init__(inner)
        self.seconds = seconds
        self.armed = False
        self.entered = anyio.Event()

    async def read_history(self, run_id: str, *args: Any, **kwargs: Any) -> Any:
        if self.armed and kwargs.get("after_event_id"):
            self.armed = False
            self.entered.set()
            await (anyio.sleep_forever() if self.seconds is None else anyio.sleep(self.seconds))
        return await self.inner.read_history(run_id, *args, **kwargs)


async def test_a_shutdown_while_a_retry_looks_for_a_recorded_failure_hands_its_lease_back(
    store: WorkflowStore, names: Callable[[str], str]
) -> None:
    """A retry's claim reads the history first; stopped there, the step is not left held."""
    held_up = HeldUpRefresh(store, seconds=None)
    calls: Counter[str] = Counter()

    def flaky() -> str:
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            held_up.armed = True  # the retry's look at the history never returns
            raise RuntimeError("first try fails")
        return "ok"

    @stepflow.workflow(names("durable"))
    async def flow(ctx: WorkflowContext, _: Any) -> str:
        return str(await ctx.step(flaky, retries=1))

    with anyio.fail_after(LIMIT):
        async with Engine(cast(WorkflowStore, held_up), lease_ms=LEASE_MS) as first:
            run_id = await first.start(flow)
            await held_up.entered.wait()
        [step] = await store.list_steps(run_id)
        assert step.status == StepStatus.PENDING  # handed back, as an interrupted attempt
        async with Engine(store, lease_ms=LEASE_MS) as second:
            await second.resume(run_id)
            run = await second.wait(run_id)

    assert run.status == RunStatus.COMPLETED
    assert calls["flaky"] == 2


async def test_a_recorded_failure_taken_after_the_lease_lapsed_is_still_a_step_failure(
    store: WorkflowStore, names: Callable[[str], str]
) -> None:
    """The second driver's look at the history outlasts its lease: the failure still stands."""
    in_flight = anyio.Event()
    held_up = HeldUpRefresh(store, seconds=0.8)
    branches: list[str] = []

    async def charge() -> str:
        in_flight.set()
        await anyio.sleep(STEP_SECONDS)
        held_up.armed = True  # the second driver's next look, at its claim, outlasts the lease
        raise RuntimeError("card declined")

    @stepflow.workflow(names("durable"))
    async def order(ctx: WorkflowContext, _: Any) -> str:
        try:
            await ctx.step(charge)
        except StepFailedError:
            branches.append("failed")
            return "failed"
        branches.append("charged")
        return "charged"

    run_id, _, _ = await driven_twice(
        store, order, in_flight, lease_ms=300, second_store=cast(WorkflowStore, held_up)
    )

    assert branches == ["failed", "failed"]
    [step] = await store.list_steps(run_id)
    assert step.status == StepStatus.FAILED
