"""Durable workflows: imperative async code replayed from its recorded history."""

from stepflow.durable.context import WorkflowContext
from stepflow.durable.definition import DurableWorkflow, workflow
from stepflow.durable.runner import DurableRunner
from stepflow.engine.runners import register_runner

register_runner(DurableWorkflow, DurableRunner)

__all__ = ["DurableWorkflow", "WorkflowContext", "workflow"]
