"""One behavioural suite for every `WorkflowStore`: memory, fakeredis and real Redis.

Each test runs once per store kind through the parametrised ``store`` fixture;
MemoryStore is the reference and every backend must behave the same.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest
from conftest import make_store

from stepflow import (
    ConflictError,
    EventKind,
    ExecutionNotFoundError,
    InvalidArgumentError,
    InvalidPayloadError,
    InvalidRunIdError,
    InvalidStepIdError,
    Lease,
    LeaseHeldError,
    NewEvent,
    PayloadTooLargeError,
    PruneOptions,
    RunCancelledError,
    RunNotFoundError,
    RunRecord,
    RunStatus,
    StaleLeaseError,
    StepAlreadyCompletedError,
    StepClaim,
    StepState,
    StepStatus,
    WorkflowStore,
)
from stepflow._json import MIN_PAYLOAD_BYTES
from stepflow.models import now_ms

pytestmark = pytest.mark.anyio

# -- helpers ------------------------------------------------------------------


def record(run_id: str = "r1", **fields: Any) -> RunRecord:
    fields.setdefault("workflow", "wf")
    return RunRecord(run_id=run_id, **fields)


async def new_run(store: WorkflowStore, run_id: str = "r1", **fields: Any) -> RunRecord:
    run = record(run_id, **fields)
    await store.create_run(run)
    return run


async def claim(
    store: WorkflowStore, step_id: str = "s1", *, run_id: str = "r1", **options: Any
) -> Lease:
    options.setdefault("owner", "worker-a")
    return await store.claim_step(run_id, step_id, name=step_id, **options)


async def claim_when_free(store: WorkflowStore, step_id: str = "s1", **options: Any) -> Lease:
    """Claim as soon as the current lease has expired (bounded by a time limit)."""
    with anyio.fail_after(5):
        while True:
            try:
                return await claim(store, step_id, **options)
            except LeaseHeldError:
                await anyio.sleep(0.01)


def event(kind: EventKind = EventKind.STEP_COMPLETED, payload: Any = None) -> NewEvent:
    return NewEvent(kind=kind, payload=payload)


async def snapshot(store: WorkflowStore, run_id: str = "r1") -> dict[str, Any]:
    """Everything a reader can observe of one run."""
    run = await store.get_run(run_id)
    steps = [step.model_dump() for step in await store.list_steps(run_id)]
    if run is None:
        return {"run": None, "steps": steps}
    executions = await store.list_executions(run_id)
    history = {
        x.execution_id: [e.model_dump() for e in await store.read_history(run_id, x.execution_id)]
        for x in executions
    }
    return {
        "run": run.model_dump(),
        "steps": steps,
        "executions": [x.model_dump() for x in executions],
        "history": history,
    }


async def sleep_past(store: WorkflowStore, lease: Lease) -> None:
    """Wait until the store's clock has passed the lease's expiry."""
    with anyio.fail_after(5):
        await anyio.sleep((lease.expires_at - await store.time_ms()) / 1000 + 0.02)
    assert await store.time_ms() > lease.expires_at


async def step_of(store: WorkflowStore, step_id: str = "s1", run_id: str = "r1") -> StepState:
    step = await store.get_step(run_id, step_id)
    assert step is not None
    return step


async def kinds(store: WorkflowStore, run_id: str = "r1", execution_id: int = 1) -> list[str]:
    return [e.kind.value for e in await store.read_history(run_id, execution_id)]


LIMIT = MIN_PAYLOAD_BYTES


@pytest.fixture
async def small_store(
    store_kind: str, key_prefix: str, request: pytest.FixtureRequest
) -> AsyncIterator[WorkflowStore]:
    """A store of the same kind whose payload limit is only ``LIMIT`` bytes."""
    store = await make_store(store_kind, key_prefix, request, max_payload_bytes=LIMIT)
    yield store
    await store.aclose()


# -- runs -----------------------------------------------------------------------


async def test_create_run_then_get_run_returns_every_field(store: WorkflowStore) -> None:
    run = record(
        workflow="ingest",
        version="3",
        status=RunStatus.RUNNING,
        input={"url": "https://x", "n": [1, 2.5, None, True]},
        context={"seen": ["a"], "nested": {"k": "v"}},
        created_at=1_000,
        updated_at=2_000,
        parent_run_id="parent-1",
    )
    await store.create_run(run)
    assert await store.get_run("r1") == run


async def test_get_run_of_absent_run_is_none(store: WorkflowStore) -> None:
    assert await store.get_run("missing") is None


async def test_create_run_starts_the_current_execution(store: WorkflowStore) -> None:
    await new_run(store, input={"q": 1}, created_at=5_000)
    [execution] = await store.list_executions("r1")
    assert execution.execution_id == 1
    assert execution.status == RunStatus.PENDING
    assert execution.input == {"q": 1}
    assert execution.started_at == 5_000
    assert execution.event_count == 0
    assert await store.read_history("r1") == []


async def test_create_run_only_if_absent_leaves_an_existing_run_alone(
    store: WorkflowStore,
) -> None:
    await new_run(store, context={"kept": 1})
    await store.merge_context("r1", {"work": "done"})
    await store.set_run_status("r1", RunStatus.COMPLETED, execution_id=1)
    again = record(status=RunStatus.PENDING, input={"other": True})
    assert await store.create_run(again, only_if_absent=True) is False
    run = await store.get_run("r1")
    assert run is not None
    assert run.context == {"kept": 1, "work": "done"}
    assert run.input != {"other": True}
    assert [r.run_id for r in await store.list_runs_by_status(RunStatus.COMPLETED)] == ["r1"]
    assert await store.list_runs_by_status(RunStatus.PENDING) == []
    assert await store.create_run(record("r2"), only_if_absent=True) is True
    assert {r.run_id for r in await store.list_runs()} == {"r1", "r2"}


async def test_create_run_overwrites_record_replaces_context_and_keeps_steps_and_history(
    store: WorkflowStore,
) -> None:
    await new_run(store, input="old", context={"a": 1, "b": 2})
    await store.upsert_step("r1", StepState(step_id="s1", name="s1", status=StepStatus.COMPLETED))
    await store.append_event("r1", event(EventKind.RUN_STARTED), execution_id=1)

    resumed = record(input="new", status=RunStatus.RUNNING, context={"c": 3}, version="2")
    await store.create_run(resumed)

    assert await store.get_run("r1") == resumed
    assert [s.step_id for s in await store.list_steps("r1")] == ["s1"]
    assert await kinds(store) == ["run_started"]
    [execution] = await store.list_executions("r1")
    assert execution.status == RunStatus.RUNNING


async def test_update_context_replaces_the_whole_bag(store: WorkflowStore) -> None:
    await new_run(store, context={"a": 1, "b": 2})
    await store.update_context("r1", {"c": 3})
    run = await store.get_run("r1")
    assert run is not None
    assert run.context == {"c": 3}


async def test_merge_context_sets_keys_and_keeps_the_others(store: WorkflowStore) -> None:
    await new_run(store, context={"a": 1, "b": {"deep": 1}})
    await store.merge_context("r1", {"b": {"other": 2}, "c": None})
    run = await store.get_run("r1")
    assert run is not None
    assert run.context == {"a": 1, "b": {"other": 2}, "c": None}


@pytest.mark.parametrize("method", ["update_context", "merge_context"])
async def test_context_write_on_unknown_run_raises_not_found(
    store: WorkflowStore, method: str
) -> None:
    with pytest.raises(RunNotFoundError) as caught:
        await getattr(store, method)("ghost", {"a": 1})
    assert caught.value.run_id == "ghost"
    assert await store.get_run("ghost") is None


async def test_concurrent_context_merges_lose_no_key(store: WorkflowStore) -> None:
    await new_run(store, context={"start": True})

    async def merge(i: int) -> None:
        await store.merge_context("r1", {f"k{i}": i})

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(merge, i)
    run = await store.get_run("r1")
    assert run is not None
    assert run.context == {"start": True, **{f"k{i}": i for i in range(50)}}


async def test_delete_run_removes_everything_of_the_run(store: WorkflowStore) -> None:
    await new_run(store, context={"a": 1})
    lease = await claim(store)
    await store.complete_step(lease, event=event())
    await store.continue_as_new("r1", "next", execution_id=1)
    await new_run(store, "other")

    assert await store.delete_run("r1") is True

    assert await store.get_run("r1") is None
    assert await store.get_step("r1", "s1") is None
    assert await store.list_steps("r1") == []
    assert [r.run_id for r in await store.list_runs()] == ["other"]
    assert await store.list_runs_by_status(RunStatus.RUNNING) == []
    with pytest.raises(RunNotFoundError):
        await store.read_history("r1", 1)
    with pytest.raises(RunNotFoundError):
        await store.list_executions("r1")
    assert await store.get_run("other") is not None


async def test_delete_of_unknown_run_returns_false(store: WorkflowStore) -> None:
    assert await store.delete_run("ghost") is False
    await new_run(store)
    assert await store.delete_run("r1") is True
    assert await store.delete_run("r1") is False


async def test_a_deleted_run_id_starts_fresh_when_created_again(store: WorkflowStore) -> None:
    await new_run(store, context={"a": 1})
    await store.complete_step(await claim(store), event=event())
    await store.delete_run("r1")

    await new_run(store)
    after = await snapshot(store)
    assert after["run"]["context"] == {}
    assert after["steps"] == []
    assert [x["event_count"] for x in after["executions"]] == [0]
    assert after["history"] == {1: []}
    assert (await claim(store)).epoch == 1


async def test_list_runs_is_newest_first_with_limit_and_offset(store: WorkflowStore) -> None:
    for i in range(7):
        await new_run(store, f"run-{i}", created_at=1_000 + i)
    newest_first = [f"run-{i}" for i in reversed(range(7))]

    assert [r.run_id for r in await store.list_runs()] == newest_first
    pages = [await store.list_runs(limit=3, offset=offset) for offset in (0, 3, 6, 9)]
    assert [[r.run_id for r in page] for page in pages] == [
        newest_first[0:3],
        newest_first[3:6],
        newest_first[6:],
        [],
    ]
    assert await store.list_runs(limit=0) == []


async def test_list_runs_returns_records_with_their_context(store: WorkflowStore) -> None:
    run = await new_run(store, context={"k": [1]}, input={"x": 1})
    assert await store.list_runs() == [run]


async def test_list_runs_orders_equal_creation_times_by_id(store: WorkflowStore) -> None:
    for run_id in ("b", "a", "c"):
        await new_run(store, run_id, created_at=1_000)
    assert [r.run_id for r in await store.list_runs()] == ["c", "b", "a"]


async def test_list_runs_by_status_accepts_any_case(store: WorkflowStore) -> None:
    await new_run(store, "done-1", status=RunStatus.COMPLETED, created_at=1)
    await new_run(store, "done-2", status=RunStatus.COMPLETED, created_at=2)
    await new_run(store, "busy", status=RunStatus.RUNNING, created_at=3)

    for status in ("Completed", "COMPLETED", "completed", RunStatus.COMPLETED):
        found = await store.list_runs_by_status(status)
        assert [r.run_id for r in found] == ["done-2", "done-1"]
    assert [r.run_id for r in await store.list_runs_by_status("completed", offset=1)] == ["done-1"]
    assert await store.list_runs_by_status("Failed") == []


async def test_list_runs_by_status_follows_status_changes(store: WorkflowStore) -> None:
    await new_run(store, status=RunStatus.RUNNING)
    await store.set_run_status("r1", RunStatus.FAILED, execution_id=1, error={"type": "X"})
    assert await store.list_runs_by_status("running") == []
    assert [r.run_id for r in await store.list_runs_by_status("failed")] == ["r1"]

    await store.continue_as_new("r1", None, execution_id=1)
    assert await store.list_runs_by_status("failed") == []
    assert [r.run_id for r in await store.list_runs_by_status("running")] == ["r1"]


@pytest.mark.parametrize(
    ("status", "terminal"),
    [
        (RunStatus.COMPLETED, True),
        (RunStatus.FAILED, True),
        (RunStatus.CANCELLED, True),
        (RunStatus.RUNNING, False),
        (RunStatus.PENDING, False),
    ],
)
async def test_set_run_status_moves_run_and_execution(
    store: WorkflowStore, status: RunStatus, terminal: bool
) -> None:
    await new_run(store, status=RunStatus.RUNNING)
    before = now_ms()
    updated = await store.set_run_status(
        "r1", status, execution_id=1, output={"answer": 42}, error=None
    )
    assert updated == await store.get_run("r1")
    assert updated.status == status
    assert updated.output == {"answer": 42}
    assert updated.updated_at >= before - 1_000
    assert (updated.completed_at is not None) is terminal
    [execution] = await store.list_executions("r1")
    assert execution.status == status
    assert execution.output == {"answer": 42}
    assert (execution.completed_at is not None) is terminal


async def test_set_run_status_accepts_status_text_in_any_case(store: WorkflowStore) -> None:
    await new_run(store)
    updated = await store.set_run_status("r1", "Completed", execution_id=1)  # type: ignore[arg-type]
    assert updated.status == RunStatus.COMPLETED


async def test_set_run_status_appends_its_event(store: WorkflowStore) -> None:
    await new_run(store)
    await store.set_run_status(
        "r1",
        RunStatus.COMPLETED,
        execution_id=1,
        event=event(EventKind.RUN_COMPLETED, {"ok": True}),
    )
    [done] = await store.read_history("r1")
    assert (done.event_id, done.kind, done.payload) == (1, EventKind.RUN_COMPLETED, {"ok": True})


async def test_set_run_status_on_another_execution_conflicts(store: WorkflowStore) -> None:
    await new_run(store, status=RunStatus.RUNNING)
    await store.continue_as_new("r1", None, execution_id=1)
    before = await snapshot(store)
    with pytest.raises(ConflictError):
        await store.set_run_status(
            "r1", RunStatus.COMPLETED, execution_id=1, event=event(EventKind.RUN_COMPLETED)
        )
    assert await snapshot(store) == before


@pytest.mark.parametrize("finished", [RunStatus.COMPLETED, RunStatus.FAILED])
async def test_a_finished_run_is_not_cancelled(store: WorkflowStore, finished: RunStatus) -> None:
    """A cancel that read the run before it finished must not overwrite its outcome."""
    await new_run(store, status=RunStatus.RUNNING)
    await store.set_run_status("r1", finished, execution_id=1, output={"answer": 42})
    before = await snapshot(store)
    with pytest.raises(ConflictError, match=f"it is {finished}"):
        await store.set_run_status(
            "r1", RunStatus.CANCELLED, execution_id=1, event=event(EventKind.RUN_CANCELLED)
        )
    assert await snapshot(store) == before
    resumed = await store.set_run_status("r1", RunStatus.RUNNING, execution_id=1)
    assert resumed.status == RunStatus.RUNNING  # a resume of a failed run is still allowed


_FINISH_EVENTS = {
    RunStatus.COMPLETED: EventKind.RUN_COMPLETED,
    RunStatus.FAILED: EventKind.RUN_FAILED,
    RunStatus.CANCELLED: EventKind.RUN_CANCELLED,
}


@pytest.mark.parametrize(
    ("finished", "again"),
    [(status, status) for status in _FINISH_EVENTS] + [(RunStatus.COMPLETED, RunStatus.FAILED)],
)
async def test_a_second_finish_leaves_the_run_as_the_first_left_it(
    store: WorkflowStore, finished: RunStatus, again: RunStatus
) -> None:
    """Two drivers of one run both finish it: the first finish stands, its history unrepeated.

    A completed run is final. Events recorded between the finishes are
    counted in the store's metrics all the same.
    """
    await new_run(store, status=RunStatus.RUNNING)

    async def finish(status: RunStatus, by: str) -> RunRecord:
        return await store.set_run_status(
            "r1",
            status,
            execution_id=1,
            output={"by": by},
            error={"type": by},
            event=event(_FINISH_EVENTS[status]),
        )

    first = await finish(finished, "first")
    if finished != RunStatus.CANCELLED:  # a cancelled run's history takes no more
        await store.append_event("r1", event(EventKind.STEP_FAILED), execution_id=1)
    before = await snapshot(store)
    assert await finish(again, "second") == first
    assert await snapshot(store) == before
    history = await store.read_history("r1")
    assert [e.kind for e in history].count(_FINISH_EVENTS[again]) == (again == finished)
    assert (await store.get_metrics()).total_events == len(history)


async def test_set_run_status_of_unknown_run_raises_not_found(store: WorkflowStore) -> None:
    with pytest.raises(RunNotFoundError):
        await store.set_run_status("ghost", RunStatus.COMPLETED, execution_id=1)
    assert await store.get_run("ghost") is None


async def test_time_ms_is_the_current_time(store: WorkflowStore) -> None:
    assert abs(await store.time_ms() - now_ms()) < 5_000


# -- steps ----------------------------------------------------------------------


async def test_upsert_step_then_get_step_returns_it(store: WorkflowStore) -> None:
    await new_run(store)
    step = StepState(
        step_id="fetch",
        name="fetch",
        status=StepStatus.SKIPPED,
        attempt=2,
        input={"a": [1]},
        output="out",
        error={"type": "E"},
        started_at=10,
        finished_at=20,
        worker_id="w",
        execution_id=1,
    )
    await store.upsert_step("r1", step)
    assert await store.get_step("r1", "fetch") == step
    assert await store.list_steps("r1") == [step]


async def test_get_step_of_absent_step_or_run_is_none(store: WorkflowStore) -> None:
    await new_run(store)
    assert await store.get_step("r1", "nope") is None
    assert await store.get_step("ghost", "s1") is None


async def test_list_steps_of_unknown_run_is_empty(store: WorkflowStore) -> None:
    assert await store.list_steps("ghost") == []


async def test_upsert_keep_completed_never_undoes_a_completion(store: WorkflowStore) -> None:
    await new_run(store)
    lease = await store.claim_step("r1", "s1", name="s1", owner="w1")
    await store.complete_step(lease, output={"done": True})
    skipped = StepState(step_id="s1", name="s1", status=StepStatus.SKIPPED)
    assert await store.upsert_step("r1", skipped, keep_completed=True) is False
    step = await store.get_step("r1", "s1")
    assert step is not None
    assert (step.status, step.output) == (StepStatus.COMPLETED, {"done": True})
    fresh = StepState(step_id="s2", name="s2", status=StepStatus.SKIPPED)
    assert await store.upsert_step("r1", fresh, keep_completed=True) is True
    assert [s.step_id for s in await store.list_steps("r1")] == ["s1", "s2"]


async def test_upsert_step_on_unknown_run_raises_not_found(store: WorkflowStore) -> None:
    with pytest.raises(RunNotFoundError):
        await store.upsert_step("ghost", StepState(step_id="s1", name="s1"))
    assert await store.list_steps("ghost") == []


async def test_list_steps_keeps_insertion_order_across_updates(store: WorkflowStore) -> None:
    await new_run(store)
    for step_id in ("c", "a", "b"):
        await store.upsert_step("r1", StepState(step_id=step_id, name=step_id))
    await store.upsert_step("r1", StepState(step_id="a", name="a", status=StepStatus.SKIPPED))
    await claim(store, "c")
    await claim(store, "z")
    assert [s.step_id for s in await store.list_steps("r1")] == ["c", "a", "b", "z"]


async def test_list_steps_keeps_insertion_order_past_140_steps(store: WorkflowStore) -> None:
    """Past ~128 fields Redis stores a hash unordered; the order must not depend on it."""
    await new_run(store)
    step_ids = [f"step-{(i * 37) % 150:03d}" for i in range(150)]
    for i, step_id in enumerate(step_ids):
        if i % 2:
            await claim(store, step_id)
        else:
            await store.upsert_step("r1", StepState(step_id=step_id, name=step_id))
    steps = await store.list_steps("r1")
    assert [s.step_id for s in steps] == step_ids
    assert {s.status for s in steps} == {StepStatus.PENDING, StepStatus.RUNNING}


async def test_claim_step_starts_a_running_attempt_under_a_lease(store: WorkflowStore) -> None:
    await new_run(store)
    before = await store.time_ms()
    lease = await claim(store, owner="worker-a", lease_ms=10_000, input={"x": 1})
    assert (lease.run_id, lease.step_id, lease.owner, lease.epoch) == ("r1", "s1", "worker-a", 1)
    assert before + 10_000 <= lease.expires_at <= before + 15_000
    step = await step_of(store)
    assert step.status == StepStatus.RUNNING
    assert step.attempt == 1
    assert step.input == {"x": 1}
    assert step.worker_id == "worker-a"
    assert step.started_at is not None


async def test_claim_while_a_lease_is_live_is_refused(store: WorkflowStore) -> None:
    await new_run(store)
    first = await claim(store, owner="worker-a", lease_ms=10_000)
    before = await snapshot(store)
    with pytest.raises(LeaseHeldError) as caught:
        await claim(store, owner="worker-b")
    assert caught.value.owner == "worker-a"
    assert caught.value.expires_at == first.expires_at
    assert await snapshot(store) == before


async def test_claim_after_expiry_succeeds_with_a_higher_epoch(store: WorkflowStore) -> None:
    await new_run(store)
    first = await claim(store, owner="worker-a", lease_ms=50)
    second = await claim_when_free(store, owner="worker-b", lease_ms=10_000)
    assert second.epoch > first.epoch
    assert second.token != first.token
    assert (first.attempt, second.attempt) == (1, 2)  # a takeover is another attempt
    step = await step_of(store)
    assert (step.worker_id, step.attempt) == ("worker-b", 2)


async def test_completion_with_a_taken_over_lease_is_refused(store: WorkflowStore) -> None:
    await new_run(store, context={"a": 1})
    old = await claim(store, owner="worker-a", lease_ms=50)
    await claim_when_free(store, owner="worker-b", lease_ms=10_000)
    before = await snapshot(store)
    with pytest.raises(StaleLeaseError):
        await store.complete_step(old, output="late", context_patch={"a": 2}, event=event())
    with pytest.raises(StaleLeaseError):
        await store.fail_step(old, error="late", final=True, event=event())
    with pytest.raises(StaleLeaseError):
        await store.renew_lease(old)
    assert await snapshot(store) == before


async def test_completion_with_an_expired_lease_is_refused(store: WorkflowStore) -> None:
    await new_run(store)
    lease = await claim(store, lease_ms=50)
    await sleep_past(store, lease)
    before = await snapshot(store)
    with pytest.raises(StaleLeaseError):
        await store.complete_step(lease, output=1)
    assert await snapshot(store) == before


async def test_renew_lease_extends_a_live_lease(store: WorkflowStore) -> None:
    await new_run(store)
    lease = await claim(store, lease_ms=200)
    renewed = await store.renew_lease(lease, lease_ms=10_000)
    assert renewed.expires_at > lease.expires_at
    assert (renewed.token, renewed.epoch) == (lease.token, lease.epoch)
    await sleep_past(store, lease)
    with pytest.raises(LeaseHeldError):
        await claim(store, owner="worker-b")
    await store.complete_step(renewed, output="ok")
    assert (await step_of(store)).status == StepStatus.COMPLETED


async def test_renew_lease_is_refused_once_the_run_is_cancelled(store: WorkflowStore) -> None:
    """How a cancel from another process reaches a step in flight: its heartbeat is refused.

    The lease itself stays good, so its owner can still hand the step back.
    """
    await new_run(store)
    lease = await claim(store, lease_ms=10_000)
    await store.set_run_status("r1", RunStatus.CANCELLED, execution_id=1)
    before = await snapshot(store)
    with pytest.raises(RunCancelledError):
        await store.renew_lease(lease, lease_ms=10_000)
    assert await snapshot(store) == before
    await store.fail_step(lease, error={"type": "Interrupted"}, final=False)
    assert (await step_of(store)).status == StepStatus.PENDING


async def test_a_cancelled_runs_history_takes_no_more_events(store: WorkflowStore) -> None:
    """A process still driving a run another process cancelled records nothing more.

    A resume (to running) reopens it.
    """
    await new_run(store)
    await store.set_run_status("r1", RunStatus.CANCELLED, execution_id=1)
    before = await snapshot(store)
    with pytest.raises(RunCancelledError):
        await store.append_event("r1", event(EventKind.TIMER_FIRED), execution_id=1)
    with pytest.raises(RunCancelledError):
        await store.continue_as_new("r1", "next", execution_id=1)
    assert await snapshot(store) == before
    await store.set_run_status("r1", RunStatus.RUNNING, execution_id=1)
    await store.append_event("r1", event(EventKind.TIMER_FIRED), execution_id=1)
    assert await store.continue_as_new("r1", "next", execution_id=1) == 2


async def test_complete_step_records_output_context_and_event_together(
    store: WorkflowStore,
) -> None:
    await new_run(store, context={"keep": 1, "over": 1})
    lease = await claim(store)
    await store.complete_step(
        lease,
        output={"rows": 3},
        context_patch={"over": 2, "new": [1]},
        event=event(EventKind.STEP_COMPLETED, {"step": "s1"}),
    )
    step = await step_of(store)
    assert step.status == StepStatus.COMPLETED
    assert step.output == {"rows": 3}
    assert step.finished_at is not None
    run = await store.get_run("r1")
    assert run is not None
    assert run.context == {"keep": 1, "over": 2, "new": [1]}
    [done] = await store.read_history("r1")
    assert (done.event_id, done.kind, done.payload) == (1, EventKind.STEP_COMPLETED, {"step": "s1"})


async def test_complete_step_twice_is_refused_as_already_completed(store: WorkflowStore) -> None:
    await new_run(store)
    lease = await claim(store)
    await store.complete_step(lease, output=1, event=event())
    before = await snapshot(store)
    with pytest.raises(StepAlreadyCompletedError):
        await store.complete_step(lease, output=2, event=event())
    assert await snapshot(store) == before


async def test_claim_of_a_completed_step_is_refused(store: WorkflowStore) -> None:
    await new_run(store)
    await store.complete_step(await claim(store), output=1)
    before = await snapshot(store)
    with pytest.raises(StepAlreadyCompletedError) as caught:
        await claim(store, owner="worker-b")
    assert caught.value.step_id == "s1"
    assert await snapshot(store) == before


def next_claim(step_id: str = "s2", lease_ms: int = 10_000) -> StepClaim:
    return StepClaim(step_id=step_id, name=step_id, lease_ms=lease_ms)


@pytest.mark.parametrize("parent", [None, "p1"])
async def test_create_and_claim_creates_the_run_and_leases_its_first_step(
    store: WorkflowStore, parent: str | None
) -> None:
    if parent is not None:
        await new_run(store, parent)
    run = record(status=RunStatus.RUNNING, input={"q": 1}, parent_run_id=parent)
    before = await store.time_ms()
    created, lease = await store.create_and_claim(
        run, next_claim("s1", lease_ms=10_000), owner="worker-a", event=event(EventKind.RUN_STARTED)
    )
    assert created
    assert lease is not None
    assert (lease.run_id, lease.step_id, lease.owner, lease.epoch, lease.attempt) == (
        "r1",
        "s1",
        "worker-a",
        1,
        1,
    )
    assert (lease.execution_id, before + 10_000 <= lease.expires_at <= before + 15_000) == (1, True)
    stored = await store.get_run("r1")
    assert stored is not None
    assert (stored.status, stored.input, stored.parent_run_id) == (
        RunStatus.RUNNING,
        {"q": 1},
        parent,
    )
    assert [r.run_id for r in await store.list_runs_by_status(RunStatus.RUNNING)] == ["r1"]
    assert (await store.get_metrics()).total_executions == (1 if parent is None else 2)
    assert await kinds(store) == ["run_started"]
    step = await step_of(store)
    assert (step.status, step.attempt, step.worker_id) == (StepStatus.RUNNING, 1, "worker-a")
    with pytest.raises(LeaseHeldError):  # the lease is live: nobody else may claim s1
        await claim(store, owner="worker-b")
    await store.complete_step(lease, output="done")
    assert (await step_of(store)).status == StepStatus.COMPLETED


async def test_create_and_claim_of_an_existing_run_changes_and_claims_nothing(
    store: WorkflowStore,
) -> None:
    await new_run(store, status=RunStatus.FAILED, context={"keep": 1})
    await store.complete_step(await claim(store, "s0"), output=0)
    before = await snapshot(store)
    created, lease = await store.create_and_claim(
        record(status=RunStatus.RUNNING), next_claim("s1"), owner="worker-a"
    )
    assert (created, lease) == (False, None)
    assert await snapshot(store) == before
    assert (await store.get_metrics()).total_executions == 1
    assert [r.run_id for r in await store.list_runs_by_status(RunStatus.FAILED)] == ["r1"]


async def test_create_and_claim_of_a_run_created_cancelled_claims_nothing(
    store: WorkflowStore,
) -> None:
    created, lease = await store.create_and_claim(
        record(status=RunStatus.CANCELLED), next_claim("s1"), owner="worker-a"
    )
    assert (created, lease) == (True, None)
    assert await store.get_run("r1") is not None
    assert await store.list_steps("r1") == []


async def test_create_and_claim_with_a_bad_step_id_stores_nothing(store: WorkflowStore) -> None:
    with pytest.raises(InvalidStepIdError):
        await store.create_and_claim(record(), next_claim("bad|id"), owner="worker-a")
    assert await store.get_run("r1") is None
    assert await store.list_runs() == []


async def test_complete_and_claim_records_the_completion_and_leases_the_next_step(
    store: WorkflowStore,
) -> None:
    await new_run(store, context={"keep": 1})
    lease = await claim(store, owner="worker-a")
    before = await store.time_ms()
    recorded, claimed = await store.complete_and_claim(
        lease,
        next_claim("s2", lease_ms=10_000),
        output={"rows": 3},
        context_patch={"new": 2},
        event=event(EventKind.STEP_COMPLETED, {"step": "s1"}),
    )
    assert recorded is not None
    assert (recorded.event_id, recorded.kind) == (1, EventKind.STEP_COMPLETED)
    assert claimed is not None
    assert (claimed.run_id, claimed.step_id, claimed.owner, claimed.epoch, claimed.attempt) == (
        "r1",
        "s2",
        "worker-a",
        1,
        1,
    )
    assert before + 10_000 <= claimed.expires_at <= before + 15_000
    first, second = await store.list_steps("r1")
    assert (first.step_id, first.status, first.output) == ("s1", StepStatus.COMPLETED, {"rows": 3})
    assert (second.step_id, second.status, second.attempt) == ("s2", StepStatus.RUNNING, 1)
    assert second.worker_id == "worker-a"
    run = await store.get_run("r1")
    assert run is not None
    assert run.context == {"keep": 1, "new": 2}
    with pytest.raises(LeaseHeldError):  # the new lease is live: nobody else may claim s2
        await claim(store, "s2", owner="worker-b")
    await store.complete_step(claimed, output="s2 done")
    assert (await step_of(store, "s2")).status == StepStatus.COMPLETED


async def test_complete_and_claim_leaves_a_refused_claim_to_the_caller(
    store: WorkflowStore,
) -> None:
    await new_run(store)
    await store.complete_step(await claim(store, "done"), output=1)
    held = await claim(store, "held", owner="worker-b", lease_ms=10_000)
    for step_id in ("done", "held"):
        lease = await claim(store, f"before-{step_id}")
        recorded, claimed = await store.complete_and_claim(
            lease, next_claim(step_id), output=2, event=event()
        )
        assert recorded is not None
        assert claimed is None
        assert (await step_of(store, f"before-{step_id}")).status == StepStatus.COMPLETED
    assert (await step_of(store, "done")).status == StepStatus.COMPLETED
    held_row = await step_of(store, "held")
    assert (held_row.worker_id, held_row.attempt) == ("worker-b", 1)
    await store.complete_step(held, output="still mine")


async def test_complete_and_claim_claims_nothing_in_a_cancelled_run(store: WorkflowStore) -> None:
    await new_run(store)
    lease = await claim(store)
    await store.set_run_status("r1", RunStatus.CANCELLED, execution_id=1)
    recorded, claimed = await store.complete_and_claim(lease, next_claim(), output=1)
    assert (recorded, claimed) == (None, None)
    assert [step.step_id for step in await store.list_steps("r1")] == ["s1"]
    assert (await step_of(store)).status == StepStatus.COMPLETED


async def test_complete_and_claim_with_a_stale_lease_changes_nothing(store: WorkflowStore) -> None:
    await new_run(store)
    old = await claim(store, owner="worker-a", lease_ms=50)
    await claim_when_free(store, owner="worker-b", lease_ms=10_000)
    before = await snapshot(store)
    with pytest.raises(StaleLeaseError):
        await store.complete_and_claim(old, next_claim(), output="late", context_patch={"a": 1})
    with pytest.raises(InvalidStepIdError):
        await store.complete_and_claim(old, next_claim("bad id"), output="late")
    assert await snapshot(store) == before


def _timeless(value: Any) -> Any:
    """``value`` with every timestamp blanked: two runs written moments apart compare equal."""
    if isinstance(value, dict):
        return {
            key: None if str(key).endswith("_at") or key == "timestamp" else _timeless(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_timeless(item) for item in value]
    return value


async def test_complete_and_finish_does_what_complete_step_then_set_run_status_do(
    store: WorkflowStore,
) -> None:
    step_done = event(EventKind.STEP_COMPLETED, {"step": "s1"})
    run_done = event(EventKind.RUN_COMPLETED, {"sum": 3})
    for run_id in ("two-calls", "one-call"):
        await new_run(store, run_id, status=RunStatus.RUNNING, context={"keep": 1})
    lease = await claim(store, run_id="two-calls")
    await store.complete_step(lease, output={"rows": 3}, context_patch={"n": 2}, event=step_done)
    expected = await store.set_run_status(
        "two-calls", RunStatus.COMPLETED, execution_id=1, output={"s1": 3}, event=run_done
    )
    counted = (await store.get_metrics()).total_events

    lease = await claim(store, run_id="one-call")
    recorded, finished = await store.complete_and_finish(
        lease,
        output={"rows": 3},
        context_patch={"n": 2},
        event=step_done,
        run_output={"s1": 3},
        run_event=run_done,
    )
    assert recorded is not None
    assert (recorded.event_id, recorded.kind, recorded.payload) == (
        1,
        step_done.kind,
        {"step": "s1"},
    )
    assert finished is not None
    assert finished.completed_at is not None
    assert _timeless(finished.model_dump(exclude={"run_id"})) == _timeless(
        expected.model_dump(exclude={"run_id"})
    )
    one, two = await snapshot(store, "one-call"), await snapshot(store, "two-calls")
    for state in (one, two):
        del state["run"]["run_id"]
    assert _timeless(one) == _timeless(two)
    assert await kinds(store, "one-call") == ["step_completed", "run_completed"]
    completed = [r.run_id for r in await store.list_runs_by_status(RunStatus.COMPLETED)]
    assert sorted(completed) == ["one-call", "two-calls"]
    assert await store.list_runs_by_status(RunStatus.RUNNING) == []
    assert (await store.get_metrics()).total_events == 2 * counted  # both runs' events, once


async def _cancel(store: WorkflowStore) -> None:
    await store.set_run_status("r1", RunStatus.CANCELLED, execution_id=1)


async def _continue_as_new(store: WorkflowStore) -> None:
    assert await store.continue_as_new("r1", "next", execution_id=1) == 2


@pytest.mark.parametrize(
    ("move_on", "status", "execution_id", "history"),
    [
        pytest.param(_cancel, RunStatus.CANCELLED, 1, ["step_completed"], id="cancelled"),
        pytest.param(
            _continue_as_new, RunStatus.RUNNING, 2, ["run_started"], id="at-another-execution"
        ),
    ],
)
async def test_complete_and_finish_records_the_step_but_leaves_a_run_that_moved_on(
    store: WorkflowStore,
    move_on: Callable[[WorkflowStore], Awaitable[None]],
    status: RunStatus,
    execution_id: int,
    history: list[str],
) -> None:
    """The step's work is kept; the run's end is not recorded.

    A cancelled run stays cancelled, and a late step of an execution that
    continued as new ends only itself, not the run.
    """
    await new_run(store, status=RunStatus.RUNNING)
    lease = await claim(store)
    await move_on(store)
    recorded, finished = await store.complete_and_finish(
        lease,
        output=1,
        event=event(),
        run_output={"s1": 1},
        run_event=event(EventKind.RUN_COMPLETED),
    )
    assert recorded is not None
    assert finished is None
    assert (await step_of(store)).status == StepStatus.COMPLETED
    run = await store.get_run("r1")
    assert run is not None
    assert (run.status, run.current_execution_id, run.output) == (status, execution_id, None)
    assert await kinds(store, execution_id=execution_id) == history
    assert [r.run_id for r in await store.list_runs_by_status(status)] == ["r1"]
    assert await store.list_runs_by_status(RunStatus.COMPLETED) == []


async def test_complete_and_finish_of_a_completed_step_is_refused_and_indexes_nothing(
    store: WorkflowStore,
) -> None:
    await new_run(store, status=RunStatus.RUNNING)
    lease = await claim(store)
    await store.complete_step(lease, output=1)
    before = await snapshot(store)
    with pytest.raises(StepAlreadyCompletedError):
        await store.complete_and_finish(lease, output=2, run_output={"s1": 2})
    assert await snapshot(store) == before
    assert [r.run_id for r in await store.list_runs_by_status(RunStatus.RUNNING)] == ["r1"]
    assert await store.list_runs_by_status(RunStatus.COMPLETED) == []


async def test_complete_and_finish_refused_changes_nothing(store: WorkflowStore) -> None:
    await new_run(store, status=RunStatus.RUNNING)
    old = await claim(store, owner="worker-a", lease_ms=50)
    current = await claim_when_free(store, owner="worker-b", lease_ms=10_000)
    before = await snapshot(store)
    with pytest.raises(StaleLeaseError):
        await store.complete_and_finish(old, output="late", run_output={"s1": "late"})
    with pytest.raises(InvalidPayloadError):
        await store.complete_and_finish(current, output=1, run_output={"x": math.nan})
    assert await snapshot(store) == before
    assert [r.run_id for r in await store.list_runs_by_status(RunStatus.RUNNING)] == ["r1"]
    assert await store.list_runs_by_status(RunStatus.COMPLETED) == []


async def test_fail_step_final_marks_the_step_failed(store: WorkflowStore) -> None:
    await new_run(store)
    lease = await claim(store)
    await store.fail_step(
        lease, error={"type": "ValueError"}, final=True, event=event(EventKind.STEP_FAILED)
    )
    step = await step_of(store)
    assert (step.status, step.error, step.attempt) == (
        StepStatus.FAILED,
        {"type": "ValueError"},
        1,
    )
    assert await kinds(store) == ["step_failed"]


async def test_fail_step_retryable_returns_to_pending_and_attempts_grow(
    store: WorkflowStore,
) -> None:
    await new_run(store)
    for attempt in (1, 2, 3):
        lease = await claim(store)
        assert (await step_of(store)).attempt == attempt
        assert (lease.epoch, lease.attempt) == (attempt, attempt)
        await store.fail_step(lease, error=f"boom {attempt}", final=False)
        step = await step_of(store)
        assert (step.status, step.error, step.attempt) == (
            StepStatus.PENDING,
            f"boom {attempt}",
            attempt,
        )
    await store.complete_step(await claim(store), output="finally")
    step = await step_of(store)
    assert (step.status, step.output, step.attempt) == (StepStatus.COMPLETED, "finally", 4)


async def test_a_lease_handed_back_unrun_does_not_count_an_attempt(
    store: WorkflowStore,
) -> None:
    """``ran=False`` takes the claim's count back: attempts count runs, not claims,
    while the lease epoch, the fence against a stale writer, still grows."""
    await new_run(store)
    ran = await claim(store)
    await store.fail_step(ran, error="boom", final=False)
    for epoch in (2, 3):
        lease = await claim(store)
        assert (lease.epoch, lease.attempt) == (epoch, 2)
        await store.fail_step(lease, error="not run", final=False, ran=False)
        step = await step_of(store)
        assert (step.status, step.attempt) == (StepStatus.PENDING, 1)
    with pytest.raises(StaleLeaseError):  # the unrun lease is spent all the same
        await store.complete_step(lease, output="late")
    lease = await claim(store)
    assert (lease.epoch, lease.attempt) == (4, 2)
    await store.complete_step(lease, output="done")
    assert (await step_of(store)).attempt == 2


async def test_claim_on_unknown_run_or_execution_is_refused(store: WorkflowStore) -> None:
    with pytest.raises(RunNotFoundError):
        await claim(store, run_id="ghost")
    assert await store.get_run("ghost") is None
    await new_run(store)
    with pytest.raises(ExecutionNotFoundError) as caught:
        await claim(store, execution_id=2)
    assert caught.value.execution_id == 2
    assert await store.list_steps("r1") == []
    assert [x.execution_id for x in await store.list_executions("r1")] == [1]


async def test_step_events_go_to_the_lease_execution(store: WorkflowStore) -> None:
    await new_run(store)
    await store.continue_as_new("r1", None, execution_id=1)
    await store.complete_step(await claim(store, execution_id=2), event=event())
    assert await kinds(store, execution_id=1) == ["continued_as_new"]
    assert await kinds(store, execution_id=2) == ["run_started", "step_completed"]
    assert (await step_of(store)).execution_id == 2


@pytest.mark.parametrize("write", ["complete", "complete_and_claim", "fail", "renew"])
async def test_a_lease_naming_another_execution_changes_nothing(
    store: WorkflowStore, write: str
) -> None:
    """A lease is for the execution its step was claimed in; one that names
    another (a bug, or a forged lease) must not write there, even if it exists."""
    await new_run(store)
    lease = await claim(store)
    await store.continue_as_new("r1", None, execution_id=1)
    forged = lease.model_copy(update={"execution_id": 2})
    before = await snapshot(store)
    writes = {
        "complete": lambda: store.complete_step(
            forged, output=1, context_patch={"k": 1}, event=event()
        ),
        "complete_and_claim": lambda: store.complete_and_claim(
            forged, next_claim(), output=1, event=event()
        ),
        "fail": lambda: store.fail_step(forged, error="x", final=True, event=event()),
        "renew": lambda: store.renew_lease(forged, lease_ms=60_000),
    }
    with pytest.raises(StaleLeaseError, match="another execution"):
        await writes[write]()
    assert await snapshot(store) == before
    await store.complete_step(lease, output=1, event=event())  # the true lease still holds
    assert await kinds(store, execution_id=1) == ["continued_as_new", "step_completed"]


@pytest.mark.parametrize(
    ("case", "arguments"),
    [
        ("NaN in context patch", {"context_patch": {"ok": 1, "bad": math.nan}}),
        ("non-str key in context patch", {"context_patch": {"ok": 1, 2: "x"}}),
        ("infinite output", {"output": {"x": [math.inf]}}),
        ("set output", {"output": {1, 2}}),
        (
            "NaN in event payload",
            {"event": NewEvent(kind=EventKind.STEP_COMPLETED, payload=math.nan)},
        ),
        ("oversized output", {"output": "x" * (LIMIT + 1)}),
        ("oversized context patch", {"context_patch": {"big": "x" * LIMIT}}),
    ],
)
async def test_invalid_completion_leaves_no_partial_state(
    small_store: WorkflowStore, case: str, arguments: dict[str, Any]
) -> None:
    await new_run(small_store, context={"a": 1})
    lease = await claim(small_store)
    before = await snapshot(small_store)
    with pytest.raises(InvalidPayloadError):
        await small_store.complete_step(
            lease, **{"output": "fine", "context_patch": {"a": 2}, "event": event(), **arguments}
        )
    assert await snapshot(small_store) == before, case
    assert (await step_of(small_store)).status == StepStatus.RUNNING
    await small_store.complete_step(lease, output="fine")  # the lease is still good


async def test_completion_after_delete_is_refused_and_does_not_recreate(
    store: WorkflowStore,
) -> None:
    await new_run(store)
    lease = await claim(store)
    await store.delete_run("r1")
    with pytest.raises(StaleLeaseError):
        await store.complete_step(lease, output=1, context_patch={"a": 1}, event=event())
    with pytest.raises(StaleLeaseError):
        await store.fail_step(lease, error="x", final=True, event=event())
    with pytest.raises(StaleLeaseError):
        await store.renew_lease(lease)
    assert await store.get_run("r1") is None
    assert await store.list_steps("r1") == []
    assert await store.list_runs() == []


async def test_lease_from_before_delete_cannot_touch_the_recreated_run(
    store: WorkflowStore,
) -> None:
    await new_run(store)
    old = await claim(store, owner="worker-a")
    await store.delete_run("r1")
    await new_run(store)

    with pytest.raises(StaleLeaseError):
        await store.complete_step(old, output="old", context_patch={"old": 1}, event=event())
    assert await store.list_steps("r1") == []

    new = await claim(store, owner="worker-b")  # same epoch as ``old``, another token
    with pytest.raises(StaleLeaseError):
        await store.complete_step(old, output="old", context_patch={"old": 1}, event=event())
    after = await snapshot(store)
    run = await store.get_run("r1")
    assert run is not None
    assert run.context == {}
    assert after["history"] == {1: []}
    assert (await step_of(store)).status == StepStatus.RUNNING
    await store.complete_step(new, output="new")
    assert (await step_of(store)).output == "new"


# -- history and executions -----------------------------------------------------


async def test_append_event_numbers_events_from_one(store: WorkflowStore) -> None:
    await new_run(store)
    appended = [
        await store.append_event("r1", event(EventKind.TIMER_CREATED, {"n": i}), execution_id=1)
        for i in range(5)
    ]
    assert [e.event_id for e in appended] == [1, 2, 3, 4, 5]
    history = await store.read_history("r1", 1)
    assert history == appended
    assert [e.payload for e in history] == [{"n": i} for i in range(5)]
    assert all(a.timestamp <= b.timestamp for a, b in itertools.pairwise(history))
    [execution] = await store.list_executions("r1")
    assert execution.event_count == 5


async def test_read_history_defaults_to_the_current_execution(store: WorkflowStore) -> None:
    await new_run(store)
    await store.append_event("r1", event(EventKind.TIMER_FIRED), execution_id=1)
    await store.continue_as_new("r1", {"round": 2}, execution_id=1)
    current = await store.read_history("r1")
    assert current == await store.read_history("r1", 2)
    assert [(e.event_id, e.kind, e.payload) for e in current] == [
        (1, EventKind.RUN_STARTED, {"round": 2})
    ]


async def test_read_history_after_an_event_reads_only_the_later_ones(
    store: WorkflowStore,
) -> None:
    await new_run(store)  # no events yet
    for n in range(4):
        await store.append_event("r1", event(payload={"n": n}), execution_id=1)
    whole = await store.read_history("r1", 1)
    assert [e.event_id for e in whole] == [1, 2, 3, 4]
    assert await store.read_history("r1", 1, after_event_id=2) == whole[2:]
    assert await store.read_history("r1", after_event_id=4) == []
    assert await store.read_history("r1", after_event_id=9) == []
    assert await store.read_history("r1", after_event_id=0) == whole


@pytest.mark.parametrize("bad", [-1, True, "2", 1.5])
async def test_read_history_refuses_a_bad_event_id_to_read_after(
    store: WorkflowStore, bad: Any
) -> None:
    await new_run(store)
    with pytest.raises(InvalidArgumentError):
        await store.read_history("r1", after_event_id=bad)
    with pytest.raises(InvalidRunIdError):  # ids first, as everywhere
        await store.read_history("bad id", after_event_id=bad)


async def test_append_event_after_the_events_seen_appends_in_turn(store: WorkflowStore) -> None:
    """A writer appends after what it read; another writer's event in between refuses it."""
    await new_run(store)  # no events yet
    first = await store.append_event(
        "r1", event(payload={"by": "a"}), execution_id=1, seen_events=0
    )
    assert first.event_id == 1
    before = await snapshot(store)
    with pytest.raises(ConflictError, match="events arrived"):  # it read none: one arrived
        await store.append_event("r1", event(payload={"by": "b"}), execution_id=1, seen_events=0)
    assert await snapshot(store) == before
    second = await store.append_event(
        "r1", event(payload={"by": "b"}), execution_id=1, seen_events=1
    )
    assert second.event_id == 2
    assert [e.payload for e in await store.read_history("r1")] == [{"by": "a"}, {"by": "b"}]


async def test_append_event_after_the_events_seen_is_not_refused_by_raised_events(
    store: WorkflowStore,
) -> None:
    """Events raised from outside settle nothing a writer records: they never refuse it."""
    await new_run(store)
    raised = NewEvent(kind=EventKind.EVENT_RAISED, payload={"name": "go", "payload": 1})
    await store.append_event("r1", raised, execution_id=1)
    await store.append_event("r1", raised, execution_id=1)
    mine = await store.append_event("r1", event(), execution_id=1, seen_events=0)
    assert mine.event_id == 3
    await store.append_event("r1", raised, execution_id=1)
    with pytest.raises(ConflictError):  # event 3 is not raised, and it was not seen
        await store.append_event("r1", event(), execution_id=1, seen_events=2)
    with pytest.raises(ConflictError):  # more seen than there are: another history
        await store.append_event("r1", event(), execution_id=1, seen_events=5)
    assert len(await store.read_history("r1")) == 4


@pytest.mark.parametrize("bad", [-1, True, "2", 1.5])
async def test_a_bad_count_of_events_seen_is_refused(store: WorkflowStore, bad: Any) -> None:
    await new_run(store)
    await store.append_event("r1", event(), execution_id=1)
    before = await snapshot(store)
    with pytest.raises(InvalidArgumentError, match="seen_events"):
        await store.append_event("r1", event(), execution_id=1, seen_events=bad)
    with pytest.raises(InvalidArgumentError, match="seen_events"):
        await store.continue_as_new("r1", None, execution_id=1, seen_events=bad)
    with pytest.raises(InvalidRunIdError):  # ids first, as everywhere
        await store.append_event("bad id", event(), execution_id=1, seen_events=bad)
    assert await snapshot(store) == before


async def test_continue_as_new_carries_events_in_the_same_step(store: WorkflowStore) -> None:
    await new_run(store)
    raised = NewEvent(kind=EventKind.EVENT_RAISED, payload={"name": "go", "payload": 1})
    await store.append_event("r1", raised, execution_id=1)
    await store.continue_as_new("r1", "next", execution_id=1, carry=[raised, raised], seen_events=1)
    kinds = [(e.kind, e.payload) for e in await store.read_history("r1", 2)]
    assert kinds == [
        (EventKind.RUN_STARTED, "next"),
        (EventKind.EVENT_RAISED, {"name": "go", "payload": 1}),
        (EventKind.EVENT_RAISED, {"name": "go", "payload": 1}),
    ]


async def test_continue_as_new_refuses_when_events_arrived_unseen(store: WorkflowStore) -> None:
    await new_run(store)
    await store.append_event("r1", event(), execution_id=1)
    with pytest.raises(ConflictError):
        await store.continue_as_new("r1", "next", execution_id=1, seen_events=0)
    run = await store.get_run("r1")
    assert run is not None
    assert run.current_execution_id == 1
    assert [x.execution_id for x in await store.list_executions("r1")] == [1]
    assert len(await store.read_history("r1", 1)) == 1


async def test_continue_as_new_carries_the_raised_events_it_was_not_shown(
    store: WorkflowStore,
) -> None:
    """Raised while the caller decided: they go along after its own carry, never lost."""
    await new_run(store)
    mine = NewEvent(kind=EventKind.EVENT_RAISED, payload={"name": "go", "payload": "seen"})
    await store.append_event("r1", mine, execution_id=1)
    for payload in ({"name": "go", "payload": "late"}, {}):
        late = NewEvent(kind=EventKind.EVENT_RAISED, payload=payload)
        await store.append_event("r1", late, execution_id=1)
    carried = NewEvent(
        kind=EventKind.EVENT_RAISED,
        payload={"name": "go", "payload": "seen", "carried_from": [1, 1]},
    )
    await store.continue_as_new("r1", "next", execution_id=1, carry=[carried], seen_events=1)

    assert [(e.kind, e.payload) for e in await store.read_history("r1", 2)] == [
        (EventKind.RUN_STARTED, "next"),
        (EventKind.EVENT_RAISED, {"name": "go", "payload": "seen", "carried_from": [1, 1]}),
        (EventKind.EVENT_RAISED, {"name": "go", "payload": "late", "carried_from": [1, 2]}),
        (EventKind.EVENT_RAISED, {"carried_from": [1, 3]}),
    ]
    metrics = await store.get_metrics()
    assert metrics.total_events == 4 + 4  # execution 1: 3 raised + continued_as_new


async def test_append_only_to_the_current_execution(store: WorkflowStore) -> None:
    await new_run(store)
    await store.continue_as_new("r1", None, execution_id=1)
    with pytest.raises(ConflictError):
        await store.append_event("r1", event(), execution_id=1, only_if_current=True)
    assert len(await store.read_history("r1", 1)) == 1  # only continued_as_new
    appended = await store.append_event("r1", event(), execution_id=2, only_if_current=True)
    assert appended.event_id == 2


async def test_unknown_execution_raises_execution_not_found(store: WorkflowStore) -> None:
    await new_run(store)
    with pytest.raises(ExecutionNotFoundError) as caught:
        await store.read_history("r1", 7)
    assert (caught.value.run_id, caught.value.execution_id) == ("r1", 7)
    with pytest.raises(ExecutionNotFoundError):
        await store.append_event("r1", event(), execution_id=2)
    assert [x.execution_id for x in await store.list_executions("r1")] == [1]


async def test_history_of_unknown_run_raises_run_not_found(store: WorkflowStore) -> None:
    with pytest.raises(RunNotFoundError):
        await store.read_history("ghost")
    with pytest.raises(RunNotFoundError):
        await store.read_history("ghost", 1)
    with pytest.raises(RunNotFoundError):
        await store.list_executions("ghost")
    with pytest.raises(RunNotFoundError):
        await store.append_event("ghost", event(), execution_id=1)
    with pytest.raises(RunNotFoundError):
        await store.continue_as_new("ghost", None, execution_id=1)
    assert await store.get_run("ghost") is None


async def test_continue_as_new_chains_executions_each_with_its_history(
    store: WorkflowStore,
) -> None:
    await new_run(store, input={"round": 1}, status=RunStatus.RUNNING)
    await store.append_event("r1", event(EventKind.TIMER_FIRED, 1), execution_id=1)
    assert await store.continue_as_new("r1", {"round": 2}, execution_id=1) == 2
    await store.append_event("r1", event(EventKind.TIMER_FIRED, 2), execution_id=2)
    assert await store.continue_as_new("r1", {"round": 3}, execution_id=2) == 3

    executions = await store.list_executions("r1")
    assert [x.execution_id for x in executions] == [1, 2, 3]
    assert [x.status for x in executions] == [
        RunStatus.CONTINUED_AS_NEW,
        RunStatus.CONTINUED_AS_NEW,
        RunStatus.RUNNING,
    ]
    assert [x.input for x in executions] == [{"round": 1}, {"round": 2}, {"round": 3}]
    assert [x.completed_at is not None for x in executions] == [True, True, False]
    assert [x.event_count for x in executions] == [2, 3, 1]
    assert await kinds(store, execution_id=1) == ["timer_fired", "continued_as_new"]
    assert await kinds(store, execution_id=2) == ["run_started", "timer_fired", "continued_as_new"]
    assert await kinds(store, execution_id=3) == ["run_started"]
    [*_, handoff] = await store.read_history("r1", 1)
    assert handoff.payload == {"next": 2}


async def test_continue_as_new_points_the_run_at_the_new_execution(
    store: WorkflowStore,
) -> None:
    await new_run(store, input="first", context={"kept": True})
    await store.set_run_status("r1", RunStatus.FAILED, execution_id=1, error="e")
    await store.continue_as_new("r1", "second", execution_id=1)
    run = await store.get_run("r1")
    assert run is not None
    assert (run.current_execution_id, run.status, run.input) == (2, RunStatus.RUNNING, "second")
    assert (run.output, run.error, run.completed_at) == (None, None, None)
    assert run.context == {"kept": True}


async def test_continue_as_new_from_a_stale_execution_conflicts(store: WorkflowStore) -> None:
    await new_run(store)
    await store.continue_as_new("r1", None, execution_id=1)
    before = await snapshot(store)
    for stale in (1, 3):
        with pytest.raises(ConflictError):
            await store.continue_as_new("r1", "again", execution_id=stale)
    assert await snapshot(store) == before


async def test_continue_as_new_after_moving_back_replaces_the_next_execution(
    store: WorkflowStore,
) -> None:
    await new_run(store)
    await store.continue_as_new("r1", "second", execution_id=1)
    await store.append_event("r1", event(EventKind.TIMER_FIRED), execution_id=2)
    await store.create_run(record(current_execution_id=1))
    await store.continue_as_new("r1", "again", execution_id=1)
    assert [(e.event_id, e.kind, e.payload) for e in await store.read_history("r1", 2)] == [
        (1, EventKind.RUN_STARTED, "again")
    ]


async def test_continue_as_new_replaces_a_next_execution_that_has_no_events(
    store: WorkflowStore,
) -> None:
    """Found by the property test: taking back zero events sent '-0' to HINCRBY on Redis."""
    await new_run(store, current_execution_id=2)
    await store.create_run(record(current_execution_id=1))
    assert await store.continue_as_new("r1", "again", execution_id=1) == 2
    assert [(e.event_id, e.kind) for e in await store.read_history("r1", 2)] == [
        (1, EventKind.RUN_STARTED)
    ]
    metrics = await store.get_metrics()
    assert (metrics.total_executions, metrics.total_events) == (2, 2)


async def test_prune_deletes_executions_that_have_no_events(store: WorkflowStore) -> None:
    await new_run(store, status=RunStatus.COMPLETED)  # execution 1: finished, no events
    await store.create_run(record(current_execution_id=2))
    result = await store.prune_executions("r1", PruneOptions(keep_last=1))
    assert (result.executions_deleted, result.events_deleted) == (1, 0)
    assert [x.execution_id for x in await store.list_executions("r1")] == [2]


async def test_create_run_appends_its_event_in_the_same_step(store: WorkflowStore) -> None:
    started = NewEvent(kind=EventKind.RUN_STARTED, payload={"q": 1})
    running = record(status=RunStatus.RUNNING, input={"q": 1})
    assert await store.create_run(running, only_if_absent=True, event=started)
    assert [(e.event_id, e.kind, e.payload) for e in await store.read_history("r1", 1)] == [
        (1, EventKind.RUN_STARTED, {"q": 1})
    ]
    # A create that writes nothing appends nothing.
    assert not await store.create_run(running, only_if_absent=True, event=started)
    assert len(await store.read_history("r1", 1)) == 1
    stored = await store.get_run("r1")
    assert stored is not None
    assert stored.status == RunStatus.RUNNING


async def test_create_run_refuses_an_event_it_cannot_store_and_writes_nothing(
    store: WorkflowStore,
) -> None:
    unstorable = NewEvent(kind=EventKind.RUN_STARTED, payload={"bad": {1, 2}})
    with pytest.raises(InvalidPayloadError):
        await store.create_run(record(), event=unstorable)
    assert await store.get_run("r1") is None


# -- bad input ------------------------------------------------------------------

BAD_RUN_IDS: list[Any] = [
    "",
    "x" * 201,
    "a{b}",
    "{r1}",
    "a b",
    " r1",
    "r1\n",
    "a\tb",
    "a\x00b",
    "a\x07b",
    "ré",
    "a|b",
    42,
    None,
    b"r1",
]


def bad_lease(run_id: Any) -> Lease:
    return Lease.model_construct(
        run_id=run_id,
        step_id="s1",
        owner="o",
        token="t",
        epoch=1,
        expires_at=0,
        execution_id=1,
        attempt=1,
    )


RUN_ID_CALLS: dict[str, Callable[[WorkflowStore, Any], Awaitable[object]]] = {
    "create_run": lambda s, r: s.create_run(RunRecord.model_construct(run_id=r, workflow="wf")),
    "get_run": lambda s, r: s.get_run(r),
    "set_run_status": lambda s, r: s.set_run_status(r, RunStatus.COMPLETED, execution_id=1),
    "update_context": lambda s, r: s.update_context(r, {"a": 1}),
    "merge_context": lambda s, r: s.merge_context(r, {"a": 1}),
    "delete_run": lambda s, r: s.delete_run(r),
    "upsert_step": lambda s, r: s.upsert_step(r, StepState(step_id="s1", name="s1")),
    "get_step": lambda s, r: s.get_step(r, "s1"),
    "list_steps": lambda s, r: s.list_steps(r),
    "claim_step": lambda s, r: s.claim_step(r, "s1", name="s1", owner="o"),
    "renew_lease": lambda s, r: s.renew_lease(bad_lease(r)),
    "complete_step": lambda s, r: s.complete_step(bad_lease(r), output=1),
    "complete_and_claim": lambda s, r: s.complete_and_claim(bad_lease(r), next_claim(), output=1),
    # A payload that is refused too: the id is checked first, as everywhere.
    "complete_and_finish": lambda s, r: s.complete_and_finish(
        bad_lease(r), output=1, run_output=math.nan
    ),
    "create_and_claim": lambda s, r: s.create_and_claim(
        RunRecord.model_construct(run_id=r, workflow="wf"), next_claim("s1"), owner="o"
    ),
    "fail_step": lambda s, r: s.fail_step(bad_lease(r), error="e", final=True),
    "append_event": lambda s, r: s.append_event(r, event(), execution_id=1),
    "read_history": lambda s, r: s.read_history(r),
    "list_executions": lambda s, r: s.list_executions(r),
    "continue_as_new": lambda s, r: s.continue_as_new(r, None, execution_id=1),
}


@pytest.mark.parametrize("method", sorted(RUN_ID_CALLS))
async def test_invalid_run_ids_are_refused_by_every_method(
    store: WorkflowStore, method: str
) -> None:
    for run_id in BAD_RUN_IDS:
        with pytest.raises(InvalidRunIdError) as caught:
            await RUN_ID_CALLS[method](store, run_id)
        assert caught.value.run_id == run_id
        assert isinstance(caught.value, ValueError)
    assert await store.list_runs() == []


async def test_run_ids_use_the_whole_allowed_alphabet(store: WorkflowStore) -> None:
    run_ids = ["x" * 200, "a-b_c.d:e@f/g+h=i", "0"]
    for run_id in run_ids:
        await new_run(store, run_id, created_at=len(run_id))
        await store.merge_context(run_id, {"k": run_id})
        run = await store.get_run(run_id)
        assert run is not None
        assert run.context == {"k": run_id}
    assert {r.run_id for r in await store.list_runs()} == set(run_ids)


@pytest.mark.parametrize("step_id", ["", "a|b", "a b", "{s}", "x" * 201])
async def test_invalid_step_ids_are_refused(store: WorkflowStore, step_id: str) -> None:
    await new_run(store)
    before = await snapshot(store)
    with pytest.raises(InvalidStepIdError) as caught:
        await store.upsert_step("r1", StepState(step_id=step_id, name="s"))
    assert caught.value.step_id == step_id
    assert "invalid step id" in str(caught.value)
    with pytest.raises(InvalidStepIdError):
        await claim(store, step_id)
    assert await snapshot(store) == before
    assert await store.list_steps("r1") == []


NON_JSON: list[Any] = [
    math.nan,
    math.inf,
    -math.inf,
    {1, 2},
    object(),
    b"bytes",
    {1: "non-str key"},
    {"nested": [{"deep": math.nan}]},
    2**70,
    "\ud800",
]

# Each writer stores ``value`` somewhere in the prepared run ``r1`` (step s1 claimed).
PayloadWriter = Callable[[WorkflowStore, Lease, Any], Awaitable[object]]
PAYLOAD_WRITERS: dict[str, PayloadWriter] = {
    "create_run input": lambda s, _, v: s.create_run(record(input=v)),
    "create_run context": lambda s, _, v: s.create_run(
        RunRecord.model_construct(run_id="r1", workflow="wf", context={"k": v})
    ),
    "set_run_status output": lambda s, _, v: s.set_run_status(
        "r1", RunStatus.COMPLETED, execution_id=1, output=v
    ),
    "set_run_status error": lambda s, _, v: s.set_run_status(
        "r1", RunStatus.FAILED, execution_id=1, error=v
    ),
    "set_run_status event": lambda s, _, v: s.set_run_status(
        "r1", RunStatus.FAILED, execution_id=1, event=event(EventKind.RUN_FAILED, v)
    ),
    "update_context": lambda s, _, v: s.update_context("r1", {"k": v}),
    "merge_context": lambda s, _, v: s.merge_context("r1", {"k": v}),
    "upsert_step input": lambda s, _, v: s.upsert_step(
        "r1", StepState(step_id="s2", name="s2", input=v)
    ),
    "claim_step input": lambda s, _, v: s.claim_step("r1", "s2", name="s2", owner="o", input=v),
    "complete_step output": lambda s, lease, v: s.complete_step(lease, output=v),
    "complete_step patch": lambda s, lease, v: s.complete_step(lease, context_patch={"k": v}),
    "fail_step error": lambda s, lease, v: s.fail_step(lease, error=v, final=True),
    "append_event payload": lambda s, _, v: s.append_event("r1", event(payload=v), execution_id=1),
    "continue_as_new input": lambda s, _, v: s.continue_as_new("r1", v, execution_id=1),
}


async def prepared_run(store: WorkflowStore) -> tuple[Lease, dict[str, Any]]:
    await new_run(store, input={"in": 1}, context={"a": 1})
    lease = await claim(store)
    return lease, await snapshot(store)


@pytest.mark.parametrize("writer", sorted(PAYLOAD_WRITERS))
async def test_non_json_values_are_refused_and_nothing_changes(
    store: WorkflowStore, writer: str
) -> None:
    lease, before = await prepared_run(store)
    for value in NON_JSON:
        with pytest.raises(InvalidPayloadError):
            await PAYLOAD_WRITERS[writer](store, lease, value)
    assert await snapshot(store) == before
    assert await store.list_steps("r1") == [await step_of(store)]


@pytest.mark.parametrize("writer", sorted(PAYLOAD_WRITERS))
async def test_oversized_payloads_are_refused_and_nothing_changes(
    small_store: WorkflowStore, writer: str
) -> None:
    lease, before = await prepared_run(small_store)
    with pytest.raises(PayloadTooLargeError) as caught:
        await PAYLOAD_WRITERS[writer](small_store, lease, "x" * LIMIT)
    assert caught.value.limit == LIMIT
    assert caught.value.size > LIMIT
    assert await snapshot(small_store) == before


async def test_payload_of_exactly_the_limit_is_accepted(small_store: WorkflowStore) -> None:
    assert small_store.max_payload_bytes == LIMIT
    at_limit = "x" * (LIMIT - 2)  # two quotes make it LIMIT bytes of JSON
    await new_run(small_store, input=at_limit)
    run = await small_store.get_run("r1")
    assert run is not None
    assert run.input == at_limit


async def test_oversized_new_run_is_not_stored(small_store: WorkflowStore) -> None:
    with pytest.raises(PayloadTooLargeError):
        await new_run(small_store, input="x" * LIMIT)
    with pytest.raises(PayloadTooLargeError):
        await new_run(small_store, context={"big": "x" * LIMIT})
    assert await small_store.get_run("r1") is None
    assert await small_store.list_runs() == []


async def test_non_mapping_context_is_refused(store: WorkflowStore) -> None:
    await new_run(store, context={"a": 1})
    for bad in (["a", 1], "text", 3):
        with pytest.raises(InvalidPayloadError):
            await store.merge_context("r1", bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidPayloadError):
            await store.update_context("r1", bad)  # type: ignore[arg-type]
    run = await store.get_run("r1")
    assert run is not None
    assert run.context == {"a": 1}


# -- isolation ------------------------------------------------------------------


async def test_returned_records_are_isolated_from_the_store(store: WorkflowStore) -> None:
    await new_run(store, input={"list": [1]}, context={"bag": {"k": 1}})
    lease = await claim(store, input={"in": [1]})
    await store.complete_step(lease, output={"out": [1]}, event=event(payload={"p": [1]}))
    before = await snapshot(store)

    run = await store.get_run("r1")
    assert run is not None
    run.input["list"].append(2)
    run.context["bag"]["k"] = 2
    run.context["added"] = True
    [listed] = await store.list_runs()
    listed.context.clear()
    [step] = await store.list_steps("r1")
    step.output["out"].append(2)
    fetched = await step_of(store)
    fetched.input["in"].append(2)
    [recorded] = await store.read_history("r1")
    recorded.payload["p"].append(2)
    [execution] = await store.list_executions("r1")
    execution.input["list"].append(3)

    assert await snapshot(store) == before


async def test_values_handed_to_the_store_are_copied(store: WorkflowStore) -> None:
    payload: dict[str, Any] = {"items": [1]}
    await store.create_run(record(input=payload, context={"bag": payload}))
    await store.merge_context("r1", {"patch": payload})
    await store.upsert_step("r1", StepState(step_id="s1", name="s1", input=payload))
    appended = await store.append_event("r1", event(payload=payload), execution_id=1)
    payload["items"].append(2)
    appended.payload["items"].append(3)

    run = await store.get_run("r1")
    assert run is not None
    assert run.input == {"items": [1]}
    assert run.context == {"bag": {"items": [1]}, "patch": {"items": [1]}}
    assert (await step_of(store)).input == {"items": [1]}
    assert [e.payload for e in await store.read_history("r1")] == [{"items": [1]}]


async def test_prune_counts_the_current_execution_first_even_when_it_is_not_the_newest(
    store: WorkflowStore,
) -> None:
    """After an overwriting create_run moved a run back to execution 1, both stores agree."""
    await new_run(store)
    await store.continue_as_new("r1", None, execution_id=1)
    await store.continue_as_new("r1", None, execution_id=2)
    await store.create_run(record(current_execution_id=1))  # overwrite: back to 1
    result = await store.prune_executions("r1", PruneOptions(keep_last=2))
    assert (result.executions_deleted, result.instances_processed) == (1, 1)
    assert [x.execution_id for x in await store.list_executions("r1")] == [1, 3]
