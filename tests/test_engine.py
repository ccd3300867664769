"""Engine behaviour on every store: DAG order, context, concurrency, retries, cancel, resume."""

from __future__ import annotations

import asyncio
import math
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, cast

import anyio
import anyio.lowlevel
import pydantic
import pytest
from conftest import (
    FailingCompletions,
    FailingRenewals,
    GetRunFailsOnceArmed,
    PassThroughStore,
    StoreDown,
    cancelled_elsewhere,
    make_store,
    nth_calls,
)

import stepflow
from stepflow import (
    ConflictError,
    CycleError,
    DefinitionError,
    DuplicateStepError,
    Engine,
    EventKind,
    InputValidationError,
    InvalidArgumentError,
    InvalidPayloadError,
    InvalidRunIdError,
    Lease,
    MemoryStore,
    NewEvent,
    RedisStore,
    RetryPolicy,
    RunNotFoundError,
    RunStatus,
    StepContext,
    StepflowError,
    StepStatus,
    StoreError,
    UnknownDependencyError,
    WaitTimeoutError,
    Workflow,
    WorkflowNotFoundError,
    WorkflowStore,
    registry,
)
from stepflow._json import MIN_PAYLOAD_BYTES
from stepflow.engine.attempts import (
    LeaseKeeper,
    RunCancelledElsewhere,
    StepCall,
    execute_step,
    with_lease_keeper,
)

# Marked here, not only by conftest's late hook: anyio then keeps the ``store`` parametrisation.
pytestmark = pytest.mark.anyio

LIMIT = 5.0
"""Seconds any one test may take before it is failed rather than hung."""

CALLS: Counter[tuple[str, str]] = Counter()
"""(workflow, step) -> times the step function was entered; survives engines."""

NewFlow = Callable[..., Workflow]


@pytest.fixture
def new_flow() -> Iterator[NewFlow]:
    """Make workflows with unique names; unregister them after the test."""
    created: list[str] = []

    def make(**kwargs: Any) -> Workflow:
        flow = Workflow(f"wf-{uuid.uuid4().hex[:12]}", **kwargs)
        created.append(flow.name)
        return flow

    yield make
    for name in created:
        registry.unregister(name)


def count(ctx: StepContext, flow: Workflow) -> int:
    """Record one entry of the current step; returns how often it was entered so far."""
    CALLS[flow.name, ctx.step_id] += 1
    return CALLS[flow.name, ctx.step_id]


async def steps_by_name(store: WorkflowStore, run_id: str) -> dict[str, stepflow.StepState]:
    return {step.step_id: step for step in await store.list_steps(run_id)}


async def history_kinds(store: WorkflowStore, run_id: str) -> list[EventKind]:
    return [event.kind for event in await store.read_history(run_id)]


async def eventually(check: Callable[[], Any], what: str) -> None:
    """Poll ``check`` (sync or async) until it is truthy."""
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        result = check()
        if hasattr(result, "__await__"):
            result = await result
        if result:
            return
        await anyio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


# --- DAG order and the context bag --------------------------------------------------------


async def test_diamond_merges_context_and_records_history(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    flow = new_flow()
    seen: dict[str, dict[str, Any]] = {}

    @flow.step()
    async def root(ctx: StepContext) -> dict[str, Any]:
        seen["root"] = dict(ctx.context)
        return {"n": ctx.input["n"], "shared": "root"}

    @flow.step(after=[root])
    async def left(ctx: StepContext) -> dict[str, Any]:
        seen["left"] = dict(ctx.context)
        return {"left": ctx.context["n"] + 1}

    @flow.step(after=[root])
    def right(ctx: StepContext) -> dict[str, Any]:
        seen["right"] = dict(ctx.context)
        return {"right": ctx.context["n"] * 10, "shared": "right"}

    @flow.step(after=[left, right])
    async def join(ctx: StepContext) -> dict[str, Any]:
        seen["join"] = dict(ctx.context)
        return {"total": ctx.context["left"] + ctx.context["right"]}

    @flow.step(after=[root])
    async def note(ctx: StepContext) -> str:
        return "not a mapping"

    with anyio.fail_after(LIMIT):
        record = await Engine(store).run(flow, {"n": 2})

    assert record.status == RunStatus.COMPLETED
    assert record.error is None
    assert record.completed_at is not None
    assert seen["root"] == {}
    # A step sees the bag as it is when its attempt starts: its dependencies' keys at least.
    for branch in ("left", "right"):
        assert seen[branch].items() >= {"n": 2, "shared": "root"}.items()
        assert branch not in seen[branch]
    assert seen["join"] == {"n": 2, "shared": "right", "left": 3, "right": 20}
    bag = {"n": 2, "shared": "right", "left": 3, "right": 20, "total": 23}
    assert record.context == bag
    # The run output is the outputs of the sink steps, by name.
    assert record.output == {"join": {"total": 23}, "note": "not a mapping"}

    stored = await store.get_run(record.run_id)
    assert stored is not None
    assert stored.status == RunStatus.COMPLETED
    assert stored.context == bag
    assert stored.output == record.output
    assert stored.input == {"n": 2}

    steps = await steps_by_name(store, record.run_id)
    assert set(steps) == {"root", "left", "right", "join", "note"}
    assert all(step.status == StepStatus.COMPLETED for step in steps.values())
    assert all(step.attempt == 1 for step in steps.values())
    assert steps["left"].output == {"left": 3}
    assert steps["note"].output == "not a mapping"

    events = await store.read_history(record.run_id)
    assert [event.event_id for event in events] == list(range(1, len(events) + 1))
    kinds = [event.kind for event in events]
    assert kinds == [
        EventKind.RUN_STARTED,
        *[EventKind.STEP_COMPLETED] * 5,
        EventKind.RUN_COMPLETED,
    ]
    order = [event.payload["step"] for event in events[1:-1]]
    assert order[0] == "root"
    assert order.index("join") > max(order.index("left"), order.index("right"))


async def test_steps_see_run_input_and_identity(store: WorkflowStore, new_flow: NewFlow) -> None:
    flow = new_flow()
    seen: list[StepContext] = []

    @flow.step()
    async def only(ctx: StepContext) -> None:
        seen.append(ctx)

    with anyio.fail_after(LIMIT):
        record = await Engine(store).run(flow, ["a", 1], run_id="my-run.1")

    assert record.run_id == "my-run.1"
    assert record.output == {"only": None}
    (ctx,) = seen
    assert (ctx.run_id, ctx.step_id, ctx.attempt, ctx.input) == ("my-run.1", "only", 1, ["a", 1])
    with pytest.raises(TypeError):
        ctx.context["x"] = 1  # type: ignore[index]


# --- concurrency ---------------------------------------------------------------------------


def _two_branches(flow: Workflow, spans: dict[str, tuple[float, float]]) -> None:
    @flow.step()
    async def root(ctx: StepContext) -> None:
        return None

    async def branch(ctx: StepContext) -> None:
        start = time.monotonic()
        await anyio.sleep(0.2)
        spans[ctx.step_id] = (start, time.monotonic())

    flow.step("a", after=[root])(branch)
    flow.step("b", after=[root])(branch)


async def test_parallel_branches_overlap(store: WorkflowStore, new_flow: NewFlow) -> None:
    flow = new_flow()
    spans: dict[str, tuple[float, float]] = {}
    _two_branches(flow, spans)

    with anyio.fail_after(LIMIT):
        record = await Engine(store).run(flow)

    assert record.status == RunStatus.COMPLETED
    (a_start, a_end), (b_start, b_end) = spans["a"], spans["b"]
    assert max(a_start, b_start) < min(a_end, b_end), "branches ran one after the other"


async def test_max_concurrency_one_serialises_branches(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    flow = new_flow()
    spans: dict[str, tuple[float, float]] = {}
    _two_branches(flow, spans)

    with anyio.fail_after(LIMIT):
        record = await Engine(store, max_concurrency=1).run(flow)

    assert record.status == RunStatus.COMPLETED
    first, second = sorted(spans.values())
    assert first[1] <= second[0], "branches overlapped despite max_concurrency=1"


async def test_a_step_backing_off_frees_its_slot_for_other_steps(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    """With one slot, a step waiting to retry lets another run's step go first.

    Before, the slot was held through the backoff: a flaky API sending every
    step into a long backoff stalled the engine's other runs meanwhile.
    """
    flow, other = new_flow(), new_flow()
    order: list[str] = []
    failed_once = anyio.Event()

    @flow.step(retry=RetryPolicy(retries=1, initial_delay=0.3, jitter=0))
    async def flaky(ctx: StepContext) -> None:
        order.append(f"flaky {ctx.attempt}")
        if ctx.attempt == 1:
            failed_once.set()
            raise ConnectionError("rate limited")

    @other.step()
    async def quick(ctx: StepContext) -> None:
        order.append("quick")

    with anyio.fail_after(LIMIT):
        async with Engine(store, max_concurrency=1) as engine:
            flaky_run = await engine.start(flow)
            await failed_once.wait()
            quick_run = await engine.start(other)
            assert (await engine.wait(quick_run)).status == RunStatus.COMPLETED
            assert (await engine.wait(flaky_run)).status == RunStatus.COMPLETED

    assert order == ["flaky 1", "quick", "flaky 2"]


async def test_sync_step_runs_in_a_thread_without_blocking_the_loop(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    flow = new_flow()
    loop_thread = threading.get_ident()
    threads: dict[str, int] = {}
    ticks: list[float] = []
    window: list[float] = []

    @flow.step()
    def blocking(ctx: StepContext) -> dict[str, int]:
        threads["blocking"] = threading.get_ident()
        window.append(time.monotonic())
        time.sleep(0.3)
        window.append(time.monotonic())
        return {"slept": 1}

    @flow.step()
    async def ticker(ctx: StepContext) -> None:
        threads["ticker"] = threading.get_ident()
        for _ in range(10):
            ticks.append(time.monotonic())
            await anyio.sleep(0.02)

    with anyio.fail_after(LIMIT):
        record = await Engine(store).run(flow)

    assert record.status == RunStatus.COMPLETED
    assert record.context == {"slept": 1}
    assert threads["ticker"] == loop_thread
    assert threads["blocking"] != loop_thread
    during = [tick for tick in ticks if window[0] < tick < window[1]]
    assert len(during) >= 5, f"the loop was blocked: only {len(during)} ticks during the sleep"


# --- retries ------------------------------------------------------------------------------


async def test_retries_back_off_then_succeed(store: WorkflowStore, new_flow: NewFlow) -> None:
    flow = new_flow()
    attempts: list[int] = []
    started: list[float] = []

    @flow.step(retry=RetryPolicy(retries=2, initial_delay=0.05, jitter=0))
    async def flaky(ctx: StepContext) -> dict[str, int]:
        attempts.append(ctx.attempt)
        started.append(time.monotonic())
        if ctx.attempt < 3:
            raise ConnectionError(f"try {ctx.attempt}")
        return {"ok": ctx.attempt}

    with anyio.fail_after(LIMIT):
        record = await Engine(store).run(flow)

    assert record.status == RunStatus.COMPLETED
    assert record.context == {"ok": 3}
    assert attempts == [1, 2, 3]
    # Delays of 0.05 s then 0.05 * 2 s, without jitter.
    assert started[1] - started[0] >= 0.05
    assert started[2] - started[1] >= 0.1
    assert started[2] - started[0] >= 0.15
    step = (await steps_by_name(store, record.run_id))["flaky"]
    assert step.status == StepStatus.COMPLETED
    assert step.attempt == 3
    assert step.error is None
    assert step.output == {"ok": 3}
    assert await history_kinds(store, record.run_id) == [
        EventKind.RUN_STARTED,
        EventKind.STEP_COMPLETED,
        EventKind.RUN_COMPLETED,
    ]


async def test_never_retry_error_fails_at_first_attempt(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    flow = new_flow()
    attempts: list[int] = []

    @flow.step(retry=RetryPolicy(retries=5, initial_delay=0.01, never_retry=(KeyError,)))
    async def lookup(ctx: StepContext) -> None:
        attempts.append(ctx.attempt)
        raise KeyError("missing")

    with anyio.fail_after(LIMIT):
        record = await Engine(store).run(flow)

    assert attempts == [1]
    assert record.status == RunStatus.FAILED
    assert record.error["type"] == "KeyError"
    step = (await steps_by_name(store, record.run_id))["lookup"]
    assert step.status == StepStatus.FAILED
    assert step.attempt == 1


async def test_exhausted_retries_fail_the_run_with_the_error(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    flow = new_flow()
    attempts: list[int] = []

    @flow.step(retry=RetryPolicy(retries=1, initial_delay=0.01, jitter=0))
    async def broken(ctx: StepContext) -> None:
        attempts.append(ctx.attempt)
        raise ValueError(f"boom {ctx.attempt}")

    @flow.step(after=[broken])
    async def later(ctx: StepContext) -> None:
        raise AssertionError("must not run")

    with anyio.fail_after(LIMIT):
        record = await Engine(store).run(flow)

    assert attempts == [1, 2]
    assert record.status == RunStatus.FAILED
    assert record.completed_at is not None
    assert record.error["type"] == "ValueError"
    assert record.error["message"] == "boom 2"
    assert record.output is None
    stored = await store.get_run(record.run_id)
    assert stored is not None
    assert stored.status == RunStatus.FAILED
    assert stored.error["type"] == "ValueError"
    steps = await steps_by_name(store, record.run_id)
    assert steps["broken"].status == StepStatus.FAILED
    assert steps["broken"].attempt == 2
    assert steps["broken"].error["type"] == "ValueError"
    assert steps["broken"].error["message"] == "boom 2"
    assert steps["later"].status == StepStatus.SKIPPED
    kinds = await history_kinds(store, record.run_id)
    assert kinds == [EventKind.RUN_STARTED, EventKind.STEP_FAILED, EventKind.RUN_FAILED]


# --- timeouts -----------------------------------------------------------------------------


async def test_timeout_fails_the_step(store: WorkflowStore, new_flow: NewFlow) -> None:
    flow = new_flow()

    @flow.step(timeout=0.1)
    async def slow(ctx: StepContext) -> None:
        await anyio.sleep(10)

    began = time.monotonic()
    with anyio.fail_after(LIMIT):
        record = await Engine(store).run(flow)

    assert time.monotonic() - began < 2
    assert record.status == RunStatus.FAILED
    assert record.error["type"] == "StepTimeoutError"
    step = (await steps_by_name(store, record.run_id))["slow"]
    assert step.status == StepStatus.FAILED
    assert step.error["type"] == "StepTimeoutError"


async def test_timeout_of_a_sync_step(store: WorkflowStore, new_flow: NewFlow) -> None:
    flow = new_flow()

    @flow.step(timeout=0.1)
    def blocking(ctx: StepContext) -> None:
        time.sleep(0.8)

    began = time.monotonic()
    with anyio.fail_after(LIMIT):
        record = await Engine(store).run(flow)

    assert time.monotonic() - began < 0.7, "the engine waited for the thread"
    assert record.status == RunStatus.FAILED
    assert record.error["type"] == "StepTimeoutError"


async def test_timeout_is_retried(store: WorkflowStore, new_flow: NewFlow) -> None:
    flow = new_flow()
    attempts: list[int] = []

    @flow.step(timeout=0.1, retry=RetryPolicy(retries=2, initial_delay=0.01, jitter=0))
    async def sometimes_slow(ctx: StepContext) -> dict[str, int]:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            await anyio.sleep(10)
        return {"attempt": ctx.attempt}

    with anyio.fail_after(LIMIT):
        record = await Engine(store).run(flow)

    assert record.status == RunStatus.COMPLETED
    assert attempts == [1, 2]
    assert record.context == {"attempt": 2}
    assert (await steps_by_name(store, record.run_id))["sometimes_slow"].attempt == 2


@pytest.mark.parametrize("retries", [0, 1])
async def test_a_step_raising_a_cancelled_error_of_its_own_fails_that_attempt(
    store: WorkflowStore, new_flow: NewFlow, retries: int
) -> None:
    """It awaited a future something else cancelled: a failure, not a cancel of the run.

    Before, the CancelledError went up to the runner's task group, which took
    it for a cancel and swallowed it: the run was completed with ``second``
    never run.
    """
    flow = new_flow()
    calls: Counter[str] = Counter()

    @flow.step(retries=retries)
    async def first(ctx: StepContext) -> dict[str, int]:
        calls["first"] += 1
        if ctx.attempt == 1:
            loop = asyncio.get_running_loop()
            doomed = loop.create_future()
            loop.call_soon(doomed.cancel)
            await doomed
        return {"first": 1}

    @flow.step(after=[first])
    async def second(ctx: StepContext) -> dict[str, int]:
        calls["second"] += 1
        return {"second": 1}

    with anyio.fail_after(LIMIT):
        record = await Engine(store).run(flow)

    if retries:
        assert record.status == RunStatus.COMPLETED
        assert calls == {"first": 2, "second": 1}
    else:
        assert record.status == RunStatus.FAILED
        assert record.error is not None
        assert record.error["type"] == "StepCancelledError"
        assert "CancelledError" in record.error["traceback"]
        assert calls == {"first": 1}
        steps = await steps_by_name(store, record.run_id)
        assert steps["second"].status == StepStatus.SKIPPED


# --- fail-fast and conditions -------------------------------------------------------------


async def test_fail_fast_marks_a_step_claimed_ahead_but_never_run_skipped(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    """``bad`` fails while ``good``'s completion claims ``after_good``: it never started.

    Before, the step handed back unrun was marked ``cancelled``, as if
    interrupted. The claim handed back unrun counts neither in
    ``ctx.attempt`` (1 at its first run; before, 2) nor in its retry budget:
    after a resume its first failure is retried. Before, it had failed for
    good there.
    """
    flow = new_flow()
    gate = anyio.Event()
    attempts: list[int] = []

    @flow.step()
    async def opener(ctx: StepContext) -> None:
        await anyio.sleep(0.05)
        gate.set()

    @flow.step()
    async def bad(ctx: StepContext) -> None:
        await gate.wait()
        if count(ctx, flow) == 1:
            raise RuntimeError("boom")

    @flow.step()
    async def good(ctx: StepContext) -> dict[str, int]:
        await gate.wait()
        return {"good": 1}

    @flow.step(after=[good], retry=RetryPolicy(retries=1, initial_delay=0, jitter=0))
    async def after_good(ctx: StepContext) -> None:
        attempts.append(ctx.attempt)
        if len(attempts) == 1:
            raise ConnectionError("flaky")

    with anyio.fail_after(LIMIT):
        failed = await Engine(store).run(flow)
        steps = await steps_by_name(store, failed.run_id)
        ran_before_the_resume = list(attempts)
        async with Engine(store) as engine:
            await engine.resume(failed.run_id)
            resumed = await engine.wait(failed.run_id)

    assert failed.status == RunStatus.FAILED
    assert ran_before_the_resume == []
    assert steps["good"].status == StepStatus.COMPLETED
    assert steps["after_good"].status == StepStatus.SKIPPED
    assert resumed.status == RunStatus.COMPLETED
    assert attempts == [1, 2]


async def test_fail_fast_cancels_siblings_and_skips_downstream(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    flow = new_flow()
    slow_cancelled = anyio.Event()

    @flow.step()
    async def root(ctx: StepContext) -> dict[str, int]:
        return {"root": 1}

    @flow.step(after=[root])
    async def quick(ctx: StepContext) -> dict[str, int]:
        return {"quick": 2}

    @flow.step(after=[root])
    async def slow(ctx: StepContext) -> None:
        try:
            await anyio.sleep(10)
        finally:
            slow_cancelled.set()

    @flow.step(after=[root])
    async def bad(ctx: StepContext) -> None:
        await anyio.sleep(0.1)
        raise RuntimeError("bad step")

    @flow.step(after=[slow, quick])
    async def downstream(ctx: StepContext) -> None:
        raise AssertionError("must not run")

    @flow.step(after=[downstream])
    async def further(ctx: StepContext) -> None:
        raise AssertionError("must not run")

    began = time.monotonic()
    with anyio.fail_after(LIMIT):
        record = await Engine(store).run(flow)

    assert time.monotonic() - began < 2
    assert slow_cancelled.is_set()
    assert record.status == RunStatus.FAILED
    assert record.error["type"] == "RuntimeError"
    assert record.error["message"] == "bad step"
    # Completed steps keep their output and their context.
    assert record.context == {"root": 1, "quick": 2}
    steps = await steps_by_name(store, record.run_id)
    statuses = {name: step.status for name, step in steps.items()}
    assert statuses == {
        "root": StepStatus.COMPLETED,
        "quick": StepStatus.COMPLETED,
        "slow": StepStatus.CANCELLED,
        "bad": StepStatus.FAILED,
        "downstream": StepStatus.SKIPPED,
        "further": StepStatus.SKIPPED,
    }
    assert steps["quick"].output == {"quick": 2}
    assert steps["root"].output == {"root": 1}
    assert (await history_kinds(store, record.run_id))[-1] == EventKind.RUN_FAILED


async def test_when_false_skips_the_step_but_not_its_dependents(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    flow = new_flow()
    seen: list[str] = []

    @flow.step()
    async def decide(ctx: StepContext) -> dict[str, bool]:
        return {"enabled": False}

    @flow.step(after=[decide], when=lambda ctx: ctx.context["enabled"])
    async def optional(ctx: StepContext) -> dict[str, str]:
        seen.append("optional")
        return {"optional": "ran"}

    @flow.step(after=[decide], when=lambda ctx: ctx.input == "go")
    async def wanted(ctx: StepContext) -> dict[str, str]:
        seen.append("wanted")
        return {"wanted": "ran"}

    @flow.step(after=[optional, wanted])
    async def finish(ctx: StepContext) -> str:
        seen.append("finish")
        return "finished"

    with anyio.fail_after(LIMIT):
        record = await Engine(store).run(flow, "go")

    assert record.status == RunStatus.COMPLETED
    assert sorted(seen) == ["finish", "wanted"]
    assert record.context == {"enabled": False, "wanted": "ran"}
    assert record.output == {"finish": "finished"}
    steps = await steps_by_name(store, record.run_id)
    assert steps["optional"].status == StepStatus.SKIPPED
    assert steps["optional"].error is None
    assert steps["wanted"].status == StepStatus.COMPLETED
    assert steps["finish"].status == StepStatus.COMPLETED


async def never_run(ctx: StepContext) -> None:
    raise AssertionError("a skipped step ran")


async def test_a_chain_of_skipped_steps_lets_other_tasks_run(new_flow: NewFlow) -> None:
    """A skip calls no step call of the store (which would yield): the runner yields itself.

    On MemoryStore only: the skip's row write yields on the Redis stores anyway,
    so there the test would pass without the runner's own yield.
    """
    store = MemoryStore()
    flow = new_flow()
    previous: list[str] = []
    for index in range(50):
        name = f"s{index:02d}"
        flow.step(name, after=previous, when=lambda ctx: False)(never_run)
        previous = [name]
    turns = 0
    finished = False

    async def other_task() -> None:
        nonlocal turns
        while not finished:
            await anyio.lowlevel.checkpoint()
            turns += 1

    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(other_task)
            record = await Engine(store).run(flow)
            finished = True

    assert record.status == RunStatus.COMPLETED
    steps = await steps_by_name(store, record.run_id)
    assert {step.status for step in steps.values()} == {StepStatus.SKIPPED}
    assert turns >= 50, "the other task waited for the whole chain"


# --- idempotency keys ---------------------------------------------------------------------


async def test_idempotency_key_is_stable_across_retries_and_resume(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    flow = new_flow()
    keys: dict[str, list[str]] = {"flaky": [], "parked": []}
    parked = anyio.Event()

    @flow.step(retry=RetryPolicy(retries=2, initial_delay=0.01, jitter=0))
    async def flaky(ctx: StepContext) -> None:
        keys["flaky"].append(ctx.idempotency_key)
        if ctx.attempt < 3:
            raise ConnectionError("again")

    @flow.step(after=[flaky])
    async def parked_step(ctx: StepContext) -> None:
        keys["parked"].append(ctx.idempotency_key)
        if count(ctx, flow) == 1:
            parked.set()
            await anyio.sleep_forever()

    with anyio.fail_after(LIMIT):
        async with Engine(store) as engine:
            run_id = await engine.start(flow)
            await parked.wait()
        async with Engine(store) as engine:
            await engine.resume(run_id)
            record = await engine.wait(run_id)

    assert record.status == RunStatus.COMPLETED
    assert len(keys["flaky"]) == 3
    assert len(set(keys["flaky"])) == 1
    assert len(keys["parked"]) == 2
    assert len(set(keys["parked"])) == 1
    assert keys["flaky"][0] != keys["parked"][0]
    assert run_id in keys["flaky"][0]


async def test_idempotency_key_differs_between_runs(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    flow = new_flow()
    keys: list[str] = []

    @flow.step()
    async def only(ctx: StepContext) -> None:
        keys.append(ctx.idempotency_key)

    with anyio.fail_after(LIMIT):
        engine = Engine(store)
        await engine.run(flow, run_id="run-one")
        await engine.run(flow, run_id="run-two")

    assert len(set(keys)) == 2


async def test_a_run_output_too_large_to_store_fails_the_run_and_keeps_every_step(
    store_kind: str, key_prefix: str, request: pytest.FixtureRequest, new_flow: NewFlow
) -> None:
    """Each sink's output fits; together they do not: the run fails with that
    error instead of staying running, and both steps stay completed."""
    flow = new_flow()

    @flow.step()
    async def left(ctx: StepContext) -> str:
        return "x" * (MIN_PAYLOAD_BYTES * 6 // 10)

    @flow.step()
    async def right(ctx: StepContext) -> str:
        return "y" * (MIN_PAYLOAD_BYTES * 6 // 10)

    store = await make_store(store_kind, key_prefix, request, max_payload_bytes=MIN_PAYLOAD_BYTES)
    try:
        record = await Engine(store).run(flow, run_id="too-big")
        assert record.status == RunStatus.FAILED
        assert record.output is None
        assert record.error is not None
        assert (record.error["type"], record.error["phase"]) == (
            "PayloadTooLargeError",
            "run output",
        )
        assert await store.get_run("too-big") == record
        steps = await steps_by_name(store, "too-big")
        assert {name: step.status for name, step in steps.items()} == {
            "left": StepStatus.COMPLETED,
            "right": StepStatus.COMPLETED,
        }
        kinds = await history_kinds(store, "too-big")
        assert kinds.count(EventKind.STEP_COMPLETED) == 2
        assert kinds[-1] == EventKind.RUN_FAILED
        assert EventKind.RUN_COMPLETED not in kinds
    finally:
        await store.aclose()


async def test_a_last_step_whose_run_output_is_refused_is_kept_and_the_run_fails(
    store_kind: str, key_prefix: str, request: pytest.FixtureRequest, new_flow: NewFlow
) -> None:
    """The step ending a run completes the run in the same store call. When the run's
    output is refused there (too large with another sink's), the step is recorded
    alone and the run fails, as when it is finished apart."""
    flow = new_flow()
    store = await make_store(store_kind, key_prefix, request, max_payload_bytes=MIN_PAYLOAD_BYTES)

    @flow.step()
    async def left(ctx: StepContext) -> str:
        return "x" * (MIN_PAYLOAD_BYTES * 6 // 10)

    @flow.step()
    async def mid(ctx: StepContext) -> str:
        # Done after left, so right, claimed with mid's completion, is the run's last step.
        for _ in range(500):
            step = await store.get_step(ctx.run_id, "left")
            if step is not None and step.status == StepStatus.COMPLETED:
                return "m"
            await anyio.sleep(0.005)
        raise AssertionError("left never completed")

    @flow.step(after=[mid])
    async def right(ctx: StepContext) -> str:
        return "y" * (MIN_PAYLOAD_BYTES * 6 // 10)

    refused: list[str] = []
    finish = store.complete_and_finish

    async def recording_refusals(lease: Lease, **options: Any) -> Any:
        try:
            return await finish(lease, **options)
        except InvalidPayloadError as exc:
            refused.append(exc.what)
            raise

    store.complete_and_finish = recording_refusals  # type: ignore[method-assign]
    try:
        with anyio.fail_after(LIMIT):
            record = await Engine(store).run(flow, run_id="too-big")
        assert refused == ["run output"]
        assert record.status == RunStatus.FAILED
        assert record.error is not None
        assert (record.error["type"], record.error["phase"]) == (
            "PayloadTooLargeError",
            "run output",
        )
        steps = await steps_by_name(store, "too-big")
        assert {step.status for step in steps.values()} == {StepStatus.COMPLETED}
        assert len(steps) == 3
        kinds = await history_kinds(store, "too-big")
        assert kinds.count(EventKind.STEP_COMPLETED) == 3
        assert kinds[-1] == EventKind.RUN_FAILED
        assert EventKind.RUN_COMPLETED not in kinds
    finally:
        await store.aclose()


# --- cancel -------------------------------------------------------------------------------


async def test_cancel_a_running_run(store: WorkflowStore, new_flow: NewFlow) -> None:
    flow = new_flow()
    running = anyio.Event()
    interrupted = anyio.Event()

    @flow.step()
    async def first(ctx: StepContext) -> dict[str, int]:
        return {"first": 1}

    @flow.step(after=[first])
    async def long(ctx: StepContext) -> None:
        running.set()
        try:
            await anyio.sleep(10)
        finally:
            interrupted.set()

    @flow.step(after=[long])
    async def never(ctx: StepContext) -> None:
        raise AssertionError("must not run")

    with anyio.fail_after(LIMIT):
        async with Engine(store) as engine:
            run_id = await engine.start(flow)
            await running.wait()
            cancelled = await engine.cancel(run_id)
            assert interrupted.is_set()
            assert cancelled.status == RunStatus.CANCELLED
            waited = await engine.wait(run_id)

    assert waited.status == RunStatus.CANCELLED
    assert waited.completed_at is not None
    assert waited.context == {"first": 1}
    steps = await steps_by_name(store, run_id)
    assert steps["first"].status == StepStatus.COMPLETED
    assert steps["long"].status == StepStatus.CANCELLED
    assert steps["never"].status == StepStatus.CANCELLED
    assert (await history_kinds(store, run_id))[-1] == EventKind.RUN_CANCELLED
    stored = await store.get_run(run_id)
    assert stored is not None
    assert stored.status == RunStatus.CANCELLED


async def test_cancel_stops_a_chain_of_steps_that_never_await(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    """A chain runs in one task: its store calls must still let a cancel in between steps."""
    flow = new_flow()
    reached = anyio.Event()
    previous: list[str] = []
    for index in range(200):
        name = f"s{index:03d}"

        async def body(ctx: StepContext) -> dict[str, int]:
            if ctx.step_id == "s003":
                reached.set()
            return {ctx.step_id: 1}

        flow.step(name, after=previous)(body)
        previous = [name]

    with anyio.fail_after(LIMIT):
        async with Engine(store) as engine:
            run_id = await engine.start(flow)
            await reached.wait()
            cancelled = await engine.cancel(run_id)

    assert cancelled.status == RunStatus.CANCELLED
    steps = await steps_by_name(store, run_id)
    done = [name for name, step in steps.items() if step.status == StepStatus.COMPLETED]
    assert "s003" in done
    assert len(done) < 50, "the chain ran on as if nobody had cancelled it"
    assert steps["s199"].status == StepStatus.CANCELLED


async def test_a_cancel_during_the_last_steps_commit_leaves_the_run_completed(
    new_flow: NewFlow,
) -> None:
    """The last step's commit completes the run (shielded); a cancel meanwhile must not undo it."""

    class SlowFinish(stepflow.MemoryStore):
        entered = anyio.Event()
        finishes = 0

        async def complete_and_finish(self, lease: Any, **options: Any) -> Any:
            type(self).finishes += 1
            self.entered.set()
            await anyio.sleep(0.05)  # a round trip, during which the cancel lands
            return await super().complete_and_finish(lease, **options)

    flow = new_flow()

    @flow.step()
    async def first(ctx: StepContext) -> dict[str, int]:
        return {"a": 1}

    @flow.step(after=[first])
    async def last(ctx: StepContext) -> dict[str, int]:
        return {"b": 2}

    store = SlowFinish()
    with anyio.fail_after(LIMIT):
        async with Engine(store) as engine:
            run_id = await engine.start(flow)
            await store.entered.wait()
            answer = await engine.cancel(run_id)
    assert SlowFinish.finishes == 1, "the last step completes the run in its own store call"
    assert (answer.status, answer.output) == (RunStatus.COMPLETED, {"last": {"b": 2}})
    kinds = await history_kinds(store, run_id)
    assert kinds[-1] == EventKind.RUN_COMPLETED
    assert EventKind.RUN_CANCELLED not in kinds


async def test_a_cancel_while_a_skipped_step_is_recorded_leaves_it_cancelled(
    new_flow: NewFlow,
) -> None:
    """A step cut short while its condition's skip was being written still gets its row."""

    class SlowSkip(stepflow.MemoryStore):
        entered = anyio.Event()

        async def upsert_step(self, run_id: str, step: Any, **options: Any) -> bool:
            if not self.entered.is_set():  # the skip; the cancel's own marking goes through
                self.entered.set()
                await anyio.sleep(0.05)
            return await super().upsert_step(run_id, step, **options)

    flow = new_flow()

    @flow.step()
    async def first(ctx: StepContext) -> dict[str, int]:
        return {"a": 1}

    @flow.step(after=[first], when=lambda ctx: False)
    async def maybe(ctx: StepContext) -> None:
        raise AssertionError("its condition said no")

    store = SlowSkip()
    with anyio.fail_after(LIMIT):
        async with Engine(store) as engine:
            run_id = await engine.start(flow)
            await store.entered.wait()
            cancelled = await engine.cancel(run_id)
    assert cancelled.status == RunStatus.CANCELLED
    steps = await steps_by_name(store, run_id)
    assert steps["first"].status == StepStatus.COMPLETED
    assert steps["maybe"].status == StepStatus.CANCELLED


async def test_cancel_right_after_start(store: WorkflowStore, new_flow: NewFlow) -> None:
    flow = new_flow()

    @flow.step()
    async def long(ctx: StepContext) -> None:
        await anyio.sleep(10)

    with anyio.fail_after(LIMIT):
        async with Engine(store) as engine:
            run_id = await engine.start(flow)
            cancelled = await engine.cancel(run_id)
            waited = await engine.wait(run_id)
            # Give a background task a chance to (wrongly) pick the run up again.
            await anyio.sleep(0.05)

    assert cancelled.status == RunStatus.CANCELLED
    assert waited.status == RunStatus.CANCELLED
    stored = await store.get_run(run_id)
    assert stored is not None
    assert stored.status == RunStatus.CANCELLED


async def test_cancel_while_the_run_is_being_set_up(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    """Cancel lands at each point of the driver's start-up: the run ends cancelled every time."""
    flow = new_flow()

    @flow.step()
    async def long(ctx: StepContext) -> None:
        await anyio.sleep(10)

    with anyio.fail_after(LIMIT):
        async with Engine(store) as engine:
            for delay in (0, 1, 2, 3, 4, 6, 8):
                run_id = await engine.start(flow)
                for _ in range(delay):
                    await anyio.lowlevel.checkpoint()
                await engine.cancel(run_id)
                waited = await engine.wait(run_id)
                assert waited.status == RunStatus.CANCELLED, f"after {delay} checkpoints"


async def test_a_run_cancelled_during_set_up_leaves_its_first_step_free(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    """The opening step is claimed with the run's creation; a cancel before it runs
    hands the lease back, so a resume need not wait out a long lease."""
    flow = new_flow()
    resumed = False

    @flow.step()
    async def first(ctx: StepContext) -> str:
        if not resumed:
            await anyio.sleep(10)
        return "ran"

    with anyio.fail_after(LIMIT):
        async with Engine(store, lease_ms=600_000) as engine:
            run_ids = []
            for delay in (0, 1, 2, 3, 4, 6, 8):
                run_id = await engine.start(flow)
                for _ in range(delay):
                    await anyio.lowlevel.checkpoint()
                await engine.cancel(run_id)
                step = await store.get_step(run_id, "first")
                assert step is None or step.status != StepStatus.RUNNING, f"after {delay}"
                run_ids.append(run_id)
            resumed = True
            with anyio.fail_after(5):  # far less than the lease
                for run_id in run_ids:
                    await engine.resume(run_id)
                    record = await engine.wait(run_id)
                    assert (record.status, record.output) == (RunStatus.COMPLETED, {"first": "ran"})


async def test_a_definition_the_engine_would_not_run_is_refused_before_anything_is_stored(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    """``run(flow)`` runs that very definition. Where the engine runs another under
    its name (``workflows=``, or a later definition of the same name replaced it in
    the registry), the run is refused: running the other one would store this
    one's version beside that one's steps."""
    given = new_flow()

    @given.step()
    async def a(ctx: StepContext) -> int:
        return 1

    driven = Workflow(given.name)  # replaces ``given`` in the registry

    @driven.step()
    async def x(ctx: StepContext) -> int:
        return 2

    with anyio.fail_after(LIMIT):
        for engine in (Engine(store, workflows=[driven]), Engine(store)):
            with pytest.raises(DefinitionError, match="replaced this one"):
                await engine.run(given)
            async with engine:
                with pytest.raises(DefinitionError, match="replaced this one"):
                    await engine.start(given)
        assert await store.list_runs() == []
        record = await Engine(store).run(driven)
    assert (record.status, record.output) == (RunStatus.COMPLETED, {"x": 2})


class CountingStore(stepflow.MemoryStore):
    """A MemoryStore that counts the calls the engine makes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __getattribute__(self, name: str) -> Any:
        if not name.startswith("_") and name != "calls":
            self.calls[name] += 1
        return super().__getattribute__(name)


async def test_a_new_run_claims_its_opening_step_with_its_creation(new_flow: NewFlow) -> None:
    flow = new_flow()

    @flow.step()
    async def first(ctx: StepContext) -> int:
        return ctx.attempt

    @flow.step(after=[first])
    async def second(ctx: StepContext) -> int:
        return ctx.attempt

    store = CountingStore()
    record = await Engine(store).run(flow)
    assert (record.status, record.output) == (RunStatus.COMPLETED, {"second": 1})
    assert store.calls["create_and_claim"] == 1
    assert store.calls["claim_step"] == 0  # the first with the create, the second with the first
    assert (await store.get_step(record.run_id, "first")).attempt == 1  # type: ignore[union-attr]


async def test_cancel_a_run_this_engine_does_not_drive(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    flow = new_flow()
    parked = anyio.Event()

    @flow.step()
    async def long(ctx: StepContext) -> None:
        parked.set()
        await anyio.sleep_forever()

    with anyio.fail_after(LIMIT):
        async with Engine(store) as first:
            run_id = await first.start(flow)
            await parked.wait()
        assert (await store.get_run(run_id)).status == RunStatus.RUNNING  # type: ignore[union-attr]

        other = Engine(store)  # never entered: it only talks to the store
        cancelled = await other.cancel(run_id)
        waited = await other.wait(run_id, timeout=1)

    assert cancelled.status == RunStatus.CANCELLED
    assert waited.status == RunStatus.CANCELLED
    stored = await store.get_run(run_id)
    assert stored is not None
    assert stored.status == RunStatus.CANCELLED
    assert stored.completed_at is not None
    assert (await history_kinds(store, run_id))[-1] == EventKind.RUN_CANCELLED


async def test_a_cancel_from_another_process_stops_a_running_step_at_its_heartbeat(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    """Engine B cancels a run engine A drives: A's step in flight is stopped, not waited for.

    Before, the step ran on to its end (here, past the test's limit) and
    only then did A find the run cancelled.
    """
    flow = new_flow()
    parked = anyio.Event()
    interrupted: list[str] = []

    @flow.step()
    async def long(ctx: StepContext) -> None:
        parked.set()
        try:
            await anyio.sleep(LIMIT * 2)
        except anyio.get_cancelled_exc_class():
            interrupted.append("long")
            raise

    @flow.step(after=[long])
    async def after_it(ctx: StepContext) -> None:
        interrupted.append("after_it ran")

    run_id, final = await cancelled_elsewhere(store, flow, parked)

    assert final.status == RunStatus.CANCELLED
    assert interrupted == ["long"]
    steps = await steps_by_name(store, run_id)
    assert steps["long"].status == StepStatus.CANCELLED
    assert steps["after_it"].status == StepStatus.CANCELLED  # as a cancel by the driver marks it


async def test_a_cancel_from_another_process_stops_a_step_in_its_backoff(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    """A step backing off holds no lease to be refused: it looks at the run instead.

    Before, the driver kept the cancelled run for the whole backoff (here
    past the test's limit) and only then found its next claim refused.
    """
    flow = new_flow()
    failed = anyio.Event()
    attempts: list[int] = []

    @flow.step(retry=RetryPolicy(retries=3, initial_delay=LIMIT * 2, jitter=0))
    async def flaky(ctx: StepContext) -> None:
        attempts.append(ctx.attempt)
        failed.set()
        raise ConnectionError("rate limited")

    run_id, final = await cancelled_elsewhere(store, flow, failed)

    assert final.status == RunStatus.CANCELLED
    assert attempts == [1]
    assert (await steps_by_name(store, run_id))["flaky"].status == StepStatus.CANCELLED


async def test_a_lapsed_lease_in_a_run_cancelled_elsewhere_is_reported_as_the_cancel(
    store: WorkflowStore,
) -> None:
    """`execute_step` raises the cancel, not a takeover, for a write its lapsed lease lost.

    The lease cannot be renewed because the run was cancelled, not because
    another owner claimed the step. The runners tell those apart: after a
    cancel the step is marked ``cancelled`` on every path (a failure beside
    it included); a takeover leaves it to its new owner.
    """
    record = stepflow.RunRecord(run_id="r1", workflow="wf", status=RunStatus.RUNNING)
    claim = stepflow.StepClaim(step_id="s", name="s", lease_ms=100)
    _, lease = await store.create_and_claim(record, claim, owner="me")
    assert lease is not None

    async def stalls_as_the_run_is_cancelled(attempt: int) -> int:
        await Engine(store).cancel("r1")
        time.sleep(0.3)  # noqa: ASYNC251 (the loop stalls: the 100 ms lease lapses unrenewed)
        return 1

    call = StepCall(
        run_id="r1",
        step_id="s",
        name="s",
        execution_id=1,
        invoke=stalls_as_the_run_is_cancelled,
        policy=RetryPolicy(),
        timeout=None,
        is_async=True,
    )

    async def run_it(keeper: LeaseKeeper) -> object:
        held = keeper.hold(lease)
        return await execute_step(store, call, owner="me", keeper=keeper, claimed=held)

    with anyio.fail_after(LIMIT), pytest.raises(RunCancelledElsewhere):
        await with_lease_keeper(store, 100, run_it)


@pytest.mark.parametrize("ends", ["returns", "raises"])
async def test_a_step_whose_lease_lapsed_as_another_process_cancelled_the_run_is_cancelled(
    store: WorkflowStore, new_flow: NewFlow, ends: str
) -> None:
    """Its lapsed lease can be neither renewed (the run is cancelled) nor written under.

    What it did is dropped and the step is marked ``cancelled``, as a step the
    cancel stopped. Before, the write was taken for a takeover and the row
    stayed ``running`` in the cancelled run.
    """
    flow = new_flow()

    @flow.step()
    async def stalled(ctx: StepContext) -> int:
        await Engine(store).cancel(ctx.run_id)  # another process's cancel
        time.sleep(0.5)  # noqa: ASYNC251 (the loop stalls: the 150 ms lease lapses unrenewed)
        if ends == "raises":
            raise ConnectionError("late failure")
        return 42

    with anyio.fail_after(LIMIT):
        async with Engine(store, lease_ms=150) as driver:
            run_id = await driver.start(flow)
            final = await driver.wait(run_id)

    assert final.status == RunStatus.CANCELLED
    assert (await steps_by_name(store, run_id))["stalled"].status == StepStatus.CANCELLED


async def test_steps_whose_leases_lapsed_are_marked_cancelled_after_a_cancel_elsewhere(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    """A loop stall lapses both leases; the cancel stops ``a``, and ``b`` is stopped with it.

    ``b``'s lease cannot be handed back (it lapsed), so its row is still
    ``running`` under this runner's own attempt: not a resume elsewhere.
    """
    flow = new_flow()

    @flow.step()
    async def a(ctx: StepContext) -> None:
        await anyio.sleep(0.05)  # b is running
        await Engine(store).cancel(ctx.run_id)
        time.sleep(0.5)  # noqa: ASYNC251 (the loop stalls past both 150 ms leases)
        await anyio.sleep(LIMIT * 2)

    @flow.step()
    async def b(ctx: StepContext) -> None:
        await anyio.sleep(LIMIT * 2)

    with anyio.fail_after(LIMIT):
        async with Engine(store, lease_ms=150) as driver:
            run_id = await driver.start(flow)
            final = await driver.wait(run_id)

    assert final.status == RunStatus.CANCELLED
    steps = await steps_by_name(store, run_id)
    assert {name: step.status for name, step in steps.items()} == {
        "a": StepStatus.CANCELLED,
        "b": StepStatus.CANCELLED,
    }


async def test_one_failed_look_at_the_run_during_a_backoff_does_not_stop_it(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    """A step backing off looks at the run for a cancel; a look the store fails is only logged.

    The lease keeper treats a renewal the store fails the same way.
    """
    flow = new_flow()
    attempts: list[int] = []

    blippy = GetRunFailsOnceArmed(store)

    @flow.step(retry=RetryPolicy(retries=2, initial_delay=0.3, jitter=0))
    async def flaky(ctx: StepContext) -> int:
        attempts.append(ctx.attempt)
        if len(attempts) == 1:
            blippy.armed = True
            raise ConnectionError("rate limited")
        return 1

    with anyio.fail_after(LIMIT):
        final = await Engine(cast(WorkflowStore, blippy), lease_ms=150).run(flow)

    assert final.status == RunStatus.COMPLETED
    assert attempts == [1, 2]
    assert not blippy.armed, "the backoff never looked at the run"


async def test_a_step_stopped_by_a_cancel_elsewhere_as_another_fails_is_marked_cancelled(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    """``long`` is stopped at its renewal while ``bad`` fails: the run ends by the failure path.

    That path marked only the steps it cancelled itself, so ``long`` was
    left ``pending`` (handed back, "Interrupted").
    """
    flow = new_flow()

    @flow.step()
    async def long(ctx: StepContext) -> None:
        await anyio.sleep(LIMIT * 2)

    @flow.step()
    async def starter(ctx: StepContext) -> None:
        await anyio.sleep(0.05)  # bad's lease is taken half a period after long's

    @flow.step(after=[starter])
    async def bad(ctx: StepContext) -> None:
        await Engine(store).cancel(ctx.run_id)
        with anyio.CancelScope(shield=True):
            await anyio.sleep(0.08)  # past long's renewal (100 ms), before bad's own
        raise RuntimeError("boom")

    @flow.step(after=[long])
    async def after_long(ctx: StepContext) -> None:
        pass

    with anyio.fail_after(LIMIT):
        async with Engine(store, lease_ms=300) as driver:
            run_id = await driver.start(flow)
            final = await driver.wait(run_id)

    steps = await steps_by_name(store, run_id)
    assert final.status == RunStatus.CANCELLED
    assert steps["bad"].status == StepStatus.FAILED
    assert steps["long"].status == StepStatus.CANCELLED


async def test_a_step_claimed_ahead_does_not_start_once_another_process_cancelled_the_run(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    """``first``'s completion claims ``second``, which then waits for the only slot.

    The cancel refuses the renewal of ``second``'s lease meanwhile; before,
    ``second`` still ran once it had the slot.
    """
    flow, other = new_flow(), new_flow()
    ran: list[str] = []
    first_may_end, first_ended, holder_may_end = anyio.Event(), anyio.Event(), anyio.Event()

    @flow.step()
    async def first(ctx: StepContext) -> None:
        await first_may_end.wait()
        first_ended.set()

    @flow.step(after=[first])
    async def second(ctx: StepContext) -> None:
        ran.append("second")

    @other.step()
    async def holder(ctx: StepContext) -> None:
        await holder_may_end.wait()

    with anyio.fail_after(LIMIT):
        async with Engine(store, lease_ms=150, max_concurrency=1) as driver:
            run_id = await driver.start(flow)
            await anyio.sleep(0.05)  # first holds the only slot
            other_id = await driver.start(other)
            await anyio.sleep(0.05)  # holder waits for it
            first_may_end.set()
            await first_ended.wait()  # second is claimed; holder takes the slot
            await anyio.sleep(0.05)
            await Engine(store).cancel(run_id)
            await anyio.sleep(1.0)  # twenty renewal periods: second's is refused
            holder_may_end.set()
            final = await driver.wait(run_id)
            await driver.wait(other_id)

    assert final.status == RunStatus.CANCELLED
    assert ran == []
    assert (await steps_by_name(store, run_id))["second"].status == StepStatus.CANCELLED


async def test_a_step_another_process_resumed_after_the_cancel_is_left_to_it(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    """Driver A, stopped by a cancel, marks its steps cancelled, but not one B runs already.

    B resumes the run the moment A reads it back cancelled. Before, A marked
    B's running step ``cancelled`` while B ran it.
    """
    flow = new_flow()
    first_parked, second_running, second_may_end = anyio.Event(), anyio.Event(), anyio.Event()

    @flow.step()
    async def long(ctx: StepContext) -> int:
        if count(ctx, flow) == 1:
            first_parked.set()
            await anyio.sleep(LIMIT * 2)
        second_running.set()
        await second_may_end.wait()
        return 1

    class ResumedOnReadBack(PassThroughStore):
        armed = False

        async def get_run(self, run_id: str) -> stepflow.RunRecord | None:
            record = await self.inner.get_run(run_id)
            if self.armed and record is not None and record.status == RunStatus.CANCELLED:
                self.armed = False
                await engine_b.resume(run_id)
                await second_running.wait()
            return record

    store_a = ResumedOnReadBack(store)
    with anyio.fail_after(LIMIT):
        async with Engine(store) as engine_b:
            engine_a = Engine(cast(WorkflowStore, store_a), lease_ms=300)
            stopped: list[stepflow.RunRecord] = []

            async def drive_a() -> None:
                stopped.append(await engine_a.run(flow, run_id="resumed-elsewhere"))

            async with anyio.create_task_group() as tg:
                tg.start_soon(drive_a)
                await first_parked.wait()
                store_a.armed = True
                await Engine(store).cancel("resumed-elsewhere")
            row_while_b_runs = (await steps_by_name(store, "resumed-elsewhere"))["long"]
            second_may_end.set()
            final = await engine_b.wait("resumed-elsewhere")

    assert stopped[0].status == RunStatus.CANCELLED
    assert row_while_b_runs.status == StepStatus.RUNNING
    assert final.status == RunStatus.COMPLETED


async def test_a_cancel_that_read_the_run_before_it_finished_leaves_it_finished(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    """Engine B reads the run running; the run completes; B's cancel must not overwrite that.

    Before, the store took the cancel and the completed run became ``cancelled``.
    """
    flow = new_flow()
    may_finish = anyio.Event()

    @flow.step()
    async def only(ctx: StepContext) -> int:
        await may_finish.wait()
        return 1

    class ReadBeforeTheFinish(PassThroughStore):
        async def get_run(self, run_id: str) -> stepflow.RunRecord | None:
            record = await self.inner.get_run(run_id)  # running, as read
            may_finish.set()
            await driver.wait(run_id)  # ... and completed before the cancel is written
            return record

    with anyio.fail_after(LIMIT):
        async with Engine(store) as driver:
            run_id = await driver.start(flow)
            late = Engine(cast(WorkflowStore, ReadBeforeTheFinish(store)))
            answered = await late.cancel(run_id)
            final = await driver.wait(run_id)

    assert answered.status == RunStatus.COMPLETED
    assert final.status == RunStatus.COMPLETED
    assert final.output == {"only": 1}


async def test_cancel_of_a_finished_run_leaves_it_as_is(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    flow = new_flow()

    @flow.step()
    async def only(ctx: StepContext) -> int:
        return 1

    with anyio.fail_after(LIMIT):
        engine = Engine(store)
        record = await engine.run(flow)
        after = await engine.cancel(record.run_id)

    assert after.status == RunStatus.COMPLETED
    assert after.output == {"only": 1}


# --- start, wait, shutdown and resume -----------------------------------------------------


async def test_start_returns_at_once_and_wait_returns_the_result(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    flow = new_flow()
    gate = anyio.Event()

    @flow.step()
    async def gated(ctx: StepContext) -> dict[str, str]:
        await gate.wait()
        return {"done": "yes"}

    with anyio.fail_after(LIMIT):
        async with Engine(store) as engine:
            run_id = await engine.start(flow, {"q": 1})
            stored = await store.get_run(run_id)
            assert stored is not None
            assert stored.status in {RunStatus.PENDING, RunStatus.RUNNING}
            assert stored.input == {"q": 1}
            with pytest.raises(WaitTimeoutError):
                await engine.wait(run_id, timeout=0.05)
            gate.set()
            record = await engine.wait(run_id, timeout=2)

    assert record.status == RunStatus.COMPLETED
    assert record.context == {"done": "yes"}
    assert record.output == {"gated": {"done": "yes"}}


async def test_shutdown_leaves_the_run_resumable(store: WorkflowStore, new_flow: NewFlow) -> None:
    flow = new_flow()
    parked = anyio.Event()

    @flow.step()
    async def first(ctx: StepContext) -> dict[str, int]:
        count(ctx, flow)
        return {"first": 1}

    @flow.step(after=[first])
    async def second(ctx: StepContext) -> dict[str, int]:
        if count(ctx, flow) == 1:
            parked.set()
            await anyio.sleep_forever()
        return {"second": ctx.context["first"] + 1}

    with anyio.fail_after(LIMIT):
        async with Engine(store) as engine:
            run_id = await engine.start(flow)
            await parked.wait()

        stored = await store.get_run(run_id)
        assert stored is not None
        assert stored.status == RunStatus.RUNNING
        steps = await steps_by_name(store, run_id)
        assert steps["first"].status == StepStatus.COMPLETED
        assert steps["second"].status not in {StepStatus.COMPLETED, StepStatus.FAILED}

        # A fresh engine (as in a new process) that knows the workflow finishes the run.
        async with Engine(store, workflows=[flow]) as engine:
            assert await engine.resume(run_id) == run_id
            record = await engine.wait(run_id, timeout=2)

    assert record.status == RunStatus.COMPLETED
    assert record.context == {"first": 1, "second": 2}
    assert CALLS[flow.name, "first"] == 1
    assert CALLS[flow.name, "second"] == 2
    steps = await steps_by_name(store, run_id)
    assert steps["second"].attempt == 2
    kinds = await history_kinds(store, run_id)
    assert kinds.count(EventKind.RUN_STARTED) == 1
    assert kinds.count(EventKind.STEP_COMPLETED) == 2
    assert kinds[-1] == EventKind.RUN_COMPLETED


async def test_run_with_existing_id_resumes_or_returns_it(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    flow = new_flow()
    parked = anyio.Event()

    @flow.step()
    async def first(ctx: StepContext) -> dict[str, int]:
        count(ctx, flow)
        return {"first": 1}

    @flow.step(after=[first])
    async def second(ctx: StepContext) -> int:
        if count(ctx, flow) == 1:
            parked.set()
            await anyio.sleep_forever()
        return 2

    with anyio.fail_after(LIMIT):
        async with Engine(store) as engine:
            await engine.start(flow, "in", run_id="resume-me")
            await parked.wait()

        engine = Engine(store)
        record = await engine.run(flow, "in", run_id="resume-me")
        assert record.status == RunStatus.COMPLETED
        assert record.output == {"second": 2}

        again = await engine.run(flow, "in", run_id="resume-me")

    assert again.status == RunStatus.COMPLETED
    assert again.output == record.output
    assert again.completed_at == record.completed_at
    assert CALLS[flow.name, "first"] == 1
    assert CALLS[flow.name, "second"] == 2


async def test_resume_reruns_only_what_failed(store: WorkflowStore, new_flow: NewFlow) -> None:
    flow = new_flow()

    @flow.step()
    async def first(ctx: StepContext) -> dict[str, int]:
        count(ctx, flow)
        return {"first": 1}

    @flow.step(after=[first])
    async def second(ctx: StepContext) -> int:
        if count(ctx, flow) == 1:
            raise RuntimeError("transient outage")
        return 2

    with anyio.fail_after(LIMIT):
        failed = await Engine(store).run(flow)
        assert failed.status == RunStatus.FAILED
        async with Engine(store) as engine:
            await engine.resume(failed.run_id)
            record = await engine.wait(failed.run_id)

    assert record.status == RunStatus.COMPLETED
    assert record.error is None
    assert record.output == {"second": 2}
    assert CALLS[flow.name, "first"] == 1
    assert CALLS[flow.name, "second"] == 2


async def test_resume_of_a_failed_run_gives_its_step_the_retries_afresh(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    """The retry budget counts a driver's attempts; ``ctx.attempt`` counts them all.

    Before, the budget was spent against the step's lifetime attempt number,
    so the resumed step had failed for good on its first failure there.
    """
    flow = new_flow()
    attempts: list[int] = []

    @flow.step(retry=RetryPolicy(retries=1, initial_delay=0, jitter=0))
    async def flaky(ctx: StepContext) -> int:
        attempts.append(ctx.attempt)
        if len(attempts) < 4:
            raise ConnectionError("still down")
        return ctx.attempt

    with anyio.fail_after(LIMIT):
        failed = await Engine(store).run(flow)
        assert failed.status == RunStatus.FAILED
        assert failed.error is not None
        assert failed.error["attempt"] == 2
        async with Engine(store) as engine:
            await engine.resume(failed.run_id)
            record = await engine.wait(failed.run_id)

    assert attempts == [1, 2, 3, 4]
    assert record.status == RunStatus.COMPLETED
    assert record.output == {"flaky": 4}


async def test_resume_of_a_completed_run_leaves_it_as_it_is(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    flow = new_flow()

    @flow.step()
    async def only(ctx: StepContext) -> int:
        return count(ctx, flow)

    with anyio.fail_after(LIMIT):
        done = await Engine(store).run(flow)
        history = await store.read_history(done.run_id)
        async with Engine(store) as engine:
            await engine.resume(done.run_id)
            again = await engine.wait(done.run_id)

    assert again == done
    assert await store.read_history(done.run_id) == history
    assert CALLS[flow.name, "only"] == 1


async def test_resume_refuses_a_definition_that_no_longer_validates(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    flow = new_flow()

    @flow.step()
    async def first(ctx: StepContext) -> int:
        raise RuntimeError("fails the run")

    with anyio.fail_after(LIMIT):
        failed = await Engine(store).run(flow)
        assert failed.status == RunStatus.FAILED
        steps = await store.list_steps(failed.run_id)

        @flow.step(after=["renamed_away"])
        async def second(ctx: StepContext) -> int:
            raise AssertionError("must not run")

        async with Engine(store) as engine:
            with pytest.raises(UnknownDependencyError, match="renamed_away"):
                await engine.resume(failed.run_id)

    assert await store.get_run(failed.run_id) == failed
    assert await store.list_steps(failed.run_id) == steps


async def test_run_id_of_another_workflow_conflicts(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    one, two = new_flow(), new_flow()

    @one.step()
    async def a(ctx: StepContext) -> None:
        return None

    @two.step()
    async def b(ctx: StepContext) -> None:
        raise AssertionError("must not run")

    with anyio.fail_after(LIMIT):
        engine = Engine(store)
        await engine.run(one, run_id="shared-id")
        with pytest.raises(ConflictError, match=one.name):
            await engine.run(two, run_id="shared-id")
        async with engine:
            with pytest.raises(ConflictError):
                await engine.start(two, run_id="shared-id")

    stored = await store.get_run("shared-id")
    assert stored is not None
    assert stored.workflow == one.name
    assert stored.status == RunStatus.COMPLETED


@pytest.mark.parametrize("when", ["at once", "while it runs"])
async def test_run_by_the_id_of_a_run_this_engine_drives_in_the_background_awaits_it(
    store: WorkflowStore, new_flow: NewFlow, when: str
) -> None:
    """``run`` by an existing id resumes that run: driven here already, it is awaited.

    Before, a second driver ran beside the first one, sharing its single-use
    cancel scope: one of them raised a RuntimeError, and the opening step's
    lease was left held for its whole time (30 s).
    """
    flow = new_flow()
    calls: Counter[str] = Counter()

    @flow.step()
    async def a(ctx: StepContext) -> dict[str, int]:
        calls["a"] += 1
        await anyio.sleep(0.05)
        return {"a": 1}

    @flow.step(after=[a])
    async def b(ctx: StepContext) -> dict[str, int]:
        calls["b"] += 1
        return {"b": 1}

    with anyio.fail_after(LIMIT):
        async with Engine(store) as engine:
            run_id = await engine.start(flow)
            if when == "while it runs":
                await anyio.sleep(0.01)
            record = await engine.run(flow, run_id=run_id)
            waited = await engine.wait(run_id)
    assert record.status == waited.status == RunStatus.COMPLETED
    assert record.context == {"a": 1, "b": 1}
    assert calls == {"a": 1, "b": 1}


async def test_an_error_leaving_the_engine_block_is_raised_as_is(store: WorkflowStore) -> None:
    """Not wrapped in an exception group by the engine's task group."""
    with pytest.raises(RunNotFoundError):
        async with Engine(store) as engine:
            await engine.wait("no-such-run", timeout=1)


# --- input and definition errors ----------------------------------------------------------


class Params(pydantic.BaseModel):
    n: int
    tags: list[str] = []


async def test_input_model_validates_and_stores_json(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    flow = new_flow(input_model=Params)
    seen: list[Any] = []

    @flow.step()
    async def use(ctx: StepContext) -> None:
        seen.append(ctx.input)

    with anyio.fail_after(LIMIT):
        engine = Engine(store)
        with pytest.raises(InputValidationError, match="n"):
            await engine.run(flow, {"n": "not a number"})
        with pytest.raises(InputValidationError):
            await engine.run(flow, None)
        async with engine:
            with pytest.raises(InputValidationError):
                await engine.start(flow, {"tags": "x"})
        assert await store.list_runs() == []

        record = await engine.run(flow, {"n": "3"})
        model_record = await engine.run(flow, Params(n=4, tags=["t"]))

    assert record.status == RunStatus.COMPLETED
    assert record.input == {"n": 3, "tags": []}
    assert model_record.input == {"n": 4, "tags": ["t"]}
    assert seen == [{"n": 3, "tags": []}, {"n": 4, "tags": ["t"]}]
    assert len(await store.list_runs()) == 2


async def test_a_workflow_the_engine_does_not_run_is_refused_before_anything_is_stored(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    known, other = new_flow(), new_flow()
    for flow in (known, other):

        @flow.step()
        async def only(ctx: StepContext) -> None:
            return None

    engine = Engine(store, workflows=[known])
    with anyio.fail_after(LIMIT):
        with pytest.raises(WorkflowNotFoundError):
            await engine.run(other)
        async with engine:
            with pytest.raises(WorkflowNotFoundError):
                await engine.start(other)
    assert await store.list_runs() == []


async def test_definition_errors(store: WorkflowStore, new_flow: NewFlow) -> None:
    flow = new_flow()

    @flow.step()
    async def a(ctx: StepContext) -> None:
        return None

    with pytest.raises(DuplicateStepError):

        @flow.step("a")
        async def again(ctx: StepContext) -> None:
            return None

    cyclic = new_flow()

    @cyclic.step(after=["y"])
    async def x(ctx: StepContext) -> None:
        return None

    with pytest.raises(CycleError) as caught:

        @cyclic.step(after=[x])
        async def y(ctx: StepContext) -> None:
            return None

    assert caught.value.cycle == ["x", "y", "x"]

    dangling = new_flow()

    @dangling.step(after=["missing"])
    async def orphan(ctx: StepContext) -> None:
        raise AssertionError("must not run")

    with anyio.fail_after(LIMIT):
        engine = Engine(store)
        with pytest.raises(UnknownDependencyError) as unknown:
            await engine.run(dangling)
        assert (unknown.value.step, unknown.value.dependency) == ("orphan", "missing")
        async with engine:
            with pytest.raises(UnknownDependencyError):
                await engine.start(dangling)
        assert await store.list_runs() == []


@pytest.mark.parametrize("bad", ["", "has space", "{tag}", "x" * 201, "new\nline"])
async def test_bad_run_ids_are_refused(store: WorkflowStore, new_flow: NewFlow, bad: str) -> None:
    flow = new_flow()

    @flow.step()
    async def only(ctx: StepContext) -> None:
        raise AssertionError("must not run")

    with anyio.fail_after(LIMIT):
        engine = Engine(store)
        with pytest.raises(InvalidRunIdError):
            await engine.run(flow, run_id=bad)
        with pytest.raises(InvalidRunIdError):
            await engine.wait(bad)
        with pytest.raises(InvalidRunIdError):
            await engine.cancel(bad)
        async with engine:
            with pytest.raises(InvalidRunIdError):
                await engine.start(flow, run_id=bad)
            with pytest.raises(InvalidRunIdError):
                await engine.resume(bad)
    assert await store.list_runs() == []


async def test_wait_errors(store: WorkflowStore, new_flow: NewFlow) -> None:
    flow = new_flow()

    @flow.step()
    async def long(ctx: StepContext) -> None:
        await anyio.sleep(10)

    with anyio.fail_after(LIMIT):
        async with Engine(store) as engine:
            with pytest.raises(RunNotFoundError):
                await engine.wait("no-such-run", timeout=1)
            with pytest.raises(RunNotFoundError):
                await engine.resume("no-such-run")
            with pytest.raises(RunNotFoundError):
                await engine.cancel("no-such-run")
            run_id = await engine.start(flow)
            began = time.monotonic()
            with pytest.raises(WaitTimeoutError) as caught:
                await engine.wait(run_id, timeout=0.1)
            assert time.monotonic() - began < 1
            assert caught.value.run_id == run_id
            assert isinstance(caught.value, TimeoutError)
            # The run goes on after the wait gave up.
            stored = await store.get_run(run_id)
            assert stored is not None
            assert stored.status == RunStatus.RUNNING
            await engine.cancel(run_id)


async def test_background_calls_need_the_async_with_block(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    flow = new_flow()

    @flow.step()
    async def only(ctx: StepContext) -> None:
        raise AssertionError("must not run")

    engine = Engine(store)
    with pytest.raises(StepflowError, match="async with"):
        await engine.start(flow)
    with pytest.raises(StepflowError, match="async with"):
        await engine.resume("any-run")
    assert await store.list_runs() == []


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda store: Engine(store, max_concurrency=0), id="max_concurrency=0"),
        pytest.param(lambda store: Engine(store, lease_ms=10), id="lease_ms=10"),
        pytest.param(lambda store: MemoryStore(max_payload_bytes=0), id="max_payload_bytes=0"),
        pytest.param(lambda store: RedisStore.from_url("redis://x", prefix="a b"), id="prefix"),
    ],
)
def test_options_out_of_range_are_refused_with_a_stepflow_error(
    make: Callable[[WorkflowStore], object],
) -> None:
    """A StepflowError that is also a ValueError, as all bad input."""
    with pytest.raises(InvalidArgumentError):
        make(MemoryStore())


async def test_an_event_without_a_name_is_refused_and_nothing_is_recorded(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    flow = new_flow()
    release = anyio.Event()

    @flow.step()
    async def waits(ctx: StepContext) -> None:
        await release.wait()

    with anyio.fail_after(LIMIT):
        async with Engine(store) as engine:
            run_id = await engine.start(flow)
            before = await store.read_history(run_id)
            with pytest.raises(InvalidArgumentError):
                await engine.raise_event(run_id, "")
            assert await store.read_history(run_id) == before
            release.set()
            await engine.wait(run_id)


# --- non-JSON outputs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "output",
    [
        pytest.param({1, 2}, id="set"),
        pytest.param(math.nan, id="nan"),
        pytest.param({"bad": math.inf, "good": 1}, id="mapping-with-inf"),
        pytest.param({1: "int key"}, id="non-str-key"),
        pytest.param(object(), id="object"),
    ],
)
async def test_non_json_output_fails_the_step_cleanly(
    store: WorkflowStore, new_flow: NewFlow, output: Any
) -> None:
    flow = new_flow()

    @flow.step()
    async def fine(ctx: StepContext) -> dict[str, int]:
        return {"fine": 1}

    @flow.step(after=[fine])
    async def weird(ctx: StepContext) -> Any:
        return output

    with anyio.fail_after(LIMIT):
        record = await Engine(store).run(flow)

    assert record.status == RunStatus.FAILED
    assert record.error["type"] == "InvalidPayloadError"
    assert record.context == {"fine": 1}  # nothing of the bad output was merged
    steps = await steps_by_name(store, record.run_id)
    assert steps["fine"].status == StepStatus.COMPLETED
    assert steps["weird"].status == StepStatus.FAILED
    assert steps["weird"].output is None
    assert steps["weird"].error["type"] == "InvalidPayloadError"
    kinds = await history_kinds(store, record.run_id)
    assert kinds == [
        EventKind.RUN_STARTED,
        EventKind.STEP_COMPLETED,
        EventKind.STEP_FAILED,
        EventKind.RUN_FAILED,
    ]


async def test_non_json_output_is_retried_like_an_error(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    flow = new_flow()

    @flow.step(retry=RetryPolicy(retries=1, initial_delay=0.01, jitter=0))
    async def shaky(ctx: StepContext) -> Any:
        return {"value": math.nan} if ctx.attempt == 1 else {"value": 1.5}

    with anyio.fail_after(LIMIT):
        record = await Engine(store).run(flow)

    assert record.status == RunStatus.COMPLETED
    assert record.context == {"value": 1.5}
    step = (await steps_by_name(store, record.run_id))["shaky"]
    assert (step.status, step.attempt) == (StepStatus.COMPLETED, 2)


# --- more edges ---------------------------------------------------------------------------


async def test_a_raising_when_predicate_fails_the_run(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    flow = new_flow()

    def broken_condition(ctx: StepContext) -> bool:
        raise LookupError("no flag")

    @flow.step()
    async def first(ctx: StepContext) -> dict[str, int]:
        return {"first": 1}

    @flow.step(after=[first], when=broken_condition)
    async def guarded(ctx: StepContext) -> None:
        raise AssertionError("must not run")

    @flow.step(after=[guarded])
    async def after_guarded(ctx: StepContext) -> None:
        raise AssertionError("must not run")

    with anyio.fail_after(LIMIT):
        record = await Engine(store).run(flow)

    assert record.status == RunStatus.FAILED
    assert record.error["type"] == "LookupError"
    assert record.context == {"first": 1}
    steps = await steps_by_name(store, record.run_id)
    assert steps["guarded"].status == StepStatus.FAILED
    assert steps["guarded"].error["type"] == "LookupError"
    assert steps["after_guarded"].status == StepStatus.SKIPPED


async def test_starting_a_run_twice_drives_it_once(store: WorkflowStore, new_flow: NewFlow) -> None:
    flow = new_flow()
    gate = anyio.Event()

    @flow.step()
    async def once(ctx: StepContext) -> int:
        count(ctx, flow)
        await gate.wait()
        return 1

    with anyio.fail_after(LIMIT):
        async with Engine(store) as engine:
            run_id = await engine.start(flow, run_id="twice")
            assert await engine.start(flow, run_id="twice") == run_id
            assert await engine.resume(run_id) == run_id
            await eventually(lambda: CALLS[flow.name, "once"] == 1, "the step to start")
            await anyio.sleep(0.05)
            gate.set()
            record = await engine.wait(run_id)

    assert record.status == RunStatus.COMPLETED
    assert CALLS[flow.name, "once"] == 1
    assert (await steps_by_name(store, run_id))["once"].attempt == 1


async def test_a_result_whose_lease_lapsed_is_recorded_without_a_rerun(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    """The loop stalled past the lease, nobody took the step over: its result still counts."""
    flow = new_flow()
    attempts: list[int] = []

    @flow.step()
    async def stalls(ctx: StepContext) -> dict[str, int]:
        attempts.append(ctx.attempt)
        time.sleep(0.2)  # noqa: ASYNC251 - blocks the loop, so no heartbeat renews the lease
        return {"attempt": ctx.attempt}

    with anyio.fail_after(LIMIT):
        record = await Engine(store, lease_ms=60).run(flow)

    assert record.status == RunStatus.COMPLETED
    assert attempts == [1]
    assert record.context == {"attempt": 1}
    step = (await steps_by_name(store, record.run_id))["stalls"]
    assert step.status == StepStatus.COMPLETED
    assert step.output == {"attempt": 1}
    # It ran once: its row and its completion event both say attempt 1, not a second claim's.
    assert step.attempt == 1
    completed = [e for e in await store.read_history(record.run_id) if e.kind == "step_completed"]
    assert [event.payload["attempt"] for event in completed] == [1]


@pytest.mark.parametrize("retries", [0, 1])
async def test_a_failure_whose_lease_lapsed_is_recorded_and_retried_or_fails_the_run(
    store: WorkflowStore, new_flow: NewFlow, retries: int
) -> None:
    """The loop stalled past the lease, then the step raised: the failure still counts.

    Before, the refused failure record was taken for a lost lease: the run
    stayed ``running`` with the step held by nobody, and no retry ran.
    """
    flow = new_flow()
    attempts: list[int] = []

    @flow.step(retries=retries)
    async def stalls(ctx: StepContext) -> dict[str, int]:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            time.sleep(0.2)  # noqa: ASYNC251 - blocks the loop, so no heartbeat renews the lease
            raise RuntimeError("boom")
        return {"attempt": ctx.attempt}

    with anyio.fail_after(LIMIT):
        record = await Engine(store, lease_ms=60).run(flow)

    if retries:
        assert (record.status, record.context, attempts) == (
            RunStatus.COMPLETED,
            {"attempt": 2},
            [1, 2],
        )
    else:
        assert record.status == RunStatus.FAILED
        assert record.error is not None
        assert record.error["message"] == "boom"
        assert attempts == [1]
        step = (await steps_by_name(store, record.run_id))["stalls"]
        assert (step.status, step.attempt) == (StepStatus.FAILED, 1)


async def test_a_result_whose_lapsed_lease_another_owner_claimed_is_dropped(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    """The loop stalled past the lease and another owner claimed the step meanwhile.

    That owner runs the step now: this process records nothing and leaves the
    run to it, rather than record a result over the other owner's lease.
    """
    flow = new_flow()

    @flow.step()
    async def stalls(ctx: StepContext) -> dict[str, int]:
        time.sleep(0.2)  # noqa: ASYNC251 - blocks the loop, so no heartbeat renews the lease
        await store.claim_step(  # another worker takes the lapsed step over
            ctx.run_id, ctx.step_id, name=ctx.step_id, owner="other", lease_ms=60_000
        )
        return {"attempt": ctx.attempt}

    with anyio.fail_after(LIMIT):
        record = await Engine(store, lease_ms=60).run(flow)

    assert record.status == RunStatus.RUNNING  # the other owner carries the run on
    assert record.context == {}
    step = (await steps_by_name(store, record.run_id))["stalls"]
    assert (step.status, step.worker_id, step.attempt) == (StepStatus.RUNNING, "other", 2)
    assert step.output is None
    assert EventKind.STEP_COMPLETED not in await history_kinds(store, record.run_id)


async def test_a_step_taken_over_while_it_runs_stops_here_even_under_the_same_owner_id(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    """Another driver claims the lapsed step while it still runs here: the heartbeat finds
    the lease taken, the attempt is cancelled and the run left to that driver.

    The other driver has this engine's owner id (owner ids are the caller's to
    give). Before, the step row then looked "still ours", and this process
    claimed the step again and ran it beside the other driver.
    """
    flow = new_flow()
    calls: Counter[str] = Counter()

    @flow.step()
    async def stalls(ctx: StepContext) -> dict[str, int]:
        calls["stalls"] += 1
        time.sleep(0.2)  # noqa: ASYNC251 - blocks the loop past the 60 ms lease
        await store.claim_step(  # another driver, same owner id, takes the lapsed step
            ctx.run_id, ctx.step_id, name=ctx.step_id, owner="host-1", lease_ms=60_000
        )
        await anyio.sleep(0.3)  # the heartbeat runs now: refused, the attempt is cancelled
        return {"attempt": ctx.attempt}

    with anyio.fail_after(LIMIT):
        record = await Engine(store, lease_ms=60, owner="host-1").run(flow)

    assert record.status == RunStatus.RUNNING  # the other driver carries the run on
    assert calls == {"stalls": 1}
    step = (await steps_by_name(store, record.run_id))["stalls"]
    assert (step.status, step.attempt) == (StepStatus.RUNNING, 2)


async def test_a_stalled_step_keeps_its_lease_and_is_not_run_twice(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    """The loop stalls past the lease while the step still runs; nobody claimed the step.

    The next heartbeat renews the lapsed lease (token and epoch unchanged), so
    the step carries on and is not started a second time beside itself.
    """
    flow = new_flow()
    attempts: list[int] = []

    @flow.step()
    async def stalls(ctx: StepContext) -> dict[str, int]:
        attempts.append(ctx.attempt)
        time.sleep(0.2)  # noqa: ASYNC251 - blocks the loop past the 60 ms lease
        await anyio.sleep(0.3)  # the heartbeat runs now and finds the lease lapsed
        return {"attempt": ctx.attempt}

    with anyio.fail_after(LIMIT):
        record = await Engine(store, lease_ms=60).run(flow)

    assert record.status == RunStatus.COMPLETED
    assert attempts == [1]
    assert record.context == {"attempt": 1}
    step = (await steps_by_name(store, record.run_id))["stalls"]
    assert step.status == StepStatus.COMPLETED
    assert step.attempt == 1


async def test_a_sync_step_never_overlaps_itself_when_the_loop_stalls(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    """A sibling blocks the loop past the lease while a sync step runs in its thread."""
    flow = new_flow()
    running: set[int] = set()
    overlaps: list[int] = []
    lock = threading.Lock()

    @flow.step()
    def slow_sync(ctx: StepContext) -> dict[str, int]:
        with lock:
            if running:
                overlaps.append(ctx.attempt)
            running.add(ctx.attempt)
        time.sleep(0.4)
        with lock:
            running.discard(ctx.attempt)
        return {"sync": ctx.attempt}

    @flow.step()
    async def hog(ctx: StepContext) -> None:
        await anyio.sleep(0.05)
        time.sleep(0.25)  # noqa: ASYNC251 - one stall of the event loop

    with anyio.fail_after(LIMIT):
        record = await Engine(store, lease_ms=100).run(flow)

    assert record.status == RunStatus.COMPLETED
    assert overlaps == []
    assert record.context == {"sync": 1}


async def test_a_cancel_from_another_process_is_not_overwritten_by_the_finish(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    """Engine B cancels a run engine A drives; A's late finish must not turn it completed."""
    flow = new_flow()

    @flow.step()
    async def slow(ctx: StepContext) -> dict[str, int]:
        await anyio.sleep(0.3)
        return {"a": 1}

    @flow.step(after=[slow])
    async def after_it(ctx: StepContext) -> dict[str, int]:
        return {"b": 2}

    with anyio.fail_after(LIMIT):
        async with Engine(store) as driver:
            run_id = await driver.start(flow)
            await anyio.sleep(0.1)
            cancelled = await Engine(store).cancel(run_id)
            final = await driver.wait(run_id, timeout=LIMIT)

    assert cancelled.status == RunStatus.CANCELLED
    assert final.status == RunStatus.CANCELLED
    stored = await store.get_run(run_id)
    assert stored is not None
    assert stored.status == RunStatus.CANCELLED
    assert "b" not in stored.context  # no new step started after the cancel


async def test_a_store_failure_stops_the_run_with_its_own_error_and_a_resume_finishes_it(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    """Raised as is, not in a task group's exception group; the run is left as stored.

    A fan-out, so sibling steps are running when the store fails under one of them.
    """
    flow = new_flow()
    calls: Counter[str] = Counter()

    @flow.step()
    async def root(ctx: StepContext) -> dict[str, int]:
        calls["root"] += 1
        return {"root": 1}

    for name in ("a", "b", "c"):

        @flow.step(name, after=[root])
        async def branch(ctx: StepContext) -> dict[str, int]:
            calls[ctx.step_id] += 1
            await anyio.sleep(0.01)
            return {ctx.step_id: 1}

    run_id = f"down-{uuid.uuid4().hex[:8]}"
    failing = Engine(
        cast(WorkflowStore, FailingCompletions(store, nth_calls(lambda call: call >= 1))),
        lease_ms=60,
    )
    with anyio.fail_after(LIMIT), pytest.raises(StoreDown):
        await failing.run(flow, run_id=run_id)
    with pytest.raises(StoreDown):  # not left polling a run nothing drives
        await failing.wait(run_id, timeout=LIMIT)
    stored = await store.get_run(run_id)
    assert stored is not None
    assert (stored.status, stored.context) == (RunStatus.RUNNING, {"root": 1})

    with anyio.fail_after(LIMIT):
        record = await Engine(store, lease_ms=60).run(flow, run_id=run_id)
    assert record.status == RunStatus.COMPLETED
    assert record.context == {"root": 1, "a": 1, "b": 1, "c": 1}
    assert calls["root"] == 1  # completed before the failure: never again


async def test_a_background_run_whose_store_fails_stops_alone_and_wait_raises_the_error(
    store: WorkflowStore, new_flow: NewFlow, caplog: pytest.LogCaptureFixture
) -> None:
    """The engine's other runs go on, ``async with`` exits cleanly, the run stays resumable.

    Before, the error went into the engine's task group: it cancelled every
    other run and left ``wait`` cancelled instead of raising it.
    """
    flow = new_flow()
    others_may_finish = anyio.Event()

    @flow.step()
    async def first(ctx: StepContext) -> dict[str, int]:
        return {"first": 1}

    @flow.step(after=[first])
    async def second(ctx: StepContext) -> dict[str, int]:
        if ctx.run_id != doomed:
            await others_may_finish.wait()
        return {"second": 1}

    doomed = f"doomed-{uuid.uuid4().hex[:8]}"
    faulty = FailingCompletions(store, lambda lease: lease.run_id == doomed)
    with anyio.fail_after(LIMIT):
        # A short lease: the resume waits out the one whose completion was lost.
        async with Engine(cast(WorkflowStore, faulty), lease_ms=60) as engine:
            other = await engine.start(flow)
            await engine.start(flow, run_id=doomed)
            with pytest.raises(StoreDown):
                await engine.wait(doomed)
            others_may_finish.set()  # the other run was not cancelled by the failure
            assert (await engine.wait(other)).status == RunStatus.COMPLETED
            with pytest.raises(StoreDown):  # asked again, after its driver has gone
                await engine.wait(doomed, timeout=LIMIT)
            stored = await store.get_run(doomed)
            assert stored is not None
            assert (stored.status, stored.context) == (RunStatus.RUNNING, {})

            faulty.fails = lambda lease: False  # the store is back
            await engine.resume(doomed)
            record = await engine.wait(doomed)
    assert record.status == RunStatus.COMPLETED
    assert record.context == {"first": 1, "second": 1}
    logged = [r for r in caplog.records if r.levelname == "ERROR" and doomed in r.getMessage()]
    assert len(logged) == 1, "the failure is logged once, even with nobody waiting"


class _SlowRenewals(PassThroughStore):
    """A store whose lease renewals take a while (a slow round trip), announced as they start."""

    def __init__(self, store: WorkflowStore) -> None:
        super().__init__(store)
        self.renewing = anyio.Event()

    async def renew_lease(self, *args: Any, **kwargs: Any) -> Any:
        self.renewing.set()
        await anyio.sleep(0.05)
        return await self.inner.renew_lease(*args, **kwargs)


async def test_a_result_recorded_after_its_lease_lapsed_survives_a_fail_fast_meanwhile(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    """The renewal that lets a lapsed step record its result is shielded like the record.

    A sibling fails for good while the renewal is under way: the step has run,
    so its result is kept (completed), not cancelled and run again later.
    """
    flow = new_flow()
    slow = _SlowRenewals(store)

    @flow.step()
    async def stalls(ctx: StepContext) -> dict[str, int]:
        time.sleep(0.2)  # noqa: ASYNC251 - blocks the loop past the 60 ms lease
        return {"stalled": ctx.attempt}

    @flow.step()
    async def fails(ctx: StepContext) -> None:
        await slow.renewing.wait()
        raise RuntimeError("boom")

    with anyio.fail_after(LIMIT):
        record = await Engine(cast(WorkflowStore, slow), lease_ms=60).run(flow)

    assert record.status == RunStatus.FAILED
    assert record.context == {"stalled": 1}
    steps = await steps_by_name(store, record.run_id)
    assert (steps["stalls"].status, steps["stalls"].attempt) == (StepStatus.COMPLETED, 1)


async def test_a_failed_lease_renewal_is_tried_again_not_taken_for_a_failed_step(
    store: WorkflowStore, new_flow: NewFlow, caplog: pytest.LogCaptureFixture
) -> None:
    """The store failing a heartbeat says nothing about the step: it runs on, once."""
    flow = new_flow()
    flaky = FailingRenewals(store, failures=3)
    attempts: list[int] = []

    @flow.step()
    async def slow(ctx: StepContext) -> dict[str, int]:
        attempts.append(ctx.attempt)
        await anyio.sleep(0.3)  # many renewals of a 60 ms lease
        return {"slow": ctx.attempt}

    with anyio.fail_after(LIMIT):
        record = await Engine(cast(WorkflowStore, flaky), lease_ms=60).run(flow)

    assert record.status == RunStatus.COMPLETED
    assert attempts == [1]
    assert record.context == {"slow": 1}
    assert flaky.failures == 0  # all three failed renewals happened while it ran
    warnings = [r for r in caplog.records if "renewing the lease" in r.getMessage()]
    assert len(warnings) == 3


class SlowClaimReplies(PassThroughStore):
    """Claims are made in the store at once, but their replies take a while to come
    back, as over a slow network: a cancel can land in between."""

    def __init__(self, inner: WorkflowStore, delay: float) -> None:
        super().__init__(inner)
        self.delay = delay

    async def claim_step(self, *args: Any, **kwargs: Any) -> Lease:
        lease: Lease = await self.inner.claim_step(*args, **kwargs)
        await anyio.sleep(self.delay)
        return lease


async def test_a_step_whose_claim_a_cancel_cut_short_is_handed_back_unrun(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    """Fail-fast lands while a sibling's claim is on its way back. Before, the
    sibling stayed ``running`` under a lease nobody knew (seen on Redis, where a
    claim's reply takes a round trip), and a resume waited out the whole lease."""
    flow = new_flow()
    seen: list[int] = []
    failing = True

    @flow.step(retry=RetryPolicy(retries=0))
    async def bad(ctx: StepContext) -> None:
        await anyio.sleep(0.05)  # while the sibling's claim reply is on its way
        if failing:
            raise ValueError("bad")

    @flow.step()
    async def other(ctx: StepContext) -> dict[str, int]:
        seen.append(ctx.attempt)
        return {"other": 1}

    slow = cast(WorkflowStore, SlowClaimReplies(store, delay=0.5))
    with anyio.fail_after(LIMIT):
        record = await Engine(slow, lease_ms=60_000).run(flow)
        assert record.status == RunStatus.FAILED
        steps = await steps_by_name(store, record.run_id)
        assert steps["other"].status == StepStatus.CANCELLED
        assert steps["other"].attempt == 0  # claimed and handed back: not a run
        failing = False
        async with Engine(store, lease_ms=60_000) as engine:  # no lease to wait out
            await engine.resume(record.run_id)
            record = await engine.wait(record.run_id)
    assert record.status == RunStatus.COMPLETED
    assert seen == [1]


async def test_a_step_claimed_ahead_and_handed_back_unrun_runs_first_as_attempt_1(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    """The opening step is claimed with the run's creation; a cancel before it ran
    hands it back. Its first run, after a resume, is attempt 1, not 2."""
    flow = new_flow()
    seen: list[int] = []

    @flow.step()
    async def first(ctx: StepContext) -> dict[str, int]:
        seen.append(ctx.attempt)
        return {"first": ctx.attempt}

    with anyio.fail_after(LIMIT):
        async with Engine(store) as engine:
            run_id = await engine.start(flow)
            assert (await engine.cancel(run_id)).status == RunStatus.CANCELLED
        assert seen == []
        assert (await steps_by_name(store, run_id))["first"].attempt == 0
        async with Engine(store) as engine:
            await engine.resume(run_id)
            record = await engine.wait(run_id)
    assert (record.status, record.context) == (RunStatus.COMPLETED, {"first": 1})
    assert seen == [1]


class SlowCompletionReply(PassThroughStore):
    """One step's completion is recorded at once but its reply comes back late, as
    over another connection: a later commit's reply overtakes it."""

    def __init__(self, inner: WorkflowStore, step_id: str, delay: float) -> None:
        super().__init__(inner)
        self.step_id, self.delay = step_id, delay

    async def complete_step(self, lease: Lease, **kwargs: Any) -> Any:
        recorded = await self.inner.complete_step(lease, **kwargs)
        if lease.step_id == self.step_id:
            await anyio.sleep(self.delay)
        return recorded


async def test_steps_after_parallel_steps_see_the_bag_as_stored_whatever_order_replies_come(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    """Two parallel steps set one key; the one that commits last wins in the store,
    and so in what the step after them sees. Before, the engine merged in the
    order the replies came back: on Redis, 17 runs in 60 showed the next step a
    bag the store never held."""
    flow = new_flow()

    @flow.step()
    async def early(ctx: StepContext) -> dict[str, str]:
        return {"k": "early", "early": "yes"}

    @flow.step()
    async def late(ctx: StepContext) -> dict[str, str]:
        await anyio.sleep(0.05)  # commits after ``early``, whose reply is slower still
        return {"k": "late"}

    @flow.step(after=[early, late])
    async def after(ctx: StepContext) -> dict[str, Any]:
        return {"seen": ctx.context["k"], "early seen": ctx.context["early"]}

    slow = cast(WorkflowStore, SlowCompletionReply(store, "early", delay=0.3))
    with anyio.fail_after(LIMIT):
        record = await Engine(slow).run(flow)
    assert record.status == RunStatus.COMPLETED
    assert record.context["k"] == "late"
    assert (record.context["seen"], record.context["early seen"]) == ("late", "yes")


async def test_an_output_another_driver_recorded_merges_in_its_commit_order(
    store: WorkflowStore, new_flow: NewFlow
) -> None:
    """``a`` is completed by another driver (setting ``k``) before ``b`` completes
    here (setting ``k`` last). This driver learns of ``a`` later, when its claim
    finds it completed: ``c`` must still see ``b``'s value, as stored."""
    flow = new_flow()
    other: dict[str, Lease] = {}

    @flow.step()
    async def s(ctx: StepContext) -> None:
        other["a"] = await store.claim_step(ctx.run_id, "a", name="a", owner="other")

    @flow.step(after=[s])
    async def a(ctx: StepContext) -> dict[str, str]:
        raise AssertionError("the other driver runs a")

    @flow.step(after=[s])
    async def b(ctx: StepContext) -> dict[str, str]:
        await anyio.sleep(0.4)  # while this driver's claim of a waits on the other's lease
        await store.complete_step(
            other["a"],
            output={"k": "a"},
            context_patch={"k": "a"},
            event=NewEvent(kind=EventKind.STEP_COMPLETED, payload={"step": "a", "attempt": 1}),
        )
        return {"k": "b"}

    @flow.step(after=[a, b])
    async def c(ctx: StepContext) -> dict[str, str]:
        return {"seen": ctx.context["k"]}

    with anyio.fail_after(LIMIT):
        record = await Engine(store).run(flow)
    assert record.status == RunStatus.COMPLETED
    assert record.context["k"] == "b"
    assert record.context["seen"] == "b"


class SilentClaims(PassThroughStore):
    """A store that takes claims and never answers them."""

    async def claim_step(self, *args: Any, **kwargs: Any) -> Lease:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")


async def test_a_claim_the_store_never_answers_holds_a_shutdown_only_so_long(
    store: WorkflowStore, new_flow: NewFlow, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim is awaited through a cancel (its lease is handed back if it comes),
    but not for ever: a store that never answers is given up on."""
    monkeypatch.setattr(stepflow.engine.attempts, "_CLAIM_PATIENCE", 0.3)
    flow = new_flow()

    @flow.step()
    async def first(ctx: StepContext) -> None:
        pass

    @flow.step(after=[first])
    async def second(ctx: StepContext) -> None:  # claimed ahead: never asks claim_step
        pass

    @flow.step()
    async def apart(ctx: StepContext) -> None:  # not the opening step: claim_step
        pass

    silent = cast(WorkflowStore, SilentClaims(store))
    with anyio.fail_after(LIMIT):
        async with Engine(silent) as engine:
            run_id = await engine.start(flow)
            await anyio.sleep(0.05)
        # Left the block within the patience, not never.
        with pytest.raises(StoreError, match="did not answer a claim"):
            await Engine(silent).run(flow)
    assert (await store.get_run(run_id)) is not None
