"""Typed asyncio clients for the three gRPC stages.

One channel per address, created once and reused for the process lifetime. Replica balancing
across several addresses belongs to the API edge's balancer; these wrap a single channel.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ragline import vectors
from ragline.v1 import (
    embed_pb2,
    embed_pb2_grpc,
    generate_pb2,
    generate_pb2_grpc,
    retrieve_pb2,
    retrieve_pb2_grpc,
)


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

    async def close(self) -> None:
        await self.channel.close()


class EmbedClient(_Client):
    def __init__(self, address: str, max_message_mb: int = 16) -> None:
        super().__init__(address, max_message_mb)
        self.stub = embed_pb2_grpc.EmbedStub(self.channel)

    async def embed(
        self,
        texts: Sequence[str],
        kind: int = embed_pb2.INPUT_KIND_PASSAGE,
        truncate: bool = True,
        timeout: float | None = None,
    ) -> tuple[np.ndarray, embed_pb2.EmbedResponse]:
        resp = await self.stub.Embed(
            embed_pb2.EmbedRequest(texts=list(texts), kind=kind, truncate=truncate),
            timeout=timeout,
        )
        return vectors.unpack(resp.vectors, resp.dimension, what="embedding"), resp

    async def info(self, timeout: float | None = None) -> embed_pb2.EmbedInfo:
        return await self.stub.Info(embed_pb2.EmbedInfoRequest(), timeout=timeout)


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
        vector: np.ndarray,
        top_k: int,
        timeout: float | None = None,
        *,
        where: Mapping[str, str | Sequence[str]] | None = None,
        ef_search: int = 0,
        nprobe: int = 0,
    ) -> retrieve_pb2.SearchResponse:
        """``where``: metadata field -> value (equals) or list of values (any of), all must hold."""
        return await self.stub.Search(
            retrieve_pb2.SearchRequest(
                collection=collection,
                vector=vectors.pack(vector),
                top_k=top_k,
                filter=search_filter(where or {}),
                ef_search=ef_search,
                nprobe=nprobe,
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
