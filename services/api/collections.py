"""Collections: the edge's knowledge-base management and search, without HTTP.

Collections are created, listed and deleted; a collection's documents are listed, described
and deleted (documents are written through ``Documents`` in ``ingest.py``, the path
``POST /documents`` takes); ``search`` returns passages and scores without generating. Reads
go to retrieve's writer, so a client sees its own writes at once (a read replica lags it by
its refresh period). Every write refreshes the knowledge-base versions the answer cache is
keyed on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from ragline.clients import EmbedStageClient, RetrieveStageClient
from ragline.errors import AlreadyExists, NotFound, StageError
from ragline.types import CollectionSummary, DocumentInfo, Hit
from services.api.cache import KnowledgeVersion
from services.api.ingest import Ingestor, unknown_collection
from services.api.pipeline import ChatPipeline, Where

# Passage metadata that is not the document's own (the heading a chunk sits under).
_PASSAGE_FIELDS = ("heading",)


def collection_dict(c: CollectionSummary, default: str) -> dict[str, object]:
    return {
        "name": c.name,
        "documents": c.documents,
        "passages": c.count,
        "dimension": c.dimension,
        "version": c.version,
        "last_write_at": iso_time(c.last_write_unix_ms),
        "default": c.name == default,
    }


def document_dict(d: DocumentInfo) -> dict[str, object]:
    meta = {k: v for k, v in d.metadata.items() if k not in _PASSAGE_FIELDS}
    return {
        "id": d.document_id,
        "source": meta.get("source", d.document_id),
        "title": meta.get("title", ""),
        "chunks": d.chunks,
        "content_hash": d.content_hash,
        "ingested_at": iso_time(d.updated_unix_ms),
        "metadata": meta,
    }


def search_hit_dict(h: Hit) -> dict[str, object]:
    return {**h.to_dict(), "document_id": h.document_id, "chunk": h.chunk,
            "bm25_score": round(h.bm25_score, 6), "rrf_score": round(h.rrf_score, 6)}  # fmt: skip


def iso_time(unix_ms: int) -> str | None:
    """A unix time in milliseconds as ISO 8601 UTC (None for 0: never)."""
    if not unix_ms:
        return None
    return datetime.fromtimestamp(unix_ms / 1000, UTC).isoformat(timespec="milliseconds")


class Collections:
    def __init__(
        self,
        embed: EmbedStageClient,
        writer: RetrieveStageClient,
        ingestor: Ingestor,
        pipeline: ChatPipeline,
        kb_version: KnowledgeVersion,
        timeout_s: float = 30.0,
    ) -> None:
        self.embed = embed
        self.writer = writer
        self.ingestor = ingestor
        self.pipeline = pipeline
        self.kb_version = kb_version
        self.timeout_s = timeout_s

    @property
    def default(self) -> str:
        return self.pipeline.collection

    async def create(self, name: str) -> dict[str, object]:
        """A new, empty collection for the embed stage's vectors; ``AlreadyExists`` (409) when
        there is one of that name, ``InvalidArgument`` (400) for a bad name."""
        info = await self.embed.info(timeout=self.timeout_s)
        try:
            made = await self.writer.create_collection(
                name, info.dimension, exist_ok=False, timeout=self.timeout_s
            )
        except StageError as exc:
            if exc.grpc_code != "ALREADY_EXISTS":
                raise
            raise AlreadyExists(
                f"collection {name!r} exists already: pick another name, or DELETE "
                f"/collections/{name} first"
            ) from None
        await self.kb_version.refresh()
        return collection_dict(made, self.default)

    async def list(self) -> list[dict[str, object]]:
        listed = await self.writer.list_collections(with_counts=True, timeout=self.timeout_s)
        return [collection_dict(c, self.default) for c in listed]

    async def require(self, name: str) -> None:
        """``NotFound`` unless the collection exists."""
        listed = await self.writer.list_collections(timeout=self.timeout_s)
        if name not in {c.name for c in listed}:
            raise NotFound(
                f"collection {name!r} does not exist: create it with POST /collections "
                "(GET /collections lists them)"
            )

    async def delete(self, name: str) -> None:
        """The collection with every document; ``NotFound`` when there is none."""
        if not await self.writer.delete_collection(name, timeout=self.timeout_s):
            raise NotFound(f"collection {name!r} does not exist (GET /collections lists them)")
        self.ingestor.forget(name)
        await self.kb_version.refresh()

    async def documents(
        self, collection: str, limit: int = 0, after: str = ""
    ) -> tuple[list[dict[str, object]], str]:
        """A page of the collection's documents in id order, and the ``after`` of the next
        page ("" on the last)."""
        try:
            page, next_after = await self.writer.list_documents(
                collection, limit, after, timeout=self.timeout_s
            )
        except StageError as exc:
            raise unknown_collection(exc, collection) from None
        return [document_dict(d) for d in page], next_after

    async def document(self, collection: str, document_id: str) -> dict[str, object]:
        try:
            found = await self.writer.describe_documents(
                collection, [document_id], timeout=self.timeout_s
            )
        except StageError as exc:
            raise unknown_collection(exc, collection) from None
        if document_id not in found:
            raise NotFound(
                f"collection {collection!r} has no document {document_id!r} "
                f"(GET /collections/{collection}/documents lists them)"
            )
        return document_dict(found[document_id])

    async def search(
        self,
        query: str,
        top_k: int,
        *,
        collection: str | None = None,
        where: Where | None = None,
        score_threshold: float | None = None,
        mode: str | None = None,
        history: Sequence[Mapping[str, str]] = (),
        condense: str | None = None,
    ) -> dict[str, object]:
        """Passages above the relevance floor with their scores, best first; no generation.
        With ``history`` the query is condensed as /chat does, and ``search_query`` says what
        was searched."""
        name = collection or self.default
        try:
            hits, timings, searched = await self.pipeline.search(
                query, top_k, score_threshold=score_threshold, mode=mode, collection=name,
                where=where, history=history, condense=condense,
            )  # fmt: skip
        except StageError as exc:
            raise unknown_collection(exc, name) from None
        body = {"collection": name, "passages": [search_hit_dict(h) for h in hits],
                "timings_ms": timings}  # fmt: skip
        return body if searched is None else {**body, "search_query": searched}
