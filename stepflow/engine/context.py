"""`StepContext`: what a DAG step sees while it runs."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

_logger = logging.getLogger("stepflow.step")


@dataclass(frozen=True, slots=True)
class StepContext:
    """The run as one step attempt sees it.

    ``context`` is a read-only view of the bag as it was when the attempt
    started: a step changes the bag by returning a mapping, which the engine
    merges atomically with recording the step's completion. ``idempotency_key``
    is the same for every attempt and every resume of this step in this run,
    so a side effect (a payment, an email, an LLM call billed per request) can
    be deduplicated by the service that receives it.
    """

    run_id: str
    step_id: str
    attempt: int
    """1 for the first attempt; grows with retries and with resumes after a crash."""
    input: Any
    """The run's input (validated by the workflow's ``input_model`` if it has one)."""
    context: Mapping[str, Any]
    idempotency_key: str
    execution_id: int = 1
    logger: logging.LoggerAdapter[logging.Logger] = field(
        default_factory=lambda: logging.LoggerAdapter(_logger, {})
    )

    @classmethod
    def for_attempt(
        cls,
        *,
        run_id: str,
        step_id: str,
        attempt: int,
        input: Any,
        context: Mapping[str, Any],
        execution_id: int = 1,
    ) -> StepContext:
        key = f"{run_id}/{execution_id}/{step_id}"
        adapter = logging.LoggerAdapter(
            _logger, {"run_id": run_id, "step_id": step_id, "attempt": attempt}
        )
        return cls(
            run_id=run_id,
            step_id=step_id,
            attempt=attempt,
            input=input,
            context=context,
            idempotency_key=key,
            execution_id=execution_id,
            logger=adapter,
        )
