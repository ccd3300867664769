"""The management contract of `stepflow.Admin`, on every store.

One test per clause of the contract (issue 5), each run on memory, fakeredis
and the real ``redis-server``; then what only Redis has to prove: the
two-phase multi-run delete (fences, crashes between the phases, races) and
the counters (exact under replays, refusals and ``SCRIPT FLUSH``).
"""

from __future__ import annotations

import uuid
from typing import Any, cast

import anyio
import pytest
from conftest import everything_sent_twice
from redis.crc import key_slot

import stepflow
from stepflow import (
    Admin,
    AdminStore,
    DeleteResult,
    EventKind,
    ExecutionNotFoundError,
    InstanceFilter,
    InstanceTree,
    InvalidRunIdError,
    InvalidStatusError,
    MemoryStore,
    NewEvent,
    OrphanRunError,
    PruneOptions,
    PruneResult,
    QueueDepths,
    RedisStore,
    RunDeletingError,
    RunNotFoundError,
    RunRecord,
    RunStatus,
    RunStillRunningError,
    StaleLeaseError,
    SubRunDeleteError,
    SystemMetrics,
    WorkflowStore,
    registry,
)
from stepflow.models import now_ms
from stepflow.store.redis_admin import FENCE_TIMEOUT_MS, _Fenced

pytestmark = pytest.mark.anyio

# -- helpers ------------------------------------------------------------------------


def admin_of(store: WorkflowStore) -> Admin:
    return Admin(cast(AdminStore, store))


def event(kind: EventKind = EventKind.STEP_COMPLETED) -> NewEvent:
    return NewEvent(kind=kind, payload={"k": kind.value})


async def make_run(
    store: WorkflowStore,
    run_id: str,
    *,
    parent: str | None = None,
    created_at: int | None = None,
    executions: int = 1,
    final: RunStatus = RunStatus.COMPLETED,
    context: dict[str, Any] | None = None,
) -> None:
    """A run with a step, ``executions`` executions and a history in each, ending ``final``."""
    await store.create_run(
        RunRecord(
            run_id=run_id,
            workflow="wf",
            version="2",
            status=RunStatus.RUNNING,
            input={"n": 1},
            parent_run_id=parent,
            created_at=created_at if created_at is not None else now_ms(),
            context=context or {},
        )
    )
    await store.append_event(run_id, event(EventKind.RUN_STARTED), execution_id=1)
    for xid in range(1, executions):
        lease = await store.claim_step(run_id, f"s{xid}", name="s", owner="w", execution_id=xid)
        await store.complete_step(lease, output=xid, event=event())
        await store.continue_as_new(run_id, {"round": xid + 1}, execution_id=xid)
    if final.is_terminal:
        await store.set_run_status(
            run_id,
            final,
            execution_id=executions,
            output="done",
            event=event(EventKind.RUN_COMPLETED),
        )


async def tree_of_three_levels(
    store: WorkflowStore, final: RunStatus = RunStatus.COMPLETED
) -> None:
    """root -> (c1 -> (g1, g2), c2): five runs over three levels."""
    await make_run(store, "root", created_at=1_000, executions=2)
    await make_run(store, "c1", parent="root", created_at=1_001)
    await make_run(store, "c2", parent="root", created_at=1_002, executions=3)
    await make_run(store, "g1", parent="c1", created_at=1_003)
    await make_run(store, "g2", parent="c1", created_at=1_004, final=final)


async def snapshot(store: WorkflowStore, run_ids: list[str]) -> dict[str, Any]:
    """Everything a reader can observe of the runs."""
    seen: dict[str, Any] = {}
    for run_id in run_ids:
        run = await store.get_run(run_id)
        if run is None:
            seen[run_id] = None
            continue
        executions = await store.list_executions(run_id)
        seen[run_id] = {
            "run": run.model_dump(),
            "steps": [s.model_dump() for s in await store.list_steps(run_id)],
            "executions": [x.model_dump() for x in executions],
            "history": [
                [e.model_dump() for e in await store.read_history(run_id, x.execution_id)]
                for x in executions
            ],
        }
    seen["listed"] = [r.run_id for r in await store.list_runs(limit=1_000)]
    seen["metrics"] = await cast(AdminStore, store).get_metrics()
    return seen


async def stored_counts(store: WorkflowStore) -> tuple[int, int]:
    """(executions, events) counted from the runs themselves: what the counters must say."""
    executions = events = 0
    for run in await store.list_runs(limit=10_000):
        for x in await store.list_executions(run.run_id):
            executions += 1
            events += x.event_count
    return executions, events


async def total(store: WorkflowStore, run_ids: list[str]) -> DeleteResult:
    """What deleting these runs must report."""
    result = DeleteResult()
    for run_id in run_ids:
        executions = await store.list_executions(run_id)
        result += DeleteResult(
            instances_deleted=1,
            executions_deleted=len(executions),
            events_deleted=sum(x.event_count for x in executions),
        )
    return result


TREE = ["root", "c1", "g1", "g2", "c2"]


# -- listing and inspection ------------------------------------------------------------


async def test_list_instances_is_newest_first_and_paginated(store: WorkflowStore) -> None:
    admin = admin_of(store)
    for i in range(7):
        await make_run(store, f"run-{i}", created_at=1_000 + i)
    newest_first = [f"run-{i}" for i in reversed(range(7))]
    assert await admin.list_instances() == newest_first
    assert await admin.list_instances(limit=3) == newest_first[:3]
    assert await admin.list_instances(limit=3, offset=3) == newest_first[3:6]
    assert await admin.list_instances(limit=3, offset=6) == newest_first[6:]
    assert await admin.list_instances(offset=7) == []


async def test_list_instances_by_status_accepts_any_case(store: WorkflowStore) -> None:
    admin = admin_of(store)
    await make_run(store, "done-1", created_at=1)
    await make_run(store, "done-2", created_at=2)
    await make_run(store, "broken", created_at=3, final=RunStatus.FAILED)
    await make_run(store, "busy", created_at=4, final=RunStatus.RUNNING)
    for status in ("Completed", "COMPLETED", "completed", RunStatus.COMPLETED):
        assert await admin.list_instances_by_status(status) == ["done-2", "done-1"]
    assert await admin.list_instances_by_status("completed", limit=1, offset=1) == ["done-1"]
    assert await admin.list_instances_by_status("Failed") == ["broken"]
    assert await admin.list_instances_by_status("RUNNING") == ["busy"]
    assert await admin.list_instances_by_status("cancelled") == []
    with pytest.raises(InvalidStatusError, match="use one of"):
        await admin.list_instances_by_status("finished")


async def test_list_instance_infos_gives_a_summary_per_run(store: WorkflowStore) -> None:
    admin = admin_of(store)
    await make_run(store, "a", created_at=1)
    await make_run(store, "b", created_at=2, final=RunStatus.FAILED)
    infos = await admin.list_instance_infos()
    assert [(i.instance_id, i.status) for i in infos] == [("b", "failed"), ("a", "completed")]
    assert [i.instance_id for i in await admin.list_instance_infos(status="Completed")] == ["a"]


async def test_get_instance_info_describes_the_run(store: WorkflowStore) -> None:
    admin = admin_of(store)
    await make_run(store, "parent", created_at=500)
    await make_run(store, "r1", parent="parent", created_at=1_000, executions=2)
    info = await admin.get_instance_info("r1")
    assert info.instance_id == "r1"
    assert (info.workflow, info.version) == ("wf", "2")
    assert info.current_execution_id == 2
    assert info.status == RunStatus.COMPLETED
    assert (info.output, info.error) == ("done", None)
    assert info.created_at == 1_000
    assert info.updated_at >= info.created_at
    assert info.completed_at is not None
    assert info.parent_id == "parent"

    await make_run(store, "bad", final=RunStatus.RUNNING)
    await store.set_run_status(
        "bad", RunStatus.FAILED, execution_id=1, error={"type": "X", "message": "boom"}
    )
    failed = await admin.get_instance_info("bad")
    assert failed.error == {"type": "X", "message": "boom"}
    assert failed.parent_id is None
    with pytest.raises(RunNotFoundError):
        await admin.get_instance_info("ghost")


async def test_executions_are_listed_ascending_with_the_latest_id(store: WorkflowStore) -> None:
    admin = admin_of(store)
    await make_run(store, "r1", executions=3)
    assert await admin.list_executions("r1") == [1, 2, 3]
    assert await admin.latest_execution_id("r1") == 3
    for call in (admin.list_executions, admin.latest_execution_id):
        with pytest.raises(RunNotFoundError):
            await call("ghost")


async def test_read_history_defaults_to_the_latest_execution(store: WorkflowStore) -> None:
    admin = admin_of(store)
    await make_run(store, "r1", executions=2)
    latest = [e.kind for e in await admin.read_history("r1")]
    assert latest == ["run_started", "run_completed"]
    assert await admin.read_history("r1", 2) == await admin.read_history("r1")
    first = await admin.read_history("r1", 1)
    assert [e.kind for e in first] == ["run_started", "step_completed", "continued_as_new"]
    assert [e.event_id for e in first] == [1, 2, 3]
    with pytest.raises(ExecutionNotFoundError):
        await admin.read_history("r1", 9)
    with pytest.raises(RunNotFoundError):
        await admin.read_history("ghost")


async def test_get_execution_info_of_each_execution(store: WorkflowStore) -> None:
    admin = admin_of(store)
    await make_run(store, "r1", executions=2)
    first = await admin.get_execution_info("r1", 1)
    assert first.status == RunStatus.CONTINUED_AS_NEW
    assert first.completed_at is not None  # ended by continue-as-new: completed_before sees it
    assert first.started_at <= first.completed_at
    assert first.event_count == 3
    assert first.input == {"n": 1}
    assert await admin.list_execution_infos("r1") == [
        first,
        await admin.get_execution_info("r1", 2),
    ]
    last = await admin.get_execution_info("r1", 2)
    assert (last.status, last.output, last.event_count) == ("completed", "done", 2)
    assert last.input == {"round": 2}
    with pytest.raises(ExecutionNotFoundError):
        await admin.get_execution_info("r1", 3)
    with pytest.raises(RunNotFoundError):
        await admin.get_execution_info("ghost", 1)


# -- metrics and queues ------------------------------------------------------------------


def metrics(**counts: int) -> SystemMetrics:
    return SystemMetrics(**counts)


async def test_metrics_follow_every_transition_exactly(store: WorkflowStore) -> None:
    """Runs and executions count with every change; a run's events when it settles.

    A run's events count once it finishes, continues as new or is pruned (on
    Redis a global write per step would cost a second script per step); a
    delete takes back what was counted. ``stored`` is what the runs hold.
    """
    admin = admin_of(store)

    async def check(stored: int, **expected: int) -> None:
        assert await admin.get_system_metrics() == metrics(**expected)
        assert await stored_counts(store) == (expected.get("total_executions", 0), stored)

    await check(0)
    await store.create_run(RunRecord(run_id="r1", workflow="wf", status=RunStatus.RUNNING))
    await check(0, total_instances=1, total_executions=1, running_instances=1)
    await store.complete_step(
        await store.claim_step("r1", "s1", name="s", owner="w"), event=event()
    )
    await store.append_event("r1", event(EventKind.TIMER_FIRED), execution_id=1)
    await check(2, total_instances=1, total_executions=1, running_instances=1)
    await store.set_run_status("r1", RunStatus.COMPLETED, execution_id=1, event=event())
    await check(3, total_instances=1, total_executions=1, completed_instances=1, total_events=3)

    await store.create_run(RunRecord(run_id="r2", workflow="wf"))  # pending counts as running
    one_done = {"completed_instances": 1}
    await check(
        3, total_instances=2, total_executions=2, running_instances=1, total_events=3, **one_done
    )
    await store.set_run_status("r2", RunStatus.FAILED, execution_id=1, event=event())
    done = {"completed_instances": 1, "failed_instances": 1}
    await check(4, total_instances=2, total_executions=2, total_events=4, **done)

    await store.create_run(RunRecord(run_id="r3", workflow="wf", status=RunStatus.RUNNING))
    await store.continue_as_new("r3", None, execution_id=1)
    await store.continue_as_new("r3", None, execution_id=2)
    busy = {"running_instances": 1, **done}
    await check(8, total_instances=3, total_executions=5, total_events=8, **busy)
    await store.complete_step(
        await store.claim_step("r3", "a", name="a", owner="w", execution_id=3)
    )
    lease = await store.claim_step("r3", "b", name="b", owner="w", execution_id=3)
    await store.fail_step(lease, error="x", final=True, event=event(EventKind.STEP_FAILED))
    await check(9, total_instances=3, total_executions=5, total_events=8, **busy)

    stale = lease.model_copy(update={"token": "not-the-token"})
    with pytest.raises(StaleLeaseError):  # refused: counts nothing
        await store.complete_step(stale, event=event())
    with pytest.raises(RunNotFoundError):
        await store.append_event("ghost", event(), execution_id=1)
    await check(9, total_instances=3, total_executions=5, total_events=8, **busy)

    await admin.prune_executions("r3", PruneOptions(keep_last=1))  # settles r3's step_failed
    await check(6, total_instances=3, total_executions=3, total_events=6, **busy)
    await store.continue_as_new("r3", None, execution_id=3, prune=PruneOptions())
    await check(6, total_instances=3, total_executions=3, total_events=6, **busy)

    await admin.delete_instance("r1")
    left = {"running_instances": 1, "failed_instances": 1}
    await check(3, total_instances=2, total_executions=2, total_events=3, **left)
    await store.set_run_status("r3", RunStatus.CANCELLED, execution_id=4)
    left = {"failed_instances": 1, "cancelled_instances": 1}
    await check(3, total_instances=2, total_executions=2, total_events=3, **left)
    assert await store.delete_run("r2") is True
    await check(2, total_instances=1, total_executions=1, cancelled_instances=1, total_events=2)


async def test_queue_depths_are_zero_while_no_queue_exists(store: WorkflowStore) -> None:
    admin = admin_of(store)
    assert await admin.get_queue_depths() == QueueDepths(orchestrator=0, worker=0, timer=0)
    await tree_of_three_levels(store)
    assert await admin.get_queue_depths() == QueueDepths()


# -- trees ------------------------------------------------------------------------------


async def test_list_children_gives_direct_children_only(store: WorkflowStore) -> None:
    admin = admin_of(store)
    await tree_of_three_levels(store)
    assert await admin.list_children("root") == ["c1", "c2"]
    assert await admin.list_children("c1") == ["g1", "g2"]
    assert await admin.list_children("g1") == []
    assert await admin.list_children("ghost") == []


async def test_get_parent_id(store: WorkflowStore) -> None:
    admin = admin_of(store)
    await tree_of_three_levels(store)
    assert await admin.get_parent_id("root") is None
    assert await admin.get_parent_id("c1") == "root"
    assert await admin.get_parent_id("g2") == "c1"
    with pytest.raises(RunNotFoundError):
        await admin.get_parent_id("ghost")


async def test_get_instance_tree_holds_every_descendant(store: WorkflowStore) -> None:
    admin = admin_of(store)
    await tree_of_three_levels(store)
    tree = await admin.get_instance_tree("root")
    assert tree == InstanceTree(
        instance_id="root",
        children=[
            InstanceTree(
                instance_id="c1",
                children=[InstanceTree(instance_id="g1"), InstanceTree(instance_id="g2")],
            ),
            InstanceTree(instance_id="c2"),
        ],
    )
    assert (tree.root_id, tree.size(), tree.all_ids()) == ("root", 5, TREE)
    leaf = await admin.get_instance_tree("g1")
    assert leaf.is_root_only()
    assert leaf.size() == 1
    assert (await admin.get_instance_tree("c1")).all_ids() == ["c1", "g1", "g2"]
    with pytest.raises(RunNotFoundError):
        await admin.get_instance_tree("ghost")


async def test_a_parent_id_is_validated_like_a_run_id(store: WorkflowStore) -> None:
    with pytest.raises(InvalidRunIdError):
        await store.create_run(RunRecord(run_id="kid", workflow="wf", parent_run_id="a{b}"))
    assert await store.get_run("kid") is None


async def test_a_child_re_created_under_another_parent_leaves_the_first(
    store: WorkflowStore,
) -> None:
    admin = admin_of(store)
    await make_run(store, "p1")
    await make_run(store, "p2")
    await make_run(store, "kid", parent="p1")
    await make_run(store, "kid", parent="p2")  # create-or-resume with another parent
    assert await admin.list_children("p1") == []
    assert await admin.list_children("p2") == ["kid"]
    assert (await admin.delete_instance("p1")).instances_deleted == 1
    assert await store.get_run("kid") is not None


async def test_child_runs_of_a_durable_workflow_form_its_tree(store: WorkflowStore) -> None:
    leaf_name, middle_name, top_name = (f"admin-{uuid.uuid4().hex[:8]}-{n}" for n in range(3))
    try:

        @stepflow.workflow(leaf_name)
        async def leaf(ctx: stepflow.WorkflowContext, n: int) -> int:
            return n * 2

        @stepflow.workflow(middle_name)
        async def middle(ctx: stepflow.WorkflowContext, n: int) -> int:
            return await ctx.child(leaf, n) + await ctx.child(leaf, n + 1)

        @stepflow.workflow(top_name)
        async def top(ctx: stepflow.WorkflowContext, n: int) -> int:
            return await ctx.child(middle, n)

        with anyio.fail_after(10):
            run = await stepflow.Engine(store).run(top, 1, run_id="top")
        assert run.output == 2 + 4
        admin = admin_of(store)
        tree = await admin.get_instance_tree("top")
        assert tree.size() == 4
        [middle_run] = await admin.list_children("top")
        assert await admin.get_parent_id(middle_run) == "top"
        assert len(await admin.list_children(middle_run)) == 2
        with pytest.raises(SubRunDeleteError):
            await admin.delete_instance(middle_run)
        assert (await admin.delete_instance("top")).instances_deleted == 4
        assert await admin.get_system_metrics() == SystemMetrics()
    finally:
        for name in (leaf_name, middle_name, top_name):
            registry.unregister(name)


# -- delete_instance ----------------------------------------------------------------------


async def test_delete_instance_removes_a_tree_of_three_levels_with_all_data(
    store: WorkflowStore,
) -> None:
    admin = admin_of(store)
    await tree_of_three_levels(store)
    await make_run(store, "bystander", executions=2, context={"keep": 1})
    expected = await total(store, TREE)
    bystander = await snapshot(store, ["bystander"])

    result = await admin.delete_instance("root")

    assert result == expected
    assert result.instances_deleted == 5
    assert result.executions_deleted == 2 + 1 + 3 + 1 + 1
    assert result.queue_messages_deleted == 0
    for run_id in TREE:
        assert await store.get_run(run_id) is None
        assert await store.list_steps(run_id) == []
        assert await admin.list_children(run_id) == []
        with pytest.raises(RunNotFoundError):
            await admin.get_instance_info(run_id)
        with pytest.raises(RunNotFoundError):
            await admin.read_history(run_id, 1)
    assert await admin.list_instances() == ["bystander"]
    assert await admin.list_instances_by_status("completed") == ["bystander"]
    after = await snapshot(store, ["bystander"])
    assert after["bystander"] == bystander["bystander"]
    assert after["metrics"] == metrics(
        total_instances=1, total_executions=2, completed_instances=1, total_events=5
    )


async def test_a_sub_run_cannot_be_deleted_alone_even_with_force(store: WorkflowStore) -> None:
    admin = admin_of(store)
    await tree_of_three_levels(store)
    before = await snapshot(store, TREE)
    for run_id in ("c1", "g2"):
        for force in (False, True):
            with pytest.raises(SubRunDeleteError, match="delete its root 'root'") as refused:
                await admin.delete_instance(run_id, force)
            assert (refused.value.run_id, refused.value.root_id) == (run_id, "root")
    assert await snapshot(store, TREE) == before


async def test_a_running_run_needs_force(store: WorkflowStore) -> None:
    admin = admin_of(store)
    await make_run(store, "busy", final=RunStatus.RUNNING)
    before = await snapshot(store, ["busy"])
    with pytest.raises(RunStillRunningError, match="running") as refused:
        await admin.delete_instance("busy")
    assert refused.value.run_id == "busy"
    assert await snapshot(store, ["busy"]) == before
    result = await admin.delete_instance("busy", force=True)
    assert (result.instances_deleted, result.executions_deleted, result.events_deleted) == (1, 1, 1)
    assert await store.get_run("busy") is None


async def test_one_unfinished_run_in_a_tree_leaves_every_run_untouched(
    store: WorkflowStore,
) -> None:
    admin = admin_of(store)
    await tree_of_three_levels(store, final=RunStatus.RUNNING)  # g2 still runs
    before = await snapshot(store, TREE)
    with pytest.raises(RunStillRunningError) as refused:
        await admin.delete_instance("root")
    assert refused.value.run_id == "g2"
    assert await snapshot(store, TREE) == before
    assert (await admin.delete_instance("root", force=True)).instances_deleted == 5
    assert await admin.list_instances() == []


async def test_deleting_an_unknown_id_is_not_found(store: WorkflowStore) -> None:
    admin = admin_of(store)
    with pytest.raises(RunNotFoundError, match="not found"):
        await admin.delete_instance("ghost")
    with pytest.raises(RunNotFoundError):
        await admin.delete_instance("ghost", force=True)


async def test_a_late_completion_after_a_forced_delete_recreates_nothing(
    store: WorkflowStore,
) -> None:
    admin = admin_of(store)
    await make_run(store, "busy", final=RunStatus.RUNNING, context={"a": 1})
    lease = await store.claim_step("busy", "slow", name="slow", owner="worker-a")
    other = await store.claim_step("busy", "other", name="other", owner="worker-b")
    await admin.delete_instance("busy", force=True)

    with pytest.raises(StaleLeaseError):
        await store.complete_step(lease, output=1, context_patch={"b": 2}, event=event())
    with pytest.raises(StaleLeaseError):
        await store.fail_step(other, error="x", final=True, event=event())
    with pytest.raises(StaleLeaseError):
        await store.renew_lease(lease)
    assert await store.get_run("busy") is None
    assert await store.list_steps("busy") == []
    assert await admin.list_instances() == []
    assert await admin.get_system_metrics() == SystemMetrics()


async def test_a_stale_completion_never_reaches_a_run_re_created_under_the_same_id(
    store: WorkflowStore,
) -> None:
    admin = admin_of(store)
    await make_run(store, "r1", final=RunStatus.RUNNING, context={"old": True})
    old = await store.claim_step("r1", "s1", name="s1", owner="worker-a")
    await admin.delete_instance("r1", force=True)
    await store.create_run(RunRecord(run_id="r1", workflow="wf2", status=RunStatus.RUNNING))
    new = await store.claim_step("r1", "s1", name="s1", owner="worker-b")
    assert new.epoch == old.epoch  # same epoch, another token: the token tells them apart

    with pytest.raises(StaleLeaseError):
        await store.complete_step(old, output="old", context_patch={"old": 1}, event=event())
    run = await store.get_run("r1")
    assert run is not None
    assert (run.workflow, run.context) == ("wf2", {})
    assert await admin.read_history("r1") == []
    await store.complete_step(new, output="new")
    step = await store.get_step("r1", "s1")
    assert step is not None
    assert step.output == "new"


async def test_a_deleted_id_can_be_used_again(store: WorkflowStore) -> None:
    admin = admin_of(store)
    await tree_of_three_levels(store)
    await admin.delete_instance("root")
    await make_run(store, "root", executions=1)
    await make_run(store, "c1", parent="root")
    assert await admin.get_instance_tree("root") == InstanceTree(
        instance_id="root", children=[InstanceTree(instance_id="c1")]
    )
    assert await admin.list_executions("root") == [1]


async def test_a_run_whose_parent_is_gone_counts_as_a_root(store: WorkflowStore) -> None:
    admin = admin_of(store)
    await make_run(store, "parent")
    await make_run(store, "child", parent="parent")
    assert await store.delete_run("parent") is True  # the plain per-run delete keeps children
    assert await admin.get_parent_id("child") == "parent"
    assert (await admin.delete_instance("child")).instances_deleted == 1


# -- delete_instances_atomic ------------------------------------------------------------


async def test_delete_instances_atomic_deletes_exactly_the_listed_runs(
    store: WorkflowStore,
) -> None:
    admin = admin_of(store)
    for run_id in ("a", "b", "c", "keep"):
        await make_run(store, run_id)
    expected = await total(store, ["a", "b", "c"])
    assert await admin.delete_instances_atomic(["a", "b", "c", "a"]) == expected
    assert await admin.list_instances() == ["keep"]
    assert await admin.delete_instances_atomic([]) == DeleteResult()


async def test_delete_instances_atomic_refuses_to_orphan_a_child(store: WorkflowStore) -> None:
    admin = admin_of(store)
    await tree_of_three_levels(store)
    before = await snapshot(store, TREE)
    with pytest.raises(OrphanRunError, match="orphan") as refused:
        await admin.delete_instances_atomic(["root"])
    assert (refused.value.parent_id, refused.value.child_id) == ("root", "c1")
    with pytest.raises(OrphanRunError) as refused:
        await admin.delete_instances_atomic(["root", "c1", "c2", "g1"])
    assert (refused.value.parent_id, refused.value.child_id) == ("c1", "g2")
    assert await snapshot(store, TREE) == before
    result = await admin.delete_instances_atomic(["g2", "g1", "c2", "c1", "root"])
    assert result.instances_deleted == 5
    assert await admin.list_instances() == []


async def test_delete_instances_atomic_is_all_or_nothing(store: WorkflowStore) -> None:
    admin = admin_of(store)
    await tree_of_three_levels(store)
    await make_run(store, "busy", final=RunStatus.RUNNING)
    runs = [*TREE, "busy"]
    before = await snapshot(store, runs)
    with pytest.raises(RunNotFoundError):
        await admin.delete_instances_atomic(["busy", "ghost", *TREE], force=True)
    with pytest.raises(SubRunDeleteError) as refused:
        await admin.delete_instances_atomic(["c1", "g1", "g2"])  # c1's parent exists, unlisted
    assert refused.value.root_id == "root"
    with pytest.raises(RunStillRunningError):
        await admin.delete_instances_atomic([*TREE, "busy"])
    assert await snapshot(store, runs) == before
    assert (await admin.delete_instances_atomic([*TREE, "busy"], True)).instances_deleted == 6


# -- delete_instance_bulk ----------------------------------------------------------------


async def test_bulk_delete_by_ids_skips_running_and_unknown_runs(store: WorkflowStore) -> None:
    admin = admin_of(store)
    await make_run(store, "done-1", created_at=1)
    await make_run(store, "done-2", created_at=2)
    await make_run(store, "busy", created_at=3, final=RunStatus.RUNNING)
    result = await admin.delete_instance_bulk(
        InstanceFilter(instance_ids=["done-1", "busy", "ghost", "done-2"])
    )
    assert result.instances_deleted == 2
    assert await admin.list_instances() == ["busy"]
    none = await admin.delete_instance_bulk(InstanceFilter(instance_ids=["ghost", "busy"]))
    assert none == DeleteResult()


async def test_bulk_delete_takes_roots_with_their_trees_and_skips_sub_runs(
    store: WorkflowStore,
) -> None:
    admin = admin_of(store)
    await tree_of_three_levels(store)
    await make_run(store, "p2", created_at=2_000)
    await make_run(store, "p2-kid", parent="p2", created_at=2_001, final=RunStatus.RUNNING)
    await make_run(store, "alone", created_at=2_002, final=RunStatus.FAILED)
    expected = await total(store, [*TREE, "alone"])

    # Listed sub-runs are not roots; p2's tree still runs: both skipped silently.
    result = await admin.delete_instance_bulk(
        InstanceFilter(instance_ids=["c1", "root", "p2", "alone"])
    )
    assert result == expected
    assert sorted(await admin.list_instances()) == ["p2", "p2-kid"]


async def test_bulk_delete_with_limit_works_in_batches_oldest_first(
    store: WorkflowStore,
) -> None:
    admin = admin_of(store)
    for i in range(5):
        await make_run(store, f"r{i}", created_at=1_000 + i)
    await make_run(store, "kid", parent="r1", created_at=999)
    await make_run(store, "busy", created_at=500, final=RunStatus.RUNNING)
    first = await admin.delete_instance_bulk(InstanceFilter(limit=2))
    assert first.instances_deleted == 3  # r0, and r1 with its child
    assert sorted(await admin.list_instances()) == ["busy", "r2", "r3", "r4"]
    assert (await admin.delete_instance_bulk(InstanceFilter(limit=2))).instances_deleted == 2
    assert (await admin.delete_instance_bulk(InstanceFilter(limit=2))).instances_deleted == 1
    assert (await admin.delete_instance_bulk(InstanceFilter(limit=2))).instances_deleted == 0
    assert (await admin.delete_instance_bulk(InstanceFilter(limit=0))).instances_deleted == 0
    assert await admin.list_instances() == ["busy"]


async def test_bulk_delete_with_completed_before(store: WorkflowStore) -> None:
    admin = admin_of(store)
    before_all = now_ms()
    await anyio.sleep(0.01)
    await make_run(store, "old-1", created_at=1)
    await make_run(store, "old-2", created_at=2)
    await anyio.sleep(0.01)
    cutoff = now_ms()
    await anyio.sleep(0.01)
    await make_run(store, "new", created_at=3)
    await make_run(store, "busy", created_at=4, final=RunStatus.RUNNING)

    ids = InstanceFilter(instance_ids=["old-1", "old-2"], completed_before=before_all)
    assert (await admin.delete_instance_bulk(ids)).instances_deleted == 0
    limited = InstanceFilter(completed_before=cutoff, limit=1)
    assert (await admin.delete_instance_bulk(limited)).instances_deleted == 1
    assert sorted(await admin.list_instances()) == ["busy", "new", "old-2"]
    rest = await admin.delete_instance_bulk(InstanceFilter(completed_before=cutoff))
    assert rest.instances_deleted == 1
    assert sorted(await admin.list_instances()) == ["busy", "new"]
    everything = await admin.delete_instance_bulk()
    assert everything.instances_deleted == 1
    assert await admin.list_instances() == ["busy"]


# -- prune -----------------------------------------------------------------------------------


@pytest.mark.parametrize("keep_last", [None, 0, 1])
async def test_prune_keep_last_none_zero_and_one_keep_only_the_current(
    store: WorkflowStore, keep_last: int | None
) -> None:
    admin = admin_of(store)
    await make_run(store, "r1", executions=4, context={"bag": [1, 2]})
    doomed = [x for x in await store.list_executions("r1") if x.execution_id < 4]
    result = await admin.prune_executions("r1", PruneOptions(keep_last=keep_last))
    assert result == PruneResult(
        instances_processed=1,
        executions_deleted=3,
        events_deleted=sum(x.event_count for x in doomed),
    )
    assert await admin.list_executions("r1") == [4]
    assert await admin.latest_execution_id("r1") == 4
    run = await store.get_run("r1")
    assert run is not None
    assert run.context == {"bag": [1, 2]}  # never the context bag


async def test_prune_keep_last_two_keeps_the_two_newest(store: WorkflowStore) -> None:
    admin = admin_of(store)
    await make_run(store, "r1", executions=4)
    result = await admin.prune_executions("r1", PruneOptions(keep_last=2))
    assert (result.instances_processed, result.executions_deleted) == (1, 2)
    assert await admin.list_executions("r1") == [3, 4]
    again = await admin.prune_executions("r1", PruneOptions(keep_last=2))
    assert again == PruneResult(instances_processed=1)  # nothing to delete: still processed


async def test_prune_with_completed_before_takes_only_older_executions(
    store: WorkflowStore,
) -> None:
    admin = admin_of(store)
    await make_run(store, "r1", executions=2, final=RunStatus.RUNNING)
    await anyio.sleep(0.01)
    cutoff = now_ms()
    await anyio.sleep(0.01)
    await store.continue_as_new("r1", None, execution_id=2)
    await store.continue_as_new("r1", None, execution_id=3)
    options = PruneOptions(completed_before=cutoff)
    assert (await admin.prune_executions("r1", options)).executions_deleted == 1
    assert await admin.list_executions("r1") == [2, 3, 4]
    both = PruneOptions(keep_last=1, completed_before=now_ms() + 1)
    assert (await admin.prune_executions("r1", both)).executions_deleted == 2
    assert await admin.list_executions("r1") == [4]


async def test_prune_never_takes_the_current_or_a_running_execution(
    store: WorkflowStore,
) -> None:
    admin = admin_of(store)
    await make_run(store, "r1", executions=3, final=RunStatus.RUNNING)
    # Execution 2 left running, as after a create_run that moved the run back to it.
    await store.create_run(
        RunRecord(run_id="r1", workflow="wf", status=RunStatus.RUNNING, current_execution_id=2)
    )
    result = await admin.prune_executions("r1", PruneOptions(keep_last=0))
    assert result.executions_deleted == 1  # only execution 1: 2 is current, 3 is running
    assert await admin.list_executions("r1") == [2, 3]


async def test_prune_of_an_unknown_id_is_not_found(store: WorkflowStore) -> None:
    with pytest.raises(RunNotFoundError):
        await admin_of(store).prune_executions("ghost", PruneOptions(keep_last=1))


async def test_prune_bulk_sums_counts_and_processes_running_runs(store: WorkflowStore) -> None:
    admin = admin_of(store)
    await make_run(store, "a", created_at=1, executions=3)
    await make_run(store, "b", created_at=2, executions=2, final=RunStatus.RUNNING)
    await make_run(store, "c", created_at=3, executions=3)
    await make_run(store, "d", created_at=4)

    by_ids = await admin.prune_executions_bulk(
        InstanceFilter(instance_ids=["a", "b", "ghost"]), PruneOptions(keep_last=1)
    )
    assert (by_ids.instances_processed, by_ids.executions_deleted) == (2, 3)
    assert await admin.list_executions("b") == [2]  # running: the finished one went
    assert await admin.list_executions("c") == [1, 2, 3]

    limited = await admin.prune_executions_bulk(InstanceFilter(limit=3), PruneOptions())
    assert (limited.instances_processed, limited.executions_deleted) == (3, 2)  # a, b, c
    everything = await admin.prune_executions_bulk()
    assert (everything.instances_processed, everything.executions_deleted) == (4, 0)

    await store.continue_as_new("b", None, execution_id=2)
    finished = await admin.prune_executions_bulk(
        InstanceFilter(completed_before=now_ms() + 1), PruneOptions()
    )
    assert (finished.instances_processed, finished.executions_deleted) == (3, 0)  # not b
    assert await admin.list_executions("b") == [2, 3]


# -- Redis: the two-phase delete -----------------------------------------------------------


async def fences(store: RedisStore, run_ids: list[str]) -> dict[str, dict[str, str]]:
    """The delete fence fields left in each run hash."""
    found = {}
    for run_id in run_ids:
        fields = await store.client.hgetall(store.keys.run(run_id).run)
        fence = {k.decode(): v.decode() for k, v in fields.items() if k.startswith(b"~")}
        if fence:
            found[run_id] = fence
    return found


async def prepare(store: RedisStore, ids: list[str], *, commit: bool, force: bool = False) -> str:
    """Phases 1 (and 3) of a delete, as left by a process that died right after them."""
    request_id = await store._prepare(ids, await store._plan_delete(ids, force), force)
    if commit:
        assert (await store._decide(ids[0], request_id, "commit"))[0] == "committed"
    return request_id


async def test_a_fenced_run_refuses_every_write_and_reads_normally(
    redis_store: RedisStore,
) -> None:
    store = redis_store
    await make_run(store, "r1", final=RunStatus.RUNNING, context={"a": 1})
    lease = await store.claim_step("r1", "held", name="held", owner="w")
    before = await snapshot(store, ["r1"])
    await prepare(store, ["r1"], commit=False, force=True)

    for write in (
        store.claim_step("r1", "s2", name="s2", owner="w"),
        store.set_run_status("r1", RunStatus.COMPLETED, execution_id=1),
        store.append_event("r1", event(), execution_id=1),
        store.merge_context("r1", {"b": 2}),
        store.create_run(RunRecord(run_id="r1", workflow="other")),
        store.create_run(RunRecord(run_id="kid", workflow="wf", parent_run_id="r1")),
        store.continue_as_new("r1", None, execution_id=1),
        store.prune_executions("r1", PruneOptions()),
        store.delete_run("r1"),
    ):
        with pytest.raises(RunDeletingError, match="being deleted"):
            await write
    with pytest.raises(StaleLeaseError, match="being deleted"):
        await store.complete_step(lease, output=1, event=event())
    assert await snapshot(store, ["r1"]) == before  # readers see the run as it was
    assert await store.get_run("kid") is None
    assert await store.client.zscore(store.keys.runs_by_time, "kid") is None


async def test_a_delete_prepared_by_a_dead_process_is_rolled_back_then_done(
    redis_store: RedisStore,
) -> None:
    store, admin = redis_store, admin_of(redis_store)
    await tree_of_three_levels(store)
    expected = await total(store, TREE)
    await prepare(store, TREE, commit=False)
    assert set(await fences(store, TREE)) == set(TREE)

    with pytest.raises(RunDeletingError):  # young: its process may still be working
        await admin.delete_instance("root")
    assert (await fences(store, ["root"]))["root"]["~del_state"] == "prepared"

    old = await store.time_ms() - FENCE_TIMEOUT_MS - 1
    await store.client.hset(store.keys.run("root").run, "~del_at", old)
    assert await admin.delete_instance("root") == expected
    assert await admin.list_instances() == []
    assert await admin.get_system_metrics() == SystemMetrics()


async def test_a_rolled_back_delete_leaves_the_runs_as_they_were(redis_store: RedisStore) -> None:
    store, admin = redis_store, admin_of(redis_store)
    await tree_of_three_levels(store)
    before = await snapshot(store, TREE)
    request_id = await prepare(store, TREE, commit=False)
    await store.client.hset(store.keys.run("root").run, "~del_at", 0)
    assert (await store._decide("root", request_id, "abort"))[0] == "aborted"
    assert await store._recover(_Fenced("g1", request_id, "root")) is None
    assert await fences(store, TREE) == {}
    assert await snapshot(store, TREE) == before
    # The slow original process can no longer commit.
    assert (await store._decide("root", request_id, "commit"))[0] == "gone"
    assert (await admin.delete_instance("root")).instances_deleted == 5


async def test_a_committed_delete_is_finished_by_the_next_delete(redis_store: RedisStore) -> None:
    store, admin = redis_store, admin_of(redis_store)
    await tree_of_three_levels(store)
    expected = await total(store, TREE)
    request_id = await prepare(store, TREE, commit=True)
    await store._delete_one("g1", request_id, "fenced")  # phase 2 had begun, then a crash

    assert await admin.delete_instance("root") == expected  # the interrupted delete, finished
    assert await fences(store, TREE) == {}
    for run_id in TREE:
        assert await store.get_run(run_id) is None
    assert await admin.list_instances() == []
    assert await admin.get_system_metrics() == SystemMetrics()


async def test_a_change_between_check_and_fence_releases_every_fence(
    redis_store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, admin = redis_store, admin_of(redis_store)
    await tree_of_three_levels(store)
    plan = store._plan_delete
    calls = 0

    async def racing_plan(ids: list[str], force: bool) -> Any:
        nonlocal calls
        calls += 1
        planned = await plan(ids, force)
        if calls == 1:  # a child run appears between the read and the fences
            await make_run(store, "late", parent="c2")
        return planned

    monkeypatch.setattr(store, "_plan_delete", racing_plan)
    with pytest.raises(OrphanRunError) as refused:
        await admin.delete_instances_atomic(TREE)
    assert (refused.value.parent_id, refused.value.child_id) == ("c2", "late")
    assert calls == 2
    assert await fences(store, [*TREE, "late"]) == {}
    assert len(await admin.list_instances()) == 6

    calls = 0
    assert (await admin.delete_instance("root")).instances_deleted == 6  # "late" included


async def test_a_run_restarted_between_check_and_fence_stops_the_whole_delete(
    redis_store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, admin = redis_store, admin_of(redis_store)
    await tree_of_three_levels(store)
    plan = store._plan_delete

    async def racing_plan(ids: list[str], force: bool) -> Any:
        planned = await plan(ids, force)
        restarted = RunRecord(
            run_id="g2", workflow="wf", status=RunStatus.RUNNING, parent_run_id="c1"
        )
        await store.create_run(restarted)
        return planned

    monkeypatch.setattr(store, "_plan_delete", racing_plan)
    before = await snapshot(store, TREE)
    with pytest.raises(RunStillRunningError):
        await admin.delete_instance("root")
    after = await snapshot(store, TREE)
    assert after["g2"]["run"]["status"] == "running"
    for run_id in ("root", "c1", "g1", "c2"):
        assert after[run_id] == before[run_id]
    assert await fences(store, TREE) == {}


async def test_listings_of_ids_repair_stale_index_entries(redis_store: RedisStore) -> None:
    store, admin = redis_store, admin_of(redis_store)
    await make_run(store, "r1", created_at=10)
    # What a crash between an index write and the run write leaves behind:
    await store.client.zadd(store.keys.runs_by_time, {"ghost": 20})
    running = store.keys.runs_by_status(RunStatus.RUNNING)
    await store.client.zadd(running, {"r1": 10, "ghost": 20})

    assert await admin.list_instances() == ["r1"]
    assert await admin.list_instances_by_status("running") == []
    assert await admin.list_instances_by_status("completed") == ["r1"]
    assert await store.client.zcard(running) == 0
    assert (await admin.get_system_metrics()).total_instances == 1


async def test_children_are_indexed_in_the_parent_slot(redis_store: RedisStore) -> None:
    store = redis_store
    await tree_of_three_levels(store)
    keys = store.keys.run("c1")
    assert await store.client.smembers(keys.children) == {b"g1", b"g2"}
    assert key_slot(keys.children.encode()) == key_slot(keys.run.encode())
    await admin_of(store).delete_instance("root")
    assert await store.client.exists(keys.children) == 0
    slots = {key_slot(store.keys.queue(kind).encode()) for kind in ("orchestrator", "worker")}
    assert len(slots) == 2


# -- Redis: counters ---------------------------------------------------------------------------


async def workload(store: WorkflowStore) -> None:
    admin = admin_of(store)
    await tree_of_three_levels(store)
    await make_run(store, "eternal", executions=4, final=RunStatus.RUNNING)
    await store.continue_as_new("eternal", None, execution_id=4, prune=PruneOptions(keep_last=2))
    await admin.prune_executions("eternal", PruneOptions(keep_last=1))
    await admin.delete_instance("root")
    await make_run(store, "short")
    assert await store.delete_run("short") is True


async def test_counters_stay_exact_when_every_request_is_sent_twice(
    redis_store: RedisStore,
) -> None:
    reference = MemoryStore()
    await workload(reference)
    await redis_store.get_run("warm-up")  # scripts loaded: no NOSCRIPT in between
    with everything_sent_twice():
        await workload(redis_store)
    expected = await reference.get_metrics()
    assert await redis_store.get_metrics() == expected
    assert await stored_counts(redis_store) == (expected.total_executions, expected.total_events)


async def test_counters_stay_exact_after_script_flush(redis_store: RedisStore) -> None:
    reference = MemoryStore()
    await make_run(reference, "r1", executions=3)
    await make_run(redis_store, "warm-up")
    await redis_store.delete_run("warm-up")
    await redis_store.client.script_flush()
    await make_run(redis_store, "r1", executions=3)
    assert await redis_store.get_metrics() == await reference.get_metrics()
    await redis_store.client.script_flush()
    await admin_of(redis_store).delete_instance("r1")
    assert await redis_store.get_metrics() == SystemMetrics()
