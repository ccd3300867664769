"""The README's examples and the examples/ programs run as documented."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import stepflow
from stepflow import registry

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _python_blocks() -> list[str]:
    return [b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "anyio.run" in b]


def _printed_literals(block: str) -> list[str]:
    """What ``print(...)  # <literal>`` lines of a block say they print."""
    shown = []
    for comment in re.findall(r"^\s*print\(.*\)\s*#\s*(.+)$", block, re.M):
        try:
            shown.append(str(ast.literal_eval(comment)))
        except (ValueError, SyntaxError):
            continue  # prose, not the printed value
    return shown


@pytest.mark.parametrize(
    "block", _python_blocks(), ids=[f"block{i}" for i in range(len(_python_blocks()))]
)
def test_readme_example_runs(block: str, capsys: pytest.CaptureFixture[str]) -> None:
    namespace: dict[str, object] = {"__name__": "readme_example"}
    try:
        exec(compile(block, "README.md", "exec"), namespace)
    finally:
        for value in namespace.values():
            if isinstance(value, stepflow.Workflow):
                registry.unregister(value.name)
    printed = capsys.readouterr().out.splitlines()
    for shown in _printed_literals(block):
        assert shown in printed, f"README says it prints {shown!r}; it printed {printed}"


def test_readme_opens_with_the_two_setup_commands() -> None:
    first_block = re.search(r"```sh\n(.*?)```", README, re.S)
    assert first_block is not None
    demo, tests = first_block.group(1).strip().splitlines()
    assert demo.endswith("stepflow demo")
    assert tests.endswith("python -m pytest")
    ci_commands = [
        line for line in (ROOT / ".ci" / "run").read_text().splitlines() if not line.startswith("#")
    ]
    assert tests in ci_commands


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
        check=False,
    )


def test_demo_command_runs_the_pipeline_live() -> None:
    result = _run("-m", "stepflow.cli", "demo")
    assert result.returncode == 0, result.stderr
    assert "✓ index" in result.stdout
    assert "completed" in result.stdout.splitlines()[-2]


def test_research_agent_example_runs_offline() -> None:
    result = _run("examples/research_agent.py")
    assert result.returncode == 0, result.stderr
    assert "completed" in result.stdout
    assert "answer:" in result.stdout


def test_durable_agent_example_runs_its_two_tasks() -> None:
    result = _run("examples/durable_agent.py")
    assert result.returncode == 0, result.stderr
    assert "completed, execution 2" in result.stdout
    assert "execution 1: continued_as_new" in result.stdout


def test_research_agent_example_runs_on_redis(redis_url: str) -> None:
    result = _run("examples/research_agent_redis.py", redis_url, PYTHONPATH="examples")
    assert result.returncode == 0, result.stderr
    assert "summarise   completed" in result.stdout


def test_public_names_are_exported_and_sorted() -> None:
    assert stepflow.__all__ == sorted(stepflow.__all__)
    for name in stepflow.__all__:
        assert hasattr(stepflow, name), name
    for name in ("Workflow", "Engine", "StepContext", "MemoryStore", "RedisStore", "RunRecord"):
        assert name in stepflow.__all__
