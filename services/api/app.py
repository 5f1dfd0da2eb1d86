"""FastAPI application of the edge: routes, validation and error mapping."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from opentelemetry import trace
from prometheus_client import Counter
from pydantic import BaseModel, Field, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.gzip import GZipMiddleware

from ragline.chunking import ChunkingPolicy
from ragline.clients import EmbedClient, GenerateClient, RetrieveClient
from ragline.errors import InvalidArgument, RaglineError
from ragline.ingest import Ingestor, decode_document
from services.api.admission import Admission
from services.api.balancer import Pooled, PoolPolicy, ReplicaPool
from services.api.cache import AnswerCache, KnowledgeVersion, SemanticCache
from services.api.http import (
    BodyLimitMiddleware,
    MetricsMiddleware,
    TraceIdMiddleware,
    Unauthenticated,
    error_response,
    safe_filename,
    server_timing,
    sse_events,
)
from services.api.openai_compat import (
    ChatCompletionRequest,
    completion_body,
    completion_chunks,
    split_messages,
)
from services.api.pipeline import ChatPipeline, Generation, StageError
from services.api.settings import ApiSettings

log = logging.getLogger(__name__)
CACHE = Counter("ragline_api_cache", "Answer cache lookups", ["result"])
tracer = trace.get_tracer(__name__)


class ChatRequest(BaseModel):
    query: str = Field(description="the question")
    top_k: int | None = Field(None, description="passages to retrieve")
    stream: bool = Field(False, description="answer as Server-Sent Events")
    max_tokens: int | None = Field(
        None, ge=1, description="answer length limit (at most the server's max_tokens)"
    )

    @field_validator("query")
    @classmethod
    def _query_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("query is empty: ask a question")
        return v


class DocumentRequest(BaseModel):
    text: str = Field(description="document text (plain text or Markdown)")
    document_id: str | None = Field(None, description="stable id; re-ingesting replaces it")
    metadata: dict[str, str] = Field(default_factory=dict)


def load_api_keys(settings: ApiSettings) -> list[str]:
    """Keys from ``api_keys`` (comma-separated) and ``api_keys_file`` (one per line)."""
    keys = [k.strip() for k in (settings.api_keys or "").split(",") if k.strip()]
    if settings.api_keys_file is not None:
        try:
            lines = settings.api_keys_file.read_text().splitlines()
        except OSError as exc:
            raise ValueError(
                f"cannot read the API keys file {settings.api_keys_file}: {exc.strerror}"
            ) from None
        file_keys = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not file_keys:
            raise ValueError(f"the API keys file {settings.api_keys_file} holds no key")
        keys += file_keys
    return keys


def client_tls(settings: ApiSettings):
    """The edge's TLS to its stages: its settings, else ``RAGLINE_GRPC_TLS_*``."""
    from ragline import tls

    env = tls.client_tls()
    return tls.ClientTLS(
        ca=str(settings.grpc_tls_ca) if settings.grpc_tls_ca else env.ca,
        cert=str(settings.grpc_tls_cert) if settings.grpc_tls_cert else env.cert,
        key=str(settings.grpc_tls_key) if settings.grpc_tls_key else env.key,
        server_name=settings.grpc_tls_server_name or env.server_name,
    )


def create_app(settings: ApiSettings) -> FastAPI:
    from ragline import tls

    stage_tls = client_tls(settings)
    if stage_tls.enabled:
        stage_tls.credentials()  # fail at start on unreadable or incomplete certificate paths
    tls.configure_client(stage_tls)
    policy = PoolPolicy(settings.max_fails, settings.fail_timeout_s, settings.health_interval_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pools = {
            "embed": ReplicaPool("embed", settings.embed_address, EmbedClient, policy),
            "retrieve": ReplicaPool("retrieve", settings.retrieve_address, RetrieveClient, policy),
            "generate": ReplicaPool("generate", settings.generate_address, GenerateClient, policy),
        }
        writer_pool = pools["retrieve"]
        if settings.retrieve_write_address:
            writer_pool = ReplicaPool(
                "retrieve-writer", settings.retrieve_write_address, RetrieveClient, policy
            )
            pools["retrieve-writer"] = writer_pool
        for pool in pools.values():
            pool.start()
        embed = Pooled(pools["embed"], idempotent=True)
        retrieve = Pooled(pools["retrieve"], idempotent=True)
        app.state.pools = pools
        app.state.pipeline = ChatPipeline(
            embed,
            retrieve,
            # no side effects: retried on UNAVAILABLE, but never on a slow answer
            Pooled(pools["generate"], idempotent=True, split_budget=False),
            collection=settings.collection,
            timeout_s=settings.timeout_s,
            context_tokens=settings.context_tokens,
            embed_timeout_s=settings.embed_timeout_s,
            retrieve_timeout_s=settings.retrieve_timeout_s,
            strategy=settings.prompt_strategy,
        )
        app.state.ingestor = Ingestor(
            embed,
            Pooled(writer_pool, idempotent=True),  # upserts by id are idempotent
            settings.collection,
            ChunkingPolicy(settings.chunk_words, settings.chunk_overlap_words),
        )
        app.state.semantic = (
            SemanticCache(
                settings.semantic_cache_threshold,
                settings.cache_ttl_s,
                settings.semantic_cache_max_entries,
            )
            if settings.semantic_cache_threshold is not None
            else None
        )
        app.state.cache = AnswerCache(
            settings.cache_ttl_s, settings.cache_max_entries, settings.redis_url
        )
        # The writer has the latest version; a reader lags it by at most its refresh period.
        app.state.kb_version = KnowledgeVersion(
            Pooled(writer_pool, idempotent=True), settings.collection, settings.kb_poll_s
        )
        app.state.kb_version.start()
        app.state.admission = Admission(
            settings.max_inflight,
            settings.max_waiting,
            settings.queue_wait_s,
            adaptive=settings.adaptive_admission,
        )
        yield
        app.state.kb_version.stop()
        await app.state.cache.close()
        for pool in pools.values():
            await pool.close()

    app = FastAPI(
        title="ragline",
        version="0.1.0",
        description="RAG over your own documents: embed, retrieve and generate as gRPC stages.",
        lifespan=lifespan,
    )
    app.add_middleware(GZipMiddleware, minimum_size=1024)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(TraceIdMiddleware)
    app.add_middleware(MetricsMiddleware)
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    # Server span per request, parented on an incoming W3C traceparent; probes are not traced.
    FastAPIInstrumentor.instrument_app(app, excluded_urls="healthz,livez,readyz,metrics")

    keys = load_api_keys(settings)

    async def authorize(request: Request) -> None:
        if not keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest against every key: the time taken says nothing about the keys
        if scheme.lower() != "bearer" or not any([hmac.compare_digest(token, k) for k in keys]):
            raise Unauthenticated("missing or wrong API key: send 'Authorization: Bearer <key>'")

    @app.exception_handler(RaglineError)
    async def _domain_error(request: Request, exc: RaglineError) -> JSONResponse:
        extra = {"stage": exc.stage} if hasattr(exc, "stage") else {}
        return error_response(exc.http_status, exc.grpc_code.lower(), exc.message, **extra)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # a bug, not bad input: logged with its trace; the client gets no internals
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal", "internal error; see the edge log (trace_id)")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own refusals (unknown route, wrong method, unparsable body) in ragline's shape
        codes = {400: "invalid_argument", 404: "not_found", 405: "method_not_allowed",
                 413: "too_large", 415: "unsupported_media_type"}  # fmt: skip
        detail = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 400 and "parsing the body" in detail:
            detail = "body is not valid JSON (or not UTF-8): send a JSON object"
        elif exc.status_code == 404:
            detail = f"no route {request.url.path}: see /docs for the API"
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}"
        resp = error_response(exc.status_code, codes.get(exc.status_code, "error"), detail)
        for name, value in (exc.headers or {}).items():
            resp.headers[name] = value
        return resp

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"] if p != "body") or "body"
            problems.append(f"{loc}: {err['msg'].removeprefix('Value error, ')}")
        return error_response(400, "invalid_argument", "; ".join(problems))

    def check_top_k(top_k: int | None) -> int:
        if top_k is None:
            return settings.default_top_k
        if not 1 <= top_k <= settings.max_top_k:
            raise InvalidArgument(f"top_k must be between 1 and {settings.max_top_k}, got {top_k}")
        return top_k

    def check_query(query: str) -> None:
        if len(query) > settings.max_query_chars:
            raise InvalidArgument(
                f"query is {len(query)} characters; the limit is {settings.max_query_chars}"
            )

    async def cached_or_none(key: str | None) -> dict | None:
        if key is None:
            return None
        with tracer.start_as_current_span("cache.lookup") as span:
            hit = await app.state.cache.get(key)
            span.set_attribute("ragline.cache.hit", hit is not None)
            span.set_attribute("ragline.cache.backend", app.state.cache.backend)
        CACHE.labels("hit" if hit is not None else "miss").inc()
        return hit

    def cache_scope(top_k: int, gen: Generation, history=()) -> dict | None:
        """Everything but the question that changes an answer, or None when caching is off."""
        version = app.state.kb_version.value
        if settings.cache_ttl_s <= 0 or version < 0:
            return None
        return dict(
            version=version,
            top_k=top_k,
            collection=settings.collection,
            history=list(history),
            max_tokens=gen.max_tokens,
            temperature=gen.temperature,
            top_p=gen.top_p,
            seed=gen.seed,
            stop=list(gen.stop),
            strategy=settings.prompt_strategy,
            context=settings.context_tokens,
        )

    def cache_key(query: str, scope: dict | None) -> str | None:
        if scope is None:
            return None
        return AnswerCache.key(query, **scope)

    async def semantic_lookup(query: str, scope: dict | None):
        """(cached answer or None, the query's vector, embed ms) when the semantic cache is on."""
        semantic: SemanticCache | None = app.state.semantic
        if semantic is None or scope is None:
            return None, None, 0.0
        t0 = time.perf_counter()
        vector = await app.state.pipeline.embed_query(query)
        embed_ms = (time.perf_counter() - t0) * 1000
        with tracer.start_as_current_span("cache.semantic_lookup") as span:
            found = semantic.lookup(vector, AnswerCache.key("", **scope))
            span.set_attribute("ragline.cache.hit", found is not None)
        if found is None:
            CACHE.labels("semantic_miss").inc()
            return None, vector, embed_ms
        CACHE.labels("semantic_hit").inc()
        answer, score = found
        return {**answer, "cache": "semantic", "similarity": round(score, 4)}, vector, embed_ms

    def remember(key: str | None, scope: dict | None, vector, answer: dict) -> None:
        if app.state.semantic is not None and vector is not None and key is not None:
            app.state.semantic.add(key, vector, AnswerCache.key("", **scope), answer)

    async def admitted(events: AsyncIterator, admission: Admission) -> AsyncIterator:
        try:
            async for item in events:
                yield item
            admission.succeeded()
        except StageError as exc:
            if exc.grpc_code == "RESOURCE_EXHAUSTED":
                admission.overloaded()
            raise
        finally:
            admission.release()

    async def run_chat(
        query: str,
        top_k: int,
        gen: Generation,
        stream: bool,
        history=(),
        sse=None,
        cache_control: str = "",
    ):
        """Shared by /chat and /v1/chat/completions: admission, cache, pipeline.

        ``Cache-Control: no-cache`` skips the cache lookups (the fresh answer is still stored;
        load tests send it so every request runs the stages); ``no-store`` skips both.
        """
        pipeline: ChatPipeline = app.state.pipeline
        directives = {d.strip().lower() for d in cache_control.split(",")}
        scope = None if "no-store" in directives else cache_scope(top_k, gen, history)
        key = cache_key(query, scope)
        lookup = scope is not None and "no-cache" not in directives
        hit = await cached_or_none(key) if lookup else None
        vector, embed_ms, kind = None, 0.0, "hit"
        if hit is None and lookup:
            hit, vector, embed_ms = await semantic_lookup(query, scope)
            kind = "semantic-hit"
        if hit is not None:
            if stream:
                return StreamingResponse(
                    sse(replay(hit)),
                    media_type="text/event-stream",
                    headers={"Server-Timing": f'cache;desc="{kind}"'},
                )
            return hit, {"Server-Timing": server_timing({}, kind)}
        admission: Admission = app.state.admission
        await admission.acquire()
        if stream:
            events = store_when_done(
                pipeline.answer_stream(query, top_k, gen, history, vector, embed_ms),
                key,
                scope,
                vector,
            )
            return StreamingResponse(
                sse(admitted(events, admission)),
                media_type="text/event-stream",
                headers={"Server-Timing": 'cache;desc="miss"'},
            )
        try:
            result = await pipeline.answer(query, top_k, gen, history, vector, embed_ms)
            admission.succeeded()
        except StageError as exc:
            if exc.grpc_code == "RESOURCE_EXHAUSTED":
                admission.overloaded()  # the stages behind are full: admit fewer
            raise
        finally:
            admission.release()
        body = {
            "answer": result.answer,
            "sources": result.sources,
            "timings_ms": result.timings_ms,
            "usage": result.usage,
            "finish_reason": result.finish_reason,
            "cached": False,
        }
        if key is not None:
            await app.state.cache.set(key, {**body, "cached": True})
            remember(key, scope, vector, {**body, "cached": True})
        return body, {"Server-Timing": server_timing(result.timings_ms, "miss")}

    async def replay(hit: dict) -> AsyncIterator[tuple[str, object]]:
        yield "sources", hit["sources"]
        yield "token", hit["answer"]
        yield (
            "done",
            {
                "usage": hit["usage"],
                "timings_ms": {},
                "cached": True,
                "finish_reason": hit["finish_reason"],
            },
        )

    async def store_when_done(
        events, key: str | None, scope: dict | None = None, vector=None
    ) -> AsyncIterator[tuple[str, object]]:
        sources, tokens = [], []
        async for event, data in events:
            if event == "sources":
                sources = data
            elif event == "token":
                tokens.append(data)
            elif event == "done" and key is not None:
                data = {**data, "cached": False}
                answer = {
                    "answer": "".join(tokens).strip(),
                    "sources": sources,
                    "timings_ms": data.get("timings_ms", {}),
                    "usage": data.get("usage", {}),
                    "finish_reason": data.get("finish_reason", ""),
                    "cached": True,
                }
                await app.state.cache.set(key, answer)
                remember(key, scope, vector, answer)
            yield event, data

    def default_generation(max_tokens: int | None = None) -> Generation:
        return Generation(
            max_tokens=min(max_tokens or settings.max_tokens, settings.max_tokens),
            temperature=settings.temperature,
        )

    @app.post("/chat", dependencies=[Depends(authorize)])
    async def chat(body: ChatRequest, request: Request):
        check_query(body.query)
        out = await run_chat(
            body.query,
            check_top_k(body.top_k),
            default_generation(body.max_tokens),
            body.stream,
            sse=sse_events,
            cache_control=request.headers.get("cache-control", ""),
        )
        if isinstance(out, StreamingResponse):
            return out
        payload, headers = out
        return JSONResponse(payload, headers=headers)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        query, history = split_messages(body)
        check_query(query)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        gen = Generation(
            max_tokens=min(
                body.max_completion_tokens or body.max_tokens or settings.max_tokens,
                settings.max_tokens,
            ),
            temperature=settings.temperature if body.temperature is None else body.temperature,
            top_p=body.top_p,
            seed=0 if body.seed is None else body.seed,
            stop=stop,
        )
        model = body.model or settings.model_name
        out = await run_chat(
            query,
            check_top_k(body.top_k),
            gen,
            body.stream,
            history,
            sse=lambda events: completion_chunks(model, events),
            cache_control=request.headers.get("cache-control", ""),
        )
        if isinstance(out, StreamingResponse):
            return out
        payload, headers = out
        return JSONResponse(
            completion_body(
                model,
                payload["answer"],
                payload["finish_reason"],
                payload["usage"],
                payload["sources"],
            ),
            headers=headers,
        )

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        """The one model this edge serves, for OpenAI clients that list models first."""
        card = {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "ragline"}
        return {"object": "list", "data": [card]}

    @app.post("/documents", dependencies=[Depends(authorize)])
    async def documents(request: Request):
        ctype = request.headers.get("content-type", "")
        ingestor: Ingestor = app.state.ingestor
        if ctype.startswith("multipart/form-data"):
            form = await request.form()
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise InvalidArgument(
                    "multipart upload needs a 'file' field with a .txt, .md, .html or .pdf file"
                )
            name = safe_filename(upload.filename or "")
            # PDF parsing is CPU work: off the event loop.
            text = await run_in_threadpool(decode_document, await upload.read(), name)
            doc_id = form.get("document_id")
            result = await ingestor.ingest_text(doc_id if isinstance(doc_id, str) else name, text)
        elif ctype.startswith("application/json"):
            try:
                payload = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise InvalidArgument(f"body is not valid JSON: {exc}") from None
            except RecursionError:
                raise InvalidArgument(
                    "body JSON is nested too deeply: send a flat object"
                ) from None
            try:
                doc = DocumentRequest.model_validate(payload)
            except ValueError as exc:
                raise RequestValidationError(getattr(exc, "errors", lambda: [])()) from None
            doc_id = doc.document_id or "text-" + hashlib.sha256(doc.text.encode()).hexdigest()[:16]
            result = await ingestor.ingest_text(doc_id, doc.text, doc.metadata)
        else:
            raise InvalidArgument(
                "send application/json {'text': ...} or multipart/form-data with a 'file' field"
            )
        if result.status == "ingested":
            await app.state.kb_version.refresh()  # this edge's cache is invalid at once
        return result.to_dict()

    @app.get("/readyz")
    async def readyz():
        stages = {name: pool.status() for name, pool in app.state.pools.items()}
        ok = all(any(s == "SERVING" for s in replicas.values()) for replicas in stages.values())
        return JSONResponse(
            {"status": "ok" if ok else "degraded", "stages": stages}, status_code=200 if ok else 503
        )

    @app.get("/healthz")
    @app.get("/livez")
    async def healthz():
        return {"status": "ok"}

    from prometheus_client import make_asgi_app

    app.mount("/metrics", make_asgi_app())

    return app
