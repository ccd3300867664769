"""An eternal workflow keeps flat storage on a real ``redis-server``.

One small step per execution, then ``ctx.continue_as_new``, 1,000 times,
with ``auto_prune=PruneOptions(keep_last=2)``. The step itself samples the
run's storage every 100 continues (so every sample is taken at the same
point of an execution: its step running): the run's keys (SCAN on the run's
hash-tag pattern) and the sum of their ``MEMORY USAGE``. In the end exactly
two executions remain, the run always had the same keys, and its memory did
not grow beyond what it was after 100 continues (the bound allows for
allocator noise, not for growth with the number of executions).

``benchmarks/bench_eternal.py`` prints the same figures as a table, and the
same workflow without pruning for comparison.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
import pytest

import stepflow
from stepflow import Engine, PruneOptions, RedisStore, RunStatus

if TYPE_CHECKING:
    from conftest import RedisServer

pytestmark = pytest.mark.redis

CONTINUES = 1_000
SAMPLE_EVERY = 100
GROWTH_BOUND = 1.5


@dataclass(frozen=True)
class Sample:
    continues: int
    keys: tuple[str, ...]
    """The run's key names with execution numbers masked (``x:<N>:events``)."""
    memory: int
    """Sum of ``MEMORY USAGE key SAMPLES 0`` over the run's keys, bytes."""


_SAMPLES: list[Sample] = []
_SAMPLER: dict[str, RedisStore] = {}


async def _sample(store: RedisStore, run_id: str, continues: int) -> Sample:
    keys = sorted(
        [key.decode() async for key in store.client.scan_iter(match=store.keys.run_pattern(run_id))]
    )
    async with store.client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.memory_usage(key, samples=0)
        sizes = await pipe.execute()
    masked = tuple(re.sub(r":x:\d+:events$", ":x:<N>:events", key) for key in keys)
    return Sample(continues=continues, keys=masked, memory=sum(sizes))


async def tick(run_id: str, n: int) -> int:
    """The step: n + 1; every SAMPLE_EVERY continues it measures the run's storage first."""
    if n and n % SAMPLE_EVERY == 0:
        _SAMPLES.append(await _sample(_SAMPLER["store"], run_id, n))
    return n + 1


@stepflow.workflow("test-eternal-keep-2", auto_prune=PruneOptions(keep_last=2))
async def eternal(ctx: stepflow.WorkflowContext, n: int) -> int:
    n = await ctx.step(tick, ctx.run_id, n)
    if n > CONTINUES:
        return n
    ctx.continue_as_new(n)


async def test_eternal_workflow_keeps_two_executions_and_flat_storage(
    redis_server: RedisServer, key_prefix: str
) -> None:
    store = RedisStore.from_url(redis_server.url, prefix=key_prefix, check_durability=False)
    _SAMPLER["store"] = store
    _SAMPLES.clear()
    run_id = f"eternal-{uuid.uuid4().hex[:8]}"
    try:
        with anyio.fail_after(90):
            async with Engine(store, lease_ms=300) as engine:
                await engine.start(eternal, 0, run_id=run_id)
                record = await engine.wait(run_id)
        assert record.status == RunStatus.COMPLETED, record.error
        assert record.output == CONTINUES + 1
        assert record.current_execution_id == CONTINUES + 1

        executions = await store.list_executions(run_id)
        assert [x.execution_id for x in executions] == [CONTINUES, CONTINUES + 1]
        assert [x.status for x in executions] == [RunStatus.CONTINUED_AS_NEW, RunStatus.COMPLETED]
        history = await store.read_history(run_id)
        pruned = [e for e in history if e.kind == stepflow.EventKind.HISTORY_PRUNED]
        assert [e.payload["executions_deleted"] for e in pruned] == [1]
        steps = await store.list_steps(run_id)
        assert [s.step_id for s in steps] == [f"x{CONTINUES}-1", f"x{CONTINUES + 1}-1"]

        assert [s.continues for s in _SAMPLES] == list(range(100, CONTINUES + 1, SAMPLE_EVERY))
        first = _SAMPLES[0]
        table = "\n".join(f"{s.continues:>6} {len(s.keys):>4} {s.memory:>8}" for s in _SAMPLES)
        for sample in _SAMPLES:
            assert sample.keys == first.keys, f"the run's keys changed:\n{table}"
        assert _SAMPLES[-1].memory <= GROWTH_BOUND * first.memory, f"storage grew:\n{table}"
        final = await _sample(store, run_id, CONTINUES)
        assert final.keys == first.keys
        assert final.memory <= GROWTH_BOUND * first.memory, f"storage grew:\n{table}"
        await store.delete_run(run_id)
    finally:
        _SAMPLER.clear()
        await store.aclose()
