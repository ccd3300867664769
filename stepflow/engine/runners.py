"""How the engine finds the runner for a kind of workflow definition.

The engine knows DAG workflows; the durable layer sits above it and
registers its own runner here when imported, so imports keep pointing down
the layers while one `Engine` runs both kinds.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import anyio

from stepflow.dag import Workflow
from stepflow.engine.dag_runner import DagRunner
from stepflow.models import Lease, PruneOptions, RunRecord
from stepflow.store.base import WorkflowStore


class Definition(Protocol):
    """What every workflow definition offers the engine."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...

    def validate(self) -> None: ...

    def validate_input(self, value: Any) -> Any: ...

    def opening_step(self) -> str | None:
        """The step the engine claims with a new run's creation (None for none)."""


class Runner(Protocol):
    async def execute(self) -> RunRecord: ...


@dataclass(frozen=True, slots=True)
class RunnerServices:
    """What a runner needs from its engine."""

    owner: str
    lease_ms: int
    limiter: anyio.CapacityLimiter
    default_prune: PruneOptions | None
    drive: Callable[[str], Awaitable[RunRecord]]
    """Run (or resume) another stored run to its end in this task: child runs."""
    runnable: Callable[[Any], Any]
    """The definition given, if the engine runs it under its name, else raise (see
    `Engine._runnable`): a child run is checked as a run the engine starts is."""
    wait_for_news: Callable[[str, float], Awaitable[None]]
    """Sleep up to the given seconds, waking early when an event is raised for the run."""
    stop_reason: Callable[[], str | None]
    """"cancel" or "shutdown" once the engine stops the run, else None."""
    fresh: bool = False
    """The run was created just now by this engine: it has no steps to load yet."""
    first_lease: Lease | None = None
    """The lease on the definition's opening step, claimed with the run's creation;
    the runner runs that step under it or hands it back."""


RunnerFactory = Callable[[WorkflowStore, Any, RunRecord, RunnerServices], Runner]

_factories: dict[type, RunnerFactory] = {}


def register_runner(definition_type: type, factory: RunnerFactory) -> None:
    """Make the engine run definitions of ``definition_type`` with ``factory``."""
    _factories[definition_type] = factory


def is_definition(value: object) -> bool:
    return type(value) in _factories


def make_runner(
    store: WorkflowStore, definition: Any, record: RunRecord, services: RunnerServices
) -> Runner:
    return _factories[type(definition)](store, definition, record, services)


def _dag_runner(
    store: WorkflowStore, flow: Workflow, record: RunRecord, services: RunnerServices
) -> Runner:
    return DagRunner(
        store,
        flow,
        record,
        owner=services.owner,
        lease_ms=services.lease_ms,
        limiter=services.limiter,
        stop_reason=services.stop_reason,  # type: ignore[arg-type]
        fresh=services.fresh,
        first_lease=services.first_lease,
    )


register_runner(Workflow, _dag_runner)
