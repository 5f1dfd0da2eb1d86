"""Ingestion: chunk documents, embed them as PASSAGE in batches, upsert them by stable id.

Shared by ``POST /documents`` on the edge and ``ragline ingest PATH``. A document's content
hash (of its text and the chunking policy) is recorded by retrieve; re-ingesting an unchanged
document is skipped, and a changed one replaces its chunks in one upsert.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import unicodedata
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from opentelemetry import trace

from ragline.chunking import Chunk, ChunkingPolicy, TokenFit, chunk_text, document_title
from ragline.clients import EmbedStageClient, RetrieveStageClient
from ragline.documents import SUPPORTED_SUFFIXES, decode_document, iter_documents
from ragline.errors import InvalidArgument
from ragline.types import DocumentRecord, InputKind, Passage

tracer = trace.get_tracer(__name__)
MAX_DOCUMENT_ID = 200


@dataclass(frozen=True)
class IngestResult:
    document_id: str
    status: str  # "ingested" | "unchanged"
    chunks: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def check_document_id(document_id: str) -> str:
    document_id = unicodedata.normalize("NFC", document_id.strip())
    if not document_id:
        raise InvalidArgument("document_id is empty: give the document a stable name")
    if len(document_id) > MAX_DOCUMENT_ID:
        raise InvalidArgument(f"document_id is longer than {MAX_DOCUMENT_ID} characters")
    if any(unicodedata.category(c) == "Cc" for c in document_id):
        raise InvalidArgument("document_id contains control characters")
    return document_id


def document_metadata(
    document_id: str, text: str, metadata: dict[str, str] | None = None
) -> dict[str, str]:
    """A document's metadata: ``source`` (its id), ``title`` (its first heading, else the file
    name's stem) and the caller's own fields."""
    meta = {"source": document_id, **(metadata or {})}
    meta.setdefault("title", document_title(text, Path(document_id).stem))
    return meta


def chunk_metadata(document: dict[str, str], chunk: Chunk) -> dict[str, str]:
    """A passage's metadata: its document's, and the heading path it sits under."""
    return {**document, "heading": chunk.heading} if chunk.heading else dict(document)


def content_hash(text: str, policy: ChunkingPolicy, metadata: dict[str, str]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([asdict(policy), sorted(metadata.items())]).encode())
    h.update(text.encode("utf-8"))
    return h.hexdigest()


class Ingestor:
    """Turns documents into passages in one collection of the retrieve stage."""

    def __init__(
        self,
        embed: EmbedStageClient,
        retrieve: RetrieveStageClient,
        collection: str,
        policy: ChunkingPolicy | None = None,
        embed_batch: int = 32,
        timeout_s: float = 120.0,
    ) -> None:
        self.embed = embed
        self.retrieve = retrieve
        self.collection = collection
        self.policy = policy or ChunkingPolicy()
        self.embed_batch = embed_batch
        self.timeout_s = timeout_s
        self._collection_ready = False

    async def ensure_collection(self) -> None:
        if self._collection_ready:
            return
        info = await self.embed.info(timeout=self.timeout_s)
        await self.retrieve.create_collection(
            self.collection, info.dimension, exist_ok=True, timeout=self.timeout_s
        )
        self._collection_ready = True

    async def ingest_text(
        self, document_id: str, text: str, metadata: dict[str, str] | None = None
    ) -> IngestResult:
        document_id = check_document_id(document_id)
        if not text.strip():
            raise InvalidArgument(f"document {document_id!r} has no text to ingest")
        metadata = document_metadata(document_id, text, metadata)
        digest = content_hash(text, self.policy, metadata)
        with tracer.start_as_current_span("ingest.document") as span:
            span.set_attribute("ragline.document_id", document_id)
            await self.ensure_collection()
            known = await self.retrieve.get_documents(
                self.collection, [document_id], timeout=self.timeout_s
            )
            if document_id in known and known[document_id].content_hash == digest:
                span.set_attribute("ragline.unchanged", True)
                return IngestResult(document_id, "unchanged", known[document_id].chunks)
            chunks = chunk_text(text, self.policy)
            if self.policy.max_tokens:
                # Words are no measure of code-heavy text: cut what the model would truncate.
                fit = TokenFit(chunks, self.policy.max_tokens)
                while texts := fit.to_count():
                    fit.counted(*await self._count_tokens(texts))
                chunks = fit.chunks
                span.set_attribute("ragline.chunks_truncated", len(fit.over_limit()))
            passages: list[Passage] = []
            for start in range(0, len(chunks), self.embed_batch):
                batch = chunks[start : start + self.embed_batch]
                embedded = await self.embed.embed(
                    [c.text for c in batch], InputKind.PASSAGE, truncate=True,
                    timeout=self.timeout_s,
                )  # fmt: skip
                for chunk, vec in zip(batch, embedded.vectors, strict=True):
                    passages.append(
                        Passage(f"{document_id}#{chunk.index}", document_id, chunk.index,
                                chunk.text, vec, chunk_metadata(metadata, chunk))
                    )  # fmt: skip
            await self.retrieve.upsert(
                self.collection,
                passages,
                [DocumentRecord(document_id, digest, len(passages))],
                timeout=self.timeout_s,
            )
            span.set_attribute("ragline.chunks", len(passages))
            return IngestResult(document_id, "ingested", len(passages))

    async def _count_tokens(self, texts: list[str]) -> tuple[list[int], int]:
        counts: list[int] = []
        limit = 0
        for start in range(0, len(texts), self.embed_batch):
            batch, limit = await self.embed.count_tokens(
                texts[start : start + self.embed_batch], InputKind.PASSAGE, timeout=self.timeout_s
            )
            counts.extend(batch)
        return counts, limit

    async def ingest_paths(
        self,
        root: Path,
        on_progress: Callable[[int, int, IngestResult], None] | None = None,
    ) -> list[IngestResult]:
        """Ingest a file or every supported file under a folder; ids are paths relative to it."""
        files = list(iter_documents(root))
        if not files:
            raise InvalidArgument(f"no {', '.join(SUPPORTED_SUFFIXES)} files under {root}")
        base = root if root.is_dir() else root.parent
        results = []
        for i, path in enumerate(files, 1):
            text = decode_document(path.read_bytes(), path.name)  # html/pdf become text
            result = await self.ingest_text(path.relative_to(base).as_posix(), text)
            results.append(result)
            if on_progress:
                on_progress(i, len(files), result)
        return results


class Documents:
    """The edge's document writes: decode, ingest, and make this edge's answer cache stale at
    once (other edges see the new knowledge-base version within their poll period)."""

    def __init__(self, ingestor: Ingestor, kb_version) -> None:
        self.ingestor = ingestor
        self.kb_version = kb_version

    async def add_text(
        self, document_id: str | None, text: str, metadata: dict[str, str] | None = None
    ) -> IngestResult:
        """No ``document_id``: one made from the text, so re-sending it is idempotent."""
        if not document_id:
            document_id = "text-" + hashlib.sha256(text.encode()).hexdigest()[:16]
        result = await self.ingestor.ingest_text(document_id, text, metadata)
        if result.status == "ingested":
            await self.kb_version.refresh()
        return result

    async def add_file(self, data: bytes, name: str, document_id: str | None = None):
        # PDF parsing is CPU work: off the event loop.
        text = await asyncio.to_thread(decode_document, data, name)
        return await self.add_text(document_id or name, text)
