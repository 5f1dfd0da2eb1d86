"""ReplicaPool: per-stage balancing over long-lived channels, one per replica.

The typed stage clients of ``ragline.clients`` run every call through one of these (a single
address is a pool of one), so the edge, ``ragline ingest`` and the launcher balance alike.

Requests go to the healthy replica with the fewest outstanding requests (nginx ``least_conn``,
per stage). A keyed request (generation: a digest of the prompt prefix a replica's prefix cache
may hold) instead walks a hash ring of the replicas from the key's point and takes the first
available replica with fewer than ``ceil(balance_factor * (in_flight + 1) / replicas)``
requests outstanding, ``in_flight`` being the pool's total (consistent hashing with bounded
loads: HAProxy's ``hash-balance-factor``, Envoy's ring hash). So a prefix keeps landing where
it is cached until that replica is down or busier than its share, and a replica joining or
leaving moves only the keys on its arcs of the ring.

A replica that fails ``max_fails`` times in a row (UNAVAILABLE, or a deadline it
did not meet) is ejected for ``fail_timeout_s`` (nginx's ``max_fails``/``fail_timeout``); an
active ``grpc.health.v1`` check every ``health_interval_s`` takes replicas out when they report
NOT_SERVING or cannot be reached, and back in when they recover. When every replica that
passes its health check is ejected, they all stay in use (Envoy's panic mode): ejection only
helps when there is somewhere else to go. Idempotent calls (embed,
retrieve) are retried once on another replica after UNAVAILABLE, or when the first replica
does not answer within its share (``first_attempt_share``) of the call's time budget: a hung
replica (SIGSTOP, a wedged thread) costs a request that share of its budget, not the request.
Generation has no side effects, so it is retried on UNAVAILABLE too, with its whole budget
(``split_budget=False``), and a stream only before its first token. A retry keeps its key and
walks on past the replica that failed.

Addresses: a comma-separated list of ``host:port``, and/or ``dns:///name:port`` entries whose
name is re-resolved every health interval (a compose service with replicas, a headless
Service), so scaling a stage needs no edge restart.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import logging
import math
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import grpc
from prometheus_client import Counter

from ragline.errors import Unavailable

log = logging.getLogger(__name__)
C = TypeVar("C")
T = TypeVar("T")
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE}
_FAILURES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
_OUTCOMES = ("preferred", "spilled", "no_key")
ROUTED = Counter(
    "ragline_edge_affinity_routed",
    "Requests routed by a stage's pool: keyed ones that reached the first available replica on "
    "the key's ring walk (preferred) or went past it because of the load bound (spilled), and "
    "unkeyed ones (no_key)",
    ["stage", "outcome"],
)
# Points per replica on the hash ring (ketama's figure): enough that each replica's share of
# the keys stays within a few percent of 1/n.
_RING_POINTS = 160


def _ring_hash(text: str) -> int:
    # Stable across processes and restarts (Python's hash() of a str is salted per process).
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


@dataclass(eq=False)
class Replica(Generic[C]):
    address: str
    client: C
    outstanding: int = 0
    failures: int = 0
    ejected_until: float = 0.0
    healthy: bool = True
    served: int = 0

    def available(self, now: float) -> bool:
        return self.healthy and now >= self.ejected_until


@dataclass
class PoolPolicy:
    max_fails: int = 3
    fail_timeout_s: float = 30.0
    health_interval_s: float = 2.0
    first_attempt_share: float = 0.5  # of the time budget, when a retry is possible
    # A keyed request stays on its ring replica while that one has fewer in flight than this
    # factor times the average (counting the request itself): no replica carries more than
    # 1.25x its share, and a hot prefix spills over rather than queueing on one replica.
    balance_factor: float = 1.25

    def __post_init__(self) -> None:
        if self.balance_factor < 1.0:
            raise ValueError(
                f"balance_factor must be >= 1 (1 is perfect balance), got {self.balance_factor}"
            )


def expand(address_list: str) -> list[str]:
    """Concrete host:port targets for a list that may contain dns:/// names."""
    out: list[str] = []
    for entry in filter(None, (a.strip() for a in address_list.split(","))):
        if entry.startswith("dns:///"):
            host, _, port = entry.removeprefix("dns:///").rpartition(":")
            try:
                infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            except socket.gaierror:
                continue
            out.extend(sorted({f"{info[4][0]}:{port}" for info in infos}))
        else:
            out.append(entry)
    return list(dict.fromkeys(out))


class ReplicaPool(Generic[C]):
    def __init__(
        self,
        stage: str,
        addresses: str,
        make_client: Callable[[str], C],
        policy: PoolPolicy | None = None,
    ) -> None:
        self.stage = stage
        self.addresses = addresses
        self.make_client = make_client
        self.policy = policy or PoolPolicy()
        self.replicas: dict[str, Replica[C]] = {}
        self._ring_points: list[int] = []
        self._ring_owners: list[str] = []
        self._ring_members: frozenset[str] = frozenset()
        self._routed = dict.fromkeys(_OUTCOMES, 0)
        self._routed_metric = {o: ROUTED.labels(stage, o) for o in _OUTCOMES}
        self._health_task: asyncio.Task | None = None
        self._sync(expand(addresses) or [addresses])

    def _sync(self, targets: list[str]) -> None:
        for target in targets:
            if target not in self.replicas:
                self.replicas[target] = Replica(target, self.make_client(target))
        for target in list(self.replicas):
            if target not in targets and self.replicas[target].outstanding == 0:
                replica = self.replicas.pop(target)
                asyncio.get_event_loop().create_task(replica.client.close())
        # The ring holds the current targets only: a replica that is going away but still
        # finishing requests keeps them, and its keys move to their next replica at once.
        if frozenset(targets) != self._ring_members:
            self._ring_members = frozenset(targets)
            ring = sorted(
                (_ring_hash(f"{target}#{i}"), target)
                for target in self._ring_members
                for i in range(_RING_POINTS)
            )
            self._ring_points = [point for point, _ in ring]
            self._ring_owners = [owner for _, owner in ring]

    def start(self) -> None:
        if self._health_task is None:
            self._health_task = asyncio.get_running_loop().create_task(self._health_loop())

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
        for replica in self.replicas.values():
            await replica.client.close()

    def pick(self, exclude: set[str] = frozenset(), key: str | None = None) -> Replica[C]:
        """The replica for a request: with a ``key``, the first on the key's ring walk under
        the load bound (see the module docstring), else the least outstanding."""
        replica, outcome = self._choose(exclude, key)
        self._routed[outcome] += 1
        self._routed_metric[outcome].inc()
        return replica

    def affinity(self) -> dict[str, int]:
        """How this pool's requests were routed: preferred, spilled and no_key counts."""
        return dict(self._routed)

    def _choose(self, exclude: set[str], key: str | None) -> tuple[Replica[C], str]:
        now = time.monotonic()
        candidates = [r for r in self.replicas.values()
                      if r.available(now) and r.address not in exclude]  # fmt: skip
        if not candidates:
            # Panic mode (Envoy's panic threshold): when every replica that passes its active
            # health check is passively ejected, ejection is not protecting anyone, since
            # failures are then load (deadlines missed under a queue), not a broken replica.
            # Keep sending to those replicas rather than turning slow answers into 503s.
            candidates = [r for r in self.replicas.values()
                          if r.healthy and r.address not in exclude]  # fmt: skip
        if not candidates:
            down = ", ".join(
                f"{r.address} ({'unhealthy' if not r.healthy else 'ejected'})"
                for r in self.replicas.values()
            )
            raise Unavailable(f"{self.stage}: no healthy replica ({down or 'none configured'})")
        outcome = "no_key"
        if key is not None:
            replica, outcome = self._walk(key, candidates)
            if replica is not None:
                return replica, outcome
        least = min(r.outstanding for r in candidates)
        return random.choice([r for r in candidates if r.outstanding == least]), outcome

    def _walk(self, key: str, candidates: list[Replica[C]]) -> tuple[Replica[C] | None, str]:
        """The first candidate clockwise from ``key`` on the ring whose outstanding count is
        under the bound, and whether it is the first candidate met (preferred) or a later
        one (spilled)."""
        by_address = {r.address: r for r in candidates}
        total = sum(r.outstanding for r in candidates)
        bound = math.ceil(self.policy.balance_factor * (total + 1) / len(candidates))
        start = bisect.bisect(self._ring_points, _ring_hash(key))
        size = len(self._ring_owners)
        first: Replica[C] | None = None
        seen: set[str] = set()
        for i in range(size):
            address = self._ring_owners[(start + i) % size]
            if address in seen:
                continue
            seen.add(address)
            replica = by_address.get(address)
            if replica is not None:
                if first is None:
                    first = replica
                if replica.outstanding < bound:
                    return replica, "preferred" if replica is first else "spilled"
            if len(seen) == len(self._ring_members):
                break
        # A factor of at least 1 keeps the least loaded candidate under the bound, so this is
        # reached only when the candidates under it are replicas already leaving the ring.
        return None, "spilled"

    def _record(self, replica: Replica[C], error: grpc.aio.AioRpcError | None) -> None:
        if error is None or error.code() not in _FAILURES:
            replica.failures = 0
            return
        replica.failures += 1
        if replica.failures >= self.policy.max_fails:
            replica.ejected_until = time.monotonic() + self.policy.fail_timeout_s
            replica.failures = 0
            log.warning("%s replica %s ejected for %.0fs", self.stage, replica.address,
                        self.policy.fail_timeout_s)  # fmt: skip

    async def call(
        self,
        fn: Callable[[C, float | None], Awaitable[T]],
        idempotent: bool = False,
        timeout: float | None = None,
        split_budget: bool | None = None,
        key: str | None = None,
    ) -> T:
        """``fn(client, attempt_timeout)`` on the picked replica (``key``: see ``pick``). An
        idempotent call whose first replica fails with UNAVAILABLE, or does not answer within
        its share of the time budget (a hung replica), is retried once on another replica
        within what is left."""
        tried: set[str] = set()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            replica = self._attempt(tried, key)
            tried.add(replica.address)
            can_retry = idempotent and len(tried) < 2 and self._other_available(tried)
            attempt = None
            if deadline is not None:
                attempt = max(0.001, deadline - time.monotonic())
                if can_retry and (idempotent if split_budget is None else split_budget):
                    attempt *= self.policy.first_attempt_share
            replica.outstanding += 1
            try:
                result = await fn(replica.client, attempt)
            except grpc.aio.AioRpcError as exc:
                self._record(replica, exc)
                retryable = exc.code() in _RETRYABLE or (
                    exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED
                    and deadline is not None
                    and deadline - time.monotonic() > 0.005
                )
                if can_retry and retryable and self._other_available(tried):
                    continue
                raise
            finally:
                replica.outstanding -= 1
            self._record(replica, None)
            replica.served += 1
            return result

    def _other_available(self, tried: set[str]) -> bool:
        now = time.monotonic()
        return any(r.available(now) and r.address not in tried for r in self.replicas.values())

    def _attempt(self, tried: set[str], key: str | None) -> Replica[C]:
        # A retry keeps the key: with the failed replica excluded, the walk lands where the
        # key's later requests will go while that replica is out, so the retry warms the
        # cache that will serve them. Routing outcomes count once per request.
        return self.pick(tried, key) if not tried else self._choose(tried, key)[0]

    async def stream(
        self, fn: Callable[[C], AsyncIterator[T]], key: str | None = None
    ) -> AsyncIterator[T]:
        """A server stream on one replica (``key``: see ``pick``); its outstanding count lasts
        as long as the stream. A stream that fails with UNAVAILABLE before its first item (the
        replica was down or died while queueing the request) moves once to another replica;
        after the first item the caller has seen output, so the error surfaces."""
        tried: set[str] = set()
        while True:
            replica = self._attempt(tried, key)
            tried.add(replica.address)
            replica.outstanding += 1
            error, started = None, False
            try:
                async for item in fn(replica.client):
                    started = True
                    yield item
                return
            except grpc.aio.AioRpcError as exc:
                error = exc
                if (
                    not started
                    and exc.code() in _RETRYABLE
                    and len(tried) < 2
                    and self._other_available(tried)
                ):
                    continue
                raise
            finally:
                replica.outstanding -= 1
                self._record(replica, error)
                replica.served += 1

    async def _check(self, replica: Replica[C]) -> None:
        check = getattr(replica.client, "serving", None)
        if check is None:
            return
        healthy = await check(timeout=max(0.5, self.policy.health_interval_s))
        if healthy != replica.healthy:
            log.warning("%s replica %s is %s", self.stage, replica.address,
                        "healthy again" if healthy else "unhealthy")  # fmt: skip
            if healthy:
                replica.ejected_until = 0.0
        replica.healthy = healthy

    async def _health_loop(self) -> None:
        while True:
            if "dns:///" in self.addresses:
                targets = await asyncio.to_thread(expand, self.addresses)
                if targets:
                    self._sync(targets)
            await asyncio.gather(*(self._check(r) for r in list(self.replicas.values())))
            await asyncio.sleep(self.policy.health_interval_s)

    def status(self) -> dict[str, str]:
        now = time.monotonic()
        return {
            r.address: "SERVING" if r.available(now)
            else ("EJECTED" if now < r.ejected_until else "NOT_SERVING")
            for r in self.replicas.values()
        }  # fmt: skip
