"""The retrieve stage over real gRPC, persisted on disk."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest

from ragline.clients import RetrieveClient
from ragline.grpc_server import start_serving
from ragline.v1 import retrieve_pb2
from services.retrieve.server import build
from services.retrieve.settings import RetrieveSettings

DIM = 16


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def passage(doc: str, chunk: int, seed: int) -> retrieve_pb2.Passage:
    return retrieve_pb2.Passage(
        id=f"{doc}#{chunk}",
        document_id=doc,
        chunk=chunk,
        text=f"text of {doc} {chunk}",
        metadata={"source": doc},
        vector=unit(seed).tobytes(),
    )


async def start(data_dir):
    service, warmup = build(RetrieveSettings(port=0, data_dir=data_dir, max_top_k=50))
    port = await start_serving(service, warmup)
    return service, RetrieveClient(f"127.0.0.1:{port}")


async def stop(service, client) -> None:
    await client.close()
    await service.stop()


async def test_round_trip_and_restart(tmp_path) -> None:
    service, client = await start(tmp_path)
    try:
        created = await client.create_collection("kb", DIM, exist_ok=False)
        assert created.dimension == DIM and created.index_type == "flat"
        resp = await client.upsert(
            "kb",
            [passage("a", i, i) for i in range(10)],
            [retrieve_pb2.Document(document_id="a", content_hash="h", chunks=10)],
        )
        assert (resp.upserted, resp.count) == (10, 10)
        hits = (await client.search("kb", unit(4), 3)).hits
        assert hits[0].id == "a#4" and hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert hits[0].metadata["source"] == "a" and hits[0].document_id == "a"
        assert (await client.delete("kb", ids=["a#4"])).deleted == 1
        assert (await client.search("kb", unit(4), 1)).hits[0].id != "a#4"
        stats = await client.stats("kb")
        assert (stats.count, stats.dimension, stats.documents) == (9, DIM, 1)
        assert stats.last_write_unix_ms > 0
    finally:
        await stop(service, client)

    service, client = await start(tmp_path)  # same data dir: everything survived
    try:
        assert (await client.stats("kb")).count == 9
        hits = (await client.search("kb", unit(5), 2)).hits
        assert hits[0].id == "a#5"
        docs = await client.get_documents("kb", ["a", "missing"])
        assert list(docs) == ["a"] and docs["a"].content_hash == "h"
        listed = await client.stub.ListCollections(retrieve_pb2.ListCollectionsRequest())
        assert [c.name for c in listed.collections] == ["kb"]
    finally:
        await stop(service, client)


@pytest.fixture
async def served(tmp_path):
    service, client = await start(tmp_path)
    await client.create_collection("kb", DIM)
    await client.upsert("kb", [passage("a", 0, 1)])
    yield client
    await stop(service, client)


@pytest.mark.parametrize(
    ("request_fn", "code", "fragment"),
    [
        (lambda c: c.search("kb", np.ones(DIM * 2, np.float32), 1), "INVALID_ARGUMENT",
         "expects dimension 16"),
        (lambda c: c.search("kb", unit(1), 0), "INVALID_ARGUMENT", "between 1 and 50"),
        (lambda c: c.search("kb", unit(1), 10**6), "INVALID_ARGUMENT", "between 1 and 50"),
        (lambda c: c.search("nope", unit(1), 1), "NOT_FOUND", "does not exist"),
        (lambda c: c.search("kb", np.full(DIM, math.nan, np.float32), 1), "INVALID_ARGUMENT",
         "NaN"),
        (lambda c: c.upsert("kb", []), "INVALID_ARGUMENT", "passages is empty"),
        (lambda c: c.create_collection("kb", DIM + 1), "ALREADY_EXISTS", "dimension 16"),
        (lambda c: c.upsert("kb", [retrieve_pb2.Passage(id="x", document_id="x", text="t",
                                                         vector=b"\x00" * 8)]),
         "INVALID_ARGUMENT", "expects dimension 16"),
    ],
)  # fmt: skip
async def test_bad_input_gets_the_right_status_and_the_server_keeps_serving(
    served, request_fn, code, fragment
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await request_fn(served)
    assert exc.value.code() is grpc.StatusCode[code]
    assert fragment in exc.value.details()
    assert (await served.search("kb", unit(1), 1)).hits[0].id == "a#0"


async def test_read_only_replica_follows_the_writer_and_refuses_writes(tmp_path) -> None:
    import asyncio
    import time

    writer, wclient = await start(tmp_path)
    reader_service, reader_warmup = build(
        RetrieveSettings(port=0, data_dir=tmp_path, read_only=True, refresh_s=0.05)
    )
    rclient = RetrieveClient(f"127.0.0.1:{await start_serving(reader_service, reader_warmup)}")
    try:
        await wclient.create_collection("kb", DIM)
        await wclient.upsert("kb", [passage("a", 0, 1)])
        deadline = time.monotonic() + 5
        while True:  # the reader picks the write up within a refresh period or two
            try:
                hits = (await rclient.search("kb", unit(1), 1)).hits
                if hits:
                    break
            except grpc.aio.AioRpcError:
                pass
            assert time.monotonic() < deadline, "reader never saw the writer's upsert"
            await asyncio.sleep(0.05)
        assert hits[0].id == "a#0"
        await wclient.delete("kb", ids=["a#0"])
        await wclient.upsert("kb", [passage("b", 0, 2)])
        while [h.id for h in (await rclient.search("kb", unit(1), 5)).hits] != ["b#0"]:
            assert time.monotonic() < deadline + 5, "reader never saw the delete and upsert"
            await asyncio.sleep(0.05)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await rclient.upsert("kb", [passage("c", 0, 3)])
        assert exc.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "read-only" in exc.value.details()
    finally:
        await stop(reader_service, rclient)
        await stop(writer, wclient)
