"""MicroBatcher over the real default model: coalescing, order, budgets, queue and deadlines."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from ragline.errors import DeadlineExceeded, ResourceExhausted
from ragline.models import DEFAULT_EMBED_MODEL, resolve_embed_model
from services.embed.batcher import MicroBatcher
from services.embed.model import EmbeddingModel

TEXTS = [
    "leave",
    "How many days do I have to submit an expense claim?",
    "Passwords must be at least fourteen characters long and stored in the vault. " * 3,
    "Where is the Lisbon office?",
    "Per diem for trips outside the EU is seventy-five euros per day, paid with the salary.",
    "ok",
] * 6


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> EmbeddingModel:
    return EmbeddingModel(resolve_embed_model(DEFAULT_EMBED_MODEL, tmp_path_factory.mktemp("m")))


class RecordingInfer:
    """The real model's infer, recording batch shapes; can be held to build a queue."""

    def __init__(self, model: EmbeddingModel) -> None:
        self.model = model
        self.shapes: list[tuple[int, int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, batch):
        self.entered.set()
        self.gate.wait(10)
        self.shapes.append((len(batch), max(len(t) for t in batch)))
        return self.model.infer(batch)


def make(model, infer=None, **kw) -> tuple[MicroBatcher, RecordingInfer]:
    infer = infer or RecordingInfer(model)
    batcher = MicroBatcher(infer, ThreadPoolExecutor(1), **kw)
    batcher.start()
    return batcher, infer


async def test_concurrent_requests_get_exactly_the_unbatched_vectors_in_order(model) -> None:
    expected = np.stack([model.infer([model.tokenize([t])[0]])[0] for t in TEXTS])
    batcher, infer = make(model, max_batch_size=16)
    infer.gate.clear()
    # request i sends texts i..i+2 (a client batch), all at once
    requests = [TEXTS[i : i + 3] for i in range(len(TEXTS) - 2)]
    tasks = [asyncio.create_task(batcher.embed(model.tokenize(r))) for r in requests]
    await asyncio.sleep(0.05)
    infer.gate.set()
    results = await asyncio.gather(*tasks)
    for i, (vecs, timings) in enumerate(results):
        np.testing.assert_allclose(vecs, expected[i : i + 3], atol=1e-5)
        assert timings.queue_ms >= 0 and timings.inference_ms > 0
    assert len(infer.shapes) < len(requests) / 3, "requests were coalesced"
    assert all(size <= 16 for size, _ in infer.shapes)
    await batcher.stop()


async def test_token_budget_and_length_sorting_limit_padding(model) -> None:
    batcher, infer = make(model, max_batch_size=64, max_batch_tokens=256)
    infer.gate.clear()
    tasks = [asyncio.create_task(batcher.embed(model.tokenize([t]))) for t in TEXTS]
    await asyncio.sleep(0.05)
    infer.gate.set()
    await asyncio.gather(*tasks)
    assert all(size * width <= 256 for size, width in infer.shapes)
    # sorted by length: the short texts never ride with the long one
    padded = sum(size * width for size, width in infer.shapes)
    real = sum(len(model.tokenize([t])[0]) for t in TEXTS)
    assert padded < 1.5 * real
    await batcher.stop()


async def test_batching_off_runs_each_request_alone(model) -> None:
    batcher, infer = make(model, merge=False)
    infer.gate.clear()
    tasks = [asyncio.create_task(batcher.embed(model.tokenize(TEXTS[:2]))) for _ in range(5)]
    await asyncio.sleep(0.05)
    infer.gate.set()
    await asyncio.gather(*tasks)
    assert [size for size, _ in infer.shapes] == [2] * 5
    await batcher.stop()


async def test_full_queue_is_resource_exhausted_at_once(model) -> None:
    batcher, infer = make(model, max_concurrent_requests=2)
    infer.gate.clear()
    held = [asyncio.create_task(batcher.embed(model.tokenize(["a"]))) for _ in range(2)]
    await asyncio.sleep(0.01)
    # The gate stays shut, so no capacity frees: only a refusal that does not wait can return.
    with pytest.raises(ResourceExhausted, match="the limit is 2"):
        await asyncio.wait_for(batcher.embed(model.tokenize(["b"])), timeout=30)
    assert not infer.gate.is_set() and not any(t.done() for t in held)
    infer.gate.set()
    await asyncio.gather(*held)
    await batcher.embed(model.tokenize(["c"]))  # serving again
    await batcher.stop()


async def test_expired_deadline_costs_no_compute(model) -> None:
    batcher, infer = make(model)
    infer.gate.clear()
    blocker = asyncio.create_task(batcher.embed(model.tokenize(["blocker"])))
    await asyncio.to_thread(infer.entered.wait, 5)
    late = asyncio.create_task(
        batcher.embed(model.tokenize(["late one"]), deadline=time.monotonic() + 0.02)
    )
    await asyncio.sleep(0.1)
    infer.gate.set()
    with pytest.raises(DeadlineExceeded):
        await late
    await blocker
    assert [size for size, _ in infer.shapes] == [1], "the expired text never reached the model"
    await batcher.stop()


async def test_cancelled_caller_costs_no_compute(model) -> None:
    batcher, infer = make(model)
    infer.gate.clear()
    blocker = asyncio.create_task(batcher.embed(model.tokenize(["blocker"])))
    await asyncio.to_thread(infer.entered.wait, 5)
    gone = asyncio.create_task(batcher.embed(model.tokenize(["gone", "away"])))
    await asyncio.sleep(0.01)
    gone.cancel()
    await asyncio.sleep(0.01)
    infer.gate.set()
    await blocker
    await asyncio.sleep(0.05)
    assert infer.shapes == [(1, infer.shapes[0][1])]
    await batcher.stop()


async def test_max_wait_holds_an_underfull_batch(model) -> None:
    batcher, infer = make(model, max_batch_size=4, max_wait_us=200_000)
    first = asyncio.create_task(batcher.embed(model.tokenize(["one"])))
    await asyncio.sleep(0.05)
    second = asyncio.create_task(batcher.embed(model.tokenize(["two"])))
    await asyncio.gather(first, second)
    assert [size for size, _ in infer.shapes] == [2], "both rode in one batch"
    await batcher.stop()
