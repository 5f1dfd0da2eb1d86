"""Ingestion: chunk documents, embed them as PASSAGE in batches, upsert them by stable id.

Shared by ``POST /documents`` (and ``/collections/{name}/documents``) on the edge and
``ragline ingest PATH``. A document's content hash (of its text and the chunking policy) is
recorded by retrieve; re-ingesting an unchanged document is skipped, and a changed one replaces
its chunks in one upsert. ``Ingestor.sync`` also deletes the documents whose files are gone.
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
from ragline.errors import InvalidArgument, NotFound, StageError
from ragline.types import DocumentRecord, InputKind, Passage
from services.api.schemas import blank

tracer = trace.get_tracer(__name__)
MAX_DOCUMENT_ID = 200
DELETE_BATCH = 100  # document ids per Delete call of a sync


@dataclass(frozen=True)
class IngestResult:
    document_id: str
    status: str  # "ingested" | "unchanged" | "deleted" (a sync's documents whose files went)
    chunks: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def unknown_collection(exc: StageError, collection: str) -> StageError | NotFound:
    """Retrieve's NOT_FOUND for a collection, said in the edge's terms."""
    if exc.grpc_code == "NOT_FOUND" and "collection" in exc.message:
        return NotFound(
            f"collection {collection!r} does not exist: create it with POST /collections "
            "(GET /collections lists them)"
        )
    return exc


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
    """Turns documents into passages in a collection of the retrieve stage (``collection``
    unless a call names another)."""

    def __init__(
        self,
        embed: EmbedStageClient,
        retrieve: RetrieveStageClient,
        collection: str,
        policy: ChunkingPolicy | None = None,
        timeout_s: float = 120.0,
    ) -> None:
        self.embed = embed
        self.retrieve = retrieve
        self.collection = collection
        self.policy = policy or ChunkingPolicy()
        self.timeout_s = timeout_s
        self._ready: set[str] = set()  # collections known to exist

    async def ensure_collection(self, collection: str | None = None) -> None:
        collection = collection or self.collection
        if collection in self._ready:
            return
        info = await self.embed.info(timeout=self.timeout_s)
        await self.retrieve.create_collection(
            collection, info.dimension, exist_ok=True, timeout=self.timeout_s
        )
        self._ready.add(collection)

    def forget(self, collection: str) -> None:
        """The collection was deleted: the next ingest into it creates it again."""
        self._ready.discard(collection)

    async def ingest_text(
        self,
        document_id: str,
        text: str,
        metadata: dict[str, str] | None = None,
        *,
        collection: str | None = None,
        create: bool = True,
    ) -> IngestResult:
        """``create`` False: a collection that does not exist is ``NotFound``."""
        collection = collection or self.collection
        document_id = check_document_id(document_id)
        if blank(text):
            raise InvalidArgument(f"document {document_id!r} has no text to ingest")
        metadata = document_metadata(document_id, text, metadata)
        digest = content_hash(text, self.policy, metadata)
        with tracer.start_as_current_span("ingest.document") as span:
            span.set_attribute("ragline.document_id", document_id)
            known = await self._known(collection, document_id, create)
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
            # The embed client sends as many calls as the stage's batch limit needs.
            embedded = await self.embed.embed(
                [c.text for c in chunks], InputKind.PASSAGE, truncate=True, timeout=self.timeout_s
            )
            passages = [
                Passage(f"{document_id}#{chunk.index}", document_id, chunk.index, chunk.text, vec,
                        chunk_metadata(metadata, chunk))
                for chunk, vec in zip(chunks, embedded.vectors, strict=True)
            ]  # fmt: skip
            await self.retrieve.upsert(
                collection,
                passages,
                [DocumentRecord(document_id, digest, len(passages))],
                timeout=self.timeout_s,
            )
            span.set_attribute("ragline.chunks", len(passages))
            return IngestResult(document_id, "ingested", len(passages))

    async def _known(
        self, collection: str, document_id: str, create: bool
    ) -> dict[str, DocumentRecord]:
        """The document's recorded version, if any; the collection made first when ``create``."""
        if create:
            await self.ensure_collection(collection)
        try:
            return await self.retrieve.get_documents(
                collection, [document_id], timeout=self.timeout_s
            )
        except StageError as exc:
            if not (create and exc.grpc_code == "NOT_FOUND"):
                raise unknown_collection(exc, collection) from None
        # Deleted since this ingestor made it (by another edge or process): make it again.
        self.forget(collection)
        await self.ensure_collection(collection)
        return await self.retrieve.get_documents(collection, [document_id], timeout=self.timeout_s)

    async def _count_tokens(self, texts: list[str]) -> tuple[list[int], int]:
        return await self.embed.count_tokens(texts, InputKind.PASSAGE, timeout=self.timeout_s)

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

    async def sync(
        self,
        root: Path,
        on_progress: Callable[[int, int, IngestResult], None] | None = None,
    ) -> list[IngestResult]:
        """``ingest_paths`` of a folder, then delete the collection's documents that no file
        under it has any more (their ids are paths relative to it), reported as "deleted"."""
        if not root.is_dir():
            raise InvalidArgument(f"sync needs a folder (it deletes what is not in it): {root}")
        results = await self.ingest_paths(root, on_progress)
        present = {r.document_id for r in results}
        gone: dict[str, int] = {}  # document id -> its chunks
        after = ""
        while True:
            page, after = await self.retrieve.list_documents(
                self.collection, 1000, after, timeout=self.timeout_s
            )
            gone |= {d.document_id: d.chunks for d in page if d.document_id not in present}
            if not after:
                break
        ids = list(gone)
        for start in range(0, len(ids), DELETE_BATCH):
            await self.retrieve.delete(
                self.collection, document_ids=ids[start : start + DELETE_BATCH],
                timeout=self.timeout_s,
            )  # fmt: skip
        return results + [IngestResult(doc, "deleted", n) for doc, n in gone.items()]


class Documents:
    """The edge's document writes: decode, ingest, and make this edge's answer cache stale at
    once (other edges see the new knowledge-base version within their poll period)."""

    def __init__(self, ingestor: Ingestor, kb_version) -> None:
        self.ingestor = ingestor
        self.kb_version = kb_version

    async def add_text(
        self,
        document_id: str | None,
        text: str,
        metadata: dict[str, str] | None = None,
        *,
        collection: str | None = None,
    ) -> IngestResult:
        """No ``document_id``: one made from the text, so re-sending it is idempotent. No
        ``collection``: the edge's own, created when missing; one that is named must exist."""
        if not document_id:
            document_id = "text-" + hashlib.sha256(text.encode()).hexdigest()[:16]
        result = await self.ingestor.ingest_text(
            document_id, text, metadata, collection=collection, create=collection is None
        )
        if result.status == "ingested":
            await self.kb_version.refresh()
        return result

    async def add_file(
        self,
        data: bytes,
        name: str,
        document_id: str | None = None,
        *,
        collection: str | None = None,
    ) -> IngestResult:
        # PDF parsing is CPU work: off the event loop.
        text = await asyncio.to_thread(decode_document, data, name)
        return await self.add_text(document_id or name, text, collection=collection)

    async def delete(self, collection: str, document_id: str) -> int:
        """Every passage of the document, and its record; ``NotFound`` when there is none.
        Returns the passages deleted."""
        try:
            done = await self.ingestor.retrieve.delete(
                collection, document_ids=[document_id], timeout=self.ingestor.timeout_s
            )
        except StageError as exc:
            raise unknown_collection(exc, collection) from None
        if not done.changed:
            raise NotFound(
                f"collection {collection!r} has no document {document_id!r} "
                f"(GET /collections/{collection}/documents lists them)"
            )
        await self.kb_version.refresh()
        return done.changed
