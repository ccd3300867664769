"""Runs while their Redis server is killed (SIGKILL) and restarted.

The server keeps an append-only file fsynced on every write, as a
production Redis that must not lose acknowledged writes does, so what the
store was told before the kill is there after the restart. A server back
within the client's retries (here a patient ``retry=``) is ridden out: the
run completes as if nothing happened. A server gone for longer stops the run with the client's own
error (not wrapped in an exception group); the run stays ``running`` in the
store, and resuming it once the server is back runs only what had not
completed.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable

import anyio
import pytest
from conftest import RedisServer
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

import stepflow
from stepflow import Engine, RedisStore, RunStatus, StepContext, StepStatus, Workflow

pytestmark = pytest.mark.anyio

LIMIT = 20.0
DURABLE = ("--appendonly", "yes", "--appendfsync", "always")
STEPS = [f"s{i}" for i in range(6)]
KILLER = "s3"
DOWNTIME = 0.3


def chain(name: str, calls: Counter[str], on_killer: Callable[[], None]) -> Workflow:
    """s0 -> ... -> s5; the first attempt of ``KILLER`` calls ``on_killer`` (kills the server)."""
    flow = Workflow(name)
    previous: list[str] = []
    for step in STEPS:

        def make(step: str) -> Callable[[StepContext], object]:
            async def body(ctx: StepContext) -> dict[str, int]:
                calls[step] += 1
                if step == KILLER and ctx.attempt == 1:
                    on_killer()
                return {step: ctx.attempt}

            return body

        flow.step(step, after=previous)(make(step))
        previous = [step]
    return flow


async def test_a_redis_restart_mid_run_is_ridden_out(own_server: RedisServer) -> None:
    """The server is down for a while: the client's retries (``retry=``) outlast it."""
    own_server.kill()
    own_server.start(*DURABLE)
    calls: Counter[str] = Counter()

    def back() -> None:
        time.sleep(DOWNTIME)  # the step's completion is sent (and retried) meanwhile
        own_server.start(*DURABLE)

    restarter = threading.Thread(target=back, daemon=True)

    def restart_later() -> None:
        own_server.kill()  # SIGKILL: no shutdown, no final save
        restarter.start()

    flow = chain(f"restart-{uuid.uuid4().hex[:8]}", calls, restart_later)
    patient = Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 20)
    store = RedisStore.from_url(own_server.url, check_durability=False, retry=patient)
    try:
        before = (await store.client.info("server"))["run_id"]
        with anyio.fail_after(LIMIT):
            record = await Engine(store).run(flow)
        restarter.join(LIMIT)  # its start() may still be confirming the server is up
        assert not restarter.is_alive()
        assert (await store.client.info("server"))["run_id"] != before  # another server now
        assert record.status == RunStatus.COMPLETED
        assert record.context == {step: 1 for step in STEPS}
        assert calls == Counter(STEPS)  # every step ran once, the killer's too
        steps = await store.list_steps(record.run_id)
        assert [(s.step_id, s.status, s.attempt) for s in steps] == [
            (step, StepStatus.COMPLETED, 1) for step in STEPS
        ]
    finally:
        await store.aclose()


async def test_a_redis_lost_mid_run_stops_it_with_its_error_and_a_resume_finishes_it(
    own_server: RedisServer,
) -> None:
    own_server.kill()
    own_server.start(*DURABLE)
    calls: Counter[str] = Counter()
    flow = chain(f"lost-{uuid.uuid4().hex[:8]}", calls, own_server.kill)
    run_id = f"lost-{uuid.uuid4().hex[:8]}"
    store = RedisStore.from_url(own_server.url, check_durability=False)
    try:
        with anyio.fail_after(LIMIT), pytest.raises(RedisConnectionError):
            await Engine(store, lease_ms=300).run(flow, run_id=run_id)
        assert calls == Counter(STEPS[: STEPS.index(KILLER) + 1])

        own_server.start(*DURABLE)  # back, with everything acknowledged before the kill
        stored = await store.get_run(run_id)
        assert stored is not None
        assert stored.status == RunStatus.RUNNING
        assert stored.context == {step: 1 for step in STEPS[: STEPS.index(KILLER)]}

        with anyio.fail_after(LIMIT):  # a fresh engine, as a restarted process would
            record = await Engine(store, lease_ms=300).run(flow, run_id=run_id)
        assert record.status == RunStatus.COMPLETED
        # Completed steps ran once; the one whose completion never reached the store twice.
        assert calls == Counter({**Counter(STEPS), KILLER: 2})
        assert record.context == {**{step: 1 for step in STEPS}, KILLER: 2}
    finally:
        await store.aclose()


async def test_a_durable_run_that_lost_redis_resumes_from_its_history(
    own_server: RedisServer,
) -> None:
    """The same for a durable workflow, with the server back before the run's end is recorded.

    The workflow sees the error and brings the server back at once (as a quick
    restart would): the runner must still leave the run as stored, not record
    the failure the workflow raised. The step in flight at the kill runs again,
    no other.
    """
    own_server.kill()
    own_server.start(*DURABLE)
    calls: Counter[int] = Counter()

    async def work(i: int) -> int:
        calls[i] += 1
        if i == 3 and calls[i] == 1:
            own_server.kill()
        return i

    @stepflow.workflow(name=f"lost-durable-{uuid.uuid4().hex[:8]}")
    async def total(ctx: stepflow.WorkflowContext, n: int) -> int:
        done = 0
        for i in range(n):
            try:
                done += await ctx.step(work, i, name=f"w{i}")
            except RedisConnectionError:
                if own_server.process is None:
                    own_server.start(*DURABLE)
                raise
        return done

    run_id = f"lost-{uuid.uuid4().hex[:8]}"
    store = RedisStore.from_url(own_server.url, check_durability=False)
    try:
        with anyio.fail_after(LIMIT), pytest.raises(RedisConnectionError):
            await Engine(store, lease_ms=300).run(total, 6, run_id=run_id)
        stored = await store.get_run(run_id)
        assert stored is not None
        assert stored.status == RunStatus.RUNNING  # not recorded failed, though it could be
        with anyio.fail_after(LIMIT):
            record = await Engine(store, lease_ms=300).run(total, 6, run_id=run_id)
        assert (record.status, record.output) == (RunStatus.COMPLETED, 15)
        assert calls == Counter({0: 1, 1: 1, 2: 1, 3: 2, 4: 1, 5: 1})
    finally:
        await store.aclose()
