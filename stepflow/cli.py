"""The ``stepflow`` command: a demo, and a look into stored runs.

The store comes from ``--redis URL`` or ``STEPFLOW_REDIS_URL``; ``demo``
runs on the in-memory store unless one is given. Tables are for people,
``--json`` for scripts. Errors exit non-zero with a one-line reason.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import anyio
import orjson
from pydantic import BaseModel
from redis.exceptions import RedisError

from stepflow.demo import run_demo
from stepflow.errors import RunNotFoundError, StepflowError
from stepflow.models import RunRecord
from stepflow.store.base import WorkflowStore
from stepflow.store.memory import MemoryStore
from stepflow.store.redis import RedisStore

_ENV_URL = "STEPFLOW_REDIS_URL"


def _store(args: argparse.Namespace, *, memory_default: bool = False) -> WorkflowStore:
    url = args.redis or os.environ.get(_ENV_URL)
    if url:
        return RedisStore.from_url(url, prefix=args.prefix, check_durability=False)
    if memory_default:
        return MemoryStore()
    raise StepflowError(f"no store given: pass --redis URL or set {_ENV_URL}")


def _time(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _print_json(value: Any) -> None:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    elif isinstance(value, list):
        value = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print(line.rstrip())


async def _demo(args: argparse.Namespace) -> int:
    store = _store(args, memory_default=True)
    try:
        record = await run_demo(store)
    finally:
        await store.aclose()
    return 0 if record.status == "completed" else 1


async def _runs(args: argparse.Namespace, store: WorkflowStore) -> None:
    if args.status:
        runs = await store.list_runs_by_status(args.status, limit=args.limit, offset=args.offset)
    else:
        runs = await store.list_runs(limit=args.limit, offset=args.offset)
    if args.json:
        _print_json([r.model_dump(mode="json", exclude={"context"}) for r in runs])
        return
    _table(
        ["RUN", "WORKFLOW", "STATUS", "EXEC", "CREATED", "PARENT"],
        [
            [
                r.run_id,
                r.workflow,
                r.status,
                r.current_execution_id,
                _time(r.created_at),
                r.parent_run_id or "-",
            ]
            for r in runs
        ],
    )


async def _existing(store: WorkflowStore, run_id: str) -> RunRecord:
    record = await store.get_run(run_id)
    if record is None:
        raise RunNotFoundError(run_id)
    return record


async def _show(args: argparse.Namespace, store: WorkflowStore) -> None:
    record = await _existing(store, args.run_id)
    steps = await store.list_steps(args.run_id)
    if args.json:
        _print_json(
            {**record.model_dump(mode="json"), "steps": [s.model_dump(mode="json") for s in steps]}
        )
        return
    for label, value in [
        ("run", record.run_id),
        ("workflow", f"{record.workflow} (version {record.version})"),
        ("status", record.status),
        ("execution", record.current_execution_id),
        ("created", _time(record.created_at)),
        ("completed", _time(record.completed_at)),
        ("parent", record.parent_run_id or "-"),
        ("output", orjson.dumps(record.output).decode()),
        ("error", orjson.dumps(record.error).decode() if record.error else "-"),
        ("context", ", ".join(sorted(record.context)) or "-"),
    ]:
        print(f"{label:<10} {value}")
    if steps:
        print()
        _table(
            ["STEP", "STATUS", "ATTEMPT", "WORKER"],
            [[s.step_id, s.status, s.attempt, s.worker_id or "-"] for s in steps],
        )


async def _history(args: argparse.Namespace, store: WorkflowStore) -> None:
    events = await store.read_history(args.run_id, args.execution)
    if args.json:
        _print_json(events)
        return
    _table(
        ["ID", "TIME", "KIND", "PAYLOAD"],
        [
            [e.event_id, _time(e.timestamp), e.kind, orjson.dumps(e.payload).decode()[:80]]
            for e in events
        ],
    )


def _with_store(
    command: Callable[[argparse.Namespace, WorkflowStore], Awaitable[None]],
) -> Callable[[argparse.Namespace], Awaitable[int]]:
    async def run(args: argparse.Namespace) -> int:
        store = _store(args)
        try:
            await command(args, store)
        finally:
            await store.aclose()
        return 0

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepflow", description=__doc__.splitlines()[0])
    parser.add_argument("--redis", help=f"Redis URL (default: ${_ENV_URL})")
    parser.add_argument("--prefix", default="stepflow", help="key prefix (namespace)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("demo", help="run a demo pipeline, showing each step live").set_defaults(
        handler=_demo
    )

    runs = sub.add_parser("runs", help="list runs, newest first")
    runs.add_argument("--status", help="only runs in this status (any case)")
    runs.add_argument("--limit", type=int, default=50)
    runs.add_argument("--offset", type=int, default=0)
    runs.set_defaults(handler=_with_store(_runs))

    show = sub.add_parser("show", help="one run with its steps")
    show.add_argument("run_id")
    show.set_defaults(handler=_with_store(_show))

    history = sub.add_parser("history", help="the history of one execution of a run")
    history.add_argument("run_id")
    history.add_argument("--execution", type=int, default=None, help="default: the current one")
    history.set_defaults(handler=_with_store(_history))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], Awaitable[int]] = args.handler
    try:
        return anyio.run(handler, args)
    except StepflowError as exc:
        print(f"stepflow: error: {exc}", file=sys.stderr)
        return 1
    except (OSError, RedisError) as exc:
        print(f"stepflow: error: cannot reach the store: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
