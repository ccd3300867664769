"""Bad input to the public surface: a clear `StepflowError`, the same on every store,
and nothing stored changed.

Each case is one a user can type: a string where a list goes, a dict where a
record goes, an option of the wrong type, a name the store cannot keep. Before
these checks some deleted the wrong runs, some left a run ``running`` with a
raw pydantic or ``AttributeError``, and some answered differently per store.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from typing import Any

import anyio
import pytest

import stepflow
from stepflow import (
    Admin,
    AdminStore,
    DefinitionError,
    Engine,
    EventKind,
    InstanceFilter,
    InvalidArgumentError,
    InvalidRunIdError,
    InvalidStepIdError,
    PruneOptions,
    RunStatus,
    StepContext,
    Workflow,
    WorkflowContext,
    WorkflowStore,
)
from stepflow._json import MIN_PAYLOAD_BYTES

LIMIT = 10.0


def one_step_flow() -> Workflow:
    flow = Workflow(f"bad-input-{uuid.uuid4().hex[:8]}")

    @flow.step()
    async def only(ctx: StepContext) -> dict[str, int]:
        return {"ran": 1}

    return flow


async def stored(store: WorkflowStore) -> dict[str, Any]:
    """Every run with its steps and history: what a bad call must leave as it was."""
    runs = {}
    for record in await store.list_runs(limit=1000):
        steps = [step.model_dump() for step in await store.list_steps(record.run_id)]
        history = [event.model_dump() for event in await store.read_history(record.run_id)]
        runs[record.run_id] = (record.model_dump(), steps, history)
    return runs


async def test_a_single_id_given_for_a_list_of_ids_deletes_nothing(store: WorkflowStore) -> None:
    """``delete_instances_atomic("r1")`` once deleted runs ``r`` and ``1``, not ``r1``."""
    assert isinstance(store, AdminStore)
    with anyio.fail_after(LIMIT):
        engine = Engine(store)
        for run_id in ("r1", "r", "1"):
            await engine.run(one_step_flow(), run_id=run_id)
        before = await stored(store)
        admin = Admin(store)
        for wrong in ("r1", b"r1", 5):
            with pytest.raises(InvalidArgumentError, match="list of run ids"):
                await admin.delete_instances_atomic(wrong)  # type: ignore[arg-type]
        assert await stored(store) == before
        assert (await admin.delete_instances_atomic(["r1"])).instances_deleted == 1


BAD_ENGINE_OPTIONS: list[dict[str, Any]] = [
    {"owner": 5},
    {"owner": ""},
    {"lease_ms": 100.5},
    {"lease_ms": math.nan},
    {"lease_ms": True},
    {"lease_ms": "30000"},
    {"max_concurrency": "4"},
    {"max_concurrency": 1.5},
    {"max_concurrency": None},
    {"workflows": 5},
    {"workflows": [5]},
    {"workflows": "flow"},
    {"default_prune": 5},
    {"default_prune": {"keep_last": 1}},
]


@pytest.mark.parametrize("options", BAD_ENGINE_OPTIONS, ids=repr)
async def test_engine_options_of_the_wrong_type_are_refused_when_the_engine_is_made(
    store: WorkflowStore, options: dict[str, Any]
) -> None:
    """Before: an int owner was stored in the step's row on Redis, and every later
    read of the run raised a pydantic error; a float lease left a memory run running."""
    with pytest.raises(InvalidArgumentError):
        Engine(store, **options)
    assert await store.list_runs() == []


async def test_a_workflow_given_as_one_definition_instead_of_a_list_is_refused(
    store: WorkflowStore,
) -> None:
    with pytest.raises(InvalidArgumentError, match="list of workflow definitions"):
        Engine(store, workflows=one_step_flow())  # type: ignore[arg-type]


async def test_run_takes_a_definition_not_its_name(store: WorkflowStore) -> None:
    flow = one_step_flow()
    with pytest.raises(InvalidArgumentError, match="definition"):
        await Engine(store).run(flow.name)  # type: ignore[arg-type]
    assert await store.list_runs() == []


@pytest.mark.parametrize(
    "name", ["a|b", "a b", "x" * 201, "caf\u00e9", "{tag}"], ids=["bar", "space", "long", "é", "{}"]
)
def test_a_step_name_the_store_would_refuse_is_refused_at_definition(name: str) -> None:
    """Before, the run was created, its first step ran, and then the engine stopped
    on the store's refusal, leaving the run running; every resume did the same."""
    flow = Workflow(f"names-{uuid.uuid4().hex[:8]}")
    with pytest.raises(DefinitionError, match="its id in the store"):
        flow.step(name)(lambda ctx: None)
    with pytest.raises(DefinitionError, match="its id in the store"):
        flow.step(after=[name])(lambda ctx: None)


def test_a_lambda_step_needs_a_name() -> None:
    flow = Workflow(f"names-{uuid.uuid4().hex[:8]}")
    with pytest.raises(DefinitionError, match="'<lambda>' contains the forbidden character"):
        flow.step()(lambda ctx: None)
    flow.step("named")(lambda ctx: None)  # named, it is fine
    assert flow.step_names == ("named",)


async def test_a_store_refuses_a_bad_step_id_or_owner_before_writing(
    store: WorkflowStore,
) -> None:
    with anyio.fail_after(LIMIT):
        await Engine(store).run(one_step_flow(), run_id="r1")
        before = await stored(store)
        with pytest.raises(InvalidStepIdError, match="invalid step id 'a b'"):
            await store.claim_step("r1", "a b", name="a b", owner="me")
        for owner in (5, ""):
            with pytest.raises(InvalidArgumentError, match="owner"):
                await store.claim_step("r1", "next", name="next", owner=owner)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError, match="lease_ms"):
            await store.claim_step("r1", "next", name="next", owner="me", lease_ms=1.5)  # type: ignore[arg-type]
        assert await stored(store) == before


@pytest.mark.parametrize(
    "call",
    [
        lambda admin: admin.prune_executions("r1", {"keep_last": 1}),
        lambda admin: admin.prune_executions_bulk(options={"keep_last": 1}),
        lambda admin: admin.prune_executions_bulk({"instance_ids": ["r1"]}),
        lambda admin: admin.delete_instance_bulk({"instance_ids": ["r1"]}),
    ],
    ids=["prune", "prune-bulk options", "prune-bulk filter", "delete-bulk filter"],
)
async def test_admin_options_given_as_dicts_are_refused(
    store: WorkflowStore, call: Callable[[Admin], Any]
) -> None:
    assert isinstance(store, AdminStore)
    with anyio.fail_after(LIMIT):
        await Engine(store).run(one_step_flow(), run_id="r1")
        before = await stored(store)
        with pytest.raises(InvalidArgumentError, match=r"stepflow\.(PruneOptions|InstanceFilter)"):
            await call(Admin(store))
        assert await stored(store) == before


@pytest.mark.parametrize(
    "build",
    [
        lambda: PruneOptions(keep_last=-1),
        lambda: PruneOptions(keep_last="many"),
        lambda: InstanceFilter(limit=-1),
        lambda: InstanceFilter(bogus=1),
    ],
    ids=["keep_last -1", "keep_last text", "limit -1", "unknown field"],
)
def test_records_built_from_bad_values_raise_a_stepflow_error(build: Callable[[], Any]) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        build()
    assert isinstance(caught.value, ValueError)  # ``except ValueError`` still catches it
    assert "https://" not in str(caught.value)  # pydantic's help links left out


@pytest.mark.parametrize(
    "page",
    [{"offset": -1}, {"limit": -1}, {"limit": 2.5}, {"offset": "1"}, {"limit": True}],
    ids=repr,
)
async def test_a_bad_page_is_refused_on_every_store(
    store: WorkflowStore, page: dict[str, Any]
) -> None:
    """A negative offset once returned the oldest run on memory; 2.5 failed in Redis."""
    assert isinstance(store, AdminStore)
    with anyio.fail_after(LIMIT):
        await Engine(store).run(one_step_flow(), run_id="r1")
        admin = Admin(store)
        with pytest.raises(InvalidArgumentError):
            await admin.list_instances(**page)
        with pytest.raises(InvalidArgumentError):
            await admin.list_instances_by_status("completed", **page)
        with pytest.raises(InvalidArgumentError):
            await admin.list_instance_infos(**page)
        with pytest.raises(InvalidArgumentError):
            await store.list_runs(**page)


async def test_a_huge_page_is_the_whole_list_on_every_store(store: WorkflowStore) -> None:
    assert isinstance(store, AdminStore)
    with anyio.fail_after(LIMIT):
        await Engine(store).run(one_step_flow(), run_id="r1")
        admin = Admin(store)
        assert await admin.list_instances(limit=10**30) == ["r1"]
        assert await admin.list_instances(offset=10**30) == []
        assert [r.run_id for r in await store.list_runs(limit=10**30)] == ["r1"]


@pytest.mark.parametrize("execution_id", ["1", 1.0, True, 0, -1], ids=repr)
async def test_an_execution_id_that_is_not_a_positive_int_is_refused(
    store: WorkflowStore, execution_id: Any
) -> None:
    """Before, ``"1"`` read execution 1 on Redis and was not found on memory, and
    ``1.0`` the other way round."""
    with anyio.fail_after(LIMIT):
        await Engine(store).run(one_step_flow(), run_id="r1")
        with pytest.raises(InvalidArgumentError, match="execution_id"):
            await store.read_history("r1", execution_id)


async def test_waiting_with_no_time_left_returns_a_finished_run_on_every_store(
    store: WorkflowStore,
) -> None:
    """``wait(timeout=0)`` is a look: Redis once raised `WaitTimeoutError` for it."""
    with anyio.fail_after(LIMIT):
        engine = Engine(store)
        record = await engine.run(one_step_flow(), run_id="r1")
        assert (await engine.wait("r1", timeout=0)).status == RunStatus.COMPLETED
        assert await engine.wait("r1", timeout=0) == record
        for timeout in (math.nan, math.inf, "5"):
            with pytest.raises(InvalidArgumentError, match="timeout"):
                await engine.wait("r1", timeout=timeout)  # type: ignore[arg-type]


async def test_a_run_id_of_the_wrong_type_is_refused_by_cancel(store: WorkflowStore) -> None:
    with pytest.raises(InvalidRunIdError):
        await Engine(store).cancel(["r1"])  # type: ignore[arg-type]


async def test_an_event_for_a_dag_run_is_refused_and_not_stored(store: WorkflowStore) -> None:
    """Nothing in a DAG run waits for events: one raised was kept for good, unread."""
    flow = one_step_flow()
    gate = anyio.Event()

    @flow.step(after=["only"])
    async def parked(ctx: StepContext) -> None:
        await gate.wait()

    with anyio.fail_after(LIMIT):
        async with Engine(store) as engine:
            run_id = await engine.start(flow)
            with pytest.raises(InvalidArgumentError, match="events are for durable workflows"):
                await engine.raise_event(run_id, "go", {"x": 1})
            gate.set()
            assert (await engine.wait(run_id)).status == RunStatus.COMPLETED
    kinds = [event.kind for event in await store.read_history(run_id)]
    assert EventKind.EVENT_RAISED not in kinds


@pytest.mark.parametrize(
    "options",
    [{"version": 5}, {"version": ""}, {"version": "  "}, {"name": "   "}, {"name": 5}],
    ids=repr,
)
def test_durable_workflow_names_and_versions_follow_the_dag_rules(options: dict[str, Any]) -> None:
    with pytest.raises(DefinitionError):

        @stepflow.workflow(**options)
        async def flow(ctx: WorkflowContext, _: Any) -> None:
            pass


async def test_a_step_failing_with_a_huge_message_fails_its_run_with_the_message_cut(
    store: WorkflowStore,
) -> None:
    """An API error quoting a whole response body: before, its record was over the
    payload limit, so recording the failure failed, ``run`` raised
    `PayloadTooLargeError` and the run stayed ``running`` for good."""
    flow = Workflow(f"huge-error-{uuid.uuid4().hex[:8]}")

    @flow.step()
    async def call_api(ctx: StepContext) -> None:
        raise ValueError("body: " + "x" * 2_000_000)

    with anyio.fail_after(LIMIT):
        record = await Engine(store).run(flow, run_id="r1")
    assert record.status == RunStatus.FAILED
    assert record.error is not None
    assert record.error["message"].startswith("body: xxx")
    assert record.error["message"].endswith("more characters)")
    assert len(record.error["message"]) < 5_000
    [step] = await store.list_steps("r1")
    assert step.status == stepflow.StepStatus.FAILED
    assert step.error is not None
    assert step.error["message"] == record.error["message"]


@pytest.mark.parametrize("limit", [0, 1000, MIN_PAYLOAD_BYTES - 1, "65536", 2.0**20, True])
def test_a_payload_limit_too_small_for_an_error_record_is_refused(limit: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="max_payload_bytes"):
        stepflow.MemoryStore(max_payload_bytes=limit)
    with pytest.raises(InvalidArgumentError, match="max_payload_bytes"):
        stepflow.RedisStore.from_url("redis://127.0.0.1:1/0", max_payload_bytes=limit)
    stepflow.MemoryStore(max_payload_bytes=MIN_PAYLOAD_BYTES)


@pytest.mark.parametrize("url", ["", "http://x", "redis://localhost:notaport/0", 5], ids=repr)
def test_a_bad_redis_url_is_refused_with_redis_py_s_reason(url: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="from_url"):
        stepflow.RedisStore.from_url(url)


@pytest.mark.parametrize("prefix", [5, "", "a b", "{t}"], ids=repr)
def test_a_bad_key_prefix_is_refused(prefix: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="key prefix"):
        stepflow.RedisStore.from_url("redis://127.0.0.1:1/0", prefix=prefix)


def test_after_takes_steps_or_nothing() -> None:
    flow = Workflow(f"after-{uuid.uuid4().hex[:8]}")
    with pytest.raises(DefinitionError, match="after= takes"):
        flow.step("a", after=5)(lambda ctx: None)  # type: ignore[arg-type]
    flow.step("b", after=None)(lambda ctx: None)  # type: ignore[arg-type]
    assert flow.dependencies("b") == ()


class BrokenStr(Exception):
    def __str__(self) -> str:
        raise KeyError("status")


@pytest.mark.parametrize(
    ("raised", "message"),
    [
        (FileNotFoundError(b"r-\xff.csv".decode("utf-8", "surrogateescape")), "r-\\udcff.csv"),
        (BrokenStr({"code": 500}), "<str() of the exception raised KeyError>"),
    ],
    ids=["lone surrogate", "broken __str__"],
)
async def test_a_step_failing_with_an_unprintable_error_fails_its_run(
    store: WorkflowStore, raised: Exception, message: str
) -> None:
    """A file name from ``os.fsdecode`` is not JSON, and an exception's ``__str__``
    can raise: before, either left the run (and its step) ``running`` for good."""
    flow = Workflow(f"unprintable-{uuid.uuid4().hex[:8]}")

    @flow.step()
    async def read(ctx: StepContext) -> None:
        raise raised

    with anyio.fail_after(LIMIT):
        record = await Engine(store).run(flow, run_id="r1")
    assert record.status == RunStatus.FAILED
    assert record.error is not None
    assert message in record.error["message"]
    [step] = await store.list_steps("r1")
    assert step.status == stepflow.StepStatus.FAILED


async def test_a_child_run_of_a_replaced_definition_fails_the_parent_before_it_starts(
    store: WorkflowStore,
) -> None:
    """As ``run`` refuses it: the child would run the other definition under its name."""
    name = f"child-{uuid.uuid4().hex[:8]}"

    @stepflow.workflow(name, version="1")
    async def held(ctx: WorkflowContext, _: Any) -> str:
        return "v1"

    @stepflow.workflow(name, version="2")
    async def newer(ctx: WorkflowContext, _: Any) -> str:
        return "v2"

    @stepflow.workflow(f"parent-{uuid.uuid4().hex[:8]}")
    async def parent(ctx: WorkflowContext, which: str) -> Any:
        return await ctx.child(held if which == "held" else which)  # type: ignore[arg-type]

    with anyio.fail_after(LIMIT):
        engine = Engine(store)
        for which, error in (("held", "DefinitionError"), ("a name", "InvalidArgumentError")):
            record = await engine.run(parent, which)
            assert record.status == RunStatus.FAILED
            assert record.error is not None
            assert record.error["type"] == error
        runs = await store.list_runs()
        assert len(runs) == 2  # the two parents, and no child
        assert all(run.parent_run_id is None for run in runs)
