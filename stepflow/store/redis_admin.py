"""`AdminStore` on Redis: children, multi-run deletes, metrics, queue depths.

Deleting several runs (a tree, a batch) spans hash slots, so on Redis
Cluster it cannot be one script. It is a two-phase protocol over per-run
scripts, all-or-nothing from the caller's view:

1. *Read and check*: every run exists, none is unfinished (unless
   ``force``), none is a child whose parent exists outside the request, no
   child of a listed run is left out. Refusals raise before anything changes.
2. *Prepare*: ``delete_prepare.lua`` checks each run again and, in the same
   atomic step, fences it for this request (fields in its run hash). The
   first run (the *coordinator*) is fenced first and holds the list of runs
   and the decision. A fenced run refuses every write: claims, completions,
   status changes, events, re-creation, new children. If any check fails
   (the run changed since it was read), every fence is removed and nothing
   was deleted; a change is retried from step 1, a refusal is raised.
3. *Commit*: ``delete_decide.lua`` flips the coordinator's decision to
   committed. From here the delete goes forward.
4. *Remove*: ``delete_run.lua`` removes each fenced run (the coordinator
   last), then the indexes and counters are updated.

A process that dies in between leaves runs fenced: readers still see them,
writers are refused. The next delete that meets such a run asks its
coordinator: a committed delete is finished (and its result returned when
it covered the runs asked for); one prepared for longer than
`FENCE_TIMEOUT_MS` is rolled back (its process is presumed dead; if it
was only slow, its commit then fails and it rolls back too); a younger one
is left alone (`RunDeletingError`: try again).

Readers are never blocked: while step 4 runs, a listing may see some runs
of the request gone and others not yet. A child whose creation raced with
the delete of its parent either is refused (the parent was fenced) or, if
it was being written at that very moment, survives as a run whose parent
no longer exists; such a run counts as a root and can be deleted alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.exceptions import ResponseError

from stepflow import _json
from stepflow.errors import (
    ConflictError,
    OrphanRunError,
    RunDeletingError,
    RunNotFoundError,
    RunStillRunningError,
    SubRunDeleteError,
)
from stepflow.models import DeleteResult, QueueDepths, RunStatus, SystemMetrics
from stepflow.store import scripts
from stepflow.store.base import validate_run_id
from stepflow.store.ids import new_request_id
from stepflow.store.keys import QUEUE_KINDS
from stepflow.store.redis_core import (
    CONFLICT_RETRIES,
    SCRIPT_BATCH,
    Deleted,
    RedisCore,
    delete_keys,
    execution_ids,
    text,
)

FENCE_TIMEOUT_MS = 30_000
"""A prepared delete older than this may be rolled back by another process."""
_MAX_DEPTH = 1_000
_UNFINISHED = ('"pending"', '"running"')


class _Fenced(Exception):
    """A run of the request is held by another delete (internal: recover, then retry)."""

    def __init__(self, run_id: str, request_id: str, coordinator: str) -> None:
        self.run_id = run_id
        self.request_id = request_id
        self.coordinator = coordinator


class _Retry(Exception):
    """Something changed between the read and the prepare (internal: read again)."""


class RedisAdmin(RedisCore):
    """The management operations of `RedisStore`."""

    async def list_children(self, run_id: str) -> list[str]:
        """Ids of the run's direct children, oldest first; [] for none or an unknown run."""
        keys = self.keys.run(run_id)
        members = sorted(text(m) for m in await self.client.smembers(keys.children))
        if not members:
            return []
        async with self.client.pipeline(transaction=False) as pipe:
            for child in members:
                pipe.hmget(self.keys.run(child).run, ["parent_run_id", "created_at"])
            rows = await pipe.execute()
        wanted = text(_json.dumps(run_id))
        children = [
            (int(row[1]), child)
            for child, row in zip(members, rows, strict=True)
            if row[0] is not None and text(row[0]) == wanted
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
        """One page of run ids (all, or in ``status``), newest first: two round trips.

        Like `list_runs` it checks each entry against its run, dropping
        entries of runs that no longer exist and moving runs whose status
        changed, but it reads only the status, not the records.
        """
        index = self.keys.runs_by_time if status is None else self.keys.runs_by_status(status)
        entries = await self._index_page(index, limit, offset, oldest_first)
        if not entries:
            return []
        ids = [run_id for run_id, _ in entries]
        async with self.client.pipeline(transaction=False) as pipe:
            for run_id in ids:
                pipe.hget(self.keys.run(run_id).run, "status")
            stored = await pipe.execute()
        found = []
        for run_id, (_, created_at), raw in zip(ids, entries, stored, strict=True):
            actual = RunStatus(_json.loads(raw)) if raw is not None else None
            if await self._entry_is_current(index, run_id, created_at, status, actual):
                found.append(run_id)
        return found

    async def get_metrics(self) -> SystemMetrics:
        """Counters and index sizes, read in one round trip (no scan)."""
        statuses = (
            RunStatus.PENDING,
            RunStatus.RUNNING,
            RunStatus.COMPLETED,
            RunStatus.FAILED,
            RunStatus.CANCELLED,
        )
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zcard(self.keys.runs_by_time)
            for status in statuses:
                pipe.zcard(self.keys.runs_by_status(status))
            pipe.hmget(self.keys.metrics, ["executions", "events"])
            total, pending, running, completed, failed, cancelled, counters = await pipe.execute()
        executions, events = (max(int(value or 0), 0) for value in counters)
        return SystemMetrics(
            total_instances=total,
            total_executions=executions,
            running_instances=pending + running,
            completed_instances=completed,
            failed_instances=failed,
            cancelled_instances=cancelled,
            total_events=events,
        )

    async def get_queue_depths(self) -> QueueDepths:
        """Entries ready now (score <= the store's clock) in each queue; 0 where none exists."""
        now = await self.time_ms()
        async with self.client.pipeline(transaction=False) as pipe:
            for kind in QUEUE_KINDS:
                pipe.zcount(self.keys.queue(kind), "-inf", now)
            depths = await pipe.execute()
        return QueueDepths(**dict(zip(QUEUE_KINDS, depths, strict=True)))

    # -- deletes ----------------------------------------------------------------

    async def delete_runs(self, run_ids: Sequence[str], *, force: bool = False) -> DeleteResult:
        """Delete the listed runs with all their data, all or nothing (see the module doc).

        Refused, with nothing changed: an unknown id (`RunNotFoundError`), a
        child whose parent exists and is not listed (`SubRunDeleteError`), a
        listed run with a child that is not listed (`OrphanRunError`), an
        unfinished run without ``force`` (`RunStillRunningError`), checked in
        that order. `RunDeletingError` while another delete holds a run.
        """
        ids = list(dict.fromkeys(validate_run_id(run_id) for run_id in run_ids))
        if not ids:
            return DeleteResult()
        for _ in range(CONFLICT_RETRIES):
            try:
                plan = await self._plan_delete(ids, force)
                request_id = await self._prepare(ids, plan, force)
            except _Fenced as held:
                recovered = await self._recover(held)
                if recovered is not None and set(ids) <= set(recovered[0]):
                    return recovered[1]  # an interrupted delete of these runs, now finished
                continue
            except _Retry:
                continue
            decision, _ = await self._decide(ids[0], request_id, "commit")
            if decision != "committed":
                await self._release(request_id, ids)
                raise ConflictError(
                    "the delete was rolled back by another process while it was being "
                    "prepared (it took longer than 30 s); nothing was deleted, try again"
                )
            return await self._finish_delete(request_id, ids)
        raise ConflictError("the runs kept changing during the delete; nothing was deleted")

    async def _plan_delete(self, ids: list[str], force: bool) -> dict[str, tuple[Any, list[str]]]:
        """Check the rules on what is stored now; run id -> (parent field, children seen)."""
        async with self.client.pipeline(transaction=False) as pipe:
            for run_id in ids:
                keys = self.keys.run(run_id)
                pipe.hmget(keys.run, ["status", "parent_run_id", "~del", "~del_coord"])
                pipe.smembers(keys.children)
            replies = await pipe.execute()
        rows = {run_id: replies[2 * i] for i, run_id in enumerate(ids)}
        members = {
            run_id: sorted(text(m) for m in replies[2 * i + 1]) for i, run_id in enumerate(ids)
        }
        for run_id in ids:
            if rows[run_id][0] is None:
                raise RunNotFoundError(run_id)
        for run_id in ids:
            _, _, fence, coordinator = rows[run_id]
            if fence is not None:
                raise _Fenced(run_id, text(fence), text(coordinator))
        listed = set(ids)
        parents = {
            run_id: parent
            for run_id in ids
            if (parent := _json.loads(rows[run_id][1])) is not None and parent not in listed
        }
        alive = await self._existing(set(parents.values()))
        for run_id, parent in parents.items():
            if parent in alive:
                raise SubRunDeleteError(run_id, await self._root_of(parent))
        outside = sorted({m for run_id in ids for m in members[run_id] if m not in listed})
        outside_parents = await self._parent_fields(outside)
        for run_id in ids:
            wanted = text(_json.dumps(run_id))
            for child in members[run_id]:
                if child not in listed and outside_parents.get(child) == wanted:
                    raise OrphanRunError(run_id, child)
        if not force:
            for run_id in ids:
                if text(rows[run_id][0]) in _UNFINISHED:
                    raise RunStillRunningError(run_id, _json.loads(rows[run_id][0]))
        return {run_id: (rows[run_id][1], members[run_id]) for run_id in ids}

    async def _existing(self, run_ids: set[str]) -> set[str]:
        ordered = sorted(run_ids)
        if not ordered:
            return set()
        async with self.client.pipeline(transaction=False) as pipe:
            for run_id in ordered:
                pipe.exists(self.keys.run(run_id).run)
            found = await pipe.execute()
        return {run_id for run_id, n in zip(ordered, found, strict=True) if n}

    async def _parent_fields(self, run_ids: list[str]) -> dict[str, str]:
        """Run id -> its stored parent_run_id field (JSON) for the runs that exist."""
        if not run_ids:
            return {}
        async with self.client.pipeline(transaction=False) as pipe:
            for run_id in run_ids:
                pipe.hget(self.keys.run(run_id).run, "parent_run_id")
            fields = await pipe.execute()
        return {r: text(f) for r, f in zip(run_ids, fields, strict=True) if f is not None}

    async def _root_of(self, run_id: str) -> str:
        """The top of the run's chain of existing parents."""
        for _ in range(_MAX_DEPTH):
            parent_field = await self.client.hget(self.keys.run(run_id).run, "parent_run_id")
            parent = _json.loads(parent_field) if parent_field is not None else None
            if parent is None or not await self.client.exists(self.keys.run(parent).run):
                return run_id
            run_id = parent
        return run_id

    async def _prepare(
        self, ids: list[str], plan: dict[str, tuple[Any, list[str]]], force: bool
    ) -> str:
        """Fence every run (the coordinator first); all fences or none. Returns the request id."""
        request_id = new_request_id()
        coordinator = ids[0]
        calls = []
        for run_id in ids:
            parent_field, children = plan[run_id]
            keys = self.keys.run(run_id)
            listed = " ".join(ids) if run_id == coordinator else ""
            args = [request_id, coordinator, "1" if force else "0", parent_field, listed]
            calls.append(([keys.run, keys.children], [*args, *children]))
        replies = await self._script_batch("delete_prepare", calls[:1])
        if not isinstance(replies[0], ResponseError):
            replies += await self._script_batch("delete_prepare", calls[1:])
        failures = [(r, ids[i]) for i, r in enumerate(replies) if isinstance(r, ResponseError)]
        if not failures:
            return request_id
        await self._release(request_id, ids)
        reply, run_id = failures[0]
        try:
            scripts.raise_for_script_error(reply, run_id=run_id)
        except (scripts.ExecutionsChangedError, RunDeletingError) as exc:
            raise _Retry from exc

    async def _decide(
        self, coordinator: str, request_id: str, action: str
    ) -> tuple[str, list[str]]:
        state, listed = await self._call(
            "delete_decide",
            [self.keys.run(coordinator).run],
            [request_id, action, FENCE_TIMEOUT_MS],
            run_id=coordinator,
        )
        return text(state), text(listed).split()

    async def _release(self, request_id: str, ids: list[str]) -> None:
        """Remove this request's fences, the coordinator (``ids[0]``) last."""
        calls = [([self.keys.run(run_id).run], [request_id]) for run_id in ids]
        await self._script_batch("delete_release", calls[1:])
        await self._script_batch("delete_release", calls[:1])

    async def _finish_delete(self, request_id: str, ids: list[str]) -> DeleteResult:
        """Phase 2: remove every run this request fences, the coordinator (``ids[0]``) last."""
        counts: dict[str, Deleted] = {}
        for chunk in (
            ids[1 + i : 1 + i + SCRIPT_BATCH] for i in range(0, len(ids) - 1, SCRIPT_BATCH)
        ):
            async with self.client.pipeline(transaction=False) as pipe:
                for run_id in chunk:
                    pipe.hkeys(self.keys.run(run_id).execs)
                listings = await pipe.execute()
            calls = []
            for run_id, fields in zip(chunk, listings, strict=True):
                xids = execution_ids(fields)
                keys = delete_keys(self.keys.run(run_id), xids)
                calls.append((keys, [request_id, "fenced", *xids]))
            replies = await self._script_batch("delete_run", calls)
            for run_id, reply in zip(chunk, replies, strict=True):
                if isinstance(reply, ResponseError):  # executions changed: list them again
                    removed = await self._delete_one(run_id, request_id, "fenced")
                else:
                    removed = Deleted.from_reply(reply)
                if removed.deleted:
                    counts[run_id] = removed
        removed = await self._delete_one(ids[0], request_id, "fenced")
        if removed.deleted:
            counts[ids[0]] = removed
        await self._unindex(list(counts), request_id, counts)
        return DeleteResult(
            instances_deleted=len(counts),
            executions_deleted=sum(x.executions for x in counts.values()),
            events_deleted=sum(x.events for x in counts.values()),
        )

    async def _recover(self, held: _Fenced) -> tuple[list[str], DeleteResult] | None:
        """Finish or roll back the interrupted delete holding a run; its runs and result."""
        state, ids = await self._decide(held.coordinator, held.request_id, "abort")
        if state == "pending":
            raise RunDeletingError(held.run_id, "another delete is in progress")
        if state == "committed":
            return ids, await self._finish_delete(held.request_id, ids)
        await self._release(held.request_id, ids or [held.coordinator, held.run_id])
        return None
