"""Child program for ``tests/test_crash_durable.py``: a human-in-the-loop durable run.

Usage::

    python hitl.py start  REDIS_URL PREFIX RUN_ID JOURNAL [LEASE_MS]
    python hitl.py resume REDIS_URL PREFIX RUN_ID [LEASE_MS]

``start`` creates run ``RUN_ID`` and drives it in this process until the
test SIGKILLs it (the run waits for an approval that only comes later).
``resume`` continues the stored run by id in a fresh process: it prints
``resumed`` on stdout once the engine has taken the run, waits for it to
finish and prints the final ``RunRecord`` as JSON on the last line.

The workflow: ``charge`` (a side effect: appends ``"charge <pid>"`` to the
journal and fsyncs it), then ``ctx.wait_for_event("approval")``, then
``ship`` (appends ``"ship <pid>"``). The journal path is in the run input.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import anyio

import stepflow
from stepflow import Engine, RedisStore

LEASE_MS = 300


def journal(path: str, what: str) -> str:
    """The side effect: one O_APPEND write, fsynced, so a SIGKILL right after keeps it."""
    line = f"{what} {os.getpid()}"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return line


async def charge(path: str, amount: int) -> dict[str, Any]:
    return {"line": journal(path, "charge"), "amount": amount}


async def ship(path: str, approval: Any) -> dict[str, Any]:
    return {"line": journal(path, "ship"), "approved_by": approval["by"]}


@stepflow.workflow("crash-test-hitl")
async def hitl(ctx: stepflow.WorkflowContext, order: dict[str, Any]) -> dict[str, Any]:
    charged = await ctx.step(charge, order["journal"], order["amount"])
    approval = await ctx.wait_for_event("approval")
    shipped = await ctx.step(ship, order["journal"], approval)
    return {"charged": charged, "approval": approval, "shipped": shipped}


async def start(url: str, prefix: str, run_id: str, path: str, lease_ms: int) -> None:
    store = RedisStore.from_url(url, prefix=prefix, check_durability=False)
    try:
        async with Engine(store, lease_ms=lease_ms) as engine:
            await engine.start(hitl, {"journal": path, "amount": 42}, run_id=run_id)
            record = await engine.wait(run_id, timeout=60)
        print(record.model_dump_json())
    finally:
        await store.aclose()


async def resume(url: str, prefix: str, run_id: str, lease_ms: int) -> None:
    store = RedisStore.from_url(url, prefix=prefix, check_durability=False)
    try:
        async with Engine(store, lease_ms=lease_ms) as engine:
            await engine.resume(run_id)
            print("resumed", flush=True)
            record = await engine.wait(run_id, timeout=60)
        print(record.model_dump_json(), flush=True)
    finally:
        await store.aclose()


def main(argv: list[str]) -> None:
    mode, *args = argv or [""]
    fixed = {"start": 4, "resume": 3}.get(mode)
    if fixed is None or len(args) not in (fixed, fixed + 1):
        raise SystemExit(__doc__)
    lease_ms = int(args[fixed]) if len(args) > fixed else LEASE_MS
    anyio.run(start if mode == "start" else resume, *args[:fixed], lease_ms)


if __name__ == "__main__":
    main(sys.argv[1:])
