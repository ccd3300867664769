"""A cheaper redis-py asyncio client for `RedisStore.from_url`: connections and pool.

A step costs one EVALSHA with some twenty arguments, so the fixed cost of
sending a command is a large part of a step. Three parts of redis-py's
asyncio client cost more than they need to:

- its `Connection` packs commands in Python, argument by argument (its sync
  client packs with ``hiredis.pack_command``, in C);
- with a ``socket_timeout`` (5 s by default since redis-py 6) it bounds each
  write with ``asyncio.wait_for``, which creates a task per command;
- its `ConnectionPool`, for every command, takes an asyncio lock, records
  OpenTelemetry connection counts (four awaits) and dispatches an
  after-release event; together about a tenth of a step's client time.

`FastSendMixin` packs with hiredis and bounds a write with ``asyncio.timeout``
(a timer on the loop, no task; reliable from Python 3.11.3, which stepflow
requires), and only a write that has to wait: a command the socket takes at
once, as a step's does, sets no timer at all. `LeanConnectionPool` hands
connections out and takes them back without the extras. Everything else
(connecting, health checks, reading, retries, errors) is redis-py's own: the
fast path hands over to it for anything it does not handle. `fast_client`
puts the parts together; `evalsha` and `pipelined` send a script, or a
batch of commands, on its connections without the layers redis-py's
command and pipeline calls wrap around the send and the reads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    ConnectionPool,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

T = TypeVar("T")

_UTF8 = frozenset({"utf-8", "utf8", "utf_8"})


def _split_command_name(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """``("SCRIPT LOAD", src)`` -> ``("SCRIPT", "LOAD", src)``, as redis-py's packer does."""
    first = args[0]
    if isinstance(first, str) and " " in first:
        return (*first.split(), *args[1:])
    if isinstance(first, bytes) and b" " in first:
        return (*first.split(), *args[1:])
    return args  # as is: a step's EVALSHA is not copied


class FastSendMixin(AbstractConnection):
    """Pack with hiredis, write under a timer; mixed in before a redis-py connection class."""

    def pack_command(self, *args: Any) -> list[bytes]:
        encoder = self.encoder
        if encoder.encoding_errors != "strict" or encoder.encoding.lower() not in _UTF8:
            return super().pack_command(*args)  # hiredis encodes text as strict UTF-8
        try:
            return [hiredis.pack_command(_split_command_name(args))]
        except TypeError:  # None, bool, bytearray...: redis-py's packer raises its DataError
            return super().pack_command(*args)

    def pack_commands(self, commands: Iterable[Iterable[Any]]) -> list[bytes]:
        return [b"".join(chunk for command in commands for chunk in self.pack_command(*command))]

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        if (
            not self.is_connected
            or (check_health and self.health_check_interval)
            or not self.socket_timeout
            or isinstance(command, (bytes, str))
        ):
            return await super().send_packed_command(command, check_health)
        writer = self._writer
        assert writer is not None  # is_connected
        try:
            writer.writelines(command)
            transport = writer.transport
            if not transport.get_write_buffer_size() and not transport.is_closing():
                return  # all of it is with the kernel: nothing to wait for, nothing to bound
            async with asyncio.timeout(self.socket_timeout):
                await writer.drain()
        except TimeoutError:  # before OSError: TimeoutError is one
            await self.disconnect(nowait=True)
            raise RedisTimeoutError("Timeout writing to socket") from None
        except OSError as exc:
            await self.disconnect(nowait=True)
            raise RedisConnectionError(f"Error while writing to socket: {exc}") from exc
        except BaseException:
            # As redis-py: a write cut short leaves the protocol out of step.
            await self.disconnect(nowait=True)
            raise


class FastConnection(FastSendMixin, Connection):
    """TCP (``redis://``)."""


class FastSSLConnection(FastSendMixin, SSLConnection):
    """TLS (``rediss://``)."""


class FastUnixConnection(FastSendMixin, UnixDomainSocketConnection):
    """Unix socket (``unix://``)."""


_FAST = {
    Connection: FastConnection,
    SSLConnection: FastSSLConnection,
    UnixDomainSocketConnection: FastUnixConnection,
}


class LeanConnectionPool(ConnectionPool):
    """A `ConnectionPool` that hands out and takes back connections without per-command extras.

    It does what redis-py's pool does minus the lock, the connection-count
    metrics and the after-release event. No lock is needed on one event loop:
    nothing awaits between taking a connection off the idle list and marking
    it in use. The event only matters to a streaming credential provider
    (it re-authenticates released connections), and RESP3's maintenance
    notifications are handled under the lock, so `fast_client` uses this pool
    only without either. redis-py's OpenTelemetry pool metrics are not
    recorded for it.
    """

    async def get_connection(self, *_deprecated: Any, **_options: Any) -> AbstractConnection:
        connection: AbstractConnection = self.get_available_connection()  # type: ignore[no-untyped-call]
        try:
            await self.ensure_connection(connection)
        except BaseException:
            await self.release(connection)
            raise
        return connection

    async def release(self, connection: AbstractConnection) -> None:
        try:
            if connection.should_reconnect():  # type: ignore[no-untyped-call]
                await connection.disconnect()
        finally:  # both at once: a connection is always in one of the two sets
            self._in_use_connections.remove(connection)
            self._available_connections.append(connection)


def fast_client(url: str, **options: Any) -> Redis:
    """``Redis.from_url(url, **options)``, with fast connections and the lean pool.

    A ``connection_class`` the caller gives is kept, and with a
    ``credential_provider`` or RESP3 redis-py's own pool is kept (see
    `LeanConnectionPool`).
    """
    single_connection_client = options.pop("single_connection_client", False)
    options.pop("auto_close_connection_pool", None)  # as Redis.from_url: the client closes it
    # redis-py's own pool where it does more per command than hand connections
    # out: re-authentication, and maintenance notifications (RESP3) under its lock.
    settings = {**options, **parse_url(url)}  # the URL's query string wins, as in from_url
    stock = {"credential_provider", "maint_notifications_config"} & settings.keys()
    resp3 = str(settings.get("protocol")) == "3"
    pool_class = ConnectionPool if stock or resp3 else LeanConnectionPool
    pool = pool_class.from_url(url, **options)
    if "connection_class" not in options:
        pool.connection_class = _FAST.get(pool.connection_class, pool.connection_class)
    client = Redis(connection_pool=pool, single_connection_client=single_connection_client)
    client.auto_close_connection_pool = True  # as Redis.from_url: closing the client closes it
    return client


def _lean_pool(client: Redis) -> LeanConnectionPool | None:
    """The `LeanConnectionPool` ``client`` takes its connections from, if it does."""
    pool = client.connection_pool
    if not client.single_connection_client and isinstance(pool, LeanConnectionPool):
        return pool
    return None


async def _with_retries(connection: AbstractConnection, attempt: Callable[[], Awaitable[T]]) -> T:
    """``attempt()`` under the connection's retry policy, as redis-py runs a command on it.

    The first attempt runs before the policy is involved, as it nearly always
    succeeds (this is every step's path); its failure is handed to the
    policy's loop as the loop's own first one, so it is judged (retry or
    raise), counted and backed off from as in redis-py. After a failure the
    connection is dropped, as redis-py does (it may be part-way through a
    reply; a failed send or read has mostly dropped it already), and the next
    attempt's send connects again.
    """
    try:
        return await attempt()
    except Exception as error:
        failed: Exception | None = error

    async def again() -> T:
        nonlocal failed
        if failed is not None:
            first, failed = failed, None
            raise first
        return await attempt()

    return await connection.retry.call_with_retry(again, lambda _: connection.disconnect())


async def evalsha(client: Redis, sha: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
    """``client.evalsha(sha, len(keys), *keys, *args)``, sent and read on a pooled connection.

    A step costs one script call. redis-py's call wraps the send and the read
    in timing, metrics and a response-callback lookup (EVALSHA has no
    callback), about a tenth of the client's instructions per step. On
    `fast_client`'s lean pool this takes a connection and sends and reads
    itself: the same send, the same read (with its timeout), the same errors
    (a `ResponseError` such as NOSCRIPT included) and the same retries after
    a connection error or timeout, under the client's retry policy. The
    script may so run twice for one call, as under redis-py's own retries:
    every stepflow script gives the same result when replayed. Any other
    client (a single connection, redis-py's pool, fakeredis) gets the plain
    ``client.evalsha``.
    """
    pool = _lean_pool(client)
    if pool is None:
        return await client.evalsha(sha, len(keys), *keys, *args)
    connection = await pool.get_connection()
    try:
        packed = connection.pack_command("EVALSHA", sha, len(keys), *keys, *args)

        async def attempt() -> Any:
            await connection.send_packed_command(packed)
            return await connection.read_response()

        return await _with_retries(connection, attempt)
    finally:
        await pool.release(connection)


async def pipelined(client: Redis, commands: Sequence[Sequence[Any]]) -> list[Any]:
    """Send ``commands`` in one write and read their replies: a pipeline, no transaction.

    As ``pipe.execute(raise_on_error=False)``: a command's error reply is
    returned in its place, as the `ResponseError`, and a connection error or
    timeout sends the whole batch again under the client's retry policy. A
    run's creation and its end are a pipeline each, and redis-py's costs about
    a third more than the send and the reads themselves. Replies are the
    server's own, without redis-py's response callbacks, which change
    nothing for what the store pipelines (scripts, ``ZADD``, ``ZREM``). Any
    other client (see `evalsha`) gets redis-py's pipeline.
    """
    pool = _lean_pool(client)
    if pool is None:
        async with client.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            return await pipe.execute(raise_on_error=False)
    connection = await pool.get_connection()
    try:
        packed = connection.pack_commands(commands)

        async def attempt() -> list[Any]:
            await connection.send_packed_command(packed)
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await connection.read_response())
                except ResponseError as error:  # the next reply is still the next command's
                    replies.append(error)
            return replies

        return await _with_retries(connection, attempt)
    finally:
        await pool.release(connection)
