"""RedisStore must behave exactly like MemoryStore, the reference, on any sequence of calls.

A hypothesis state machine applies the same random operations to both stores
and, after every step, compares everything a reader can see (times aside) and
that both raised the same kind of error. It runs on fakeredis and on the real
``redis-server`` (a fresh key prefix per example).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Any

import fakeredis
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from conftest import store_kinds
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from pydantic import BaseModel

from stepflow import (
    EventKind,
    Lease,
    MemoryStore,
    NewEvent,
    RedisStore,
    RunRecord,
    RunStatus,
    StepflowError,
    StepState,
    StepStatus,
    WorkflowStore,
)
from stepflow._json import MIN_PAYLOAD_BYTES

LIMIT = MIN_PAYLOAD_BYTES
RUN_IDS = ("r1", "r2", "r3")
TIMES = frozenset({"updated_at", "completed_at", "started_at", "finished_at", "timestamp"})
TIMES_AND_EXPIRY = TIMES | {"expires_at", "token"}

# -- strategies -------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
payloads = json_values
context_keys = st.sampled_from(["a", "b", "c"]) | st.text(max_size=4)
contexts = st.dictionaries(context_keys, payloads, max_size=3)
run_ids = st.sampled_from(RUN_IDS)
step_ids = st.sampled_from(["s1", "s2", "s3"])
# Input every store must refuse; one rule tries it on any operation (see `refuse_bad_input`).
bad_values = st.sampled_from([math.nan, math.inf, {1, 2}, b"raw", {1: "x"}, 2**70, "x" * LIMIT])
bad_run_ids = st.sampled_from(["", "bad id", "{r1}", "r1\n", "x" * 201])
execution_ids = st.sampled_from([1, 1, 2, 3])
statuses = st.sampled_from(list(RunStatus))
status_texts = statuses.flatmap(lambda s: st.sampled_from([s, s.value, s.value.title()]))
owners = st.sampled_from(["w1", "w2"])
events = st.none() | st.builds(NewEvent, kind=st.sampled_from(list(EventKind)), payload=payloads)
lease_picks = st.integers(0, 20)


# -- comparing outcomes -----------------------------------------------------------


def normalise(value: Any) -> Any:
    """A store's answer with store-assigned times, lease tokens and expiry left out."""
    if isinstance(value, BaseModel):
        data = value.model_dump()
        return {
            key: (data[key] is None if key in TIMES else normalise(data[key]))
            for key in data
            if key not in TIMES_AND_EXPIRY or key in TIMES
        } | {"_type": type(value).__name__}
    if isinstance(value, (list, tuple)):
        return [normalise(item) for item in value]
    if isinstance(value, dict):
        return {key: normalise(item) for key, item in value.items()}
    return value


async def outcome(call: Awaitable[Any]) -> tuple[str, Any]:
    try:
        return "ok", await call
    except StepflowError as exc:
        return "error", type(exc).__name__


async def observe(store: WorkflowStore) -> dict[str, Any]:
    """Everything a reader can see of the runs the machine uses."""
    seen: dict[str, Any] = {"list_runs": [r.run_id for r in await store.list_runs()]}
    for run_id in RUN_IDS:
        run = await store.get_run(run_id)
        seen[run_id] = {"run": run, "steps": await store.list_steps(run_id)}
        if run is not None:
            executions = await store.list_executions(run_id)
            seen[run_id]["executions"] = executions
            seen[run_id]["history"] = [
                await store.read_history(run_id, x.execution_id) for x in executions
            ]
    return normalise(seen)


# -- the machine ------------------------------------------------------------------


class StoreComparison(RuleBasedStateMachine):
    """Drives `MemoryStore` and a candidate store with the same operations."""

    async def make_candidate(self) -> WorkflowStore:
        raise NotImplementedError

    def __init__(self) -> None:
        super().__init__()
        self._portal_context: AbstractContextManager[BlockingPortal] = start_blocking_portal()
        self.portal = self._portal_context.__enter__()
        self.stores: tuple[WorkflowStore, WorkflowStore] = (
            MemoryStore(max_payload_bytes=LIMIT),
            self.portal.call(self.make_candidate),
        )
        self.leases: list[tuple[Lease, Lease]] = []

    def teardown(self) -> None:
        try:
            self.portal.call(self.stores[1].aclose)
        finally:
            self._portal_context.__exit__(None, None, None)

    def both(self, operation: Callable[[WorkflowStore, int], Awaitable[Any]]) -> list[Any]:
        """Apply ``operation`` (given the store and its index) to both; the outcomes must match."""
        results = [
            self.portal.call(outcome, operation(store, index))
            for index, store in enumerate(self.stores)
        ]
        reference, candidate = results
        assert normalise(candidate) == normalise(reference)
        return [value for _, value in results] if reference[0] == "ok" else []

    def lease(self, pick: int, index: int) -> Lease:
        """One store's half of a lease both granted; small picks mean recent leases."""
        return self.leases[-1 - pick % len(self.leases)][index]

    @invariant()
    def everything_readable_matches(self) -> None:
        reference, candidate = (self.portal.call(observe, store) for store in self.stores)
        assert candidate == reference

    # -- runs

    @initialize(created_at=st.integers(1, 3))
    def start_runs(self, created_at: int) -> None:
        for run_id in RUN_IDS[:2]:
            record = RunRecord(run_id=run_id, workflow="wf", created_at=created_at)
            self.both(lambda store, _, record=record: store.create_run(record))

    @rule(
        run_id=run_ids,
        status=statuses,
        input=payloads,
        context=contexts,
        created_at=st.integers(1, 3),
        execution_id=execution_ids,
    )
    def create_run(
        self,
        run_id: str,
        status: RunStatus,
        input: Any,
        context: dict[str, Any],
        created_at: int,
        execution_id: int,
    ) -> None:
        record = RunRecord.model_construct(
            run_id=run_id,
            workflow="wf",
            status=status,
            input=input,
            context=context,
            created_at=created_at,
            updated_at=created_at,
            current_execution_id=execution_id,
        )
        self.both(lambda store, _: store.create_run(record))

    @rule(run_id=run_ids, patch=contexts)
    def merge_context(self, run_id: str, patch: dict[str, Any]) -> None:
        self.both(lambda store, _: store.merge_context(run_id, patch))

    @rule(run_id=run_ids, context=contexts)
    def update_context(self, run_id: str, context: dict[str, Any]) -> None:
        self.both(lambda store, _: store.update_context(run_id, context))

    @rule(
        run_id=run_ids,
        status=status_texts,
        execution_id=execution_ids,
        output=payloads,
        error=payloads,
        event=events,
    )
    def set_run_status(
        self,
        run_id: str,
        status: RunStatus,
        execution_id: int,
        output: Any,
        error: Any,
        event: NewEvent | None,
    ) -> None:
        self.both(
            lambda store, _: store.set_run_status(
                run_id, status, execution_id=execution_id, output=output, error=error, event=event
            )
        )

    @rule(run_id=run_ids)
    def delete_run(self, run_id: str) -> None:
        self.both(lambda store, _: store.delete_run(run_id))

    @rule(status=st.none() | status_texts, limit=st.integers(0, 4), offset=st.integers(0, 3))
    def list_runs(self, status: RunStatus | None, limit: int, offset: int) -> None:
        async def ids(store: WorkflowStore, _: int) -> list[str]:
            if status is None:
                runs = await store.list_runs(limit=limit, offset=offset)
            else:
                runs = await store.list_runs_by_status(status, limit=limit, offset=offset)
            return [run.run_id for run in runs]

        self.both(ids)

    # -- steps

    @rule(
        run_id=run_ids,
        step_id=step_ids,
        status=st.sampled_from(list(StepStatus)),
        attempt=st.integers(0, 3),
        input=payloads,
        execution_id=execution_ids,
    )
    def upsert_step(
        self,
        run_id: str,
        step_id: str,
        status: StepStatus,
        attempt: int,
        input: Any,
        execution_id: int,
    ) -> None:
        step = StepState.model_construct(
            step_id=step_id,
            name=step_id,
            status=status,
            attempt=attempt,
            input=input,
            output=None,
            error=None,
            started_at=None,
            finished_at=None,
            worker_id=None,
            execution_id=execution_id,
        )
        self.both(lambda store, _: store.upsert_step(run_id, step))

    @rule(run_id=run_ids, step_id=step_ids)
    def get_step(self, run_id: str, step_id: str) -> None:
        self.both(lambda store, _: store.get_step(run_id, step_id))

    @rule(
        run_id=run_ids, step_id=step_ids, owner=owners, execution_id=execution_ids, input=payloads
    )
    def claim_step(
        self, run_id: str, step_id: str, owner: str, execution_id: int, input: Any
    ) -> None:
        leases = self.both(
            lambda store, _: store.claim_step(
                run_id,
                step_id,
                name=step_id,
                owner=owner,
                lease_ms=600_000,
                execution_id=execution_id,
                input=input,
            )
        )
        if leases:
            self.leases.append((leases[0], leases[1]))

    @precondition(lambda self: self.leases)
    @rule(pick=lease_picks, output=payloads, patch=st.none() | contexts, event=events)
    def complete_step(
        self, pick: int, output: Any, patch: dict[str, Any] | None, event: NewEvent | None
    ) -> None:
        self.both(
            lambda store, i: store.complete_step(
                self.lease(pick, i), output=output, context_patch=patch, event=event
            )
        )

    @precondition(lambda self: self.leases)
    @rule(pick=lease_picks, error=payloads, final=st.booleans(), event=events, ran=st.booleans())
    def fail_step(
        self, pick: int, error: Any, final: bool, event: NewEvent | None, ran: bool
    ) -> None:
        self.both(
            lambda store, i: store.fail_step(
                self.lease(pick, i), error=error, final=final, event=event, ran=ran
            )
        )

    @precondition(lambda self: self.leases)
    @rule(pick=lease_picks)
    def renew_lease(self, pick: int) -> None:
        self.both(lambda store, i: store.renew_lease(self.lease(pick, i), lease_ms=600_000))

    # -- bad input

    @rule(data=st.data())
    def refuse_bad_input(self, data: st.DataObject) -> None:
        """Any write with a bad run id or a non-JSON value fails alike and changes nothing."""
        name = data.draw(st.sampled_from(sorted(BAD_CALLS)))
        bad_id = data.draw(st.none() | bad_run_ids)
        run_id = bad_id if bad_id is not None else data.draw(run_ids)
        value = data.draw(bad_values) if bad_id is None else None
        if name in LEASE_CALLS:
            if not self.leases:
                return
            pick = data.draw(lease_picks)
            self.both(lambda store, i: BAD_CALLS[name](store, self.lease(pick, i), value))
        else:
            self.both(lambda store, _: BAD_CALLS[name](store, run_id, value))

    # -- history and executions

    @rule(
        run_id=run_ids,
        event=events.filter(bool),
        execution_id=execution_ids,
        seen_events=st.none() | st.integers(0, 4),
    )
    def append_event(
        self, run_id: str, event: NewEvent, execution_id: int, seen_events: int | None
    ) -> None:
        self.both(
            lambda store, _: store.append_event(
                run_id, event, execution_id=execution_id, seen_events=seen_events
            )
        )

    @rule(run_id=run_ids, execution_id=st.none() | st.integers(0, 4))
    def read_history(self, run_id: str, execution_id: int | None) -> None:
        self.both(lambda store, _: store.read_history(run_id, execution_id))

    @rule(run_id=run_ids, input=payloads, execution_id=execution_ids)
    def continue_as_new(self, run_id: str, input: Any, execution_id: int) -> None:
        self.both(lambda store, _: store.continue_as_new(run_id, input, execution_id=execution_id))


def _record(run_id: str, value: Any) -> RunRecord:
    return RunRecord.model_construct(run_id=run_id, workflow="wf", input=value, context={})


BadCall = Callable[[WorkflowStore, Any, Any], Awaitable[Any]]
BAD_CALLS: dict[str, BadCall] = {
    "create_run": lambda s, r, v: s.create_run(_record(r, v)),
    "create_run context": lambda s, r, v: s.create_run(
        RunRecord.model_construct(run_id=r, workflow="wf", context={"a": v})
    ),
    "merge_context": lambda s, r, v: s.merge_context(r, {"a": 1, "b": v}),
    "update_context": lambda s, r, v: s.update_context(r, {"a": v}),
    "set_run_status": lambda s, r, v: s.set_run_status(
        r, RunStatus.COMPLETED, execution_id=1, output=v
    ),
    "upsert_step": lambda s, r, v: s.upsert_step(r, StepState(step_id="s1", name="s1", input=v)),
    "claim_step": lambda s, r, v: s.claim_step(r, "s1", name="s1", owner="w1", input=v),
    "append_event": lambda s, r, v: s.append_event(
        r, NewEvent(kind=EventKind.TIMER_FIRED, payload=v), execution_id=1
    ),
    "continue_as_new": lambda s, r, v: s.continue_as_new(r, v, execution_id=1),
    "complete_step": lambda s, lease, v: s.complete_step(
        lease, output=1, context_patch={"a": 1, "b": v}
    ),
    "fail_step": lambda s, lease, v: s.fail_step(lease, error=v, final=True),
}
LEASE_CALLS = frozenset({"complete_step", "fail_step"})


SETTINGS = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.parametrize("kind", store_kinds("fakeredis", "redis"))
def test_redis_store_behaves_like_memory_store(kind: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("redis_url") if kind == "redis" else None

    class Machine(StoreComparison):
        async def make_candidate(self) -> WorkflowStore:
            prefix = f"prop-{uuid.uuid4().hex[:12]}"
            if url is None:
                client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
                return RedisStore(client, prefix=prefix, max_payload_bytes=LIMIT)
            return RedisStore.from_url(
                url, prefix=prefix, max_payload_bytes=LIMIT, check_durability=False
            )

    run_state_machine_as_test(Machine, settings=SETTINGS)
