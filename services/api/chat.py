"""ChatService: the edge's one use case, answering a question, without HTTP.

``answer()`` and ``stream()`` take a ``ChatQuery`` and return plain values; the routes of
``services/api/routes.py`` translate HTTP to and from them. In order:
1. the exact answer cache (in-process or Redis), unless the caller said ``no-cache``;
2. the semantic cache (one embed call), when it is on;
3. admission: a bounded number of chats in flight, a bounded wait, then ``ResourceExhausted``
   (429) at once; a stage's RESOURCE_EXHAUSTED also tells adaptive admission to back off;
4. the pipeline (embed, retrieve, generate), and the answer is stored for next time.

The cache key holds everything that changes an answer: the normalised question, the collection
searched and its version, the metadata filter, top_k, the history (as bounded by
``ChatLimits.history``), every sampling parameter, the prompt policy's version (layout,
strategy, budget, system prompt) and the model generate serves.
While the knowledge-base version or the model is unknown, nothing is cached.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from opentelemetry import trace
from prometheus_client import Counter

from ragline.errors import InvalidArgument, StageError
from ragline.types import SamplingParams
from services.api.admission import Admission
from services.api.cache import AnswerCache, KnowledgeVersion, SemanticCache, ServedModel
from services.api.pipeline import ChatPipeline, Where, prepend
from services.api.prompt import estimate_tokens

CACHE = Counter("ragline_api_cache", "Answer cache lookups", ["result"])
tracer = trace.get_tracer(__name__)
Event = tuple[str, object]


@dataclass(frozen=True)
class CacheControl:
    """``Cache-Control`` of a request: ``no-cache`` skips the lookups (the fresh answer is still
    stored; load tests send it so every request runs the stages), ``no-store`` skips both."""

    lookup: bool = True
    store: bool = True

    @classmethod
    def parse(cls, header: str) -> CacheControl:
        directives = {d.strip().lower() for d in header.split(",")}
        if "no-store" in directives:
            return cls(lookup=False, store=False)
        return cls(lookup="no-cache" not in directives)


@dataclass(frozen=True)
class ChatLimits:
    """What a question may ask for, and the defaults it gets (from ``ApiSettings``)."""

    default_top_k: int = 4
    max_top_k: int = 20
    max_query_chars: int = 4000
    max_tokens: int = 256
    temperature: float = 0.0
    max_history_messages: int = 10
    history_tokens: int = 400

    @classmethod
    def from_settings(cls, settings) -> ChatLimits:
        return cls(settings.default_top_k, settings.max_top_k, settings.max_query_chars,
                   settings.max_tokens, settings.temperature, settings.max_history_messages,
                   settings.history_tokens)  # fmt: skip

    def history(self, messages: Sequence[Mapping[str, str]]) -> tuple[list[dict[str, str]], int]:
        """The most recent earlier messages that fit both bounds (whole messages, the oldest
        dropped first), and how many were dropped."""
        kept: list[dict[str, str]] = []
        used = 0
        for m in reversed(messages[-self.max_history_messages :] if self.max_history_messages
                          else []):  # fmt: skip
            cost = estimate_tokens(m["content"])
            if used + cost > self.history_tokens:
                break
            kept.append({"role": m["role"], "content": m["content"]})
            used += cost
        kept.reverse()
        return kept, len(messages) - len(kept)

    def query(self, query: str) -> str:
        if len(query) > self.max_query_chars:
            raise InvalidArgument(
                f"query is {len(query)} characters; the limit is {self.max_query_chars}"
            )
        return query

    def top_k(self, top_k: int | None) -> int:
        if top_k is None:
            return self.default_top_k
        if not 1 <= top_k <= self.max_top_k:
            raise InvalidArgument(f"top_k must be between 1 and {self.max_top_k}, got {top_k}")
        return top_k

    def params(
        self,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
    ) -> SamplingParams:
        """The caller's sampling wishes within the server's caps; seed 0 unless given."""
        return SamplingParams(
            max_tokens=min(max_tokens or self.max_tokens, self.max_tokens),
            temperature=self.temperature if temperature is None else temperature,
            top_p=top_p,
            seed=0 if seed is None else seed,
            stop=tuple(stop),
        )


@dataclass(frozen=True)
class ChatQuery:
    query: str
    top_k: int
    params: SamplingParams
    history: Sequence[Mapping[str, str]] = ()
    cache: CacheControl = field(default_factory=CacheControl)
    answerer: str | None = None  # None: the server's (ApiSettings.answerer)
    score_threshold: float | None = None  # None: the server's
    mode: str | None = None  # retrieval mode; None: the server's
    collection: str | None = None  # None: the server's (ApiSettings.collection)
    where: Where | None = None  # metadata conditions on the passages searched
    history_dropped: int = 0  # earlier messages left out to fit ChatLimits (said in the answer)
    condense: str | None = None  # follow-up condensation; None: the server's

    def history_note(self) -> dict[str, bool]:
        """``history_truncated`` for an answer to a question sent with history (else nothing:
        a body without history keeps the fields it always had)."""
        if not self.history and not self.history_dropped:
            return {}
        return {"history_truncated": self.history_dropped > 0}

    def retrieval(self) -> dict[str, object]:
        """The pipeline's keyword arguments for this question's choices."""
        return {"answerer": self.answerer, "score_threshold": self.score_threshold,
                "mode": self.mode, "collection": self.collection, "where": self.where,
                "condense": self.condense}  # fmt: skip


@dataclass(frozen=True)
class ChatAnswer:
    """A whole answer: the /chat body, and where it came from ("miss", "hit", "semantic-hit")."""

    body: dict
    source: str

    @property
    def timings_ms(self) -> dict[str, float]:
        return self.body.get("timings_ms", {}) if self.source == "miss" else {}


@dataclass
class ChatStream:
    """An answer as events: ("sources", [...]), ("token", str)..., ("done", {...})."""

    events: AsyncIterator[Event]
    source: str


@dataclass
class _Lookup:
    """What the cache lookups learnt: the key to store under, and the query vector if any."""

    key: str | None = None
    scope: str | None = None  # the key without the question: the semantic cache's partition
    version: int = -1  # the collection version the key holds
    index_version: int = -1  # the version the searched index reflected (set by the pipeline)
    vector: np.ndarray | None = None
    embed_ms: float = 0.0

    def searched(self, version: int) -> None:
        self.index_version = version


class ChatService:
    def __init__(
        self,
        pipeline: ChatPipeline,
        admission: Admission,
        cache: AnswerCache,
        kb_version: KnowledgeVersion,
        model: ServedModel,
        semantic: SemanticCache | None = None,
        *,
        caching: bool = True,
    ) -> None:
        self.pipeline = pipeline
        self.admission = admission
        self.cache = cache
        self.kb_version = kb_version
        self.model = model
        self.semantic = semantic
        self.caching = caching

    async def answer(self, q: ChatQuery) -> ChatAnswer:
        """With history, ``history_truncated`` in the body says whether messages were left out."""
        found, look = await self._lookup(q)
        if found is not None:
            return ChatAnswer({**found.body, **q.history_note()}, found.source)
        result = await self._admitted_answer(q, look)
        body = result.to_dict(cached=False)
        await self._store(look, {**body, "cached": True}, result.index_version)
        return ChatAnswer({**body, **q.history_note()}, "miss")

    async def stream(self, q: ChatQuery) -> ChatStream:
        """Admission happens here, before the first event: a refusal is a 429, not a stream.
        With history, the ``done`` event says ``history_truncated``."""
        found, look = await self._lookup(q)
        if found is not None:
            return ChatStream(_truncation(_replay(found.body), q), found.source)
        await self.admission.acquire()
        events = self.pipeline.answer_stream(
            q.query, q.top_k, q.params, q.history, look.vector, look.embed_ms,
            **q.retrieval(), searched=look.searched,
        )  # fmt: skip
        stream = _truncation(self._released(self._stored(events, look)), q)
        # The first event comes once every stage took the request (the pipeline waits for
        # generate's first chunk): a stage's refusal raises here, before the 200 is sent.
        first = await anext(stream)
        return ChatStream(prepend(first, stream), "miss")

    # --- caches ---------------------------------------------------------------------------

    async def _scope(self, q: ChatQuery) -> tuple[str | None, int]:
        """The cache key of everything but the question (None when caching is off), and the
        collection version it holds."""
        collection = q.collection or self.pipeline.collection
        version = self.kb_version.of(collection)
        if not self.caching or not q.cache.store or version < 0:
            return None, version
        model = self.model.value or await self.model.refresh()
        if not model:
            return None, version
        return AnswerCache.key(
            "",
            version,
            collection=collection,
            where=_where_key(q.where),
            top_k=q.top_k,
            history=[dict(m) for m in q.history],
            prompt=self.pipeline.prompt.version,
            model=model,
            sampling=q.params.cache_fields(),
            answering=self.pipeline.policy(
                q.answerer, q.score_threshold, q.mode, q.condense
            ).cache_fields(),
        ), version

    async def _lookup(self, q: ChatQuery) -> tuple[ChatAnswer | None, _Lookup]:
        scope, version = await self._scope(q)
        if scope is None:
            return None, _Lookup()
        look = _Lookup(key=AnswerCache.key(q.query, 0, scope=scope), scope=scope, version=version)
        if not q.cache.lookup:
            return None, look
        with tracer.start_as_current_span("cache.lookup") as span:
            hit = await self.cache.get(look.key)
            span.set_attribute("ragline.cache.hit", hit is not None)
            span.set_attribute("ragline.cache.backend", self.cache.backend)
        CACHE.labels("hit" if hit is not None else "miss").inc()
        if hit is not None:
            return ChatAnswer(hit, "hit"), look
        if self.semantic is None:
            return None, look
        look.vector, look.embed_ms = await self._timed_embed(q.query)
        with tracer.start_as_current_span("cache.semantic_lookup") as span:
            similar = self.semantic.lookup(look.vector, scope)
            span.set_attribute("ragline.cache.hit", similar is not None)
        if similar is None:
            CACHE.labels("semantic_miss").inc()
            return None, look
        CACHE.labels("semantic_hit").inc()
        body, score = similar
        return ChatAnswer({**body, "cache": "semantic", "similarity": round(score, 4)},
                          "semantic-hit"), look  # fmt: skip

    async def _timed_embed(self, query: str) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        vector = await self.pipeline.embed_query(query)
        return vector, (time.perf_counter() - t0) * 1000

    async def _store(self, look: _Lookup, answer: dict, index_version: int) -> None:
        """An answer computed on an index older than the version its key holds (a read-only
        replica that has not caught up with a write yet) is not stored: it would be served as
        the new knowledge base's answer until the TTL."""
        if look.key is None or index_version < look.version:
            return
        await self.cache.set(look.key, answer)
        if self.semantic is not None and look.vector is not None:
            self.semantic.add(look.key, look.vector, look.scope, answer)

    async def _stored(self, events: AsyncIterator[Event], look: _Lookup) -> AsyncIterator[Event]:
        """The events, passed on; the answer that stands is stored after the last one."""
        sources, tokens, replaced = [], [], None
        async for event, data in events:
            if event == "sources":
                sources = data
            elif event == "token":
                tokens.append(data)
            elif event == "replace":
                replaced = data
            elif event == "done":
                data = {**data, "cached": False}
                answer = replaced["answer"] if replaced else "".join(tokens).strip()
                body = {
                    "answer": answer,
                    "sources": replaced["sources"] if replaced else sources,
                    **data,
                    "cached": True,
                }
                await self._store(look, body, look.index_version)
            yield event, data

    # --- admission ------------------------------------------------------------------------

    async def _admitted_answer(self, q: ChatQuery, look: _Lookup):
        await self.admission.acquire()
        try:
            result = await self.pipeline.answer(
                q.query, q.top_k, q.params, q.history, look.vector, look.embed_ms, **q.retrieval()
            )
            self.admission.succeeded()
            return result
        except StageError as exc:
            self._on_stage_error(exc)
            raise
        finally:
            self.admission.release()

    async def _released(self, events: AsyncIterator[Event]) -> AsyncIterator[Event]:
        """A stream holds its admission slot until its last event (or its client leaves)."""
        try:
            async for item in events:
                yield item
            self.admission.succeeded()
        except StageError as exc:
            self._on_stage_error(exc)
            raise
        finally:
            self.admission.release()

    def _on_stage_error(self, exc: StageError) -> None:
        if exc.grpc_code == "RESOURCE_EXHAUSTED":
            self.admission.overloaded()  # the stages behind are full: admit fewer


def _where_key(where: Where | None) -> list:
    """A filter as a canonical value: the same conditions in any order, one key."""
    items = ((k, v if isinstance(v, str) else sorted(v)) for k, v in (where or {}).items())
    return sorted(items, key=lambda kv: kv[0])


async def _truncation(events: AsyncIterator[Event], q: ChatQuery) -> AsyncIterator[Event]:
    note = q.history_note()
    async for event, data in events:
        if event == "done" and note:
            data = {**data, **note}
        yield event, data


async def _replay(body: dict) -> AsyncIterator[Event]:
    yield "sources", body["sources"]
    yield "token", body["answer"]
    done = {k: v for k, v in body.items() if k not in ("answer", "sources")}
    yield "done", {**done, "timings_ms": {}, "cached": True}
