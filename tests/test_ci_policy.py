"""Without a redis-server, real-Redis tests skip locally and fail under CI=true."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REAL_REDIS_TESTS = (
    "tests/test_store_redis.py::test_delete_leaves_only_a_short_lived_tomb",  # shared server
    "tests/test_store_redis.py::test_from_url_with_a_password",  # a server of its own
)


def _pytest_without_redis_server(ci: str, test: str) -> subprocess.CompletedProcess[str]:
    python_dir = str(Path(sys.executable).parent)  # no redis-server here
    env = {**os.environ, "PATH": python_dir, "CI": ci}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.skipif(
    (Path(sys.executable).parent / "redis-server").exists(), reason="redis-server beside python"
)
@pytest.mark.parametrize("test", REAL_REDIS_TESTS)
def test_missing_redis_fails_under_ci_and_skips_locally(test: str) -> None:
    under_ci = _pytest_without_redis_server("true", test)
    assert under_ci.returncode != 0, under_ci.stdout
    assert "real Redis required under CI" in under_ci.stdout
    locally = _pytest_without_redis_server("", test)
    assert locally.returncode == 0, locally.stdout
    assert "skipped" in locally.stdout
