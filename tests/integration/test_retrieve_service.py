"""The retrieve stage over real gRPC, persisted on disk."""

from __future__ import annotations

import asyncio
import math
import time

import grpc
import numpy as np
import pytest

from ragline.clients import RetrieveClient
from ragline.errors import InvalidArgument
from ragline.v1 import retrieve_pb2
from services.retrieve.server import build
from services.retrieve.settings import RetrieveSettings

DIM = 16


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def passage(doc: str, chunk: int, seed: int, vector: bytes | None = None) -> retrieve_pb2.Passage:
    return retrieve_pb2.Passage(
        id=f"{doc}#{chunk}",
        document_id=doc,
        chunk=chunk,
        text=f"text of {doc} {chunk}",
        metadata={"source": doc},
        vector=unit(seed).tobytes() if vector is None else vector,
    )


async def start(data_dir, **overrides):
    settings = RetrieveSettings(
        port=0, data_dir=data_dir, max_top_k=50, max_passages_per_upsert=64, **overrides
    )
    service = build(settings)
    port = await service.start()
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
            [passage("a", i, i) for i in range(10)] + [passage("b", i, 100 + i) for i in range(3)],
            [
                retrieve_pb2.Document(document_id="a", content_hash="h", chunks=10),
                retrieve_pb2.Document(document_id="b", content_hash="hb", chunks=3),
            ],
        )
        assert (resp.upserted, resp.removed, resp.count) == (13, 0, 13)
        found = await client.search("kb", unit(4), 3)
        hits = found.hits
        assert found.index_type == "flat" and len(hits) == 3
        assert hits[0].id == "a#4" and hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert hits[0].metadata["source"] == "a" and hits[0].document_id == "a"
        assert hits[0].chunk == 4 and hits[0].text == "text of a 4"
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        assert len((await client.search("kb", unit(4), 50)).hits) == 13  # all there is

        deleted = await client.delete("kb", ids=["a#4"])
        assert (deleted.deleted, deleted.count) == (1, 12)
        assert (await client.search("kb", unit(4), 1)).hits[0].id != "a#4"
        deleted = await client.delete("kb", document_ids=["b"])
        assert (deleted.deleted, deleted.count) == (3, 9)
        assert not any(
            h.document_id == "b" for h in (await client.search("kb", unit(100), 50)).hits
        )

        stats = await client.stats("kb")
        assert (stats.count, stats.indexed, stats.dimension, stats.documents) == (9, 9, DIM, 1)
        assert stats.index_type == "flat" and stats.metric == retrieve_pb2.METRIC_INNER_PRODUCT
        assert stats.last_write_unix_ms > 0
    finally:
        await stop(service, client)

    service, client = await start(tmp_path)  # same data dir: everything survived
    try:
        stats = await client.stats("kb")
        assert (stats.count, stats.indexed, stats.documents) == (9, 9, 1)
        hits = (await client.search("kb", unit(5), 2)).hits
        assert hits[0].id == "a#5" and hits[0].score == pytest.approx(1.0, abs=1e-5)
        docs = await client.get_documents("kb", ["a", "b", "missing"])
        assert list(docs) == ["a"] and docs["a"].content_hash == "h" and docs["a"].chunks == 10
        listed = await client.stub.ListCollections(retrieve_pb2.ListCollectionsRequest())
        assert [(c.name, c.dimension) for c in listed.collections] == [("kb", DIM)]
    finally:
        await stop(service, client)


async def test_changed_document_replaces_its_chunks(tmp_path) -> None:
    service, client = await start(tmp_path)
    try:
        await client.create_collection("kb", DIM)
        doc = retrieve_pb2.Document(document_id="a", content_hash="v1", chunks=4)
        await client.upsert("kb", [passage("a", i, i) for i in range(4)], [doc])
        doc = retrieve_pb2.Document(document_id="a", content_hash="v2", chunks=2)
        resp = await client.upsert("kb", [passage("a", i, 50 + i) for i in range(2)], [doc])
        assert (resp.upserted, resp.removed, resp.count) == (2, 2, 2)
        assert (await client.get_documents("kb", ["a"]))["a"].content_hash == "v2"
        hits = (await client.search("kb", unit(3), 10)).hits  # a#3 was an old chunk
        assert sorted(h.id for h in hits) == ["a#0", "a#1"]
        deleted = await client.stub.DeleteCollection(
            retrieve_pb2.DeleteCollectionRequest(name="kb")
        )
        assert deleted.deleted
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await client.stats("kb")
        assert exc.value.code() is grpc.StatusCode.NOT_FOUND
    finally:
        await stop(service, client)


@pytest.fixture
async def served(tmp_path):
    service, client = await start(tmp_path)
    await client.create_collection("kb", DIM)
    await client.create_collection("other", 4)
    await client.upsert("kb", [passage("a", 0, 1)])
    yield client
    await stop(service, client)


NAN = np.full(DIM, math.nan, np.float32)


@pytest.mark.parametrize(
    ("request_fn", "code", "fragment"),
    [
        (lambda c: c.search("kb", np.ones(DIM * 2, np.float32), 1), "INVALID_ARGUMENT",
         "query vector has dimension 32; collection 'kb' expects dimension 16"),
        (lambda c: c.search("kb", unit(1), 0), "INVALID_ARGUMENT", "between 1 and 50, got 0"),
        (lambda c: c.search("kb", unit(1), 10**6), "INVALID_ARGUMENT", "between 1 and 50"),
        (lambda c: c.search("nope", unit(1), 1), "NOT_FOUND",
         "collection 'nope' does not exist; create it with CreateCollection"),
        (lambda c: c.search("nope", unit(1), 1), "NOT_FOUND", "existing: kb, other"),
        (lambda c: c.search("kb", NAN, 1), "INVALID_ARGUMENT", "NaN"),
        (lambda c: c.upsert("kb", []), "INVALID_ARGUMENT", "passages is empty"),
        (lambda c: c.upsert("kb", [passage("m", i, i) for i in range(65)]), "INVALID_ARGUMENT",
         "65 passages in one upsert; the limit is 64"),
        (lambda c: c.upsert("nope", [passage("a", 0, 1)]), "NOT_FOUND", "does not exist"),
        (lambda c: c.upsert("kb", [passage("n", 0, 1, NAN.tobytes())]), "INVALID_ARGUMENT",
         "vector of passage 'n#0' contains NaN"),
        (lambda c: c.upsert("kb", [passage("x", 0, 1, b"\x00" * 8)]), "INVALID_ARGUMENT",
         "vector of passage 'x#0' has dimension 2; collection 'kb' expects dimension 16"),
        (lambda c: c.upsert("kb", [passage("x", 0, 1, b"\x00" * 7)]), "INVALID_ARGUMENT",
         "has 7 bytes"),
        (lambda c: c.create_collection("kb", DIM + 1), "ALREADY_EXISTS", "dimension 16"),
        (lambda c: c.create_collection("kb", DIM, exist_ok=False), "ALREADY_EXISTS", "exist_ok"),
        (lambda c: c.create_collection("bad name", DIM), "INVALID_ARGUMENT", "letters, digits"),
        (lambda c: c.delete("kb"), "INVALID_ARGUMENT", "nothing to delete"),
        (lambda c: c.delete("nope", ids=["a#0"]), "NOT_FOUND", "does not exist"),
        (lambda c: c.get_documents("nope", ["a"]), "NOT_FOUND", "does not exist"),
        (lambda c: c.search("kb", unit(1), 5, where={"": "x"}), "INVALID_ARGUMENT", "empty key"),
        (lambda c: c.search("kb", unit(1), 5, where={"lang": []}), "INVALID_ARGUMENT",
         "filter condition 0 on 'lang' has no value"),
        (lambda c: c.search("kb", unit(1), 5, where={f"k{i}": "v" for i in range(17)}),
         "INVALID_ARGUMENT", "at most 16"),
        (lambda c: c.stub.Search(retrieve_pb2.SearchRequest(
            collection="kb", vector=unit(1).tobytes(), top_k=5,
            filter=retrieve_pb2.Filter(must=[retrieve_pb2.FieldCondition(key="lang")]))),
         "INVALID_ARGUMENT", "set `equals` or `any_of`"),
        (lambda c: c.search("kb", unit(1), 10, ef_search=4), "INVALID_ARGUMENT",
         "ef_search must be between top_k (10) and"),
        (lambda c: c.search("kb", unit(1), 10, nprobe=10**6), "INVALID_ARGUMENT",
         "nprobe must be between 1 and"),
        (lambda c: c.create_collection("p", DIM, index_policy=retrieve_pb2.IndexPolicy(kind=9)),
         "INVALID_ARGUMENT", "index_policy.kind 9 is unknown"),
        (lambda c: c.create_collection("p", DIM, index_policy=retrieve_pb2.IndexPolicy(hnsw_m=2)),
         "INVALID_ARGUMENT", "hnsw_m must be between 4 and 128"),
        (lambda c: c.search("kb", unit(1), 5, mode="sparse"), "INVALID_ARGUMENT",
         "sparse search needs query_text (the question's text): send it, or set mode "
         "SEARCH_MODE_DENSE with a vector"),
        (lambda c: c.search("kb", None, 5, text="leave", mode="dense"), "INVALID_ARGUMENT",
         "dense search needs vector (the query's embedding): send it, or set mode "
         "SEARCH_MODE_SPARSE with query_text"),
        (lambda c: c.search("kb", None, 5, text="leave"), "INVALID_ARGUMENT",
         "hybrid search needs vector (the query's embedding) too: send it, or set mode "
         "SEARCH_MODE_SPARSE"),
        (lambda c: c.search("kb", None, 5, mode="hybrid"), "INVALID_ARGUMENT", "send both"),
        (lambda c: c.stub.Search(retrieve_pb2.SearchRequest(collection="kb", query_text="x",
                                                            top_k=5, mode=9)),
         "INVALID_ARGUMENT", "mode 9 is unknown: use one of SEARCH_MODE_UNSPECIFIED, "),
        (lambda c: c.stub.CreateCollection(retrieve_pb2.CreateCollectionRequest(
            name="m", dimension=DIM, search_mode=9)),
         "INVALID_ARGUMENT", "search_mode 9 is unknown"),
        (lambda c: c.search("nope", None, 5, text="x", mode="sparse"), "NOT_FOUND",
         "existing: kb, other"),
        (lambda c: c.search("kb", np.ones(3, np.float32), 5, text="x", mode="sparse"),
         "INVALID_ARGUMENT", "query vector has dimension 3"),
    ],
)  # fmt: skip
async def test_bad_input_gets_the_right_status_and_the_server_keeps_serving(
    served, request_fn, code, fragment
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await request_fn(served)
    assert exc.value.code() is grpc.StatusCode[code]
    assert fragment in exc.value.details()
    hits = (await served.search("kb", unit(1), 10)).hits
    assert [h.id for h in hits] == ["a#0"]  # nothing half-written, still serving


async def test_unavailable_until_indexes_are_loaded(tmp_path) -> None:
    service = build(RetrieveSettings(port=0, data_dir=tmp_path))
    port = await service.bind()  # bound, not warmed up: health says NOT_SERVING
    client = RetrieveClient(f"127.0.0.1:{port}")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await client.create_collection("kb", DIM)
        assert exc.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "loading" in exc.value.details()
        await service.start()  # warm up, then SERVING
        assert (await client.create_collection("kb", DIM)).dimension == DIM
    finally:
        await stop(service, client)


async def test_stopped_server_releases_its_threads(tmp_path) -> None:
    import threading

    service, client = await start(tmp_path)
    await client.create_collection("kb", DIM)
    await client.upsert("kb", [passage("a", 0, 1)])
    assert any(t.name.startswith("retrieve") for t in threading.enumerate())
    await stop(service, client)
    deadline = time.monotonic() + 10
    while any(t.name.startswith("retrieve") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the worker pool outlived the server"
        await asyncio.sleep(0.05)


async def test_read_only_replica_follows_the_writer_and_refuses_writes(tmp_path) -> None:
    writer, wclient = await start(tmp_path)
    reader, rclient = await start(tmp_path, read_only=True, refresh_s=0.05)
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
        # A replacement keeps the count; the reader must still pick it up.
        await wclient.upsert("kb", [passage("b", 0, 3)])
        while (await rclient.search("kb", unit(3), 1)).hits[0].score < 0.999:
            assert time.monotonic() < deadline + 10, "reader never saw the replacement"
            await asyncio.sleep(0.05)
        stats = await rclient.stats("kb")
        assert (stats.count, stats.indexed) == (1, 1)
        for write in (
            rclient.upsert("kb", [passage("c", 0, 3)]),
            rclient.delete("kb", ids=["b#0"]),
            rclient.create_collection("new", DIM),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await write
            assert exc.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert "read-only" in exc.value.details()
        assert (await wclient.stats("kb")).count == 1  # the refused delete changed nothing
    finally:
        await stop(reader, rclient)
        await stop(writer, wclient)


async def test_acknowledged_writes_survive_a_killed_process(base_env, tmp_path) -> None:
    import signal

    from ragline.clients import wait_for_serving
    from tests.conftest import ServiceProcess, free_port

    def launch() -> tuple[ServiceProcess, str]:
        port = free_port()
        args = ["--port", str(port), "--data-dir", str(tmp_path / "index")]
        return ServiceProcess("retrieve", args, tmp_path, base_env), f"127.0.0.1:{port}"

    proc, address = launch()
    client = RetrieveClient(address)
    try:
        await wait_for_serving(address, "ragline.v1.Retrieve", timeout=60)
        await client.create_collection("kb", DIM)
        for i in range(20):
            await client.upsert("kb", [passage(f"d{i}", 0, i)])
        await client.delete("kb", ids=["d3#0"])
    finally:
        proc.proc.send_signal(signal.SIGKILL)  # no shutdown, no chance to flush anything
        proc.stop()
        await client.close()

    proc, address = launch()
    client = RetrieveClient(address)
    try:
        await wait_for_serving(address, "ragline.v1.Retrieve", timeout=60)
        stats = await client.stats("kb")
        assert (stats.count, stats.indexed) == (19, 19), proc.log()
        assert (await client.search("kb", unit(7), 1)).hits[0].id == "d7#0"
        assert all(h.id != "d3#0" for h in (await client.search("kb", unit(3), 50)).hits)
    finally:
        proc.stop()
        await client.close()


async def test_overload_is_refused_at_once_not_queued(tmp_path) -> None:
    import threading

    from ragline.errors import ResourceExhausted
    from services.retrieve.knowledge_base import KnowledgeBase
    from services.retrieve.server import RetrieveServicer
    from services.retrieve.store import PassageStore

    servicer = RetrieveServicer(
        KnowledgeBase(PassageStore(tmp_path)), RetrieveSettings(data_dir=tmp_path, workers=1)
    )
    servicer.max_pending = 1
    release = threading.Event()
    busy = asyncio.ensure_future(servicer._run(release.wait, 10))
    await asyncio.sleep(0)  # let it take the only slot
    try:
        with pytest.raises(ResourceExhausted, match="overloaded"):
            await servicer._run(lambda: None)
    finally:
        release.set()
        assert await busy
        servicer.executor.shutdown()
    assert servicer.pending == 0  # the slot was given back


async def test_filters_search_params_and_index_policy_over_grpc(tmp_path) -> None:
    service, client = await start(tmp_path)
    try:
        created = await client.create_collection(
            "kb", DIM, index_policy=retrieve_pb2.IndexPolicy(kind=retrieve_pb2.INDEX_KIND_HNSW)
        )
        assert created.index_policy.kind == retrieve_pb2.INDEX_KIND_HNSW
        assert created.index_policy.hnsw_m == 32  # the server default fills what was not set
        langs = ["en", "fr", "de"]
        passages = [passage(f"d{i}", 0, i) for i in range(60)]
        for i, p in enumerate(passages):
            p.metadata["lang"] = langs[i % 3]
        await client.upsert("kb", passages)
        deadline = time.monotonic() + 30
        while (stats := await client.stats("kb")).index_type != "hnsw" or stats.rebuilding:
            assert time.monotonic() < deadline, "the HNSW build never finished"
            await asyncio.sleep(0.05)
        assert (stats.count, stats.indexed, stats.indexed_version) == (60, 60, stats.version)
        found = await client.search("kb", unit(4), 5, where={"lang": "fr"}, ef_search=64)
        assert found.index_type == "hnsw"  # and a selective filter is scored exactly:
        assert found.strategy == "dense:exact (hybrid without query_text)"
        assert found.hits[0].id == "d4#0" and {h.metadata["lang"] for h in found.hits} == {"fr"}
        found = await client.search("kb", unit(5), 50, where={"lang": ["en", "de"]})
        assert len(found.hits) == 40 and found.hits[0].id == "d5#0"
        assert (await client.search("kb", unit(5), 5, where={"lang": "xx"})).hits == []
        found = await client.search("kb", unit(7), 3, ef_search=3)
        assert found.hits[0].id == "d7#0" and found.version == stats.version
    finally:
        await stop(service, client)


def text_passage(pid: str, text: str, vector: np.ndarray, **metadata: str) -> retrieve_pb2.Passage:
    return retrieve_pb2.Passage(
        id=pid, document_id=pid.split("#")[0], chunk=0, text=text, metadata=metadata,
        vector=vector.tobytes(),
    )  # fmt: skip


async def test_sparse_and_hybrid_search_over_grpc(tmp_path) -> None:
    service, client = await start(tmp_path)
    query, question = unit(5), "what does error E-1042 mean?"
    try:
        await client.create_collection("kb", DIM)
        await client.upsert(
            "kb",
            [text_passage(f"p{i}#0", f"ordinary passage {i} about leave", unit(i), lang="en")
             for i in range(30)]
            + [text_passage("code#0", "Error E-1042: the spool is full", -query, lang="en"),
               text_passage("fr#0", "Erreur E-1042 : la file est pleine", -query, lang="fr")],
        )  # fmt: skip
        dense = await client.search("kb", query, 5, mode="dense")
        assert dense.strategy == "dense:index" and "code#0" not in [h.id for h in dense.hits]
        sparse = await client.search("kb", None, 5, text=question, mode="sparse")
        assert sparse.strategy == "sparse:bm25" and sparse.hits[0].id == "code#0"
        assert sparse.hits[0].bm25_score > 0 and sparse.hits[0].score == 0  # no vector sent
        assert sparse.hits[0].text == "Error E-1042: the spool is full"
        hybrid = await client.search("kb", query, 5, text=question)  # the collection's default
        ids = [h.id for h in hybrid.hits]
        assert hybrid.strategy == "hybrid:index" and len(ids) == 5 and ids[0] == "p5#0"
        code = hybrid.hits[ids.index("code#0")]
        assert code.score == pytest.approx(-1.0, abs=1e-5) and code.rrf_score > 0
        assert [h.rrf_score for h in hybrid.hits] == sorted(
            (h.rrf_score for h in hybrid.hits), reverse=True
        )
        assert hybrid.version == (await client.stats("kb")).version
        # Filters hold for sparse hits as for dense ones.
        french = await client.search("kb", None, 5, where={"lang": "fr"}, text="E-1042",
                                     mode="sparse")  # fmt: skip
        assert [h.id for h in french.hits] == ["fr#0"]
        french = await client.search("kb", query, 5, where={"lang": "fr"}, text="E-1042")
        assert [h.id for h in french.hits] == ["fr#0"] and french.strategy == "hybrid:index"
        # Text no query syntax can hurt, in both modes that read it.
        for text in ['"foo" AND (', "NEAR(a b)", "*", "col:x", "🙂 東京", "'", "AND OR NOT"]:
            assert (await client.search("kb", None, 5, text=text, mode="sparse")).hits == []
            assert len((await client.search("kb", query, 5, text=text)).hits) == 5
        with pytest.raises(InvalidArgument, match="mode must be one of dense, sparse, hybrid"):
            await client.search("kb", query, 5, mode="bm25")

        # A collection's own default mode, reported as created; the server's fills the rest.
        made = await client.stub.CreateCollection(retrieve_pb2.CreateCollectionRequest(
            name="manual", dimension=DIM, search_mode=retrieve_pb2.SEARCH_MODE_SPARSE))  # fmt: skip
        assert made.search_mode == retrieve_pb2.SEARCH_MODE_SPARSE
        await client.upsert("manual", [text_passage("m#0", "E-1042 manual", unit(1))])
        found = await client.search("manual", None, 5, text="e-1042")
        assert found.strategy == "sparse:bm25" and [h.id for h in found.hits] == ["m#0"]
        listed = await client.stub.ListCollections(retrieve_pb2.ListCollectionsRequest())
        assert {c.name: c.search_mode for c in listed.collections} == {
            "kb": retrieve_pb2.SEARCH_MODE_HYBRID,
            "manual": retrieve_pb2.SEARCH_MODE_SPARSE,
        }

        # The text index follows a replacement and a delete, and survives a restart.
        await client.upsert("kb", [text_passage("code#0", "Error E-2000 now", -query)])
        await client.delete("kb", ids=["fr#0"])
    finally:
        await stop(service, client)

    service, client = await start(tmp_path, default_search_mode="dense")
    try:
        assert (await client.search("kb", None, 5, text="E-1042", mode="sparse")).hits == []
        found = await client.search("kb", None, 5, text="E-2000", mode="sparse")
        assert [h.id for h in found.hits] == ["code#0"]
        # The server's default now says dense for "kb"; "manual" keeps its own.
        assert (await client.search("kb", query, 5, text="E-2000")).strategy == "dense:index"
        found = await client.search("manual", None, 5, text="manual")
        assert found.strategy == "sparse:bm25"
    finally:
        await stop(service, client)
