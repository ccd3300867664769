#!/usr/bin/env python
"""Engine throughput and latency on MemoryStore and RedisStore, against the raw Redis ceiling.

Starts its own ``redis-server`` on a free port (no persistence), so it never
touches a Redis you run yourself, then measures:

- W1: a 20-step sequential workflow, run 200 times one after another;
- W2: a 1 -> 50 -> 1 fan-out workflow, run 20 times one after another;
- the raw ceiling of that Redis: EVALSHA of a 3-write script (HSET, HSET,
  RPUSH on one hash-tagged key set), sequential and with 16 concurrent
  tasks sharing one client, for ~2 s each.

Prints a table, writes it as JSON to ``benchmarks/results/bench_engine.json``
and prints W1's RedisStore step transitions/s as a ratio of the sequential
ceiling, once from the table and once as the median of paired rounds (W1
and the ceiling measured back to back). ``--profile`` adds a breakdown of
where RedisStore W1 time goes: round trips and Redis commands per workflow
and per step, time per store method, and the top Python functions (cProfile).

    python benchmarks/bench_engine.py            # full run (~20-30 s)
    python benchmarks/bench_engine.py --quick    # fewer iterations (~6 s)
    python benchmarks/bench_engine.py --profile  # also profile RedisStore W1

See ``benchmarks/README.md`` for what each figure means.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import pstats
import resource
import statistics
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
from environment import environment, versions_line, write_results
from redis.asyncio import Redis
from redis_server import redis_server

from stepflow import (
    Engine,
    EventKind,
    MemoryStore,
    NewEvent,
    RedisStore,
    RunRecord,
    RunStatus,
    StepClaim,
    StepContext,
    Workflow,
)
from stepflow.store import connection
from stepflow.store.base import DEFAULT_LEASE_MS, WorkflowStore
from stepflow.store.connection import evalsha, fast_client

RESULTS = Path(__file__).parent / "results" / "bench_engine.json"
CHAIN_LENGTH = 20
FAN_WIDTH = 50
CEILING_TASKS = 16
WARMUP_RUNS = 5

# The ceiling's script: three writes on keys sharing one hash tag, like a step completion.
CEILING_LUA = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('RPUSH', KEYS[3], ARGV[2])
return 1
"""
CEILING_VALUE = '{"step":"s07","status":"completed","output":{"s07":1}}'


# -- workloads -----------------------------------------------------------------------


def _step(name: str) -> Callable[[StepContext], Awaitable[dict[str, Any]]]:
    async def body(ctx: StepContext) -> dict[str, Any]:
        return {name: ctx.attempt}

    body.__name__ = body.__qualname__ = name
    return body


def chain_workflow(length: int = CHAIN_LENGTH) -> Workflow:
    """W1: s00 -> s01 -> ... -> s19, each step merging one key into the context."""
    flow = Workflow(f"bench-chain-{length}")
    previous: list[str] = []
    for i in range(length):
        name = f"s{i:02d}"
        flow.step(name, after=previous)(_step(name))
        previous = [name]
    return flow


def fan_workflow(width: int = FAN_WIDTH) -> Workflow:
    """W2: root -> (f00 .. f49 in parallel) -> sink."""
    flow = Workflow(f"bench-fan-{width}")
    flow.step("root")(_step("root"))
    middle = [f"f{i:02d}" for i in range(width)]
    for name in middle:
        flow.step(name, after=["root"])(_step(name))
    flow.step("sink", after=middle)(_step("sink"))
    return flow


@dataclass
class Result:
    store: str
    workload: str
    runs: int
    steps_per_run: int
    seconds: float
    workflows_per_s: float
    steps_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_pct: float
    """Process CPU time (user + system) over wall time: ~100 means client-CPU bound."""
    peak_rss_mb: float


def _percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


async def run_workload(
    store: WorkflowStore,
    store_name: str,
    workload: str,
    flow: Workflow,
    runs: int,
    *,
    concurrency: int,
) -> Result:
    engine = Engine(store, max_concurrency=concurrency)
    for _ in range(WARMUP_RUNS):
        await engine.run(flow)
    latencies: list[float] = []
    cpu_started = cpu_seconds()
    started = time.perf_counter()
    for _ in range(runs):
        begin = time.perf_counter()
        record = await engine.run(flow)
        latencies.append(time.perf_counter() - begin)
        if record.status != RunStatus.COMPLETED:
            raise RuntimeError(f"{workload} on {store_name} ended {record.status}: {record.error}")
    seconds = time.perf_counter() - started
    cpu = cpu_seconds() - cpu_started
    steps = len(flow.step_names)
    return Result(
        store=store_name,
        workload=workload,
        runs=runs,
        steps_per_run=steps,
        seconds=round(seconds, 4),
        workflows_per_s=round(runs / seconds, 2),
        steps_per_s=round(runs * steps / seconds, 1),
        p50_ms=round(statistics.median(latencies) * 1000, 3),
        p99_ms=round(_percentile(latencies, 0.99) * 1000, 3),
        cpu_pct=round(100 * cpu / seconds, 1),
        peak_rss_mb=round(peak_rss_mb(), 1),
    )


async def delete_prefix(client: Redis, prefix: str) -> int:
    deleted = 0
    async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        deleted += await client.unlink(key)
    return deleted


@asynccontextmanager
async def redis_store(url: str, prefix: str) -> AsyncIterator[RedisStore]:
    store = RedisStore.from_url(url, prefix=prefix, check_durability=False)
    try:
        yield store
    finally:
        await delete_prefix(store.client, prefix)
        await store.aclose()


# -- the raw ceiling -----------------------------------------------------------------------


Send = Callable[[Redis, str, list[str], list[str]], Awaitable[Any]]
"""How a ceiling call is sent: (client, script sha, keys, args) -> reply."""


async def redis_py_evalsha(client: Redis, sha: str, keys: list[str], args: list[str]) -> Any:
    return await client.evalsha(sha, len(keys), *keys, *args)


CEILING_CLIENTS: dict[str, tuple[Callable[[str], Redis], Send]] = {
    "redis-py": (Redis.from_url, redis_py_evalsha),
    "stepflow": (fast_client, evalsha),
}
"""The ceiling is measured with a stock redis-py client and with the client
`RedisStore.from_url` makes (its connections and pool), each sending the way
its user does: ``Redis.evalsha``, and the store's own `connection.evalsha`.
So the ratio can be read against either."""


async def ceiling(
    url: str, prefix: str, seconds: float, make_client: Callable[[str], Redis], send: Send
) -> dict[str, float]:
    """EVALSHA calls/s of the 3-write script: one caller, then CEILING_TASKS callers."""
    client = make_client(url)
    tag = f"{prefix}:{{ceiling}}"
    keys = [f"{tag}:a", f"{tag}:b", f"{tag}:c"]
    try:
        sha = await client.script_load(CEILING_LUA)
        sequential = await sequential_rate(client, sha, keys, send, seconds)
        counts = [0] * CEILING_TASKS

        async def caller(index: int) -> None:
            while time.perf_counter() < deadline:
                await send(client, sha, keys, [f"s{index:02d}|output", CEILING_VALUE])
                counts[index] += 1

        started = time.perf_counter()
        deadline = started + seconds
        async with anyio.create_task_group() as tg:
            for index in range(CEILING_TASKS):
                tg.start_soon(caller, index)
        concurrent = sum(counts) / (time.perf_counter() - started)
        return {
            "sequential_calls_per_s": round(sequential, 1),
            "concurrent_calls_per_s": round(concurrent, 1),
        }
    finally:
        await delete_prefix(client, prefix)
        await client.aclose()


async def sequential_rate(
    client: Redis, sha: str, keys: list[str], send: Send, seconds: float
) -> float:
    """Calls/s of the ceiling script from one caller, each awaiting its reply."""
    for _ in range(200):  # open the connection, warm up
        await send(client, sha, keys, ["s07|output", CEILING_VALUE])
    calls = 0
    started = time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        await send(client, sha, keys, ["s07|output", CEILING_VALUE])
        calls += 1
    return calls / (time.perf_counter() - started)


# -- the store floor: W1's store calls with no engine around them ------------------------


async def store_floor_chain(store: WorkflowStore, length: int = CHAIN_LENGTH) -> None:
    """The store calls the engine makes for one W1 run, made back to back.

    The create with the first claim, a completion claiming the next step
    for each step but the last, and the last completion finishing the run,
    with the same events, outputs and context patches as W1's. What W1
    costs beyond this is the engine's own work.
    """
    run_id = uuid.uuid4().hex
    record = RunRecord(
        run_id=run_id, workflow="bench-floor", version="1", input={}, status=RunStatus.RUNNING
    )
    _, lease = await store.create_and_claim(
        record,
        StepClaim(step_id="s00", name="s00", lease_ms=DEFAULT_LEASE_MS),
        owner="bench-floor",
        event=NewEvent(kind=EventKind.RUN_STARTED, payload={}),
    )
    for index in range(length):
        assert lease is not None, "the floor's chain lost its lease"
        name = f"s{index:02d}"
        output = {name: 1}
        completed = NewEvent(kind=EventKind.STEP_COMPLETED, payload={"step": name, "attempt": 1})
        if index == length - 1:
            await store.complete_and_finish(
                lease,
                output=output,
                context_patch=output,
                event=completed,
                run_output={name: output},
                run_event=NewEvent(kind=EventKind.RUN_COMPLETED, payload=None),
            )
            return
        following = f"s{index + 1:02d}"
        _, lease = await store.complete_and_claim(
            lease,
            StepClaim(step_id=following, name=following, lease_ms=DEFAULT_LEASE_MS),
            output=output,
            context_patch=output,
            event=completed,
        )


async def store_floor_rate(store: WorkflowStore, runs: int) -> float:
    """Step transitions/s of `store_floor_chain`, run ``runs`` times one after another."""
    for _ in range(WARMUP_RUNS):
        await store_floor_chain(store)
    started = time.perf_counter()
    for _ in range(runs):
        await store_floor_chain(store)
    return runs * CHAIN_LENGTH / (time.perf_counter() - started)


# -- the ratio, from paired rounds -------------------------------------------------------


async def paired_ratios(
    url: str, prefix: str, rounds: int, runs: int, concurrency: int
) -> dict[str, Any]:
    """W1 on Redis / the sequential ceiling, each round measured back to back.

    A machine's speed drifts over seconds (other tenants of a VM host, CPU
    frequency), and the full table measures W1 and the ceiling seconds apart.
    Each round here runs ``runs`` W1 workflows, as many store floor chains
    (`store_floor_chain`) and then ~0.4 s of each client's sequential
    ceiling, so every ratio of a round sees the same machine; the median
    over the rounds is the figure to read. Returns, per client, W1's ratio
    and the store floor's (W1 with an engine that cost nothing).
    """
    chain = chain_workflow()
    clients = {name: make(url) for name, (make, _) in CEILING_CLIENTS.items()}
    tag = f"{prefix}:{{pairs}}"
    keys = [f"{tag}:a", f"{tag}:b", f"{tag}:c"]
    by_client: dict[str, dict[str, list[float]]] = {
        name: {"w1": [], "store_floor": []} for name in CEILING_CLIENTS
    }
    try:
        shas = {name: await client.script_load(CEILING_LUA) for name, client in clients.items()}
        async with redis_store(url, f"{prefix}-pairs") as store:
            for _ in range(rounds):
                w1 = await run_workload(
                    store, "redis", "W1 chain", chain, runs, concurrency=concurrency
                )
                floor = await store_floor_rate(store, runs)
                for name, (_, send) in CEILING_CLIENTS.items():
                    rate = await sequential_rate(clients[name], shas[name], keys, send, 0.4)
                    by_client[name]["w1"].append(w1.steps_per_s / rate)
                    by_client[name]["store_floor"].append(floor / rate)
    finally:
        for client in clients.values():
            await delete_prefix(client, prefix)
            await client.aclose()
    return {
        name: {measured: _spread(ratios) for measured, ratios in figures.items()}
        for name, figures in by_client.items()
    }


def _spread(ratios: list[float]) -> dict[str, Any]:
    return {
        "median": round(statistics.median(ratios), 4),
        "min": round(min(ratios), 4),
        "max": round(max(ratios), 4),
        "rounds": [round(ratio, 4) for ratio in ratios],
    }


# -- profile of RedisStore W1 ------------------------------------------------------------


class RoundTrips:
    """Counts client round trips and the commands in them while installed."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.packets = 0
        self.commands: Counter[str] = Counter()
        self.pipelines: Counter[str] = Counter()
        self._saved: list[tuple[Any, str, Any]] = []

    def _script_names(self) -> dict[str, str]:
        return {script.sha: name for name, script in self.store._scripts.items()}

    @contextmanager
    def installed(self) -> Iterator[RoundTrips]:
        counter = self
        connection_class = self.store.client.connection_pool.connection_class
        send = connection_class.send_packed_command
        execute = Redis.execute_command
        send_script = connection.evalsha
        send_pipeline = connection.pipelined

        async def counted_send(conn: Any, *args: Any, **kwargs: Any) -> Any:
            counter.packets += 1
            return await send(conn, *args, **kwargs)

        async def counted_script(client: Redis, sha: str, *args: Any) -> Any:
            counter.commands[f"EVALSHA {counter._script_names().get(sha, sha)}"] += 1
            return await send_script(client, sha, *args)

        async def counted_execute(client: Redis, *args: Any, **options: Any) -> Any:
            name = str(args[0]).upper()
            if name != "EVALSHA":  # a script the store sends is counted by counted_script
                counter.commands[name] += 1
            return await execute(client, *args, **options)

        async def counted_pipeline(client: Redis, commands: Sequence[Sequence[Any]]) -> Any:
            names = Counter(str(command[0]).upper() for command in commands)
            if names:
                shape = " + ".join(f"{n}x{k}" for k, n in sorted(names.items()))
                counter.pipelines[f"PIPELINE [{shape}]"] += 1
            return await send_pipeline(client, commands)

        patches = [
            (connection_class, "send_packed_command", counted_send),
            (Redis, "execute_command", counted_execute),
            (connection, "evalsha", counted_script),
            (connection, "pipelined", counted_pipeline),
        ]
        for owner, attr, replacement in patches:
            self._saved.append((owner, attr, owner.__dict__.get(attr)))
            setattr(owner, attr, replacement)
        try:
            yield self
        finally:
            for owner, attr, original in reversed(self._saved):
                if original is None:
                    delattr(owner, attr)  # it was inherited
                else:
                    setattr(owner, attr, original)
            self._saved.clear()


@contextmanager
def timed_store_methods(store: RedisStore, totals: dict[str, list[float]]) -> Iterator[None]:
    """Record wall time and count of every awaited store method (on this instance)."""
    names = [
        "create_run",
        "create_and_claim",
        "get_run",
        "set_run_status",
        "list_steps",
        "get_step",
        "claim_step",
        "renew_lease",
        "complete_step",
        "complete_and_claim",
        "complete_and_finish",
        "fail_step",
        "upsert_step",
    ]
    for name in names:
        method = getattr(store, name)

        def wrap(method: Any = method, name: str = name) -> Any:
            async def timed(*args: Any, **kwargs: Any) -> Any:
                begin = time.perf_counter()
                try:
                    return await method(*args, **kwargs)
                finally:
                    totals[name].append(time.perf_counter() - begin)

            return timed

        setattr(store, name, wrap())
    try:
        yield
    finally:
        for name in names:
            delattr(store, name)


async def server_commandstats(client: Redis) -> dict[str, int]:
    info = await client.info("commandstats")
    return {key.removeprefix("cmdstat_"): int(value["calls"]) for key, value in info.items()}


async def profile_w1(url: str, prefix: str, runs: int, top: int) -> dict[str, Any]:
    flow = chain_workflow()
    report: dict[str, Any] = {"runs": runs, "steps_per_run": CHAIN_LENGTH}
    async with redis_store(url, f"{prefix}-profile") as store:
        engine = Engine(store)
        for _ in range(WARMUP_RUNS):
            await engine.run(flow)
        admin = Redis.from_url(url)
        try:
            before = await server_commandstats(admin)
            counter = RoundTrips(store)
            with counter.installed():
                for _ in range(runs):
                    await engine.run(flow)
            after = await server_commandstats(admin)
        finally:
            await admin.aclose()
        server = {
            name: calls - before.get(name, 0)
            for name, calls in after.items()
            if calls - before.get(name, 0) > 0 and name not in {"info"}
        }
        steps = runs * CHAIN_LENGTH
        report["round_trips_per_workflow"] = counter.packets / runs
        report["round_trips_per_step"] = counter.packets / steps
        report["client_commands_per_workflow"] = {
            name: calls / runs for name, calls in counter.commands.most_common()
        }
        report["client_pipelines_per_workflow"] = {
            name: calls / runs for name, calls in counter.pipelines.most_common()
        }
        report["server_commands_per_workflow"] = {
            name: calls / runs for name, calls in sorted(server.items(), key=lambda i: -i[1])
        }

        totals: dict[str, list[float]] = defaultdict(list)
        with timed_store_methods(store, totals):
            started = time.perf_counter()
            for _ in range(runs):
                await engine.run(flow)
            wall = time.perf_counter() - started
        report["wall_ms_per_workflow"] = wall * 1000 / runs
        report["store_methods"] = {
            name: {
                "calls_per_workflow": len(times) / runs,
                "mean_ms": statistics.fmean(times) * 1000,
                "share_of_wall": sum(times) / wall,
            }
            for name, times in sorted(totals.items(), key=lambda i: -sum(i[1]))
        }

        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(runs):
            await engine.run(flow)
        profiler.disable()
    views = {
        "cumulative": ("cumulative", ()),
        "cumulative, stepflow only": ("cumulative", (r"/stepflow/",)),
        "tottime": ("tottime", ()),
    }
    report["cprofile"] = {}
    for title, (key, restrictions) in views.items():
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out).sort_stats(key)
        stats.print_stats(*restrictions, top)
        report["cprofile"][title] = _trim_pstats(out.getvalue())
    return report


def _trim_pstats(text: str) -> str:
    """pstats output without its preamble, with paths shortened to package-relative ones."""
    lines = text.strip().splitlines()
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
    kept = []
    for line in lines[start:]:
        for marker in ("/site-packages/", "/lib/python3.", "/work/main/"):
            head, found, tail = line.partition(marker)
            if found:
                prefix = head[: head.rfind(" ") + 1]
                line = prefix + (tail.split("/", 1)[1] if marker == "/lib/python3." else tail)
                break
        kept.append(line)
    return "\n".join(kept)


def print_profile(report: dict[str, Any]) -> None:
    runs, steps = report["runs"], report["steps_per_run"]
    print(f"\nProfile of RedisStore W1 ({runs} runs x {steps} steps)")
    print(
        f"  round trips: {report['round_trips_per_workflow']:.1f} per workflow, "
        f"{report['round_trips_per_step']:.2f} per step"
    )
    print("  client commands per workflow (one round trip each):")
    for name, calls in report["client_commands_per_workflow"].items():
        print(f"    {calls:6.1f}  {name}")
    for name, calls in report["client_pipelines_per_workflow"].items():
        print(f"    {calls:6.1f}  {name}")
    print("  server-side commands per workflow (INFO commandstats; includes redis.call in Lua):")
    for name, calls in report["server_commands_per_workflow"].items():
        print(f"    {calls:6.1f}  {name}")
    print(f"  store methods (wall {report['wall_ms_per_workflow']:.2f} ms per workflow):")
    print("    calls/wf   mean ms   share of wall")
    for name, row in report["store_methods"].items():
        print(
            f"    {row['calls_per_workflow']:8.1f} {row['mean_ms']:9.3f} "
            f"{row['share_of_wall']:10.1%}   {name}"
        )
    for title, table in report["cprofile"].items():
        print(f"\n  cProfile, top by {title}:")
        print(table)


# -- main ----------------------------------------------------------------------------------------


def print_table(results: list[Result]) -> None:
    header = (
        f"{'store':<12}{'workload':<24}{'runs':>6}{'wf/s':>10}{'steps/s':>11}"
        f"{'p50 ms':>10}{'p99 ms':>10}{'CPU %':>8}{'peak RSS MB':>13}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        label = f"{r.workload} ({r.steps_per_run} st)"
        print(
            f"{r.store:<12}{label:<24}{r.runs:>6}{r.workflows_per_s:>10.1f}{r.steps_per_s:>11.1f}"
            f"{r.p50_ms:>10.2f}{r.p99_ms:>10.2f}{r.cpu_pct:>8.0f}{r.peak_rss_mb:>13.1f}"
        )


async def main(args: argparse.Namespace) -> None:
    w1_runs, w2_runs, ceiling_s = (30, 5, 0.5) if args.quick else (200, 20, 2.0)
    chain, fan = chain_workflow(), fan_workflow()
    prefix = f"bench-{uuid.uuid4().hex[:10]}"
    results: list[Result] = []
    with redis_server() as url:
        for store_name in ("memory", "redis"):
            for workload, flow, runs in (
                ("W1 chain", chain, w1_runs),
                ("W2 fan-out", fan, w2_runs),
            ):
                if store_name == "memory":
                    result = await run_workload(
                        MemoryStore(), store_name, workload, flow, runs,
                        concurrency=args.concurrency,
                    )  # fmt: skip
                else:
                    async with redis_store(url, prefix) as store:
                        result = await run_workload(
                            store, store_name, workload, flow, runs, concurrency=args.concurrency
                        )
                results.append(result)
        raw = {
            name: await ceiling(url, prefix, ceiling_s, make_client, send)
            for name, (make_client, send) in CEILING_CLIENTS.items()
        }
        rounds = args.pairs or (3 if args.quick else 7)
        pairs = await paired_ratios(url, prefix, rounds, 10 if args.quick else 40, args.concurrency)
        profile = None
        if args.profile:
            profile = await profile_w1(url, prefix, args.profile_runs, args.profile_top)
        client = Redis.from_url(url)
        try:
            redis_version = (await client.info("server"))["redis_version"]
            keys_left = await client.dbsize()  # our own server: every key was ours
        finally:
            await client.aclose()

    w1_redis = next(r for r in results if r.store == "redis" and r.workload == "W1 chain")
    ratios = {
        name: w1_redis.steps_per_s / figures["sequential_calls_per_s"]
        for name, figures in raw.items()
    }
    meta = environment(
        redis_version,
        quick=args.quick,
        max_concurrency=args.concurrency,
        warmup_runs=WARMUP_RUNS,
        redis_keys_left=keys_left,
    )
    print(
        f"\n{versions_line(meta)}, max_concurrency={args.concurrency}"
        f"{', QUICK' if args.quick else ''}\n"
    )
    print_table(results)
    print(
        f"\nRaw Redis ceiling (EVALSHA, 3 writes: HSET+HSET+RPUSH, one hash tag, ~{ceiling_s:g} s),"
        " by client:"
    )
    for name, figures in raw.items():
        sequential = figures["sequential_calls_per_s"]
        concurrent = figures["concurrent_calls_per_s"]
        print(
            f"  {name:<9} sequential, 1 caller: {sequential:>9.1f} calls/s"
            f"   concurrent, {CEILING_TASKS} tasks: {concurrent:>9.1f} calls/s"
        )
    for name, ratio in ratios.items():
        verdict = "meets" if ratio >= 0.5 else "below"
        print(
            f"W1 RedisStore step transitions/s = {w1_redis.steps_per_s:.1f} = {ratio:.3f} x the "
            f"sequential ceiling with the {name} client ({verdict} the 0.5x target)"
        )
    print(
        f"\nThe same ratio from {rounds} paired rounds (W1 runs, the store floor, then each"
        " sequential ceiling, back to back):"
    )
    for name, figures in pairs.items():
        w1_pairs, floor = figures["w1"], figures["store_floor"]
        verdict = "meets" if w1_pairs["median"] >= 0.5 else "below"
        print(
            f"  {name:<9} median {w1_pairs['median']:.3f} x (range {w1_pairs['min']:.3f}"
            f"-{w1_pairs['max']:.3f}; {verdict} the 0.5x target)"
        )
        print(
            f"  {'':<9} store floor (W1's store calls alone, no engine): median"
            f" {floor['median']:.3f} x (range {floor['min']:.3f}-{floor['max']:.3f})"
        )
    if profile is not None:
        print_profile(profile)

    payload = {
        "meta": meta,
        "results": [asdict(r) for r in results],
        "ceiling": {"seconds": ceiling_s, "tasks": CEILING_TASKS, "by_client": raw},
        "w1_redis_ratio_to_sequential_ceiling": {
            name: round(ratio, 4) for name, ratio in ratios.items()
        },
        "w1_redis_ratio_paired_rounds": pairs,
        "target_ratio": 0.5,
    }
    if profile is not None:
        payload["profile_w1_redis"] = profile
    write_results(args.output, payload)
    print(f"\nRedis keys left behind: {keys_left}; wrote {args.output}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    parser.add_argument(
        "--concurrency", type=int, default=16, help="Engine max_concurrency (default 16)"
    )
    parser.add_argument(
        "--pairs",
        type=int,
        default=None,
        help="paired rounds of W1 and the sequential ceilings for the ratio (default 7, quick 3)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="also profile RedisStore W1 (round trips, cProfile)"
    )
    parser.add_argument(
        "--profile-runs", type=int, default=50, help="W1 runs per profile pass (default 50)"
    )
    parser.add_argument(
        "--profile-top", type=int, default=10, help="cProfile rows per view (default 10)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON path ({RESULTS})")
    return parser.parse_args(argv)


if __name__ == "__main__":
    anyio.run(main, parse_args())
