"""The pipeline behind ``stepflow demo``: a document-ingest DAG on any store.

fetch -> (clean, detect_language) -> chunk -> (embed, summarise) -> index.
Every step is deterministic and offline (no network, no model), with short
sleeps standing in for I/O, so the demo shows parallel branches, the
context bag and live step progress in a second or two.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import anyio

from stepflow.dag import Workflow
from stepflow.engine import Engine, StepContext
from stepflow.models import RunRecord, StepStatus
from stepflow.store.base import WorkflowStore

ingest = Workflow("stepflow-demo-ingest", version="1")

_DOCUMENT = (
    "Durable workflows record every step. When a worker crashes, the run resumes "
    "from the last completed step instead of starting over. Agents call tools, "
    "tools fail, and retries with backoff keep the pipeline moving."
)


@ingest.step()
async def fetch(ctx: StepContext) -> dict[str, object]:
    await anyio.sleep(0.2)
    return {"url": ctx.input["url"], "text": _DOCUMENT}


@ingest.step(after=[fetch])
async def clean(ctx: StepContext) -> dict[str, object]:
    await anyio.sleep(0.3)
    return {"clean_text": " ".join(str(ctx.context["text"]).split())}


@ingest.step(after=[fetch])
def detect_language(ctx: StepContext) -> dict[str, object]:
    words = str(ctx.context["text"]).lower().split()
    return {"language": "en" if "the" in words else "unknown"}


@ingest.step(after=[clean, detect_language], retries=2)
async def chunk(ctx: StepContext) -> dict[str, object]:
    await anyio.sleep(0.2)
    sentences = [s.strip() for s in str(ctx.context["clean_text"]).split(".") if s.strip()]
    return {"chunks": sentences}


@ingest.step(after=[chunk], timeout=5.0)
async def embed(ctx: StepContext) -> dict[str, object]:
    await anyio.sleep(0.4)
    vectors = [
        [b / 255 for b in hashlib.sha256(text.encode()).digest()[:4]]
        for text in ctx.context["chunks"]
    ]
    return {"embeddings": vectors}


@ingest.step(after=[chunk])
async def summarise(ctx: StepContext) -> dict[str, object]:
    await anyio.sleep(0.3)
    return {"summary": str(ctx.context["chunks"][0]) + "."}


@ingest.step(after=[embed, summarise])
async def index(ctx: StepContext) -> str:
    await anyio.sleep(0.1)
    return f"indexed {len(ctx.context['embeddings'])} chunks of {ctx.context['url']}"


_MARK = {
    StepStatus.PENDING: "·",
    StepStatus.RUNNING: "▶",
    StepStatus.COMPLETED: "✓",
    StepStatus.FAILED: "✗",
    StepStatus.SKIPPED: "-",
    StepStatus.CANCELLED: "⊘",
}


async def run_demo(
    store: WorkflowStore, *, echo: Callable[[str], None] = print, poll: float = 0.05
) -> RunRecord:
    """Run the ingest pipeline, printing each step's status as it changes."""
    async with Engine(store) as engine:
        run_id = await engine.start(ingest, {"url": "https://example.com/durable"})
        echo(f"run {run_id} started: {' -> '.join(ingest.topological_order())}")
        seen: dict[str, StepStatus] = {}
        while True:
            # Read the run first: once it is finished, the steps read after it are final.
            record = await store.get_run(run_id)
            for step in await store.list_steps(run_id):
                if seen.get(step.step_id) != step.status:
                    seen[step.step_id] = step.status
                    detail = f" (attempt {step.attempt})" if step.attempt > 1 else ""
                    echo(f"  {_MARK[step.status]} {step.step_id:<16} {step.status}{detail}")
            if record is not None and record.status.is_terminal:
                break
            await anyio.sleep(poll)
        record = await engine.wait(run_id)
    echo(f"run {run_id} {record.status}: {record.output or record.error}")
    echo(f"context keys: {', '.join(sorted(record.context))}")
    return record
