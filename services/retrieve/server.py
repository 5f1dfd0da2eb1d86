"""Thin gRPC servicer of the retrieve stage."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hashlib
import logging
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import faiss
import grpc
from opentelemetry import trace

from ragline import vectors
from ragline.errors import InvalidArgument, ResourceExhausted, Unavailable
from ragline.grpc_server import GrpcService, Stage
from ragline.v1 import retrieve_pb2, retrieve_pb2_grpc
from services.retrieve.hybrid import SearchMode, search_mode
from services.retrieve.index import IndexPolicy, index_kind
from services.retrieve.knowledge_base import Hit, IndexConfig, KnowledgeBase
from services.retrieve.settings import RetrieveSettings
from services.retrieve.store import (
    CollectionInfo,
    Condition,
    DocumentIn,
    PassageIn,
    PassageStore,
    StoredDocument,
)

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)
SERVICE_NAME = "ragline.v1.Retrieve"
METRIC = retrieve_pb2.METRIC_INNER_PRODUCT
# Requests allowed to wait for a worker thread, per worker; past that the caller is told at
# once to back off (RESOURCE_EXHAUSTED) instead of queueing into its deadline.
PENDING_PER_WORKER = 64

T = TypeVar("T")


# Index kinds by proto enum value, read off the enum's names (INDEX_KIND_HNSW: "hnsw"): a kind
# added to the proto without one in the registry fails here, at import.
KIND_BY_PB = {
    number: index_kind(name.removeprefix("INDEX_KIND_").lower())
    for name, number in retrieve_pb2.IndexKind.items()
}
PB_BY_KIND = {kind: number for number, kind in KIND_BY_PB.items()}
# Search modes likewise (SEARCH_MODE_HYBRID: "hybrid"); UNSPECIFIED is None, the default.
MODE_BY_PB: dict[int, SearchMode | None] = {
    number: search_mode(name.removeprefix("SEARCH_MODE_").lower()) if number else None
    for name, number in retrieve_pb2.SearchMode.items()
}
PB_BY_MODE = {mode: number for number, mode in MODE_BY_PB.items() if mode is not None}


def mode_from_pb(number: int, field: str) -> SearchMode | None:
    if number not in MODE_BY_PB:
        raise InvalidArgument(
            f"{field} {number} is unknown: use one of " + ", ".join(retrieve_pb2.SearchMode.keys())
        )
    return MODE_BY_PB[number]


def policy_from_pb(pb: retrieve_pb2.IndexPolicy) -> dict:
    """The fields a request set (zero fields take the server's defaults)."""
    if pb.kind not in KIND_BY_PB:
        raise InvalidArgument(
            f"index_policy.kind {pb.kind} is unknown: use one of "
            + ", ".join(retrieve_pb2.IndexKind.keys())
        )
    return {
        "kind": KIND_BY_PB[pb.kind].name if pb.kind else None,
        "threshold": pb.threshold,
        "hnsw_m": pb.hnsw_m,
        "ef_construction": pb.ef_construction,
        "ivf_nlist": pb.ivf_nlist,
    }


def policy_pb(policy: IndexPolicy) -> retrieve_pb2.IndexPolicy:
    return retrieve_pb2.IndexPolicy(
        kind=PB_BY_KIND[policy.kind],
        threshold=policy.threshold,
        hnsw_m=policy.hnsw_m,
        ef_construction=policy.ef_construction,
        ivf_nlist=policy.ivf_nlist,
    )


def conditions_from_pb(pb: retrieve_pb2.Filter) -> list[Condition]:
    out = []
    for i, c in enumerate(pb.must):
        which = c.WhichOneof("match")
        if which is None:
            raise InvalidArgument(
                f"filter condition {i} on {c.key!r} has no value: set `equals` or `any_of`"
            )
        values = (c.equals,) if which == "equals" else tuple(c.any_of.values)
        out.append(Condition(c.key, values))
    return out


def _collection_pb(
    info: CollectionInfo, kb: KnowledgeBase, count: int = 0, documents: int = 0
) -> retrieve_pb2.Collection:
    return retrieve_pb2.Collection(
        name=info.name,
        dimension=info.dimension,
        metric=METRIC,
        index_type=kb.index_type(info.name),
        index_policy=policy_pb(kb.policy(info)),
        search_mode=PB_BY_MODE[kb.search_mode(info)],
        version=info.version,
        last_write_unix_ms=info.last_write_ms,
        count=count,
        documents=documents,
    )


def _document_pb(d: StoredDocument) -> retrieve_pb2.Document:
    return retrieve_pb2.Document(
        document_id=d.document_id,
        content_hash=d.content_hash,
        chunks=d.chunks,
        updated_unix_ms=d.updated_ms,
        metadata=d.metadata,
    )


def _hit_pb(hit: Hit) -> retrieve_pb2.Hit:
    p = hit.passage
    return retrieve_pb2.Hit(
        id=p.id,
        score=hit.score,
        text=p.text,
        metadata=p.metadata,
        document_id=p.document_id,
        chunk=p.chunk,
        rrf_score=hit.rrf_score,
        bm25_score=hit.bm25_score,
    )


def _check_bytes(data: bytes, dimension: int, what: str, collection: str) -> None:
    # Checked before unpacking so the message names both dimensions, not just a byte count.
    if len(data) != 4 * dimension:
        got = f"dimension {len(data) / 4:g}" if len(data) % 4 == 0 else f"{len(data)} bytes"
        raise InvalidArgument(
            f"{what} has {got}; collection {collection!r} expects dimension {dimension} "
            f"({4 * dimension} bytes of little-endian float32)"
        )


class RetrieveServicer(retrieve_pb2_grpc.RetrieveServicer):
    """Validates, runs the KnowledgeBase in a bounded thread pool, maps results to protobuf."""

    def __init__(self, kb: KnowledgeBase, settings: RetrieveSettings) -> None:
        self.kb = kb
        self.settings = settings
        # One OpenMP thread per search: a single query gains nothing from more, and idle OpenMP
        # threads spinning beside the other worker and the event loop slow every search down
        # (docs/decisions/0003).
        self.executor = ThreadPoolExecutor(
            settings.workers,
            thread_name_prefix="retrieve",
            initializer=faiss.omp_set_num_threads,
            initargs=(1,),
        )
        self.max_pending = settings.workers * PENDING_PER_WORKER
        self.pending = 0

    async def _run(self, fn: Callable[..., T], *args) -> T:
        """Run blocking SQLite/FAISS work in the pool, with the caller's trace context."""
        if not self.kb.loaded:
            raise Unavailable("retrieve is still loading its indexes; retry once it is SERVING")
        if self.pending >= self.max_pending:
            raise ResourceExhausted(
                f"retrieve is overloaded ({self.pending} requests waiting for "
                f"{self.settings.workers} workers); retry with backoff or add a read replica"
            )
        ctx = contextvars.copy_context()
        self.pending += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.executor, functools.partial(ctx.run, fn, *args))
        finally:
            self.pending -= 1

    async def CreateCollection(self, request, context):
        if request.metric not in (retrieve_pb2.METRIC_UNSPECIFIED, METRIC):
            raise InvalidArgument("metric must be METRIC_INNER_PRODUCT (vectors are normalised)")
        policy = policy_from_pb(request.index_policy)
        mode = mode_from_pb(request.search_mode, "search_mode")
        info = await self._run(
            self.kb.create_collection,
            request.name,
            request.dimension,
            request.exist_ok,
            policy,
            mode,
        )
        return _collection_pb(info, self.kb)

    async def ListCollections(self, request, context):
        if request.with_counts:
            stats = await self._run(self.kb.store.list_collection_stats)
            collections = [_collection_pb(s.info, self.kb, s.count, s.documents) for s in stats]
        else:
            infos = await self._run(self.kb.store.list_collections)
            collections = [_collection_pb(i, self.kb) for i in infos]
        return retrieve_pb2.ListCollectionsResponse(collections=collections)

    async def DeleteCollection(self, request, context):
        deleted = await self._run(self.kb.delete_collection, request.name)
        return retrieve_pb2.DeleteCollectionResponse(deleted=deleted)

    async def Upsert(self, request, context):
        if not request.passages and not request.documents:
            raise InvalidArgument("passages is empty: send at least one passage")
        limit = self.settings.max_passages_per_upsert
        if len(request.passages) > limit:
            raise InvalidArgument(
                f"{len(request.passages)} passages in one upsert; the limit is {limit} "
                "(RAGLINE_RETRIEVE_MAX_PASSAGES_PER_UPSERT): split it"
            )
        with tracer.start_as_current_span("retrieve.upsert") as span:
            span.set_attribute("ragline.collection", request.collection)
            span.set_attribute("ragline.passages", len(request.passages))
            span.set_attribute("ragline.documents", len(request.documents))
            span.set_attribute("ragline.index_type", self.kb.index_type(request.collection))
            result = await self._run(self._upsert, request)
            span.set_attribute("ragline.removed", result.removed)
        return retrieve_pb2.UpsertResponse(
            upserted=result.upserted, removed=result.removed, count=result.count
        )

    def _upsert(self, request: retrieve_pb2.UpsertRequest):
        dimension = self.kb.dimension(request.collection)
        passages = []
        for p in request.passages:
            what = f"vector of passage {p.id!r}"
            _check_bytes(p.vector, dimension, what, request.collection)
            passages.append(
                PassageIn(
                    id=p.id,
                    document_id=p.document_id,
                    chunk=p.chunk,
                    text=p.text,
                    metadata=dict(p.metadata),
                    vector=vectors.unpack(p.vector, dimension, what=what)[0],
                )
            )
        documents = [DocumentIn(d.document_id, d.content_hash, d.chunks) for d in request.documents]
        return self.kb.upsert(request.collection, passages, documents)

    async def Delete(self, request, context):
        if not request.ids and not request.document_ids:
            raise InvalidArgument("nothing to delete: give ids and/or document_ids")
        result = await self._run(
            self.kb.delete, request.collection, list(request.ids), list(request.document_ids)
        )
        return retrieve_pb2.DeleteResponse(deleted=result.removed, count=result.count)

    async def Search(self, request, context):
        if not 1 <= request.top_k <= self.settings.max_top_k:
            raise InvalidArgument(
                f"top_k must be between 1 and {self.settings.max_top_k}, got {request.top_k}"
            )
        conditions = conditions_from_pb(request.filter)
        mode = mode_from_pb(request.mode, "mode")
        with tracer.start_as_current_span("retrieve.search") as span:
            span.set_attribute("ragline.collection", request.collection)
            span.set_attribute("ragline.top_k", request.top_k)
            span.set_attribute("ragline.filtered", bool(conditions))
            result = await self._run(self._search, request, conditions, mode)
            span.set_attribute("ragline.index_type", result.index_type)
            span.set_attribute("ragline.strategy", result.strategy)
            span.set_attribute("ragline.hits", len(result.hits))
        return retrieve_pb2.SearchResponse(
            hits=[_hit_pb(h) for h in result.hits],
            index_type=result.index_type,
            strategy=result.strategy,
            version=result.version,
        )

    def _search(
        self,
        request: retrieve_pb2.SearchRequest,
        conditions: list[Condition],
        mode: SearchMode | None,
    ):
        query = None
        if request.vector:  # empty: none sent (sparse)
            dimension = self.kb.dimension(request.collection)
            _check_bytes(request.vector, dimension, "query vector", request.collection)
            query = vectors.unpack(request.vector, dimension, what="query vector")
        return self.kb.search(
            request.collection,
            query,
            request.top_k,
            conditions,
            ef_search=request.ef_search,
            nprobe=request.nprobe,
            text=request.query_text,
            mode=mode,
        )

    async def GetDocuments(self, request, context):
        docs = await self._run(
            self.kb.store.describe_documents, request.collection, list(request.document_ids)
        )
        return retrieve_pb2.GetDocumentsResponse(documents=[_document_pb(d) for d in docs])

    async def ListDocuments(self, request, context):
        docs, next_after = await self._run(
            self.kb.store.list_documents, request.collection, request.limit, request.after
        )
        return retrieve_pb2.ListDocumentsResponse(
            documents=[_document_pb(d) for d in docs], next_after=next_after
        )

    async def Stats(self, request, context):
        stats = await self._run(self.kb.store.stats, request.collection)
        info = stats.info
        return retrieve_pb2.CollectionStats(
            name=info.name,
            count=stats.count,
            dimension=info.dimension,
            index_type=self.kb.index_type(info.name),
            metric=METRIC,
            documents=stats.documents,
            last_write_unix_ms=info.last_write_ms,
            indexed=self.kb.indexed(info.name),
            index_policy=policy_pb(self.kb.policy(info)),
            version=info.version,
            indexed_version=self.kb.indexed_version(info.name),
            rebuilding=self.kb.rebuilding(info.name),
        )


def index_config(settings: RetrieveSettings) -> IndexConfig:
    policy = IndexPolicy(
        kind=index_kind(settings.index_kind),
        threshold=settings.index_threshold,
        hnsw_m=settings.hnsw_m,
        ef_construction=settings.ef_construction,
        ivf_nlist=settings.ivf_nlist,
    )
    return IndexConfig(
        policy=policy,
        ef_search=settings.ef_search,
        max_ef_search=max(settings.max_ef_search, settings.ef_search),
        nprobe=settings.nprobe,
        max_nprobe=max(settings.max_nprobe, settings.nprobe),
        rebuild_fraction=settings.rebuild_fraction,
        min_rebuild=settings.rebuild_min_changes,
        filter_exact_limit=settings.filter_exact_limit,
        build_threads=settings.build_threads,
        snapshot_dir=snapshot_dir(settings) if settings.snapshots else None,
        search_mode=search_mode(settings.default_search_mode),
    )


class RetrieveStage(Stage):
    """The retrieve stage: warm-up loads every index from SQLite; a read-only replica follows
    the writer's database in the background; close releases the indexes, threads and store."""

    service_name = SERVICE_NAME

    def __init__(self, store: PassageStore, kb: KnowledgeBase, settings: RetrieveSettings) -> None:
        self.store = store
        self.kb = kb
        self.settings = settings
        self.servicer = RetrieveServicer(kb, settings)

    def register(self, server: grpc.aio.Server) -> None:
        retrieve_pb2_grpc.add_RetrieveServicer_to_server(self.servicer, server)

    async def warmup(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.servicer.executor, self.kb.refresh)
        log.info("retrieve ready at %s: collections %s", self.store.path, self.kb.describe())

    def background(self) -> list[Coroutine[Any, Any, None]]:
        return [self.follow_writer()] if self.settings.read_only or self.store.shared else []

    async def follow_writer(self) -> None:
        """Catch up with writes made elsewhere: every ``refresh_s``, and at once when the store
        says one committed (PostgreSQL's NOTIFY)."""
        while True:
            try:
                if self.store.shared:
                    await asyncio.to_thread(self.store.wait_for_change, self.settings.refresh_s)
                else:
                    await asyncio.sleep(self.settings.refresh_s)
            except Exception:  # never stop following: poll at the next tick
                log.exception("waiting for changes failed")
                await asyncio.sleep(self.settings.refresh_s)
            try:
                changed = await self.servicer._run(self.kb.refresh)
            except Exception:  # a failed look is retried at the next tick
                log.exception("refresh from the writer's database failed")
                continue
            if changed:
                log.info("picked up the writer's changes to %s", ", ".join(changed))

    async def close(self) -> None:
        # In-flight work finishes before the database closes; a background build is abandoned
        # (its snapshot, if written, is whole; the next start catches up from the log).
        self.kb.close()
        await asyncio.to_thread(self.servicer.executor.shutdown, wait=True)
        self.store.close()


def snapshot_dir(settings: RetrieveSettings) -> Path:
    """Where this replica saves its built indexes. On the postgres store, a folder per database
    and shard: a data directory reused with another database or ``--shard`` never loads an
    index of other passages."""
    if settings.store != "postgres":
        return settings.data_dir / "snapshots"
    from services.retrieve.pgstore import safe_dsn

    digest = hashlib.blake2b(safe_dsn(settings.postgres_dsn).encode(), digest_size=6).hexdigest()
    shard = f"shard-{settings.shard}-of-{settings.shards}"
    return settings.data_dir / "snapshots" / f"pg-{digest}-{shard}"


def open_store(settings: RetrieveSettings) -> PassageStore:
    """The store the settings name: SQLite in ``data_dir``, or the shared PostgreSQL one."""
    if settings.store == "postgres":
        from services.retrieve.pgstore import PostgresStore

        return PostgresStore(settings.postgres_dsn, log_keep=settings.change_log_size,
                             start_wait_s=settings.postgres_start_wait_s,
                             shard=(settings.shard, settings.shards))  # fmt: skip
    return PassageStore(settings.data_dir, log_keep=settings.change_log_size)


def build(settings: RetrieveSettings) -> GrpcService[RetrieveStage]:
    """The (not yet started) retrieve service; its warm-up loads every index from SQLite."""
    # Opening the store here fails fast on an unusable data dir; loading the vectors waits for
    # warmup, so health reports NOT_SERVING while it runs.
    store = open_store(settings)
    kb = KnowledgeBase(
        store,
        max_top_k=settings.max_top_k,
        read_only=settings.read_only,
        load=False,
        config=index_config(settings),
    )
    return GrpcService.from_settings(settings, RetrieveStage(store, kb, settings))
