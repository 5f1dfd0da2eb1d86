"""The HTTP request bodies of the edge's own routes (the OpenAI ones are in openai_compat)."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    WithJsonSchema,
    field_validator,
)

COLLECTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"
# A document id: 1-200 characters, no control characters, not only spaces.
DOCUMENT_ID = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"
# White space as both readers of a text have it: JSON Schema's \s (ECMA-262's) and str.strip()
# (the embed stage's), which differ at \x1c-\x1f and \x85 (strip) and \ufeff (ECMA).
SPACE = r"\t\n\v\f\r \x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
_BLANK = re.compile(f"[{SPACE}]*")
# Said in the schema; the validators below refuse a blank text with a message of their own.
NOT_BLANK = {"minLength": 1, "pattern": f"[^{SPACE}]"}


def blank(text: str) -> bool:
    """Whether ``text`` is blank as the schema's patterns read it."""
    return _BLANK.fullmatch(text) is not None


MAX_KEY = 256  # retrieve's limit on a metadata field name (and ids)
MAX_CONDITIONS, MAX_VALUES = 16, 1024  # retrieve's limits on a filter
FILTER_SCHEMA = {
    "type": "object",
    "maxProperties": MAX_CONDITIONS,
    "propertyNames": {"minLength": 1, "maxLength": MAX_KEY},
    "additionalProperties": {"anyOf": [
        {"type": "string", "maxLength": MAX_KEY},
        {"type": "array", "items": {"type": "string", "maxLength": MAX_KEY}, "minItems": 1,
         "maxItems": MAX_VALUES},
    ]},
}  # fmt: skip


def _check_filter(where: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
    """The schema's limits, refused with what to fix (retrieve's own messages)."""
    if len(where) > MAX_CONDITIONS:
        raise ValueError(
            f"filter has {len(where)} conditions; at most {MAX_CONDITIONS} are allowed"
        )
    for key, value in where.items():
        if not key or len(key) > MAX_KEY:
            raise ValueError(f"filter field names are 1-{MAX_KEY} characters, got {key!r}")
        values = [value] if isinstance(value, str) else value
        if not values:
            raise ValueError(f"filter condition on {key!r} has no value: give a value or a "
                             "non-empty list (any_of)")  # fmt: skip
        if len(values) > MAX_VALUES:
            raise ValueError(f"filter condition on {key!r} lists {len(values)} values; at most "
                             f"{MAX_VALUES} are allowed")  # fmt: skip
        if any(len(v) > MAX_KEY for v in values):
            raise ValueError(f"filter values are at most {MAX_KEY} characters ({key!r})")
    return where


def _check_collection(name: str) -> str:
    if not re.fullmatch(COLLECTION_NAME, name):
        raise ValueError(
            f"collection name {name!r} is invalid: use 1-64 letters, digits, '_' or '-'"
        )
    return name


Filter = Annotated[
    dict[str, str | list[str]], AfterValidator(_check_filter), WithJsonSchema(FILTER_SCHEMA)
]
Collection = Annotated[
    str, AfterValidator(_check_collection),
    WithJsonSchema({"type": "string", "pattern": COLLECTION_NAME}),
]  # fmt: skip


def _json_number(value: object) -> object:
    if isinstance(value, (str, bool)):
        raise ValueError("must be a JSON number, not a string or a boolean")
    return value


Int = Annotated[int, BeforeValidator(_json_number)]  # 3 and 3.0, not "3" or true
PositiveInt = Annotated[int, BeforeValidator(_json_number), Field(ge=1)]
# top_k: at least 1 in the schema; ChatLimits.top_k refuses what is out of range, saying it
TopK = Annotated[int, BeforeValidator(_json_number), Field(json_schema_extra={"minimum": 1})]
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
    query: str = Field(description="the question", json_schema_extra=NOT_BLANK)
    top_k: TopK | None = Field(None, description="passages to retrieve")
    stream: StrictBool = Field(False, description="answer as Server-Sent Events")
    max_tokens: PositiveInt | None = Field(
        None, description="answer length limit (at most the server's max_tokens)"
    )
    score_threshold: StrictFloat | None = Field(
        None, ge=0, le=1, description="passages below this cosine similarity are not used"
    )
    answerer: Literal["generate", "extractive", "auto"] | None = Field(
        None, description="generate (LLM), extractive (quoted sentences) or auto (checked LLM)"
    )
    mode: Literal["dense", "sparse", "hybrid"] | None = Field(
        None, description="retrieval: embeddings, BM25, or both fused (default: the server's)"
    )
    collection: Collection | None = Field(
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
        if blank(v):
            raise ValueError("query is empty: ask a question")
        return v


class SearchRequest(BaseModel):
    query: str = Field(description="the text to find passages for", json_schema_extra=NOT_BLANK)
    collection: Collection | None = Field(
        None, description="collection to search (default: server's)"
    )
    top_k: TopK | None = Field(None, description="passages to retrieve")
    filter: Filter | None = Field(None, description=FILTER_DESCRIPTION)
    score_threshold: StrictFloat | None = Field(
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
        if blank(v):
            raise ValueError("query is empty: give a text to search for")
        return v


class CollectionRequest(BaseModel):
    name: Collection = Field(description="1-64 letters, digits, '_' or '-'")


class DocumentRequest(BaseModel):
    text: str = Field(
        description="document text (plain text or Markdown)", json_schema_extra=NOT_BLANK
    )
    document_id: str | None = Field(
        None, max_length=200, pattern=DOCUMENT_ID,
        description="stable id; re-ingesting replaces it",
    )  # fmt: skip
    metadata: dict[
        Annotated[str, Field(min_length=1, max_length=MAX_KEY)],
        Annotated[str, Field(max_length=4096)],
    ] = Field(default_factory=dict, max_length=64)


class DocumentBody(BaseModel):
    """A PUT's document: its path names it."""

    model_config = ConfigDict(extra="forbid")
    text: str = Field(
        description="document text (plain text or Markdown)", json_schema_extra=NOT_BLANK
    )
    metadata: dict[Annotated[str, Field(min_length=1, max_length=MAX_KEY)],
                   Annotated[str, Field(max_length=4096)]] = Field(
        default_factory=dict, max_length=64
    )  # fmt: skip


class JobRequest(BaseModel):
    documents: list[DocumentRequest] = Field(
        min_length=1, description="the documents to ingest, in order"
    )
