"""redis-py asyncio connections with a cheaper write path, for `RedisStore.from_url`.

A step costs one EVALSHA with some twenty arguments, so the fixed cost of
sending a command is a large part of a step. Two parts of redis-py's
asyncio `Connection` are costlier than they need to be:

- it packs commands in Python, argument by argument (its sync client packs
  with ``hiredis.pack_command``, in C);
- with a ``socket_timeout`` (5 s by default since redis-py 6) it bounds each
  write with ``asyncio.wait_for``, which creates a task per command.

`FastSendMixin` packs with hiredis and bounds a write with ``asyncio.timeout``
(a timer on the loop, no task; reliable from Python 3.11.3, which stepflow
requires). Everything else (connecting, health checks, reading, retries,
errors) is redis-py's own: the fast path hands over to it for anything it
does not handle.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import hiredis
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    ConnectionPool,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

_UTF8 = frozenset({"utf-8", "utf8", "utf_8"})


def _split_command_name(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """``("SCRIPT LOAD", src)`` -> ``("SCRIPT", "LOAD", src)``, as redis-py's packer does."""
    first = args[0]
    if isinstance(first, str):
        return (*first.split(), *args[1:])
    if isinstance(first, bytes) and b" " in first:
        return (*first.split(), *args[1:])
    return args


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
            async with asyncio.timeout(self.socket_timeout):
                writer.writelines(command)
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


def make_fast(pool: ConnectionPool) -> None:
    """Have ``pool`` open fast connections of the kind it was set up for (before it opens any).

    A class redis-py does not ship (the caller's own) is left as it is.
    """
    pool.connection_class = _FAST.get(pool.connection_class, pool.connection_class)
