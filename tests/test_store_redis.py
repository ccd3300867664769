"""What only `RedisStore` promises: key layout, Lua hygiene, replays, connections.

The behaviour every store shares lives in ``test_store_conformance.py``; here
the tests look at the Redis keys themselves, on the real ``redis-server`` this
session starts and, where fakeredis behaves the same, on fakeredis too.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any

import fakeredis
import pytest
from conftest import RedisServer, everything_sent_twice
from redis.crc import key_slot
from redis.exceptions import AuthenticationError

from stepflow import (
    EventKind,
    InvalidArgumentError,
    InvalidPayloadError,
    InvalidRunIdError,
    MemoryStore,
    NewEvent,
    RedisStore,
    RunRecord,
    RunStatus,
    ScriptError,
    StepAlreadyCompletedError,
    StepClaim,
    StepState,
    StepStatus,
    StoreLayoutError,
    WorkflowStore,
)
from stepflow.models import now_ms
from stepflow.store import scripts
from stepflow.store.redis_core import LAYOUT

pytestmark = pytest.mark.anyio


@pytest.fixture
async def real_store(redis_url: str, key_prefix: str) -> AsyncIterator[RedisStore]:
    store = RedisStore.from_url(redis_url, prefix=key_prefix)
    yield store
    await store.aclose()


async def keys_matching(store: RedisStore, pattern: str) -> set[str]:
    return {key.decode() async for key in store.client.scan_iter(match=pattern, count=1000)}


async def populate(store: WorkflowStore, run_id: str = "r1") -> None:
    """A run with every kind of key: context, steps, three executions, history."""
    await store.create_run(RunRecord(run_id=run_id, workflow="wf", context={"a": 1}))
    await store.upsert_step(run_id, StepState(step_id="plain", name="plain"))
    lease = await store.claim_step(run_id, "s1", name="s1", owner="w")
    await store.complete_step(
        lease, output=1, context_patch={"b": 2}, event=NewEvent(kind=EventKind.STEP_COMPLETED)
    )
    lease = await store.claim_step(run_id, "s2", name="s2", owner="w")
    await store.fail_step(lease, error="e", final=False)
    await store.append_event(run_id, NewEvent(kind=EventKind.TIMER_FIRED), execution_id=1)
    await store.continue_as_new(run_id, "second", execution_id=1)
    await store.continue_as_new(run_id, "third", execution_id=2)
    await store.set_run_status(run_id, RunStatus.COMPLETED, execution_id=3, output="done")


async def observable(store: WorkflowStore, run_id: str = "r1") -> dict[str, Any]:
    """What a reader sees of a run, without the store-assigned times."""
    times = {"created_at", "updated_at", "completed_at", "started_at", "finished_at"}
    run = await store.get_run(run_id)
    if run is None:
        return {"run": None}
    executions = await store.list_executions(run_id)
    return {
        "run": run.model_dump(exclude=times),
        "steps": [s.model_dump(exclude=times) for s in await store.list_steps(run_id)],
        "executions": [x.model_dump(exclude=times) for x in executions],
        "history": [
            [e.model_dump(exclude={"timestamp"}) for e in await store.read_history(run_id, x)]
            for x in (x.execution_id for x in executions)
        ],
    }


# -- key layout -------------------------------------------------------------------


async def test_delete_leaves_only_a_short_lived_tomb(redis_store: RedisStore) -> None:
    await populate(redis_store)
    await populate(redis_store, "neighbour")
    keys = redis_store.keys.run("r1")
    pattern = redis_store.keys.run_pattern("r1")
    before = await keys_matching(redis_store, pattern)
    expected = {keys.run, keys.ctx, keys.steps, keys.order, keys.execs, keys.reqs, keys.reqlog}
    assert before == expected | {keys.events(x) for x in (1, 2, 3)}

    assert await redis_store.delete_run("r1") is True

    assert await keys_matching(redis_store, pattern) == {keys.tomb}
    assert 0 < await redis_store.client.pttl(keys.tomb) <= 60_000
    for status in RunStatus:
        assert (
            await redis_store.client.zscore(redis_store.keys.runs_by_status(status), "r1") is None
        )
    assert await redis_store.client.zscore(redis_store.keys.runs_by_time, "r1") is None
    assert len(await keys_matching(redis_store, redis_store.keys.run_pattern("neighbour"))) == 10


async def test_a_step_row_this_version_cannot_read_is_refused_not_overwritten(
    redis_store: RedisStore,
) -> None:
    """A step written in another layout (an older stepflow) stops the script before it writes."""
    await redis_store.create_run(RunRecord(run_id="r1", workflow="wf"))
    steps = redis_store.keys.run("r1").steps
    await redis_store.client.hset(steps, "s1|l", '"completed"')
    with pytest.raises(ScriptError, match="unreadable step state"):
        await redis_store.claim_step("r1", "s1", name="s1", owner="o")
    assert await redis_store.client.hgetall(steps) == {b"s1|l": b'"completed"'}


async def test_every_key_of_a_run_shares_one_cluster_slot(redis_store: RedisStore) -> None:
    await populate(redis_store, "run/with:odd=chars+1")
    stored = await keys_matching(redis_store, redis_store.keys.run_pattern("run/with:odd=chars+1"))
    keys = redis_store.keys.run("run/with:odd=chars+1")
    named = {*keys[:-1], *(keys.events(x) for x in (1, 2, 3, 99))}
    assert stored <= named
    assert len({key_slot(key.encode()) for key in stored | named}) == 1

    indexes = {
        redis_store.keys.runs_by_time,
        redis_store.keys.metrics,
        redis_store.keys.metrics_reqs,
        redis_store.keys.metrics_reqlog,
        redis_store.keys.layout,
    } | {redis_store.keys.runs_by_status(status) for status in RunStatus}
    stored_indexes = await keys_matching(redis_store, f"{redis_store.keys.prefix}:{{#idx}}:*")
    assert redis_store.keys.runs_by_time in stored_indexes
    assert stored_indexes <= indexes
    assert len({key_slot(key.encode()) for key in indexes}) == 1
    all_stored = await keys_matching(redis_store, f"{redis_store.keys.prefix}:*")
    assert all_stored == stored | stored_indexes


async def _marked_layout_1(store: RedisStore) -> set[str]:
    """Another layout's marker."""
    await store.client.set(store.keys.layout, "1")
    return {store.keys.layout}


async def _unmarked_runs_without_step_rows(store: RedisStore) -> set[str]:
    """Layout 1 wrote no marker: a prefix with runs but no marker is not claimed as layout 2."""
    await store.client.zadd(store.keys.runs_by_time, {"old-run": 1})
    return {store.keys.runs_by_time}


async def _unmarked_layout_1_step_rows(store: RedisStore) -> set[str]:
    """Layout 1 kept a step in fields named '<sid>|status', '<sid>|token'... and no marker."""
    old_steps = store.keys.run("old-run").steps
    await store.client.zadd(store.keys.runs_by_time, {"old-run": 1})
    await store.client.hset(old_steps, mapping={"s1|status": '"completed"', "s1|epoch": 1})
    return {store.keys.runs_by_time, old_steps}


@pytest.mark.parametrize(
    "seed",
    [_marked_layout_1, _unmarked_runs_without_step_rows, _unmarked_layout_1_step_rows],
)
async def test_a_prefix_in_another_storage_layout_is_refused_before_any_write(
    redis_store: RedisStore, key_prefix: str, seed: Callable[[RedisStore], Awaitable[set[str]]]
) -> None:
    """Each way a prefix tells its layout: the marker, else its newest runs' step rows."""
    seeded = await seed(redis_store)
    with pytest.raises(StoreLayoutError):  # a read too: it would misread the rows
        await redis_store.get_step("old-run", "s1")
    with pytest.raises(StoreLayoutError) as refused:
        await redis_store.create_run(RunRecord(run_id="r1", workflow="wf"))
    assert (refused.value.found, refused.value.expected) == ("1", LAYOUT)
    assert await keys_matching(redis_store, f"{key_prefix}:*") == seeded


async def test_unmarked_data_in_this_layout_is_marked_and_read(
    redis_store: RedisStore, key_prefix: str
) -> None:
    """Layout 2 was written for a while before the marker existed: such data stays readable."""
    await redis_store.create_run(RunRecord(run_id="r1", workflow="wf"))
    lease = await redis_store.claim_step("r1", "s1", name="s1", owner="w")
    await redis_store.complete_step(lease, output={"done": True})
    await redis_store.client.delete(redis_store.keys.layout)  # as the earlier version left it
    again = RedisStore(redis_store.client, prefix=key_prefix)
    assert await again.get_run("r1") is not None  # what a resume reads first
    step = await again.get_step("r1", "s1")
    assert step is not None
    assert (step.status, step.output) == (StepStatus.COMPLETED, {"done": True})
    assert await redis_store.client.get(redis_store.keys.layout) == LAYOUT.encode()


async def test_a_new_prefix_is_marked_with_the_layout_and_reused_as_is(
    redis_store: RedisStore, key_prefix: str
) -> None:
    await redis_store.create_run(RunRecord(run_id="r1", workflow="wf"))
    assert await redis_store.client.get(redis_store.keys.layout) == LAYOUT.encode()
    again = RedisStore(redis_store.client, prefix=key_prefix)
    assert await again.get_run("r1") is not None


def lua_sources() -> dict[str, str]:
    folder = resources.files("stepflow.store").joinpath("lua")
    return {f.name: f.read_text("utf-8") for f in folder.iterdir() if f.name.endswith(".lua")}


_CALL = re.compile(r"redis\.p?call\(\s*'(\w+)'\s*(?:,\s*([^,)]+?))?\s*[,)]")
_HELPER_DEF = re.compile(r"local function (sf_\w+)\(([^)]*)\)(.*?)\nend\n", re.S)
_KEYLESS = {"TIME"}


def key_violations(sources: dict[str, str]) -> list[str]:
    """Every place a script could touch a key it was not given in KEYS."""
    sources = dict(sources)
    prelude = sources.pop("_prelude.lua")
    found: list[str] = []
    key_params: dict[str, list[int]] = {}  # prelude helper -> positions of its key arguments
    for name, params, body in _HELPER_DEF.findall(prelude):
        names = [p.strip() for p in params.split(",")]
        used = {arg for command, arg in _CALL.findall(body) if command not in _KEYLESS}
        # ``history[xid]``: a table of keys the caller built from KEYS (sf_history_keys).
        given = {arg for arg in used if re.sub(r"\[\w+\]$", "", arg) in names}
        found += [f"_prelude.lua: {name} touches {arg}" for arg in sorted(used - given)]
        key_params[name] = [i for i, p in enumerate(names) if p in used]
    for file, text in sorted(sources.items()):
        if re.search(r"KEYS\[[^\]]*\]\s*\.\.", text):
            found.append(f"{file}: builds a key name from KEYS")
        for command, arg in _CALL.findall(text):
            if command not in _KEYLESS and not re.fullmatch(r"KEYS\[\w+\]", arg):
                found.append(f"{file}: {command} on {arg}")
        for helper, positions in key_params.items():
            for call in re.findall(rf"{helper}\(([^\n]*)\)", text):
                args = [a.strip() for a in call.split(",")]
                found += [
                    f"{file}: {helper}({call})"
                    for i in positions
                    if not re.fullmatch(r"KEYS\[\w+\]", args[i])
                ]
    return found


_LUA_DEFINITION = re.compile(r"^local (?:function )?((?:sf|SF)_\w+)", re.M)


@pytest.mark.parametrize("name", scripts.SCRIPT_NAMES)
def test_each_script_carries_exactly_the_prelude_helpers_it_uses(name: str) -> None:
    """Redis builds every helper a script defines on every call: none may be
    missing (a Lua error at run time) and none unused (time wasted per call)."""
    source = scripts.script_source(name, shebang=True)
    code = re.sub(r"--[^\n]*", "", source)
    defined = _LUA_DEFINITION.findall(source)
    assert len(defined) == len(set(defined))
    for helper in defined:  # each is used outside its own definition line
        assert len(re.findall(rf"\b{helper}\b", code)) > 1, f"{name}: {helper} unused"
    used = set(re.findall(r"\b(?:sf|SF)_\w+", code))
    assert used <= set(defined), f"{name}: {sorted(used - set(defined))} not defined"


def test_a_script_using_an_unknown_helper_is_refused() -> None:
    with pytest.raises(ValueError, match="sf_nonexistent is not defined"):
        scripts._helpers_for("return sf_nonexistent()")


def test_scripts_only_touch_keys_they_are_given() -> None:
    """Redis Cluster routes a script by its KEYS; a key built inside Lua could be elsewhere."""
    sources = lua_sources()
    assert len(sources) > 10
    assert all(text.startswith("#!lua") for f, text in sources.items() if f != "_prelude.lua")
    assert key_violations(sources) == []


@pytest.mark.parametrize(
    "planted",
    [
        "redis.call('DEL', KEYS[1] .. ':x')",
        "redis.call('GET', 'stepflow:{r1}:run')",
        "redis.call('HGET', ARGV[1], 'f')",
        "sf_append_event(ARGV[2], KEYS[4], '1', 'k', '1', 0)",
    ],
)
def test_key_check_catches_a_script_building_its_own_key(planted: str) -> None:
    sources = lua_sources()
    sources["planted.lua"] = f"#!lua\n{planted}\n"
    assert key_violations(sources) != []


async def test_shebang_is_used_on_real_redis(real_store: RedisStore) -> None:
    await real_store.get_run("r1")
    assert await real_store._accepts_shebang() is True
    for name, script in real_store._scripts.items():
        assert script.script.startswith("#!lua"), name
    assert real_store._scripts["get_run"].script.startswith("#!lua flags=no-writes")


async def test_shebang_is_stripped_where_refused(key_prefix: str) -> None:
    store = RedisStore(fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()), prefix=key_prefix)
    await populate(store)
    assert await store._accepts_shebang() is False
    for name, script in store._scripts.items():
        assert not script.script.startswith("#!"), name
    await store.aclose()


async def test_bad_input_stores_no_key_at_all(redis_store: RedisStore) -> None:
    with pytest.raises(InvalidRunIdError):
        await redis_store.create_run(RunRecord(run_id="a{b}", workflow="wf"))
    with pytest.raises(InvalidPayloadError):
        await redis_store.create_run(RunRecord(run_id="r1", workflow="wf", input=float("nan")))
    with pytest.raises(InvalidPayloadError):
        await redis_store.create_run(RunRecord(run_id="r1", workflow="wf", context={"k": {1, 2}}))
    assert await keys_matching(redis_store, f"{redis_store.keys.prefix}:*") == set()


async def test_stores_with_other_prefixes_share_nothing(redis_store: RedisStore) -> None:
    other = RedisStore(redis_store.client, prefix=f"{redis_store.keys.prefix}-other")
    await populate(redis_store)

    assert await other.get_run("r1") is None
    assert await other.list_runs() == []
    assert await other.list_runs_by_status("completed") == []
    assert await other.list_steps("r1") == []
    assert await other.delete_run("r1") is False

    await other.create_run(RunRecord(run_id="r1", workflow="other", context={"mine": 1}))
    run = await redis_store.get_run("r1")
    assert run is not None
    assert (run.workflow, run.context) == ("wf", {"a": 1, "b": 2})
    assert await other.delete_run("r1") is True
    assert await redis_store.get_run("r1") is not None


def test_prefixes_that_would_break_key_names_are_refused() -> None:
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    for prefix in ("", "a{b", "a}b", "a b", "a\nb"):
        with pytest.raises(ValueError, match="prefix"):
            RedisStore(client, prefix=prefix)


async def test_stale_index_entries_are_repaired_by_readers(redis_store: RedisStore) -> None:
    await redis_store.create_run(RunRecord(run_id="r1", workflow="wf", created_at=10))
    # What a crash between the index write and the run write leaves behind:
    await redis_store.client.zadd(redis_store.keys.runs_by_time, {"ghost": 20})
    completed = redis_store.keys.runs_by_status(RunStatus.COMPLETED)
    await redis_store.client.zadd(completed, {"r1": 10, "ghost": 20})

    assert [r.run_id for r in await redis_store.list_runs()] == ["r1"]
    assert await redis_store.list_runs_by_status("completed") == []
    assert [r.run_id for r in await redis_store.list_runs_by_status("pending")] == ["r1"]
    assert await redis_store.client.zscore(redis_store.keys.runs_by_time, "ghost") is None
    assert await redis_store.client.zcard(completed) == 0


# -- scripts and replays ------------------------------------------------------------


async def test_store_keeps_working_after_script_flush(redis_store: RedisStore) -> None:
    await redis_store.create_run(RunRecord(run_id="r1", workflow="wf"))
    await redis_store.client.script_flush()
    await populate(redis_store, "r2")
    await redis_store.client.script_flush()
    assert [r.run_id for r in await redis_store.list_runs()] == ["r2", "r1"]  # pipelined path
    await redis_store.client.script_flush()
    await redis_store.merge_context("r1", {"after": "flush"})
    run = await redis_store.get_run("r1")
    assert run is not None
    assert run.context == {"after": "flush"}


async def test_create_and_claim_after_script_flush_creates_then_claims(
    redis_store: RedisStore,
) -> None:
    """NOSCRIPT refuses the whole pipeline: the create runs again first, then the claim."""
    await redis_store.get_run("warm-up")
    await redis_store.client.script_flush()
    created, lease = await redis_store.create_and_claim(
        RunRecord(run_id="r1", workflow="wf", status=RunStatus.RUNNING),
        StepClaim(step_id="s1", name="s1", lease_ms=10_000),
        owner="w",
    )
    assert created
    assert lease is not None
    assert lease.attempt == 1
    step = await redis_store.get_step("r1", "s1")
    assert step is not None
    assert (step.status, step.worker_id) == (StepStatus.RUNNING, "w")
    assert (await redis_store.get_metrics()).total_executions == 1


async def test_a_claim_riding_with_a_create_that_made_nothing_claims_nothing(
    redis_store: RedisStore,
) -> None:
    """The claim names its create's request: a create refused (the run existed) or
    never applied leaves the claim undone, whatever order the scripts ran in."""
    await redis_store.create_run(RunRecord(run_id="r1", workflow="wf"))
    first = StepClaim(step_id="s1", name="s1", lease_ms=10_000)
    claim_keys, claim_args = redis_store._claim_call("r1", first, "w", "tok", 1, b"null")
    claim = redis_store._scripts["claim_step"]
    assert await claim(keys=claim_keys, args=[*claim_args, "no-such-create"]) == b""
    assert await redis_store.list_steps("r1") == []


async def test_a_script_run_twice_for_one_call_applies_once(redis_store: RedisStore) -> None:
    reference = MemoryStore()
    await redis_store.get_run("warm-up")  # scripts loaded, so no NOSCRIPT in between
    with everything_sent_twice():
        for store in (reference, redis_store):
            await populate(store)
            await populate(store, "doomed")
            assert await store.delete_run("doomed") is True
            lease = await store.claim_step("r1", "s2", name="s2", owner="w2", execution_id=3)
            assert lease.epoch == 2
            appended = await store.append_event(
                "r1", NewEvent(kind=EventKind.EVENT_RAISED, payload={"n": 1}), execution_id=3
            )
            assert appended.event_id == 2
            await store.renew_lease(lease)
    assert await observable(redis_store) == await observable(reference)
    assert await observable(redis_store, "doomed") == {"run": None}
    [step] = [s for s in await redis_store.list_steps("r1") if s.step_id == "s2"]
    assert step.attempt == 2


async def test_a_late_replay_does_not_undo_a_newer_change(redis_store: RedisStore) -> None:
    await redis_store.create_run(RunRecord(run_id="r1", workflow="wf"))
    keys = redis_store.keys.run("r1")
    merge = redis_store._scripts["update_context"]
    call = {"keys": [keys.run, keys.reqs, keys.reqlog, keys.ctx], "args": ["req-1", "merge"]}

    await merge(keys=call["keys"], args=[*call["args"], "a", "1"])
    await redis_store.merge_context("r1", {"a": 2})
    await merge(keys=call["keys"], args=[*call["args"], "a", "1"])  # the retry arrives late

    run = await redis_store.get_run("r1")
    assert run is not None
    assert run.context == {"a": 2}


async def test_complete_step_replayed_records_one_completion(redis_store: RedisStore) -> None:
    await redis_store.create_run(RunRecord(run_id="r1", workflow="wf"))
    lease = await redis_store.claim_step("r1", "s1", name="s1", owner="w")
    with everything_sent_twice():
        await redis_store.complete_step(
            lease,
            output="once",
            context_patch={"n": 1},
            event=NewEvent(kind=EventKind.STEP_COMPLETED),
        )
    history = await redis_store.read_history("r1")
    assert [(e.event_id, e.kind) for e in history] == [(1, EventKind.STEP_COMPLETED)]
    step = await redis_store.get_step("r1", "s1")
    assert step is not None
    assert step.status == StepStatus.COMPLETED


async def test_complete_and_claim_replayed_claims_once_and_returns_the_same_lease(
    redis_store: RedisStore,
) -> None:
    await redis_store.create_run(RunRecord(run_id="r1", workflow="wf"))
    lease = await redis_store.claim_step("r1", "s1", name="s1", owner="w")
    with everything_sent_twice():
        recorded, claimed = await redis_store.complete_and_claim(
            lease,
            StepClaim(step_id="s2", name="s2", lease_ms=10_000),
            output="once",
            event=NewEvent(kind=EventKind.STEP_COMPLETED),
        )
    assert recorded is not None
    assert recorded.event_id == 1
    assert claimed is not None
    assert claimed.epoch == 1
    history = await redis_store.read_history("r1")
    assert [(e.event_id, e.kind) for e in history] == [(1, EventKind.STEP_COMPLETED)]
    step = await redis_store.get_step("r1", "s2")
    assert step is not None
    assert (step.status, step.attempt) == (StepStatus.RUNNING, 1)
    await redis_store.complete_step(claimed, output="s2")  # the replayed answer's lease holds
    with pytest.raises(StepAlreadyCompletedError):  # a new request is no replay
        await redis_store.complete_step(lease, output="again")


async def test_complete_and_finish_replayed_completes_once_with_the_same_answer(
    redis_store: RedisStore,
) -> None:
    """Its script runs in a pipeline: a re-sent one must answer as the first (same count)."""
    await redis_store.create_run(RunRecord(run_id="r1", workflow="wf", status=RunStatus.RUNNING))
    lease = await redis_store.claim_step("r1", "s1", name="s1", owner="w")
    keys, args, _ = redis_store._complete_call(
        lease,
        None,
        "once",
        {"n": 1},
        NewEvent(kind=EventKind.STEP_COMPLETED),
        finish=["1", b'{"s1":"once"}', "run_completed", b"null"],
    )
    first = await redis_store._call("complete_step", keys, args, run_id="r1")
    again = await redis_store._call("complete_step", keys, args, run_id="r1")
    assert again == first
    assert first[0].endswith(b"!2")  # both events counted by the settle, once
    history = await redis_store.read_history("r1")
    assert [e.kind for e in history] == [EventKind.STEP_COMPLETED, EventKind.RUN_COMPLETED]
    run = await redis_store.get_run("r1")
    assert run is not None
    assert (run.status, run.output, run.context) == (RunStatus.COMPLETED, {"s1": "once"}, {"n": 1})


async def test_complete_and_finish_sent_twice_finishes_and_counts_once(
    redis_store: RedisStore,
) -> None:
    """The whole call replayed: its pipeline (script and status index) and its counter bump."""
    reference = MemoryStore()
    finished = {}
    for store in (reference, redis_store):
        await store.create_run(RunRecord(run_id="r1", workflow="wf", status=RunStatus.RUNNING))
        lease = await store.claim_step("r1", "s1", name="s1", owner="w")
        with everything_sent_twice() if store is redis_store else contextlib.nullcontext():
            _, finished[store] = await store.complete_and_finish(
                lease,
                output="once",
                context_patch={"n": 1},
                event=NewEvent(kind=EventKind.STEP_COMPLETED),
                run_output={"s1": "once"},
                run_event=NewEvent(kind=EventKind.RUN_COMPLETED),
            )
    record = finished[redis_store]
    assert record is not None
    assert (record.status, record.output, record.context) == (
        RunStatus.COMPLETED,
        {"s1": "once"},
        {"n": 1},
    )
    history = await redis_store.read_history("r1")
    assert [e.kind for e in history] == [EventKind.STEP_COMPLETED, EventKind.RUN_COMPLETED]
    assert [r.run_id for r in await redis_store.list_runs_by_status(RunStatus.COMPLETED)] == ["r1"]
    assert await redis_store.get_metrics() == await reference.get_metrics()


async def test_remembered_request_ids_stay_bounded(redis_store: RedisStore) -> None:
    await redis_store.create_run(RunRecord(run_id="r1", workflow="wf"))
    for i in range(300):
        await redis_store.merge_context("r1", {f"k{i}": i})
    keys = redis_store.keys.run("r1")
    assert await redis_store.client.hlen(keys.reqs) == 128  # full, and no fuller
    assert await redis_store.client.llen(keys.reqlog) == 128
    newest = (await redis_store.client.lrange(keys.reqlog, -1, -1))[0]
    assert await redis_store.client.hexists(keys.reqs, newest)  # the newest is remembered


# -- connections and durability ----------------------------------------------------


async def test_durability_warning_for_appendonly_no(
    real_store: RedisStore, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="stepflow.store.redis"):
        await real_store.get_run("r1")
    assert any("appendonly=no" in r.getMessage() for r in caplog.records)


async def test_durability_check_can_be_turned_off(
    redis_url: str, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = RedisStore.from_url(redis_url, prefix=key_prefix, check_durability=False)
    with caplog.at_level(logging.WARNING, logger="stepflow.store.redis"):
        await store.get_run("r1")
    await store.aclose()
    assert caplog.records == []


async def test_durability_warnings_follow_the_server_config(
    own_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def warnings_for(appendonly: str, policy: str) -> list[str]:
        store = RedisStore.from_url(own_server.url)
        await store.client.config_set("appendonly", appendonly)
        await store.client.config_set("maxmemory-policy", policy)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="stepflow.store.redis"):
            await store.get_run("r1")
        await store.aclose()
        return [r.getMessage() for r in caplog.records]

    assert await warnings_for("yes", "noeviction") == []
    [eviction] = await warnings_for("yes", "allkeys-lru")
    assert "allkeys-lru" in eviction
    assert len(await warnings_for("no", "volatile-lru")) == 2


def test_from_url_refuses_a_misspelt_option_at_once(redis_url: str) -> None:
    """Before, ``key_prefix=`` was taken and failed at the first command, deep in redis-py."""
    with pytest.raises(InvalidArgumentError, match="key_prefix"):
        RedisStore.from_url(redis_url, key_prefix="tenant-a")


async def test_from_url_with_a_password(own_server: RedisServer) -> None:
    admin = RedisStore.from_url(own_server.url, check_durability=False)
    await admin.client.config_set("requirepass", "s3cret")
    await admin.aclose()
    authed_url = own_server.url.replace("redis://", "redis://:s3cret@")

    store = RedisStore.from_url(authed_url, prefix="auth", socket_timeout=5)
    await populate(store)
    run = await store.get_run("r1")
    assert run is not None
    assert run.output == "done"
    await store.aclose()

    for url in (own_server.url.replace("redis://", "redis://:wrong@"), own_server.url):
        refused = RedisStore.from_url(url, prefix="auth")
        with pytest.raises(AuthenticationError):
            await refused.get_run("r1")
        await refused.aclose()


async def test_decoded_responses_client_works(redis_url: str, key_prefix: str) -> None:
    store = RedisStore.from_url(redis_url, prefix=key_prefix, decode_responses=True)
    reference = MemoryStore()
    for each in (store, reference):
        await populate(each)
    assert await observable(store) == await observable(reference)
    assert [r.run_id for r in await store.list_runs()] == ["r1"]
    await store.aclose()


async def test_store_reconnects_after_a_redis_restart(own_server: RedisServer) -> None:
    store = RedisStore.from_url(own_server.url, check_durability=False)
    await store.create_run(RunRecord(run_id="before", workflow="wf"))
    own_server.kill()
    own_server.start()  # no persistence in tests: the data is gone, the connection is back
    await store.create_run(RunRecord(run_id="after", workflow="wf"))
    assert [r.run_id for r in await store.list_runs()] == ["after"]
    await store.aclose()


async def test_a_young_index_entry_without_its_run_is_kept_an_old_one_dropped(
    redis_store: RedisStore,
) -> None:
    """Runs are indexed before they are written: a reader must not hide a create in flight."""
    await redis_store.get_run("warm-up")  # the prefix is marked with the layout first
    index = redis_store.keys.runs_by_time
    await redis_store.client.zadd(index, {"being-created": now_ms(), "long-gone": 1_000})
    assert await redis_store.list_runs() == []
    members = {m.decode() for m in await redis_store.client.zrange(index, 0, -1)}
    assert members == {"being-created"}
