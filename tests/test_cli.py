"""The ``stepflow`` command, run for real in a subprocess against a real ``redis-server``.

Each test seeds runs with a `RedisStore` under its own key prefix, then runs
``python -m stepflow.cli`` and checks the table output, that ``--json``
parses, the exit status and the one-line reason on errors.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from conftest import free_port
from test_admin import make_run, tree_of_three_levels

from stepflow import Admin, RedisStore, RunStatus
from stepflow.models import now_ms

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr

    def json(self) -> Any:
        assert self.returncode == 0, self.stderr
        return orjson.loads(self.stdout)

    @property
    def lines(self) -> list[str]:
        return self.stdout.splitlines()


@pytest.fixture
async def store(redis_url: str, key_prefix: str) -> AsyncIterator[RedisStore]:
    instance = RedisStore.from_url(redis_url, prefix=key_prefix, check_durability=False)
    yield instance
    await instance.aclose()


@pytest.fixture
def cli(redis_url: str, key_prefix: str) -> Any:
    async def run(*args: str, env: dict[str, str] | None = None, store: bool = True) -> Result:
        environment = {k: v for k, v in os.environ.items() if k != "STEPFLOW_REDIS_URL"}
        environment.update(env or {})
        where = ["--redis", redis_url, "--prefix", key_prefix] if store else []
        with anyio.fail_after(60):
            done = await anyio.run_process(
                [sys.executable, "-m", "stepflow.cli", *where, *args],
                cwd=ROOT,
                env=environment,
                check=False,
            )
        return Result(done.returncode, done.stdout.decode(), done.stderr.decode())

    return run


def assert_one_line_error(result: Result, *fragments: str) -> None:
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("stepflow: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


async def test_runs_lists_newest_first_with_status_filter_and_pages(
    store: RedisStore, cli: Any
) -> None:
    for i in range(4):
        await make_run(store, f"run-{i}", created_at=1_000 + i)
    await make_run(store, "broken", created_at=2_000, final=RunStatus.FAILED)

    table = await cli("runs")
    assert table.returncode == 0, table.stderr
    assert table.lines[0].split() == [
        "RUN", "WORKFLOW", "STATUS", "EXEC", "CREATED", "COMPLETED", "PARENT"
    ]  # fmt: skip
    assert [line.split()[0] for line in table.lines[1:]] == [
        "broken", "run-3", "run-2", "run-1", "run-0"
    ]  # fmt: skip
    assert table.lines[1].split()[2] == "failed"

    failed = await cli("runs", "--status", "FAILED")
    assert [line.split()[0] for line in failed.lines[1:]] == ["broken"]
    page = await cli("runs", "--status", "completed", "--limit", "2", "--offset", "1", "--json")
    assert [row["instance_id"] for row in page.json()] == ["run-2", "run-1"]
    assert page.json()[0]["status"] == "completed"
    empty = await cli("runs", "--offset", "10")
    assert empty.returncode == 0
    assert len(empty.lines) == 1  # the header alone
    assert empty.lines[0].split() == table.lines[0].split()


async def test_show_history_and_tree(store: RedisStore, cli: Any) -> None:
    await tree_of_three_levels(store)

    show = await cli("show", "c2")
    assert show.returncode == 0, show.stderr
    summary = show.stdout.split("\n\n")[0].splitlines()
    fields = dict(line.split(None, 1) for line in summary)
    assert (fields["status"], fields["parent"], fields["execution"]) == ("completed", "root", "3")
    assert any(line.split()[:2] == ["1", "continued_as_new"] for line in show.lines)
    detail = (await cli("show", "c1", "--json")).json()
    assert (detail["instance_id"], detail["children"]) == ("c1", ["g1", "g2"])
    assert [x["execution_id"] for x in detail["executions"]] == [1]

    history = await cli("history", "c2", "--execution", "1")
    assert [line.split()[3] for line in history.lines[1:]] == [
        "run_started", "step_completed", "continued_as_new"
    ]  # fmt: skip
    latest = (await cli("history", "c2", "--json")).json()
    assert [e["kind"] for e in latest] == ["run_started", "run_completed"]

    tree = await cli("tree", "root")
    assert [line.split()[-2:] for line in tree.lines] == [
        ["root", "completed"],
        ["c1", "completed"],
        ["g1", "completed"],
        ["g2", "completed"],
        ["c2", "completed"],
    ]
    assert tree.lines[2].startswith("│   ├── g1")
    assert tree.lines[4].startswith("└── c2")
    nested = (await cli("tree", "root", "--json")).json()
    assert [c["instance_id"] for c in nested["children"]] == ["c1", "c2"]


async def test_delete_refuses_sub_runs_and_running_trees_then_forces(
    store: RedisStore, cli: Any
) -> None:
    await tree_of_three_levels(store, final=RunStatus.RUNNING)

    assert_one_line_error(await cli("delete", "g1"), "sub-run", "'root'")
    assert_one_line_error(await cli("delete", "root"), "still running", "force")
    assert len((await cli("runs", "--json")).json()) == 5

    forced = await cli("delete", "root", "--force")
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.startswith("deleted 5 runs, 8 executions, ")
    assert (await cli("runs", "--json")).json() == []


async def test_delete_bulk_with_ids_limit_and_completed_before(store: RedisStore, cli: Any) -> None:
    await make_run(store, "old-1", created_at=1)
    await make_run(store, "old-2", created_at=2)
    await make_run(store, "busy", created_at=3, final=RunStatus.RUNNING)
    await anyio.sleep(0.01)
    cutoff = now_ms()
    await anyio.sleep(0.01)
    await make_run(store, "new", created_at=4)

    by_id = (await cli("delete-bulk", "--id", "busy", "--id", "old-1", "--json")).json()
    assert by_id["instances_deleted"] == 1
    none = (await cli("delete-bulk", "--completed-before", "1", "--json")).json()
    assert none["instances_deleted"] == 0
    aged = await cli("delete-bulk", "--completed-before", str(cutoff), "--limit", "5")
    assert aged.stdout.startswith("deleted 1 runs, 1 executions, 2 events, 0 queue messages")
    left = [row["instance_id"] for row in (await cli("runs", "--json")).json()]
    assert left == ["new", "busy"]


async def test_prune_metrics_and_queues(store: RedisStore, cli: Any) -> None:
    await make_run(store, "eternal", executions=4, context={"bag": 1})
    await make_run(store, "other", final=RunStatus.FAILED)

    pruned = await cli("prune", "eternal", "--keep-last", "2")
    assert pruned.returncode == 0, pruned.stderr
    assert pruned.stdout.startswith("pruned 2 executions, 6 events (1 run processed)")
    again = (await cli("prune", "eternal", "--keep-last", "0", "--json")).json()
    assert again == {"instances_processed": 1, "executions_deleted": 1, "events_deleted": 3}
    run = await store.get_run("eternal")
    assert run is not None
    assert run.context == {"bag": 1}

    expected = (await Admin(store).get_system_metrics()).model_dump()
    assert (await cli("metrics", "--json")).json() == expected
    table = (await cli("metrics")).lines
    assert "total instances      2" in table
    assert "failed instances     1" in table

    assert (await cli("queues", "--json")).json() == {"orchestrator": 0, "worker": 0, "timer": 0}
    assert [line.split() for line in (await cli("queues")).lines] == [
        ["QUEUE", "READY"], ["orchestrator", "0"], ["worker", "0"], ["timer", "0"]
    ]  # fmt: skip


@pytest.mark.parametrize(
    "command",
    [
        ["show", "ghost"],
        ["history", "ghost"],
        ["tree", "ghost"],
        ["delete", "ghost"],
        ["prune", "ghost", "--keep-last", "1"],
    ],
)
async def test_an_unknown_id_is_a_one_line_error(cli: Any, command: list[str]) -> None:
    assert_one_line_error(await cli(*command), "run 'ghost' not found")
    assert_one_line_error(await cli(*command, "--json"), "not found")


async def test_the_store_comes_from_the_environment(
    store: RedisStore, cli: Any, redis_url: str, key_prefix: str
) -> None:
    await make_run(store, "r1")
    via_env = await cli(
        "runs", "--prefix", key_prefix, "--json", env={"STEPFLOW_REDIS_URL": redis_url}, store=False
    )
    assert [row["instance_id"] for row in via_env.json()] == ["r1"]


async def test_without_a_store_or_with_an_unreachable_one_the_error_is_one_line(
    cli: Any,
) -> None:
    assert_one_line_error(await cli("metrics", store=False), "--redis URL", "STEPFLOW_REDIS_URL")
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    assert_one_line_error(await cli("--redis", nowhere, "runs", store=False), "cannot reach")
    assert_one_line_error(await cli("runs", "--status", "finished"), "unknown status")


async def test_bad_usage_exits_2(cli: Any) -> None:
    assert (await cli("prune", "r1")).returncode == 2  # --keep-last is required
    assert (await cli("runs", "--limit", "-1")).returncode == 2
    assert (await cli("frobnicate")).returncode == 2
