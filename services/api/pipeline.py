"""ChatPipeline: question -> embed (QUERY) -> retrieve -> prompt -> generate.

The request's time budget is split across the stages: embed and retrieve each get at most their
own cap (they are milliseconds when healthy), generation gets whatever is left; each call carries
its share as its timeout (the gRPC deadline). The stages are anything with the methods of
``Embedder``, ``Retriever`` and ``Generator``: the gRPC stage clients of ``ragline.clients`` in
the edge, in-process models in the monolith baseline (``loadtest/monolith.py``), so both answer
through the same prompt, budget and response shape. A stage's failure arrives as
``ragline.errors.StageError`` with the stage's name.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from opentelemetry import trace

from ragline.errors import DeadlineExceeded
from ragline.types import Completion, CompletionChunk, Hit, SamplingParams, SearchResult, Usage
from services.api.prompt import PromptPolicy

tracer = trace.get_tracer(__name__)
_NO_USAGE = Usage()


class Embedder(Protocol):
    async def embed_query(self, query: str, timeout: float | None = None) -> np.ndarray: ...


class Retriever(Protocol):
    async def search(
        self, collection: str, vector: np.ndarray, top_k: int, timeout: float | None = None
    ) -> SearchResult: ...


class Generator(Protocol):
    async def generate(
        self, messages: Sequence[Mapping[str, str]], params: SamplingParams, timeout: float | None
    ) -> Completion: ...

    def stream(
        self, messages: Sequence[Mapping[str, str]], params: SamplingParams, timeout: float | None
    ) -> AsyncIterator[CompletionChunk]: ...


@dataclass
class ChatResult:
    answer: str
    sources: list[dict[str, object]]
    timings_ms: dict[str, float]
    usage: dict[str, int] = field(default_factory=dict)
    finish_reason: str = ""

    def to_dict(self, cached: bool = False) -> dict[str, object]:
        """The /chat response body."""
        return {
            "answer": self.answer,
            "sources": self.sources,
            "timings_ms": self.timings_ms,
            "usage": self.usage,
            "finish_reason": self.finish_reason,
            "cached": cached,
        }


@dataclass
class _Run:
    start: float  # perf_counter at the request's start (its embedding counted when given)
    deadline: float  # monotonic
    timings: dict[str, float]
    hits: list[Hit] = field(default_factory=list)


def _rounded(timings: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 2) for k, v in timings.items()}


class ChatPipeline:
    def __init__(
        self,
        embed: Embedder,
        retrieve: Retriever,
        generate: Generator,
        *,
        collection: str,
        timeout_s: float,
        prompt: PromptPolicy | None = None,
        embed_timeout_s: float = 5.0,
        retrieve_timeout_s: float = 5.0,
    ) -> None:
        self.embed = embed
        self.retrieve = retrieve
        self.generate = generate
        self.collection = collection
        self.timeout_s = timeout_s
        self.prompt = prompt or PromptPolicy()
        self.caps = {"embed": embed_timeout_s, "retrieve": retrieve_timeout_s}

    def _budget(self, stage: str, deadline: float) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(f"request time budget of {self.timeout_s}s spent before {stage}")
        return min(remaining, self.caps.get(stage, remaining))

    async def embed_query(self, query: str, deadline: float | None = None) -> np.ndarray:
        """The query's vector (the semantic cache looks it up before anything else runs)."""
        deadline = deadline or time.monotonic() + self.timeout_s
        return await self.embed.embed_query(query, timeout=self._budget("embed", deadline))

    async def retrieve_sources(
        self, query: str, top_k: int, deadline: float, timings: dict[str, float], vector=None
    ) -> list[Hit]:
        t0 = time.perf_counter()
        if vector is None:
            vector = await self.embed_query(query, deadline)
            timings["embed"] = (time.perf_counter() - t0) * 1000
        t1 = time.perf_counter()
        found = await self.retrieve.search(
            self.collection, vector, top_k, timeout=self._budget("retrieve", deadline)
        )
        timings["retrieve"] = (time.perf_counter() - t1) * 1000
        return list(found.hits)

    async def _retrieved(self, query: str, top_k: int, vector, embed_ms: float) -> _Run:
        """A request's clock and budget started, and its passages found."""
        run = _Run(
            start=time.perf_counter() - (embed_ms / 1000 if vector is not None else 0.0),
            deadline=time.monotonic() + self.timeout_s,
            timings={"embed": embed_ms} if vector is not None else {},
        )
        run.hits = await self.retrieve_sources(query, top_k, run.deadline, run.timings, vector)
        return run

    async def answer(
        self,
        query: str,
        top_k: int,
        params: SamplingParams,
        history: Sequence[Mapping[str, str]] = (),
        vector=None,
        embed_ms: float = 0.0,
    ) -> ChatResult:
        """``vector``: the query's embedding when the caller already has it (``embed_ms``)."""
        run = await self._retrieved(query, top_k, vector, embed_ms)
        hits, timings, deadline = run.hits, run.timings, run.deadline
        t0 = time.perf_counter()
        done = await self.generate.generate(
            self.prompt.messages(query, hits, history),
            params,
            timeout=self._budget("generate", deadline),
        )
        timings["generate"] = (time.perf_counter() - t0) * 1000
        timings["total"] = (time.perf_counter() - run.start) * 1000
        return ChatResult(
            answer=done.text.strip(),
            sources=[h.to_dict() for h in hits],
            timings_ms=_rounded(timings),
            usage=done.usage.to_dict(),
            finish_reason=done.finish_reason,
        )

    async def answer_stream(
        self,
        query: str,
        top_k: int,
        params: SamplingParams,
        history: Sequence[Mapping[str, str]] = (),
        vector=None,
        embed_ms: float = 0.0,
    ) -> AsyncIterator[tuple[str, object]]:
        """Events: ("sources", [...]), ("token", str)..., ("done", {usage, timings, ...})."""
        run = await self._retrieved(query, top_k, vector, embed_ms)
        hits, timings, deadline = run.hits, run.timings, run.deadline
        yield "sources", [h.to_dict() for h in hits]
        t0 = time.perf_counter()
        last: CompletionChunk | None = None
        async for chunk in self.generate.stream(
            self.prompt.messages(query, hits, history),
            params,
            timeout=self._budget("generate", deadline),
        ):
            if chunk.text:
                yield "token", chunk.text
            last = chunk
        timings["generate"] = (time.perf_counter() - t0) * 1000
        timings["total"] = (time.perf_counter() - run.start) * 1000
        done: dict[str, object] = {"timings_ms": _rounded(timings)}
        if last is not None:
            done["usage"] = (last.usage or _NO_USAGE).to_dict()
            done["finish_reason"] = last.finish_reason or "unspecified"
        yield "done", done
