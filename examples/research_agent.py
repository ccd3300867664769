"""A research agent as a stepflow DAG: plan -> parallel tool calls -> summarise.

The "LLM" is a deterministic fake so the example runs offline and gives the
same answer every time; swap `FakeLLM` for a real client and nothing else
changes. Run it with ``python examples/research_agent.py``.
"""

from __future__ import annotations

import hashlib

import anyio

import stepflow

agent = stepflow.Workflow("research-agent", version="1")


class FakeLLM:
    """Answers from the prompt's hash: deterministic, offline, a little slow."""

    async def complete(self, prompt: str) -> str:
        await anyio.sleep(0.05)
        digest = hashlib.sha256(prompt.encode()).hexdigest()[:8]
        return f"[{digest}] {prompt.split(':', 1)[-1].strip()[:60]}"


llm = FakeLLM()
TOOLS = ("web_search", "wikipedia", "arxiv")


@agent.step()
async def plan(ctx: stepflow.StepContext) -> dict[str, object]:
    question = ctx.input["question"]
    queries = {tool: f"{tool} query for: {question}" for tool in TOOLS}
    return {"plan": await llm.complete(f"plan research: {question}"), "queries": queries}


def _tool_step(tool: str) -> None:
    async def call_tool(ctx: stepflow.StepContext) -> dict[str, object]:
        # The idempotency key lets a real tool API drop a duplicate request
        # if this step is retried after a crash.
        ctx.logger.info("calling %s (key %s)", tool, ctx.idempotency_key)
        result = await llm.complete(f"{tool} result: {ctx.context['queries'][tool]}")
        return {f"notes_{tool}": result}

    call_tool.__name__ = tool
    agent.step(tool, after=[plan], retries=3, timeout=10.0)(call_tool)


for _tool in TOOLS:
    _tool_step(_tool)


@agent.step(after=list(TOOLS))
async def summarise(ctx: stepflow.StepContext) -> dict[str, object]:
    notes = [str(ctx.context[f"notes_{tool}"]) for tool in TOOLS]
    return {"answer": await llm.complete("summarise: " + " | ".join(notes))}


async def main(store: stepflow.WorkflowStore) -> stepflow.RunRecord:
    run = await stepflow.Engine(store).run(agent, {"question": "Why do agents need durability?"})
    print(f"run {run.run_id}: {run.status}")
    for step in await store.list_steps(run.run_id):
        print(f"  {step.step_id:<11} {step.status} (attempt {step.attempt})")
    print("answer:", run.context["answer"])
    return run


if __name__ == "__main__":
    anyio.run(main, stepflow.MemoryStore())
