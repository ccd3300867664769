"""What the SIGKILL crash tests share: journals, killing a child, running many iterations."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import anyio
from anyio.abc import Process

from stepflow import RedisStore, RunRecord

T = TypeVar("T")


def read_text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def last_record(stdout: str) -> RunRecord:
    """The run record a crash program prints as its last line when it finishes."""
    return RunRecord.model_validate_json(stdout.strip().splitlines()[-1])


def read_journal(path: Path) -> list[tuple[str, int]]:
    """The ``<step> <pid>`` lines a crash program wrote before running each step."""
    entries = []
    for line in read_text(path).splitlines():
        step, pid = line.split()
        entries.append((step, int(pid)))
    return entries


async def kill(process: Process) -> int | None:
    """SIGKILL the child (unless it already exited) and return its exit code.

    Not ``process.kill()``: ``Popen.send_signal`` polls first, which reaps a child
    that just exited on its own, and asyncio's child watcher then reports exit
    code 255 instead of the real one.
    """
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
    await process.wait()
    return process.returncode


async def run_iterations(
    items: Sequence[T], iteration: Callable[[T], Awaitable[None]], *, parallel: int
) -> None:
    """Run ``iteration`` for every item, ``parallel`` at a time; raise every failure together.

    Failures are collected rather than cancelling the rest, so one run shows
    the story of every failing seed, not only the first.
    """
    limiter = anyio.CapacityLimiter(parallel)
    failures: list[Exception] = []

    async def one(item: T) -> None:
        async with limiter:
            try:
                await iteration(item)
            except Exception as exc:
                failures.append(exc)

    async with anyio.create_task_group() as tg:
        for item in items:
            tg.start_soon(one, item)
    if failures:
        raise ExceptionGroup(f"{len(failures)} of {len(items)} iterations failed", failures)


async def run_against_redis(
    url: str,
    prefix: str,
    tmp: Path,
    items: Sequence[T],
    iteration: Callable[[RedisStore, str, str, Path, T], Awaitable[object]],
    *,
    parallel: int,
) -> None:
    """`run_iterations` with one store on ``url``/``prefix`` for all of them, closed after."""
    store = RedisStore.from_url(url, prefix=prefix, check_durability=False)

    async def one(item: T) -> None:
        await iteration(store, url, prefix, tmp, item)

    try:
        await run_iterations(items, one, parallel=parallel)
    finally:
        await store.aclose()
