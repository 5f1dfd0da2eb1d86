"""ChatPipeline: question -> embed (QUERY) -> retrieve -> relevance floor -> answer -> check.

The request's time budget is split across the stages: embed and retrieve each get at most their
own cap (they are milliseconds when healthy), generation gets whatever is left; each call carries
its share as its timeout (the gRPC deadline). The stages are anything with the methods of
``Embedder``, ``Retriever`` and ``Generator``: the gRPC stage clients of ``ragline.clients`` in
the edge, in-process models in the monolith baseline (``loadtest/monolith.py``), so both answer
through the same prompt, budget and response shape. A stage's failure arrives as
``ragline.errors.StageError`` with the stage's name.

Answers are grounded (decision 0008):
- passages scoring below ``score_threshold`` (cosine) are not used; when none is left the answer
  is the fixed ``NOT_FOUND`` text with the closest passages (``not_found``);
- ``sources`` are exactly the passages the answer was made from;
- the answerer is ``generate`` (the LLM), ``extractive`` (the closest sentences, quoted and
  cited, no LLM) or ``auto``: the LLM, whose answer is checked against the passages it cites
  (its numbers and names must appear there) and replaced by the extractive answer when it
  fails (``grounded: false``, ``extractive: true``, the LLM's text in ``generated``);
- an LLM answer that says the passages do not hold the answer becomes ``NOT_FOUND``.
Streaming sends the LLM's tokens as they come; the check runs when generation ends, and a
failed check sends a ``replace`` event with the answer that stands.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np
from opentelemetry import trace

from ragline.errors import DeadlineExceeded, InvalidArgument
from ragline.types import (
    Completion,
    CompletionChunk,
    Embeddings,
    Hit,
    InputKind,
    SamplingParams,
    SearchResult,
    Usage,
)
from services.api.extractive import ExtractiveAnswerer
from services.api.grounding import (
    NOT_FOUND,
    Citation,
    citations,
    grounding_passages,
    is_refusal,
    unsupported,
)
from services.api.prompt import PromptPolicy

tracer = trace.get_tracer(__name__)
_NO_USAGE = Usage()
ANSWERERS = ("generate", "extractive", "auto")
MODES = ("dense", "sparse", "hybrid")
CONDENSE = ("history", "off")
FOLLOWUP_TURNS = 2  # earlier user messages a follow-up is searched with


class Embedder(Protocol):
    async def embed_query(self, query: str, timeout: float | None = None) -> np.ndarray: ...

    async def embed(
        self, texts: Sequence[str], kind: InputKind, truncate: bool, timeout: float | None
    ) -> Embeddings: ...


class Retriever(Protocol):
    """``where`` (metadata conditions) is passed only when a request sets a filter, so a
    retriever without filters (the monolith's) serves every request that sets none."""

    async def search(
        self,
        collection: str,
        vector: np.ndarray,
        top_k: int,
        timeout: float | None = None,
        *,
        text: str = "",
        mode: str = "",
    ) -> SearchResult: ...


Where = Mapping[str, str | Sequence[str]]  # metadata field -> value, or any of several


class Generator(Protocol):
    async def generate(
        self, messages: Sequence[Mapping[str, str]], params: SamplingParams, timeout: float | None
    ) -> Completion: ...

    def stream(
        self, messages: Sequence[Mapping[str, str]], params: SamplingParams, timeout: float | None
    ) -> AsyncIterator[CompletionChunk]: ...


@dataclass(frozen=True)
class AnswerPolicy:
    """How answers are made and checked; a request may choose its answerer and threshold."""

    answerer: str = "extractive"  # measured best on 2 cores (docs/benchmarks.md)
    score_threshold: float = 0.0  # cosine; passages below it are not used...
    bm25_threshold: float = 0.0  # ...unless BM25 scores them at least this (0: cosine decides)
    mode: str = ""  # retrieval: dense | sparse | hybrid ("": the collection's default)
    min_sentence_score: float = 0.0  # extractive: a best sentence below it means "not found"
    closest: int = 3  # passages shown with a not-found answer
    condense: str = "history"  # follow-ups: also searched with the turns before them ("off")
    condense_own_score: float = 0.5  # ...unless the question alone finds a passage this good

    def __post_init__(self) -> None:
        if self.answerer not in ANSWERERS:
            raise InvalidArgument(
                f"answerer must be one of {', '.join(ANSWERERS)}, got {self.answerer!r}"
            )
        if self.condense not in CONDENSE:
            raise InvalidArgument(
                f"condense must be one of {', '.join(CONDENSE)}, got {self.condense!r}"
            )
        if self.mode not in ("", *MODES):
            raise InvalidArgument(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not 0.0 <= self.score_threshold <= 1.0:
            raise InvalidArgument(
                f"score_threshold is a cosine similarity between 0 and 1, got "
                f"{self.score_threshold}"
            )

    @classmethod
    def from_settings(cls, settings, **overrides) -> AnswerPolicy:
        """The policy ``ApiSettings`` describe (``overrides`` for what a caller pins)."""
        return cls(
            **{
                "answerer": settings.answerer,
                "score_threshold": settings.score_threshold,
                "bm25_threshold": settings.bm25_threshold,
                "mode": settings.search_mode,
                "min_sentence_score": settings.min_sentence_score,
                "condense": settings.condense,
                "condense_own_score": settings.condense_own_score,
                **overrides,
            }
        )

    def cache_fields(self) -> dict[str, object]:
        return {"answerer": self.answerer, "score_threshold": self.score_threshold,
                "min_sentence_score": self.min_sentence_score,
                "bm25_threshold": self.bm25_threshold, "mode": self.mode,
                "condense": self.condense,
                "condense_own_score": self.condense_own_score}  # fmt: skip

    def relevant(self, hit: Hit) -> bool:
        if hit.score >= self.score_threshold:
            return True
        return 0 < self.bm25_threshold <= hit.bm25_score


@dataclass
class Outcome:
    """What the answer is, once made and checked."""

    answer: str
    citations: list[Citation] = field(default_factory=list)
    grounded: bool | None = None  # the LLM's text passed the check (None: no LLM text)
    extractive: bool = False
    not_found: bool = False
    generated: str | None = None  # the LLM's text, when it was replaced
    closest: list[Hit] = field(default_factory=list)

    def fields(self) -> dict[str, object]:
        return {
            "citations": [c.to_dict() for c in self.citations],
            "grounded": self.grounded,
            "extractive": self.extractive,
            "not_found": self.not_found,
            "generated": self.generated,
            "closest": [h.to_dict() for h in self.closest],
        }


@dataclass
class ChatResult:
    answer: str
    sources: list[dict[str, object]]
    timings_ms: dict[str, float]
    usage: dict[str, int] = field(default_factory=dict)
    finish_reason: str = ""
    checks: dict[str, object] = field(default_factory=dict)  # Outcome.fields()
    search_query: str | None = None  # what was searched, when a follow-up was condensed
    index_version: int = 0  # the collection version the searched index reflected

    def to_dict(self, cached: bool = False) -> dict[str, object]:
        """The /chat response body."""
        return {
            "answer": self.answer,
            "sources": self.sources,
            **self.checks,
            "timings_ms": self.timings_ms,
            "usage": self.usage,
            "finish_reason": self.finish_reason,
            **({"search_query": self.search_query} if self.search_query is not None else {}),
            "cached": cached,
        }


@dataclass
class _Run:
    start: float  # perf_counter at the request's start (its embedding counted when given)
    deadline: float  # monotonic
    timings: dict[str, float]
    policy: AnswerPolicy
    vector: np.ndarray | None = None
    hits: list[Hit] = field(default_factory=list)  # retrieved, best first
    used: list[Hit] = field(default_factory=list)  # what the answer is made from
    search_query: str | None = None  # set when the question came with history
    index_version: int = 0  # the collection version the searched index reflected

    def condensed(self) -> dict[str, str]:
        return {} if self.search_query is None else {"search_query": self.search_query}

    def sources(self) -> list[dict[str, object]]:
        return [h.to_dict() for h in self.used]


def followup_search_text(query: str, history: Sequence[Mapping[str, str]]) -> str:
    """A follow-up searched with the user turns before it (the most recent
    ``FOLLOWUP_TURNS``), oldest first: "And the partner?" after a question about parental
    leave is searched as both questions."""
    earlier = [m["content"] for m in history if m["role"] == "user"][-FOLLOWUP_TURNS:]
    return "\n".join([*earlier, query])


def _best_search(found: Sequence[SearchResult], own_score: float) -> int:
    """Which search a question keeps: the first (the question alone) when its best passage
    scores at least ``own_score`` (a question that changes the subject finds its own page
    well; the earlier turns would pull the search back to theirs), else the search whose best
    passage scores highest, the question alone on a tie."""
    tops = [r.hits[0].score if r.hits else float("-inf") for r in found]
    if tops[0] >= own_score:
        return 0
    return max(range(len(tops)), key=lambda i: (tops[i], -i))


async def prepend(first, rest: AsyncIterator) -> AsyncIterator:
    """``first`` (unless None), then the rest of the iterator it was taken from."""
    if first is not None:
        yield first
    async for item in rest:
        yield item


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
        answering: AnswerPolicy | None = None,
        embed_timeout_s: float = 5.0,
        retrieve_timeout_s: float = 5.0,
    ) -> None:
        self.embed = embed
        self.retrieve = retrieve
        self.generate = generate
        self.collection = collection
        self.timeout_s = timeout_s
        self.prompt = prompt or PromptPolicy()
        self.answering = answering or AnswerPolicy()
        self.extractive = ExtractiveAnswerer(embed)
        self.caps = {"embed": embed_timeout_s, "retrieve": retrieve_timeout_s}

    def policy(
        self,
        answerer: str | None = None,
        score_threshold: float | None = None,
        mode: str | None = None,
        condense: str | None = None,
    ) -> AnswerPolicy:
        """The pipeline's answer policy with a request's own choices."""
        p = self.answering
        return replace(
            p,
            answerer=p.answerer if answerer is None else answerer,
            score_threshold=p.score_threshold if score_threshold is None else score_threshold,
            mode=p.mode if mode is None else mode,
            condense=p.condense if condense is None else condense,
        )

    def _budget(self, stage: str, deadline: float) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(f"request time budget of {self.timeout_s}s spent before {stage}")
        return min(remaining, self.caps.get(stage, remaining))

    async def embed_query(self, query: str, deadline: float | None = None) -> np.ndarray:
        """The query's vector (the semantic cache looks it up before anything else runs)."""
        deadline = deadline or time.monotonic() + self.timeout_s
        return await self.embed.embed_query(query, timeout=self._budget("embed", deadline))

    async def _retrieved(
        self,
        query: str,
        top_k: int,
        vector,
        embed_ms: float,
        policy: AnswerPolicy,
        collection: str | None = None,
        where: Where | None = None,
        history: Sequence[Mapping[str, str]] = (),
    ) -> _Run:
        """A request's clock and budget started, its passages found (in ``collection``, the
        pipeline's by default, among those matching ``where``) and floored. A question with
        history is condensed (``_condensed``) first."""
        run = _Run(
            start=time.perf_counter() - (embed_ms / 1000 if vector is not None else 0.0),
            deadline=time.monotonic() + self.timeout_s,
            timings={"embed": embed_ms} if vector is not None else {},
            policy=policy,
            vector=vector,
        )
        searches = [query]
        if history and policy.condense == "history":
            searches.append(followup_search_text(query, history))
            run.search_query = query
        t0 = time.perf_counter()
        vectors = [run.vector]
        if len(searches) > 1:  # one embed call for what is not embedded yet
            missing = searches if run.vector is None else searches[1:]
            done = await self.embed.embed(missing, InputKind.QUERY, True,
                                          self._budget("embed", run.deadline))  # fmt: skip
            vectors = [run.vector if run.vector is not None else done.vectors[0], done.vectors[-1]]
        elif run.vector is None:
            vectors = [await self.embed_query(query, run.deadline)]
        if len(searches) > 1 or run.vector is None:
            run.timings["embed"] = run.timings.get("embed", 0.0) + (time.perf_counter() - t0) * 1000
        t1 = time.perf_counter()
        budget = self._budget("retrieve", run.deadline)
        found = await asyncio.gather(*(
            self.retrieve.search(collection or self.collection, v, top_k, timeout=budget,
                                 text=text, mode=policy.mode,
                                 **({"where": where} if where else {}))
            for text, v in zip(searches, vectors, strict=True)
        ))  # fmt: skip
        run.timings["retrieve"] = (time.perf_counter() - t1) * 1000
        best = _best_search(found, policy.condense_own_score)
        run.vector, run.hits = vectors[best], list(found[best].hits)
        run.index_version = found[best].version
        if run.search_query is not None:
            run.search_query = searches[best]
        relevant = [h for h in run.hits if policy.relevant(h)]
        run.used = self.prompt.select(relevant)
        return run

    async def passages(
        self,
        query: str,
        top_k: int,
        *,
        score_threshold: float | None = None,
        mode: str | None = None,
        collection: str | None = None,
        where: Where | None = None,
    ) -> list[Hit]:
        """The passages a prompt for ``query`` would hold (retrieved, floored, selected), best
        first; nothing is generated."""
        run = await self._retrieved(query, top_k, None, 0.0,
                                    self.policy(None, score_threshold, mode), collection,
                                    where)  # fmt: skip
        return run.used

    async def search(
        self,
        query: str,
        top_k: int,
        *,
        score_threshold: float | None = None,
        mode: str | None = None,
        collection: str | None = None,
        where: Where | None = None,
        history: Sequence[Mapping[str, str]] = (),
        condense: str | None = None,
    ) -> tuple[list[Hit], dict[str, float], str | None]:
        """Every retrieved passage above the relevance floor, best first (no prompt budget:
        what evaluation and debugging want), the stages' timings, and the text searched when
        a question with history was condensed."""
        run = await self._retrieved(query, top_k, None, 0.0,
                                    self.policy(None, score_threshold, mode, condense),
                                    collection, where, history)  # fmt: skip
        hits = [h for h in run.hits if run.policy.relevant(h)]
        return hits, _rounded(run.timings), run.search_query

    def _not_found(self, run: _Run, *, looked: bool = False) -> Outcome:
        """``looked``: the passages were used (the LLM read them and found nothing), so they
        stay the answer's sources; otherwise nothing was used."""
        closest = run.used or run.hits
        if not looked:
            run.used = []
        return Outcome(NOT_FOUND, not_found=True, closest=closest[: run.policy.closest])

    async def _extract(self, run: _Run) -> Outcome | None:
        t0 = time.perf_counter()
        budget = self._budget("embed", run.deadline)
        found = await self.extractive.answer(run.vector, run.used, budget)
        run.timings["extract"] = (time.perf_counter() - t0) * 1000
        if found is None or found.best_score < run.policy.min_sentence_score:
            return None
        cites = [Citation(s.passage_id, s.text) for s in found.quotes]
        return Outcome(found.answer, cites, extractive=True)

    async def _without_llm(self, run: _Run) -> Outcome | None:
        """The outcome when no LLM runs: nothing relevant, or the extractive answerer."""
        if not run.used:
            return self._not_found(run)
        if run.policy.answerer == "extractive":
            return await self._extract(run) or self._not_found(run)
        return None

    async def _checked(self, text: str, run: _Run) -> Outcome:
        """The LLM's answer, checked against its sources."""
        if is_refusal(text):
            return self._not_found(run, looked=True)
        cites = citations(text, run.used)
        grounded = not unsupported(text, grounding_passages(text, run.used))
        if grounded or run.policy.answerer != "auto":
            return Outcome(text, cites, grounded=grounded)
        replacement = await self._extract(run)
        if replacement is None:
            return self._not_found(run)
        replacement.grounded, replacement.generated = False, text
        return replacement

    async def answer(
        self,
        query: str,
        top_k: int,
        params: SamplingParams,
        history: Sequence[Mapping[str, str]] = (),
        vector=None,
        embed_ms: float = 0.0,
        *,
        answerer: str | None = None,
        score_threshold: float | None = None,
        mode: str | None = None,
        collection: str | None = None,
        where: Where | None = None,
        condense: str | None = None,
    ) -> ChatResult:
        """``vector``: the query's embedding when the caller already has it (``embed_ms``)."""
        run = await self._retrieved(query, top_k, vector, embed_ms,
                                    self.policy(answerer, score_threshold, mode, condense),
                                    collection, where, history)  # fmt: skip
        usage, finish = _NO_USAGE, "stop"
        outcome = await self._without_llm(run)
        if outcome is None:
            t0 = time.perf_counter()
            done = await self.generate.generate(
                self.prompt.layout(query, run.used, history),
                params,
                timeout=self._budget("generate", run.deadline),
            )
            run.timings["generate"] = (time.perf_counter() - t0) * 1000
            usage, finish = done.usage, done.finish_reason
            outcome = await self._checked(done.text.strip(), run)
        run.timings["total"] = (time.perf_counter() - run.start) * 1000
        return ChatResult(
            answer=outcome.answer,
            sources=run.sources(),
            timings_ms=_rounded(run.timings),
            usage=usage.to_dict(),
            finish_reason="not_found" if outcome.not_found else finish,
            checks=outcome.fields(),
            search_query=run.search_query,
            index_version=run.index_version,
        )

    async def answer_stream(
        self,
        query: str,
        top_k: int,
        params: SamplingParams,
        history: Sequence[Mapping[str, str]] = (),
        vector=None,
        embed_ms: float = 0.0,
        *,
        answerer: str | None = None,
        score_threshold: float | None = None,
        mode: str | None = None,
        collection: str | None = None,
        where: Where | None = None,
        condense: str | None = None,
        searched: Callable[[int], None] | None = None,
    ) -> AsyncIterator[tuple[str, object]]:
        """Events: ("sources", [...]), ("token", str)..., optionally ("replace", {answer, ...})
        when the finished answer did not pass its check, then ("done", {usage, timings, ...}).
        ``searched`` is told the collection version the searched index reflected."""
        run = await self._retrieved(query, top_k, vector, embed_ms,
                                    self.policy(answerer, score_threshold, mode, condense),
                                    collection, where, history)  # fmt: skip
        if searched is not None:
            searched(run.index_version)
        outcome = await self._without_llm(run)
        last: CompletionChunk | None = None
        if outcome is not None:
            yield "sources", run.sources()
            yield "token", outcome.answer
        else:
            t0 = time.perf_counter()
            pieces: list[str] = []
            chunks = self.generate.stream(
                self.prompt.layout(query, run.used, history),
                params,
                timeout=self._budget("generate", run.deadline),
            )
            # Nothing is sent before generate has taken the request (its first chunk): a
            # refusal (RESOURCE_EXHAUSTED) is then the response's status, a 429, and not an
            # error event inside a 200 stream the client already counted as admitted.
            first = await anext(chunks, None)
            yield "sources", run.sources()
            async for chunk in prepend(first, chunks):
                if chunk.text:
                    pieces.append(chunk.text)
                    yield "token", chunk.text
                last = chunk
            run.timings["generate"] = (time.perf_counter() - t0) * 1000
            text = "".join(pieces).strip()
            outcome = await self._checked(text, run)
            if outcome.answer != text:
                yield "replace", {"answer": outcome.answer, **outcome.fields(),
                                  "sources": run.sources()}  # fmt: skip
        run.timings["total"] = (time.perf_counter() - run.start) * 1000
        usage = (last.usage if last is not None else None) or _NO_USAGE
        finish = (last.finish_reason if last is not None else None) or "stop"
        yield (
            "done",
            {
                "timings_ms": _rounded(run.timings),
                "usage": usage.to_dict(),
                "finish_reason": "not_found" if outcome.not_found else finish,
                **outcome.fields(),
                **run.condensed(),
            },
        )
