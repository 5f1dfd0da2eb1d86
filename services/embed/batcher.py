"""MicroBatcher: coalesce concurrent embedding requests into few ONNX Runtime runs.

One bounded queue in front of one batching loop (TEI's router shape). Each text is an item with
its own future. The loop takes a window of the oldest items, drops those already cancelled or
past their deadline (before they cost compute), sorts the window by length so padding stays
small, and cuts it into batches within ``max_batch_size`` texts and ``max_batch_tokens`` padded
tokens (batch size x longest input, TEI's --max-batch-tokens). Batches run one at a time on the
inference thread; results are set on the event-loop thread, so callers get their vectors back in
the order they sent them.

There is no artificial wait by default (``max_wait_us=0``): while a batch runs, new requests
queue up and form the next batch, so light load pays nothing for batching. A positive
``max_wait_us`` (Triton's max_queue_delay) holds an under-full batch that long for company.
With ``merge=False`` each request is run on its own (batching off, for comparison).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np
from opentelemetry import trace

from ragline.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted
from services.embed import metrics

tracer = trace.get_tracer(__name__)


@dataclass(eq=False)
class _Item:
    tokens: list[int]
    future: asyncio.Future
    deadline: float | None
    request_id: int
    link: trace.Link | None
    enqueued: float = field(default_factory=time.monotonic)
    started: float = 0.0
    finished: float = 0.0


@dataclass(frozen=True)
class BatchTimings:
    queue_ms: float
    inference_ms: float


class MicroBatcher:
    def __init__(
        self,
        infer: Callable[[list[list[int]]], np.ndarray],
        executor: Executor,
        *,
        max_batch_size: int = 32,
        max_batch_tokens: int = 16384,
        max_wait_us: int = 0,
        max_concurrent_requests: int = 512,
        merge: bool = True,
    ) -> None:
        if max_batch_size < 1 or max_batch_tokens < 1:
            raise ValueError("max_batch_size and max_batch_tokens must be positive")
        self.infer = infer
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_us / 1e6
        self.max_concurrent_requests = max_concurrent_requests
        self.merge = merge
        self._pending: deque[_Item] = deque()
        self._wakeup = asyncio.Event()
        self._requests = 0
        self._next_id = 0
        self._task: asyncio.Task | None = None
        self.batches_run = 0  # for tests and metrics

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    @property
    def in_flight(self) -> int:
        return self._requests

    async def embed(
        self, token_lists: Sequence[list[int]], deadline: float | None = None
    ) -> tuple[np.ndarray, BatchTimings]:
        """Vectors for ``token_lists`` in order; raises ResourceExhausted when the queue is full."""
        if self._requests >= self.max_concurrent_requests:
            metrics.REJECTED.inc()
            raise ResourceExhausted(
                f"embed is overloaded: {self._requests} requests in flight, the limit is "
                f"{self.max_concurrent_requests} (RAGLINE_EMBED_MAX_CONCURRENT_REQUESTS); "
                "retry shortly or add a replica"
            )
        longest = max(len(t) for t in token_lists)
        if longest > self.max_batch_tokens:
            raise InvalidArgument(
                f"an input of {longest} tokens exceeds the batch token budget "
                f"{self.max_batch_tokens}"
            )
        self._requests += 1
        self._next_id += 1
        loop = asyncio.get_running_loop()
        span_context = trace.get_current_span().get_span_context()
        link = trace.Link(span_context) if span_context.is_valid else None
        items = [
            _Item(tokens, loop.create_future(), deadline, self._next_id, link)
            for tokens in token_lists
        ]
        try:
            self._pending.extend(items)
            metrics.QUEUE_SIZE.set(len(self._pending))
            self._wakeup.set()
            vectors = await asyncio.gather(*(i.future for i in items))
        finally:
            self._requests -= 1
            for item in items:  # a cancelled caller leaves nothing for the loop to compute
                if not item.future.done():
                    item.future.cancel()
        started = min(i.started for i in items)
        timings = BatchTimings(
            queue_ms=(started - min(i.enqueued for i in items)) * 1000,
            inference_ms=(max(i.finished for i in items) - started) * 1000,
        )
        self._record_spans(items, timings)
        return np.stack(vectors), timings

    def _record_spans(self, items: list[_Item], timings: BatchTimings) -> None:
        # Spans after the fact, with the real start/end times: queueing is visible, not only
        # compute. time.monotonic -> wall clock nanoseconds for the exporter.
        offset = time.time_ns() - time.monotonic_ns()
        t_enq = int(min(i.enqueued for i in items) * 1e9) + offset
        t_start = int(min(i.started for i in items) * 1e9) + offset
        t_end = int(max(i.finished for i in items) * 1e9) + offset
        queue = tracer.start_span("embed.queue_wait", start_time=t_enq)
        queue.end(end_time=t_start)
        inference = tracer.start_span(
            "embed.inference",
            start_time=t_start,
            attributes={
                "ragline.texts": len(items),
                "ragline.tokens": sum(len(i.tokens) for i in items),
            },
        )
        inference.end(end_time=t_end)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self.max_wait_s and len(self._pending) < self.max_batch_size:
                until = self._pending[0].enqueued + self.max_wait_s
                while len(self._pending) < self.max_batch_size:
                    remaining = until - time.monotonic()
                    if remaining <= 0:
                        break
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), remaining)
                    except TimeoutError:
                        break
            for batch in self._form_batches():
                await self._run(loop, batch)
            metrics.QUEUE_SIZE.set(len(self._pending))

    def _take_window(self) -> list[_Item]:
        now = time.monotonic()
        window: list[_Item] = []
        limit = 4 * self.max_batch_size
        first_request = None
        while self._pending and len(window) < limit:
            item = self._pending[0]
            if not self.merge:
                first_request = first_request or item.request_id
                if item.request_id != first_request:
                    break
            self._pending.popleft()
            if item.future.done():  # the caller went away
                continue
            if item.deadline is not None and item.deadline <= now:
                metrics.EXPIRED.inc()
                item.future.set_exception(
                    DeadlineExceeded("deadline passed while queued for embedding")
                )
                continue
            window.append(item)
        return window

    def _form_batches(self) -> list[list[_Item]]:
        window = sorted(self._take_window(), key=lambda i: len(i.tokens))
        batches: list[list[_Item]] = []
        current: list[_Item] = []
        for item in window:
            width = max(len(item.tokens), len(current[-1].tokens) if current else 0)
            if current and (
                len(current) == self.max_batch_size
                or width * (len(current) + 1) > self.max_batch_tokens
            ):
                batches.append(current)
                current = []
            current.append(item)
        if current:
            batches.append(current)
        return batches

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Item]) -> None:
        batch = [i for i in batch if not i.future.done()]
        if not batch:
            return
        start = time.monotonic()
        real = sum(len(i.tokens) for i in batch)
        padded = len(batch) * max(len(i.tokens) for i in batch)
        links = list({id(i.link): i.link for i in batch if i.link is not None}.values())
        with tracer.start_as_current_span("embed.batch", links=links) as span:
            span.set_attribute("ragline.batch_size", len(batch))
            span.set_attribute("ragline.tokens", real)
            span.set_attribute("ragline.padded_tokens", padded)
            try:
                vectors = await loop.run_in_executor(
                    self.executor, self.infer, [i.tokens for i in batch]
                )
            except Exception as exc:
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                return
        end = time.monotonic()
        self.batches_run += 1
        metrics.observe_batch(batch_size=len(batch), real=real, padded=padded, seconds=end - start)
        for item, vector in zip(batch, vectors, strict=True):
            metrics.QUEUE_SECONDS.observe(start - item.enqueued)
            item.started, item.finished = start, end
            if not item.future.done():
                item.future.set_result(vector)
