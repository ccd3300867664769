"""Golden histories: recorded runs replayed against today's code (Temporal-style replayer tests).

A durable run can sit in a store for days (waiting for an event, or crashed
until a worker resumes it) while a new release is deployed. Its history must
still replay with the new code: same commands, same order, same recorded
results. Each JSON file in ``tests/golden/`` is such a history, recorded once
from a real run on `MemoryStore`. A test seeds a fresh store with the run and
its events (``create_run`` + ``append_event``, exactly as recorded, minus the
final ``run_completed``: the worst case, a crash right before the run
finished), resumes it, and checks that it completes with the recorded output
without calling any step function, child workflow or prune: all of them
raise here. Replayed against deliberately changed code, a history must fail
the run with `NonDeterminismError` instead.

Regenerate the files (only when a history format change is intended; keep
the old files too, in-flight runs still have them) with::

    python tests/test_golden_replay.py
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import stepflow
from stepflow import (
    DurableWorkflow,
    Engine,
    EventKind,
    EventTimeoutError,
    MemoryStore,
    NewEvent,
    PruneOptions,
    PruneResult,
    RunRecord,
    RunStatus,
    StepFailedError,
    WorkflowContext,
    registry,
)

pytestmark = pytest.mark.anyio

GOLDEN = Path(__file__).parent / "golden"
LIMIT = 5.0

Steps = dict[str, Callable[..., Any]]
"""Step functions by name: the real ones when recording, forbidden ones when replaying."""


# --- the recorded workflows ---------------------------------------------------------------------


def ship_workflow(body: Callable[..., Any] | None = None) -> DurableWorkflow:
    async def ship(ctx: WorkflowContext, parcel: dict[str, Any]) -> dict[str, Any]:
        if body is not None:
            return dict(await body(ctx, parcel))
        label = await ctx.step(lambda: f"LBL-{parcel['order']}", name="print_label")
        return {"label": label, "carrier": "parcel-co"}

    return stepflow.workflow("golden-ship")(ship)


def order_workflow(steps: Steps, child: DurableWorkflow) -> DurableWorkflow:
    """Every durable command once: steps (async, sync, failing), timers, events, child, prune."""

    async def order(ctx: WorkflowContext, request: dict[str, Any]) -> dict[str, Any]:
        price = await ctx.step(steps["quote"], request["qty"], name="quote")
        await ctx.sleep(0.01)
        seat = await ctx.step(steps["reserve"], request["order"], name="reserve")
        try:
            await ctx.step(steps["gift_card"], name="gift_card")
            payment = "gift card"
        except StepFailedError as exc:
            payment = f"card (gift card: {exc.error['type']})"
        approval = await ctx.wait_for_event("approval")
        try:
            await ctx.wait_for_event("cancel", timeout=0.01)
            cancelled = True
        except EventTimeoutError:
            cancelled = False
        shipment = await ctx.child(child, {"order": request["order"]})
        pruned = await ctx.prune_history(PruneOptions(keep_last=1))
        return {
            "price": price,
            "seat": seat,
            "payment": payment,
            "approved_by": approval["by"],
            "cancelled": cancelled,
            "shipment": shipment,
            "pruned": pruned.executions_deleted,
            "receipt": ctx.uuid(),
            "lucky": ctx.random().randint(1, 1000),
            "finished_at": ctx.now(),
        }

    return stepflow.workflow("golden-order")(order)


def real_order_steps() -> Steps:
    async def quote(qty: int) -> int:
        return qty * 250

    def reserve(order: str) -> str:
        return f"seat-for-{order}"

    def gift_card() -> None:
        raise ValueError("gift card expired")

    return {"quote": quote, "reserve": reserve, "gift_card": gift_card}


def greet_workflow(variant: str, steps: Steps) -> DurableWorkflow:
    """A tiny workflow whose changed variants must not replay its history."""

    async def greet(ctx: WorkflowContext, user: str) -> str:
        profile = await ctx.step(steps["lookup_user"], user, name="lookup_user")
        if variant == "recorded":
            return str(await ctx.step(steps["send_greeting"], profile, name="send_greeting"))
        if variant == "renamed step":
            return str(await ctx.step(steps["send_greeting"], profile, name="send_sms"))
        if variant == "sleep inserted":
            await ctx.sleep(1)
            return str(await ctx.step(steps["send_greeting"], profile, name="send_greeting"))
        assert variant == "step removed"
        return f"no greeting for {profile}"

    return stepflow.workflow("golden-greet")(greet)


def real_greet_steps() -> Steps:
    return {
        "lookup_user": lambda user: {"name": user.title()},
        "send_greeting": lambda profile: f"Hello, {profile['name']}!",
    }


# --- recording ----------------------------------------------------------------------------------


def _without_tracebacks(value: Any) -> Any:
    """Tracebacks name local paths and are never read on replay: keep the files readable."""
    if isinstance(value, dict):
        return {k: "..." if k == "traceback" else _without_tracebacks(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_tracebacks(item) for item in value]
    return value


async def record_order() -> dict[str, Any]:
    store = MemoryStore()
    flow = order_workflow(real_order_steps(), ship_workflow())
    async with Engine(store) as engine:
        run_id = await engine.start(flow, {"order": "A-17", "qty": 2}, run_id="golden-order-1")
        await engine.raise_event(run_id, "approval", {"by": "ana"})
        await engine.wait(run_id, timeout=LIMIT)
    return await _dump(store, run_id, "Every durable command once; events raised before the wait.")


async def record_greet() -> dict[str, Any]:
    store = MemoryStore()
    flow = greet_workflow("recorded", real_greet_steps())
    record = await Engine(store).run(flow, "ada", run_id="golden-greet-1")
    return await _dump(store, record.run_id, "Two steps; changed variants must not replay it.")


async def _dump(store: MemoryStore, run_id: str, description: str) -> dict[str, Any]:
    record = await store.get_run(run_id)
    assert record is not None
    assert record.status == RunStatus.COMPLETED, record.error
    history = await store.read_history(run_id)
    return {
        "description": description,
        "run": record.model_dump(
            include={"run_id", "workflow", "version", "input", "created_at", "updated_at"}
        ),
        "output": record.output,
        "history": [_without_tracebacks(event.model_dump(mode="json")) for event in history],
    }


RECORDERS = {"order.json": record_order, "greet.json": record_greet}


def write_golden(directory: Path) -> list[Path]:
    """Record every golden history into ``directory`` (pretty JSON, one file per run)."""

    async def record_all() -> list[Path]:
        written = []
        for filename, recorder in RECORDERS.items():
            path = directory / filename
            path.write_text(json.dumps(await recorder(), indent=2) + "\n")
            written.append(path)
        return written

    try:
        return anyio.run(record_all)
    finally:
        for name in ("golden-order", "golden-ship", "golden-greet"):
            registry.unregister(name)


# --- replaying ----------------------------------------------------------------------------------


def load(filename: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((GOLDEN / filename).read_text())
    return data


class Forbidden:
    """Stand-ins for everything a replay must not do again; they note the call and raise."""

    def __init__(self) -> None:
        self.called: list[str] = []

    def step(self, name: str) -> Callable[..., Any]:
        def forbidden(*args: Any) -> Any:
            self.called.append(name)
            raise AssertionError(f"step {name!r} was called during a replay")

        return forbidden

    def steps(self, *names: str) -> Steps:
        return {name: self.step(name) for name in names}

    async def child_body(self, ctx: WorkflowContext, parcel: Any) -> Any:
        self.called.append("child workflow")
        raise AssertionError("the child workflow ran during a replay")

    async def prune(self, run_id: str, options: PruneOptions) -> PruneResult:
        self.called.append("prune_executions")
        raise AssertionError("history was pruned again during a replay")


async def seed(golden: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> MemoryStore:
    """A store holding the recorded run, cut right before its final event, as recorded.

    The store's clock is pinned to each event's recorded time while it is
    appended, so timestamps (and with them ``ctx.now()``) are the recorded ones.
    """
    store = MemoryStore()
    run = RunRecord(**golden["run"], status=RunStatus.RUNNING)
    await store.create_run(run)
    *seeded, final = golden["history"]
    assert final["kind"] == EventKind.RUN_COMPLETED
    for recorded in seeded:
        with monkeypatch.context() as clock:
            at = recorded["timestamp"]
            clock.setattr("stepflow.store.memory.now_ms", lambda at=at: at)
            event = await store.append_event(
                run.run_id,
                NewEvent(kind=recorded["kind"], payload=recorded["payload"]),
                execution_id=1,
            )
        assert event.model_dump(mode="json") == recorded, "the store did not keep the event as is"
    return store


async def replay(store: MemoryStore, run_id: str, *flows: DurableWorkflow) -> RunRecord:
    with anyio.fail_after(LIMIT):
        async with Engine(store, workflows=flows) as engine:
            await engine.resume(run_id)
            return await engine.wait(run_id, timeout=LIMIT)


@pytest.fixture
def forbidden(monkeypatch: pytest.MonkeyPatch) -> Iterator[Forbidden]:
    yield Forbidden()
    for name in ("golden-order", "golden-ship", "golden-greet"):
        registry.unregister(name)


async def test_order_history_replays_to_its_recorded_output(
    forbidden: Forbidden, monkeypatch: pytest.MonkeyPatch
) -> None:
    golden = load("order.json")
    store = await seed(golden, monkeypatch)
    monkeypatch.setattr(store, "prune_executions", forbidden.prune)
    child = ship_workflow(forbidden.child_body)
    flow = order_workflow(forbidden.steps("quote", "reserve", "gift_card"), child)

    record = await replay(store, golden["run"]["run_id"], flow, child)

    assert record.status == RunStatus.COMPLETED, record.error
    assert forbidden.called == []
    assert record.output == golden["output"]
    history = [event.model_dump(mode="json") for event in await store.read_history(record.run_id)]
    assert history[:-1] == golden["history"][:-1], "the replay recorded something new"
    assert history[-1]["kind"] == "run_completed"


async def test_greet_history_replays_to_its_recorded_output(
    forbidden: Forbidden, monkeypatch: pytest.MonkeyPatch
) -> None:
    golden = load("greet.json")
    store = await seed(golden, monkeypatch)
    flow = greet_workflow("recorded", forbidden.steps("lookup_user", "send_greeting"))

    record = await replay(store, golden["run"]["run_id"], flow)

    assert record.status == RunStatus.COMPLETED, record.error
    assert record.output == golden["output"] == "Hello, Ada!"
    assert forbidden.called == []


@pytest.mark.parametrize(
    ("variant", "recorded", "asked"),
    [
        ("renamed step", "'send_greeting'", "'send_sms'"),
        ("sleep inserted", "step 'send_greeting'", "sleep"),
        ("step removed", "step 'send_greeting'", "no further command"),
    ],
)
async def test_greet_history_refuses_changed_code(
    forbidden: Forbidden,
    monkeypatch: pytest.MonkeyPatch,
    variant: str,
    recorded: str,
    asked: str,
) -> None:
    golden = load("greet.json")
    store = await seed(golden, monkeypatch)
    flow = greet_workflow(variant, forbidden.steps("lookup_user", "send_greeting"))

    record = await replay(store, golden["run"]["run_id"], flow)

    assert record.status == RunStatus.FAILED
    assert record.output is None
    assert record.error["type"] == "NonDeterminismError"
    assert recorded in record.error["message"]
    assert asked in record.error["message"]
    assert forbidden.called == []


async def test_the_recorder_still_produces_the_committed_command_sequence(tmp_path: Path) -> None:
    """Guards the generator itself: today's code records the same commands as the files.

    Only the commands' events are compared: where an event raised right after
    ``start`` lands relative to ``run_started`` is up to the engine.
    """

    def commands(golden: dict[str, Any]) -> list[tuple[Any, ...]]:
        return [
            (event["kind"], *(event["payload"][k] for k in ("seq", "command", "name")))
            for event in golden["history"]
            if isinstance(event["payload"], dict) and "seq" in event["payload"]
        ]

    await anyio.to_thread.run_sync(write_golden, tmp_path)
    for filename in RECORDERS:
        fresh, committed = json.loads((tmp_path / filename).read_text()), load(filename)
        assert commands(fresh) == commands(committed), filename
        assert without_clock(fresh["output"]) == without_clock(committed["output"]), filename


def without_clock(output: Any) -> Any:
    """An output minus its ``ctx.now()`` value, the one thing that differs between recordings."""
    if isinstance(output, dict):
        return {key: value for key, value in output.items() if key != "finished_at"}
    return output


if __name__ == "__main__":
    for path in write_golden(GOLDEN if len(sys.argv) < 2 else Path(sys.argv[1])):
        print(f"wrote {path}")
