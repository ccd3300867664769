"""The research agent of ``research_agent.py``, on Redis.

``python examples/research_agent_redis.py [redis://localhost:6379/0]``. The
run's state survives this process: ``stepflow --redis URL show RUN_ID``
shows it afterwards, and a crashed run resumes with ``Engine.resume``.
"""

from __future__ import annotations

import sys

import anyio
from research_agent import main

import stepflow


async def run_on_redis(url: str) -> None:
    async with stepflow.RedisStore.from_url(url, prefix="stepflow-example") as store:
        await main(store)


if __name__ == "__main__":
    anyio.run(run_on_redis, sys.argv[1] if len(sys.argv) > 1 else "redis://localhost:6379/0")
