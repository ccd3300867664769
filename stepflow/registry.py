"""Workflow definitions known to this process, by name.

A run stores only its workflow's name. To resume it in a fresh process (after
a crash, or on another worker) stepflow must find the code again, so every
workflow registers itself here when it is defined, and importing the module
that defines it is enough to make its runs resumable.

Registering a name again replaces the earlier definition: test suites and
dev servers reload modules, and the newest definition is the one to run.
The registry is not locked; workflows are defined at import time.
"""

from __future__ import annotations

from stepflow.errors import WorkflowNotFoundError

__all__ = ["lookup", "register", "registered", "unregister"]

_definitions: dict[str, object] = {}


def register(name: str, definition: object) -> None:
    """Make ``definition`` findable as ``name``, replacing any earlier one."""
    _definitions[name] = definition


def lookup(name: str) -> object:
    """Return the definition registered as ``name``, or raise ``WorkflowNotFoundError``."""
    try:
        return _definitions[name]
    except KeyError:
        raise WorkflowNotFoundError(name) from None


def registered() -> dict[str, object]:
    """A copy of every registration, so callers cannot change the registry by accident."""
    return dict(_definitions)


def unregister(name: str) -> None:
    """Forget ``name`` if it is registered; for tests that define throwaway workflows."""
    _definitions.pop(name, None)
