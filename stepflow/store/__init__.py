"""Storage backends: the `WorkflowStore` protocol, `MemoryStore` and `RedisStore`."""

from stepflow.store.base import WorkflowStore, validate_run_id
from stepflow.store.memory import MemoryStore
from stepflow.store.redis import RedisStore

__all__ = ["MemoryStore", "RedisStore", "WorkflowStore", "validate_run_id"]
