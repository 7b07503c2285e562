"""FIFO admission limit for requests entering the engine, with the counters tests read.

Beyond `limit` requests, callers wait in arrival order instead of piling into the engine (the
behaviour TGI and LMDeploy PR 2961 settled on: queue, never OOM). A slot is released when the
engine delivers the request's output, not when the caller stops waiting, so `in_flight` is what
the engine actually holds.
"""

from __future__ import annotations

import asyncio
from collections import deque


class FifoLimiter:
    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"max_concurrent_requests must be >= 1, got {limit}")
        self.limit = limit
        self.in_flight = 0
        self.max_in_flight_seen = 0
        self.max_queued_seen = 0
        self._waiters: deque[asyncio.Future] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        if self.in_flight < self.limit and not self._waiters:
            self._take()
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self.max_queued_seen = max(self.max_queued_seen, len(self._waiters))
        try:
            await fut  # release() hands the slot over by setting this future (slot already taken)
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed over just as the caller went away
            else:
                self._waiters.remove(fut)
            raise

    def release(self) -> None:
        self.in_flight -= 1
        assert self.in_flight >= 0, "FifoLimiter released more than acquired"
        while self._waiters and self.in_flight < self.limit:
            fut = self._waiters.popleft()
            if not fut.done():
                self._take()
                fut.set_result(None)

    def _take(self) -> None:
        self.in_flight += 1
        self.max_in_flight_seen = max(self.max_in_flight_seen, self.in_flight)
