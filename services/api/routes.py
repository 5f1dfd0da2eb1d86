"""The edge's routes: HTTP in, a call to the edge's services, HTTP out. No business logic here;
that lives in ``ChatService`` (``chat.py``), ``Documents`` (``ingest.py``) and ``Collections``
(``collections.py``)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from ragline.errors import InvalidArgument
from ragline.types import InputKind
from services.api.chat import CacheControl, ChatAnswer, ChatQuery, ChatStream
from services.api.http import (
    check_collection,
    check_form_fields,
    server_timing,
    sse_events,
    upload_name,
    visible_collections,
)
from services.api.ingest import MAX_DOCUMENT_ID, IngestResult
from services.api.jobs import JobDocument
from services.api.openai_compat import (
    ChatCompletionRequest,
    EmbeddingsRequest,
    completion_body,
    completion_chunks,
    embeddings_body,
    split_messages,
)
from services.api.openapi import upload_body
from services.api.schemas import (
    COLLECTION_NAME,
    DOCUMENT_ID,
    ChatRequest,
    CollectionRequest,
    DocumentBody,
    DocumentRequest,
    JobRequest,
    SearchRequest,
)
from services.api.settings import ApiSettings
from services.api.wiring import Edge

Name = Annotated[str, Path(pattern=COLLECTION_NAME, description="collection name")]
DocumentId = Annotated[str, Path(max_length=MAX_DOCUMENT_ID, pattern=DOCUMENT_ID)]
STREAMS = {200: {"description": "the answer (JSON), or its events when stream is true",
                 "content": {"text/event-stream": {}}}}  # fmt: skip
CHECKS = ("citations", "grounded", "extractive", "not_found", "generated", "closest",
          "history_truncated", "search_query")  # fmt: skip


def edge(request: Request) -> Edge:
    """The edge's parts (a plain attribute read: a FastAPI dependency per request costs more
    than the cache hit it serves)."""
    return request.app.state.edge


def chat_router(authorize: Callable, settings: ApiSettings) -> APIRouter:
    router = APIRouter(dependencies=[Depends(authorize)])

    @router.post("/chat", responses=STREAMS)
    async def chat(body: ChatRequest, request: Request):
        e = edge(request)
        check_collection(request, body.collection or settings.collection)
        history, dropped = e.limits.history([m.model_dump() for m in body.history])
        q = ChatQuery(
            e.limits.query(body.query),
            e.limits.top_k(body.top_k),
            e.limits.params(body.max_tokens),
            history,
            CacheControl.parse(request.headers.get("cache-control", "")),
            answerer=body.answerer,
            score_threshold=body.score_threshold,
            mode=body.mode,
            collection=body.collection,
            where=body.filter,
            history_dropped=dropped,
            condense=body.condense,
        )
        if body.stream:
            return _sse(await e.chat.stream(q), sse_events)
        return _json(await e.chat.answer(q))

    @router.post("/v1/chat/completions", responses=STREAMS)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        e = edge(request)
        check_collection(request, body.collection or settings.collection)
        query, messages = split_messages(body)
        history, dropped = e.limits.history(messages)
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
            collection=body.collection,
            where=body.filter,
            history_dropped=dropped,
            condense=body.condense,
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

    @router.post("/v1/embeddings")
    async def embeddings(body: EmbeddingsRequest, request: Request):
        """OpenAI's embeddings API through the embed stage."""
        kind = InputKind.QUERY if body.input_type == "query" else InputKind.PASSAGE
        done = await edge(request).embed.embed(
            body.texts(), kind, truncate=body.truncate, timeout=settings.timeout_s
        )
        return embeddings_body(done.model, done.vectors, done.token_counts, body.encoding_format)

    @router.post("/documents", openapi_extra=upload_body("DocumentRequest", "file"))
    async def documents(request: Request):
        """Into the edge's default collection (created when missing)."""
        check_collection(request, settings.collection)
        return (await _ingest(edge(request), request)).to_dict()

    return router


def knowledge_base_router(authorize: Callable, settings: ApiSettings) -> APIRouter:
    """Collections, their documents, and search without generation."""
    router = APIRouter(dependencies=[Depends(authorize)], tags=["knowledge base"])

    @router.post("/collections", status_code=201)
    async def create_collection(body: CollectionRequest, request: Request):
        return await edge(request).collections.create(check_collection(request, body.name))

    @router.get("/collections")
    async def list_collections(request: Request):
        found = await edge(request).collections.list()
        names = visible_collections(request, [c["name"] for c in found])
        return {"collections": [c for c in found if c["name"] in names]}

    @router.delete("/collections/{name}")
    async def delete_collection(name: Name, request: Request):
        await edge(request).collections.delete(check_collection(request, name))
        return {"name": name, "deleted": True}

    @router.get("/collections/{name}/documents")
    async def list_documents(
        name: Name,
        request: Request,
        limit: int = Query(100, ge=1, le=1000, description="documents per page"),
        after: str = Query("", description="the next_after of the previous page"),
    ):
        check_collection(request, name)
        docs, next_after = await edge(request).collections.documents(name, limit, after)
        return {"collection": name, "documents": docs, "next_after": next_after or None}

    @router.post("/collections/{name}/documents",
                 openapi_extra=upload_body("DocumentRequest", "file"))  # fmt: skip
    async def add_document(name: Name, request: Request):
        """JSON {text, document_id?, metadata?} or a multipart 'file' upload."""
        check_collection(request, name)
        return (await _ingest(edge(request), request, collection=name)).to_dict()

    @router.get("/collections/{name}/documents/{document_id:path}")
    async def get_document(name: Name, document_id: DocumentId, request: Request):
        check_collection(request, name)
        return await edge(request).collections.document(name, document_id)

    @router.put("/collections/{name}/documents/{document_id:path}",
                openapi_extra=upload_body("DocumentBody", "file"))  # fmt: skip
    async def replace_document(name: Name, document_id: DocumentId, request: Request):
        """Creates or replaces the document: its chunks become those of this text."""
        check_collection(request, name)
        return (await _ingest(edge(request), request, name, document_id)).to_dict()

    @router.delete("/collections/{name}/documents/{document_id:path}")
    async def delete_document(name: Name, document_id: DocumentId, request: Request):
        check_collection(request, name)
        passages = await edge(request).documents.delete(name, document_id)
        return {"collection": name, "id": document_id, "deleted": True, "chunks": passages}

    @router.post("/collections/{name}/jobs", status_code=202,
                 openapi_extra=upload_body("JobRequest", "files"))  # fmt: skip
    async def submit_job(name: Name, request: Request):
        """Documents ingested in the background: JSON {documents: [{text, document_id?,
        metadata?}]} or multipart 'files' (one or more); poll the job's status_url."""
        e = edge(request)
        check_collection(request, name)
        documents = await _job_documents(request)
        await e.collections.require(name)
        job = e.jobs.submit(name, documents)
        status_url = f"/jobs/{job.id}"
        return JSONResponse({**job.to_dict(), "status_url": status_url}, status_code=202,
                            headers={"Location": status_url})  # fmt: skip

    @router.get("/jobs")
    async def list_jobs(request: Request):
        """This edge's recent ingestion jobs, newest first."""
        jobs = edge(request).jobs.list()
        names = set(visible_collections(request, sorted({j.collection for j in jobs})))
        return {"jobs": [j.to_dict() for j in jobs if j.collection in names]}

    @router.get("/jobs/{job_id}")
    async def get_job(job_id: str, request: Request):
        job = edge(request).jobs.get(job_id)
        check_collection(request, job.collection)
        return job.to_dict()

    @router.post("/search")
    async def search(body: SearchRequest, request: Request):
        """Passages and scores for a query, as /chat would retrieve them; nothing generated."""
        e = edge(request)
        check_collection(request, body.collection or settings.collection)
        history, _ = e.limits.history([m.model_dump() for m in body.history])
        return await e.collections.search(
            e.limits.query(body.query), e.limits.top_k(body.top_k), collection=body.collection,
            where=body.filter, score_threshold=body.score_threshold, mode=body.mode,
            history=history, condense=body.condense,
        )  # fmt: skip

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


async def _ingest(
    e: Edge, request: Request, collection: str | None = None, document_id: str | None = None
) -> IngestResult:
    """A JSON or multipart document from the request, ingested; ``document_id`` (a PUT's path)
    names it whatever the body says."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("file")
        if upload is None:
            raise InvalidArgument(
                "multipart upload needs a 'file' field with a .txt, .md, .html or .pdf file"
            )
        check_form_fields(form, {"file"} if document_id else {"file", "document_id"})
        form_id = form.get("document_id")
        doc_id = document_id or (form_id if isinstance(form_id, str) and form_id else None)
        if isinstance(upload, str):  # a part without a file name (curl -F 'file=<a.md'): text
            return await e.documents.add_text(doc_id, upload, collection=collection)
        name = upload_name(upload.filename, upload.content_type)
        return await e.documents.add_file(await upload.read(), name, doc_id,
                                          collection=collection)  # fmt: skip
    if ctype.startswith("application/json"):
        if document_id:  # a PUT: the path names the document
            body = _parsed(await request.body(), DocumentBody)
            return await e.documents.add_text(document_id, body.text, body.metadata,
                                              collection=collection)  # fmt: skip
        doc = _document(await request.body())
        return await e.documents.add_text(doc.document_id, doc.text, doc.metadata,
                                          collection=collection)  # fmt: skip
    raise InvalidArgument(
        "send application/json {'text': ...} or multipart/form-data with a 'file' field"
    )


async def _job_documents(request: Request) -> list[JobDocument]:
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        form = await request.form()
        uploads = [*form.getlist("files"), *form.getlist("file")]
        if not uploads:
            raise InvalidArgument(
                "a job upload needs one or more 'files' fields (.txt, .md, .html or .pdf)"
            )
        check_form_fields(form, {"files", "file"})
        return [JobDocument("upload.txt", text=u) if isinstance(u, str)  # a part without a name
                else JobDocument(upload_name(u.filename, u.content_type), data=await u.read())
                for u in uploads]  # fmt: skip
    if ctype.startswith("application/json"):
        body = _parsed(await request.body(), JobRequest)
        return [JobDocument(d.document_id or "text", text=d.text, document_id=d.document_id,
                            metadata=d.metadata) for d in body.documents]  # fmt: skip
    raise InvalidArgument(
        "send application/json {'documents': [{'text': ...}]} or multipart/form-data with "
        "'files' fields"
    )


def _document(raw: bytes) -> DocumentRequest:
    return _parsed(raw, DocumentRequest)


def _parsed(raw: bytes, model: type[BaseModel]):
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidArgument("body JSON is nested too deeply: send a flat object") from None
    try:
        return model.model_validate(payload)
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
