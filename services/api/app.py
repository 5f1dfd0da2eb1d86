"""FastAPI application of the edge: routes, validation and error mapping."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import BaseModel, Field, field_validator

from ragline.chunking import ChunkingPolicy
from ragline.clients import EmbedClient, GenerateClient, RetrieveClient
from ragline.errors import InvalidArgument, RaglineError
from ragline.ingest import Ingestor, decode_document
from ragline.telemetry import current_trace_id
from services.api.pipeline import ChatPipeline
from services.api.settings import ApiSettings

log = logging.getLogger(__name__)


class ChatRequest(BaseModel):
    query: str = Field(description="the question")
    top_k: int | None = Field(None, description="passages to retrieve")
    stream: bool = Field(False, description="answer as Server-Sent Events")

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


def error_response(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    body = {"error": {"code": code, "message": message, **extra}}
    if trace_id := current_trace_id():
        body["error"]["trace_id"] = trace_id
    return JSONResponse(body, status_code=status, headers=headers)


class BodyLimitMiddleware:
    """Answers 413 for bodies over the limit, whether or not Content-Length is sent."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = error_response(
            413,
            "payload_too_large",
            f"request body is larger than {self.max_bytes} bytes: split the document or "
            "raise RAGLINE_API_MAX_BODY_BYTES",
        )
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                return await too_big(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await too_big(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class TraceIdMiddleware:
    """Every HTTP response says which trace it belongs to (X-Trace-Id)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_trace(message):
            if message["type"] == "http.response.start":
                trace_id = current_trace_id()
                if trace_id:
                    message.setdefault("headers", [])
                    message["headers"] = [*message["headers"], (b"x-trace-id", trace_id.encode())]
            await send(message)

        await self.app(scope, receive, send_with_trace)


def safe_filename(name: str) -> str:
    """The base name of an uploaded file, so '../../etc/passwd' cannot name a path."""
    base = PureWindowsPath(PurePosixPath(name).name).name.strip()
    if not base or base in {".", ".."}:
        raise InvalidArgument(f"upload has no usable file name ({name!r})")
    return base


def create_app(settings: ApiSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        embed = EmbedClient(settings.embed_address)
        retrieve = RetrieveClient(settings.retrieve_address)
        writer = (
            RetrieveClient(settings.retrieve_write_address)
            if settings.retrieve_write_address
            else retrieve
        )
        generate = GenerateClient(settings.generate_address)
        app.state.clients = {"embed": embed, "retrieve": retrieve, "generate": generate}
        if writer is not retrieve:
            app.state.clients["retrieve-writer"] = writer
        app.state.pipeline = ChatPipeline(
            embed,
            retrieve,
            generate,
            collection=settings.collection,
            timeout_s=settings.timeout_s,
            max_tokens=settings.max_tokens,
            temperature=settings.temperature,
            context_chars=settings.context_chars,
        )
        app.state.ingestor = Ingestor(
            embed,
            writer,
            settings.collection,
            ChunkingPolicy(settings.chunk_words, settings.chunk_overlap_words),
        )
        yield
        for client in app.state.clients.values():
            await client.close()

    app = FastAPI(
        title="ragline",
        version="0.1.0",
        description="RAG over your own documents: embed, retrieve and generate as gRPC stages.",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(TraceIdMiddleware)
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    # Server span per request, parented on an incoming W3C traceparent; probes are not traced.
    FastAPIInstrumentor.instrument_app(app, excluded_urls="healthz,livez")

    @app.exception_handler(RaglineError)
    async def _domain_error(request: Request, exc: RaglineError) -> JSONResponse:
        extra = {"stage": exc.stage} if hasattr(exc, "stage") else {}
        return error_response(exc.http_status, exc.grpc_code.lower(), exc.message, **extra)

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

    @app.post("/chat")
    async def chat(body: ChatRequest):
        if len(body.query) > settings.max_query_chars:
            raise InvalidArgument(
                f"query is {len(body.query)} characters; the limit is {settings.max_query_chars}"
            )
        top_k = check_top_k(body.top_k)
        pipeline: ChatPipeline = app.state.pipeline
        if body.stream:
            return StreamingResponse(
                _sse(pipeline.answer_stream(body.query, top_k)), media_type="text/event-stream"
            )
        result = await pipeline.answer(body.query, top_k)
        return {
            "answer": result.answer,
            "sources": result.sources,
            "timings_ms": result.timings_ms,
            "usage": result.usage,
            "finish_reason": result.finish_reason,
        }

    @app.post("/documents")
    async def documents(request: Request):
        ctype = request.headers.get("content-type", "")
        ingestor: Ingestor = app.state.ingestor
        if ctype.startswith("multipart/form-data"):
            form = await request.form()
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise InvalidArgument(
                    "multipart upload needs a 'file' field with a .txt or .md file"
                )
            name = safe_filename(upload.filename or "")
            text = decode_document(await upload.read(), name)
            doc_id = form.get("document_id")
            result = await ingestor.ingest_text(doc_id if isinstance(doc_id, str) else name, text)
        elif ctype.startswith("application/json"):
            try:
                payload = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise InvalidArgument(f"body is not valid JSON: {exc}") from None
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
        return result.to_dict()

    @app.get("/healthz")
    async def healthz():
        stages = {}
        for name, client in app.state.clients.items():
            stub = health_pb2_grpc.HealthStub(client.channel)
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                stages[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            except grpc.aio.AioRpcError as exc:
                stages[name] = exc.code().name
        ok = all(s == "SERVING" for s in stages.values())
        return JSONResponse(
            {"status": "ok" if ok else "degraded", "stages": stages}, status_code=200 if ok else 503
        )

    from prometheus_client import make_asgi_app

    app.mount("/metrics", make_asgi_app())

    @app.get("/livez")
    async def livez():
        return {"status": "ok"}

    return app


async def _sse(events: AsyncIterator[tuple[str, object]]) -> AsyncIterator[bytes]:
    try:
        async for event, data in events:
            payload = {"text": data} if event == "token" else data
            yield f"event: {event}\ndata: {json.dumps(payload)}\n\n".encode()
    except RaglineError as exc:
        err = {"code": exc.grpc_code.lower(), "message": exc.message}
        yield f"event: error\ndata: {json.dumps(err)}\n\n".encode()
