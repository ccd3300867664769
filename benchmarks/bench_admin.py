#!/usr/bin/env python
"""Admin reads on a RedisStore holding 100,000 runs: a page of 100, by status, metrics.

Starts its own ``redis-server`` on a free port (no persistence), so it never
touches a Redis you run yourself, loads ``--runs`` runs (default 100,000:
70 % completed, 20 % failed, 10 % running) with pipelined creates through
the store's own ``create_run.lua`` and index updates, then times, through
`stepflow.Admin`:

- ``list_instances(limit=100)``: the first page and a deep page (offset 50,000);
- ``list_instances_by_status("completed", limit=100)``: first and deep page;
- ``list_instance_infos(limit=100)``: a page with each run's summary;
- ``get_system_metrics()`` and ``get_queue_depths()``;
- ``get_instance_info(id)`` of one run.

Each operation runs ``--repeat`` times (after 5 unmeasured calls); the table
shows the median, p95 and max latency. Results also go to
``benchmarks/results/bench_admin.json``.

    python benchmarks/bench_admin.py              # 100,000 runs (~30 s)
    python benchmarks/bench_admin.py --runs 10000 --repeat 50
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import redis
from environment import environment, versions_line, write_results
from redis_server import redis_server

from stepflow import Admin, RedisStore, RunRecord, RunStatus

RESULTS = Path(__file__).parent / "results" / "bench_admin.json"
BATCH = 1_000
WARMUP = 5


# -- loading -------------------------------------------------------------------------------


def status_of(i: int) -> RunStatus:
    slot = i % 10
    if slot < 7:
        return RunStatus.COMPLETED
    return RunStatus.FAILED if slot < 9 else RunStatus.RUNNING


async def load(store: RedisStore, runs: int) -> float:
    """Create ``runs`` runs, ``BATCH`` per pipeline: the same writes as ``create_run``."""
    await store.get_run("warm-up")  # load the scripts
    started = time.perf_counter()
    base = 1_700_000_000_000
    for first in range(0, runs, BATCH):
        async with store.client.pipeline(transaction=False) as pipe:
            for i in range(first, min(first + BATCH, runs)):
                status = status_of(i)
                record = RunRecord(
                    run_id=f"run-{i:06d}",
                    workflow="ingest",
                    status=status,
                    input={"n": i},
                    output={"ok": True} if status == RunStatus.COMPLETED else None,
                    created_at=base + i,
                    updated_at=base + i,
                    completed_at=base + i + 5 if status.is_terminal else None,
                )
                keys, args = store._create_run_call(record)
                pipe.zadd(store.keys.runs_by_time, {record.run_id: record.created_at})
                pipe.execute_command(*store._script_command("create_run", keys, args))
                pipe.zadd(store.keys.runs_by_status(status), {record.run_id: record.created_at})
                bump = store._script_command(
                    "bump_metrics", store._metric_keys, [args[0], "executions", 1]
                )
                pipe.execute_command(*bump)
            await pipe.execute()
    return time.perf_counter() - started


# -- timing ----------------------------------------------------------------------------------


async def timed(call: Callable[[], Awaitable[Any]], repeat: int) -> dict[str, float]:
    for _ in range(WARMUP):
        await call()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    return {
        "median_ms": round(statistics.median(samples), 3),
        "p95_ms": round(samples[min(len(samples) - 1, int(len(samples) * 0.95))], 3),
        "max_ms": round(samples[-1], 3),
    }


async def bench(url: str, runs: int, repeat: int) -> dict[str, Any]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    store = RedisStore.from_url(url, prefix=prefix, check_durability=False)
    admin = Admin(store)
    try:
        load_s = await load(store, runs)
        metrics = await admin.get_system_metrics()
        assert metrics.total_instances == runs, metrics
        assert metrics.total_executions == runs, metrics
        deep = min(50_000, runs // 2)
        deep_status = min(30_000, runs // 3)
        first_page = await admin.list_instances(limit=100)
        assert first_page[0] == f"run-{runs - 1:06d}", first_page[:3]
        assert len(await admin.list_instances(limit=100, offset=deep)) == 100
        some_id = first_page[50]
        operations: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("list_instances(limit=100)", lambda: admin.list_instances(limit=100)),
            (
                f"list_instances(limit=100, offset={deep:,})",
                lambda: admin.list_instances(limit=100, offset=deep),
            ),
            (
                'list_instances_by_status("completed", limit=100)',
                lambda: admin.list_instances_by_status("completed", limit=100),
            ),
            (
                f'list_instances_by_status("completed", limit=100, offset={deep_status:,})',
                lambda: admin.list_instances_by_status("completed", limit=100, offset=deep_status),
            ),
            ("list_instance_infos(limit=100)", lambda: admin.list_instance_infos(limit=100)),
            ("get_system_metrics()", admin.get_system_metrics),
            ("get_queue_depths()", admin.get_queue_depths),
            ("get_instance_info(id)", lambda: admin.get_instance_info(some_id)),
        ]
        results = []
        for name, call in operations:
            results.append({"operation": name, **await timed(call, repeat)})
        info = await store.client.info("memory")
        return {
            "runs": runs,
            "load_seconds": round(load_s, 2),
            "load_runs_per_s": round(runs / load_s),
            "redis_used_memory_mb": round(info["used_memory"] / 2**20, 1),
            "metrics": metrics.model_dump(),
            "results": results,
        }
    finally:
        async for key in store.client.scan_iter(match=f"{prefix}:*", count=5_000):
            await store.client.unlink(key)
        await store.aclose()


def report(data: dict[str, Any]) -> None:
    print(f"\n{versions_line(data['meta'])}")
    print(
        f"loaded {data['runs']:,} runs in {data['load_seconds']} s "
        f"({data['load_runs_per_s']:,} runs/s, pipelined); Redis memory "
        f"{data['redis_used_memory_mb']} MB\n"
    )
    width = max(len(row["operation"]) for row in data["results"])
    print(f"{'operation':<{width}}  {'median ms':>9}  {'p95 ms':>7}  {'max ms':>7}")
    print("-" * (width + 30))
    for row in data["results"]:
        print(
            f"{row['operation']:<{width}}  {row['median_ms']:>9.3f}  "
            f"{row['p95_ms']:>7.3f}  {row['max_ms']:>7.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=200, help="timed calls per operation")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    with redis_server() as url:
        data = anyio.run(bench, url, args.runs, args.repeat)
        version = redis.Redis.from_url(url).info("server")["redis_version"]
    data["meta"] = environment(version, repeat=args.repeat)
    report(data)
    write_results(args.output, data)
    print(f"\nwrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
