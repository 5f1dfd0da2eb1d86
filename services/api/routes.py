"""The edge's routes: HTTP in, a call to the edge's services, HTTP out. No business logic here;
that lives in ``ChatService`` (``chat.py``) and ``Documents`` (``ingest.py``)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from ragline.errors import InvalidArgument
from services.api.chat import CacheControl, ChatAnswer, ChatQuery, ChatStream
from services.api.http import safe_filename, server_timing, sse_events
from services.api.openai_compat import (
    ChatCompletionRequest,
    completion_body,
    completion_chunks,
    split_messages,
)
from services.api.schemas import ChatRequest, DocumentRequest
from services.api.settings import ApiSettings
from services.api.wiring import Edge

CHECKS = ("citations", "grounded", "extractive", "not_found", "generated", "closest")


def edge(request: Request) -> Edge:
    """The edge's parts (a plain attribute read: a FastAPI dependency per request costs more
    than the cache hit it serves)."""
    return request.app.state.edge


def chat_router(authorize: Callable, settings: ApiSettings) -> APIRouter:
    router = APIRouter(dependencies=[Depends(authorize)])

    @router.post("/chat")
    async def chat(body: ChatRequest, request: Request):
        e = edge(request)
        q = ChatQuery(
            e.limits.query(body.query),
            e.limits.top_k(body.top_k),
            e.limits.params(body.max_tokens),
            cache=CacheControl.parse(request.headers.get("cache-control", "")),
            answerer=body.answerer,
            score_threshold=body.score_threshold,
            mode=body.mode,
        )
        if body.stream:
            return _sse(await e.chat.stream(q), sse_events)
        return _json(await e.chat.answer(q))

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        e = edge(request)
        query, history = split_messages(body)
        q = ChatQuery(
            e.limits.query(query),
            e.limits.top_k(body.top_k),
            e.limits.params(
                body.max_completion_tokens or body.max_tokens,
                body.temperature,
                body.top_p,
                body.seed,
                [body.stop] if isinstance(body.stop, str) else list(body.stop or []),
            ),
            history,
            CacheControl.parse(request.headers.get("cache-control", "")),
            score_threshold=body.score_threshold,
        )
        model = body.model or settings.model_name
        if body.stream:
            return _sse(await e.chat.stream(q), lambda events: completion_chunks(model, events))
        answer = await e.chat.answer(q)
        b = answer.body
        checks = {k: b[k] for k in CHECKS if k in b}
        return _json(answer, completion_body(model, b["answer"], b["finish_reason"], b["usage"],
                                             b["sources"], checks))  # fmt: skip

    @router.get("/v1/models")
    async def models():
        """The one model this edge serves, for OpenAI clients that list models first."""
        card = {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "ragline"}
        return {"object": "list", "data": [card]}

    @router.post("/documents")
    async def documents(request: Request):
        e = edge(request)
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            form = await request.form()
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise InvalidArgument(
                    "multipart upload needs a 'file' field with a .txt, .md, .html or .pdf file"
                )
            name = safe_filename(upload.filename or "")
            doc_id = form.get("document_id")
            result = await e.documents.add_file(
                await upload.read(), name, doc_id if isinstance(doc_id, str) else None
            )
        elif ctype.startswith("application/json"):
            doc = _document(await request.body())
            result = await e.documents.add_text(doc.document_id, doc.text, doc.metadata)
        else:
            raise InvalidArgument(
                "send application/json {'text': ...} or multipart/form-data with a 'file' field"
            )
        return result.to_dict()

    return router


def probes_router() -> APIRouter:
    router = APIRouter()

    @router.get("/readyz")
    async def readyz(request: Request):
        ok, stages = edge(request).readiness()
        return JSONResponse(
            {"status": "ok" if ok else "degraded", "stages": stages}, status_code=200 if ok else 503
        )

    @router.get("/healthz")
    @router.get("/livez")
    async def healthz():
        return {"status": "ok"}

    return router


def _document(raw: bytes) -> DocumentRequest:
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidArgument("body JSON is nested too deeply: send a flat object") from None
    try:
        return DocumentRequest.model_validate(payload)
    except ValueError as exc:
        raise RequestValidationError(getattr(exc, "errors", lambda: [])()) from None


def _json(answer: ChatAnswer, body: dict | None = None) -> JSONResponse:
    timing = server_timing(answer.timings_ms, answer.source)
    return JSONResponse(answer.body if body is None else body, headers={"Server-Timing": timing})


def _sse(stream: ChatStream, encode: Callable[[AsyncIterator], AsyncIterator[bytes]]):
    return StreamingResponse(
        encode(stream.events),
        media_type="text/event-stream",
        headers={"Server-Timing": f'cache;desc="{stream.source}"'},
    )
