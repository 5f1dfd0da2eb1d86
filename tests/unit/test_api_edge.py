"""The edge's domain objects: replica pool, admission, answer cache, prompt assembly.

The replica clients here are test doubles of the stage clients; the same behaviours run
against real stage processes in tests/integration/test_edge.py.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from ragline.balancer import PoolPolicy, ReplicaPool
from ragline.errors import ResourceExhausted, Unavailable
from ragline.types import Hit
from services.api.admission import Admission
from services.api.cache import AnswerCache, normalise
from services.api.prompt import build_messages, estimate_tokens, select_passages


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="x")


class FakeClient:
    def __init__(self, address: str) -> None:
        self.address = address
        self.fail_with: grpc.StatusCode | None = None
        self.calls = 0
        self.gate: asyncio.Event | None = None

    async def search(self, *args, **kwargs) -> str:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_with is not None:
            raise rpc_error(self.fail_with)
        return self.address

    async def close(self) -> None:
        pass


def search(p: ReplicaPool, idempotent: bool = True):
    """One call through the pool, as the stage clients of ragline.clients make them."""
    return p.call(lambda client, t: client.search(timeout=t), idempotent=idempotent)


def pool(n: int = 2, **policy) -> ReplicaPool:
    addresses = ",".join(f"10.0.0.{i}:1" for i in range(n))
    return ReplicaPool("retrieve", addresses, FakeClient, PoolPolicy(**policy))


async def test_least_outstanding_replica_gets_the_request() -> None:
    p = pool(2)
    gate = asyncio.Event()
    for replica in p.replicas.values():
        replica.client.gate = gate
    blocked = asyncio.create_task(search(p))
    await asyncio.sleep(0)
    first = next(r for r in p.replicas.values() if r.outstanding == 1)
    other = next(r for r in p.replicas.values() if r is not first)
    other.client.gate = None
    for _ in range(5):  # every new call avoids the replica with a call in flight
        assert await search(p) == other.address
    gate.set()
    assert await blocked == first.address


async def test_unavailable_retries_once_on_another_replica_for_idempotent_calls() -> None:
    p = pool(2)
    bad, good = p.replicas.values()
    bad.client.fail_with = grpc.StatusCode.UNAVAILABLE
    results = [await search(p) for _ in range(6)]
    assert set(results) == {good.address}, "every call succeeded through the healthy replica"
    bad.failures = 0
    bad.ejected_until = 0
    good.outstanding = 1  # so the pick is the failing replica
    with pytest.raises(grpc.aio.AioRpcError):  # not idempotent: no retry, the error surfaces
        await search(p, idempotent=False)


async def test_consecutive_failures_eject_then_the_replica_returns() -> None:
    p = pool(2, max_fails=2, fail_timeout_s=0.2)
    bad, good = p.replicas.values()
    bad.client.fail_with = grpc.StatusCode.UNAVAILABLE
    for _ in range(50):  # the pick among equally loaded replicas is random
        assert await search(p) == good.address
        if bad.ejected_until:
            break
    assert bad.ejected_until > time.monotonic()
    calls = bad.client.calls
    for _ in range(5):
        await search(p)
    assert bad.client.calls == calls, "an ejected replica gets no traffic"
    bad.client.fail_with = None
    await asyncio.sleep(0.25)
    seen = {await search(p) for _ in range(20)}
    assert bad.address in seen, "after fail_timeout the replica is used again"


async def test_ejection_never_empties_a_stage_only_failed_health_checks_do() -> None:
    p = pool(1, max_fails=1)
    (only,) = p.replicas.values()
    only.client.fail_with = grpc.StatusCode.DEADLINE_EXCEEDED  # a deadline missed under load
    with pytest.raises(grpc.aio.AioRpcError):
        await search(p)
    assert only.ejected_until > time.monotonic()
    only.client.fail_with = None
    # Panic mode: the only replica that passes its health check keeps getting traffic.
    assert await search(p) == only.address
    only.healthy = False  # the active health check says it is down
    with pytest.raises(Unavailable, match="no healthy replica.*unhealthy"):
        await search(p)


async def test_admission_caps_inflight_waits_briefly_then_refuses() -> None:
    adm = Admission(max_inflight=1, max_waiting=1, wait_s=0.05)
    await adm.acquire()
    # The slot is never released: the refusal is admission's own, after its short wait.
    with pytest.raises(ResourceExhausted, match="no slot within 0.05s"):
        await asyncio.wait_for(adm.acquire(), timeout=30)
    waiter = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0.01)
    with pytest.raises(ResourceExhausted, match="1 waiting"):
        await adm.acquire()  # the wait queue is full: refused at once
    adm.release()
    await waiter  # the waiter got the freed slot
    adm.release()
    assert adm.inflight == 0


async def test_admission_limit_backs_off_when_stages_are_full_and_probes_back_up() -> None:
    adm = Admission(20, max_waiting=0, wait_s=0.05, decrease_every_s=0.0, adaptive=True,
                    hold_s=0.0)  # fmt: skip
    for _ in range(10):
        await adm.acquire()
    adm.overloaded()  # generate refused one of the 10 in flight
    assert adm.cap == 9, "90% of what was in flight"
    with pytest.raises(ResourceExhausted, match="limit 9"):
        await adm.acquire()  # refused at the edge, before embed and retrieve
    for _ in range(10):
        adm.release()
    for _ in range(40):  # answers come back: about one slot more per cap answers
        await adm.acquire()
        adm.succeeded()
        adm.release()
    assert 11 <= adm.cap <= 14
    slow = Admission(20, max_waiting=0, wait_s=0.05, decrease_every_s=60, adaptive=True,
                     hold_s=0.0)  # fmt: skip
    for _ in range(10):
        await slow.acquire()
    slow.overloaded()
    slow.overloaded()  # the same burst: one signal
    assert slow.cap == 9
    one = Admission(4, max_waiting=0, wait_s=0.05, decrease_every_s=0.0, adaptive=True)
    for _ in range(5):
        one.overloaded()
    assert one.cap == 1, "never below one request in flight"
    fixed = Admission(4, max_waiting=0, wait_s=0.05)  # the default: a fixed cap
    fixed.overloaded()
    assert fixed.cap == 1  # ... held at what the stages could take, for hold_s
    fixed._full_until = 0.0
    assert fixed.cap == 4


async def test_a_stage_refusal_holds_the_cap_at_what_was_in_flight_then_probes_again() -> None:
    adm = Admission(64, max_waiting=0, wait_s=0.01, hold_s=0.2)
    for _ in range(10):
        await adm.acquire()
    adm.overloaded()  # generate refused the 10th: it holds 9
    adm.release()  # the refused request leaves
    assert adm.cap == 9
    with pytest.raises(ResourceExhausted, match="limit 9"):
        await adm.acquire()  # refused at the door, before embed and retrieve
    adm.release()  # one of the 9 finished: the next arrival goes through
    await adm.acquire()
    await asyncio.sleep(0.25)
    assert adm.cap == 64  # the hold is over: the full cap is probed again


async def test_cache_normalises_expires_and_keys_on_the_knowledge_version() -> None:
    assert normalise("  How many  Days?? ") == normalise("how many days")
    cache = AnswerCache(ttl_s=0.1, max_entries=2)
    k1 = AnswerCache.key("How many days?", 1, top_k=4)
    assert k1 == AnswerCache.key("how many DAYS", 1, top_k=4)
    assert k1 != AnswerCache.key("how many days", 2, top_k=4), "a write changes the key"
    assert k1 != AnswerCache.key("how many days", 1, top_k=5)
    await cache.set(k1, {"answer": "25"})
    assert await cache.get(k1) == {"answer": "25"}
    await asyncio.sleep(0.15)
    assert await cache.get(k1) is None, "expired"
    for i in range(3):
        await cache.set(f"k{i}", {"i": i})
    assert await cache.get("k0") is None and await cache.get("k2") == {"i": 2}, "LRU bound"


def hit(pid: str, score: float, text: str) -> Hit:
    return Hit(id=pid, score=score, text=text)


def test_prompt_budget_dedup_strategy_and_citations() -> None:
    hits = [hit("a#0", 0.9, "x" * 400), hit("b#0", 0.85, "x" * 400), hit("c#0", 0.5, "y" * 40),
            hit("d#0", 0.8, "z" * 2000)]  # fmt: skip
    chosen = select_passages(hits, budget_tokens=estimate_tokens("x" * 400) + 20)
    assert [h.id for h in chosen] == ["a#0", "c#0"], "duplicate text dropped, too-long skipped"
    scored = select_passages(hits, budget_tokens=10_000, strategy="score", min_score_ratio=0.9)
    assert [h.id for h in scored] == ["a#0"]
    messages = build_messages("What?", chosen, [{"role": "user", "content": "earlier"}])
    assert messages[0]["role"] == "system" and "[a#0] " in messages[0]["content"]
    assert messages[1]["content"] == "earlier" and messages[-1] == {
        "role": "user",
        "content": "What?",
    }
    with pytest.raises(ValueError, match="unknown prompt strategy"):
        select_passages(hits, 100, strategy="map-reduce")


def test_api_keys_gate_the_data_routes_not_the_probes() -> None:
    from fastapi.testclient import TestClient

    from services.api.app import create_app
    from services.api.settings import ApiSettings

    client = TestClient(create_app(ApiSettings(api_keys="k1, k2", model_name="kb")))  # no lifespan
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "k1"}):
        r = client.get("/v1/models", headers=headers)
        assert r.status_code == 401 and "Bearer" in r.json()["error"]["message"]
        assert "k1" not in r.text
    r = client.get("/v1/models", headers={"Authorization": "Bearer k2"})
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "kb"
    assert client.get("/livez").status_code == 200
    schema = client.get("/openapi.json", headers={"Accept-Encoding": "gzip"})
    assert schema.headers["content-encoding"] == "gzip"
    paths = schema.json()["paths"]
    assert {"/chat", "/v1/chat/completions", "/v1/models", "/documents", "/readyz"} <= set(paths)


async def test_a_hung_replica_costs_half_the_budget_then_the_call_moves_on() -> None:
    p = pool(2)
    hung, good = p.replicas.values()
    hung.client.gate = asyncio.Event()  # never set: the replica does not answer
    good.outstanding = 1  # so the first pick is the hung one
    budgets: list[float | None] = []

    async def call(client, attempt):
        budgets.append(attempt)
        if client is hung.client:
            try:
                return await asyncio.wait_for(client.search(), attempt)
            except TimeoutError:
                raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED) from None
        return await client.search()

    assert await p.call(call, idempotent=True, timeout=0.2) == good.address
    # the hung replica got half the budget, the retry what was left of it (not a fresh 0.2)
    assert budgets[0] == pytest.approx(0.1, abs=0.02) and budgets[1] <= 0.1 + 0.02
    assert hung.failures == 1, "the missed deadline counts towards ejection"
    good.outstanding = 1
    budgets.clear()
    with pytest.raises(grpc.aio.AioRpcError):  # not idempotent: the whole budget, no retry
        await p.call(call, idempotent=False, timeout=0.05)
    assert budgets == [pytest.approx(0.05, abs=0.01)]


async def test_a_stream_moves_to_another_replica_only_before_its_first_item() -> None:
    p = pool(2)
    dead, good = p.replicas.values()
    dead.client.fail_with = grpc.StatusCode.UNAVAILABLE
    good.outstanding = 1  # the first pick is the dead replica

    def tokens(fail_after: int | None):
        async def gen(client):
            for i in range(3):
                if client.fail_with is not None and (fail_after is None or i == fail_after):
                    raise rpc_error(client.fail_with)
                yield f"{client.address}:{i}"

        return gen

    got = [t async for t in p.stream(tokens(None))]
    assert got == [f"{good.address}:{i}" for i in range(3)], "moved before the first token"
    dead.failures, good.outstanding = 0, 1
    got = []
    with pytest.raises(grpc.aio.AioRpcError):  # the caller saw output: no silent restart
        async for t in p.stream(tokens(1)):
            got.append(t)
    assert got == [f"{dead.address}:0"]


def test_semantic_cache_matches_within_threshold_scope_and_ttl() -> None:
    import numpy as np

    from services.api.cache import SemanticCache

    cache = SemanticCache(threshold=0.9, ttl_s=60, max_entries=2)
    a = np.array([1.0, 0.0, 0.0], dtype=np.float32)
    near = np.array([0.95, 0.31, 0.0], dtype=np.float32)  # cosine ~0.95
    far = np.array([0.0, 1.0, 0.0], dtype=np.float32)
    cache.add("k1", a, "scope-1", {"answer": "A"})
    hit = cache.lookup(near, "scope-1")
    assert hit is not None and hit[0]["answer"] == "A" and 0.9 <= hit[1] <= 1.0
    assert cache.lookup(far, "scope-1") is None, "below the threshold"
    assert cache.lookup(near, "scope-2") is None, "other parameters or knowledge-base version"
    cache.add("k2", far, "scope-1", {"answer": "B"})
    cache.add("k3", -a, "scope-1", {"answer": "C"})  # evicts the least recently used (k1)
    assert cache.lookup(a, "scope-1") is None
    expired = SemanticCache(threshold=0.5, ttl_s=0.0)
    expired.add("k", a, "s", {"answer": "A"})
    assert expired.lookup(a, "s") is None
