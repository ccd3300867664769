"""Child program for ``tests/test_crash_durable.py``: a durable run a test kills and resumes.

Usage::

    python durable_crash.py start  REDIS_URL PREFIX RUN_ID JOURNAL [LEASE_MS]
    python durable_crash.py resume REDIS_URL PREFIX RUN_ID [LEASE_MS]

``start`` creates run ``RUN_ID`` and drives it in this process (the test
SIGKILLs it part way). ``resume`` continues the stored run by id in a fresh
process, waits for it to finish and prints the final ``RunRecord`` as JSON
on stdout. ``LEASE_MS`` (default 300) is the engine's step lease: the
resuming process waits out the killed one's lease before it re-runs the
step that was in flight.

The workflow, in order::

    a (async step) -> b (sync step, in a thread) -> ctx.sleep(0.1)
      -> c (async step) -> ctx.wait_for_event("go", timeout=60) -> d (async step)

The first thing each step body does is append ``"<step> <pid>"`` to the
journal (its path is in the run input) and fsync it, so the journal lists
every time a step body *ran*, whatever happens to the process right after.
Then it sleeps 20-80 ms, standing in for real work. Each step returns its
name, its pid and what it was given, so the run's output shows the whole
chain: ``{"chain": "a>b>c>go>d", "go": <event payload>, "steps": {...}}``.
"""

from __future__ import annotations

import os
import random
import sys
import time
from typing import Any

import anyio
from _driver import main

import stepflow
from stepflow import Engine, RedisStore

LEASE_MS = 300
"""Default lease: short, so the resuming process takes over a killed step quickly."""

SLEEP_SECONDS = 0.1
EVENT = "go"


def _ran(path: str, step: str) -> float:
    """Journal that this step's body ran; return how long the 'work' takes."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{step} {os.getpid()}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return random.uniform(0.02, 0.08)


async def work(path: str, step: str, before: str) -> dict[str, Any]:
    await anyio.sleep(_ran(path, step))
    return {"step": step, "pid": os.getpid(), "chain": f"{before}>{step}" if before else step}


def work_sync(path: str, step: str, before: str) -> dict[str, Any]:
    time.sleep(_ran(path, step))
    return {"step": step, "pid": os.getpid(), "chain": f"{before}>{step}"}


@stepflow.workflow("crash-test-durable")
async def durable(ctx: stepflow.WorkflowContext, job: dict[str, Any]) -> dict[str, Any]:
    path = job["journal"]
    a = await ctx.step(work, path, "a", "", name="a")
    b = await ctx.step(work_sync, path, "b", a["chain"], name="b")
    await ctx.sleep(SLEEP_SECONDS)
    c = await ctx.step(work, path, "c", b["chain"], name="c")
    go = await ctx.wait_for_event(EVENT, timeout=60)
    d = await ctx.step(work, path, "d", f"{c['chain']}>{EVENT}", name="d")
    return {"chain": d["chain"], EVENT: go, "steps": {s["step"]: s for s in (a, b, c, d)}}


async def start(url: str, prefix: str, run_id: str, journal: str, lease_ms: int) -> None:
    store = RedisStore.from_url(url, prefix=prefix, check_durability=False)
    try:
        async with Engine(store, lease_ms=lease_ms) as engine:
            await engine.start(durable, {"journal": journal}, run_id=run_id)
            record = await engine.wait(run_id, timeout=60)
        print(record.model_dump_json())
    finally:
        await store.aclose()


if __name__ == "__main__":
    main(sys.argv[1:], start, lease_ms=LEASE_MS, usage=__doc__)
