"""What every benchmark records about where it ran, and how it writes its results."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import redis

import stepflow


def environment(redis_version: str, **settings: Any) -> dict[str, Any]:
    """The ``meta`` block of a results file: versions, machine, the run's settings, time."""
    return {
        "stepflow": stepflow.__version__,
        "python": platform.python_version(),
        "redis_py": redis.__version__,
        "redis_server": redis_version,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        **settings,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def versions_line(meta: dict[str, Any]) -> str:
    """``stepflow X, Python Y, redis-py Z, Redis W`` for a table's heading."""
    return (
        f"stepflow {meta['stepflow']}, Python {meta['python']}, "
        f"redis-py {meta['redis_py']}, Redis {meta['redis_server']}"
    )


def write_results(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
