"""An agent loop as a durable workflow: tool calls, a human approval, continue-as-new.

The "model" picks the next tool from what it has seen so far, so the steps
are not known in advance; every tool call goes through ``ctx.step`` and is
recorded. The loop asks a human to approve before acting, and an eternal
variant continues as new after each task so its history stays small.

``python examples/durable_agent.py`` runs it on the in-memory store; the
comments show where a crash could happen and what a resume would do.
"""

from __future__ import annotations

import anyio

import stepflow

TOOLS = {
    "search": lambda topic: f"3 articles about {topic}",
    "summarise": lambda notes: f"summary of {notes}",
}


def choose_tool(seen: list[str]) -> str | None:
    """A deterministic stand-in for an LLM deciding the next tool call."""
    plan = ["search", "summarise"]
    return plan[len(seen)] if len(seen) < len(plan) else None


def call_tool(tool: str, argument: str) -> str:
    return TOOLS[tool](argument)


@stepflow.workflow("durable-agent", auto_prune=stepflow.PruneOptions(keep_last=2))
async def agent(ctx: stepflow.WorkflowContext, task: dict[str, object]) -> dict[str, object]:
    seen: list[str] = []
    while (tool := choose_tool(seen)) is not None:
        # Recorded: after a crash the result is replayed, the tool is not called again.
        seen.append(await ctx.step(call_tool, tool, seen[-1] if seen else str(task["topic"])))
    ctx.logger.info("waiting for approval of %s", seen[-1])
    # Kept in the history while the run waits, for hours if need be.
    approval = await ctx.wait_for_event("approval", timeout=3600)
    if task["remaining"]:
        # Next task in a fresh execution; old executions beyond 2 are pruned.
        ctx.continue_as_new({"topic": task["remaining"][0], "remaining": task["remaining"][1:]})
    return {"last": seen[-1], "approved_by": approval["by"], "finished_at": ctx.now()}


async def main() -> None:
    store = stepflow.MemoryStore()
    async with stepflow.Engine(store) as engine:
        run_id = await engine.start(agent, {"topic": "durability", "remaining": ["leases"]})
        for _ in range(2):  # one approval per task
            await engine.raise_event(run_id, "approval", {"by": "reviewer"})
        run = await engine.wait(run_id, timeout=30)
    print(f"run {run_id}: {run.status}, execution {run.current_execution_id}")
    print("output:", run.output)
    for execution in await store.list_executions(run_id):
        print(
            f"  execution {execution.execution_id}: {execution.status}, "
            f"{execution.event_count} events"
        )


if __name__ == "__main__":
    anyio.run(main)
