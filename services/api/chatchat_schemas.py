"""Langchain-Chatchat 0.3's wire shapes, as ragline's Chatchat routes
(``chatchat_compat.py``) take and answer them: request bodies, the ``score_threshold``
mapping, ``OpenAIChatOutput``, ``docs`` references, file details and ``{code, msg, data}``.
Read from Chatchat's own ``server/chat/kb_chat.py``, ``server/knowledge_base/kb_doc_api.py``
and ``server/api_server/api_schemas.py``; its client code checks them in
tests/integration/test_chatchat_compat.py."""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Iterable
from pathlib import PurePosixPath
from urllib.parse import quote

from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from ragline.errors import InvalidArgument
from services.api.openai_compat import Message
from services.api.schemas import Filter

CHUNK, COMPLETION = "chat.completion.chunk", "chat.completion"
NO_DOCS = "No passage of this knowledge base is relevant enough to answer from."
THRESHOLD = ("Chatchat's relevance threshold: the largest distance between unit vectors kept, "
             "0-2 (2 keeps every passage); ragline's cosine floor is 1 - d**2/2")  # fmt: skip


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


class Turn(BaseModel):
    role: str
    content: str

    def message(self) -> dict[str, str]:
        """Chatchat's history may hold system turns; ragline's has user and assistant ones."""
        return {"role": "assistant" if self.role == "assistant" else "user",
                "content": self.content}  # fmt: skip


class KbChatRequest(BaseModel):
    """``/chat/kb_chat``'s body; a field left out takes the server's default, not Chatchat's."""

    query: str
    mode: str = Field("local_kb", description="local_kb only (temp_kb, search_engine: 400)")
    kb_name: str = Field("", description="knowledge base (empty: the server's collection)")
    top_k: int | None = None
    score_threshold: float | None = Field(None, ge=0, le=2, description=THRESHOLD)
    history: list[Turn] = Field(default_factory=list)
    stream: bool = True
    model: str | None = Field(None, description="echoed; the server's model answers")
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=0, description="0 or none: the server's limit")
    prompt_name: str = Field("default", description="ignored: the server's prompt")
    return_direct: bool = Field(False, description="the passages only, nothing generated")


class KbCompletionRequest(BaseModel):
    """The OpenAI-style body of ``/knowledge_base/{mode}/{kb}/chat/completions``: the last
    message is the query, the ones before it the history, Chatchat's fields beside them."""

    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    stream: bool | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=0)
    top_k: int | None = None
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


class CreateKb(BaseModel):
    knowledge_base_name: str
    vector_store_type: str = Field("faiss", description="ignored: retrieve's index")
    kb_info: str = Field("", description="ignored: ragline keeps no description")
    embed_model: str = Field("", description="ignored: the embed stage's model")


class DeleteDocs(BaseModel):
    knowledge_base_name: str
    file_names: list[str]
    delete_content: bool = Field(False, description="ignored: ragline keeps no file copies")


class UpdateDocs(BaseModel):
    knowledge_base_name: str
    file_names: list[str]
    docs: str | dict = Field("", description="custom docs: file name -> [{page_content}]")


class SearchDocs(BaseModel):
    query: str = ""
    knowledge_base_name: str
    top_k: int | None = None
    score_threshold: float | None = Field(None, ge=0, le=2, description=THRESHOLD)
    file_name: str = Field("", description="only this document (its exact name)")
    metadata: Filter = Field(default_factory=dict, description="metadata conditions")


class RecreateVectorStore(BaseModel):
    knowledge_base_name: str
    allow_empty_kb: bool = True


class _Doc(BaseModel):
    page_content: str
    metadata: dict = Field(default_factory=dict)


_CUSTOM_DOCS = TypeAdapter(dict[str, list[_Doc]])


def custom_docs(raw: str | dict) -> dict[str, str]:
    """Chatchat's ``docs`` (file name -> its chunks, often as a JSON string) as each file's
    text; ragline chunks it again by its own policy."""
    if isinstance(raw, str):
        if not raw.strip():
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
