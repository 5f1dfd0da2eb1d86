"""Thin gRPC servicer of the retrieve stage."""

from __future__ import annotations

import asyncio
import functools
import logging
from concurrent.futures import ThreadPoolExecutor

from opentelemetry import trace

from ragline import vectors
from ragline.errors import InvalidArgument
from ragline.grpc_server import GrpcService
from ragline.v1 import retrieve_pb2, retrieve_pb2_grpc
from services.retrieve.knowledge_base import KnowledgeBase
from services.retrieve.settings import RetrieveSettings
from services.retrieve.store import CollectionInfo, DocumentIn, PassageIn, PassageStore

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)
SERVICE_NAME = "ragline.v1.Retrieve"
METRIC = retrieve_pb2.METRIC_INNER_PRODUCT


def _collection_pb(info: CollectionInfo, index_type: str) -> retrieve_pb2.Collection:
    return retrieve_pb2.Collection(
        name=info.name, dimension=info.dimension, metric=METRIC, index_type=index_type
    )


class RetrieveServicer(retrieve_pb2_grpc.RetrieveServicer):
    def __init__(self, kb: KnowledgeBase, settings: RetrieveSettings) -> None:
        self.kb = kb
        self.settings = settings
        self.executor = ThreadPoolExecutor(settings.workers, thread_name_prefix="retrieve")

    async def _run(self, fn, *args):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args))

    async def CreateCollection(self, request, context):
        if request.metric not in (retrieve_pb2.METRIC_UNSPECIFIED, METRIC):
            raise InvalidArgument("metric must be METRIC_INNER_PRODUCT (vectors are normalised)")
        info = await self._run(
            self.kb.create_collection, request.name, request.dimension, request.exist_ok
        )
        return _collection_pb(info, self.kb.index_type(info.name))

    async def ListCollections(self, request, context):
        infos = await self._run(self.kb.store.list_collections)
        return retrieve_pb2.ListCollectionsResponse(
            collections=[_collection_pb(i, self.kb.index_type(i.name)) for i in infos]
        )

    async def DeleteCollection(self, request, context):
        deleted = await self._run(self.kb.delete_collection, request.name)
        return retrieve_pb2.DeleteCollectionResponse(deleted=deleted)

    async def Upsert(self, request, context):
        if not request.passages and not request.documents:
            raise InvalidArgument("passages is empty: send at least one passage")
        if len(request.passages) > self.settings.max_passages_per_upsert:
            raise InvalidArgument(
                f"{len(request.passages)} passages in one upsert; the limit is "
                f"{self.settings.max_passages_per_upsert}: split it"
            )
        info = await self._run(self.kb.store.collection, request.collection)
        passages = [
            PassageIn(
                id=p.id,
                document_id=p.document_id,
                chunk=p.chunk,
                text=p.text,
                metadata=dict(p.metadata),
                vector=_passage_vector(p, info.dimension),
            )
            for p in request.passages
        ]
        documents = [DocumentIn(d.document_id, d.content_hash, d.chunks) for d in request.documents]
        with tracer.start_as_current_span("retrieve.upsert") as span:
            span.set_attribute("ragline.collection", request.collection)
            span.set_attribute("ragline.passages", len(passages))
            result = await self._run(self.kb.upsert, request.collection, passages, documents)
        count = (await self._run(self.kb.store.collection, request.collection)).count
        return retrieve_pb2.UpsertResponse(
            upserted=result.upserted, removed=result.removed, count=count
        )

    async def Delete(self, request, context):
        if not request.ids and not request.document_ids:
            raise InvalidArgument("nothing to delete: give ids and/or document_ids")
        result = await self._run(
            self.kb.delete, request.collection, list(request.ids), list(request.document_ids)
        )
        count = (await self._run(self.kb.store.collection, request.collection)).count
        return retrieve_pb2.DeleteResponse(deleted=result.removed, count=count)

    async def Search(self, request, context):
        if not 1 <= request.top_k <= self.settings.max_top_k:
            raise InvalidArgument(
                f"top_k must be between 1 and {self.settings.max_top_k}, got {request.top_k}"
            )
        info = await self._run(self.kb.store.collection, request.collection)
        if len(request.vector) != 4 * info.dimension:
            raise InvalidArgument(
                f"query vector has {len(request.vector)} bytes; collection "
                f"{request.collection!r} expects dimension {info.dimension} "
                f"({4 * info.dimension} bytes of float32)"
            )
        query = vectors.unpack(request.vector, info.dimension, what="query vector")
        with tracer.start_as_current_span("retrieve.search") as span:
            span.set_attribute("ragline.collection", request.collection)
            span.set_attribute("ragline.top_k", request.top_k)
            span.set_attribute("ragline.index_type", self.kb.index_type(request.collection))
            hits = await self._run(self.kb.search, request.collection, query, request.top_k)
        return retrieve_pb2.SearchResponse(
            hits=[
                retrieve_pb2.Hit(
                    id=h.passage.id,
                    score=h.score,
                    text=h.passage.text,
                    metadata=h.passage.metadata,
                    document_id=h.passage.document_id,
                    chunk=h.passage.chunk,
                )
                for h in hits
            ],
            index_type=self.kb.index_type(request.collection),
        )

    async def GetDocuments(self, request, context):
        docs = await self._run(
            self.kb.store.get_documents, request.collection, list(request.document_ids)
        )
        return retrieve_pb2.GetDocumentsResponse(
            documents=[
                retrieve_pb2.Document(
                    document_id=d.document_id, content_hash=d.content_hash, chunks=d.chunks
                )
                for d in docs
            ]
        )

    async def Stats(self, request, context):
        info = await self._run(self.kb.store.collection, request.collection)
        return retrieve_pb2.CollectionStats(
            name=info.name,
            count=info.count,
            dimension=info.dimension,
            index_type=self.kb.index_type(info.name),
            metric=METRIC,
            documents=info.documents,
            last_write_unix_ms=info.last_write_ms,
            indexed=self.kb.indexed(info.name),
        )


def _passage_vector(passage: retrieve_pb2.Passage, dimension: int):
    if len(passage.vector) != 4 * dimension:
        raise InvalidArgument(
            f"vector of passage {passage.id!r} has {len(passage.vector)} bytes; the collection "
            f"expects dimension {dimension} ({4 * dimension} bytes of float32)"
        )
    return vectors.unpack(passage.vector, dimension, what=f"vector of passage {passage.id!r}")[0]


def build(settings: RetrieveSettings) -> tuple[GrpcService, object]:
    kb = KnowledgeBase(
        PassageStore(settings.data_dir), max_top_k=settings.max_top_k, read_only=settings.read_only
    )
    servicer = RetrieveServicer(kb, settings)
    service = GrpcService.from_settings(
        settings,
        SERVICE_NAME,
        lambda server: retrieve_pb2_grpc.add_RetrieveServicer_to_server(servicer, server),
    )

    async def warmup() -> None:
        if settings.read_only:
            servicer.refresher = asyncio.get_running_loop().create_task(follow_writer())

    async def follow_writer() -> None:
        while True:
            await asyncio.sleep(settings.refresh_s)
            try:
                changed = await servicer._run(kb.refresh)
            except Exception:  # a failed look is retried at the next tick
                log.exception("refresh from the writer's database failed")
                continue
            if changed:
                log.info("picked up the writer's changes to %s", ", ".join(changed))

    return service, warmup
