"""The benchmark scripts still run end to end (small sizes) and write their JSON.

Their figures are not asserted (speed is measured, never tested); this only
keeps the scripts from rotting between the sessions that run them in full.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import need_real_redis

import stepflow

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.redis]


@pytest.mark.parametrize(
    ("script", "options"),
    [
        # --profile and --pairs too: their code runs only when asked for.
        ("bench_engine.py", ["--quick", "--profile", "--profile-runs", "5", "--pairs", "1"]),
        ("bench_eternal.py", ["--continues", "100", "--sample-every", "50"]),
        ("bench_admin.py", ["--runs", "500", "--repeat", "5"]),
    ],
)
def test_benchmark_runs_and_writes_its_results(
    script: str, options: list[str], tmp_path: Path
) -> None:
    if shutil.which("redis-server") is None:
        need_real_redis("redis-server is not on PATH")  # each script starts its own
    output = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *options, "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    document = json.loads(output.read_text())
    assert document["meta"]["stepflow"] == stepflow.__version__
    assert document["results"]
