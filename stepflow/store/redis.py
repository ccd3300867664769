"""`RedisStore`: `WorkflowStore` on Redis hashes and Lua scripts.

Every change to a run is one Lua script over keys that share the run's hash
tag (see `stepflow.store.keys`), so it is atomic and works on Redis Cluster.
The global indexes (runs by time, by status) live in another slot and are
updated by separate commands: the index entry is written before a run is
created and after its status changes, and readers check each entry against
the run itself, dropping or fixing stale ones. A crash between the two
writes therefore leaves at worst an entry that the next reader repairs,
never a run that a listing cannot find.

The global counters behind `get_metrics` (executions and events stored)
are a hash under the index tag, changed by ``bump_metrics.lua`` (or
``index_run.lua``) with the request id of the per-run script whose change
it counts, so a re-sent request never counts twice. A process that dies
between the two leaves a counter off by that one change. Executions are
counted as they are created and removed. Events are not counted one by one
(that would be a second script, in another slot, on every step): each run
keeps its own count in its slot, and the global counter takes the run's
new events when it finishes, continues as new or is pruned (``sf_settle``);
a delete takes back what was counted.

Round trips on the hot path: one script per step. Completing a step
(output, context patch and history event together) also claims the step
it unblocked (`complete_and_claim`); a run's start and end are one
pipeline each (its script and its status index; the start also claims the
run's first step, `create_and_claim`), plus the counter at the end.

The admin operations (`AdminStore`: trees, multi-run deletes, metrics) are
in `stepflow.store.redis_admin`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from stepflow import _json
from stepflow.errors import RunCancelledError, RunNotFoundError, StepflowError
from stepflow.models import (
    Event,
    EventKind,
    ExecutionInfo,
    Lease,
    NewEvent,
    PruneOptions,
    PruneResult,
    RunRecord,
    RunStatus,
    StepClaim,
    StepState,
    parse_run_status,
)
from stepflow.store.base import (
    DEFAULT_LEASE_MS,
    check_claim,
    check_int,
    validate_run_id,
    validate_step_id,
)
from stepflow.store.ids import new_request_id, new_token
from stepflow.store.redis_admin import RedisAdmin
from stepflow.store.redis_core import pairs, text

_RUN_FIELDS = (
    "run_id",
    "workflow",
    "version",
    "status",
    "input",
    "output",
    "error",
    "created_at",
    "updated_at",
    "completed_at",
    "parent_run_id",
    "current_execution_id",
)
_CLAIM_MEMBERS = ("name", "input", "started_at")
"""A step's fields kept in its '<step>|c' field (see ``_prelude.lua``)."""
_RESULT_MEMBERS = ("output", "error", "finished_at")
"""A step's fields kept in its '<step>|r' field."""


def _members(row: Mapping[str, Any], names: Sequence[str]) -> bytes:
    """``"name":<JSON>,...``: members of a JSON object, as the scripts write them."""
    return b",".join(_json.dumps(name) + b":" + _json.dumps(row[name]) for name in names)


def _decode_step(
    step_id: str, line: bytes | str, claim: bytes | str, result: bytes | str
) -> StepState:
    """A step from its state line and its claim and result members (see ``_prelude.lua``)."""
    status, _epoch, attempt, _expires, execution, _token, worker = text(line).split("|", 6)
    members = _json.loads(f"{{{text(claim)},{text(result)}}}")
    return StepState.model_validate(
        {
            "step_id": step_id,
            "status": status,
            "attempt": int(attempt),
            "execution_id": int(execution),
            "worker_id": _json.loads(worker),
            **members,
        }
    )


def _lease_from_reply(
    reply: str, run_id: str, step_id: str, owner: str, token: str, execution_id: int
) -> Lease:
    """The lease a claim returned as '<epoch>|<expires_at>|<attempt>' (see ``sf_claim``)."""
    epoch, expires, attempt = reply.split("|")
    return Lease(
        run_id=run_id,
        step_id=step_id,
        owner=owner,
        token=token,
        epoch=int(epoch),
        expires_at=int(expires),
        execution_id=execution_id,
        attempt=int(attempt),
    )


class RedisStore(RedisAdmin):
    """Durable store on one Redis server (or cluster); many processes may share it."""

    # -- runs -----------------------------------------------------------------

    async def create_run(
        self, record: RunRecord, *, only_if_absent: bool = False, event: NewEvent | None = None
    ) -> bool:
        """Index first, then write the run, then its status index and count.

        Index first: an entry without a run is dropped by readers, a run
        without an entry could never be listed. A run without a parent takes
        one round trip: its time entry, the create and the status index with
        the count of a new execution travel in one pipeline. When the create
        did not add an execution (the run existed), the count is taken back
        and the status index set to the run's own status.
        """
        created, _ = await self._create(record, only_if_absent=only_if_absent, event=event)
        return created

    async def create_and_claim(
        self,
        record: RunRecord,
        first: StepClaim,
        *,
        owner: str,
        event: NewEvent | None = None,
    ) -> tuple[bool, Lease | None]:
        """The claim rides in the create's pipeline; ``claim_step.lua`` makes it only
        if the create's request made the run. A child run (indexed under its
        parent first) creates, then claims."""
        validate_step_id(first.step_id)
        check_claim(owner, first.lease_ms, first.name)
        token = new_token()
        claim = self._claim_call(
            record.run_id, first, owner, token, record.current_execution_id, b"null"
        )
        created, claimed = await self._create(record, only_if_absent=True, event=event, claim=claim)
        if not claimed:
            return created, None
        lease = _lease_from_reply(
            claimed, record.run_id, first.step_id, owner, token, record.current_execution_id
        )
        return created, lease

    async def _create(
        self,
        record: RunRecord,
        *,
        only_if_absent: bool,
        event: NewEvent | None,
        claim: tuple[list[str], list[Any]] | None = None,
    ) -> tuple[bool, str]:
        """Create the run (see `create_run`), with the claim ``claim`` (``claim_step.lua``'s
        KEYS and ARGV) made only if this create made the run.

        Returns whether the record was written and the claim's reply ('' for
        no claim: none asked for, the run existed, or the store refused it).
        """
        keys, args = self._create_run_call(record, only_if_absent=only_if_absent, event=event)
        if claim is not None:  # made only if this create (request args[0]) made the run
            claim = (claim[0], [*claim[1], args[0]])
        if record.parent_run_id is not None:
            created = await self._create_child(record, keys, args, only_if_absent=only_if_absent)
            ridden = None  # the claim did not ride: sent below
        else:
            created, ridden = await self._create_indexed(
                record, keys, args, only_if_absent=only_if_absent, claim=claim
            )
        if created < 0 or claim is None:
            return created >= 0, ""
        try:
            if ridden is None:
                claimed = await self._call("claim_step", *claim, run_id=record.run_id)
            else:  # a reply NOSCRIPT refused is sent again
                claimed = await self._resolve(ridden, "claim_step", *claim, run_id=record.run_id)
        except RunCancelledError:  # created cancelled: no work starts, as in MemoryStore
            return True, ""
        return True, text(claimed)

    async def _create_child(
        self, record: RunRecord, keys: list[str], args: list[Any], *, only_if_absent: bool
    ) -> int:
        """``create_run.lua``'s reply for a child run: indexed under its parent first."""
        run_id = record.run_id
        await self._index_child(record, keep_score=only_if_absent)
        created = int(await self._call("create_run", keys, args, run_id=run_id))
        if created >= 0:
            count = (args[0], {"executions": created})
            await self._index_status(run_id, record.status, count=count)
        return created

    async def _create_indexed(
        self,
        record: RunRecord,
        keys: list[str],
        args: list[Any],
        *,
        only_if_absent: bool,
        claim: tuple[list[str], list[Any]] | None,
    ) -> tuple[int, Any]:
        """``create_run.lua``'s reply for a run without a parent, in one pipeline with its
        time entry, its status index counting a new execution, and ``claim``.

        Returns the reply and the claim's raw reply (None without a claim). A create
        that added no execution takes the count back; one that left the run as it
        was indexes it under its own status again.
        """
        run_id = record.run_id
        count = (args[0], {"executions": 1})
        index_keys, index_args = self._index_call(run_id, record.status, count)
        await self._ready()
        commands = [
            self._time_entry(run_id, record.created_at, keep_score=only_if_absent),
            self._script_command("create_run", keys, args),
            self._script_command("index_run", index_keys, index_args),
        ]
        if claim is not None:
            commands.append(self._script_command("claim_step", *claim))
        timed, reply, indexed, *ridden = await self._pipelined(commands)
        if isinstance(timed, Exception):
            raise timed
        await self._resolve(indexed, "index_run", index_keys, index_args, run_id=run_id)
        undo = (f"{args[0]}:undo", {"executions": -1})
        try:
            created = int(await self._resolve(reply, "create_run", keys, args, run_id=run_id))
        except StepflowError:
            await self._bump(*undo)
            await self._reindex(run_id)
            raise
        if created != 1:  # no new execution: the run existed
            await self._bump(*undo)
        if created < 0:  # and was left as it is, maybe in another status
            await self._reindex(run_id)
        return created, ridden[0] if ridden else None

    def _create_run_call(
        self, record: RunRecord, *, only_if_absent: bool = False, event: NewEvent | None = None
    ) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of ``create_run.lua`` for ``record`` (validated and encoded).

        For bulk loaders that pipeline many creates (``benchmarks/bench_admin.py``);
        ``ARGV[1]`` is a fresh request id.
        """
        keys = self.keys.run(record.run_id)
        if record.parent_run_id is not None:
            validate_run_id(record.parent_run_id)
        encoded = self._codec.encode_run(record)
        context = self._codec.encode_context(record.context, "context")
        fields = record.model_dump(mode="json", include=set(_RUN_FIELDS))
        fields.update(input=encoded.input, output=encoded.output, error=encoded.error)
        run_pairs: list[Any] = []
        for name in _RUN_FIELDS:
            value = fields[name]
            run_pairs += [name, value if isinstance(value, bytes) else _json.dumps(value)]
        context_pairs = [item for pair in context.items() for item in pair]
        kind, payload = self._event_args(event)
        args = [
            new_request_id(),
            record.current_execution_id,
            _json.dumps(record.status.value),
            encoded.input,
            record.created_at,
            len(_RUN_FIELDS),
            "1" if only_if_absent else "0",
            kind,
            payload,
            *run_pairs,
            *context_pairs,
        ]
        events = keys.events(record.current_execution_id)
        return [keys.run, keys.reqs, keys.reqlog, keys.ctx, keys.execs, events], args

    async def _index_child(self, record: RunRecord, *, keep_score: bool = False) -> None:
        """Index a child run and add it to its parent's children, before writing it.

        One round trip. The child is refused while a delete holds the parent.
        With ``keep_score`` an existing entry keeps its time (the run may exist).
        """
        assert record.parent_run_id is not None
        parent_keys = self.keys.run(record.parent_run_id)
        add_child = [[parent_keys.run, parent_keys.children], [record.run_id]]
        await self._ready()
        replies = await self._pipelined(
            [
                self._time_entry(record.run_id, record.created_at, keep_score=keep_score),
                self._script_command("add_child", *add_child),
            ]
        )
        try:
            await self._resolve(replies[1], "add_child", *add_child, run_id=record.parent_run_id)
        except StepflowError:
            if replies[0] == 1:  # the entry is ours alone: take it back
                await self.client.zrem(self.keys.runs_by_time, record.run_id)
            raise

    async def get_run(self, run_id: str) -> RunRecord | None:
        keys = self.keys.run(run_id)
        raw = await self._call("get_run", [keys.run, keys.ctx], [], run_id=run_id)
        return self._decode_run(raw)

    async def set_run_status(
        self,
        run_id: str,
        status: RunStatus,
        *,
        execution_id: int,
        output: Any = None,
        error: Any = None,
        event: NewEvent | None = None,
    ) -> RunRecord:
        """The run's script and its index update travel in one pipeline (one round trip).

        A terminal status settles the run's events, which takes a second round
        trip for the counter.
        """
        status = RunStatus(status)
        keys = self.keys.run(run_id)
        output_json = self._codec.encode(output, "run output")
        error_json = self._codec.encode(error, "run error")
        kind, payload = self._event_args(event)
        request_id = new_request_id()
        events = keys.events(execution_id)
        run_keys = [keys.run, keys.reqs, keys.reqlog, keys.execs, events, keys.ctx]
        run_args = [
            request_id,
            execution_id,
            _json.dumps(status.value),
            "1" if status.is_terminal else "0",
            output_json,
            error_json,
            kind,
            payload,
        ]
        run_flat, ctx_flat, settled = await self._run_and_index(
            "set_run_status", run_keys, run_args, status, run_id=run_id
        )
        return await self._changed_run(run_id, status, request_id, settled, run_flat, ctx_flat)

    async def _run_and_index(
        self,
        name: str,
        keys: list[str],
        args: list[Any],
        status: RunStatus,
        *,
        run_id: str,
        step_id: str = "",
        execution_id: int = 0,
    ) -> Any:
        """Script ``name`` changing the run's status, and the status index, in one pipeline.

        The index is set to ``status`` ahead of the script's answer; when the
        script refuses, the run is indexed under the status it really has.
        """
        index_keys, index_args = self._index_call(run_id, status)
        await self._ready()
        raw, indexed = await self._pipelined(
            [
                self._script_command(name, keys, args),
                self._script_command("index_run", index_keys, index_args),
            ]
        )
        await self._resolve(indexed, "index_run", index_keys, index_args, run_id=run_id)
        try:
            return await self._resolve(
                raw, name, keys, args, run_id=run_id, step_id=step_id, execution_id=execution_id
            )
        except StepflowError:
            await self._reindex(run_id)
            raise

    async def _changed_run(
        self,
        run_id: str,
        status: RunStatus,
        request_id: str,
        settled: int | str | bytes,
        run_flat: Sequence[Any],
        ctx_flat: Sequence[Any],
    ) -> RunRecord:
        """The run a status change returned, its settled events counted, its index right."""
        await self._bump(request_id, {"events": int(settled)})
        record = self._decode_run((run_flat, ctx_flat))
        assert record is not None, "the script refuses a run that does not exist"
        if record.status != status:  # a replayed request found a later status
            await self._index_status(run_id, record.status)
        return record

    def _event_args(self, event: NewEvent | None) -> tuple[str, bytes]:
        if event is None:
            return "", b"null"
        return event.kind.value, self._codec.encode_event(event)

    async def update_context(self, run_id: str, context: Mapping[str, Any]) -> None:
        await self._write_context(run_id, context, "replace", "context")

    async def merge_context(self, run_id: str, patch: Mapping[str, Any]) -> None:
        await self._write_context(run_id, patch, "merge", "context patch")

    async def _write_context(
        self, run_id: str, values: Mapping[str, Any], mode: str, what: str
    ) -> None:
        keys = self.keys.run(run_id)
        encoded = self._codec.encode_context(values, what)
        await self._call(
            "update_context",
            [keys.run, keys.reqs, keys.reqlog, keys.ctx],
            [new_request_id(), mode, *(item for pair in encoded.items() for item in pair)],
            run_id=run_id,
        )

    async def delete_run(self, run_id: str) -> bool:
        """Remove the run; `RunDeletingError` while a multi-run delete holds it."""
        request_id = new_request_id()
        removed = await self._delete_one(run_id, request_id, "plain")
        await self._unindex([run_id], request_id, {run_id: removed})
        return removed.deleted

    async def list_runs(
        self, *, limit: int = 100, offset: int = 0, oldest_first: bool = False
    ) -> list[RunRecord]:
        return await self._list_index(self.keys.runs_by_time, None, limit, offset, oldest_first)

    async def list_runs_by_status(
        self,
        status: RunStatus | str,
        *,
        limit: int = 100,
        offset: int = 0,
        oldest_first: bool = False,
    ) -> list[RunRecord]:
        wanted = parse_run_status(status)
        index = self.keys.runs_by_status(wanted)
        return await self._list_index(index, wanted, limit, offset, oldest_first)

    async def _list_index(
        self,
        index: str,
        status: RunStatus | None,
        limit: int,
        offset: int,
        oldest_first: bool = False,
    ) -> list[RunRecord]:
        """One page of an index, newest first, with stale entries repaired on the way."""
        entries = await self._index_page(index, limit, offset, oldest_first)
        if not entries:
            return []
        ids = [run_id for run_id, _ in entries]
        calls: list[tuple[list[str], list[Any]]] = [
            ([keys.run, keys.ctx], []) for keys in map(self.keys.run, ids)
        ]
        raw_runs = await self._script_batch("get_run", calls)
        records: list[RunRecord] = []
        for run_id, (keys, _), raw, (_, score) in zip(ids, calls, raw_runs, entries, strict=True):
            raw = await self._resolve(raw, "get_run", keys, [], run_id=run_id)
            record = self._decode_run(raw)
            actual = record.status if record is not None else None
            current = await self._entry_is_current(index, run_id, score, status, actual)
            if current and record is not None:
                records.append(record)
        return records

    # -- steps ----------------------------------------------------------------

    async def upsert_step(
        self, run_id: str, step: StepState, *, keep_completed: bool = False
    ) -> bool:
        keys = self.keys.run(run_id)
        sid = validate_step_id(step.step_id)
        row = _json.loads(self._codec.encode_step(step))
        reply = await self._call(
            "upsert_step",
            [keys.run, keys.reqs, keys.reqlog, keys.steps, keys.order],
            [
                new_request_id(),
                sid,
                "1" if keep_completed else "0",
                row["status"],
                row["attempt"],
                row["execution_id"],
                _json.dumps(row["worker_id"]),
                _members(row, _CLAIM_MEMBERS),
                _members(row, _RESULT_MEMBERS),
            ],
            run_id=run_id,
            step_id=sid,
        )
        return text(reply) != "KEPT"

    async def get_step(self, run_id: str, step_id: str) -> StepState | None:
        keys = self.keys.run(run_id)
        await self._ready()  # another layout's rows would read as no step at all
        line, claim, result = await self.client.hmget(
            keys.steps, [f"{step_id}|l", f"{step_id}|c", f"{step_id}|r"]
        )
        if line is None or claim is None or result is None:  # every write sets all three
            return None
        return _decode_step(step_id, line, claim, result)

    async def list_steps(self, run_id: str) -> list[StepState]:
        keys = self.keys.run(run_id)
        order, flat = await self._call("list_steps", [keys.order, keys.steps], [], run_id=run_id)
        fields = pairs(flat)
        steps = []
        for raw_sid in order:
            sid = text(raw_sid)
            line, claim, result = (fields[f"{sid}|{part}"] for part in "lcr")
            steps.append(_decode_step(sid, line, claim, result))
        return steps

    async def claim_step(
        self,
        run_id: str,
        step_id: str,
        *,
        name: str,
        owner: str,
        lease_ms: int = DEFAULT_LEASE_MS,
        execution_id: int = 1,
        input: Any = None,
    ) -> Lease:
        validate_step_id(step_id)
        check_claim(owner, lease_ms, name)
        input_json = self._codec.encode(input, "step input")
        token = new_token()
        keys, args = self._claim_call(
            run_id, StepClaim(step_id, name, lease_ms), owner, token, execution_id, input_json
        )
        reply = await self._call(
            "claim_step",
            keys,
            args,
            run_id=run_id,
            step_id=step_id,
            execution_id=execution_id,
        )
        return _lease_from_reply(text(reply), run_id, step_id, owner, token, execution_id)

    def _claim_call(
        self,
        run_id: str,
        claim: StepClaim,
        owner: str,
        token: str,
        execution_id: int,
        input_json: bytes,
    ) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of ``claim_step.lua`` (ids and input validated and encoded)."""
        keys = self.keys.run(run_id)
        return (
            [keys.run, keys.reqs, keys.reqlog, keys.steps, keys.order, keys.execs],
            [
                new_request_id(),
                claim.step_id,
                _json.dumps(claim.name),
                _json.dumps(owner),
                token,
                int(claim.lease_ms),
                execution_id,
                input_json,
            ],
        )

    async def renew_lease(self, lease: Lease, *, lease_ms: int = DEFAULT_LEASE_MS) -> Lease:
        keys = self.keys.run(lease.run_id)
        check_int(lease_ms, "lease_ms", 1)
        expires = await self._call(
            "renew_lease",
            [keys.run, keys.reqs, keys.reqlog, keys.steps],
            [
                new_request_id(),
                lease.step_id,
                lease.token,
                lease.epoch,
                int(lease_ms),
                lease.execution_id,
            ],
            run_id=lease.run_id,
            step_id=lease.step_id,
        )
        return lease.model_copy(update={"expires_at": int(expires)})

    async def complete_step(
        self,
        lease: Lease,
        *,
        output: Any = None,
        context_patch: Mapping[str, Any] | None = None,
        event: NewEvent | None = None,
    ) -> Event | None:
        keys, args, payload = self._complete_call(lease, None, output, context_patch, event)
        reply = await self._call_complete(lease, keys, args)
        return _completion_event(text(reply).partition("#")[0], event, payload)

    async def complete_and_claim(
        self,
        lease: Lease,
        next_step: StepClaim,
        *,
        output: Any = None,
        context_patch: Mapping[str, Any] | None = None,
        event: NewEvent | None = None,
    ) -> tuple[Event | None, Lease | None]:
        validate_step_id(next_step.step_id)
        check_claim(lease.owner, next_step.lease_ms, next_step.name)
        token = new_token()
        keys, args, payload = self._complete_call(
            lease, (next_step, token), output, context_patch, event
        )
        reply = await self._call_complete(lease, keys, args)
        completion, _, claimed = text(reply).partition("#")
        recorded = _completion_event(completion, event, payload)
        if not claimed:
            return recorded, None
        next_lease = _lease_from_reply(
            claimed, lease.run_id, next_step.step_id, lease.owner, token, lease.execution_id
        )
        return recorded, next_lease

    async def complete_and_finish(
        self,
        lease: Lease,
        *,
        output: Any = None,
        context_patch: Mapping[str, Any] | None = None,
        event: NewEvent | None = None,
        run_output: Any = None,
        run_event: NewEvent | None = None,
    ) -> tuple[Event | None, RunRecord | None]:
        """The step's script completes the run too; the status index rides in the same pipeline.

        When the run was not completed, it is indexed under its own status again.
        """
        run_id = validate_run_id(lease.run_id)  # ids before payloads, as everywhere
        finish = ["1", self._codec.encode(run_output, "run output"), *self._event_args(run_event)]
        keys, args, payload = self._complete_call(
            lease, None, output, context_patch, event, finish=finish
        )
        result, run_flat, ctx_flat = await self._run_and_index(
            "complete_step",
            keys,
            args,
            RunStatus.COMPLETED,
            run_id=run_id,
            step_id=lease.step_id,
            execution_id=lease.execution_id,
        )
        completion, _, settled = text(result).partition("!")
        recorded = _completion_event(completion, event, payload)
        if not settled:  # the run was not completed (cancelled, or at another execution)
            status = pairs(run_flat)["status"]  # the run as the script left it
            await self._index_status(run_id, RunStatus(_json.loads(status)))
            return recorded, None
        changed = await self._changed_run(
            run_id, RunStatus.COMPLETED, args[0], settled, run_flat, ctx_flat
        )
        return recorded, changed

    def _complete_call(
        self,
        lease: Lease,
        claim: tuple[StepClaim, str] | None,
        output: Any,
        context_patch: Mapping[str, Any] | None,
        event: NewEvent | None,
        *,
        finish: Sequence[Any] = ("", "", "", ""),
    ) -> tuple[list[str], list[Any], bytes]:
        """KEYS and ARGV of ``complete_step.lua``, and the event's payload as sent.

        ``claim`` is the step to claim with its new lease token; ``finish`` the
        script's four run-completion arguments.
        """
        keys = self.keys.run(lease.run_id)
        output_json, patch = self._codec.encode_completion(output, context_patch)
        kind, payload = self._event_args(event)
        claim_args: list[Any] = ["", "", "", "", 0]
        if claim is not None:
            next_step, token = claim
            claim_args = [
                next_step.step_id,
                _json.dumps(next_step.name),
                _json.dumps(lease.owner),
                token,
                int(next_step.lease_ms),
            ]
        return (
            [
                keys.run,
                keys.steps,
                keys.ctx,
                keys.execs,
                keys.events(lease.execution_id),
                keys.order,
            ],
            [
                new_request_id(),
                lease.step_id,
                lease.token,
                lease.epoch,
                lease.execution_id,
                output_json,
                kind,
                payload,
                *claim_args,
                *finish,
                *(item for pair in patch.items() for item in pair),
            ],
            payload,
        )

    async def _call_complete(self, lease: Lease, keys: list[str], args: list[Any]) -> Any:
        return await self._call(
            "complete_step",
            keys,
            args,
            run_id=lease.run_id,
            step_id=lease.step_id,
            execution_id=lease.execution_id,
        )

    async def fail_step(
        self,
        lease: Lease,
        *,
        error: Any,
        final: bool,
        event: NewEvent | None = None,
        ran: bool = True,
    ) -> None:
        keys = self.keys.run(lease.run_id)
        error_json = self._codec.encode(error, "step error")
        kind, payload = self._event_args(event)
        await self._call(
            "fail_step",
            [
                keys.run,
                keys.reqs,
                keys.reqlog,
                keys.steps,
                keys.execs,
                keys.events(lease.execution_id),
            ],
            [
                new_request_id(),
                lease.step_id,
                lease.token,
                lease.epoch,
                lease.execution_id,
                error_json,
                "1" if final else "0",
                kind,
                payload,
                "1" if ran else "0",
            ],
            run_id=lease.run_id,
            step_id=lease.step_id,
            execution_id=lease.execution_id,
        )

    # -- history and executions -----------------------------------------------

    async def append_event(
        self,
        run_id: str,
        event: NewEvent,
        *,
        execution_id: int,
        only_if_current: bool = False,
        seen_events: int | None = None,
    ) -> Event:
        keys = self.keys.run(run_id)
        seen = "" if seen_events is None else check_int(seen_events, "seen_events", 0)
        payload = self._codec.encode_event(event)
        reply = await self._call(
            "append_event",
            [keys.run, keys.reqs, keys.reqlog, keys.execs, keys.events(execution_id)],
            [new_request_id(), execution_id, event.kind.value, payload, int(only_if_current), seen],
            run_id=run_id,
            execution_id=execution_id,
        )
        return _event_from_reply(reply, event.kind, payload)

    async def read_history(
        self, run_id: str, execution_id: int | None = None, *, after_event_id: int = 0
    ) -> list[Event]:
        keys = self.keys.run(run_id)
        check_int(after_event_id, "after_event_id", 0)
        if execution_id is not None:
            check_int(execution_id, "execution_id", 1)
        else:
            current = await self.client.hget(keys.run, "current_execution_id")
            if current is None:
                raise RunNotFoundError(run_id)
            execution_id = int(current)
        raw = await self._call(
            "read_history",
            [keys.run, keys.execs, keys.events(execution_id)],
            [execution_id, after_event_id],
            run_id=run_id,
            execution_id=execution_id,
        )
        return [Event.model_validate_json(item) for item in raw]

    async def list_executions(self, run_id: str) -> list[ExecutionInfo]:
        keys = self.keys.run(run_id)
        flat = await self._call("list_executions", [keys.run, keys.execs], [], run_id=run_id)
        rows: dict[int, dict[str, Any]] = {}
        for field, value in pairs(flat).items():
            xid, _, name = field.partition("|")
            if name:  # else a run-wide field: the event counts of sf_settle
                rows.setdefault(int(xid), {})[name] = _json.loads(value)
        return [_execution_info(xid, rows[xid]) for xid in sorted(rows)]

    async def continue_as_new(
        self,
        run_id: str,
        input: Any,
        *,
        execution_id: int,
        prune: PruneOptions | None = None,
        carry: Sequence[NewEvent] = (),
        seen_events: int | None = None,
    ) -> int:
        keys = self.keys.run(run_id)
        if seen_events is not None:
            check_int(seen_events, "seen_events", 0)
        input_json = self._codec.encode(input, "continue-as-new input")
        carried = [
            item
            for event in carry
            for item in (event.kind.value, self._codec.encode_carried(event))
        ]
        new_id = execution_id + 1
        request_id = new_request_id()

        async def continue_run(history_ids: list[int]) -> list[int]:
            reply: list[int] = await self._call(
                "continue_as_new",
                [
                    keys.run,
                    keys.reqs,
                    keys.reqlog,
                    keys.execs,
                    keys.events(execution_id),
                    keys.events(new_id),
                    keys.steps,
                    keys.order,
                    *(keys.events(x) for x in history_ids),
                ],
                [
                    request_id,
                    execution_id,
                    new_id,
                    input_json,
                    "0" if prune is None else "1",
                    *_prune_args(prune),
                    len(history_ids),
                    *history_ids,
                    "" if seen_events is None else seen_events,
                    *carried,
                ],
                run_id=run_id,
            )
            return reply

        executions, events = await self._with_execution_ids(
            run_id, continue_run, needed=prune is not None
        )
        # The run is running now, whatever it was (failed runs can continue too).
        count = (request_id, {"executions": executions, "events": events})
        await self._index_status(run_id, RunStatus.RUNNING, count=count)
        return new_id

    async def prune_executions(self, run_id: str, options: PruneOptions) -> PruneResult:
        keys = self.keys.run(run_id)
        request_id = new_request_id()

        async def prune(history_ids: list[int]) -> list[int]:
            reply: list[int] = await self._call(
                "prune_executions",
                [keys.run, keys.reqs, keys.reqlog, keys.execs, keys.steps, keys.order]
                + [keys.events(x) for x in history_ids],
                [request_id, *_prune_args(options), len(history_ids), *history_ids],
                run_id=run_id,
            )
            return reply

        deleted, events, settled = await self._with_execution_ids(run_id, prune)
        await self._bump(request_id, {"executions": -deleted, "events": settled})
        return PruneResult(instances_processed=1, executions_deleted=deleted, events_deleted=events)


def _prune_args(options: PruneOptions | None) -> list[Any]:
    if options is None:
        return ["", ""]
    return [
        "" if options.keep_last is None else options.keep_last,
        "" if options.completed_before is None else options.completed_before,
    ]


def _completion_event(completion: str, event: NewEvent | None, payload: bytes) -> Event | None:
    """The step's event as ``complete_step.lua`` appended it (None when none was given)."""
    return None if event is None else _event_from_reply(completion, event.kind, payload)


def _event_from_reply(reply: bytes | str, kind: EventKind, payload: bytes) -> Event:
    """The event a script appended, from its '<id>|<timestamp>' reply."""
    event_id, _, timestamp = text(reply).partition("|")
    return Event(
        event_id=int(event_id), kind=kind, timestamp=int(timestamp), payload=_json.loads(payload)
    )


def _execution_info(execution_id: int, row: Mapping[str, Any]) -> ExecutionInfo:
    return ExecutionInfo(
        execution_id=execution_id,
        status=row["status"],
        input=row.get("input"),
        output=row.get("output"),
        error=row.get("error"),
        started_at=row["started_at"],
        completed_at=row.get("completed_at"),
        event_count=row.get("events", 0),
    )
