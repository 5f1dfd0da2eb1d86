"""Ingestion: chunk documents, embed them as PASSAGE in batches, upsert them by stable id.

Shared by ``POST /documents`` on the edge and ``ragline ingest PATH``. A document's content
hash (of its text and the chunking policy) is recorded by retrieve; re-ingesting an unchanged
document is skipped, and a changed one replaces its chunks in one upsert.
"""

from __future__ import annotations

import hashlib
import json
import logging
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from opentelemetry import trace

from ragline.chunking import ChunkingPolicy, chunk_text, document_title
from ragline.clients import EmbedClient, RetrieveClient
from ragline.errors import InvalidArgument
from ragline.v1 import embed_pb2, retrieve_pb2

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

SUPPORTED_SUFFIXES = (".txt", ".md", ".markdown")
MAX_DOCUMENT_ID = 200


@dataclass(frozen=True)
class IngestResult:
    document_id: str
    status: str  # "ingested" | "unchanged"
    chunks: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def decode_document(data: bytes, name: str) -> str:
    """Text of an uploaded .txt/.md file; refuse other types and non-UTF-8 bytes clearly."""
    suffix = Path(name).suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise InvalidArgument(
            f"unsupported file type {suffix or '(none)'!r} for {name!r}: "
            f"upload one of {', '.join(SUPPORTED_SUFFIXES)}"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(
            f"{name!r} is not valid UTF-8 text (byte {exc.start}): re-save it as UTF-8"
        ) from None


def check_document_id(document_id: str) -> str:
    document_id = unicodedata.normalize("NFC", document_id.strip())
    if not document_id:
        raise InvalidArgument("document_id is empty: give the document a stable name")
    if len(document_id) > MAX_DOCUMENT_ID:
        raise InvalidArgument(f"document_id is longer than {MAX_DOCUMENT_ID} characters")
    if any(unicodedata.category(c) == "Cc" for c in document_id):
        raise InvalidArgument("document_id contains control characters")
    return document_id


def content_hash(text: str, policy: ChunkingPolicy, metadata: dict[str, str]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([asdict(policy), sorted(metadata.items())]).encode())
    h.update(text.encode("utf-8"))
    return h.hexdigest()


class Ingestor:
    """Turns documents into passages in one collection of the retrieve stage."""

    def __init__(
        self,
        embed: EmbedClient,
        retrieve: RetrieveClient,
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
        metadata = {"source": document_id, **(metadata or {})}
        metadata.setdefault("title", document_title(text, Path(document_id).stem))
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
            passages: list[retrieve_pb2.Passage] = []
            for start in range(0, len(chunks), self.embed_batch):
                batch = chunks[start : start + self.embed_batch]
                vecs, _ = await self.embed.embed(
                    [c.text for c in batch],
                    kind=embed_pb2.INPUT_KIND_PASSAGE,
                    truncate=True,
                    timeout=self.timeout_s,
                )
                for chunk, vec in zip(batch, vecs, strict=True):
                    meta = dict(metadata)
                    if chunk.heading:
                        meta["heading"] = chunk.heading
                    passages.append(
                        retrieve_pb2.Passage(
                            id=f"{document_id}#{chunk.index}",
                            document_id=document_id,
                            chunk=chunk.index,
                            text=chunk.text,
                            metadata=meta,
                            vector=vec.astype("<f4").tobytes(),
                        )
                    )
            await self.retrieve.upsert(
                self.collection,
                passages,
                [
                    retrieve_pb2.Document(
                        document_id=document_id, content_hash=digest, chunks=len(passages)
                    )
                ],
                timeout=self.timeout_s,
            )
            span.set_attribute("ragline.chunks", len(passages))
            return IngestResult(document_id, "ingested", len(passages))

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
            text = decode_document(path.read_bytes(), path.name)
            result = await self.ingest_text(path.relative_to(base).as_posix(), text)
            results.append(result)
            if on_progress:
                on_progress(i, len(files), result)
        return results


def iter_documents(root: Path) -> Iterable[Path]:
    if root.is_file():
        yield root
        return
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix.lower() in SUPPORTED_SUFFIXES:
            yield path
