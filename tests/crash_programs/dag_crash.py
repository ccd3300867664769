"""Child program for ``tests/test_crash_dag.py``: a DAG run that a test kills and resumes.

Usage::

    python dag_crash.py start  REDIS_URL PREFIX RUN_ID JOURNAL [LEASE_MS]
    python dag_crash.py resume REDIS_URL PREFIX RUN_ID [LEASE_MS]

``start`` creates run ``RUN_ID`` and runs it in this process (the test
SIGKILLs it part way). ``resume`` continues the stored run by id in a fresh
process, waits for it to finish and prints the final ``RunRecord`` as JSON
on stdout. ``LEASE_MS`` (default 300) is the engine's step lease: the
resuming process waits out the killed one's lease before it re-runs the
step that was in flight, so the start process wants a short one.

The workflow is ``a -> b -> (c1, c2, c3) -> d``: a chain plus a fan-out and
fan-in. The first thing each step body does is append ``"<step> <pid>"`` to
the journal (the path is in the run input) and fsync it, so the journal
lists every time a step body *ran*, whatever happens to the process right
after. Then it sleeps 20-80 ms, standing in for real work, and returns a
mapping that the engine merges into the context bag. Fan-out steps are a mix
of async and sync (thread) steps, so both paths are killed mid-flight.
"""

from __future__ import annotations

import os
import random
import sys
import time
from typing import Any

import anyio
from _driver import main

from stepflow import Engine, RedisStore, StepContext, Workflow

LEASE_MS = 300
"""Default lease: short, so the resuming process takes over a killed step quickly."""

flow = Workflow("crash-test-dag")


def _ran(ctx: StepContext) -> float:
    """Journal that this step's body ran; return how long the 'work' takes."""
    line = f"{ctx.step_id} {os.getpid()}\n".encode()
    fd = os.open(ctx.input["journal"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # one O_APPEND write: lines of concurrent steps never interleave
        os.fsync(fd)
    finally:
        os.close(fd)
    return random.uniform(0.02, 0.08)


def _result(ctx: StepContext) -> dict[str, Any]:
    return {f"{ctx.step_id}_pid": os.getpid(), f"{ctx.step_id}_attempt": ctx.attempt}


@flow.step()
async def a(ctx: StepContext) -> dict[str, Any]:
    await anyio.sleep(_ran(ctx))
    return _result(ctx)


@flow.step(after=[a])
async def b(ctx: StepContext) -> dict[str, Any]:
    await anyio.sleep(_ran(ctx))
    return {**_result(ctx), "b_saw_a": "a_pid" in ctx.context}


@flow.step(after=[b])
async def c1(ctx: StepContext) -> dict[str, Any]:
    await anyio.sleep(_ran(ctx))
    return _result(ctx)


@flow.step(after=[b])
def c2(ctx: StepContext) -> dict[str, Any]:
    time.sleep(_ran(ctx))
    return _result(ctx)


@flow.step(after=[b])
async def c3(ctx: StepContext) -> dict[str, Any]:
    await anyio.sleep(_ran(ctx))
    return _result(ctx)


@flow.step(after=[c1, c2, c3])
async def d(ctx: StepContext) -> dict[str, Any]:
    await anyio.sleep(_ran(ctx))
    return {**_result(ctx), "d_saw": sorted(k for k in ctx.context if k.endswith("_pid"))}


async def start(url: str, prefix: str, run_id: str, journal: str, lease_ms: int) -> None:
    store = RedisStore.from_url(url, prefix=prefix, check_durability=False)
    try:
        record = await Engine(store, lease_ms=lease_ms).run(
            flow, {"journal": journal}, run_id=run_id
        )
        print(record.model_dump_json())
    finally:
        await store.aclose()


if __name__ == "__main__":
    main(sys.argv[1:], start, lease_ms=LEASE_MS, usage=__doc__)
