"""GenerationEngine: a bounded queue in front of one scheduler thread that drives the backend.

A model context is not thread-safe, so one thread owns it. With a ``BatchingBackend``
(llama.cpp) that thread runs continuous batching: every step it admits queued requests while
slots and KV cache allow, advances every admitted sequence by one token (or a prompt chunk) in
one model call, hands each its text, and frees the slots of sequences that finished, were
cancelled or passed their deadline, so a new request joins at the next step instead of waiting
for the others to finish. A plain ``Backend`` runs one job at a time.

The queue is bounded: a full queue answers RESOURCE_EXHAUSTED at once, and so does a request
whose deadline the work ahead of it would outlast (estimated from the measured interval between
completions while busy), so overload shows as fast refusals, not timeouts. A job whose deadline
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
from dataclasses import dataclass, field, replace

from opentelemetry import trace
from prometheus_client import Counter, Gauge, Histogram

from ragline.errors import DeadlineExceeded, RaglineError, ResourceExhausted
from services.generate.backends.base import (
    Backend,
    BatchingBackend,
    ChatMessage,
    Finished,
    SamplingParams,
)

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)
ACTIVE = Gauge("ragline_generate_active", "Generations running now")
QUEUED = Gauge("ragline_generate_queued", "Generations waiting for the worker")
CACHE = Gauge("ragline_generate_cache_usage", "Share of the KV cache reserved by sequences")
QUEUE_SECONDS = Histogram(
    "ragline_generate_queue_seconds", "Time from arrival to a slot",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)  # fmt: skip
TTFT_SECONDS = Histogram(
    "ragline_generate_ttft_seconds", "Time from arrival to the first token",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32),
)  # fmt: skip
TOKENS = Counter("ragline_generate_tokens", "Tokens generated (rate() = tokens/s)")
SHED = Counter(
    "ragline_generate_shed_deadline",
    "Requests refused because the work ahead would outlast their deadline",
)
STEP_TOKENS = Histogram(
    "ragline_generate_step_tokens", "Tokens put through the model per scheduler step",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)  # fmt: skip


# A request is admitted when the estimate of its finish time is within this share of the time
# it has left: the estimate is a moving average, and a request that runs out its budget after
# paying for its prefill costs more than a refusal (the edge answers 429 with Retry-After).
ADMIT_SHARE = 0.8


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
    seq: object = None  # the backend's sequence, once prepared
    started: float = 0.0
    first: float | None = None

    def post(self, event: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the caller's event loop is gone: nobody to tell
            self.cancelled.set()

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline


class GenerationEngine:
    def __init__(
        self, backend: Backend, max_queue: int = 16, max_queue_wait_s: float = 0.0
    ) -> None:
        self.backend = backend
        self.max_queue = max_queue
        self.max_queue_wait_s = max_queue_wait_s  # 0: only the deadline bounds the wait
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.active = 0
        self._head: Job | None = None  # taken off the queue, waiting for a slot
        # Completion-rate estimate for deadline-aware admission (see submit).
        self._interval_s: float | None = None
        self._last_completion: float | None = None
        self._busy_since_last = False
        self._completions = 0
        batching = isinstance(backend, BatchingBackend)
        target = self._run_batched if batching else self._run
        self._worker = threading.Thread(target=target, name="generate-worker", daemon=True)
        self._worker.start()
        ACTIVE.set_function(lambda: self.active)
        QUEUED.set_function(lambda: self.queued)
        CACHE.set_function(lambda: backend.cache_usage() if batching else 0.0)

    def expected_wait_s(self, ahead: int) -> float | None:
        """Seconds until a request arriving now would finish, from the measured completion
        rate while busy; None until enough completions were seen (or when idle)."""
        if ahead == 0 or self._completions < 3 or self._interval_s is None:
            return None
        return (ahead + 1) * self._interval_s

    def _completed(self, now: float) -> None:
        """One request finished: update the busy-time interval between completions."""
        if self._last_completion is not None and self._busy_since_last:
            gap = now - self._last_completion
            self._interval_s = (
                gap if self._interval_s is None else 0.8 * self._interval_s + 0.2 * gap
            )
        self._completions += 1
        self._last_completion = now
        self._busy_since_last = True

    @property
    def queued(self) -> int:
        return self._queue.qsize() + (1 if self._head is not None else 0)

    def submit(
        self, messages: Sequence[ChatMessage], params: SamplingParams, deadline: float | None
    ) -> Job:
        job = Job(messages, params, deadline, asyncio.get_running_loop())
        ahead = self.queued + self.active
        # Any request with work ahead of it is checked, a free slot included: slots share the
        # CPU, so a request that joins a full batch finishes about when the batch does, and
        # admitting it slows the others down. An idle engine admits anything (nothing would
        # complete to correct a stale estimate otherwise), so a replica cannot lock itself out.
        expected = self.expected_wait_s(ahead)
        slots = getattr(self.backend, "max_slots", 1)
        if self.max_queue_wait_s and (self.queued > 0 or self.active >= slots):
            # Triton's queue policy: a request that would wait longer than this for a slot is
            # refused now; its first token would come too late to be worth the wait.
            wait = self.expected_wait_s(self.queued)
            if wait is not None and wait > self.max_queue_wait_s:
                SHED.inc()
                raise ResourceExhausted(
                    f"generate is busy: a slot would free up in about {wait:.1f}s "
                    f"({self.active} running, {self.queued} queued), more than "
                    f"RAGLINE_GENERATE_MAX_QUEUE_WAIT_S={self.max_queue_wait_s:g}; retry shortly"
                )
        if deadline is not None and expected is not None:
            left = deadline - time.monotonic()
            if expected > ADMIT_SHARE * left:
                # Refuse now rather than time out later: the work ahead would outlast the
                # deadline, and a refusal costs the client nothing (the edge answers 429).
                SHED.inc()
                raise ResourceExhausted(
                    f"generate would not finish this request within its deadline: about "
                    f"{expected:.1f}s of work ahead ({self.active} running, {self.queued} "
                    f"queued) and {max(left, 0):.1f}s left; retry later or add a replica"
                )
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
        """Stop the scheduler thread, then free the backend's model and cache."""
        self._queue.put(None)
        self._worker.join(timeout=10)
        if not self._worker.is_alive():  # a step still running would use a freed context
            self.backend.close()

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

    # --- continuous batching -----------------------------------------------------------------

    def _next_job(self, block: bool) -> Job | None | bool:
        """A live job from the queue, None on shutdown, False when there is none now."""
        while True:
            try:
                job = self._queue.get(block=block)
            except queue.Empty:
                return False
            if job is None:
                return None
            if job.cancelled.is_set():
                continue
            if job.expired():
                job.post(DeadlineExceeded("deadline passed while queued for generation"))
                continue
            try:
                job.seq = self.backend.prepare(job.messages, job.params)
            except RaglineError as exc:
                job.post(exc)
                continue
            except Exception as exc:
                log.exception("could not prepare a generation")
                job.post(exc)
                continue
            return job

    def _run_batched(self) -> None:
        backend: BatchingBackend = self.backend  # type: ignore[assignment]
        running: list[Job] = []
        while True:
            # admit in arrival order while a slot and the KV cache allow
            while True:
                if self._head is None:
                    got = self._next_job(block=not running)
                    if got is None:
                        for job in running:
                            backend.release(job.seq)
                        return
                    if got is False:
                        break
                    self._head = got
                head = self._head
                if head.cancelled.is_set() or head.expired():
                    if not head.cancelled.is_set():
                        head.post(DeadlineExceeded("deadline passed while queued for generation"))
                    self._head = None
                    continue
                if not backend.can_admit(head.seq):
                    if not running:  # alone and still too big: it can never fit
                        head.post(
                            ResourceExhausted(
                                "the request needs more KV cache than the server has "
                                "(RAGLINE_GENERATE_CACHE_TOKENS): lower max_tokens or the prompt"
                            )
                        )
                        self._head = None
                        continue
                    break
                backend.admit(head.seq)
                head.started = time.monotonic()
                QUEUE_SECONDS.observe(head.started - head.enqueued)
                running.append(head)
                self._head = None
            self.active = len(running)
            if not running:
                continue
            # cancelled or expired sequences leave before the step: their slot is free now
            for job in list(running):
                if job.cancelled.is_set() or job.expired():
                    if not job.cancelled.is_set():
                        job.post(DeadlineExceeded("deadline passed during generation"))
                    backend.release(job.seq)
                    running.remove(job)
            if not running:
                self.active = 0
                continue
            try:
                n = backend.step([job.seq for job in running])
            except Exception as exc:  # a backend failure fails the batch, not the worker
                log.exception("generation step failed")
                for job in running:
                    backend.release(job.seq)
                    job.post(exc)
                running.clear()
                self.active = 0
                continue
            STEP_TOKENS.observe(n)
            now = time.monotonic()
            for job in list(running):
                events = job.seq.events
                if not events:
                    continue
                if job.first is None:
                    job.first = now
                    TTFT_SECONDS.observe(now - job.enqueued)
                for event in events:
                    if isinstance(event, Finished):
                        TOKENS.inc(event.completion_tokens)
                        event = replace(
                            event,
                            timings={
                                "queue_ms": (job.started - job.enqueued) * 1000,
                                "prefill_ms": (job.first - job.started) * 1000,
                                "decode_ms": (now - job.first) * 1000,
                            },
                        )
                    job.post(event)
                events.clear()
                if job.seq.done:
                    backend.release(job.seq)
                    running.remove(job)
                    self._completed(now)
            self.active = len(running)
            if not running and self.queued == 0:
                self._busy_since_last = False  # an idle gap is not service time

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
                    replace(
                        event,
                        timings={
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
