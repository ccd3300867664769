"""`AdminStore` in memory: children, all-or-nothing deletes, exact metrics.

Each method runs without awaiting in between, so on one event loop it is
atomic: a delete checks every rule and then removes every run, with no
other task seeing a state in between. `MemoryStore` mixes this in.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

from stepflow.errors import (
    OrphanRunError,
    RunNotFoundError,
    RunStillRunningError,
    SubRunDeleteError,
)
from stepflow.models import DeleteResult, QueueDepths, RunStatus, SystemMetrics
from stepflow.store.base import check_int, validate_run_id

if TYPE_CHECKING:
    from stepflow.store.memory import _Run

_MAX_DEPTH = 1_000


class MemoryAdmin:
    """The management operations of `MemoryStore` (state is set up by its ``__init__``)."""

    _runs: dict[str, _Run]
    _children: dict[str, set[str]]
    _status_counts: Counter[RunStatus]
    _executions_total: int
    _events_total: int

    async def list_children(self, run_id: str) -> list[str]:
        """Ids of the run's direct children, oldest first; [] for none or an unknown run."""
        validate_run_id(run_id)
        return self._live_children(run_id)

    def _live_children(self, run_id: str) -> list[str]:
        children = [
            (run.record.created_at, child)
            for child in self._children.get(run_id, ())
            if (run := self._runs.get(child)) is not None and run.record.parent_run_id == run_id
        ]
        return [child for _, child in sorted(children)]

    async def list_run_ids(
        self,
        *,
        status: RunStatus | None = None,
        limit: int = 100,
        offset: int = 0,
        oldest_first: bool = False,
    ) -> list[str]:
        """One page of run ids (all, or in ``status``), newest first."""
        check_int(limit, "limit", 0)
        check_int(offset, "offset", 0)
        runs = [r for r in self._runs.values() if status is None or r.record.status == status]
        runs.sort(key=lambda run: (run.record.created_at, run.record.run_id))
        if not oldest_first:
            runs.reverse()
        return [run.record.run_id for run in runs[offset : offset + limit]] if limit > 0 else []

    async def get_metrics(self) -> SystemMetrics:
        counts = self._status_counts
        return SystemMetrics(
            total_instances=len(self._runs),
            total_executions=self._executions_total,
            running_instances=counts[RunStatus.PENDING] + counts[RunStatus.RUNNING],
            completed_instances=counts[RunStatus.COMPLETED],
            failed_instances=counts[RunStatus.FAILED],
            cancelled_instances=counts[RunStatus.CANCELLED],
            total_events=self._events_total,
        )

    async def get_queue_depths(self) -> QueueDepths:
        """Always zeros: an in-process store keeps no work queues."""
        return QueueDepths()

    async def delete_runs(self, run_ids: Sequence[str], *, force: bool = False) -> DeleteResult:
        """Delete the listed runs with all their data, all or nothing (`AdminStore.delete_runs`)."""
        ids = list(dict.fromkeys(validate_run_id(run_id) for run_id in run_ids))
        listed = set(ids)
        for run_id in ids:
            if run_id not in self._runs:
                raise RunNotFoundError(run_id)
        for run_id in ids:
            parent = self._runs[run_id].record.parent_run_id
            if parent is not None and parent not in listed and parent in self._runs:
                raise SubRunDeleteError(run_id, self._root_of(parent))
        for run_id in ids:
            for child in sorted(self._live_children(run_id)):
                if child not in listed:
                    raise OrphanRunError(run_id, child)
        if not force:
            for run_id in ids:
                status = self._runs[run_id].record.status
                if status in (RunStatus.PENDING, RunStatus.RUNNING):
                    raise RunStillRunningError(run_id, status.value)
        result = DeleteResult()
        for run_id in ids:
            removed = self._remove(run_id)
            assert removed is not None
            executions, events = removed
            result += DeleteResult(
                instances_deleted=1, executions_deleted=executions, events_deleted=events
            )
        return result

    def _root_of(self, run_id: str) -> str:
        """The top of the run's chain of existing parents."""
        for _ in range(_MAX_DEPTH):
            parent = self._runs[run_id].record.parent_run_id
            if parent is None or parent not in self._runs:
                return run_id
            run_id = parent
        return run_id

    def _remove(self, run_id: str) -> tuple[int, int] | None:
        """Drop the run and its counts: (executions, events) it had, None when absent."""
        run = self._runs.pop(run_id, None)
        if run is None:
            return None
        self._children.pop(run_id, None)
        self._status_counts[run.record.status] -= 1
        self._executions_total -= len(run.executions)
        self._events_total -= run.events_counted
        return len(run.executions), run.events_stored()
