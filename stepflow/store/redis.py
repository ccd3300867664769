"""`RedisStore`: `WorkflowStore` on Redis hashes and Lua scripts.

Every change to a run is one Lua script over keys that share the run's hash
tag (see `stepflow.store.keys`), so it is atomic and works on Redis Cluster.
The global indexes (runs by time, by status) live in another slot and are
updated by separate commands: the index entry is written before a run is
created and after its status changes, and readers check each entry against
the run itself, dropping or fixing stale ones. A crash between the two
writes therefore leaves at worst an entry that the next reader repairs,
never a run that a listing cannot find.

Round trips on the hot path: claiming a step is one script, completing it
(output, context patch and history event together) is another.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping, Sequence
from typing import Any, cast

import anyio
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from stepflow import _json
from stepflow.errors import ConflictError, RunNotFoundError
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
    StepState,
)
from stepflow.store import scripts
from stepflow.store.base import DEFAULT_LEASE_MS, validate_step_id
from stepflow.store.codec import Codec
from stepflow.store.keys import Keys, RunKeys

logger = logging.getLogger("stepflow.store.redis")

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
_STEP_FIELDS = (
    "name",
    "status",
    "attempt",
    "input",
    "output",
    "error",
    "started_at",
    "finished_at",
    "worker_id",
    "execution_id",
)
_EXECUTION_FIELDS = ("status", "input", "output", "error", "started_at", "completed_at", "events")
_CONFLICT_RETRIES = 5


def _request_id() -> str:
    return secrets.token_hex(8)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _pairs(flat: Sequence[bytes | str]) -> dict[str, bytes | str]:
    return {_text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}


class RedisStore:
    """Durable store on one Redis server (or cluster); many processes may share it."""

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str = "stepflow",
        max_payload_bytes: int = _json.DEFAULT_MAX_PAYLOAD_BYTES,
        check_durability: bool = True,
    ) -> None:
        self.client = client
        self.keys = Keys(prefix)
        self.max_payload_bytes = max_payload_bytes
        self._codec = Codec(max_payload_bytes)
        self._check_durability = check_durability
        self._scripts: dict[str, AsyncScript] = {}
        self._ready_lock = anyio.Lock()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "stepflow",
        max_payload_bytes: int = _json.DEFAULT_MAX_PAYLOAD_BYTES,
        check_durability: bool = True,
        **client_options: Any,
    ) -> RedisStore:
        """Connect by URL: ``redis://[:password@]host:port/db`` or ``rediss://`` for TLS.

        ``client_options`` go to ``redis.asyncio.Redis.from_url`` (``socket_timeout``,
        ``ssl_ca_certs``, ``retry``...). Unless given, commands are retried three
        times with jittered backoff after a connection error; every script is
        safe to run twice for one call, so a retry never applies a change twice.
        """
        client_options.setdefault("retry", Retry(ExponentialWithJitterBackoff(), 3))
        client_options.setdefault("retry_on_error", [RedisConnectionError, RedisTimeoutError])
        client = Redis.from_url(url, **client_options)
        return cls(
            client,
            prefix=prefix,
            max_payload_bytes=max_payload_bytes,
            check_durability=check_durability,
        )

    async def __aenter__(self) -> RedisStore:
        await self._ready()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.client.aclose()

    # -- set-up -----------------------------------------------------------------

    async def _ready(self) -> dict[str, AsyncScript]:
        if self._scripts:
            return self._scripts
        async with self._ready_lock:
            if not self._scripts:
                shebang = await self._accepts_shebang()
                if self._check_durability:
                    await self._warn_if_not_durable()
                self._scripts = {
                    name: self.client.register_script(scripts.script_source(name, shebang=shebang))
                    for name in scripts.SCRIPT_NAMES
                }
        return self._scripts

    async def _accepts_shebang(self) -> bool:
        try:
            await self.client.eval("#!lua flags=no-writes\nreturn 1", 0)
        except ResponseError:
            return False
        return True

    async def _warn_if_not_durable(self) -> None:
        """Warn when Redis could lose acknowledged completions (no AOF, evicting keys)."""
        try:
            config = await self.client.config_get("appendonly")
            config.update(await self.client.config_get("maxmemory-policy"))
        except ResponseError:
            return  # CONFIG is disabled on many managed services
        settings = {_text(k): _text(v) for k, v in config.items() if k and v}
        if settings.get("appendonly", "yes") != "yes":
            logger.warning(
                "Redis has appendonly=no: a Redis crash can lose completed steps; "
                "enable AOF (appendonly yes, appendfsync everysec or always)"
            )
        policy = settings.get("maxmemory-policy", "noeviction")
        if policy != "noeviction":
            logger.warning(
                "Redis maxmemory-policy is %s: under memory pressure Redis may evict "
                "workflow state; use noeviction",
                policy,
            )

    async def _call(
        self,
        name: str,
        keys: Sequence[str],
        args: Sequence[Any],
        *,
        run_id: str,
        step_id: str = "",
        execution_id: int = 0,
    ) -> Any:
        script = (await self._ready())[name]
        try:
            return await script(keys=list(keys), args=list(args))
        except ResponseError as exc:
            scripts.raise_for_script_error(
                exc, run_id=run_id, step_id=step_id, execution_id=execution_id
            )

    async def time_ms(self) -> int:
        seconds, micros = await self.client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    # -- runs -----------------------------------------------------------------

    async def create_run(self, record: RunRecord) -> None:
        keys = self.keys.run(record.run_id)
        encoded = self._codec.encode_run(record)
        context = self._codec.encode_context(record.context, "context")
        fields = record.model_dump(mode="json", include=set(_RUN_FIELDS))
        fields.update(input=encoded.input, output=encoded.output, error=encoded.error)
        run_pairs: list[Any] = []
        for name in _RUN_FIELDS:
            value = fields[name]
            run_pairs += [name, value if isinstance(value, bytes) else _json.dumps(value)]
        context_pairs = [item for pair in context.items() for item in pair]
        # Index first: an entry without a run is dropped by readers, a run
        # without an entry could never be listed.
        await self.client.zadd(self.keys.runs_by_time, {record.run_id: record.created_at})
        await self._call(
            "create_run",
            [keys.run, keys.reqs, keys.reqlog, keys.ctx, keys.execs],
            [
                _request_id(),
                record.current_execution_id,
                _json.dumps(record.status.value),
                encoded.input,
                record.created_at,
                len(_RUN_FIELDS),
                *run_pairs,
                *context_pairs,
            ],
            run_id=record.run_id,
        )
        await self._index_status(record.run_id, record.status, record.created_at)

    async def _index_status(self, run_id: str, status: RunStatus, created_at: int) -> None:
        """Put the run in its status set and in no other (idempotent, one round trip)."""
        async with self.client.pipeline(transaction=False) as pipe:
            for candidate in RunStatus:
                key = self.keys.runs_by_status(candidate)
                if candidate == status:
                    pipe.zadd(key, {run_id: created_at})
                else:
                    pipe.zrem(key, run_id)
            await pipe.execute()

    async def get_run(self, run_id: str) -> RunRecord | None:
        keys = self.keys.run(run_id)
        raw = await self._call("get_run", [keys.run, keys.ctx], [], run_id=run_id)
        return self._decode_run(raw)

    def _decode_run(self, raw: Sequence[Any]) -> RunRecord | None:
        run_flat, ctx_flat = raw
        if not run_flat:
            return None
        fields = {name: _json.loads(value) for name, value in _pairs(run_flat).items()}
        fields["context"] = {key: _json.loads(value) for key, value in _pairs(ctx_flat).items()}
        return RunRecord.model_validate(fields)

    async def _get_existing(self, run_id: str) -> RunRecord:
        record = await self.get_run(run_id)
        if record is None:
            raise RunNotFoundError(run_id)
        return record

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
        status = RunStatus(status)
        keys = self.keys.run(run_id)
        output_json = self._codec.encode(output, "run output")
        error_json = self._codec.encode(error, "run error")
        kind, payload = self._event_args(event)
        await self._call(
            "set_run_status",
            [keys.run, keys.reqs, keys.reqlog, keys.execs, keys.events(execution_id)],
            [
                _request_id(),
                execution_id,
                _json.dumps(status.value),
                "1" if status.is_terminal else "0",
                output_json,
                error_json,
                kind,
                payload,
            ],
            run_id=run_id,
        )
        record = await self._get_existing(run_id)
        await self._index_status(run_id, record.status, record.created_at)
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
            [_request_id(), mode, *(item for pair in encoded.items() for item in pair)],
            run_id=run_id,
        )

    async def delete_run(self, run_id: str) -> bool:
        keys = self.keys.run(run_id)
        request_id = _request_id()
        for _ in range(_CONFLICT_RETRIES):
            execution_ids = await self._execution_ids(keys)
            try:
                deleted = await self._call(
                    "delete_run",
                    [
                        keys.run,
                        keys.tomb,
                        keys.execs,
                        keys.ctx,
                        keys.steps,
                        keys.order,
                        keys.reqs,
                        keys.reqlog,
                        *(keys.events(x) for x in execution_ids),
                    ],
                    [request_id, *execution_ids],
                    run_id=run_id,
                )
            except scripts.ExecutionsChangedError:
                continue  # an execution started in between: list them again
            await self._unindex(run_id)
            return bool(deleted)
        raise ConflictError(f"run {run_id!r} kept changing; delete it again")

    async def _execution_ids(self, keys: RunKeys) -> list[int]:
        fields = await self.client.hkeys(keys.execs)
        ids = {_text(f).partition("|")[0] for f in fields if _text(f).endswith("|status")}
        return sorted(int(x) for x in ids)

    async def _unindex(self, run_id: str) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zrem(self.keys.runs_by_time, run_id)
            for status in RunStatus:
                pipe.zrem(self.keys.runs_by_status(status), run_id)
            await pipe.execute()

    async def list_runs(self, *, limit: int = 100, offset: int = 0) -> list[RunRecord]:
        return await self._list_index(self.keys.runs_by_time, None, limit, offset)

    async def list_runs_by_status(
        self, status: RunStatus | str, *, limit: int = 100, offset: int = 0
    ) -> list[RunRecord]:
        wanted = RunStatus(status)
        return await self._list_index(self.keys.runs_by_status(wanted), wanted, limit, offset)

    async def _list_index(
        self, index: str, status: RunStatus | None, limit: int, offset: int
    ) -> list[RunRecord]:
        """One page of an index, newest first, with stale entries repaired on the way."""
        if limit <= 0:
            return []
        members = await self.client.zrevrange(index, offset, offset + limit - 1)
        ids = [_text(member) for member in cast("list[bytes | str]", members)]
        if not ids:
            return []
        get_run = (await self._ready())["get_run"]
        async with self.client.pipeline(transaction=False) as pipe:
            for run_id in ids:
                keys = self.keys.run(run_id)
                await get_run(keys=[keys.run, keys.ctx], args=[], client=pipe)
            raw_runs = await pipe.execute()
        records: list[RunRecord] = []
        for run_id, raw in zip(ids, raw_runs, strict=True):
            record = self._decode_run(raw)
            if record is None:
                await self.client.zrem(index, run_id)
            elif status is not None and record.status != status:
                await self._index_status(run_id, record.status, record.created_at)
            else:
                records.append(record)
        return records

    # -- steps ----------------------------------------------------------------

    async def upsert_step(self, run_id: str, step: StepState) -> None:
        keys = self.keys.run(run_id)
        sid = validate_step_id(step.step_id)
        row = _json.loads(self._codec.encode_step(step))
        pairs = [
            item for name in _STEP_FIELDS for item in (f"{sid}|{name}", _json.dumps(row[name]))
        ]
        await self._call(
            "upsert_step",
            [keys.run, keys.reqs, keys.reqlog, keys.steps, keys.order],
            [_request_id(), sid, *pairs],
            run_id=run_id,
            step_id=sid,
        )

    async def get_step(self, run_id: str, step_id: str) -> StepState | None:
        keys = self.keys.run(run_id)
        values = await self.client.hmget(keys.steps, [f"{step_id}|{f}" for f in _STEP_FIELDS])
        if values[0] is None:
            return None
        return self._decode_step(step_id, dict(zip(_STEP_FIELDS, values, strict=True)))

    def _decode_step(self, step_id: str, row: Mapping[str, Any]) -> StepState:
        fields = {name: _json.loads(row[name]) for name in _STEP_FIELDS}
        return StepState.model_validate({"step_id": step_id, **fields})

    async def list_steps(self, run_id: str) -> list[StepState]:
        keys = self.keys.run(run_id)
        order, flat = await self._call("list_steps", [keys.order, keys.steps], [], run_id=run_id)
        rows: dict[str, dict[str, Any]] = {}
        for field, value in _pairs(flat).items():
            sid, _, name = field.rpartition("|")
            rows.setdefault(sid, {})[name] = value
        return [self._decode_step(_text(sid), rows[_text(sid)]) for sid in order]

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
        keys = self.keys.run(run_id)
        validate_step_id(step_id)
        input_json = self._codec.encode(input, "step input")
        token = secrets.token_hex(16)
        reply = await self._call(
            "claim_step",
            [keys.run, keys.reqs, keys.reqlog, keys.steps, keys.order, keys.execs],
            [
                _request_id(),
                step_id,
                _json.dumps(name),
                _json.dumps(owner),
                token,
                int(lease_ms),
                execution_id,
                input_json,
            ],
            run_id=run_id,
            step_id=step_id,
            execution_id=execution_id,
        )
        epoch, _, expires = _text(reply).partition("|")
        return Lease(
            run_id=run_id,
            step_id=step_id,
            owner=owner,
            token=token,
            epoch=int(epoch),
            expires_at=int(expires),
            execution_id=execution_id,
        )

    async def renew_lease(self, lease: Lease, *, lease_ms: int = DEFAULT_LEASE_MS) -> Lease:
        keys = self.keys.run(lease.run_id)
        expires = await self._call(
            "renew_lease",
            [keys.run, keys.reqs, keys.reqlog, keys.steps],
            [_request_id(), lease.step_id, lease.token, lease.epoch, int(lease_ms)],
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
        keys = self.keys.run(lease.run_id)
        output_json = self._codec.encode(output, "step output")
        patch = self._codec.encode_context(context_patch or {}, "context patch")
        kind, payload = self._event_args(event)
        reply = await self._call(
            "complete_step",
            [
                keys.run,
                keys.reqs,
                keys.reqlog,
                keys.steps,
                keys.ctx,
                keys.execs,
                keys.events(lease.execution_id),
            ],
            [
                _request_id(),
                lease.step_id,
                lease.token,
                lease.epoch,
                lease.execution_id,
                output_json,
                kind,
                payload,
                *(item for pair in patch.items() for item in pair),
            ],
            run_id=lease.run_id,
            step_id=lease.step_id,
            execution_id=lease.execution_id,
        )
        if event is None:
            return None
        return _event_from_reply(reply, event.kind, payload)

    async def fail_step(
        self,
        lease: Lease,
        *,
        error: Any,
        final: bool,
        event: NewEvent | None = None,
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
                _request_id(),
                lease.step_id,
                lease.token,
                lease.epoch,
                lease.execution_id,
                error_json,
                "1" if final else "0",
                kind,
                payload,
            ],
            run_id=lease.run_id,
            step_id=lease.step_id,
            execution_id=lease.execution_id,
        )

    # -- history and executions -----------------------------------------------

    async def append_event(self, run_id: str, event: NewEvent, *, execution_id: int) -> Event:
        keys = self.keys.run(run_id)
        payload = self._codec.encode_event(event)
        reply = await self._call(
            "append_event",
            [keys.run, keys.reqs, keys.reqlog, keys.execs, keys.events(execution_id)],
            [_request_id(), execution_id, event.kind.value, payload],
            run_id=run_id,
            execution_id=execution_id,
        )
        return _event_from_reply(reply, event.kind, payload)

    async def read_history(self, run_id: str, execution_id: int | None = None) -> list[Event]:
        keys = self.keys.run(run_id)
        if execution_id is None:
            current = await self.client.hget(keys.run, "current_execution_id")
            if current is None:
                raise RunNotFoundError(run_id)
            execution_id = int(current)
        raw = await self._call(
            "read_history",
            [keys.run, keys.execs, keys.events(execution_id)],
            [execution_id],
            run_id=run_id,
            execution_id=execution_id,
        )
        return [Event.model_validate_json(item) for item in raw]

    async def list_executions(self, run_id: str) -> list[ExecutionInfo]:
        keys = self.keys.run(run_id)
        flat = await self._call("list_executions", [keys.run, keys.execs], [], run_id=run_id)
        rows: dict[int, dict[str, Any]] = {}
        for field, value in _pairs(flat).items():
            xid, _, name = field.partition("|")
            rows.setdefault(int(xid), {})[name] = _json.loads(value)
        return [_execution_info(xid, rows[xid]) for xid in sorted(rows)]

    async def continue_as_new(
        self,
        run_id: str,
        input: Any,
        *,
        execution_id: int,
        prune: PruneOptions | None = None,
    ) -> int:
        keys = self.keys.run(run_id)
        input_json = self._codec.encode(input, "continue-as-new input")
        new_id = execution_id + 1
        for _ in range(_CONFLICT_RETRIES):
            history_ids = await self._execution_ids(keys) if prune is not None else []
            try:
                result = await self._call(
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
                        _request_id(),
                        execution_id,
                        new_id,
                        input_json,
                        "0" if prune is None else "1",
                        *_prune_args(prune),
                        len(history_ids),
                        *history_ids,
                    ],
                    run_id=run_id,
                )
            except scripts.ExecutionsChangedError:
                continue  # another execution appeared between listing and pruning
            # The run was running and stays running: its status index is unchanged.
            return int(result)
        raise ConflictError(f"run {run_id!r}: executions kept changing; try again")

    async def prune_executions(self, run_id: str, options: PruneOptions) -> PruneResult:
        keys = self.keys.run(run_id)
        for _ in range(_CONFLICT_RETRIES):
            history_ids = await self._execution_ids(keys)
            try:
                deleted, events = await self._call(
                    "prune_executions",
                    [keys.run, keys.reqs, keys.reqlog, keys.execs, keys.steps, keys.order]
                    + [keys.events(x) for x in history_ids],
                    [_request_id(), *_prune_args(options), len(history_ids), *history_ids],
                    run_id=run_id,
                )
            except scripts.ExecutionsChangedError:
                continue
            return PruneResult(
                instances_processed=1, executions_deleted=deleted, events_deleted=events
            )
        raise ConflictError(f"run {run_id!r}: executions kept changing; try again")


def _prune_args(options: PruneOptions | None) -> list[Any]:
    if options is None:
        return ["", ""]
    return [
        "" if options.keep_last is None else options.keep_last,
        "" if options.completed_before is None else options.completed_before,
    ]


def _event_from_reply(reply: bytes | str, kind: EventKind, payload: bytes) -> Event:
    """The event a script appended, from its '<id>|<timestamp>' reply."""
    event_id, _, timestamp = _text(reply).partition("|")
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
