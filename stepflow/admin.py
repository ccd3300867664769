"""`Admin`: see what runs, inspect it, clean it up safely.

``Admin(store)`` works on any `AdminStore` (`MemoryStore`, `RedisStore`) and
offers the management interface of DESIGN.md: listing and inspection,
history per execution, metrics and queue depths, run trees, deletes and
prunes. Runs are called *instances* here, as in other durable-workflow
tools; an instance id is a run id.

Guarantees:

- Listings are pages (``limit``/``offset``) read from indexes, newest first,
  so a store with a million runs answers a page in milliseconds.
- Metrics and queue depths come from counters and index sizes kept with
  every transition, never from a scan.
- A delete removes a root and all its descendants, with every execution,
  history, step, context bag and lease, all or nothing: either every run is
  removed or none is changed. A sub-run cannot be deleted alone, an
  unfinished run only with ``force``. Afterwards a worker that still held a
  lease can write nothing, and a run re-created under the same id never
  sees a write meant for the old one. (On Redis a multi-run delete is a
  two-phase protocol; see `stepflow.store.redis_admin` for what a crash in
  the middle leaves and how the next delete resolves it.)
- A prune is atomic per run, never removes the current execution or a
  running one, and never touches the context bag.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from stepflow.errors import (
    ConflictError,
    DeleteRefusedError,
    ExecutionNotFoundError,
    InvalidArgumentError,
    NotFoundError,
    OrphanRunError,
    RunNotFoundError,
)
from stepflow.models import (
    DeleteResult,
    Event,
    ExecutionInfo,
    InstanceFilter,
    InstanceInfo,
    InstanceTree,
    PruneOptions,
    PruneResult,
    QueueDepths,
    RunRecord,
    RunStatus,
    StepState,
    SystemMetrics,
    optional_record,
    parse_run_status,
)
from stepflow.store.base import AdminStore

_PAGE = 500
_TREE_RETRIES = 5


class Admin:
    """The management surface over one store.

    Every method is a coroutine; ids are run ids. Unknown ids raise
    `RunNotFoundError` unless a method says otherwise.
    """

    def __init__(self, store: AdminStore) -> None:
        if not isinstance(store, AdminStore):
            raise InvalidArgumentError(
                f"{type(store).__name__} has no admin operations: use a MemoryStore or RedisStore"
            )
        self.store = store

    # -- listing and inspection ---------------------------------------------------

    async def list_instances(self, *, limit: int = 100, offset: int = 0) -> list[str]:
        """Run ids, newest first (by creation time, then id), one page."""
        return await self.store.list_run_ids(limit=limit, offset=offset)

    async def list_instances_by_status(
        self, status: RunStatus | str, *, limit: int = 100, offset: int = 0
    ) -> list[str]:
        """Ids of runs in ``status`` (any case: "Completed" == "completed"), newest first."""
        wanted = parse_run_status(status)
        return await self.store.list_run_ids(status=wanted, limit=limit, offset=offset)

    async def list_instance_infos(
        self, *, status: RunStatus | str | None = None, limit: int = 100, offset: int = 0
    ) -> list[InstanceInfo]:
        """Like `list_instances` (or `list_instances_by_status`), with each run's summary."""
        if status is None:
            runs = await self.store.list_runs(limit=limit, offset=offset)
        else:
            wanted = parse_run_status(status)
            runs = await self.store.list_runs_by_status(wanted, limit=limit, offset=offset)
        return [_info(record) for record in runs]

    async def get_instance_info(self, instance_id: str) -> InstanceInfo:
        """Name, version, current execution, status, output or error, times, parent."""
        return _info(await self._record(instance_id))

    async def list_executions(self, instance_id: str) -> list[int]:
        """The run's stored execution ids, ascending (pruned ones are gone)."""
        return [x.execution_id for x in await self.store.list_executions(instance_id)]

    async def list_execution_infos(self, instance_id: str) -> list[ExecutionInfo]:
        """Like `list_executions`, with each execution's `get_execution_info`."""
        return await self.store.list_executions(instance_id)

    async def latest_execution_id(self, instance_id: str) -> int:
        """The run's current execution (the newest; continue-as-new starts the next)."""
        return (await self._record(instance_id)).current_execution_id

    async def get_execution_info(self, instance_id: str, execution_id: int) -> ExecutionInfo:
        """Status, input, output or error, start and end times and event count of one execution.

        `ExecutionNotFoundError` when the run has no such execution (never
        existed, or pruned).
        """
        for execution in await self.store.list_executions(instance_id):
            if execution.execution_id == execution_id:
                return execution
        raise ExecutionNotFoundError(instance_id, execution_id)

    async def read_history(self, instance_id: str, execution_id: int | None = None) -> list[Event]:
        """The events of one execution (None = the current one), oldest first."""
        return await self.store.read_history(instance_id, execution_id)

    async def list_steps(self, instance_id: str) -> list[StepState]:
        """The run's steps in the order they were first recorded."""
        await self._record(instance_id)
        return await self.store.list_steps(instance_id)

    async def get_system_metrics(self) -> SystemMetrics:
        """Totals and per-status counts, from counters kept with every transition."""
        return await self.store.get_metrics()

    async def get_queue_depths(self) -> QueueDepths:
        """Ready work per queue (orchestrator, worker, timer); 0 where none exists."""
        return await self.store.get_queue_depths()

    # -- trees ----------------------------------------------------------------------

    async def list_children(self, instance_id: str) -> list[str]:
        """Ids of the run's direct child runs, oldest first; [] for none or an unknown id."""
        return await self.store.list_children(instance_id)

    async def get_parent_id(self, instance_id: str) -> str | None:
        """The run that started this one; None for a root."""
        return (await self._record(instance_id)).parent_run_id

    async def get_instance_tree(self, instance_id: str) -> InstanceTree:
        """The run and all its descendants (children, their children...)."""
        await self._record(instance_id)
        return await self._tree(instance_id, set())

    async def _tree(self, instance_id: str, seen: set[str]) -> InstanceTree:
        seen.add(instance_id)
        children = [c for c in await self.store.list_children(instance_id) if c not in seen]
        return InstanceTree(
            instance_id=instance_id, children=[await self._tree(c, seen) for c in children]
        )

    # -- deletes --------------------------------------------------------------------

    async def delete_instance(self, instance_id: str, force: bool = False) -> DeleteResult:
        """Delete a root run and all its descendants with all their data, all or nothing.

        Refused with nothing changed: an unknown id (`RunNotFoundError`), a
        sub-run (`SubRunDeleteError`, naming the root to delete instead, even
        with ``force``), a tree with an unfinished run unless ``force``
        (`RunStillRunningError`). Returns what was removed.
        """
        # The store refuses a sub-run (naming its root) and an unknown id itself.
        for _ in range(_TREE_RETRIES):
            tree = await self._tree(instance_id, set())  # no read of the run: see above
            try:
                return await self.store.delete_runs(tree.all_ids(), force=force)
            except OrphanRunError:
                continue  # a child run appeared since the tree was read: read it again
        raise ConflictError(f"run {instance_id!r} kept gaining child runs; delete it again")

    async def delete_instances_atomic(
        self, instance_ids: Sequence[str], force: bool = False
    ) -> DeleteResult:
        """Delete exactly the listed runs, all or nothing.

        Fails (nothing deleted) when a listed id is unknown, when a child of a
        listed run is not listed (`OrphanRunError`: no orphans), when a listed
        sub-run's parent is not listed (`SubRunDeleteError`), or when a run is
        unfinished without ``force``; the checks hold at the moment of the
        delete, not only when the ids were gathered.
        """
        if isinstance(instance_ids, (str, bytes)):  # would be taken character by character
            raise InvalidArgumentError(
                f"instance_ids must be a list of run ids, got the one id {instance_ids!r}: "
                "pass [id], or use delete_instance"
            )
        try:
            ids = list(instance_ids)
        except TypeError:
            raise InvalidArgumentError(
                f"instance_ids must be a list of run ids, got {instance_ids!r}"
            ) from None
        return await self.store.delete_runs(ids, force=force)

    async def delete_instance_bulk(self, filter: InstanceFilter | None = None) -> DeleteResult:
        """Delete finished root runs matching ``filter``, each with its whole tree.

        Only roots whose whole tree has finished are candidates; unfinished
        ones and sub-runs are skipped silently, as are unknown ids. Criteria
        are ANDed; ``completed_before`` looks at the root's ``completed_at``;
        ``limit`` counts roots and applies after the other criteria. Without
        ``instance_ids`` the oldest runs are taken first. Each tree is deleted
        all or nothing; a tree that changed meanwhile (a run restarted) is
        skipped. Returns the summed counts.
        """
        filter = optional_record(filter, InstanceFilter, "filter") or InstanceFilter()
        # Select first, then delete: deleting while paging would shift the pages.
        trees = [tree async for tree in self._deletable_roots(filter)]
        total = DeleteResult()
        for tree in trees:
            try:
                total += await self.store.delete_runs(tree.all_ids(), force=False)
            except (DeleteRefusedError, NotFoundError, ConflictError):
                continue
        return total

    async def _deletable_roots(self, filter: InstanceFilter) -> AsyncIterator[InstanceTree]:
        found = 0
        async for record in self._candidates(filter):
            if filter.limit is not None and found >= filter.limit:
                return
            if not record.status.is_terminal or not _completed_before(record, filter):
                continue
            if record.parent_run_id is not None and await self._exists(record.parent_run_id):
                continue
            tree = await self._tree(record.run_id, set())
            if not await self._all_finished(tree.all_ids()[1:]):
                continue
            found += 1
            yield tree

    async def _all_finished(self, run_ids: list[str]) -> bool:
        for run_id in run_ids:
            record = await self.store.get_run(run_id)
            if record is not None and not record.status.is_terminal:
                return False
        return True

    # -- prunes ---------------------------------------------------------------------

    async def prune_executions(
        self, instance_id: str, options: PruneOptions | None = None
    ) -> PruneResult:
        """Delete the run's old finished executions with their histories, atomically.

        Never the current execution, never a running one, never the context
        bag. ``keep_last`` None, 0 and 1 all keep only the current execution;
        ``completed_before`` limits it to executions that ended earlier.
        ``instances_processed`` is 1 even when nothing was deleted.
        """
        options = optional_record(options, PruneOptions, "options") or PruneOptions()
        return await self.store.prune_executions(instance_id, options)

    async def prune_executions_bulk(
        self, filter: InstanceFilter | None = None, options: PruneOptions | None = None
    ) -> PruneResult:
        """`prune_executions` on every run matching ``filter``; the counts are summed.

        Running runs are processed too (their finished executions go, the
        running current one stays), child runs as well; ``completed_before``
        in the filter selects runs that finished before it (so it skips
        unfinished ones). Unknown ids are skipped. ``instances_processed``
        counts the runs pruned, including those where nothing was deleted.
        """
        filter = optional_record(filter, InstanceFilter, "filter") or InstanceFilter()
        options = optional_record(options, PruneOptions, "options") or PruneOptions()
        total = PruneResult()
        found = 0
        async for record in self._candidates(filter):
            if filter.limit is not None and found >= filter.limit:
                break
            if not _completed_before(record, filter):
                continue
            found += 1
            try:
                total += await self.store.prune_executions(record.run_id, options)
            except (NotFoundError, ConflictError):
                continue  # deleted (or being deleted) meanwhile
        return total

    # -- helpers --------------------------------------------------------------------

    async def _record(self, instance_id: str) -> RunRecord:
        record = await self.store.get_run(instance_id)
        if record is None:
            raise RunNotFoundError(instance_id)
        return record

    async def _exists(self, instance_id: str) -> bool:
        return await self.store.get_run(instance_id) is not None

    async def _candidates(self, filter: InstanceFilter) -> AsyncIterator[RunRecord]:
        """The runs a filter starts from: the listed ones in order, else all, oldest first."""
        if filter.limit == 0:
            return
        if filter.instance_ids is not None:
            for instance_id in dict.fromkeys(filter.instance_ids):
                record = await self.store.get_run(instance_id)
                if record is not None:
                    yield record
            return
        offset = 0
        while page := await self.store.list_runs(limit=_PAGE, offset=offset, oldest_first=True):
            for record in page:
                yield record
            offset += len(page)


def _info(record: RunRecord) -> InstanceInfo:
    return InstanceInfo(
        instance_id=record.run_id,
        workflow=record.workflow,
        version=record.version,
        status=record.status,
        current_execution_id=record.current_execution_id,
        output=record.output,
        error=record.error,
        created_at=record.created_at,
        updated_at=record.updated_at,
        completed_at=record.completed_at,
        parent_id=record.parent_run_id,
    )


def _completed_before(record: RunRecord, filter: InstanceFilter) -> bool:
    if filter.completed_before is None:
        return True
    return record.completed_at is not None and record.completed_at < filter.completed_before
