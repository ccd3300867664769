"""Shared fixtures: every store behind one parametrised ``store`` fixture.

The real Redis is a ``redis-server`` this session starts on a free port, so
tests never depend on (or disturb) whatever else runs on the machine. When
no ``redis-server`` can be started, real-Redis tests skip locally and fail
under ``CI=true``. Each test gets its own key prefix; nothing is flushed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import fakeredis
import pytest

from stepflow import Engine, Lease, MemoryStore, RedisStore, RunRecord, WorkflowStore, registry
from stepflow.store import connection

STORE_KINDS = ("memory", "fakeredis", "redis")
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class RedisServer:
    """A ``redis-server`` process owned by the tests (it can be killed and restarted)."""

    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *extra: str) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not on PATH")
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


def need_real_redis(reason: str) -> None:
    """Skip locally; under CI a missing real Redis is a failure, never a silent skip."""
    if IN_CI:
        pytest.fail(f"real Redis required under CI: {reason}")
    pytest.skip(f"real Redis unavailable: {reason}")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(port=free_port(), directory=Path(tempfile.mkdtemp(prefix="stepflow-")))
    try:
        server.start()
    except (OSError, RuntimeError) as exc:
        need_real_redis(str(exc))
    yield server
    server.kill()
    shutil.rmtree(server.directory, ignore_errors=True)


@pytest.fixture
def own_server() -> Iterator[RedisServer]:
    """A private ``redis-server`` a test may reconfigure, kill and restart."""
    if shutil.which("redis-server") is None:
        need_real_redis("redis-server is not on PATH")
    server = RedisServer(port=free_port(), directory=Path(tempfile.mkdtemp(prefix="stepflow-")))
    server.start()
    yield server
    server.kill()
    shutil.rmtree(server.directory, ignore_errors=True)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def key_prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


async def make_store(
    kind: str, prefix: str, request: pytest.FixtureRequest, **options: Any
) -> WorkflowStore:
    """A fresh store of ``kind`` with ``options`` (``max_payload_bytes``); on Redis,
    isolated by ``prefix``."""
    if kind == "memory":
        return MemoryStore(**options)
    if kind == "fakeredis":
        client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        return RedisStore(client, prefix=prefix, **options)
    server: RedisServer = request.getfixturevalue("redis_server")
    return RedisStore.from_url(server.url, prefix=prefix, **options)


REAL_REDIS_FIXTURES = frozenset({"redis_server", "redis_url", "own_server"})


def store_kinds(*kinds: str) -> list[Any]:
    """Store kinds as fixture params, the real-Redis one marked ``redis``."""
    return [pytest.param(k, marks=pytest.mark.redis) if k == "redis" else k for k in kinds]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``redis`` every test that starts or uses a real redis-server."""
    for item in items:
        if REAL_REDIS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.redis)


@pytest.fixture(params=store_kinds(*STORE_KINDS))
def store_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
async def store(
    store_kind: str, key_prefix: str, request: pytest.FixtureRequest
) -> AsyncIterator[WorkflowStore]:
    instance = await make_store(store_kind, key_prefix, request)
    yield instance
    await instance.aclose()


@pytest.fixture(params=store_kinds("fakeredis", "redis"))
async def redis_store(request: pytest.FixtureRequest, key_prefix: str) -> AsyncIterator[RedisStore]:
    """A RedisStore on fakeredis and on the real server: for what only RedisStore promises."""
    instance = await make_store(request.param, key_prefix, request)
    assert isinstance(instance, RedisStore)
    yield instance
    await instance.aclose()


@contextmanager
def everything_sent_twice() -> Iterator[None]:
    """Send each script and pipeline of a `RedisStore` twice, as a retry after a lost reply does."""
    send, send_all = connection.evalsha, connection.pipelined
    doubled = 0

    async def script_twice(*args: Any) -> Any:
        nonlocal doubled
        doubled += 1
        await send(*args)
        return await send(*args)

    async def pipeline_twice(*args: Any) -> Any:
        nonlocal doubled
        doubled += 1
        await send_all(*args)
        return await send_all(*args)

    connection.evalsha, connection.pipelined = script_twice, pipeline_twice
    try:
        yield
    finally:
        connection.evalsha, connection.pipelined = send, send_all
    assert doubled, "nothing went through connection.evalsha or .pipelined: nothing was doubled"


class PassThroughStore:
    """A store that hands every call on to ``inner``: a test's subclass changes one or two
    calls (a fault, a delay) and casts it to `WorkflowStore` for the engine."""

    def __init__(self, inner: WorkflowStore) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class StoreDown(Exception):
    """Stands for a store call failing: a dropped connection, past the client's retries."""


class FailingCompletions(PassThroughStore):
    """Step completions raise `StoreDown` while ``fails(lease)`` says so; the rest go through."""

    def __init__(self, inner: WorkflowStore, fails: Callable[[Lease], bool]) -> None:
        super().__init__(inner)
        self.fails = fails

    async def _complete(self, name: str, lease: Lease, *args: Any, **kwargs: Any) -> Any:
        if self.fails(lease):
            raise StoreDown(f"the store dropped the completion ({name})")
        return await getattr(self.inner, name)(lease, *args, **kwargs)

    async def complete_step(self, lease: Lease, *args: Any, **kwargs: Any) -> Any:
        return await self._complete("complete_step", lease, *args, **kwargs)

    async def complete_and_claim(self, lease: Lease, *args: Any, **kwargs: Any) -> Any:
        return await self._complete("complete_and_claim", lease, *args, **kwargs)

    async def complete_and_finish(self, lease: Lease, *args: Any, **kwargs: Any) -> Any:
        return await self._complete("complete_and_finish", lease, *args, **kwargs)


def nth_calls(wanted: Callable[[int], bool]) -> Callable[[Lease], bool]:
    """A `FailingCompletions` rule by call number (0 for the first call)."""
    calls = -1

    def fails(_: Lease) -> bool:
        nonlocal calls
        calls += 1
        return wanted(calls)

    return fails


class GetRunFailsOnceArmed(PassThroughStore):
    """Once ``armed`` is set, the next ``get_run`` raises `StoreDown` (a blip), then all go on."""

    armed = False

    async def get_run(self, run_id: str) -> RunRecord | None:
        if self.armed:
            self.armed = False
            raise StoreDown("get_run")
        record: RunRecord | None = await self.inner.get_run(run_id)
        return record


@pytest.fixture
def names() -> Iterator[Callable[[str], str]]:
    """Unique workflow names, unregistered after the test."""
    made: list[str] = []

    def make(kind: str) -> str:
        made.append(f"{kind}-{uuid.uuid4().hex[:10]}")
        return made[-1]

    yield make
    for name in made:
        registry.unregister(name)


async def cancelled_elsewhere(
    store: WorkflowStore,
    definition: Any,
    when: anyio.Event,
    *,
    input: Any = None,
    lease_ms: int = 300,
    limit: float = 5.0,
) -> tuple[str, RunRecord]:
    """Drive ``definition`` on one engine and, once ``when`` is set, cancel it from another.

    The other engine stands for another process: it does not drive the run.
    Returns the run id and the run as its driver ended it.
    """
    with anyio.fail_after(limit):
        async with Engine(store, lease_ms=lease_ms) as driver:
            run_id = await driver.start(definition, input)
            await when.wait()
            await Engine(store).cancel(run_id)
            return run_id, await driver.wait(run_id)


class FailingRenewals(PassThroughStore):
    """The first ``failures`` lease renewals raise `StoreDown`; the rest go through."""

    def __init__(self, inner: WorkflowStore, failures: int) -> None:
        super().__init__(inner)
        self.failures = failures

    async def renew_lease(self, *args: Any, **kwargs: Any) -> Any:
        if self.failures:
            self.failures -= 1
            raise StoreDown("renew_lease")
        return await self.inner.renew_lease(*args, **kwargs)
