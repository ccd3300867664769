"""``@stepflow.workflow``: an imperative workflow replayed from its history."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stepflow import registry
from stepflow.dag import check_name
from stepflow.errors import DefinitionError
from stepflow.models import PruneOptions

if TYPE_CHECKING:
    from stepflow.durable.context import WorkflowContext

WorkflowFunction = Callable[["WorkflowContext", Any], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class DurableWorkflow:
    """A durable workflow definition: run it with ``Engine.start`` / ``Engine.run``.

    The function is called as ``fn(ctx, input)`` and is re-run from the top
    whenever the run is resumed; everything it does that is not pure
    computation must go through ``ctx`` so a replay returns the recorded
    result instead of doing it again.
    """

    name: str
    fn: WorkflowFunction
    version: str = "1"
    auto_prune: PruneOptions | None = None
    """Applied on every continue-as-new (overrides the engine's default)."""

    def validate(self) -> None:
        """Nothing to check after definition; present so engines treat definitions alike."""

    def opening_step(self) -> None:
        """None: a durable run claims each step as its code reaches it."""
        return None

    def validate_input(self, value: Any) -> Any:
        return value


def workflow(
    name: str | None = None,
    *,
    version: str = "1",
    auto_prune: PruneOptions | None = None,
) -> Callable[[WorkflowFunction], DurableWorkflow]:
    """Define a durable workflow from ``async def fn(ctx, input)``; registers it by name."""
    if name is not None:
        check_name("workflow name", name)
    check_name(f"version of workflow {name!r}", version)
    if auto_prune is not None and not isinstance(auto_prune, PruneOptions):
        raise DefinitionError("auto_prune must be a stepflow.PruneOptions")

    def decorate(fn: WorkflowFunction) -> DurableWorkflow:
        if not inspect.iscoroutinefunction(fn):
            raise DefinitionError(f"@stepflow.workflow needs an 'async def' function, got {fn!r}")
        parameters = list(inspect.signature(fn).parameters.values())
        if len(parameters) < 2:
            raise DefinitionError(
                f"workflow function {fn.__name__!r} must take (ctx, input), "
                f"it takes {len(parameters)} parameter(s)"
            )
        definition = DurableWorkflow(
            name=name or fn.__name__, fn=fn, version=version, auto_prune=auto_prune
        )
        registry.register(definition.name, definition)
        return definition

    return decorate
