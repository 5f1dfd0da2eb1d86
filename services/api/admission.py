"""Admission control: a cap on in-flight requests with a short wait queue.

Beyond the cap a request may wait up to ``wait_s`` for a slot if fewer than ``max_waiting``
are already waiting; otherwise it is refused at once with RESOURCE_EXHAUSTED (429 with
Retry-After). Refusing early is what keeps overload from turning into timeouts.
"""

from __future__ import annotations

import asyncio

from prometheus_client import Counter, Gauge

from ragline.errors import ResourceExhausted

SHED = Counter("ragline_api_shed", "Chat requests refused with 429 by admission control")
INFLIGHT = Gauge("ragline_api_inflight", "Chat requests holding an admission slot")
WAITING = Gauge("ragline_api_waiting", "Chat requests waiting for an admission slot")


class Admission:
    def __init__(self, max_inflight: int, max_waiting: int, wait_s: float) -> None:
        self.max_inflight = max_inflight
        self.max_waiting = max_waiting
        self.wait_s = wait_s
        self._slots = asyncio.Semaphore(max_inflight)
        self.waiting = 0
        self.rejected = 0
        INFLIGHT.set_function(lambda: self.inflight)
        WAITING.set_function(lambda: self.waiting)

    @property
    def inflight(self) -> int:
        return self.max_inflight - self._slots._value

    def _refuse(self, why: str) -> ResourceExhausted:
        self.rejected += 1
        SHED.inc()
        return ResourceExhausted(
            f"ragline is at capacity ({self.max_inflight} requests in flight, {why}); "
            "retry after a second"
        )

    async def acquire(self) -> None:
        if not self._slots.locked():
            await self._slots.acquire()
            return
        if self.waiting >= self.max_waiting:
            raise self._refuse(f"{self.waiting} waiting")
        self.waiting += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), self.wait_s)
        except TimeoutError:
            raise self._refuse(f"no slot within {self.wait_s}s") from None
        finally:
            self.waiting -= 1

    def release(self) -> None:
        self._slots.release()
