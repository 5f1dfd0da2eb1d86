"""The HTTP request bodies of the edge's own routes (the OpenAI ones are in openai_compat)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator

Filter = dict[str, str | list[str]]
FILTER_DESCRIPTION = (
    "metadata conditions, all of which a passage must meet: field -> value (equals) or "
    "list of values (any of), e.g. {'source': 'hr/leave.md'}"
)


class HistoryMessage(BaseModel):
    role: Literal["user", "assistant"]
    content: str


CONDENSE_DESCRIPTION = (
    "follow-ups: history searches the question also together with the earlier user turns and "
    "keeps the better match; off searches the question alone (default: the server's)"
)


class ChatRequest(BaseModel):
    query: str = Field(description="the question")
    top_k: int | None = Field(None, description="passages to retrieve")
    stream: bool = Field(False, description="answer as Server-Sent Events")
    max_tokens: int | None = Field(
        None, ge=1, description="answer length limit (at most the server's max_tokens)"
    )
    score_threshold: float | None = Field(
        None, ge=0, le=1, description="passages below this cosine similarity are not used"
    )
    answerer: Literal["generate", "extractive", "auto"] | None = Field(
        None, description="generate (LLM), extractive (quoted sentences) or auto (checked LLM)"
    )
    mode: Literal["dense", "sparse", "hybrid"] | None = Field(
        None, description="retrieval: embeddings, BM25, or both fused (default: the server's)"
    )
    collection: str | None = Field(
        None, description="knowledge base (collection) to search (default: the server's)"
    )
    filter: Filter | None = Field(None, description=FILTER_DESCRIPTION)
    history: list[HistoryMessage] = Field(
        default_factory=list,
        description="earlier turns, oldest first; the oldest are dropped to fit the server's "
        "bounds (the answer then says history_truncated: true)",
    )
    condense: Literal["history", "off"] | None = Field(None, description=CONDENSE_DESCRIPTION)

    @field_validator("query")
    @classmethod
    def _query_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("query is empty: ask a question")
        return v


class SearchRequest(BaseModel):
    query: str = Field(description="the text to find passages for")
    collection: str | None = Field(None, description="collection to search (default: server's)")
    top_k: int | None = Field(None, description="passages to retrieve")
    filter: Filter | None = Field(None, description=FILTER_DESCRIPTION)
    score_threshold: float | None = Field(
        None, ge=0, le=1, description="passages below this cosine similarity are left out"
    )
    mode: Literal["dense", "sparse", "hybrid"] | None = Field(
        None, description="retrieval: embeddings, BM25, or both fused (default: the server's)"
    )
    history: list[HistoryMessage] = Field(
        default_factory=list,
        description="earlier turns, oldest first: the query is condensed with them as /chat does",
    )
    condense: Literal["history", "off"] | None = Field(None, description=CONDENSE_DESCRIPTION)

    @field_validator("query")
    @classmethod
    def _query_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("query is empty: give a text to search for")
        return v


class CollectionRequest(BaseModel):
    name: str = Field(description="1-64 letters, digits, '_' or '-'")


class DocumentRequest(BaseModel):
    text: str = Field(description="document text (plain text or Markdown)")
    document_id: str | None = Field(None, description="stable id; re-ingesting replaces it")
    metadata: dict[str, str] = Field(default_factory=dict)


class JobRequest(BaseModel):
    documents: list[DocumentRequest] = Field(
        min_length=1, description="the documents to ingest, in order"
    )
