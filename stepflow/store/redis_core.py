"""The machinery under `RedisStore`: connection, scripts, counters, indexes.

`RedisCore` loads the Lua scripts, runs them (alone or in pipelines, with
NOSCRIPT handled), keeps the global counters and the global indexes. The
store's operations are in `stepflow.store.redis` (the hot path) and
`stepflow.store.redis_admin` (management); both build on this class.

Global counters (executions and events stored) are a hash under the index
tag, changed by ``bump_metrics.lua`` under the request id of the per-run
script whose change they count, so a re-sent request never counts twice.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, NamedTuple, Self, TypeVar, cast

import anyio
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from stepflow import _json
from stepflow.errors import ConflictError, InvalidArgumentError, StoreLayoutError
from stepflow.models import RunRecord, RunStatus, now_ms
from stepflow.store import connection, scripts
from stepflow.store.base import check_int
from stepflow.store.codec import Codec
from stepflow.store.connection import fast_client
from stepflow.store.keys import Keys, RunKeys

logger = logging.getLogger("stepflow.store.redis")

CONFLICT_RETRIES = 5
SCRIPT_BATCH = 500
"""Scripts per pipeline in a batch (bounded, so one reply list stays small)."""

T = TypeVar("T")


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def pairs(flat: Sequence[bytes | str]) -> dict[str, bytes | str]:
    return {text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}


def delta_pairs(deltas: Mapping[str, int]) -> list[Any]:
    """Counter name / delta pairs for ``bump_metrics.lua``, zeros left out."""
    return [item for name, delta in deltas.items() if delta for item in (name, int(delta))]


def delete_keys(keys: RunKeys, execution_ids: Sequence[int]) -> list[str]:
    """Every key ``delete_run.lua`` removes, in its KEYS order."""
    return [
        keys.run,
        keys.tomb,
        keys.execs,
        keys.ctx,
        keys.steps,
        keys.order,
        keys.reqs,
        keys.reqlog,
        keys.children,
        *(keys.events(x) for x in execution_ids),
    ]


LAYOUT = "2"
"""How runs are laid out in Redis; data under a prefix is in one layout only.

Layout 2: a step is four fields of its run's steps hash (``lua/_prelude.lua``).
A store refuses, before writing, a prefix whose data is in another layout.
The marker came after layout 2 did, so a prefix with runs but no marker
may hold either: the step rows of its newest runs tell (see
`_layout_of_unmarked`).
"""

_LAYOUT_2_FIELDS = frozenset({"l", "c", "r", "d"})
"""What a layout-2 steps-hash field ends with after its last '|' (layout 1: longer names)."""

_LAYOUT_SAMPLE = 32
"""How many of the newest runs an unmarked prefix's layout is read from."""

_LAST_INDEX = 2**62
"""The highest zset position a page asks Redis for: its indexes are 64-bit."""

INDEX_GRACE_MS = 60_000
"""How long an index entry may wait for its run to be written before readers drop it."""


_STATUS_POSITION = {status: position for position, status in enumerate(RunStatus, start=1)}
"""A status's place among the status sets ``index_run.lua`` is given (1-based, as in Lua)."""


def execution_ids(execs_fields: Sequence[Any]) -> list[int]:
    """The execution ids in a run's ``execs`` hash, from its field names, ascending."""
    return sorted(
        int(text(f).partition("|")[0]) for f in execs_fields if text(f).endswith("|status")
    )


class Deleted(NamedTuple):
    """What ``delete_run.lua`` removed of one run."""

    deleted: bool
    executions: int
    events: int
    counted: int
    """The run's events the global counter held (taken back from it)."""

    @classmethod
    def from_reply(cls, reply: Sequence[Any]) -> Deleted:
        deleted, executions, events, counted = (int(value) for value in reply)
        return cls(bool(deleted), executions, events, counted)


class RedisCore:
    """Connection, scripts, counters and indexes shared by the store's operations."""

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
    ) -> Self:
        """Connect by URL: ``redis://[:password@]host:port/db`` or ``rediss://`` for TLS.

        ``client_options`` go to ``redis.asyncio.Redis.from_url`` (``socket_timeout``,
        ``ssl_ca_certs``, ``retry``...). Unless given, commands are retried three
        times with jittered backoff after a connection error; every script is
        safe to run twice for one call, so a retry never applies a change twice.
        The client is `stepflow.store.connection.fast_client`'s: connections
        that pack and send commands the cheaper way (unless ``connection_class``
        is given) in a pool without per-command extras (unless redis-py's own
        pool does more than hand out connections: a ``credential_provider``, RESP3).
        """
        client_options.setdefault("retry", Retry(ExponentialWithJitterBackoff(), 3))
        client_options.setdefault("retry_on_error", [RedisConnectionError, RedisTimeoutError])
        if not isinstance(url, str):
            raise InvalidArgumentError(f"{cls.__name__}.from_url takes a URL str, got {url!r}")
        try:
            client = fast_client(url, **client_options)
        except ValueError as exc:  # redis-py's own words on what is wrong with the URL
            raise InvalidArgumentError(f"{cls.__name__}.from_url({url!r}): {exc}") from exc
        try:
            # Builds a connection without connecting: a misspelt option (``key_prefix=``)
            # fails here, not at the first command, deep inside redis-py.
            client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        except TypeError as exc:
            raise InvalidArgumentError(
                f"{cls.__name__}.from_url: an option redis-py's connection does not take ({exc})"
            ) from exc
        return cls(
            client,
            prefix=prefix,
            max_payload_bytes=max_payload_bytes,
            check_durability=check_durability,
        )

    async def __aenter__(self) -> Self:
        try:
            await self._ready()
        except BaseException:
            await self.aclose()  # __aexit__ does not run when entering fails
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.client.aclose()

    async def _ready(self) -> dict[str, AsyncScript]:
        if self._scripts:
            return self._scripts
        async with self._ready_lock:
            if not self._scripts:
                shebang = await self._accepts_shebang()
                if self._check_durability:
                    await self._warn_if_not_durable()
                registered = {
                    name: self.client.register_script(scripts.script_source(name, shebang=shebang))
                    for name in scripts.SCRIPT_NAMES
                }
                # Load them all now (one round trip), so a script first sent in a
                # pipeline finds itself; NOSCRIPT then only follows a flush or failover.
                # The same round trip reads the prefix's layout marker.
                async with self.client.pipeline(transaction=False) as pipe:
                    for script in registered.values():
                        pipe.script_load(script.script)
                    pipe.get(self.keys.layout)
                    pipe.zrevrange(self.keys.runs_by_time, 0, _LAYOUT_SAMPLE - 1)
                    *_, marker, newest = await pipe.execute()
                found = text(marker) if marker is not None else await self._mark_layout(newest)
                if found != LAYOUT:
                    raise StoreLayoutError(found, LAYOUT)
                self._scripts = registered
        return self._scripts

    async def _mark_layout(self, newest_runs: Sequence[bytes | str]) -> str:
        """The layout of a prefix without a marker; marked first when it is this one.

        Another store may mark the prefix meanwhile: its marker is the answer then.
        """
        found = await self._layout_of_unmarked([text(run_id) for run_id in newest_runs])
        if found != LAYOUT:
            return found  # refused: nothing is written
        earlier = await self.client.set(self.keys.layout, LAYOUT, nx=True, get=True)
        return LAYOUT if earlier is None else text(cast("bytes | str", earlier))

    async def _layout_of_unmarked(self, run_ids: list[str]) -> str:
        """The layout the newest runs' step rows are in (no runs: this one).

        A step row of layout 1 or a sample without any step row are refused as
        layout "1": marking layout-1 data as layout 2 would make its step rows
        read as absent, and a completed step would run again.
        """
        if not run_ids:
            return LAYOUT
        async with self.client.pipeline(transaction=False) as pipe:
            for run_id in run_ids:
                pipe.hscan(self.keys.run(run_id).steps, 0, count=4)
            pages = await pipe.execute()
        fields = [field for _, rows in pages for field in rows]
        if fields and all(text(f).rpartition("|")[2] in _LAYOUT_2_FIELDS for f in fields):
            return LAYOUT
        return "1"

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
        settings = {text(k): text(v) for k, v in config.items() if k and v}
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
            return await self._run_script(script, keys, args)
        except ResponseError as exc:
            scripts.raise_for_script_error(
                exc, run_id=run_id, step_id=step_id, execution_id=execution_id
            )

    async def _run_script(
        self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]
    ) -> Any:
        """EVALSHA ``script``; after NOSCRIPT (a flush, a failover) load it and send it again.

        What calling the ``AsyncScript`` does, without its copies of the
        arguments and its wrapper call, sent by `connection.evalsha`: a step
        runs one script, so this is on every step's path.
        """
        try:
            return await connection.evalsha(self.client, script.sha, keys, args)
        except NoScriptError:
            script.sha = await self.client.script_load(script.script)
            return await connection.evalsha(self.client, script.sha, keys, args)

    def _script_command(
        self, name: str, keys: Sequence[str], args: Sequence[Any]
    ) -> tuple[Any, ...]:
        """Script ``name`` as a command for `_pipelined` (after `_ready`: the scripts loaded)."""
        return ("EVALSHA", self._scripts[name].sha, len(keys), *keys, *args)

    def _time_entry(self, run_id: str, created_at: int, *, keep_score: bool) -> tuple[Any, ...]:
        """``ZADD`` of the run to the runs-by-time index, for `_pipelined`; ``keep_score``: NX."""
        return (
            "ZADD",
            self.keys.runs_by_time,
            *(("NX",) if keep_score else ()),
            created_at,
            run_id,
        )

    async def _pipelined(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Send ``commands`` in one round trip; their replies (error replies as `ResponseError`)."""
        return await connection.pipelined(self.client, commands)

    async def _rerun_if_noscript(
        self, reply: Any, name: str, keys: Sequence[str], args: Sequence[Any]
    ) -> Any:
        """A pipelined script's reply; one refused as NOSCRIPT is run again on its own.

        NOSCRIPT (after ``SCRIPT FLUSH`` or a failover) means the script did
        nothing; running it alone loads it. An error reply is returned, not raised.
        """
        if not isinstance(reply, NoScriptError):
            return reply
        try:
            return await self._run_script((await self._ready())[name], keys, args)
        except ResponseError as exc:
            return exc

    async def _resolve(
        self,
        reply: Any,
        name: str,
        keys: Sequence[str],
        args: Sequence[Any],
        *,
        run_id: str,
        step_id: str = "",
        execution_id: int = 0,
    ) -> Any:
        """The result of a script sent in a pipeline; a refusal raises its `StepflowError`."""
        reply = await self._rerun_if_noscript(reply, name, keys, args)
        if isinstance(reply, ResponseError):
            scripts.raise_for_script_error(
                reply, run_id=run_id, step_id=step_id, execution_id=execution_id
            )
        return reply

    async def _script_batch(
        self, name: str, calls: Sequence[tuple[list[str], list[Any]]]
    ) -> list[Any]:
        """Run script ``name`` once per call, pipelined in batches; replies or `ResponseError`s."""
        await self._ready()
        replies: list[Any] = []
        for start in range(0, len(calls), SCRIPT_BATCH):
            chunk = calls[start : start + SCRIPT_BATCH]
            results = await self._pipelined(
                [self._script_command(name, keys, args) for keys, args in chunk]
            )
            for (keys, args), result in zip(chunk, results, strict=True):
                replies.append(await self._rerun_if_noscript(result, name, keys, args))
        return replies

    @property
    def _metric_keys(self) -> list[str]:
        return [self.keys.metrics, self.keys.metrics_reqs, self.keys.metrics_reqlog]

    async def _bump(self, request_id: str, deltas: Mapping[str, int]) -> None:
        """Add ``deltas`` to the global counters, once for ``request_id``."""
        flat = delta_pairs(deltas)
        if flat:
            await self._call("bump_metrics", self._metric_keys, [request_id, *flat], run_id="")

    async def _entry_is_current(
        self,
        index: str,
        run_id: str,
        score: float,
        wanted: RunStatus | None,
        actual: RunStatus | None,
    ) -> bool:
        """Whether a listed index entry stands for its run; a stale one is repaired.

        ``actual`` is the run's stored status (None: no such run). An entry
        without its run is dropped, unless it is young: runs are indexed
        before they are written, so it may be a create in flight, and
        dropping it would hide that run from every listing for good. Entries
        older than `INDEX_GRACE_MS` are left by deletes and crashes, and go.
        A run listed under another status than its own is moved.
        """
        if actual is None:
            if score < now_ms() - INDEX_GRACE_MS:
                await self.client.zrem(index, run_id)
            return False
        if wanted is not None and actual != wanted:
            await self._index_status(run_id, actual)
            return False
        return True

    async def time_ms(self) -> int:
        seconds, micros = await self.client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def _index_status(
        self,
        run_id: str,
        status: RunStatus,
        *,
        count: tuple[str, Mapping[str, int]] | None = None,
    ) -> None:
        """Put the run in its status set and in no other (idempotent, one round trip).

        ``count`` (request id, deltas) adds the change the run's script made
        to the global counters in the same script.
        """
        keys, args = self._index_call(run_id, status, count)
        await self._call("index_run", keys, args, run_id=run_id)

    async def _index_page(
        self, index: str, limit: int, offset: int, oldest_first: bool
    ) -> list[tuple[str, float]]:
        """(run id, score) of one page of an index zset, newest first unless ``oldest_first``."""
        check_int(limit, "limit", 0)
        check_int(offset, "offset", 0)
        if limit == 0 or offset > _LAST_INDEX:
            return []
        page = self.client.zrange if oldest_first else self.client.zrevrange
        last = min(offset + limit - 1, _LAST_INDEX)  # Redis takes 64-bit indexes only
        entries = cast(
            "list[tuple[bytes, float]]",
            await page(index, offset, last, withscores=True),
        )
        return [(text(member), score) for member, score in entries]

    async def _reindex(self, run_id: str) -> None:
        """Index the run under the status it has (after a refused change was indexed ahead)."""
        status = await self.client.hget(self.keys.run(run_id).run, "status")
        if status is not None:
            await self._index_status(run_id, RunStatus(_json.loads(status)))

    def _index_call(
        self,
        run_id: str,
        status: RunStatus | None,
        count: tuple[str, Mapping[str, int]] | None = None,
    ) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of ``index_run.lua`` (see `_index_status`), e.g. for a pipeline.

        ``status`` None takes the run out of every status set (a delete).
        """
        flat = delta_pairs(count[1]) if count is not None else []
        request_id = count[0] if count is not None and flat else ""
        position = _STATUS_POSITION[status] if status is not None else 0
        return (
            [self.keys.runs_by_time, *self._metric_keys, *self._status_keys],
            [run_id, position, request_id, *flat],
        )

    @property
    def _status_keys(self) -> list[str]:
        return [self.keys.runs_by_status(status) for status in RunStatus]

    def _decode_run(self, raw: Sequence[Any]) -> RunRecord | None:
        run_flat, ctx_flat = raw
        if not run_flat:
            return None
        fields = {
            name: _json.loads(value)
            for name, value in pairs(run_flat).items()
            if not name.startswith("~")  # a delete's fence, not part of the record
        }
        fields["context"] = {key: _json.loads(value) for key, value in pairs(ctx_flat).items()}
        return RunRecord.model_validate(fields)

    async def _delete_one(self, run_id: str, request_id: str, mode: str) -> Deleted:
        """Run ``delete_run.lua`` for one run."""
        keys = self.keys.run(run_id)

        async def delete(execution_ids: list[int]) -> Deleted:
            reply = await self._call(
                "delete_run",
                delete_keys(keys, execution_ids),
                [request_id, mode, *execution_ids],
                run_id=run_id,
            )
            return Deleted.from_reply(reply)

        return await self._with_execution_ids(run_id, delete)

    async def _with_execution_ids(
        self,
        run_id: str,
        script_call: Callable[[list[int]], Awaitable[T]],
        *,
        needed: bool = True,
    ) -> T:
        """Run a script that must be given every execution's history key.

        No script builds key names, so the caller lists the executions first
        and the script checks the list; when an execution appeared in between
        (continue-as-new) it refuses, and the list is read again.
        """
        keys = self.keys.run(run_id)
        for _ in range(CONFLICT_RETRIES):
            execution_ids = await self._execution_ids(keys) if needed else []
            try:
                return await script_call(execution_ids)
            except scripts.ExecutionsChangedError:
                continue
        raise ConflictError(f"run {run_id!r}: its executions kept changing; try again")

    async def _execution_ids(self, keys: RunKeys) -> list[int]:
        return execution_ids(await self.client.hkeys(keys.execs))

    async def _unindex(
        self,
        run_ids: Sequence[str],
        request_id: str,
        counts: Mapping[str, Deleted],
    ) -> None:
        """Drop deleted runs from the indexes and their counts from the counters.

        ``counts`` maps a deleted run to what its delete removed; each run's
        counts go under ``<request id>:<run id>``, so two processes finishing
        the same delete count each run once. One round trip (pipelined): per
        run, its time entry goes, then ``index_run.lua`` with no status takes
        it out of the status sets and takes back its counts.
        """
        await self._ready()
        calls = []
        for run_id in run_ids:
            deleted = counts.get(run_id)
            deltas = (
                {"executions": -deleted.executions, "events": -deleted.counted} if deleted else {}
            )
            calls.append(
                (run_id, *self._index_call(run_id, None, (f"{request_id}:{run_id}", deltas)))
            )
        commands = []
        for run_id, keys, args in calls:
            # The time entry first: index_run then finds no time entry.
            commands.append(("ZREM", self.keys.runs_by_time, run_id))
            commands.append(self._script_command("index_run", keys, args))
        replies = await self._pipelined(commands)
        for (run_id, keys, args), reply in zip(calls, replies[1::2], strict=True):
            await self._resolve(reply, "index_run", keys, args, run_id=run_id)
