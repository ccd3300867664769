"""`RedisStore.from_url` connections: same bytes on the wire, bounded writes, redis-py's errors."""

from __future__ import annotations

import signal

import pytest
from conftest import RedisServer
from redis.asyncio import Redis
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import DataError
from redis.exceptions import TimeoutError as RedisTimeoutError

from stepflow import RedisStore
from stepflow.store.connection import (
    FastConnection,
    FastSSLConnection,
    FastUnixConnection,
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
