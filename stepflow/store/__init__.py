"""Storage backends: the `WorkflowStore` and `AdminStore` protocols, `MemoryStore`, `RedisStore`."""

from stepflow.store.base import AdminStore, WorkflowStore, validate_run_id
from stepflow.store.memory import MemoryStore
from stepflow.store.redis import RedisStore

__all__ = ["AdminStore", "MemoryStore", "RedisStore", "WorkflowStore", "validate_run_id"]
