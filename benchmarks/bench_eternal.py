#!/usr/bin/env python
"""Storage of an eternal workflow on Redis: continue-as-new with and without pruning.

Starts its own ``redis-server`` on a free port (no persistence), so it never
touches a Redis you run yourself, then runs a durable workflow that does one
small step per execution and continues as new, 1,000 times:

- ``pruned``: ``@stepflow.workflow(..., auto_prune=PruneOptions(keep_last=2))``;
- ``unpruned``: the same workflow without pruning, for comparison.

Every 100 continues the step itself (so at the same point of an execution
each time) samples the run's storage: its keys (SCAN on the run's hash-tag
pattern ``<prefix>:{<run_id>}:*``), the sum of ``MEMORY USAGE <key> SAMPLES 0``
over them, the executions stored (``store.list_executions``), the events in
their histories, and the server's ``INFO memory`` ``used_memory``. Prints a
table per mode, checks that the pruned run ends with exactly 2 executions,
and writes everything as JSON to ``benchmarks/results/bench_eternal.json``.

    python benchmarks/bench_eternal.py                   # 1,000 continues per mode
    python benchmarks/bench_eternal.py --continues 200    # a shorter run

See ``benchmarks/README.md`` for what each figure means.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
from environment import environment, versions_line, write_results
from redis.asyncio import Redis
from redis_server import redis_server

import stepflow
from stepflow import DurableWorkflow, Engine, PruneOptions, RedisStore, RunStatus

RESULTS = Path(__file__).parent / "results" / "bench_eternal.json"
KEEP_LAST = 2


# -- sampling ------------------------------------------------------------------------------


@dataclass
class Sample:
    continues: int
    seconds: float
    """Since the run started."""
    keys: int
    run_memory_bytes: int
    """Sum of MEMORY USAGE (SAMPLES 0) over the run's keys."""
    global_memory_bytes: int
    """Sum of MEMORY USAGE over the prefix's global keys (``<prefix>:{#...}:*``: indexes,
    metrics and their request-id log), which no run's hash tag covers."""
    used_memory_bytes: int
    """INFO memory used_memory: the whole server."""
    executions: int
    events: int
    """Events in the stored histories (sum of the executions' event counts)."""


@dataclass
class Sampler:
    """Samples one run's storage; the workflow's step calls it every ``every`` continues."""

    store: RedisStore
    run_id: str
    every: int
    started: float = field(default_factory=time.perf_counter)
    samples: list[Sample] = field(default_factory=list)

    async def sample(self, continues: int) -> Sample:
        client = self.store.client
        pattern = self.store.keys.run_pattern(self.run_id)
        keys = [key async for key in client.scan_iter(match=pattern, count=1000)]
        async with client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.memory_usage(key, samples=0)
            sizes = await pipe.execute()
        shared = [
            key
            async for key in client.scan_iter(match=f"{self.store.keys.prefix}:{{#*", count=1000)
        ]
        async with client.pipeline(transaction=False) as pipe:
            for key in shared:
                pipe.memory_usage(key, samples=0)
            shared_sizes = await pipe.execute()
        info = await client.info("memory")
        executions = await self.store.list_executions(self.run_id)
        sample = Sample(
            continues=continues,
            seconds=round(time.perf_counter() - self.started, 4),
            keys=len(keys),
            run_memory_bytes=sum(size or 0 for size in sizes),
            global_memory_bytes=sum(size or 0 for size in shared_sizes),
            used_memory_bytes=int(info["used_memory"]),
            executions=len(executions),
            events=sum(x.event_count for x in executions),
        )
        self.samples.append(sample)
        return sample


_SAMPLERS: dict[str, Sampler] = {}
"""run id -> its sampler (the step looks it up: step arguments must be JSON)."""


async def tick(run_id: str, n: int) -> int:
    """The one small step of each execution: n + 1, after sampling every ``every`` continues."""
    sampler = _SAMPLERS[run_id]
    if n and n % sampler.every == 0:
        await sampler.sample(n)
    return n + 1


async def _eternal(ctx: stepflow.WorkflowContext, job: dict[str, int]) -> int:
    n = await ctx.step(tick, ctx.run_id, job["n"])
    if n > job["continues"]:
        return n
    ctx.continue_as_new({**job, "n": n})


PRUNED = stepflow.workflow("bench-eternal-pruned", auto_prune=PruneOptions(keep_last=KEEP_LAST))(
    _eternal
)
UNPRUNED = stepflow.workflow("bench-eternal-unpruned")(_eternal)


# -- one mode ------------------------------------------------------------------------------


@dataclass
class ModeResult:
    mode: str
    auto_prune: dict[str, Any] | None
    continues: int
    seconds: float
    continues_per_s: float
    executions_stored: int
    samples: list[Sample]
    final: Sample
    run_memory_growth: float
    """Final run memory / run memory at the first sample."""
    used_memory_delta_bytes: int
    """used_memory at the end minus before the run started."""


async def run_mode(
    url: str, mode: str, definition: DurableWorkflow, continues: int, every: int
) -> ModeResult:
    prefix = f"bench-eternal-{uuid.uuid4().hex[:8]}"
    store = RedisStore.from_url(url, prefix=prefix, check_durability=False)
    run_id = f"eternal-{mode}"
    try:
        baseline = int((await store.client.info("memory"))["used_memory"])
        sampler = _SAMPLERS[run_id] = Sampler(store, run_id, every)
        async with Engine(store) as engine:
            await engine.start(definition, {"n": 0, "continues": continues}, run_id=run_id)
            record = await engine.wait(run_id, timeout=600)
        seconds = time.perf_counter() - sampler.started
        if record.status != RunStatus.COMPLETED:
            raise SystemExit(f"{mode}: the run ended {record.status}: {record.error}")
        final = await sampler.sample(continues)
        samples = sampler.samples[:-1]
        first = samples[0] if samples else final
        result = ModeResult(
            mode=mode,
            auto_prune=definition.auto_prune.model_dump() if definition.auto_prune else None,
            continues=continues,
            seconds=round(seconds, 3),
            continues_per_s=round(continues / seconds, 1),
            executions_stored=len(await store.list_executions(run_id)),
            samples=samples,
            final=final,
            run_memory_growth=round(final.run_memory_bytes / first.run_memory_bytes, 3),
            used_memory_delta_bytes=final.used_memory_bytes - baseline,
        )
        await store.delete_run(run_id)
        return result
    finally:
        _SAMPLERS.pop(run_id, None)
        async for key in store.client.scan_iter(match=f"{prefix}:*", count=1000):
            await store.client.unlink(key)
        await store.aclose()


def print_mode(result: ModeResult) -> None:
    prune = f"auto_prune={result.auto_prune}" if result.auto_prune else "no pruning"
    print(f"\n{result.mode}: {result.continues} continue-as-new, {prune}")
    header = (
        f"{'continues':>9} {'s':>7} {'keys':>6} {'run memory B':>13} {'global B':>9} "
        f"{'used_memory B':>14} {'executions':>10} {'events':>7}"
    )
    print(header)
    print("-" * len(header))
    for s in [*result.samples, result.final]:
        label = f"{s.continues}" if s is not result.final else f"{s.continues} end"
        print(
            f"{label:>9} {s.seconds:>7.2f} {s.keys:>6} {s.run_memory_bytes:>13,} "
            f"{s.global_memory_bytes:>9,} {s.used_memory_bytes:>14,} {s.executions:>10} "
            f"{s.events:>7}"
        )
    print(
        f"{result.continues_per_s:,.0f} continues/s; {result.executions_stored} executions "
        f"stored; run memory x{result.run_memory_growth:g} from the first sample; "
        f"used_memory {result.used_memory_delta_bytes:+,} B over the run"
    )


async def main(args: argparse.Namespace) -> None:
    with redis_server() as url:
        client = Redis.from_url(url)
        try:
            redis_version = (await client.info("server"))["redis_version"]
        finally:
            await client.aclose()
        pruned = await run_mode(url, "pruned", PRUNED, args.continues, args.sample_every)
        unpruned = await run_mode(url, "unpruned", UNPRUNED, args.continues, args.sample_every)

    meta = environment(
        redis_version,
        continues=args.continues,
        sample_every=args.sample_every,
        keep_last=KEEP_LAST,
    )
    print(f"\n{versions_line(meta)}")
    for result in (pruned, unpruned):
        print_mode(result)
    ok = pruned.executions_stored == KEEP_LAST
    print(
        f"\npruned run: {pruned.executions_stored} executions stored "
        f"({'OK' if ok else 'FAIL'}: expected {KEEP_LAST}); "
        f"unpruned: {unpruned.executions_stored}; final run memory "
        f"{pruned.final.run_memory_bytes:,} B vs {unpruned.final.run_memory_bytes:,} B"
    )

    payload = {
        "meta": meta,
        "results": [asdict(pruned), asdict(unpruned)],
        "pruned_executions_ok": ok,
    }
    write_results(args.output, payload)
    print(f"wrote {args.output}")
    if not ok:
        sys.exit(1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--continues", type=int, default=1000, help="continue-as-new per mode (default 1000)"
    )
    parser.add_argument(
        "--sample-every", type=int, default=100, help="continues between samples (default 100)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON path ({RESULTS})")
    args = parser.parse_args(argv)
    if args.continues < 1 or args.sample_every < 1:
        parser.error("--continues and --sample-every must be at least 1")
    return args


if __name__ == "__main__":
    anyio.run(main, parse_args())
