"""Admission control: a cap on in-flight requests with a short wait queue.

Beyond the cap a request may wait up to ``wait_s`` for a slot if fewer than ``max_waiting``
are already waiting; otherwise it is refused at once with RESOURCE_EXHAUSTED (429 with
Retry-After). Refusing early is what keeps overload from turning into timeouts.

When a stage refuses a request for lack of capacity (generate's RESOURCE_EXHAUSTED), the cap
drops for ``hold_s`` to what was in flight besides it: the stages behind are full, so new
arrivals wait up to ``wait_s`` for one of those to finish, or get their 429 at the door, before
embed and retrieve spend work on a request generate would refuse anyway (measured: at 32 users
on 2 cores, ~19 such refusals a second took a quarter of the CPU from generation and goodput
fell to 0.07 req/s). After ``hold_s`` the full cap is probed again.

With ``adaptive`` (``--adaptive-admission``, off by default) the cap adapts by additive
increase and multiplicative decrease, as TCP and Netflix's concurrency-limits do: when a stage
refuses a request because it is full (RESOURCE_EXHAUSTED from generate's queue or its deadline
estimate), the cap drops to 90% of what was in flight; each answered request raises it by
1/cap, up to ``max_inflight``. The edge then refuses what the stages behind it cannot take
before embed and retrieve spend work on it. Off by default because the load test measured it
costing goodput on a CPU-only box (figures in docs/decisions/0007-edge-structure.md): an LLM
answers a few requests per second at most, so the increase recovers far slower than refusals
cut the cap, and generate idles. Those refusals are cheap once clients honour Retry-After, and
generate's own deadline-aware admission already turns overload into 429s rather than timeouts.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from prometheus_client import Counter, Gauge

from ragline.errors import ResourceExhausted

SHED = Counter("ragline_api_shed", "Chat requests refused with 429 by admission control")
INFLIGHT = Gauge("ragline_api_inflight", "Chat requests holding an admission slot")
WAITING = Gauge("ragline_api_waiting", "Chat requests waiting for an admission slot")
LIMIT = Gauge("ragline_api_admission_limit", "Current adaptive cap on in-flight chat requests")


class Admission:
    def __init__(
        self,
        max_inflight: int,
        max_waiting: int,
        wait_s: float,
        min_limit: int = 1,
        decrease_every_s: float = 0.5,
        adaptive: bool = False,
        hold_s: float = 2.0,
    ) -> None:
        self.adaptive = adaptive
        self.max_inflight = max_inflight
        self.max_waiting = max_waiting
        self.wait_s = wait_s
        self.min_limit = max(1, min(min_limit, max_inflight))
        self.decrease_every_s = decrease_every_s
        self.limit = float(max_inflight)
        self.hold_s = hold_s
        self._full_cap = 0  # what a stage could take when it last refused
        self._full_until = 0.0  # monotonic time until which _full_cap holds
        self.inflight = 0
        self.rejected = 0
        self._waiters: deque[asyncio.Future] = deque()
        self._last_decrease = 0.0
        INFLIGHT.set_function(lambda: self.inflight)
        WAITING.set_function(lambda: self.waiting)
        LIMIT.set_function(lambda: self.cap)

    @property
    def cap(self) -> int:
        cap = max(self.min_limit, int(self.limit))
        if time.monotonic() < self._full_until:
            cap = min(cap, self._full_cap)
        return cap

    @property
    def waiting(self) -> int:
        return sum(not f.done() for f in self._waiters)

    def _refuse(self, why: str) -> ResourceExhausted:
        self.rejected += 1
        SHED.inc()
        return ResourceExhausted(
            f"ragline is at capacity ({self.inflight} requests in flight, limit {self.cap}, "
            f"{why}); retry after a second"
        )

    async def acquire(self) -> None:
        if self.inflight < self.cap and not self.waiting:
            self.inflight += 1
            return
        if self.waiting >= self.max_waiting:
            raise self._refuse(f"{self.waiting} waiting")
        slot = asyncio.get_running_loop().create_future()
        self._waiters.append(slot)
        try:
            await asyncio.wait_for(asyncio.shield(slot), self.wait_s)
        except TimeoutError:
            if slot.done():  # granted as the wait ran out: keep it
                return
            slot.cancel()
            raise self._refuse(f"no slot within {self.wait_s}s") from None
        except asyncio.CancelledError:
            if slot.done() and not slot.cancelled():
                self.release()  # granted, but the caller went away
            slot.cancel()
            raise
        finally:
            while self._waiters and self._waiters[0].done():
                self._waiters.popleft()

    def release(self) -> None:
        self.inflight -= 1
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self.inflight < self.cap:
            slot = self._waiters.popleft()
            if not slot.done():
                slot.set_result(None)
                self.inflight += 1

    def succeeded(self) -> None:
        """An answer came back: probe upwards, about one slot per cap answers."""
        if not self.adaptive:
            return
        self.limit = min(float(self.max_inflight), self.limit + 1.0 / max(self.limit, 1.0))
        self._grant()

    def overloaded(self) -> None:
        """A stage refused for lack of capacity (the refused request still holds its slot).

        For ``hold_s`` the cap is what else was in flight. Adaptive: also cut the cap to 90%
        of what was in flight, at most once per ``decrease_every_s`` (the refusals of one
        burst are one signal).
        """
        self._full_cap = max(self.min_limit, self.inflight - 1)
        self._full_until = time.monotonic() + self.hold_s
        if not self.adaptive:
            return
        now = time.monotonic()
        if now - self._last_decrease < self.decrease_every_s:
            return
        self._last_decrease = now
        self.limit = max(float(self.min_limit), min(self.limit, self.inflight) * 0.9)
