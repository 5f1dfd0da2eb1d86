"""GenerationEngine: a bounded queue in front of one worker thread that drives the backend.

One llama.cpp context is not thread-safe, so one worker runs one job at a time (continuous
batching across jobs is the generate issue's work; the interface already streams per job).
The queue is bounded: a full queue answers RESOURCE_EXHAUSTED at once. A job whose deadline
passed while queued is dropped before it costs compute. A job whose consumer went away (client
cancel) stops within one decode step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from opentelemetry import trace
from prometheus_client import Gauge

from ragline.errors import DeadlineExceeded, RaglineError, ResourceExhausted
from services.generate.backends.base import Backend, ChatMessage, Finished, SamplingParams

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)
ACTIVE = Gauge("ragline_generate_active", "Generations running now")
QUEUED = Gauge("ragline_generate_queued", "Generations waiting for the worker")


@dataclass
class Job:
    messages: Sequence[ChatMessage]
    params: SamplingParams
    deadline: float | None  # time.monotonic() value
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.monotonic)
    span_context: object = None

    def post(self, event: object) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline


class GenerationEngine:
    def __init__(self, backend: Backend, max_queue: int = 16) -> None:
        self.backend = backend
        self.max_queue = max_queue
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.active = 0
        self._worker = threading.Thread(target=self._run, name="generate-worker", daemon=True)
        self._worker.start()
        ACTIVE.set_function(lambda: self.active)
        QUEUED.set_function(lambda: self._queue.qsize())

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def submit(
        self, messages: Sequence[ChatMessage], params: SamplingParams, deadline: float | None
    ) -> Job:
        job = Job(messages, params, deadline, asyncio.get_running_loop())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise ResourceExhausted(
                f"generate is at capacity: {self.max_queue} requests already queued "
                "(RAGLINE_GENERATE_MAX_QUEUE); retry shortly or add a replica"
            ) from None
        return job

    async def stream(
        self, messages: Sequence[ChatMessage], params: SamplingParams, deadline: float | None
    ) -> AsyncIterator[str | Finished]:
        """Text pieces then one Finished; leaving the loop early cancels the job."""
        job = self.submit(messages, params, deadline)
        try:
            while True:
                event = await job.events.get()
                if isinstance(event, BaseException):
                    raise event
                if isinstance(event, Finished):
                    record_spans(job.enqueued, event)
                    yield event
                    return
                yield event
        finally:
            job.cancelled.set()

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=10)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancelled.is_set():
                continue
            if job.expired():
                job.post(DeadlineExceeded("deadline passed while queued for generation"))
                continue
            self.active += 1
            try:
                self._generate(job)
            except RaglineError as exc:
                job.post(exc)
            except Exception as exc:  # a backend bug must not kill the worker
                log.exception("generation failed")
                job.post(exc)
            finally:
                self.active -= 1

    def _generate(self, job: Job) -> None:
        start = time.monotonic()
        first: float | None = None

        def should_stop() -> bool:
            return job.cancelled.is_set() or job.expired()

        for event in self.backend.generate(job.messages, job.params, should_stop):
            if isinstance(event, Finished):
                end = time.monotonic()
                first = first or end
                job.post(
                    Finished(
                        event.finish_reason,
                        event.prompt_tokens,
                        event.completion_tokens,
                        {
                            "queue_ms": (start - job.enqueued) * 1000,
                            "prefill_ms": (first - start) * 1000,
                            "decode_ms": (end - first) * 1000,
                        },
                    )
                )
                return
            if first is None:
                first = time.monotonic()
            job.post(event)


def record_spans(enqueued: float, done: Finished) -> None:
    """Queue wait, prefill (time to first token) and decode as spans with their real times,
    children of the caller's current span (the gRPC server span)."""
    offset = time.time_ns() - time.monotonic_ns()
    t0 = int(enqueued * 1e9) + offset
    t1 = t0 + int(done.timings["queue_ms"] * 1e6)
    t2 = t1 + int(done.timings["prefill_ms"] * 1e6)
    t3 = t2 + int(done.timings["decode_ms"] * 1e6)
    for name, begin, end, attributes in (
        ("generate.queue_wait", t0, t1, {}),
        ("generate.prefill", t1, t2, {"ragline.prompt_tokens": done.prompt_tokens}),
        (
            "generate.decode",
            t2,
            t3,
            {
                "ragline.completion_tokens": done.completion_tokens,
                "ragline.finish_reason": done.finish_reason,
            },
        ),
    ):
        tracer.start_span(name, start_time=begin, attributes=attributes).end(end_time=end)
