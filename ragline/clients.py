"""Clients of the three gRPC stages: the one place on the client side that touches protobuf.

Two layers:
- ``EmbedClient``, ``RetrieveClient``, ``GenerateClient``: one long-lived channel to one
  address, protobuf in and out, ``grpc.aio.AioRpcError`` on failure (what a test of a stage's
  wire behaviour, or a gRPC benchmark, wants).
- ``EmbedStageClient``, ``RetrieveStageClient``, ``GenerateStageClient``: typed stage clients over a
  ``ReplicaPool`` of those (a single address is a pool of one). They take and return
  ``ragline.types`` values and raise ``ragline.errors.StageError`` carrying the status; this is
  what the edge, ingestion, the CLI and the launcher use.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Generic, Self, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ragline import vectors
from ragline.balancer import PoolPolicy, ReplicaPool
from ragline.errors import InvalidArgument, StageError
from ragline.types import (
    CollectionStats,
    CollectionSummary,
    Completion,
    CompletionChunk,
    DocumentInfo,
    DocumentRecord,
    EmbedderInfo,
    Embeddings,
    GeneratorInfo,
    Hit,
    InputKind,
    Message,
    Passage,
    SamplingParams,
    SearchResult,
    Usage,
    WriteResult,
)
from ragline.v1 import (
    embed_pb2,
    embed_pb2_grpc,
    generate_pb2,
    generate_pb2_grpc,
    retrieve_pb2,
    retrieve_pb2_grpc,
)

C = TypeVar("C")
T = TypeVar("T")
_INPUT_KIND = {kind: embed_pb2.InputKind.Value(f"INPUT_KIND_{kind.name}") for kind in InputKind}
# Read off the enum (SEARCH_MODE_HYBRID: "hybrid"), so a new mode needs no edit here.
_SEARCH_MODE = {
    name.removeprefix("SEARCH_MODE_").lower(): number
    for name, number in retrieve_pb2.SearchMode.items()
    if number
}


def grpc_target(address: str) -> str:
    """A gRPC target for one ``host:port``, a comma-separated list of ``ip:port`` replicas, or a
    ``dns:///name:port`` whose name resolves to every replica (a headless Service)."""
    parts = [p.strip() for p in address.split(",") if p.strip()]
    if len(parts) > 1:
        return "ipv4:" + ",".join(parts)
    return parts[0] if parts else address


def make_channel(address: str, max_message_mb: int = 16) -> grpc.aio.Channel:
    """One long-lived channel; several replicas behind it are used round robin."""
    from ragline import tls
    from ragline.telemetry import grpc_client_interceptors

    max_bytes = max_message_mb * 1024 * 1024
    return tls.channel(
        grpc_target(address),
        interceptors=grpc_client_interceptors(),
        options=[
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", max_bytes),
            ("grpc.enable_retries", 0),
            ("grpc.lb_policy_name", "round_robin"),
        ],
    )


async def wait_for_serving(address: str, service: str = "", timeout: float = 120.0) -> None:
    """Poll ``grpc.health.v1`` until ``service`` is SERVING or ``timeout`` passes."""
    from ragline import tls

    deadline = time.monotonic() + timeout
    async with tls.channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        last: object = None
        while time.monotonic() < deadline:
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            except grpc.aio.AioRpcError as exc:
                last = exc.code().name
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{address} ({service or 'server'}) not SERVING after {timeout}s: {last}")


class _Client:
    def __init__(self, address: str, max_message_mb: int = 16) -> None:
        self.address = address
        self.channel = make_channel(address, max_message_mb)

    async def serving(self, service: str = "", timeout: float | None = None) -> bool:
        """Whether ``grpc.health.v1`` says SERVING (unreachable: False)."""
        try:
            resp = await health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.aio.AioRpcError:
            return False
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        await self.channel.close()


class EmbedClient(_Client):
    def __init__(self, address: str, max_message_mb: int = 16) -> None:
        super().__init__(address, max_message_mb)
        self.stub = embed_pb2_grpc.EmbedStub(self.channel)

    async def embed(
        self,
        texts: Sequence[str],
        kind: int | InputKind = embed_pb2.INPUT_KIND_PASSAGE,
        truncate: bool = True,
        timeout: float | None = None,
    ) -> tuple[np.ndarray, embed_pb2.EmbedResponse]:
        if isinstance(kind, InputKind):
            kind = _INPUT_KIND[kind]
        resp = await self.stub.Embed(
            embed_pb2.EmbedRequest(texts=list(texts), kind=kind, truncate=truncate),
            timeout=timeout,
        )
        return vectors.unpack(resp.vectors, resp.dimension, what="embedding"), resp

    async def info(self, timeout: float | None = None) -> embed_pb2.EmbedInfo:
        return await self.stub.Info(embed_pb2.EmbedInfoRequest(), timeout=timeout)

    async def tokenize(
        self,
        texts: Sequence[str],
        kind: int | InputKind = embed_pb2.INPUT_KIND_PASSAGE,
        timeout: float | None = None,
    ) -> embed_pb2.TokenizeResponse:
        if isinstance(kind, InputKind):
            kind = _INPUT_KIND[kind]
        return await self.stub.Tokenize(
            embed_pb2.TokenizeRequest(texts=list(texts), kind=kind), timeout=timeout
        )


def search_filter(where: Mapping[str, str | Sequence[str]]) -> retrieve_pb2.Filter:
    conditions = []
    for key, value in where.items():
        if isinstance(value, str):
            conditions.append(retrieve_pb2.FieldCondition(key=key, equals=value))
        else:
            values = retrieve_pb2.StringList(values=list(value))
            conditions.append(retrieve_pb2.FieldCondition(key=key, any_of=values))
    return retrieve_pb2.Filter(must=conditions)


class RetrieveClient(_Client):
    def __init__(self, address: str, max_message_mb: int = 16) -> None:
        super().__init__(address, max_message_mb)
        self.stub = retrieve_pb2_grpc.RetrieveStub(self.channel)

    async def search(
        self,
        collection: str,
        vector: np.ndarray | None,
        top_k: int,
        timeout: float | None = None,
        *,
        where: Mapping[str, str | Sequence[str]] | None = None,
        ef_search: int = 0,
        nprobe: int = 0,
        text: str = "",
        mode: str = "",
    ) -> retrieve_pb2.SearchResponse:
        """``where``: metadata field -> value (equals) or list of values (any of), all must hold.
        ``text``: the question (sparse and hybrid); ``vector`` None: none (sparse). ``mode``:
        "dense", "sparse" or "hybrid"; "" is the collection's default."""
        if mode and mode not in _SEARCH_MODE:
            raise InvalidArgument(
                f"mode must be one of {', '.join(_SEARCH_MODE)} or '', got {mode!r}"
            )
        return await self.stub.Search(
            retrieve_pb2.SearchRequest(
                collection=collection,
                vector=vectors.pack(vector) if vector is not None else b"",
                top_k=top_k,
                filter=search_filter(where or {}),
                ef_search=ef_search,
                nprobe=nprobe,
                query_text=text,
                mode=_SEARCH_MODE.get(mode, retrieve_pb2.SEARCH_MODE_UNSPECIFIED),
            ),
            timeout=timeout,
        )

    async def upsert(
        self,
        collection: str,
        passages: Sequence[retrieve_pb2.Passage],
        documents: Sequence[retrieve_pb2.Document] = (),
        timeout: float | None = None,
    ) -> retrieve_pb2.UpsertResponse:
        return await self.stub.Upsert(
            retrieve_pb2.UpsertRequest(
                collection=collection, passages=list(passages), documents=list(documents)
            ),
            timeout=timeout,
        )

    async def delete(
        self,
        collection: str,
        ids: Sequence[str] = (),
        document_ids: Sequence[str] = (),
        timeout: float | None = None,
    ) -> retrieve_pb2.DeleteResponse:
        return await self.stub.Delete(
            retrieve_pb2.DeleteRequest(
                collection=collection, ids=list(ids), document_ids=list(document_ids)
            ),
            timeout=timeout,
        )

    async def get_documents(
        self, collection: str, document_ids: Sequence[str], timeout: float | None = None
    ) -> dict[str, retrieve_pb2.Document]:
        resp = await self.stub.GetDocuments(
            retrieve_pb2.GetDocumentsRequest(
                collection=collection, document_ids=list(document_ids)
            ),
            timeout=timeout,
        )
        return {d.document_id: d for d in resp.documents}

    async def create_collection(
        self,
        name: str,
        dimension: int,
        exist_ok: bool = True,
        timeout: float | None = None,
        index_policy: retrieve_pb2.IndexPolicy | None = None,
    ) -> retrieve_pb2.Collection:
        return await self.stub.CreateCollection(
            retrieve_pb2.CreateCollectionRequest(
                name=name, dimension=dimension, exist_ok=exist_ok, index_policy=index_policy
            ),
            timeout=timeout,
        )

    async def stats(self, collection: str, timeout: float | None = None):
        return await self.stub.Stats(
            retrieve_pb2.StatsRequest(collection=collection), timeout=timeout
        )

    async def list_collections(
        self, with_counts: bool = False, timeout: float | None = None
    ) -> retrieve_pb2.ListCollectionsResponse:
        return await self.stub.ListCollections(
            retrieve_pb2.ListCollectionsRequest(with_counts=with_counts), timeout=timeout
        )

    async def delete_collection(
        self, name: str, timeout: float | None = None
    ) -> retrieve_pb2.DeleteCollectionResponse:
        return await self.stub.DeleteCollection(
            retrieve_pb2.DeleteCollectionRequest(name=name), timeout=timeout
        )

    async def list_documents(
        self, collection: str, limit: int = 0, after: str = "", timeout: float | None = None
    ) -> retrieve_pb2.ListDocumentsResponse:
        return await self.stub.ListDocuments(
            retrieve_pb2.ListDocumentsRequest(collection=collection, limit=limit, after=after),
            timeout=timeout,
        )


def sampling_params(
    max_tokens: int = 0,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
) -> generate_pb2.SamplingParams:
    params = generate_pb2.SamplingParams(max_tokens=max_tokens, stop=list(stop))
    if temperature is not None:
        params.temperature = temperature
    if top_p is not None:
        params.top_p = top_p
    if seed is not None:
        params.seed = seed
    return params


class GenerateClient(_Client):
    def __init__(self, address: str, max_message_mb: int = 16) -> None:
        super().__init__(address, max_message_mb)
        self.stub = generate_pb2_grpc.GenerateStub(self.channel)

    @staticmethod
    def request(
        messages: Sequence[Mapping[str, str]], params: generate_pb2.SamplingParams | None = None
    ) -> generate_pb2.GenerateRequest:
        return generate_pb2.GenerateRequest(
            messages=[
                generate_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages
            ],
            params=params or generate_pb2.SamplingParams(),
        )

    async def generate(
        self, request: generate_pb2.GenerateRequest, timeout: float | None = None
    ) -> generate_pb2.GenerateResponse:
        return await self.stub.Generate(request, timeout=timeout)

    async def stream(
        self, request: generate_pb2.GenerateRequest, timeout: float | None = None
    ) -> AsyncIterator[generate_pb2.GenerateChunk]:
        call = self.stub.GenerateStream(request, timeout=timeout)
        try:
            async for chunk in call:
                yield chunk
        finally:
            call.cancel()

    async def info(self, timeout: float | None = None) -> generate_pb2.GenerateInfo:
        return await self.stub.Info(generate_pb2.GenerateInfoRequest(), timeout=timeout)


# --- typed stage clients over replica pools ---------------------------------------------------


def _stage_error(stage: str, exc: grpc.aio.AioRpcError) -> StageError:
    return StageError(stage, exc.code().name, exc.details() or exc.code().name)


def _finish_name(reason: int) -> str:
    return generate_pb2.FinishReason.Name(reason).removeprefix("FINISH_REASON_").lower()


def _usage(pb: generate_pb2.Usage) -> Usage:
    return Usage(pb.prompt_tokens, pb.completion_tokens, pb.cached_prompt_tokens)


def _hit(pb: retrieve_pb2.Hit) -> Hit:
    return Hit(
        id=pb.id,
        score=float(pb.score),
        text=pb.text,
        metadata=dict(pb.metadata),
        document_id=pb.document_id,
        chunk=pb.chunk,
        rrf_score=pb.rrf_score,
        bm25_score=pb.bm25_score,
    )


def _document_info(pb: retrieve_pb2.Document) -> DocumentInfo:
    return DocumentInfo(pb.document_id, pb.content_hash, pb.chunks, pb.updated_unix_ms,
                        dict(pb.metadata))  # fmt: skip


def _collection_summary(pb: retrieve_pb2.Collection) -> CollectionSummary:
    return CollectionSummary(pb.name, pb.dimension, pb.version, pb.last_write_unix_ms, pb.count,
                             pb.documents, pb.index_type)  # fmt: skip


def _passage_pb(p: Passage) -> retrieve_pb2.Passage:
    return retrieve_pb2.Passage(
        id=p.id,
        document_id=p.document_id,
        chunk=p.chunk,
        text=p.text,
        metadata=dict(p.metadata),
        vector=vectors.pack(p.vector),
    )


def _sampling_pb(params: SamplingParams) -> generate_pb2.SamplingParams:
    pb = sampling_params(params.max_tokens, params.temperature, params.top_p, params.seed,
                         params.stop)  # fmt: skip
    if params.top_k is not None:
        pb.top_k = params.top_k
    if params.repetition_penalty is not None:
        pb.repetition_penalty = params.repetition_penalty
    return pb


class _StageClient(Generic[C]):
    """Every call of a stage goes through its pool and leaves as ragline's own error."""

    name = ""
    client_class: type

    def __init__(self, pool: ReplicaPool[C], *, split_budget: bool | None = None) -> None:
        self.pool = pool
        self.split_budget = split_budget

    @classmethod
    def connect(
        cls, address: str, policy: PoolPolicy | None = None, *, stage: str | None = None
    ) -> Self:
        """A pool over ``address`` (one ``host:port``, a comma-separated list, ``dns:///``)."""
        return cls(ReplicaPool(stage or cls.name, address, cls.client_class, policy))

    async def _call(
        self,
        fn: Callable[[C, float | None], Awaitable[T]],
        timeout: float | None,
        key: str | None = None,
    ):
        # Every stage call is idempotent: reads, generation (no side effects) and upserts by id.
        try:
            return await self.pool.call(
                fn, idempotent=True, timeout=timeout, split_budget=self.split_budget, key=key
            )
        except grpc.aio.AioRpcError as exc:
            raise _stage_error(self.pool.stage, exc) from None

    def start(self) -> None:
        """Active health checks (and DNS re-resolution) of the pool's replicas."""
        self.pool.start()

    async def close(self) -> None:
        await self.pool.close()


class EmbedStageClient(_StageClient[EmbedClient]):
    """The embed stage's replicas. A call with more texts than the stage takes at once (its
    ``max_client_batch_size``, asked once) is sent as consecutive calls of that size."""

    name = "embed"
    client_class = EmbedClient
    _batch_limit = 0

    async def batch_limit(self, timeout: float | None = None) -> int:
        if not self._batch_limit:
            self._batch_limit = (await self.info(timeout)).max_client_batch_size or 32
        return self._batch_limit

    async def _batches(self, texts: Sequence[str], timeout: float | None) -> list[Sequence[str]]:
        if len(texts) <= (self._batch_limit or 32):
            return [texts]  # within any stage's limit: no need to ask
        size = await self.batch_limit(timeout)
        return [texts[i : i + size] for i in range(0, len(texts), size)]

    async def embed(
        self,
        texts: Sequence[str],
        kind: InputKind = InputKind.PASSAGE,
        truncate: bool = True,
        timeout: float | None = None,
    ) -> Embeddings:
        async def call(batch: Sequence[str], client: EmbedClient, t: float | None) -> Embeddings:
            vecs, resp = await client.embed(batch, _INPUT_KIND[kind], truncate, timeout=t)
            return Embeddings(vecs, resp.model, tuple(resp.token_counts))

        parts = [
            await self._call(functools.partial(call, batch), timeout)
            for batch in await self._batches(texts, timeout)
        ]
        if len(parts) == 1:
            return parts[0]
        return Embeddings(
            np.concatenate([p.vectors for p in parts]),
            parts[0].model,
            tuple(n for p in parts for n in p.token_counts),
        )

    async def embed_query(self, query: str, timeout: float | None = None) -> np.ndarray:
        return (await self.embed([query], InputKind.QUERY, True, timeout)).vectors[0]

    async def count_tokens(
        self,
        texts: Sequence[str],
        kind: InputKind = InputKind.PASSAGE,
        timeout: float | None = None,
    ) -> tuple[list[int], int]:
        """Tokens per text as the model sees them (never truncated), and the model's limit."""

        async def call(
            batch: Sequence[str], client: EmbedClient, t: float | None
        ) -> tuple[list[int], int]:
            resp = await client.tokenize(batch, _INPUT_KIND[kind], timeout=t)
            return list(resp.token_counts), resp.max_input_tokens

        counts: list[int] = []
        limit = 0
        for batch in await self._batches(texts, timeout):
            found, limit = await self._call(functools.partial(call, batch), timeout)
            counts.extend(found)
        return counts, limit

    async def info(self, timeout: float | None = None) -> EmbedderInfo:
        async def call(client: EmbedClient, t: float | None) -> EmbedderInfo:
            pb = await client.info(timeout=t)
            return EmbedderInfo(pb.model, pb.dimension, pb.max_input_tokens,
                                pb.max_client_batch_size)  # fmt: skip

        return await self._call(call, timeout)


class RetrieveStageClient(_StageClient[RetrieveClient]):
    name = "retrieve"
    client_class = RetrieveClient

    async def search(
        self,
        collection: str,
        vector: np.ndarray | None,
        top_k: int,
        timeout: float | None = None,
        *,
        where: Mapping[str, str | Sequence[str]] | None = None,
        ef_search: int = 0,
        nprobe: int = 0,
        text: str = "",
        mode: str = "",
    ) -> SearchResult:
        """As ``RetrieveClient.search``; hits carry their cosine ``score`` in every mode."""

        async def call(client: RetrieveClient, t: float | None) -> SearchResult:
            resp = await client.search(collection, vector, top_k, t, where=where,
                                       ef_search=ef_search, nprobe=nprobe, text=text,
                                       mode=mode)  # fmt: skip
            return SearchResult([_hit(h) for h in resp.hits], resp.index_type, resp.strategy,
                                resp.version)  # fmt: skip

        return await self._call(call, timeout)

    async def upsert(
        self,
        collection: str,
        passages: Sequence[Passage],
        documents: Sequence[DocumentRecord] = (),
        timeout: float | None = None,
    ) -> WriteResult:
        pb_passages = [_passage_pb(p) for p in passages]
        pb_documents = [
            retrieve_pb2.Document(document_id=d.document_id, content_hash=d.content_hash,
                                  chunks=d.chunks)
            for d in documents
        ]  # fmt: skip

        async def call(client: RetrieveClient, t: float | None) -> WriteResult:
            resp = await client.upsert(collection, pb_passages, pb_documents, timeout=t)
            return WriteResult(changed=resp.upserted, count=resp.count, removed=resp.removed)

        return await self._call(call, timeout)

    async def delete(
        self,
        collection: str,
        ids: Sequence[str] = (),
        document_ids: Sequence[str] = (),
        timeout: float | None = None,
    ) -> WriteResult:
        async def call(client: RetrieveClient, t: float | None) -> WriteResult:
            resp = await client.delete(collection, ids, document_ids, timeout=t)
            return WriteResult(changed=resp.deleted, count=resp.count)

        return await self._call(call, timeout)

    async def get_documents(
        self, collection: str, document_ids: Sequence[str], timeout: float | None = None
    ) -> dict[str, DocumentRecord]:
        async def call(client: RetrieveClient, t: float | None) -> dict[str, DocumentRecord]:
            found = await client.get_documents(collection, document_ids, timeout=t)
            return {k: DocumentRecord(d.document_id, d.content_hash, d.chunks)
                    for k, d in found.items()}  # fmt: skip

        return await self._call(call, timeout)

    async def describe_documents(
        self, collection: str, document_ids: Sequence[str], timeout: float | None = None
    ) -> dict[str, DocumentInfo]:
        """As ``get_documents``, with when each was written and its metadata."""

        async def call(client: RetrieveClient, t: float | None) -> dict[str, DocumentInfo]:
            found = await client.get_documents(collection, document_ids, timeout=t)
            return {k: _document_info(d) for k, d in found.items()}

        return await self._call(call, timeout)

    async def list_documents(
        self, collection: str, limit: int = 0, after: str = "", timeout: float | None = None
    ) -> tuple[list[DocumentInfo], str]:
        """A page of documents in id order, and the ``after`` of the next ("" on the last)."""

        async def call(client: RetrieveClient, t: float | None):
            resp = await client.list_documents(collection, limit, after, timeout=t)
            return [_document_info(d) for d in resp.documents], resp.next_after

        return await self._call(call, timeout)

    async def create_collection(
        self, name: str, dimension: int, exist_ok: bool = True, timeout: float | None = None
    ) -> CollectionSummary:
        """The collection with the server's default index policy; exists already: fine
        unless ``exist_ok`` is False (ALREADY_EXISTS)."""

        async def call(client: RetrieveClient, t: float | None) -> CollectionSummary:
            return _collection_summary(
                await client.create_collection(name, dimension, exist_ok, timeout=t)
            )

        return await self._call(call, timeout)

    async def list_collections(
        self, with_counts: bool = False, timeout: float | None = None
    ) -> list[CollectionSummary]:
        async def call(client: RetrieveClient, t: float | None) -> list[CollectionSummary]:
            resp = await client.list_collections(with_counts, timeout=t)
            return [_collection_summary(c) for c in resp.collections]

        return await self._call(call, timeout)

    async def delete_collection(self, name: str, timeout: float | None = None) -> bool:
        """False when there was no such collection."""

        async def call(client: RetrieveClient, t: float | None) -> bool:
            return (await client.delete_collection(name, timeout=t)).deleted

        return await self._call(call, timeout)

    async def stats(self, collection: str, timeout: float | None = None) -> CollectionStats:
        async def call(client: RetrieveClient, t: float | None) -> CollectionStats:
            s = await client.stats(collection, timeout=t)
            return CollectionStats(
                name=s.name,
                count=s.count,
                dimension=s.dimension,
                index_type=s.index_type,
                documents=s.documents,
                last_write_unix_ms=s.last_write_unix_ms,
                indexed=s.indexed,
                version=s.version,
                indexed_version=s.indexed_version,
                rebuilding=s.rebuilding,
            )

        return await self._call(call, timeout)


class ShardedRetrieveClient:
    """A collection split over shards: retrieve replicas started with ``--shards N --shard i``
    each index only the passages whose id hashes to their shard (on the shared postgres store).
    A search asks one replica of every shard at once, with the same ``top_k``, and merges their
    hits; everything else goes to shard 0 (the store is shared: any replica answers for all).

    Merging is exact for dense search (each shard returns its own best ``top_k`` by cosine, so
    the global best ``top_k`` are among them) and for sparse (its rank is per passage). Hybrid
    hits are merged by their fused score, which each shard computed from its own rankings: an
    approximation of fusing the global rankings (docs/decisions/0012)."""

    name = "retrieve"

    def __init__(self, shards: Sequence[RetrieveStageClient]) -> None:
        if not shards:
            raise ValueError("no shards")
        self.shards = list(shards)
        self.pool = self.shards[0].pool

    @classmethod
    def connect(cls, address: str, policy: PoolPolicy | None = None) -> Self:
        """``address``: one address (``host:port``, a list, ``dns:///``) per shard, by ";"."""
        parts = [a.strip() for a in address.split(";")]
        if any(not a for a in parts):
            raise ValueError(f"empty shard address in {address!r}")
        return cls([RetrieveStageClient.connect(a, policy, stage=f"retrieve-shard-{i}")
                    for i, a in enumerate(parts)])  # fmt: skip

    @property
    def pools(self) -> list[ReplicaPool]:
        return [s.pool for s in self.shards]

    async def search(self, collection: str, vector, top_k: int, timeout=None, **kw) -> SearchResult:
        found = await asyncio.gather(
            *(s.search(collection, vector, top_k, timeout, **kw) for s in self.shards)
        )
        return merge_shards(found, top_k)

    def start(self) -> None:
        for shard in self.shards:
            shard.start()

    async def close(self) -> None:
        for shard in self.shards:
            await shard.close()

    def __getattr__(self, name: str):
        return getattr(self.shards[0], name)  # writes, documents, collections, stats


def merge_shards(results: Sequence[SearchResult], top_k: int) -> SearchResult:
    """The best ``top_k`` of several shards' hits: by fused score where the search fused
    (hybrid), else by BM25 where it was sparse, else by cosine."""
    hits: dict[str, Hit] = {}
    for result in results:
        for hit in result.hits:
            hits.setdefault(hit.id, hit)
    strategy = results[0].strategy
    if strategy.startswith("hybrid") and "without" not in strategy:
        key = lambda h: h.rrf_score  # noqa: E731
    elif strategy.startswith("sparse"):
        key = lambda h: h.bm25_score  # noqa: E731
    else:
        key = lambda h: h.score  # noqa: E731
    best = sorted(hits.values(), key=lambda h: (-key(h), h.id))[:top_k]
    return SearchResult(best, results[0].index_type, f"{strategy} ({len(results)} shards)",
                        min(r.version for r in results))  # fmt: skip


# The routing key covers the start of the prefix only: the system prompt and about the first
# passage. Prompts that share their first passages share that much of a cached prefix, so they
# should meet on one replica even when their later passages differ.
PREFIX_KEY_CHARS = 1024


def prefix_key(messages: Sequence[Message]) -> str | None:
    """The routing key of a chat: a digest of the start of every message before the last user
    turn (the system prompt with its passages, and the history), the prefix a replica's cache
    can share between questions. None when there is no such prefix."""
    prefix = messages[:-1] if messages and messages[-1]["role"] == "user" else messages
    if not prefix:
        return None
    raw = json.dumps([[m["role"], m["content"]] for m in prefix], ensure_ascii=False)
    return hashlib.blake2b(raw[:PREFIX_KEY_CHARS].encode(), digest_size=8).hexdigest()


class GenerateStageClient(_StageClient[GenerateClient]):
    name = "generate"
    client_class = GenerateClient

    def __init__(self, pool: ReplicaPool[GenerateClient], *, split_budget: bool = False) -> None:
        # A slow answer is not a hung replica: generation keeps its whole budget on the first
        # replica and moves only on UNAVAILABLE. Requests are keyed by their prompt prefix
        # (``prefix_key``), so the pool sends a passage set to the replica likely to cache it.
        super().__init__(pool, split_budget=split_budget)

    async def generate(
        self,
        messages: Sequence[Message],
        params: SamplingParams,
        timeout: float | None = None,
    ) -> Completion:
        request = GenerateClient.request(messages, _sampling_pb(params))

        async def call(client: GenerateClient, t: float | None) -> Completion:
            resp = await client.generate(request, timeout=t)
            return Completion(resp.text, _finish_name(resp.finish_reason), _usage(resp.usage),
                              resp.model)  # fmt: skip

        return await self._call(call, timeout, prefix_key(messages))

    async def info(self, timeout: float | None = None) -> GeneratorInfo:
        async def call(client: GenerateClient, t: float | None) -> GeneratorInfo:
            pb = await client.info(timeout=t)
            return GeneratorInfo(pb.model, pb.backend, pb.context_length,
                                 pb.max_concurrent_requests, pb.default_max_tokens)  # fmt: skip

        return await self._call(call, timeout)

    async def stream(
        self,
        messages: Sequence[Message],
        params: SamplingParams,
        timeout: float | None = None,
    ) -> AsyncIterator[CompletionChunk]:
        """Chunks as they are generated; only the last has a finish reason and usage. Moves to
        another replica only before its first chunk (see ``ReplicaPool.stream``)."""
        request = GenerateClient.request(messages, _sampling_pb(params))
        key = prefix_key(messages)
        try:
            async for pb in self.pool.stream(lambda c: c.stream(request, timeout=timeout), key=key):
                last = pb.HasField("usage") or pb.finish_reason != 0
                yield CompletionChunk(
                    pb.text,
                    _finish_name(pb.finish_reason) if last else None,
                    _usage(pb.usage) if last else None,
                )
        except grpc.aio.AioRpcError as exc:
            raise _stage_error(self.pool.stage, exc) from None
