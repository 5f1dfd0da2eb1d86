"""Continuous batching in GenerationEngine, with a scripted batching backend; and the pure
sampling and stop-string helpers of the llama.cpp backend.

The backend here is a test double of the model: each step gives every admitted sequence one
token. The same scheduling runs against the real llama.cpp model in
tests/integration/test_generate_service.py (concurrent streams share steps, a cancelled stream
frees its slot while the others go on).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest

from ragline.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted
from services.generate.backends.base import BatchingBackend, ChatMessage, Finished, SamplingParams
from services.generate.backends.llamacpp import sample, split_stop
from services.generate.engine import GenerationEngine

MSG = [ChatMessage("user", "hi")]


@dataclass
class FakeSeq:
    name: str
    max_tokens: int
    reserved: int
    produced: int = 0
    events: list = field(default_factory=list)
    done: bool = False
    slot: int = -1


class FakeBatching(BatchingBackend):
    name = "fake"

    def __init__(self, slots: int = 2, cache: int = 1000, step_s: float = 0.005) -> None:
        self.max_slots = slots
        self.cache = cache
        self.step_s = step_s
        self.free = list(range(slots))
        self.reserved = 0
        self.steps: list[list[str]] = []  # which sequences each step advanced
        self.released: list[str] = []
        self.gate = threading.Event()
        self.gate.set()

    def prepare(self, messages, params):
        if messages[0].content == "bad":
            raise InvalidArgument("bad prompt")
        return FakeSeq(messages[0].content, params.max_tokens, 10 + params.max_tokens)

    def can_admit(self, seq) -> bool:
        return bool(self.free) and self.reserved + seq.reserved <= self.cache

    def admit(self, seq) -> None:
        seq.slot = self.free.pop()
        self.reserved += seq.reserved

    def release(self, seq) -> None:
        self.free.append(seq.slot)
        self.reserved -= seq.reserved
        self.released.append(seq.name)

    def step(self, seqs) -> int:
        self.gate.wait()
        time.sleep(self.step_s)
        self.steps.append([s.name for s in seqs])
        for s in seqs:
            s.produced += 1
            s.events.append(f"{s.name}{s.produced} ")
            if s.produced >= s.max_tokens:
                s.events.append(Finished("length", 10, s.produced))
                s.done = True
        return len(seqs)

    def cache_usage(self) -> float:
        return self.reserved / self.cache


async def collect(engine, name: str, max_tokens: int, deadline=None):
    msgs = [ChatMessage("user", name)]
    return [e async for e in engine.stream(msgs, SamplingParams(max_tokens), deadline)]


async def test_concurrent_requests_share_steps_and_a_third_joins_when_a_slot_frees() -> None:
    backend = FakeBatching(slots=2)
    engine = GenerationEngine(backend, max_queue=4)
    a, b, c = await asyncio.gather(
        collect(engine, "a", 3), collect(engine, "b", 6), collect(engine, "c", 2)
    )
    assert a[:3] == ["a1 ", "a2 ", "a3 "] and a[-1].completion_tokens == 3
    assert b[-1].completion_tokens == 6 and c[-1].completion_tokens == 2
    assert any(len(s) == 2 for s in backend.steps), "two sequences never shared a step"
    first_c = next(i for i, s in enumerate(backend.steps) if "c" in s)
    last_a = max(i for i, s in enumerate(backend.steps) if "a" in s)
    assert first_c == last_a + 1, "c joined at the step after a slot freed, not after b"
    assert max(len(s) for s in backend.steps) <= 2
    assert set(a[-1].timings) == {"queue_ms", "prefill_ms", "decode_ms"}
    assert backend.free and backend.reserved == 0
    engine.close()


async def test_a_cancelled_stream_frees_its_slot_within_one_step() -> None:
    backend = FakeBatching(slots=2, cache=5000, step_s=0.01)
    engine = GenerationEngine(backend, max_queue=4)
    other = asyncio.create_task(collect(engine, "o", 30))
    stream = engine.stream([ChatMessage("user", "x")], SamplingParams(1000), None)
    assert await anext(stream) == "x1 "
    await stream.aclose()
    deadline = time.monotonic() + 1
    while "x" not in backend.released and time.monotonic() < deadline:
        await asyncio.sleep(0.002)
    assert "x" in backend.released
    steps_with_x = sum("x" in s for s in backend.steps)
    await asyncio.sleep(0.05)
    assert sum("x" in s for s in backend.steps) == steps_with_x, "x kept decoding"
    assert (await other)[-1].completion_tokens == 30, "the other stream went on"
    engine.close()


async def test_kv_cache_reservation_makes_a_request_wait_not_fail() -> None:
    backend = FakeBatching(slots=4, cache=40)  # one sequence of 20 tokens reserves 30
    engine = GenerationEngine(backend, max_queue=4)
    a, b = await asyncio.gather(collect(engine, "a", 20), collect(engine, "b", 20))
    assert a[-1].completion_tokens == 20 and b[-1].completion_tokens == 20
    assert all(len(s) == 1 for s in backend.steps), "both ran together beyond the cache"
    engine.close()


async def test_a_request_bigger_than_the_whole_cache_is_resource_exhausted() -> None:
    engine = GenerationEngine(FakeBatching(slots=2, cache=20), max_queue=4)
    with pytest.raises(ResourceExhausted, match="CACHE_TOKENS"):
        await collect(engine, "huge", 50)
    assert (await collect(engine, "ok", 3))[-1].completion_tokens == 3
    engine.close()


async def test_deadline_during_generation_and_bad_prompt() -> None:
    backend = FakeBatching(slots=2, cache=5000, step_s=0.01)
    engine = GenerationEngine(backend, max_queue=4)
    with pytest.raises(DeadlineExceeded, match="during generation"):
        await collect(engine, "slow", 1000, deadline=time.monotonic() + 0.05)
    with pytest.raises(InvalidArgument, match="bad prompt"):
        await collect(engine, "bad", 3)
    assert backend.reserved == 0
    engine.close()


async def test_full_queue_is_refused_at_once_while_slots_are_busy() -> None:
    backend = FakeBatching(slots=1)
    backend.gate.clear()  # the first step blocks: nothing finishes
    engine = GenerationEngine(backend, max_queue=1)
    running = asyncio.create_task(collect(engine, "r", 2))
    while not backend.reserved:
        await asyncio.sleep(0.002)
    queued = asyncio.create_task(collect(engine, "q", 2))  # fills the queue
    await asyncio.sleep(0.01)
    # The gate is shut, nothing can finish: only a refusal that does not wait can return.
    with pytest.raises(ResourceExhausted, match="already queued"):
        await asyncio.wait_for(collect(engine, "refused", 2), timeout=30)
    assert not running.done() and not queued.done()
    backend.gate.set()
    for t in (running, queued):
        assert (await t)[-1].completion_tokens == 2
    engine.close()


async def test_work_that_would_outlast_the_deadline_is_refused_at_once() -> None:
    backend = FakeBatching(slots=1, cache=5000, step_s=0.01)  # ~10 steps = ~0.1 s a request
    engine = GenerationEngine(backend, max_queue=8)
    assert engine.expected_wait_s(3) is None, "no estimate before completions were seen"
    await asyncio.gather(*(collect(engine, f"w{i}", 10) for i in range(4)))  # busy back to back
    assert 0.05 < engine.expected_wait_s(0 + 1) / 2 < 0.5
    blockers = [asyncio.create_task(collect(engine, f"b{i}", 10)) for i in range(3)]
    while engine.active + engine.queued < 3:
        await asyncio.sleep(0.002)
    with pytest.raises(ResourceExhausted, match="would not finish this request within its dead"):
        await collect(engine, "late", 10, deadline=time.monotonic() + 0.1)
    assert not any(t.done() for t in blockers), "refused at once, not after the work ahead"
    # A deadline the work ahead fits in is admitted and served.
    ok = await collect(engine, "fits", 10, deadline=time.monotonic() + 30)
    assert ok[-1].completion_tokens == 10
    for t in blockers:
        assert (await t)[-1].completion_tokens == 10
    # An idle engine never refuses on the estimate, however stale it is.
    engine._interval_s = 1000.0
    free = await collect(engine, "free", 3, deadline=time.monotonic() + 5)
    assert free[-1].completion_tokens == 3
    engine.close()


async def test_a_free_slot_is_not_enough_when_the_batch_would_outlast_the_deadline() -> None:
    """Slots share the CPU: joining a busy batch is checked against the deadline too."""
    backend = FakeBatching(slots=4, cache=5000, step_s=0.01)
    engine = GenerationEngine(backend, max_queue=8)
    await asyncio.gather(*(collect(engine, f"w{i}", 10) for i in range(4)))
    engine._interval_s = 0.5  # as if each completion took half a second of the batch
    running = asyncio.create_task(collect(engine, "running", 30))
    while engine.active < 1:
        await asyncio.sleep(0.002)
    assert engine.active < backend.max_slots  # a slot is free
    with pytest.raises(ResourceExhausted, match="within its deadline"):
        await collect(engine, "tight", 10, deadline=time.monotonic() + 0.6)
    ok = await collect(engine, "roomy", 10, deadline=time.monotonic() + 30)
    assert ok[-1].completion_tokens == 10
    await running
    engine.close()


# --- sampling and stop strings ------------------------------------------------------------


def test_greedy_is_argmax_and_top_k_1_is_greedy_at_any_temperature() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=1000).astype(np.float32)
    best = int(np.argmax(logits))
    assert sample(logits, SamplingParams(8, temperature=0.0), [], rng) == best
    assert sample(logits, SamplingParams(8, temperature=1.5, top_k=1), [], rng) == best


def test_seeded_sampling_repeats_and_top_p_keeps_the_head() -> None:
    logits = np.zeros(50, dtype=np.float32)
    logits[7], logits[9] = 10.0, 9.5  # ~97% of the mass on two tokens
    p = SamplingParams(8, temperature=1.0, top_p=0.9, top_k=0)
    draws = [sample(logits, p, [], np.random.default_rng(42)) for _ in range(3)]
    assert len(set(draws)) == 1
    rng = np.random.default_rng(1)
    assert {sample(logits, p, [], rng) for _ in range(200)} <= {7, 9}


def test_repetition_penalty_pushes_recent_tokens_down() -> None:
    logits = np.array([1.0, 0.9, 0.1], dtype=np.float32)
    p = SamplingParams(8, temperature=0.0, repetition_penalty=1.5)
    assert sample(logits, p, [0, 0], np.random.default_rng(0)) == 1


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        ("Hello world", ["<|im_end|>"], ("Hello world", "", False)),
        ("Hello <|im", ["<|im_end|>"], ("Hello ", "<|im", False)),
        ("Hello <|im_end|> tail", ["<|im_end|>"], ("Hello ", "", True)),
        ("one\n\nUser:", ["User:", "\n\n"], ("one", "", True)),
        ("ab", [], ("ab", "", False)),
        ("abc END", ["END", "ENDING"], ("abc ", "", True)),
    ],
)
def test_split_stop(text: str, stops: list[str], expected: tuple[str, str, bool]) -> None:
    assert split_stop(text, stops) == expected


async def test_a_request_that_would_wait_too_long_for_a_slot_is_refused_at_once() -> None:
    backend = FakeBatching(slots=1, cache=5000, step_s=0.01)
    engine = GenerationEngine(backend, max_queue=8, max_queue_wait_s=2.0)
    await asyncio.gather(*(collect(engine, f"w{i}", 5) for i in range(4)))
    engine._interval_s = 1.5  # as if a slot freed up every 1.5 s
    running = [asyncio.create_task(collect(engine, "r0", 40))]
    while engine.active < 1:
        await asyncio.sleep(0.002)
    running.append(asyncio.create_task(collect(engine, "r1", 40)))  # next in line: admitted
    while engine.queued < 1:
        await asyncio.sleep(0.002)
    with pytest.raises(ResourceExhausted, match="MAX_QUEUE_WAIT_S"):
        await collect(engine, "third", 5)  # 1 running, 1 queued: ~3 s for a slot
    for t in running:
        assert (await t)[-1].completion_tokens == 40
    engine.close()
