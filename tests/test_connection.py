"""`RedisStore.from_url` connections: same bytes on the wire, bounded writes, redis-py's errors."""

from __future__ import annotations

import signal
from typing import Any

import anyio
import pytest
from conftest import RedisServer
from redis.asyncio import Redis
from redis.asyncio.connection import (
    Connection,
    ConnectionPool,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.credentials import UsernamePasswordCredentialProvider
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, MaxConnectionsError, NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from stepflow import RedisStore
from stepflow.store.connection import (
    FastConnection,
    FastSSLConnection,
    FastUnixConnection,
    LeanConnectionPool,
    evalsha,
    fast_client,
    pipelined,
)

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    "args",
    [
        ("EVALSHA", "ab12", 2, "{run}:a", "{run}:b", "réponse", b"\x00\xff", 0, -7, 10**18),
        ("SCRIPT LOAD", "return 1"),
        (b"CONFIG GET", "maxmemory-policy"),
        ("HSET", "k", "f", ""),
        ("SET", "k", bytearray(b"ba"), memoryview(b"mv")),
    ],
)
def test_packs_the_same_bytes_as_redis_py(args: tuple[object, ...]) -> None:
    fast, stock = FastConnection(), Connection()
    assert b"".join(fast.pack_command(*args)) == b"".join(stock.pack_command(*args))


def test_a_pipeline_packs_as_redis_py_does() -> None:
    commands = [("SET", "a", "1"), ("SCRIPT LOAD", "return 1"), ("EVALSHA", "ab", 0)]
    fast, stock = FastConnection(), Connection()
    assert b"".join(fast.pack_commands(commands)) == b"".join(stock.pack_commands(commands))


@pytest.mark.parametrize("bad", [None, True, {"a": 1}])
def test_a_value_redis_py_refuses_is_refused_alike(bad: object) -> None:
    with pytest.raises(DataError):
        FastConnection().pack_command("SET", "k", bad)


def test_text_is_encoded_as_the_client_asks_when_not_strict_utf8() -> None:
    """hiredis encodes strict UTF-8 only; other settings take redis-py's packer."""
    fast = FastConnection(encoding="latin-1", encoding_errors="replace")
    stock = Connection(encoding="latin-1", encoding_errors="replace")
    args = ("SET", "k", "café ✓")
    assert b"".join(fast.pack_command(*args)) == b"".join(stock.pack_command(*args))


@pytest.mark.parametrize(
    ("url", "fast", "stock"),
    [
        ("redis://127.0.0.1:6379/0", FastConnection, Connection),
        ("rediss://example.com:6380/0", FastSSLConnection, SSLConnection),
        ("unix:///tmp/redis.sock", FastUnixConnection, UnixDomainSocketConnection),
    ],
)
def test_from_url_keeps_the_kind_of_connection_the_url_asks_for(
    url: str, fast: type, stock: type
) -> None:
    store = RedisStore.from_url(url)
    connection_class = store.client.connection_pool.connection_class
    assert connection_class is fast
    assert issubclass(connection_class, stock)


def test_from_url_keeps_a_connection_class_the_caller_gives() -> None:
    store = RedisStore.from_url("redis://127.0.0.1:6379/0", connection_class=Connection)
    assert store.client.connection_pool.connection_class is Connection


def test_from_url_keeps_redis_pys_pool_for_a_credential_provider() -> None:
    """The lean pool skips the after-release event that re-authenticates connections."""
    plain = RedisStore.from_url("redis://127.0.0.1:6379/0")
    assert type(plain.client.connection_pool) is LeanConnectionPool
    provider = UsernamePasswordCredentialProvider("user", "secret")
    with_provider = RedisStore.from_url("redis://127.0.0.1:6379/0", credential_provider=provider)
    assert type(with_provider.client.connection_pool) is ConnectionPool
    assert with_provider.client.connection_pool.connection_class is FastConnection
    # RESP3 brings maintenance notifications, which redis-py handles under its pool's lock.
    for resp3 in (fast_client("redis://127.0.0.1:6379/0?protocol=3"),
                  fast_client("redis://127.0.0.1:6379/0", protocol=3)):  # fmt: skip
        assert type(resp3.connection_pool) is ConnectionPool


async def test_the_lean_pool_shares_connections_among_concurrent_callers(redis_url: str) -> None:
    client = fast_client(redis_url)
    pool = client.connection_pool
    key = "stepflow-test:lean-pool"
    try:
        for _ in range(20):  # one caller at a time: one connection, reused
            await client.incr(key)
        assert len(pool._available_connections) == 1
        assert not pool._in_use_connections

        async def caller() -> None:
            for _ in range(20):
                await client.incr(key)

        async with anyio.create_task_group() as tg:
            for _ in range(30):
                tg.start_soon(caller)
        assert await client.get(key) == b"620"
        assert not pool._in_use_connections, "every connection went back to the pool"
        assert 1 < len(pool._available_connections) <= 30
    finally:
        await client.delete(key)
        await client.aclose()


async def test_the_lean_pool_keeps_to_max_connections(redis_url: str) -> None:
    pool = LeanConnectionPool.from_url(redis_url, max_connections=2)
    try:
        first, second = await pool.get_connection(), await pool.get_connection()
        with pytest.raises(MaxConnectionsError):
            await pool.get_connection()
        await pool.release(first)
        assert await pool.get_connection() is first
        await pool.release(first)
        await pool.release(second)
    finally:
        await pool.disconnect()


async def test_a_command_cancelled_mid_reply_leaves_no_reply_behind(redis_url: str) -> None:
    """The next command on a pooled connection must read its own reply, not the cancelled one's."""
    client = fast_client(redis_url, max_connections=1)
    try:
        with anyio.move_on_after(0.1):
            await client.blpop(["stepflow-test:never-filled"], timeout=0.3)
        await client.set("stepflow-test:after-cancel", "mine")
        assert await client.get("stepflow-test:after-cancel") == b"mine"
        assert await client.ping() is True
    finally:
        await client.delete("stepflow-test:after-cancel")
        await client.aclose()


async def test_fast_client_takes_the_options_redis_from_url_takes(redis_url: str) -> None:
    client = fast_client(redis_url, auto_close_connection_pool=True, single_connection_client=True)
    try:
        assert await client.ping() is True
    finally:
        await client.aclose()


async def test_commands_and_pipelines_round_trip_on_a_real_server(redis_url: str) -> None:
    client = Redis.from_url(redis_url, connection_class=FastConnection)
    try:
        value = "x" * 200_000  # larger than redis-py's chunking cutoff
        await client.set("stepflow-test:conn", value)
        assert await client.get("stepflow-test:conn") == value.encode()
        async with client.pipeline(transaction=False) as pipe:
            pipe.incr("stepflow-test:conn-n").incr("stepflow-test:conn-n")
            assert await pipe.execute() == [1, 2]
    finally:
        await client.delete("stepflow-test:conn", "stepflow-test:conn-n")
        await client.aclose()


async def test_a_write_that_cannot_finish_times_out_and_drops_the_connection(
    own_server: RedisServer,
) -> None:
    """A Redis that stops reading (here: SIGSTOP) fails a write after socket_timeout."""
    connection = FastConnection(port=own_server.port, socket_timeout=0.5)
    await connection.connect()
    writer = connection._writer
    assert own_server.process is not None
    assert writer is not None
    own_server.process.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(RedisTimeoutError, match="writing"):
            await connection.send_command("SET", "k", "x" * 50_000_000)
        assert not connection.is_connected
    finally:
        own_server.process.send_signal(signal.SIGCONT)
        writer.transport.abort()  # closing, with megabytes unsent: drop them now


COUNTING_SCRIPT = "return {KEYS[1], ARGV[1], redis.call('INCR', KEYS[1])}"
"""Replies with its key, its argument and how often it ran on that key."""


async def send_alone(client: Redis, sha: str, key: str, arg: str) -> Any:
    return await evalsha(client, sha, [key] if key else [], [arg])


async def send_pipelined(client: Redis, sha: str, key: str, arg: str) -> Any:
    """The script second in a pipeline, after a command of another kind."""
    keys = [key] if key else []
    removed, reply = await pipelined(
        client, [("ZREM", "stepflow-test:none", "m"), ("EVALSHA", sha, len(keys), *keys, arg)]
    )
    assert removed == 0
    return reply


SENDERS = pytest.mark.parametrize(
    "send", [send_alone, send_pipelined], ids=["evalsha", "pipelined"]
)


async def test_a_script_sent_on_the_lean_pool_replies_and_fails_as_redis_py_does(
    redis_url: str,
) -> None:
    fast, stock = fast_client(redis_url), Redis.from_url(redis_url)
    key = "stepflow-test:evalsha"
    try:
        sha = await stock.script_load(COUNTING_SCRIPT)
        assert await evalsha(fast, sha, [key], ["réponse"]) == [
            key.encode(),
            "réponse".encode(),
            1,
        ]
        assert await stock.evalsha(sha, 1, key, "réponse") == [key.encode(), "réponse".encode(), 2]
        with pytest.raises(NoScriptError):
            await evalsha(fast, "0" * 40, [key], [])
        failing = await stock.script_load("return redis.error_reply('SF_TEST refused')")
        with pytest.raises(ResponseError, match="SF_TEST refused"):
            await evalsha(fast, failing, [], [])
        # Error replies leave the connection in step: the next reply is its own.
        assert await evalsha(fast, sha, [key], ["next"]) == [key.encode(), b"next", 3]
        pool = fast.connection_pool
        assert len(pool._available_connections) == 1
        assert not pool._in_use_connections
    finally:
        await stock.delete(key)
        await stock.aclose()
        await fast.aclose()


async def test_a_pipeline_on_the_lean_pool_replies_as_redis_pys_does(redis_url: str) -> None:
    """Replies in order, each error reply in its command's place, the connection still in step."""
    fast, stock = fast_client(redis_url), Redis.from_url(redis_url)
    try:
        sha = await stock.script_load(COUNTING_SCRIPT)
        failing = await stock.script_load("return redis.error_reply('SF_TEST refused')")

        def batch(key: str) -> list[tuple[Any, ...]]:
            return [
                ("ZADD", f"{key}:z", "NX", 5, "member"),
                ("EVALSHA", sha, 1, key, "réponse"),
                ("EVALSHA", failing, 0),
                ("EVALSHA", "0" * 40, 0),
                ("EVALSHA", sha, 1, key, "after"),
            ]

        lean = await pipelined(fast, batch("stepflow-test:lean"))
        async with stock.pipeline(transaction=False) as pipe:
            for command in batch("stepflow-test:stock"):
                pipe.execute_command(*command)
            stocked = await pipe.execute(raise_on_error=False)

        def shown(replies: list[Any], key: str) -> list[Any]:
            return [
                (type(r).__name__, str(r)) if isinstance(r, Exception) else r
                for r in (r if not isinstance(r, list) else [x for x in r if x != key.encode()]
                          for r in replies)
            ]  # fmt: skip

        assert shown(lean, "stepflow-test:lean") == shown(stocked, "stepflow-test:stock")
        assert isinstance(lean[2], ResponseError)
        assert isinstance(lean[3], NoScriptError)
        assert lean[4] == [b"stepflow-test:lean", b"after", 2]
        assert await pipelined(fast, [("ECHO", "mine")]) == [b"mine"]
        assert len(fast.connection_pool._available_connections) == 1
    finally:
        keys = ("stepflow-test:lean", "stepflow-test:stock")
        await stock.delete(*keys, *(f"{key}:z" for key in keys))
        await stock.aclose()
        await fast.aclose()


@pytest.mark.parametrize(
    ("send", "redis_py_call"),
    [(send_alone, "evalsha"), (send_pipelined, "pipeline")],
    ids=["evalsha", "pipelined"],
)
@pytest.mark.parametrize(
    "options",
    [{"single_connection_client": True}, {"protocol": 3}],
    ids=["single connection", "redis-py's pool (RESP3)"],
)
async def test_a_script_on_another_client_goes_through_redis_py(
    redis_url: str, options: dict[str, object], send: Any, redis_py_call: str
) -> None:
    """Its own connection handling stays in charge: a single connection, or redis-py's pool.

    The script is the client's first command: a single connection is taken by the first.
    """
    client, loader = fast_client(redis_url, **options), Redis.from_url(redis_url)
    key = "stepflow-test:evalsha-other"
    calls = []
    plain = getattr(client, redis_py_call)

    def recorded(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return plain(*args, **kwargs)

    setattr(client, redis_py_call, recorded)
    try:
        sha = await loader.script_load(COUNTING_SCRIPT)
        assert await send(client, sha, key, "a") == [key.encode(), b"a", 1]
        assert len(calls) == 1
    finally:
        await loader.delete(key)
        await loader.aclose()
        await client.aclose()


@SENDERS
@pytest.mark.parametrize("retries", [1, 0])
async def test_a_script_on_a_dropped_connection_is_retried_as_the_client_says(
    redis_url: str, send: Any, retries: int
) -> None:
    """The server closed the pooled connection: a retry reconnects and the script runs once.

    Without retries the connection error reaches the caller, as from redis-py's own call.
    """
    client = fast_client(redis_url, retry=Retry(NoBackoff(), retries))
    admin = Redis.from_url(redis_url)
    key = "stepflow-test:evalsha-dropped"
    try:
        sha = await client.script_load(COUNTING_SCRIPT)
        await send(client, sha, key, "first")
        dropped = await client.client_id()  # the pool's one connection
        assert await admin.client_kill_filter(_id=dropped) == 1
        if retries:
            assert await send(client, sha, key, "again") == [key.encode(), b"again", 2]
            assert await client.client_id() != dropped
        else:
            with pytest.raises(RedisConnectionError):
                await send(client, sha, key, "again")
            assert await admin.get(key) == b"1"
    finally:
        await admin.delete(key)
        await admin.aclose()
        await client.aclose()


@SENDERS
async def test_a_script_cancelled_before_its_reply_leaves_no_reply_behind(
    own_server: RedisServer, send: Any
) -> None:
    """The next script on the pool's one connection must read its own reply."""
    client = fast_client(own_server.url, max_connections=1)
    assert own_server.process is not None
    try:
        sha = await client.script_load("return ARGV[1]")
        own_server.process.send_signal(signal.SIGSTOP)  # the reply will come late
        try:
            with anyio.move_on_after(0.2):
                await send(client, sha, "", "cancelled")
                pytest.fail("a stopped server answered")
        finally:
            own_server.process.send_signal(signal.SIGCONT)
        assert await send(client, sha, "", "mine") == b"mine"
    finally:
        await client.aclose()
