"""Langchain-Chatchat 0.3's API over the edge's services: ``/chat/kb_chat``, the OpenAI-style
``/knowledge_base/local_kb/{kb}/chat/completions`` its web UI chats through, and the
``/knowledge_base/*`` management routes, in Chatchat's request and response shapes, so a
Chatchat client works against ragline by changing its base URL.

Where ragline differs from Chatchat, and why:
- a refusal is Chatchat's ``{code, msg, data}`` body (what its clients read) with the HTTP
  status to match; Chatchat itself answers 200 with ``code`` 404 for an unknown knowledge base,
  which its clients cannot tell from success by the status (the openai SDK then parses an
  error as a stream), and 422 for a malformed body, where ragline answers 400;
- ``score_threshold`` is Chatchat's distance between unit vectors (0 the same, 2 opposite; at
  most this is kept, 2 keeps everything); ragline's floor is their cosine, ``1 - d**2 / 2``,
  and search scores come back as that distance;
- ragline keeps documents, not files: ``upload_docs`` ingests at once (``to_vector_store``
  false is refused), ``update_docs`` and ``recreate_vector_store`` have no file to re-read and
  report the documents as current, and ``search_docs`` needs a query (chunks are not listed);
- chunk sizes, the vector store, the embed model and the prompt are the server's.

The OpenAPI schema documents each route as it is (see ``chatchat_schemas``).
"""

# No ``from __future__ import annotations``: the routes' bodies are types made at start-up
# (``bounded``), which FastAPI could not resolve from strings.
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Annotated

from fastapi import APIRouter, Body, Depends, File, Form, Path, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import WithJsonSchema
from starlette.exceptions import HTTPException

from ragline.errors import InvalidArgument, NotFound, RaglineError, StageError
from services.api.chat import CacheControl, ChatQuery
from services.api.chatchat_schemas import (
    ALWAYS_TRUE,
    CHUNK,
    COMPLETION,
    CUSTOM_DOCS,
    FILES,
    MODE,
    REFUSED,
    CreateKb,
    DeleteDocs,
    FormBool,
    KbChatRequest,
    KbCompletionRequest,
    KbName,
    RecreateVectorStore,
    SearchDocs,
    UpdateDocs,
    blank,
    bounded,
    chat_output,
    cosine_floor,
    custom_docs,
    file_detail,
    l2_distance,
    ok,
    references,
    sse,
    streamed,
)
from services.api.http import (
    check_collection,
    safe_filename,
    validation_problems,
    visible_collections,
)
from services.api.ingest import unknown_collection
from services.api.routes import CHECKS, edge
from services.api.settings import ApiSettings
from services.api.wiring import Edge


def refusal(status: int, msg: str) -> JSONResponse:
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return JSONResponse({"code": status, "msg": msg, "data": None}, status, headers=headers)


class ChatchatRoute(APIRoute):
    """Refusals as Chatchat's ``{code, msg, data}`` (its clients read ``code`` and ``msg``),
    keeping their HTTP status; bugs still reach the app's 500 handler."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return refusal(400, validation_problems(exc))
            except RaglineError as exc:
                return refusal(exc.http_status, exc.message)
            except HTTPException as exc:  # a body FastAPI could not read (not UTF-8, not a form)
                detail = str(exc.detail)
                if "parsing the body" in detail:
                    detail = "body is not valid JSON (or not UTF-8): send a JSON object"
                return refusal(exc.status_code, detail)

        return route


def event_stream(events: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream")


async def kb_chunks(model: str, events: AsyncIterator, docs: Callable) -> AsyncIterator[bytes]:
    """ChatService's events as Chatchat streams them: ``docs`` first, then the answer's text.
    A checked answer that replaces the streamed one travels out of band (``ragline_replace``),
    as on /v1/chat/completions."""
    try:
        async for event, data in events:
            if event == "sources":
                yield sse(chat_output(model, CHUNK, "", docs=docs(data)))
            elif event == "token":
                yield sse(chat_output(model, CHUNK, data))
            elif event == "replace":
                yield sse(chat_output(model, CHUNK, "", ragline_replace=data))
    except RaglineError as exc:  # after the 200: an error event, as Chatchat sends one
        yield sse({"error": exc.message})


async def answer_kb_chat(body: KbChatRequest, request: Request, settings: ApiSettings):
    e = edge(request)
    if body.mode != "local_kb":
        raise InvalidArgument(f"mode {body.mode!r}: ragline answers from knowledge bases only "
                              "(mode 'local_kb')")  # fmt: skip
    kb = check_collection(request, body.kb_name or settings.collection)
    model = body.model or settings.model_name
    if blank(body.query):
        raise InvalidArgument("query is empty: ask a question")
    query, top_k = e.limits.query(body.query), e.limits.top_k(body.top_k)

    def docs(passages: Iterable[dict]) -> list[str]:
        return references(str(request.base_url), kb, passages)

    try:
        if body.return_direct:
            found = await e.collections.search(
                query, top_k, collection=kb, score_threshold=cosine_floor(body.score_threshold)
            )
            out = chat_output(model, COMPLETION, "", "stop", docs=docs(found["passages"]))
            return event_stream(_one(sse(out))) if body.stream else JSONResponse(out)
        history, dropped = e.limits.history([t.message() for t in body.history])
        q = ChatQuery(
            query, top_k, e.limits.params(body.max_tokens, body.temperature), history,
            CacheControl.parse(request.headers.get("cache-control", "")),
            score_threshold=cosine_floor(body.score_threshold), collection=kb,
            history_dropped=dropped,
        )  # fmt: skip
        if body.stream:
            return event_stream(kb_chunks(model, (await e.chat.stream(q)).events, docs))
        answer = (await e.chat.answer(q)).body
    except StageError as exc:
        raise unknown_collection(exc, kb) from None
    finish = "length" if answer["finish_reason"] == "length" else "stop"
    checks = {k: answer[k] for k in CHECKS if k in answer}
    return JSONResponse(chat_output(model, COMPLETION, answer["answer"], finish,
                                    docs=docs(answer["sources"]), ragline=checks))  # fmt: skip


async def _one(item: bytes) -> AsyncIterator[bytes]:
    yield item


# --- knowledge bases -------------------------------------------------------------------------


async def require_kb(e: Edge, kb: str) -> None:
    """``NotFound`` (404) unless knowledge base ``kb`` exists, before a write reads a byte."""
    await e.collections.documents(kb, 1)


async def all_documents(e: Edge, kb: str) -> list[dict]:
    """Every document of ``kb``; ``NotFound`` when there is no such knowledge base."""
    docs, after = await e.collections.documents(kb, 1000)
    while after:
        page, after = await e.collections.documents(kb, 1000, after)
        docs += page
    return docs


def chatchat_router(authorize: Callable, settings: ApiSettings) -> APIRouter:
    router = APIRouter(dependencies=[Depends(authorize)], tags=["chatchat compatibility"],
                       route_class=ChatchatRoute, responses=REFUSED)  # fmt: skip
    limits = settings.max_top_k, settings.max_query_chars
    KbChat, KbCompletion = bounded(KbChatRequest, *limits), bounded(KbCompletionRequest, *limits)
    Search = bounded(SearchDocs, *limits)
    answer = streamed("the answer: SSE chunks (docs first) when stream is true, else one JSON")

    @router.post("/chat/kb_chat", responses=answer)
    async def kb_chat(body: KbChat, request: Request):
        """Streams by default: a chunk with ``docs``, then the answer's text in chunks."""
        return await answer_kb_chat(body, request, settings)

    @router.post("/knowledge_base/{mode}/{kb}/chat/completions", responses=answer)
    async def kb_chat_completions(
        mode: Annotated[str, Path(json_schema_extra=MODE)],
        kb: Annotated[KbName, Path()],
        body: KbCompletion,
        request: Request,
    ):
        """What Chatchat's web UI calls with the openai SDK; answers as ``/chat/kb_chat``."""
        return await answer_kb_chat(body.kb_chat(mode, kb), request, settings)

    @router.get("/knowledge_base/list_knowledge_bases")
    async def list_knowledge_bases(request: Request):
        e = edge(request)
        found = await e.collections.list()
        names = set(visible_collections(request, [c["name"] for c in found]))
        model = (await e.embed.info(timeout=settings.timeout_s)).model
        kbs = [{"id": n, "kb_name": c["name"], "kb_info": "", "vs_type": "faiss",
                "embed_model": model, "file_count": c["documents"], "create_time": None}
               for n, c in enumerate((c for c in found if c["name"] in names), 1)]  # fmt: skip
        return ok("success", kbs)

    @router.post("/knowledge_base/create_knowledge_base")
    async def create_knowledge_base(body: CreateKb, request: Request):
        name = check_collection(request, body.knowledge_base_name)
        await edge(request).collections.create(name)
        return ok(f"created knowledge base {name}")

    @router.post("/knowledge_base/delete_knowledge_base")
    async def delete_knowledge_base(
        request: Request, knowledge_base_name: Annotated[KbName, Body()]
    ):
        """The body is the name itself, a JSON string, as Chatchat takes it."""
        name = check_collection(request, knowledge_base_name)
        await edge(request).collections.delete(name)
        return ok(f"deleted knowledge base {name}")

    @router.get("/knowledge_base/list_files")
    async def list_files(knowledge_base_name: KbName, request: Request):
        kb = check_collection(request, knowledge_base_name)
        docs = await all_documents(edge(request), kb)
        return ok("success", [file_detail(n, kb, d) for n, d in enumerate(docs, 1)])

    @router.post("/knowledge_base/upload_docs")
    async def upload_docs(
        request: Request,
        files: Annotated[list[UploadFile], File(min_length=1), WithJsonSchema(FILES)],
        knowledge_base_name: Annotated[KbName, Form()],
        override: Annotated[FormBool, Form(description="also accept a file unchanged")] = False,
        to_vector_store: Annotated[FormBool, Form(json_schema_extra=ALWAYS_TRUE)] = True,
        docs: Annotated[str, Form(), WithJsonSchema(CUSTOM_DOCS)] = "",
    ):
        """Each file ingested as a document named by its file name; a file ragline cannot read,
        or (without ``override``) one already there unchanged, is in ``failed_files``."""
        e, kb = edge(request), check_collection(request, knowledge_base_name)
        if not to_vector_store:
            raise InvalidArgument("to_vector_store=false: ragline keeps no file copies, it "
                                  "ingests what is uploaded; send true")  # fmt: skip
        texts = custom_docs(docs)
        await require_kb(e, kb)
        failed: dict[str, str] = {}
        for upload in files:
            name = upload.filename or ""
            try:
                name = safe_filename(name)
                if name in texts:
                    continue  # its custom docs are ingested instead, below
                done = await e.documents.add_file(await upload.read(), name, collection=kb)
            except InvalidArgument as exc:
                failed[name] = exc.message
                continue
            if done.status == "unchanged" and not override:
                failed[name] = f"{name} is in {kb!r} already, unchanged (override=true accepts it)"
        failed |= await _ingest_texts(e, kb, texts)
        return ok("uploaded and ingested", {"failed_files": failed})

    @router.post("/knowledge_base/delete_docs")
    async def delete_docs(body: DeleteDocs, request: Request):
        e, kb = edge(request), check_collection(request, body.knowledge_base_name)
        await require_kb(e, kb)
        failed: dict[str, str] = {}
        for name in body.file_names:
            try:
                await e.documents.delete(kb, name)
            except NotFound:
                failed[name] = f"no file {name} in knowledge base {kb!r}"
            except InvalidArgument as exc:  # not a name a document can have
                failed[name] = exc.message
        return ok("deleted", {"failed_files": failed})

    @router.post("/knowledge_base/update_docs")
    async def update_docs(body: UpdateDocs, request: Request):
        """Custom docs replace their documents' text; a document without them is current
        (ragline re-embeds a document when its text changes) unless it is missing."""
        e, kb = edge(request), check_collection(request, body.knowledge_base_name)
        texts = custom_docs(body.docs)
        await require_kb(e, kb)
        failed: dict[str, str] = {}
        for name in body.file_names:
            if name in texts:
                continue
            try:
                await e.collections.document(kb, name)
            except NotFound:
                failed[name] = f"no file {name} in knowledge base {kb!r}: upload it"
            except InvalidArgument as exc:
                failed[name] = exc.message
        failed |= await _ingest_texts(e, kb, texts)
        return ok("updated", {"failed_files": failed})

    @router.post("/knowledge_base/search_docs")
    async def search_docs(body: Search, request: Request):
        """Passages as Chatchat's documents, closest first, scored by distance (smaller is
        closer). ``file_name`` and ``metadata`` narrow the search."""
        e, kb = edge(request), check_collection(request, body.knowledge_base_name)
        query, top_k = e.limits.query(body.query), e.limits.top_k(body.top_k)
        if blank(query):
            if body.file_name or body.metadata:
                raise InvalidArgument("search_docs needs a query: ragline does not list a "
                                      "file's chunks (list_files lists the files)")  # fmt: skip
            await require_kb(e, kb)
            return []
        where = {**body.metadata, **({"source": body.file_name} if body.file_name else {})}
        found = await e.collections.search(
            query, top_k, collection=kb, where=where or None,
            score_threshold=cosine_floor(body.score_threshold),
        )  # fmt: skip
        return [{"page_content": p["text"], "metadata": p["metadata"], "type": "Document",
                 "id": p["id"], "score": l2_distance(p["score"])}
                for p in found["passages"]]  # fmt: skip

    @router.post(
        "/knowledge_base/recreate_vector_store",
        responses=streamed("progress: one SSE event per document", whole=False),
    )
    async def recreate_vector_store(body: RecreateVectorStore, request: Request):
        """Chatchat's progress stream, one event per document. The vectors are made from the
        stored documents by the embed stage's model, so there is nothing to rebuild; a missing
        knowledge base is created (``allow_empty_kb``) or a 404."""
        e, kb = edge(request), check_collection(request, body.knowledge_base_name)
        try:
            docs = await all_documents(e, kb)
        except NotFound:
            if not body.allow_empty_kb:
                raise
            await e.collections.create(kb)
            docs = []

        async def progress() -> AsyncIterator[bytes]:
            for n, d in enumerate(docs, 1):
                yield sse({"code": 200, "msg": f"({n} / {len(docs)}): {d['id']} (current)",
                           "total": len(docs), "finished": n, "doc": d["id"]})  # fmt: skip

        return event_stream(progress())

    return router


async def _ingest_texts(e: Edge, kb: str, texts: dict[str, str]) -> dict[str, str]:
    """Custom docs ingested as their documents' text; the ones ragline refused, and why."""
    failed = {}
    for name, text in texts.items():
        try:
            await e.documents.add_text(name, text, collection=kb)
        except InvalidArgument as exc:
            failed[name] = exc.message
    return failed
