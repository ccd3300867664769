"""Running workflows: the `Engine` and what a step sees (`StepContext`)."""

from stepflow.engine.context import StepContext
from stepflow.engine.engine import Engine

__all__ = ["Engine", "StepContext"]
