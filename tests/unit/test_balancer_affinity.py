"""Prefix-affinity routing: consistent hashing with bounded loads in ``ReplicaPool``, and the
prompt-prefix key ``GenerateStageClient`` routes by.

The replica clients are test doubles; the generate stage's prefix cache is tested with real
servers elsewhere.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import subprocess
import sys
import time

import grpc
import pytest

from ragline.balancer import PoolPolicy, ReplicaPool
from ragline.clients import GenerateStageClient, prefix_key
from ragline.types import Hit, SamplingParams
from ragline.v1 import generate_pb2
from services.api.prompt import build_messages


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="x")


class FakeClient:
    """Stands in for a generate stage's ``GenerateClient``: answers with its own address."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.fail_with: grpc.StatusCode | None = None
        self.gate: asyncio.Event | None = None
        self.calls = 0

    async def generate(self, request, timeout=None) -> generate_pb2.GenerateResponse:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_with is not None:
            raise rpc_error(self.fail_with)
        return generate_pb2.GenerateResponse(
            text="answer", finish_reason=generate_pb2.FINISH_REASON_STOP, model=self.address
        )

    async def stream(self, request, timeout=None):
        self.calls += 1
        if self.fail_with is not None:
            raise rpc_error(self.fail_with)
        yield generate_pb2.GenerateChunk(text=self.address)
        yield generate_pb2.GenerateChunk(
            finish_reason=generate_pb2.FINISH_REASON_STOP,
            usage=generate_pb2.Usage(prompt_tokens=3, completion_tokens=1),
        )

    async def close(self) -> None:
        pass


def addresses(n: int) -> list[str]:
    return [f"10.0.0.{i}:1" for i in range(n)]


def pool(n: int = 3, **policy) -> ReplicaPool[FakeClient]:
    return ReplicaPool("generate", ",".join(addresses(n)), FakeClient, PoolPolicy(**policy))


def call(p: ReplicaPool[FakeClient], key: str | None) -> asyncio.Future:
    """One generation through the pool, as ``GenerateStageClient`` makes it."""

    async def fn(client: FakeClient, t: float | None) -> str:
        return (await client.generate(None, timeout=t)).model

    return p.call(fn, idempotent=True, split_budget=False, key=key)


def home(p: ReplicaPool, key: str) -> str:
    return p.pick(key=key).address


def keys(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.getrandbits(64):016x}" for _ in range(n)]


async def test_a_key_stays_on_its_replica_while_healthy_and_under_its_share() -> None:
    p = pool(3)
    for key in keys(20):
        served = {await call(p, key) for _ in range(5)}
        assert len(served) == 1, f"key {key} moved between replicas: {served}"
    assert p.affinity() == {"preferred": 100, "spilled": 0, "no_key": 0}
    await call(p, None)
    assert p.affinity()["no_key"] == 1
    # Another pool over the same replicas (another edge process, a restart) agrees.
    again = pool(3)
    assert [home(again, k) for k in keys(20)] == [home(p, k) for k in keys(20)]


def test_the_ring_does_not_depend_on_the_process_hash_seed() -> None:
    script = (
        "from ragline.balancer import ReplicaPool\n"
        f"p = ReplicaPool('generate', {','.join(addresses(3))!r}, lambda a: None)\n"
        f"print(','.join(p.pick(key=k).address for k in {keys(30)!r}))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, check=True, timeout=60)  # fmt: skip
    here = pool(3)
    assert out.stdout.strip().split(",") == [home(here, k) for k in keys(30)]


def test_different_keys_spread_over_the_replicas() -> None:
    p = pool(3)
    share = dict.fromkeys(addresses(3), 0)
    for key in keys(300, seed=7):
        share[home(p, key)] += 1
    assert all(60 <= n <= 150 for n in share.values()), share  # 20% to 50% each


@pytest.mark.parametrize("outage", ["ejected", "unhealthy"])
async def test_a_key_leaves_a_replica_that_is_out_and_returns_when_it_recovers(
    outage: str,
) -> None:
    p = pool(3)
    key = keys(1)[0]
    preferred = p.replicas[home(p, key)]
    if outage == "ejected":
        preferred.ejected_until = time.monotonic() + 30
    else:
        preferred.healthy = False
    elsewhere = {await call(p, key) for _ in range(5)}
    assert len(elsewhere) == 1 and preferred.address not in elsewhere, (
        "while its replica is out a key goes to one other replica (its next on the ring)"
    )
    preferred.ejected_until, preferred.healthy = 0.0, True
    assert await call(p, key) == preferred.address


async def test_a_busy_preferred_replica_spills_the_request_to_another() -> None:
    p = pool(3)
    key = keys(1)[0]
    preferred = p.replicas[home(p, key)]
    others = [r for r in p.replicas.values() if r is not preferred]
    preferred.outstanding = 1
    for r in others:
        r.outstanding = 1
    assert await call(p, key) == preferred.address, "at its share (bound 2) it keeps the key"
    before = p.affinity()["spilled"]
    preferred.outstanding = 10  # bound: ceil(1.25 * (12 + 1) / 3) = 6
    assert await call(p, key) != preferred.address
    assert p.affinity()["spilled"] == before + 1


async def test_a_hot_key_never_loads_a_replica_past_the_bound() -> None:
    p = pool(3)
    key = keys(1)[0]
    preferred = home(p, key)
    gate = asyncio.Event()
    for r in p.replicas.values():
        r.client.gate = gate
    calls = []
    for _ in range(9):
        calls.append(asyncio.create_task(call(p, key)))
        await asyncio.sleep(0)  # each request is placed before the next one arrives
    loads = {a: r.outstanding for a, r in p.replicas.items()}
    assert sum(loads.values()) == 9
    assert max(loads.values()) <= math.ceil(1.25 * 9 / 3), loads
    assert loads[preferred] == max(loads.values()), "the key's replica takes its full share"
    gate.set()
    await asyncio.gather(*calls)


async def test_removing_a_replica_moves_only_the_keys_that_were_on_it() -> None:
    p = pool(4)
    sample = keys(1000, seed=3)
    before = {k: home(p, k) for k in sample}
    gone = addresses(4)[2]
    p._sync([a for a in addresses(4) if a != gone])
    assert gone not in p.replicas
    after = {k: home(p, k) for k in sample}
    moved = {k for k in sample if after[k] != before[k]}
    assert moved == {k for k in sample if before[k] == gone}
    assert 150 <= len(moved) <= 350, "about a quarter of the keys lived on the removed replica"
    p._sync(addresses(4))
    assert {k: home(p, k) for k in sample} == before, "its keys come back when it does"


async def test_a_new_replica_takes_its_share_of_keys_from_the_others_and_no_more() -> None:
    p = pool(3)
    sample = keys(1000, seed=5)
    before = {k: home(p, k) for k in sample}
    new = "10.0.0.9:1"
    p._sync([*addresses(3), new])
    after = {k: home(p, k) for k in sample}
    moved = {k for k in sample if after[k] != before[k]}
    assert all(after[k] == new for k in moved), "a key moves only to the new replica"
    assert 150 <= len(moved) <= 350, "the new replica takes about a quarter of the keys"


async def test_a_retry_keeps_the_key_and_counts_the_request_once() -> None:
    p = pool(3)
    key = keys(1)[0]
    preferred = p.replicas[home(p, key)]
    preferred.ejected_until = time.monotonic() + 30
    successor = await call(p, key)  # where the key goes while its replica is out
    preferred.ejected_until = 0.0
    preferred.client.fail_with = grpc.StatusCode.UNAVAILABLE
    counts = p.affinity()
    for _ in range(3):  # the preferred replica is up but refuses: every retry lands together
        assert await call(p, key) == successor
    assert sum(p.affinity().values()) == sum(counts.values()) + 3

    async def gen(client: FakeClient):
        async for chunk in client.stream(None):
            yield chunk.text

    preferred.failures, preferred.ejected_until = 0, 0.0
    got = [t async for t in p.stream(gen, key=key)]
    assert got[0] == successor, "a stream that fails before its first item moves the same way"


def hits(*ids: str) -> list[Hit]:
    return [Hit(id=i, score=1.0, text=f"passage {i} text") for i in ids]


def test_the_prefix_key_is_the_system_prompt_and_history_not_the_question() -> None:
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    a = build_messages("how do I reset it?", hits("d1#0", "d2#3"), history)
    b = build_messages("what does it cost?", hits("d1#0", "d2#3"), history)
    assert prefix_key(a) == prefix_key(b) is not None
    assert prefix_key(build_messages("how do I reset it?", hits("d1#0", "d9#1"), history)) != (
        prefix_key(a)
    ), "different passages, different key"
    assert prefix_key(build_messages("how do I reset it?", hits("d1#0", "d2#3"))) != (
        prefix_key(a)
    ), "different history, different key"
    assert prefix_key([{"role": "user", "content": "just a question"}]) is None


async def test_generate_stage_client_routes_a_passage_set_to_one_replica() -> None:
    p = pool(3)
    picked: list[str | None] = []
    pick = p.pick

    def recording_pick(exclude=frozenset(), key=None):
        picked.append(key)
        return pick(exclude, key)

    p.pick = recording_pick
    client = GenerateStageClient(p)
    params = SamplingParams(max_tokens=8)
    passages = hits("d1#0", "d2#3")
    questions = ["how do I reset it?", "what does it cost?", "who made it?", "is it safe?"]
    models = {(await client.generate(build_messages(q, passages), params)).model for q in questions}
    assert len(models) == 1, "every question over the same passages reached one replica"
    streamed = [c.text async for c in client.stream(build_messages("and?", passages), params)]
    assert streamed[0] in models
    assert len(set(picked)) == 1 and picked[0] == prefix_key(build_messages("x", passages))
    await client.generate(build_messages("how do I reset it?", hits("d7#2")), params)
    assert picked[-1] != picked[0], "another passage set is another key"
