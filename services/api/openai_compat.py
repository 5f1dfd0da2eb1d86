"""The OpenAI API over ragline: ``POST /v1/chat/completions`` (the RAG pipeline) and
``POST /v1/embeddings`` (the embed stage).

Chat: the last user message is the question that retrieval runs on; earlier messages are kept
as chat history (bounded like /chat's ``history``); a client's own system message is folded
into the history. Existing OpenAI clients and SDKs work unchanged (streaming and not); the
sources come back in an extra ``sources`` field (and as the first chunk's ``sources`` when
streaming). ragline's extensions (``top_k``, ``score_threshold``, ``collection``, ``filter``)
travel in the body (the OpenAI SDK's ``extra_body``).

Embeddings: ``input`` a string or a list of strings, ``encoding_format`` float or base64
(little-endian float32, what the OpenAI SDK asks for by default); ragline's ``input_type``
says whether the texts are queries (the model's query instruction, if any, is added) or
passages.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, Field, StrictBool, StrictFloat, field_validator

from ragline.errors import InvalidArgument, RaglineError
from services.api.schemas import (
    CONDENSE_DESCRIPTION,
    FILTER_DESCRIPTION,
    NOT_BLANK,
    Collection,
    Filter,
    Int,
    PositiveInt,
    TopK,
    blank,
)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str = Field(json_schema_extra=NOT_BLANK)


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: (
        Annotated[str, Field(json_schema_extra=NOT_BLANK)]
        | Annotated[list[TextPart], Field(min_length=1)]
    ) = Field(description="text, or a list of text parts (not blank)")

    @field_validator("content")
    @classmethod
    def _join_parts(cls, v: str | list[TextPart]) -> str:
        return v if isinstance(v, str) else "".join(part.text for part in v)


class ChatCompletionRequest(BaseModel):
    model: str | None = None
    messages: list[Message] = Field(
        min_length=1,
        description="the conversation; the last user message is the question",
        json_schema_extra={"contains": {"type": "object", "required": ["role"],
                                        "properties": {"role": {"const": "user"}}}},
    )  # fmt: skip
    stream: StrictBool = False
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    temperature: StrictFloat | None = Field(None, ge=0, le=2)
    top_p: StrictFloat | None = Field(None, gt=0, le=1)
    seed: Int | None = None
    stop: str | list[str] | None = None
    top_k: TopK | None = Field(None, description="ragline extension: passages to retrieve")
    score_threshold: StrictFloat | None = Field(
        None, ge=0, le=1, description="ragline extension: relevance floor (cosine)"
    )
    collection: Collection | None = Field(
        None, description="ragline extension: knowledge base to search (default: the server's)"
    )
    filter: Filter | None = Field(None, description="ragline extension: " + FILTER_DESCRIPTION)
    condense: Literal["history", "off"] | None = Field(
        None, description="ragline extension: " + CONDENSE_DESCRIPTION
    )


class EmbeddingsRequest(BaseModel):
    input: (
        Annotated[str, Field(json_schema_extra=NOT_BLANK)]
        | Annotated[
            list[Annotated[str, Field(json_schema_extra=NOT_BLANK)]],
            Field(json_schema_extra={"minItems": 1}),
        ]
    ) = Field(description="a text or a list of texts (none blank)")
    model: str | None = Field(None, description="ignored: the embed stage's model answers")
    encoding_format: Literal["float", "base64"] = "float"
    input_type: Literal["query", "passage"] = Field(
        "passage", description="ragline extension: query texts get the model's query instruction"
    )
    truncate: StrictBool = Field(
        False, description="ragline extension: cut texts over the model's limit (else 400)"
    )
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _texts(cls, v: str | list[str]) -> str | list[str]:
        texts = [v] if isinstance(v, str) else v
        if not texts:
            raise ValueError("input is an empty list: send at least one text")
        if any(blank(t) for t in texts):
            raise ValueError("input holds an empty text: every text needs some content")
        return v

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


def embeddings_body(
    model: str, vectors: np.ndarray, token_counts: Sequence[int], encoding: str
) -> dict:
    """OpenAI's embeddings response; base64 is the vector's little-endian float32 bytes."""

    def encoded(v: np.ndarray) -> list[float] | str:
        if encoding == "base64":
            return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()
        return np.asarray(v, dtype=np.float32).tolist()

    tokens = int(sum(token_counts))
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encoded(v)}
            for i, v in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def split_messages(req: ChatCompletionRequest) -> tuple[str, list[dict[str, str]]]:
    """The question (last user message) and the history before it."""
    last_user = max((i for i, m in enumerate(req.messages) if m.role == "user"), default=None)
    if last_user is None or blank(req.messages[last_user].content):
        raise InvalidArgument("messages needs a non-empty user message: it is the question")
    history = [
        {"role": "user" if m.role in ("system", "developer") else m.role, "content": m.content}
        for m in req.messages[:last_user]
    ]
    return req.messages[last_user].content, history


def openai_usage(usage: dict) -> dict:
    """ragline's usage in OpenAI's shape; cached prompt tokens as OpenAI reports them."""
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": usage.get("cached_prompt_tokens", 0)},
    }


def completion_body(
    model: str, answer: str, finish: str, usage: dict, sources: list, checks: dict | None = None
) -> dict:
    """``checks``: ragline's grounding fields (citations, grounded, not_found, ...), returned
    under ``ragline`` beside the OpenAI fields."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer},
                "finish_reason": "length" if finish == "length" else "stop",
            }
        ],
        "usage": openai_usage(usage),
        "sources": sources,
        "ragline": checks or {},
    }


async def completion_chunks(model: str, events: AsyncIterator[tuple[str, object]]):
    """OpenAI streaming chunks (``data: {...}``) then ``data: [DONE]``."""
    cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())

    def chunk(delta: dict, finish: str | None = None, **extra) -> bytes:
        body = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra,
        }
        return f"data: {json.dumps(body)}\n\n".encode()

    try:
        async for event, data in events:
            for piece in _chunk_for(chunk, event, data):
                yield piece
    except RaglineError as exc:  # after the 200 went out: an error object, as OpenAI streams do
        error = {"message": exc.message, "type": exc.grpc_code.lower(), "code": exc.http_status}
        yield f"data: {json.dumps({'error': error})}\n\n".encode()
    yield b"data: [DONE]\n\n"


def _chunk_for(chunk, event: str, data) -> Iterator[bytes]:
    if event == "sources":
        yield chunk({"role": "assistant", "content": ""}, sources=data)
    elif event == "replace":
        # The streamed text failed its grounding check: the answer that stands, out of band
        # (OpenAI clients ignore the extra field; ragline-aware ones show it instead).
        yield chunk({}, ragline_replace=data)
    elif event == "token":
        yield chunk({"content": data})
    elif event == "done":
        finish = "length" if data.get("finish_reason") == "length" else "stop"
        extra = {}
        if "history_truncated" in data:  # sent with history: say whether it was cut
            extra["ragline"] = {"history_truncated": data["history_truncated"]}
        yield chunk({}, finish, usage=openai_usage(data.get("usage", {})), **extra)
