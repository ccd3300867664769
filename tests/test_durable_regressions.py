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
from conftest import PassThroughStore, make_store

import stepflow
from stepflow import Engine, Event, RunRecord, RunStatus, WorkflowStore
from stepflow._json import MIN_PAYLOAD_BYTES

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


def _name(kind: str) -> str:
    return f"test-{kind}-{uuid.uuid4().hex[:8]}"


async def _noop(value: Any = None) -> Any:
    await anyio.sleep(0.01)
    return value


async def test_commands_awaited_side_by_side_are_refused_on_the_first_run(
    store: WorkflowStore,
) -> None:
    """On replay a recorded step returns at once, so steps run side by side were
    numbered otherwise after a restart and took one another's results (a
    reviewer's ``asyncio.gather`` of two branches swapped their results)."""

    @stepflow.workflow(_name("side-by-side"))
    async def side_by_side(ctx: stepflow.WorkflowContext, _: Any) -> Any:
        async with anyio.create_task_group() as tg:
            tg.start_soon(ctx.step, _noop, "a")
            tg.start_soon(ctx.step, _noop, "b")

    with anyio.fail_after(5):
        record = await Engine(store).run(side_by_side)
    assert record.status == RunStatus.FAILED
    assert record.error is not None
    assert (
        "InvalidArgumentError: ctx.step was called while ctx.step had not returned"
        in (record.error["message"])
    )


@pytest.mark.parametrize(
    "carried", [{"x": float("nan")}, {"big": "x" * (1024 * 1024)}], ids=["nan", "too large"]
)
async def test_a_continue_as_new_input_the_store_refuses_fails_the_run(
    store: WorkflowStore, carried: Any
) -> None:
    """Before, the run stayed running without a driver, and every resume failed alike."""

    @stepflow.workflow(_name("continue-refused"))
    async def grows(ctx: stepflow.WorkflowContext, state: Any) -> None:
        ctx.continue_as_new(carried)

    with anyio.fail_after(5):
        record = await Engine(store).run(grows)
    assert record.status == RunStatus.FAILED
    assert record.error is not None
    assert record.error["phase"] == "continue_as_new"
    assert record.current_execution_id == 1


async def test_an_event_raised_after_a_wait_s_deadline_does_not_count_for_it(
    store: WorkflowStore,
) -> None:
    """The deadline decides, whether or not a process ran the wait at that moment."""

    @stepflow.workflow(_name("late-approval"))
    async def approval(ctx: stepflow.WorkflowContext, _: Any) -> str:
        try:
            return str(await ctx.wait_for_event("approval", timeout=0.3))
        except stepflow.EventTimeoutError:
            return "timed out"

    with anyio.fail_after(5):
        async with Engine(store) as engine:
            run_id = await engine.start(approval)
            await anyio.sleep(0.1)  # the wait has begun; the engine stops
        await anyio.sleep(0.4)  # past the deadline, no process running the wait
        await Engine(store).raise_event(run_id, "approval", "approved")
        async with Engine(store) as engine:
            await engine.resume(run_id)
            record = await engine.wait(run_id)
    assert (record.status, record.output) == (RunStatus.COMPLETED, "timed out")


class _SlowRead(PassThroughStore):
    """A raising process that reads the run, then is held up before it appends."""

    async def get_run(self, run_id: str) -> RunRecord | None:
        record = await self.inner.get_run(run_id)
        await anyio.sleep(0.3)
        return record


async def test_an_event_raised_while_the_run_continues_and_prunes_is_delivered(
    store: WorkflowStore,
) -> None:
    """Before, the append to the execution read found it pruned meanwhile and
    ``raise_event`` failed with `ExecutionNotFoundError`."""

    @stepflow.workflow(_name("continue-prune"))
    async def rounds(ctx: stepflow.WorkflowContext, n: int) -> Any:
        if n == 0:
            await ctx.sleep(0.1)
            ctx.continue_as_new(1, prune=stepflow.PruneOptions(keep_last=1))
        return await ctx.wait_for_event("go")

    with anyio.fail_after(5):
        async with Engine(store) as engine:
            run_id = await engine.start(rounds, 0)
            await Engine(cast(WorkflowStore, _SlowRead(store))).raise_event(run_id, "go", "got")
            record = await engine.wait(run_id)
    assert (record.status, record.output, record.current_execution_id) == (
        RunStatus.COMPLETED,
        "got",
        2,
    )


async def test_a_resumed_parent_resumes_the_child_its_cancel_stopped(
    store: WorkflowStore,
) -> None:
    """Cancelling a parent cancels the child it awaits; resuming the parent once
    failed it at once on that cancel (``ChildRunFailedError``)."""

    waiting = [anyio.Event(), anyio.Event()]  # the child's first run, then its resumed one

    @stepflow.workflow(_name("kid"))
    async def kid(ctx: stepflow.WorkflowContext, _: Any) -> Any:
        waiting[1 if waiting[0].is_set() else 0].set()
        return await ctx.wait_for_event("go")

    @stepflow.workflow(_name("parent"))
    async def parent(ctx: stepflow.WorkflowContext, _: Any) -> Any:
        return {"child said": await ctx.child(kid)}

    with anyio.fail_after(5):
        async with Engine(store) as engine:
            run_id = await engine.start(parent)
            await waiting[0].wait()
            assert (await engine.cancel(run_id)).status == RunStatus.CANCELLED
            [child] = [run for run in await store.list_runs() if run.parent_run_id == run_id]
            assert child.status == RunStatus.CANCELLED
            await engine.resume(run_id)
            await waiting[1].wait()
            await engine.raise_event(child.run_id, "go", "hello")
            record = await engine.wait(run_id)
    assert (record.status, record.output) == (RunStatus.COMPLETED, {"child said": "hello"})


async def test_a_child_id_taken_by_another_run_fails_the_parent_and_adopts_nothing(
    store: WorkflowStore,
) -> None:
    @stepflow.workflow(_name("other"))
    async def other(ctx: stepflow.WorkflowContext, _: Any) -> str:
        return "I am an unrelated run"

    @stepflow.workflow(_name("kid"))
    async def kid(ctx: stepflow.WorkflowContext, _: Any) -> str:
        return "the child"

    @stepflow.workflow(_name("parent"))
    async def parent(ctx: stepflow.WorkflowContext, _: Any) -> Any:
        return await ctx.child(kid)

    with anyio.fail_after(5):
        engine = Engine(store)
        await engine.run(other, run_id="order-7.1.1")  # the id the parent's child gets
        record = await engine.run(parent, run_id="order-7")
    assert record.status == RunStatus.FAILED
    assert record.error is not None
    assert record.error["type"] == "ConflictError"
    assert "taken by another run" in record.error["message"]
    unrelated = await store.get_run("order-7.1.1")
    assert unrelated is not None
    assert unrelated.parent_run_id is None


async def test_a_durable_run_of_another_version_is_left_for_a_process_running_that_version(
    store: WorkflowStore,
) -> None:
    """Replaying it with other code would fail it; it is refused and left as stored."""
    name = _name("versioned")

    @stepflow.workflow(name, version="1")
    async def v1(ctx: stepflow.WorkflowContext, _: Any) -> str:
        await ctx.wait_for_event("go")
        return "v1"

    with anyio.fail_after(5):
        async with Engine(store) as engine:
            run_id = await engine.start(v1)
            await anyio.sleep(0.05)

        @stepflow.workflow(name, version="2")
        async def v2(ctx: stepflow.WorkflowContext, _: Any) -> str:
            return "v2"

        async with Engine(store) as engine:
            with pytest.raises(stepflow.WorkflowVersionError, match="version '1'") as caught:
                await engine.resume(run_id)
        assert (caught.value.stored_version, caught.value.version) == ("1", "2")
        record = await store.get_run(run_id)
        assert record is not None
        assert (record.status, record.version) == (RunStatus.RUNNING, "1")
        async with Engine(store, workflows=[v1]) as engine:  # a process still running v1
            await engine.raise_event(run_id, "go", None)
            await engine.resume(run_id)
            assert (await engine.wait(run_id)).output == "v1"


async def test_side_by_side_commands_stop_each_other_and_record_nothing_after_the_end(
    store: WorkflowStore,
) -> None:
    """With ``asyncio.gather`` the refused call's sibling ran on: its step completed
    and was recorded after ``run_failed``. The refusal stops it too."""
    import asyncio

    ran: list[str] = []

    async def slow(label: str) -> str:
        await anyio.sleep(0.2)
        ran.append(label)
        return label

    @stepflow.workflow(_name("gather"))
    async def gather(ctx: stepflow.WorkflowContext, _: Any) -> Any:
        return await asyncio.gather(ctx.step(slow, "a", name="a"), ctx.step(slow, "b", name="b"))

    with anyio.fail_after(5):
        record = await Engine(store).run(gather)
        await anyio.sleep(0.4)  # the first step would have finished by now
    assert record.status == RunStatus.FAILED
    assert ran == []
    kinds = [event.kind for event in await store.read_history(record.run_id)]
    assert kinds == [stepflow.EventKind.RUN_STARTED, stepflow.EventKind.RUN_FAILED]
    assert all(
        step.status != stepflow.StepStatus.RUNNING for step in await store.list_steps(record.run_id)
    )


class _SilentClaims(PassThroughStore):
    async def claim_step(self, *args: Any, **kwargs: Any) -> Any:
        await anyio.sleep_forever()


async def test_a_claim_the_store_never_answers_leaves_a_durable_run_as_stored(
    store: WorkflowStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given up on after its patience, the claim is the store's failure, as a lost
    connection is: the run is left to a resume, not failed for good."""
    monkeypatch.setattr(stepflow.engine.attempts, "_CLAIM_PATIENCE", 0.2)

    @stepflow.workflow(_name("silent-claim"))
    async def one_step(ctx: stepflow.WorkflowContext, _: Any) -> Any:
        return await ctx.step(_noop, "done")

    with anyio.fail_after(5):
        with pytest.raises(stepflow.StoreError, match="did not answer a claim"):
            await Engine(cast(WorkflowStore, _SilentClaims(store))).run(one_step, run_id="r1")
        record = await store.get_run("r1")
        assert record is not None
        assert record.status == RunStatus.RUNNING
        assert (await Engine(store).run(one_step, run_id="r1")).output == "done"


async def test_a_child_cancelled_by_hand_while_its_parent_was_not_running_stays_cancelled(
    store: WorkflowStore,
) -> None:
    """Only a parent's own cancel resumes its children with it."""

    kid_waits = anyio.Event()

    @stepflow.workflow(_name("kid"))
    async def kid(ctx: stepflow.WorkflowContext, _: Any) -> Any:
        kid_waits.set()
        return await ctx.wait_for_event("go")

    @stepflow.workflow(_name("parent"))
    async def parent(ctx: stepflow.WorkflowContext, _: Any) -> Any:
        try:
            return await ctx.child(kid)
        except stepflow.ChildRunFailedError as failed:
            return {"child failed": failed.error["type"]}

    with anyio.fail_after(5):
        async with Engine(store) as engine:  # left running, with its child
            run_id = await engine.start(parent)
            await kid_waits.wait()
        child_id = f"{run_id}.1.1"
        assert (await Engine(store).cancel(child_id)).status == RunStatus.CANCELLED
        async with Engine(store) as engine:
            await engine.resume(run_id)
            record = await engine.wait(run_id)
    assert (record.status, record.output) == (RunStatus.COMPLETED, {"child failed": "Cancelled"})
    assert (await store.get_run(child_id)).status == RunStatus.CANCELLED  # type: ignore[union-attr]


async def test_a_child_of_another_version_leaves_its_parent_as_stored(
    store: WorkflowStore,
) -> None:
    """Not failed: a process that has the child's version resumes both."""
    kid_name = _name("kid")

    kid_waits = anyio.Event()

    @stepflow.workflow(kid_name, version="1")
    async def kid_v1(ctx: stepflow.WorkflowContext, _: Any) -> Any:
        kid_waits.set()
        return await ctx.wait_for_event("go")

    @stepflow.workflow(_name("parent"))
    async def parent(ctx: stepflow.WorkflowContext, _: Any) -> Any:
        return await ctx.child(kid_v1)

    with anyio.fail_after(5):
        async with Engine(store) as engine:
            run_id = await engine.start(parent)
            await kid_waits.wait()

        @stepflow.workflow(kid_name, version="2")
        async def kid_v2(ctx: stepflow.WorkflowContext, _: Any) -> Any:
            return "v2"

        async with Engine(store) as engine:
            await engine.resume(run_id)
            with pytest.raises(stepflow.WorkflowVersionError):
                await engine.wait(run_id)
        assert (await store.get_run(run_id)).status == RunStatus.RUNNING  # type: ignore[union-attr]
        async with Engine(store, workflows=[parent, kid_v1]) as engine:
            await engine.raise_event(f"{run_id}.1.1", "go", "v1 done")
            await engine.resume(run_id)
            assert (await engine.wait(run_id)).output == "v1 done"


async def test_a_raised_event_at_the_size_limit_is_carried_and_received(
    store_kind: str, key_prefix: str, request: pytest.FixtureRequest
) -> None:
    """Its ``carried_from`` marker took it over the limit, and the continue was
    refused; taken by a wait, the wait's own fields did, and the run failed."""
    store = await make_store(store_kind, key_prefix, request, max_payload_bytes=MIN_PAYLOAD_BYTES)

    @stepflow.workflow(_name("carry-big"))
    async def carry(ctx: stepflow.WorkflowContext, n: int) -> Any:
        if n == 0:
            await ctx.sleep(0.1)
            ctx.continue_as_new(1)
        return len(await ctx.wait_for_event("big"))

    payload = "x" * (MIN_PAYLOAD_BYTES - 64)
    try:
        with anyio.fail_after(5):
            async with Engine(store) as engine:
                run_id = await engine.start(carry, 0)
                await engine.raise_event(run_id, "big", payload)
                record = await engine.wait(run_id)
    finally:
        await store.aclose()
    assert (record.status, record.output) == (RunStatus.COMPLETED, len(payload))


async def test_a_completed_run_of_another_version_is_returned_by_resume(
    store: WorkflowStore,
) -> None:
    name = _name("done-versioned")

    @stepflow.workflow(name, version="1")
    async def v1(ctx: stepflow.WorkflowContext, _: Any) -> str:
        return "v1"

    with anyio.fail_after(5):
        run_id = (await Engine(store).run(v1)).run_id

        @stepflow.workflow(name, version="2")
        async def v2(ctx: stepflow.WorkflowContext, _: Any) -> str:
            return "v2"

        async with Engine(store) as engine:
            await engine.resume(run_id)
            assert (await engine.wait(run_id)).output == "v1"


class _ScriptFailsOnce(PassThroughStore):
    """A store whose next history append fails in the script, as Redis answers a write
    on a replica during a failover (``READONLY``)."""

    failed = False

    async def append_event(self, *args: Any, **kwargs: Any) -> Event:
        if not self.failed:
            self.failed = True
            raise stepflow.ScriptError("Redis script failed: READONLY You can't write")
        return await self.inner.append_event(*args, **kwargs)


async def test_a_script_error_leaves_a_durable_run_as_stored_for_a_resume(
    store: WorkflowStore,
) -> None:
    """A `StoreError` is the store's failure, not a refusal: before, it reached the
    workflow and failed the run for good."""

    @stepflow.workflow(_name("script-error"))
    async def naps(ctx: stepflow.WorkflowContext, _: Any) -> str:
        await ctx.sleep(0.01)
        return "woke"

    with anyio.fail_after(5):
        with pytest.raises(stepflow.ScriptError):
            await Engine(cast(WorkflowStore, _ScriptFailsOnce(store))).run(naps, run_id="r1")
        record = await store.get_run("r1")
        assert record is not None
        assert record.status == RunStatus.RUNNING
        assert (await Engine(store).run(naps, run_id="r1")).output == "woke"
