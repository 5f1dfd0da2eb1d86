"""GenerationEngine's queueing, deadlines and cancellation, with a scripted backend.

The backend here is a test double of the LLM; the same behaviours run against the real
llama.cpp model in tests/integration/test_generate_service.py.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from ragline.errors import DeadlineExceeded, ResourceExhausted
from services.generate.backends.base import Backend, ChatMessage, Finished, SamplingParams
from services.generate.engine import GenerationEngine

MSG = [ChatMessage("user", "hi")]


class ScriptedBackend(Backend):
    name = "scripted"

    def __init__(self, step_s: float = 0.01) -> None:
        self.step_s = step_s
        self.started = 0
        self.gate = threading.Event()
        self.gate.set()

    def generate(self, messages, params, should_stop):
        self.started += 1
        self.gate.wait()
        for i in range(params.max_tokens):
            if should_stop():
                yield Finished("cancelled", 1, i)
                return
            time.sleep(self.step_s)
            yield f"t{i} "
        yield Finished("length", 1, params.max_tokens)


async def collect(engine, max_tokens=3, deadline=None):
    return [e async for e in engine.stream(MSG, SamplingParams(max_tokens), deadline)]


async def test_streams_pieces_then_finished_with_timings() -> None:
    engine = GenerationEngine(ScriptedBackend(), max_queue=2)
    events = await collect(engine)
    assert events[:3] == ["t0 ", "t1 ", "t2 "]
    assert isinstance(events[-1], Finished) and events[-1].completion_tokens == 3
    assert set(events[-1].timings) == {"queue_ms", "prefill_ms", "decode_ms"}
    engine.close()


async def test_full_queue_is_refused_at_once() -> None:
    backend = ScriptedBackend()
    backend.gate.clear()  # hold the worker on the first job
    engine = GenerationEngine(backend, max_queue=1)
    first = asyncio.create_task(collect(engine))
    while backend.started == 0:
        await asyncio.sleep(0.005)
    second = asyncio.create_task(collect(engine))  # fills the one queue slot
    await asyncio.sleep(0.01)
    # The gate is shut, nothing can finish: only a refusal that does not wait can return.
    with pytest.raises(ResourceExhausted, match="1 requests already queued"):
        await asyncio.wait_for(collect(engine), timeout=30)
    assert not first.done() and not second.done()
    backend.gate.set()
    assert len(await first) == 4 and len(await second) == 4
    engine.close()


async def test_expired_job_is_dropped_before_compute() -> None:
    backend = ScriptedBackend()
    backend.gate.clear()
    engine = GenerationEngine(backend, max_queue=4)
    blocker = asyncio.create_task(collect(engine))
    while backend.started == 0:
        await asyncio.sleep(0.005)
    late = asyncio.create_task(collect(engine, deadline=time.monotonic() + 0.05))
    await asyncio.sleep(0.1)
    backend.gate.set()
    with pytest.raises(DeadlineExceeded):
        await late
    await blocker
    assert backend.started == 1, "the expired job never reached the backend"
    engine.close()


async def test_consumer_leaving_cancels_within_a_step() -> None:
    engine = GenerationEngine(ScriptedBackend(step_s=0.02), max_queue=2)
    stream = engine.stream(MSG, SamplingParams(1000), None)
    assert await anext(stream) == "t0 "
    assert engine.active == 1
    await stream.aclose()
    deadline = time.monotonic() + 1
    while engine.active and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    assert engine.active == 0
    assert len(await collect(engine)) == 4, "the engine serves the next job"
    engine.close()
