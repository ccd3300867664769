"""The ``stepflow`` command: a demo, and the management of stored runs.

The store comes from ``--redis URL`` or ``STEPFLOW_REDIS_URL``; ``demo``
runs on the in-memory store unless one is given. Every other command goes
through `stepflow.Admin`. Tables are for people, ``--json`` for scripts
(``--redis``, ``--prefix`` and ``--json`` go before or after the command).
Exit status: 0 on success, 1 with a one-line reason on stderr when the
command fails (unknown run, refused delete, unreachable store...), 2 for
bad usage.
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

from stepflow.admin import Admin
from stepflow.demo import run_demo
from stepflow.errors import StepflowError
from stepflow.models import DeleteResult, InstanceFilter, InstanceTree, PruneOptions
from stepflow.store.memory import MemoryStore
from stepflow.store.redis import RedisStore

_ENV_URL = "STEPFLOW_REDIS_URL"

Command = Callable[[argparse.Namespace, Admin], Awaitable[None]]


def _store(args: argparse.Namespace, *, memory_default: bool = False) -> MemoryStore | RedisStore:
    url = args.redis or os.environ.get(_ENV_URL)
    if url:
        return RedisStore.from_url(url, prefix=args.prefix, check_durability=False)
    if memory_default:
        return MemoryStore()
    raise StepflowError(f"no store given: pass --redis URL or set {_ENV_URL}")


# -- output ---------------------------------------------------------------------------


def _time(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _json_text(value: Any, width: int | None = None) -> str:
    text = orjson.dumps(value).decode()
    return text if width is None or len(text) <= width else text[: width - 1] + "…"


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


def _fields(pairs: Sequence[tuple[str, object]]) -> None:
    width = max(len(label) for label, _ in pairs)
    for label, value in pairs:
        print(f"{label:<{width}}  {value}")


# -- commands -------------------------------------------------------------------------


async def _demo(args: argparse.Namespace) -> int:
    async with _store(args, memory_default=True) as store:
        record = await run_demo(store)
    return 0 if record.status == "completed" else 1


async def _runs(args: argparse.Namespace, admin: Admin) -> None:
    infos = await admin.list_instance_infos(
        status=args.status, limit=args.limit, offset=args.offset
    )
    if args.json:
        _print_json(infos)
        return
    _table(
        ["RUN", "WORKFLOW", "STATUS", "EXEC", "CREATED", "COMPLETED", "PARENT"],
        [
            [
                i.instance_id,
                i.workflow,
                i.status,
                i.current_execution_id,
                _time(i.created_at),
                _time(i.completed_at),
                i.parent_id or "-",
            ]
            for i in infos
        ],
    )


async def _show(args: argparse.Namespace, admin: Admin) -> None:
    info = await admin.get_instance_info(args.run_id)
    executions = await admin.list_execution_infos(args.run_id)
    steps = await admin.list_steps(args.run_id)
    children = await admin.list_children(args.run_id)
    if args.json:
        _print_json(
            {
                **info.model_dump(mode="json"),
                "children": children,
                "executions": [x.model_dump(mode="json") for x in executions],
                "steps": [s.model_dump(mode="json") for s in steps],
            }
        )
        return
    _fields(
        [
            ("run", info.instance_id),
            ("workflow", f"{info.workflow} (version {info.version})"),
            ("status", info.status),
            ("execution", info.current_execution_id),
            ("created", _time(info.created_at)),
            ("updated", _time(info.updated_at)),
            ("completed", _time(info.completed_at)),
            ("parent", info.parent_id or "-"),
            ("children", ", ".join(children) or "-"),
            ("output", _json_text(info.output, 200)),
            ("error", _json_text(info.error, 200) if info.error is not None else "-"),
        ]
    )
    print()
    _table(
        ["EXEC", "STATUS", "STARTED", "COMPLETED", "EVENTS"],
        [
            [x.execution_id, x.status, _time(x.started_at), _time(x.completed_at), x.event_count]
            for x in executions
        ],
    )
    if steps:
        print()
        _table(
            ["STEP", "STATUS", "ATTEMPT", "EXEC", "WORKER"],
            [[s.step_id, s.status, s.attempt, s.execution_id, s.worker_id or "-"] for s in steps],
        )


async def _history(args: argparse.Namespace, admin: Admin) -> None:
    events = await admin.read_history(args.run_id, args.execution)
    if args.json:
        _print_json(events)
        return
    _table(
        ["ID", "TIME", "KIND", "PAYLOAD"],
        [[e.event_id, _time(e.timestamp), e.kind, _json_text(e.payload, 80)] for e in events],
    )


async def _tree(args: argparse.Namespace, admin: Admin) -> None:
    tree = await admin.get_instance_tree(args.run_id)
    if args.json:
        _print_json(tree)
        return
    lines: list[tuple[str, str]] = []

    async def walk(node: InstanceTree, prefix: str, branch: str) -> None:
        status = (await admin.get_instance_info(node.instance_id)).status
        lines.append((f"{prefix}{branch}{node.instance_id}", status))
        inner = prefix + ("" if not branch else "    " if branch == "└── " else "│   ")
        for i, child in enumerate(node.children):
            await walk(child, inner, "└── " if i == len(node.children) - 1 else "├── ")

    await walk(tree, "", "")
    _fields(lines)


def _report(args: argparse.Namespace, result: BaseModel, summary: str) -> None:
    """``result`` as JSON with ``--json``, else the one-line ``summary``."""
    if args.json:
        _print_json(result)
    else:
        print(summary)


def _print_deleted(args: argparse.Namespace, result: DeleteResult) -> None:
    summary = (
        f"deleted {result.instances_deleted} runs, {result.executions_deleted} executions, "
        f"{result.events_deleted} events, {result.queue_messages_deleted} queue messages"
    )
    _report(args, result, summary)


async def _delete(args: argparse.Namespace, admin: Admin) -> None:
    _print_deleted(args, await admin.delete_instance(args.run_id, force=args.force))


async def _delete_bulk(args: argparse.Namespace, admin: Admin) -> None:
    selection = InstanceFilter(
        instance_ids=args.ids, completed_before=args.completed_before, limit=args.limit
    )
    _print_deleted(args, await admin.delete_instance_bulk(selection))


async def _prune(args: argparse.Namespace, admin: Admin) -> None:
    options = PruneOptions(keep_last=args.keep_last, completed_before=args.completed_before)
    result = await admin.prune_executions(args.run_id, options)
    summary = (
        f"pruned {result.executions_deleted} executions, {result.events_deleted} events "
        f"({result.instances_processed} run processed)"
    )
    _report(args, result, summary)


async def _metrics(args: argparse.Namespace, admin: Admin) -> None:
    metrics = await admin.get_system_metrics()
    if args.json:
        _print_json(metrics)
        return
    _fields([(name.replace("_", " "), value) for name, value in metrics.model_dump().items()])


async def _queues(args: argparse.Namespace, admin: Admin) -> None:
    depths = await admin.get_queue_depths()
    if args.json:
        _print_json(depths)
        return
    _table(["QUEUE", "READY"], list(depths.model_dump().items()))


def _with_admin(command: Command) -> Callable[[argparse.Namespace], Awaitable[int]]:
    async def run(args: argparse.Namespace) -> int:
        async with _store(args) as store:
            await command(args, Admin(store))
        return 0

    return run


# -- parser -----------------------------------------------------------------------------


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {value}")
    return value


def _common(defaults: bool) -> argparse.ArgumentParser:
    """Options accepted before and after the command (the command's copy never overrides)."""
    parser = argparse.ArgumentParser(add_help=False)
    default: Any = None if defaults else argparse.SUPPRESS
    flag_default: Any = False if defaults else argparse.SUPPRESS
    parser.add_argument("--redis", default=default, help=f"Redis URL (default: ${_ENV_URL})")
    parser.add_argument("--prefix", default=default, help="key prefix (default: stepflow)")
    parser.add_argument(
        "--json", action="store_true", default=flag_default, help="machine-readable output"
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stepflow", description=__doc__.splitlines()[0], parents=[_common(True)]
    )
    parser.set_defaults(prefix="stepflow")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common(False)

    def command(name: str, summary: str, handler: Command) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=summary, description=summary, parents=[common])
        cmd.set_defaults(handler=_with_admin(handler))
        return cmd

    demo_help = "run a demo pipeline, showing each step live"
    demo = sub.add_parser("demo", help=demo_help, description=demo_help, parents=[common])
    demo.set_defaults(handler=_demo)

    runs = command("runs", "list runs, newest first", _runs)
    runs.add_argument("--status", help="only runs in this status (any case)")
    runs.add_argument("--limit", type=_count, default=50, help="page size (default 50)")
    runs.add_argument("--offset", type=_count, default=0, help="runs to skip")

    show = command("show", "one run: summary, executions, steps", _show)
    show.add_argument("run_id", metavar="ID")

    history = command("history", "the history of one execution of a run", _history)
    history.add_argument("run_id", metavar="ID")
    history.add_argument("--execution", type=int, default=None, help="default: the current one")

    tree = command("tree", "a run and all its descendants", _tree)
    tree.add_argument("run_id", metavar="ID")

    delete = command("delete", "delete a root run and its whole tree (all or nothing)", _delete)
    delete.add_argument("run_id", metavar="ID")
    delete.add_argument("--force", action="store_true", help="also when a run has not finished")

    bulk = command("delete-bulk", "delete finished root runs (with their trees)", _delete_bulk)
    bulk.add_argument("--id", dest="ids", action="append", metavar="ID", help="only these runs")
    bulk.add_argument("--completed-before", type=int, metavar="MS", help="finished before (ms)")
    bulk.add_argument("--limit", type=_count, help="at most this many roots, oldest first")

    prune = command("prune", "delete old finished executions of a run", _prune)
    prune.add_argument("run_id", metavar="ID")
    prune.add_argument(
        "--keep-last",
        type=_count,
        required=True,
        metavar="N",
        help="executions to keep, the current one included (0 and 1: only the current)",
    )
    prune.add_argument(
        "--completed-before", type=int, metavar="MS", help="only executions that ended before (ms)"
    )

    command("metrics", "counts of runs, executions and events", _metrics)
    command("queues", "ready work per queue", _queues)
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
    except ValueError as exc:  # e.g. a key prefix that cannot be used
        print(f"stepflow: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
