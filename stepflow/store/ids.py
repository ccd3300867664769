"""Fresh request ids and lease tokens, without a system call each.

Every script call carries a request id (a re-sent call is recognised by it)
and every claim a lease token: two ids per step. ``secrets.token_hex`` reads
the kernel's random source for each one, a system call that costs a few
microseconds. The ids must be unique, not secret, so each process draws a
random 64-bit prefix once and counts after it; a forked child draws its own,
so it never repeats its parent's ids.
"""

from __future__ import annotations

import itertools
import os
import secrets


class _IdSource:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._counter = itertools.count()

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):x}"


_source = _IdSource()
os.register_at_fork(after_in_child=_source.reset)


def new_request_id() -> str:
    """A fresh id for one call of a script (replays of that call carry the same id)."""
    return _source.next()


def new_token() -> str:
    """A fresh lease token (hex digits: it sits in a '|'-separated step line)."""
    return _source.next()
