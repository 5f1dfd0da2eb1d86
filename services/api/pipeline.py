"""ChatPipeline: question -> embed (QUERY) -> retrieve -> prompt -> generate.

Every stage call carries the time left in the request's budget as its gRPC deadline, and a
stage's failure is reported with the stage's name so the caller knows where it broke.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from opentelemetry import trace

from ragline.clients import EmbedClient, GenerateClient, RetrieveClient, sampling_params
from ragline.errors import DeadlineExceeded, RaglineError
from ragline.v1 import embed_pb2, generate_pb2, retrieve_pb2
from services.api.prompt import build_messages, select_passages

tracer = trace.get_tracer(__name__)


class StageError(RaglineError):
    """A stage answered with an error status; carries the status so the edge can map it."""

    _HTTP = {
        grpc.StatusCode.INVALID_ARGUMENT: 400,
        grpc.StatusCode.NOT_FOUND: 404,
        grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
        grpc.StatusCode.DEADLINE_EXCEEDED: 504,
        grpc.StatusCode.UNAVAILABLE: 503,
        grpc.StatusCode.CANCELLED: 499,
    }

    def __init__(self, stage: str, exc: grpc.aio.AioRpcError) -> None:
        code = exc.code()
        detail = exc.details() or code.name
        if code is grpc.StatusCode.UNAVAILABLE:
            detail = f"{stage} stage is unreachable or not ready: {detail}"
        super().__init__(f"{stage}: {detail}")
        self.stage = stage
        self.grpc_code = code.name
        self.http_status = self._HTTP.get(code, 502)


@dataclass
class ChatResult:
    answer: str
    sources: list[dict[str, object]]
    timings_ms: dict[str, float]
    usage: dict[str, int] = field(default_factory=dict)
    finish_reason: str = ""


def hit_to_dict(hit: retrieve_pb2.Hit) -> dict[str, object]:
    return {
        "id": hit.id,
        "score": round(float(hit.score), 6),
        "text": hit.text,
        "metadata": dict(hit.metadata),
    }


class ChatPipeline:
    def __init__(
        self,
        embed: EmbedClient,
        retrieve: RetrieveClient,
        generate: GenerateClient,
        *,
        collection: str,
        timeout_s: float,
        max_tokens: int,
        temperature: float,
        context_chars: int,
    ) -> None:
        self.embed = embed
        self.retrieve = retrieve
        self.generate = generate
        self.collection = collection
        self.timeout_s = timeout_s
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.context_chars = context_chars

    async def _call(self, stage: str, deadline: float, make_call):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(f"request time budget of {self.timeout_s}s spent before {stage}")
        try:
            return await make_call(remaining)
        except grpc.aio.AioRpcError as exc:
            raise StageError(stage, exc) from None

    async def retrieve_sources(
        self, query: str, top_k: int, deadline: float, timings: dict[str, float]
    ) -> list[retrieve_pb2.Hit]:
        t0 = time.perf_counter()
        with tracer.start_as_current_span("chat.embed"):
            vecs, _ = await self._call(
                "embed",
                deadline,
                lambda t: self.embed.embed(
                    [query], kind=embed_pb2.INPUT_KIND_QUERY, truncate=True, timeout=t
                ),
            )
        t1 = time.perf_counter()
        with tracer.start_as_current_span("chat.retrieve"):
            resp = await self._call(
                "retrieve",
                deadline,
                lambda t: self.retrieve.search(self.collection, vecs[0], top_k, timeout=t),
            )
        t2 = time.perf_counter()
        timings["embed"] = (t1 - t0) * 1000
        timings["retrieve"] = (t2 - t1) * 1000
        return list(resp.hits)

    def _request(self, query: str, hits: list[retrieve_pb2.Hit]) -> generate_pb2.GenerateRequest:
        chosen = select_passages(hits, self.context_chars)
        return GenerateClient.request(
            build_messages(query, chosen),
            sampling_params(max_tokens=self.max_tokens, temperature=self.temperature, seed=0),
        )

    async def answer(self, query: str, top_k: int) -> ChatResult:
        start = time.perf_counter()
        deadline = time.monotonic() + self.timeout_s
        timings: dict[str, float] = {}
        hits = await self.retrieve_sources(query, top_k, deadline, timings)
        t0 = time.perf_counter()
        with tracer.start_as_current_span("chat.generate"):
            resp = await self._call(
                "generate",
                deadline,
                lambda t: self.generate.generate(self._request(query, hits), timeout=t),
            )
        timings["generate"] = (time.perf_counter() - t0) * 1000
        timings["total"] = (time.perf_counter() - start) * 1000
        return ChatResult(
            answer=resp.text.strip(),
            sources=[hit_to_dict(h) for h in hits],
            timings_ms={k: round(v, 2) for k, v in timings.items()},
            usage={
                "prompt_tokens": resp.usage.prompt_tokens,
                "completion_tokens": resp.usage.completion_tokens,
            },
            finish_reason=generate_pb2.FinishReason.Name(resp.finish_reason)
            .removeprefix("FINISH_REASON_")
            .lower(),
        )

    async def answer_stream(self, query: str, top_k: int) -> AsyncIterator[tuple[str, object]]:
        """Events: ("sources", [...]), ("token", str)..., ("done", {usage, timings})."""
        start = time.perf_counter()
        deadline = time.monotonic() + self.timeout_s
        timings: dict[str, float] = {}
        hits = await self.retrieve_sources(query, top_k, deadline, timings)
        yield "sources", [hit_to_dict(h) for h in hits]
        t0 = time.perf_counter()
        remaining = deadline - time.monotonic()
        last: generate_pb2.GenerateChunk | None = None
        try:
            async for chunk in self.generate.stream(self._request(query, hits), timeout=remaining):
                if chunk.text:
                    yield "token", chunk.text
                last = chunk
        except grpc.aio.AioRpcError as exc:
            raise StageError("generate", exc) from None
        timings["generate"] = (time.perf_counter() - t0) * 1000
        timings["total"] = (time.perf_counter() - start) * 1000
        done: dict[str, object] = {"timings_ms": {k: round(v, 2) for k, v in timings.items()}}
        if last is not None:
            done["usage"] = {
                "prompt_tokens": last.usage.prompt_tokens,
                "completion_tokens": last.usage.completion_tokens,
            }
            done["finish_reason"] = (
                generate_pb2.FinishReason.Name(last.finish_reason)
                .removeprefix("FINISH_REASON_")
                .lower()
            )
        yield "done", done
