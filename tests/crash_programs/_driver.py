"""What the crash programs share: resuming a run by id and their command line.

Each program runs as its own process (``python <program> start|resume ...``)
so the tests can SIGKILL it; the resume half is the same for every workflow.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

from stepflow import Engine, RedisStore

Start = Callable[[str, str, str, str, int], Awaitable[None]]


async def resume(url: str, prefix: str, run_id: str, lease_ms: int) -> None:
    """A fresh process resumes the run by id and prints its final record as JSON."""
    store = RedisStore.from_url(url, prefix=prefix, check_durability=False)
    try:
        async with Engine(store, lease_ms=lease_ms) as engine:
            await engine.resume(run_id)
            record = await engine.wait(run_id, timeout=60)
        print(record.model_dump_json())
    finally:
        await store.aclose()


def main(argv: list[str], start: Start, *, lease_ms: int, usage: str | None) -> None:
    """``start URL PREFIX RUN_ID JOURNAL [LEASE_MS]`` or ``resume URL PREFIX RUN_ID [LEASE_MS]``."""
    mode, *args = argv or [""]
    fixed = {"start": 4, "resume": 3}.get(mode)
    if fixed is None or len(args) not in (fixed, fixed + 1):
        raise SystemExit(usage)
    lease = int(args[fixed]) if len(args) > fixed else lease_ms
    if mode == "start":
        anyio.run(start, *args[:fixed], lease)
    else:
        anyio.run(resume, *args[:fixed], lease)
