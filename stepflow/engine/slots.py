"""A step's slot of the engine's ``max_concurrency``, given back while it backs off.

A step holds a slot while an attempt runs, not while it waits to retry: a
flaky API that sends every step into a 30 s backoff must not stall the
engine's other runs for those 30 s. The slot remembers whether it is held,
so whoever took it gives it back exactly once, however a cancel interleaves
with the backoff.
"""

from __future__ import annotations

import anyio
import anyio.lowlevel


class Slot:
    """One step's claim on the engine's `anyio.CapacityLimiter`; use from one task."""

    __slots__ = ("_held", "_limiter")

    def __init__(self, limiter: anyio.CapacityLimiter) -> None:
        self._limiter = limiter
        self._held = False

    async def take(self) -> None:
        """Wait for a free slot, without the limiter's extra yield when one is free.

        ``async with limiter`` always lets the loop run once more, even with a
        slot free; a step needs no such yield to be fair: its task has just
        queued behind the others, or the store call that recorded the step
        before it in this task has just yielded (as every step call does), or
        the skip of that step did. A cancelled step still stops here, as it
        would in the limiter.
        """
        await anyio.lowlevel.checkpoint_if_cancelled()
        try:
            self._limiter.acquire_nowait()
        except anyio.WouldBlock:
            await self._limiter.acquire()
        self._held = True

    def give_back(self) -> None:
        """Free the slot if held (a cancel may have come while it was not)."""
        if self._held:
            self._held = False
            self._limiter.release()
