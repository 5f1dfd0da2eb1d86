"""Langchain-Chatchat 0.3's wire shapes, as ragline's Chatchat routes
(``chatchat_compat.py``) take and answer them: request bodies, the ``score_threshold``
mapping, ``OpenAIChatOutput``, ``docs`` references, file details and ``{code, msg, data}``.
Read from Chatchat's own ``server/chat/kb_chat.py``, ``server/knowledge_base/kb_doc_api.py``
and ``server/api_server/api_schemas.py``; its client code checks them in
tests/integration/test_chatchat_compat.py.

The schemas say what the routes take, no more and no less (``schemathesis --checks all``
holds them to it): names as retrieve takes them, no blank question, only ``local_kb``, the
server's own ``max_top_k`` and ``max_query_chars`` (``bounded``), and every refusal as the
``{code, msg, data}`` it is (``REFUSALS``). Where a schema only documents a rule, the route
checks it with a message of its own."""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections.abc import Iterable
from pathlib import PurePosixPath
from typing import Annotated, Any, TypeVar
from urllib.parse import quote

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    field_validator,
)

from ragline.errors import InvalidArgument
from services.api.schemas import COLLECTION_NAME, NOT_BLANK, SPACE, Filter, blank

CHUNK, COMPLETION = "chat.completion.chunk", "chat.completion"
NO_DOCS = "No passage of this knowledge base is relevant enough to answer from."
THRESHOLD = ("Chatchat's relevance threshold: the largest distance between unit vectors kept, "
             "0-2 (2 keeps every passage); ragline's cosine floor is 1 - d**2/2")  # fmt: skip


KB_NAME = COLLECTION_NAME  # retrieve's rule for a collection name
MAX_CONDITIONS = 16  # retrieve's limit on a filter's conditions


def _kb_name(name: str) -> str:
    if not re.fullmatch(KB_NAME, name):
        raise ValueError(f"{name!r} is not a knowledge base name: 1-64 letters, digits, '_' or '-'")
    return name


KbName = Annotated[str, AfterValidator(_kb_name), WithJsonSchema(
    {"type": "string", "pattern": KB_NAME, "description": "1-64 letters, digits, '_' or '-'"}
)]  # fmt: skip
# kb_chat's: empty names the server's collection
KbNameOrDefault = Annotated[str, AfterValidator(lambda name: name and _kb_name(name)),
                            WithJsonSchema({"type": "string", "pattern": r"^[A-Za-z0-9_-]{0,64}$",
                                            "description": "knowledge base (empty: the "
                                            "server's collection)"})]  # fmt: skip


def _form_bool(value: object) -> object:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError("send true or false")


def _whole(value: object) -> object:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# Integers as JSON Schema has them: 9.0 is one, "9" and true are not. (The bound goes before
# the validator: after it, pydantic's schema would say "ge", not "minimum".)
TopK = Annotated[int, Field(ge=1), BeforeValidator(_whole)]
MaxTokens = Annotated[int, Field(ge=0), BeforeValidator(_whole)]
# A form's true or false, as Chatchat's client (httpx) spells them; not 0, 1, yes or on.
FormBool = Annotated[bool, BeforeValidator(_form_bool)]
# upload_docs' to_vector_store: ragline ingests what is uploaded, it keeps no file copies
ALWAYS_TRUE = {"enum": [True], "description": "must be true: ragline ingests"}
# Chatchat's modes besides local_kb (temp_kb, search_engine) are refused with a message.
MODE = {"enum": ["local_kb"], "description": "local_kb only: ragline answers from knowledge bases"}


def cosine_floor(distance: float | None) -> float | None:
    """Chatchat's ``score_threshold`` as ragline's: ``|a - b|**2 = 2 - 2 cos`` for unit
    vectors. None stays None (the server's floor)."""
    if distance is None:
        return None
    return min(1.0, max(0.0, 1.0 - distance * distance / 2))


def l2_distance(cosine: float) -> float:
    """A passage's cosine as the distance Chatchat scores by (smaller is closer)."""
    return round(math.sqrt(max(0.0, 2.0 - 2.0 * cosine)), 6)


# --- request bodies --------------------------------------------------------------------------


class Body(BaseModel):
    """A JSON body as its schema says: no 0 for false, no "1" for 1 (Chatchat's clients send
    JSON's own types)."""

    model_config = ConfigDict(strict=True)


class Turn(Body):
    role: str
    content: str

    def message(self) -> dict[str, str]:
        """Chatchat's history may hold system turns; ragline's has user and assistant ones."""
        return {"role": "assistant" if self.role == "assistant" else "user",
                "content": self.content}  # fmt: skip


class Said(Turn):
    """A message of the web UI's conversation: none is blank (the last is the question)."""

    content: str = Field(json_schema_extra=NOT_BLANK)

    @field_validator("content")
    @classmethod
    def _not_blank(cls, content: str) -> str:
        if blank(content):
            raise ValueError("is blank: every message needs its text")
        return content


class KbChatRequest(Body):
    """``/chat/kb_chat``'s body; a field left out takes the server's default, not Chatchat's."""

    query: str = Field(description="the question", json_schema_extra=NOT_BLANK)
    mode: str = Field("local_kb", json_schema_extra=MODE)
    kb_name: KbNameOrDefault = ""
    top_k: TopK | None = Field(None, description="passages (at most the server's max_top_k)")
    score_threshold: float | None = Field(None, ge=0, le=2, description=THRESHOLD)
    history: list[Turn] = Field(default_factory=list)
    stream: bool = True
    model: str | None = Field(None, description="echoed; the server's model answers")
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: MaxTokens | None = Field(None, description="0 or none: the server's limit")
    prompt_name: str = Field("default", description="ignored: the server's prompt")
    return_direct: bool = Field(False, description="the passages only, nothing generated")


class KbCompletionRequest(Body):
    """The OpenAI-style body of ``/knowledge_base/{mode}/{kb}/chat/completions``: the last
    message is the query, the ones before it the history, Chatchat's fields beside them."""

    messages: list[Said] = Field(min_length=1)
    model: str | None = None
    stream: bool | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: MaxTokens | None = None
    top_k: TopK | None = Field(None, description="passages (at most the server's max_top_k)")
    score_threshold: float | None = Field(None, ge=0, le=2, description=THRESHOLD)
    return_direct: bool = False

    def kb_chat(self, mode: str, kb: str) -> KbChatRequest:
        *history, last = self.messages
        return KbChatRequest(
            query=last.content, mode=mode, kb_name=kb, top_k=self.top_k,
            score_threshold=self.score_threshold, stream=bool(self.stream), model=self.model,
            history=[Turn(role=m.role, content=m.content) for m in history],
            temperature=self.temperature, max_tokens=self.max_tokens,
            return_direct=self.return_direct,
        )  # fmt: skip


class CreateKb(Body):
    knowledge_base_name: KbName
    vector_store_type: str = Field("faiss", description="ignored: retrieve's index")
    kb_info: str = Field("", description="ignored: ragline keeps no description")
    embed_model: str = Field("", description="ignored: the embed stage's model")


class DeleteDocs(Body):
    knowledge_base_name: KbName
    file_names: list[str]
    delete_content: bool = Field(False, description="ignored: ragline keeps no file copies")


class _Doc(Body):
    page_content: str
    metadata: dict = Field(default_factory=dict)


_CUSTOM_DOCS = TypeAdapter(dict[str, list[_Doc]])
# Chatchat's clients send the map as JSON text (json.dumps), which is taken too; "" is none.
_DOCS_MAP = {
    "type": "object",
    "additionalProperties": {"type": "array", "items": {
        "type": "object", "required": ["page_content"],
        "properties": {"page_content": {"type": "string"}, "metadata": {"type": "object"}}}},
}  # fmt: skip
CUSTOM_DOCS = {
    "anyOf": [_DOCS_MAP, {"type": "string", "maxLength": 0}],
    "description": "custom docs: file name -> [{page_content, metadata}], or the same as "
    "JSON text, as Chatchat's clients send it; each file's text is chunked again",
}


# ``format: binary``, which tools read as any bytes (FastAPI's ``contentMediaType`` is fuzzed
# as text, and a file whose bytes spell "null" is still a file)
FILES = {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"}}


class UpdateDocs(Body):
    knowledge_base_name: KbName
    file_names: list[str]
    docs: Annotated[str | dict, WithJsonSchema(CUSTOM_DOCS)] = ""


class SearchDocs(Body):
    query: str = Field("", description="the text to find passages for (blank: none)")
    knowledge_base_name: KbName
    top_k: TopK | None = Field(None, description="passages (at most the server's max_top_k)")
    score_threshold: float | None = Field(None, ge=0, le=2, description=THRESHOLD)
    file_name: str = Field("", description="only this document (its exact name)")
    # file_name is one of retrieve's conditions, so metadata may have one fewer
    metadata: Annotated[Filter, Field(max_length=MAX_CONDITIONS - 1)] = Field(
        default_factory=dict, description="metadata conditions: field -> value or values"
    )

    model_config = ConfigDict(strict=True, json_schema_extra={
        # ragline does not list a file's chunks: a blank query narrows nothing
        "if": {"properties": {"query": {"pattern": f"^[{SPACE}]*$"}}},
        "then": {"properties": {"file_name": {"maxLength": 0},
                                "metadata": {"maxProperties": 0}}},
    })  # fmt: skip


class RecreateVectorStore(Body):
    knowledge_base_name: KbName
    allow_empty_kb: bool = True


M = TypeVar("M", bound=BaseModel)


def bounded(model: type[M], max_top_k: int, max_query_chars: int) -> type[M]:
    """``model`` with the server's limits in its schema: ``top_k`` at most ``max_top_k``, a
    ``query`` at most ``max_query_chars`` long (the routes check them, saying the limit)."""

    def limits(schema: dict[str, Any]) -> None:
        props = schema["properties"]
        for option in props.get("top_k", {}).get("anyOf", []):
            if option.get("type") == "integer":
                option["maximum"] = max_top_k
        if "query" in props:
            props["query"]["maxLength"] = max_query_chars
        extra = model.model_config.get("json_schema_extra")  # the model's own (SearchDocs' if)
        schema.update(extra if isinstance(extra, dict) else {})

    config = {**model.model_config, "json_schema_extra": limits}
    return type(
        model.__name__,
        (model,),
        {"__module__": model.__module__, "__doc__": model.__doc__, "model_config": config},
    )


def custom_docs(raw: str | dict) -> dict[str, str]:
    """Chatchat's ``docs`` (file name -> its chunks, often as a JSON string) as each file's
    text; ragline chunks it again by its own policy."""
    if isinstance(raw, str):
        if not raw:
            return {}
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"docs is not valid JSON: {exc}") from None
    try:
        parsed = _CUSTOM_DOCS.validate_python(raw)
    except ValidationError:
        raise InvalidArgument(
            "docs must map file names to lists of {'page_content': ..., 'metadata': {...}}"
        ) from None
    return {name: "\n\n".join(d.page_content for d in chunks) for name, chunks in parsed.items()}


# --- responses -------------------------------------------------------------------------------


class Refusal(BaseModel):
    """Chatchat's refusal, with the HTTP status as its ``code``."""

    code: int = Field(description="the HTTP status")
    msg: str = Field(description="what is wrong and what to do")
    data: None = None


REFUSALS = {
    400: "invalid request: msg says which field and why",
    401: "missing or wrong API key (when the edge has keys)",
    403: "the API key may not use this knowledge base",
    404: "no such knowledge base",
    409: "the knowledge base exists already",
    429: "busy: retry after the Retry-After header",
    502: "a stage failed",
    503: "a stage is unavailable or not ready",
    504: "the request's time budget ran out",
}
# 413 (the body limit, before a route) and 500 (a bug) are the edge's own {"error": ...}.
REFUSED = {status: {"model": Refusal, "description": why} for status, why in REFUSALS.items()}
_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string", "contentMediaType": "application/json",
                            "contentSchema": {"type": "object"}}},
}  # fmt: skip


def streamed(what: str, whole: bool = True) -> dict[int, dict]:
    """A route's 200: Server-Sent Events, one JSON object each (and JSON when not streamed)."""
    content = {"text/event-stream": {"schema": _EVENT}}
    if whole:
        content["application/json"] = {"schema": {"type": "object"}}
    return {200: {"description": what, "content": content}}


def ok(msg: str, data: object = None) -> dict[str, object]:
    return {"code": 200, "msg": msg, "data": data}


def chat_output(model: str, kind: str, content: str, finish: str | None = None, **extra) -> dict:
    """Chatchat's ``OpenAIChatOutput.model_dump()``: a stream chunk or a whole answer."""
    out = {"id": f"chat{uuid.uuid4()}", "object": kind, "model": model,
           "created": int(time.time()), "status": None, "message_type": 1, "message_id": None,
           "is_ref": False, **extra}  # fmt: skip
    if kind == CHUNK:
        out["choices"] = [{"delta": {"content": content, "tool_calls": []}, "role": "assistant"}]
    else:
        message = {"role": "assistant", "content": content, "finish_reason": finish,
                   "tool_calls": []}  # fmt: skip
        out["choices"] = [{"message": message}]
    return out


def references(base_url: str, kb: str, passages: Iterable[dict]) -> list[str]:
    """Chatchat's ``docs``: one Markdown entry per passage, linked to its document."""
    docs = []
    for n, p in enumerate(passages, 1):
        doc_id = str(p["id"]).rpartition("#")[0] or str(p["id"])
        name = p.get("metadata", {}).get("source", doc_id)
        url = f"{base_url.rstrip('/')}/collections/{quote(kb)}/documents/{quote(doc_id)}"
        docs.append(f"Source [{n}] [{name}]({url}) \n\n{p['text']}\n\n")
    return docs or [NO_DOCS]


def file_detail(n: int, kb: str, d: dict) -> dict[str, object]:
    """A document as Chatchat lists a file (ragline keeps no file, so: in_db, not in_folder)."""
    return {"No": n, "kb_name": kb, "file_name": d["id"],
            "file_ext": PurePosixPath(d["id"]).suffix, "file_version": 0,
            "document_loader": "", "text_splitter": "", "create_time": d["ingested_at"],
            "file_mtime": None, "file_size": None, "custom_docs": False,
            "docs_count": d["chunks"], "in_folder": False, "in_db": True}  # fmt: skip


def sse(payload: dict) -> bytes:
    # One event per body message: Chatchat's client parses each HTTP chunk as one event.
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()
