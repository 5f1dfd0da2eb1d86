"""ChatPipeline: question -> embed (QUERY) -> retrieve -> prompt -> generate.

The request's time budget is split across the stages: embed and retrieve each get at most their
own cap (they are milliseconds when healthy), generation gets whatever is left; each call carries
its share as the gRPC deadline. A stage's failure is reported with the stage's name.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

import grpc
from opentelemetry import trace

from ragline.clients import GenerateClient, sampling_params
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
class Generation:
    """What the caller asked of the LLM."""

    max_tokens: int
    temperature: float
    top_p: float | None = None
    seed: int | None = 0
    stop: Sequence[str] = ()

    def params(self) -> generate_pb2.SamplingParams:
        return sampling_params(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=self.stop,
        )


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


def finish_name(reason: int) -> str:
    return generate_pb2.FinishReason.Name(reason).removeprefix("FINISH_REASON_").lower()


class ChatPipeline:
    def __init__(
        self,
        embed,
        retrieve,
        generate,
        *,
        collection: str,
        timeout_s: float,
        context_tokens: int,
        embed_timeout_s: float = 5.0,
        retrieve_timeout_s: float = 5.0,
        strategy: str = "stuff",
    ) -> None:
        self.embed = embed
        self.retrieve = retrieve
        self.generate = generate
        self.collection = collection
        self.timeout_s = timeout_s
        self.context_tokens = context_tokens
        self.caps = {"embed": embed_timeout_s, "retrieve": retrieve_timeout_s}
        self.strategy = strategy

    def _budget(self, stage: str, deadline: float) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(f"request time budget of {self.timeout_s}s spent before {stage}")
        return min(remaining, self.caps.get(stage, remaining))

    async def _call(self, stage: str, deadline: float, make_call):
        timeout = self._budget(stage, deadline)
        try:
            return await make_call(timeout)
        except grpc.aio.AioRpcError as exc:
            raise StageError(stage, exc) from None

    async def embed_query(self, query: str, deadline: float | None = None):
        """The query's vector (the semantic cache looks it up before anything else runs)."""
        deadline = deadline or time.monotonic() + self.timeout_s
        vecs, _ = await self._call(
            "embed",
            deadline,
            lambda t: self.embed.embed(
                [query], kind=embed_pb2.INPUT_KIND_QUERY, truncate=True, timeout=t
            ),
        )
        return vecs[0]

    async def retrieve_sources(
        self, query: str, top_k: int, deadline: float, timings: dict[str, float], vector=None
    ) -> list[retrieve_pb2.Hit]:
        t0 = time.perf_counter()
        if vector is None:
            vector = await self.embed_query(query, deadline)
            timings["embed"] = (time.perf_counter() - t0) * 1000
        t1 = time.perf_counter()
        resp = await self._call(
            "retrieve",
            deadline,
            lambda t: self.retrieve.search(self.collection, vector, top_k, timeout=t),
        )
        timings["retrieve"] = (time.perf_counter() - t1) * 1000
        return list(resp.hits)

    def request(
        self,
        query: str,
        hits: Sequence[retrieve_pb2.Hit],
        gen: Generation,
        history: Sequence[Mapping[str, str]] = (),
    ) -> generate_pb2.GenerateRequest:
        chosen = select_passages(hits, self.context_tokens, self.strategy)
        return GenerateClient.request(build_messages(query, chosen, history), gen.params())

    async def answer(
        self,
        query: str,
        top_k: int,
        gen: Generation,
        history: Sequence[Mapping[str, str]] = (),
        vector=None,
        embed_ms: float = 0.0,
    ) -> ChatResult:
        """``vector``: the query's embedding when the caller already has it (``embed_ms``)."""
        start = time.perf_counter() - (embed_ms / 1000 if vector is not None else 0.0)
        deadline = time.monotonic() + self.timeout_s
        timings: dict[str, float] = {"embed": embed_ms} if vector is not None else {}
        hits = await self.retrieve_sources(query, top_k, deadline, timings, vector)
        t0 = time.perf_counter()
        resp = await self._call(
            "generate",
            deadline,
            lambda t: self.generate.generate(self.request(query, hits, gen, history), timeout=t),
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
            finish_reason=finish_name(resp.finish_reason),
        )

    async def answer_stream(
        self,
        query: str,
        top_k: int,
        gen: Generation,
        history: Sequence[Mapping[str, str]] = (),
        vector=None,
        embed_ms: float = 0.0,
    ) -> AsyncIterator[tuple[str, object]]:
        """Events: ("sources", [...]), ("token", str)..., ("done", {usage, timings, ...})."""
        start = time.perf_counter() - (embed_ms / 1000 if vector is not None else 0.0)
        deadline = time.monotonic() + self.timeout_s
        timings: dict[str, float] = {"embed": embed_ms} if vector is not None else {}
        hits = await self.retrieve_sources(query, top_k, deadline, timings, vector)
        yield "sources", [hit_to_dict(h) for h in hits]
        t0 = time.perf_counter()
        last: generate_pb2.GenerateChunk | None = None
        try:
            async for chunk in self.generate.stream(
                self.request(query, hits, gen, history), timeout=self._budget("generate", deadline)
            ):
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
            done["finish_reason"] = finish_name(last.finish_reason)
        yield "done", done
