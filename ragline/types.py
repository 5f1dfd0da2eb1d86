"""ragline's own types: what the stages exchange, without protobuf.

Protobuf stops at the stage servicers and at ``ragline.clients``; everything else (the edge's
use cases, the prompt, ingestion, the monolith baseline) speaks these. They are frozen
dataclasses so a value can be shared between requests (the answer cache, a batch) safely.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

import numpy as np


class InputKind(Enum):
    """QUERY texts get the embedding model's query instruction (BGE); PASSAGE texts never do."""

    QUERY = "query"
    PASSAGE = "passage"


@dataclass(frozen=True)
class Embeddings:
    vectors: np.ndarray  # (n, dimension) float32, unit length when the model normalises
    model: str = ""
    token_counts: tuple[int, ...] = ()


@dataclass(frozen=True)
class EmbedderInfo:
    model: str
    dimension: int
    max_input_tokens: int = 0
    max_client_batch_size: int = 0


@dataclass(frozen=True)
class Passage:
    """One chunk of a document, with its vector, as it is written to a collection."""

    id: str
    document_id: str
    chunk: int
    text: str
    vector: np.ndarray
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DocumentRecord:
    """What retrieve remembers of a document: the hash that makes re-ingesting idempotent."""

    document_id: str
    content_hash: str
    chunks: int


@dataclass(frozen=True)
class DocumentInfo:
    """A document as retrieve lists it: its version, when it was written (Unix ms), and the
    metadata of its first passage (``source``, ``title`` and the caller's fields)."""

    document_id: str
    content_hash: str
    chunks: int
    updated_unix_ms: int = 0
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CollectionSummary:
    """A collection as retrieve lists it (``count``/``documents``: 0 unless counted)."""

    name: str
    dimension: int
    version: int = 0
    last_write_unix_ms: int = 0
    count: int = 0
    documents: int = 0
    index_type: str = ""


@dataclass(frozen=True)
class Hit:
    """A passage found by a search, best first."""

    id: str
    score: float
    text: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    document_id: str = ""
    chunk: int = 0
    rrf_score: float = 0.0  # hybrid search: the fused score hits are ordered by
    bm25_score: float = 0.0  # sparse/hybrid: BM25 of the question's text (0: no BM25 match)

    def to_dict(self) -> dict[str, object]:
        """The ``sources`` entry of an answer, as the HTTP API returns it."""
        return {
            "id": self.id,
            "score": round(float(self.score), 6),
            "text": self.text,
            "metadata": dict(self.metadata),
        }


@dataclass(frozen=True)
class SearchResult:
    hits: list[Hit]
    index_type: str = ""
    strategy: str = ""
    version: int = 0


@dataclass(frozen=True)
class WriteResult:
    """An acknowledged upsert or delete: durable on retrieve before it answered."""

    changed: int  # passages upserted or deleted
    count: int  # passages in the collection afterwards
    removed: int = 0  # an upsert's stale chunks of replaced documents


@dataclass(frozen=True)
class CollectionStats:
    name: str
    count: int
    dimension: int
    index_type: str
    documents: int
    last_write_unix_ms: int
    indexed: int
    version: int
    indexed_version: int
    rebuilding: bool


@dataclass(frozen=True)
class SamplingParams:
    """What a caller asks of the LLM; ``None`` takes the generate stage's default."""

    max_tokens: int = 0
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: Sequence[str] = ()
    repetition_penalty: float | None = None

    def cache_fields(self) -> dict[str, object]:
        """Every field, as plain JSON values (part of an answer-cache key)."""
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stop": list(self.stop),
            "repetition_penalty": self.repetition_penalty,
        }


@dataclass(frozen=True)
class GeneratorInfo:
    model: str
    backend: str
    context_length: int = 0
    max_concurrent_requests: int = 0
    default_max_tokens: int = 0


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # of prompt_tokens, reused from generate's prefix cache

    def to_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
        }


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled" | "unspecified"
    usage: Usage
    model: str = ""


@dataclass(frozen=True)
class CompletionChunk:
    """A piece of a streamed completion; the last one carries the finish reason and usage."""

    text: str
    finish_reason: str | None = None
    usage: Usage | None = None


Message = Mapping[str, str]  # {"role": "system" | "user" | "assistant", "content": ...}
