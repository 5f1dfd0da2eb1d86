"""Retrieve on PostgreSQL, with real processes: replicas on separate data directories (standing in
for separate nodes) share one real PostgreSQL server on loopback; every replica writes, and
each follows the others' writes through the change log (docs/decisions/0012).

- two replicas converge within the staleness bound, whichever of them is written to;
- kill -9 of a replica during writes loses no acknowledged write;
- kill -9 of PostgreSQL itself during writes loses no acknowledged write, and the replicas
  reconnect by themselves once it is back.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time

import grpc
import pytest

from ragline.clients import RetrieveClient, wait_for_serving
from services.retrieve.local_postgres import LocalPostgres
from tests.conftest import ServiceProcess, free_port
from tests.integration.test_retrieve_durability import DIM, doc_state, document, vec, writer_loop

pytestmark = pytest.mark.slow
SERVICE = "ragline.v1.Retrieve"
# docs/decisions/0012: NOTIFY wakes a follower at once; refresh_s is the fallback poll, and 1 s
# covers applying the change on a busy 2-core machine.
REFRESH_S = 0.5
STALENESS_BOUND_S = REFRESH_S + 1.0


def launch(tmp_path, env, dsn: str, name: str) -> tuple[ServiceProcess, str]:
    port = free_port()
    args = ["--port", str(port), "--data-dir", str(tmp_path / name), "--store", "postgres",
            "--postgres-dsn", dsn, "--refresh-s", str(REFRESH_S)]  # fmt: skip
    return ServiceProcess("retrieve", args, tmp_path, env, label=name), f"127.0.0.1:{port}"


async def until_acknowledged(acked: dict, writers: list, n: int, extra_s: float) -> None:
    """Waits until ``n`` documents were acknowledged (however slow the machine), then a random
    moment more: what a kill lands in is a stream of writes, not their start."""
    deadline = time.monotonic() + 60
    while len(acked) < n:
        assert time.monotonic() < deadline and not any(w.done() for w in writers), writers
        await asyncio.sleep(0.02)
    await asyncio.sleep(extra_s)


async def caught_up(clients: list[RetrieveClient], timeout: float = 30) -> int:
    """Waits until every replica's index reflects the collection's last version; returns it."""
    deadline = time.monotonic() + timeout
    while True:
        stats = [await c.stats("kb") for c in clients]
        if len({s.version for s in stats}) == 1 and all(
            s.indexed_version == s.version for s in stats
        ):
            return stats[0].version
        assert time.monotonic() < deadline, [(s.version, s.indexed_version) for s in stats]
        await asyncio.sleep(0.05)


async def test_replicas_on_separate_directories_converge_within_the_bound(
    base_env, tmp_path, pg_dsn
) -> None:
    (a, addr_a), (b, addr_b) = (launch(tmp_path, base_env, pg_dsn, n) for n in ("r-a", "r-b"))
    clients = [RetrieveClient(addr_a), RetrieveClient(addr_b)]
    try:
        await asyncio.gather(*(wait_for_serving(x, SERVICE, 120) for x in (addr_a, addr_b)))
        await clients[0].create_collection("kb", DIM)
        await clients[1].create_collection("kb", DIM)  # exist_ok: the same collection
        lags = []
        for i in range(20):
            writer, reader = clients[i % 2], clients[1 - i % 2]  # no replica is special
            passages, docs = document(f"d{i}", 1, 2)
            await writer.upsert("kb", passages, docs)
            # The writer serves its own write at once (read-your-writes on one replica) ...
            top = (await writer.search("kb", vec(hash((f"d{i}", 1, 0)) % 2**32), 1)).hits
            assert top[0].id == f"d{i}#0", top
            # ... and the other replica within the bound.
            start = time.monotonic()
            while True:
                hits = (await reader.search("kb", vec(hash((f"d{i}", 1, 0)) % 2**32), 1)).hits
                if hits and hits[0].id == f"d{i}#0":
                    break
                assert time.monotonic() - start < STALENESS_BOUND_S, f"d{i} not on the other"
                await asyncio.sleep(0.01)
            lags.append(time.monotonic() - start)
        lags.sort()
        print(f"staleness over 20 writes: P50 {lags[10] * 1000:.0f} ms, max {lags[-1] * 1000:.0f}")

        # Both write at once: PostgreSQL orders them; both replicas end at the same state.
        rng = random.Random(21)
        acked: dict = {}
        inflight: list[dict] = [{}, {}]
        writers = [
            asyncio.ensure_future(
                writer_loop(c, [f"w{w}-{i}" for i in range(6)], acked, inflight[w], rng)
            )
            for w, c in enumerate(clients)
        ]
        await until_acknowledged(acked, writers, 10, 0.5)  # both writing at once
        for w in writers:
            w.cancel()
        await asyncio.gather(*writers, return_exceptions=True)
        await caught_up(clients)
        # A write cancelled in flight may or may not have landed: the rest are as acknowledged.
        settled = [d for d in acked if not any(d in pending for pending in inflight)]
        assert len(settled) >= 8
        for client in clients:
            for doc in settled:
                assert await doc_state(client, doc) == acked[doc], doc
        for doc in acked:  # and both replicas agree on every document, in flight or not
            assert await doc_state(clients[0], doc) == await doc_state(clients[1], doc), doc
        counts = [(await c.stats("kb")).count for c in clients]
        assert counts[0] == counts[1] and counts[0] > 40
    finally:
        for c in clients:
            await c.close()
        a.stop()
        b.stop()


async def test_kill_9_of_a_replica_during_writes_loses_no_acknowledged_write(
    base_env, tmp_path, pg_dsn
) -> None:
    rng = random.Random(20261201)
    (a, addr_a), (b, addr_b) = (launch(tmp_path, base_env, pg_dsn, n) for n in ("k-a", "k-b"))
    clients = [RetrieveClient(addr_a), RetrieveClient(addr_b)]
    try:
        await asyncio.gather(*(wait_for_serving(x, SERVICE, 120) for x in (addr_a, addr_b)))
        await clients[0].create_collection("kb", DIM)
        acked: dict = {}
        inflight: list[dict] = [{}, {}]
        writers = [
            asyncio.ensure_future(
                writer_loop(clients[0], [f"w{w}-{i}" for i in range(10)], acked, inflight[w], rng)
            )
            for w in range(2)
        ]
        await until_acknowledged(acked, writers, 4, rng.uniform(0.0, 1.0))
        a.proc.send_signal(signal.SIGKILL)
        done = await asyncio.wait_for(asyncio.gather(*writers, return_exceptions=True), 30)
        assert all(isinstance(e, grpc.aio.AioRpcError) for e in done), done
        assert len(acked) > 3, "writes were acknowledged before the kill"
        # The survivor has every acknowledged write (an in-flight one may or may not be there).
        await caught_up(clients[1:])
        for doc, expected in acked.items():
            if not any(doc in pending for pending in inflight):
                assert await doc_state(clients[1], doc) == expected, doc
        # And the killed replica, restarted on its own directory, rejoins at the same state.
        a.stop()
        a, addr_a = launch(tmp_path, base_env, pg_dsn, "k-a")
        await clients[0].close()
        clients[0] = RetrieveClient(addr_a)
        await wait_for_serving(addr_a, SERVICE, 120)
        await caught_up(clients)
        for doc in acked:
            assert await doc_state(clients[0], doc) == await doc_state(clients[1], doc), doc
    finally:
        for c in clients:
            await c.close()
        a.stop()
        b.stop()


async def test_kill_9_of_postgresql_during_writes_loses_no_acknowledged_write(
    base_env, tmp_path
) -> None:
    server = LocalPostgres(free_port()).start()
    dsn = server.create_database("ragline")
    rng = random.Random(7)
    (a, addr_a), (b, addr_b) = (launch(tmp_path, base_env, dsn, n) for n in ("p-a", "p-b"))
    clients = [RetrieveClient(addr_a), RetrieveClient(addr_b)]
    try:
        await asyncio.gather(*(wait_for_serving(x, SERVICE, 120) for x in (addr_a, addr_b)))
        await clients[0].create_collection("kb", DIM)
        acked: dict = {}
        inflight: list[dict] = [{}, {}]
        writers = [
            asyncio.ensure_future(
                writer_loop(c, [f"w{w}-{i}" for i in range(10)], acked, inflight[w], rng)
            )
            for w, c in enumerate(clients)
        ]
        await until_acknowledged(acked, writers, 4, rng.uniform(0.0, 1.0))
        await asyncio.to_thread(server.kill)  # the postmaster and every backend, no checkpoint
        done = await asyncio.wait_for(asyncio.gather(*writers, return_exceptions=True), 30)
        codes = {e.code() for e in done if isinstance(e, grpc.aio.AioRpcError)}
        assert codes == {grpc.StatusCode.UNAVAILABLE}, done  # said plainly, and retryable
        assert len(acked) > 3, "writes were acknowledged before the kill"
        error = None
        try:
            await clients[1].search("kb", vec(1), 1)
        except grpc.aio.AioRpcError as exc:
            error = exc
        assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE
        assert "PostgreSQL" in error.details() and "***" not in error.details(), error.details()

        await asyncio.to_thread(server.start)  # crash recovery from the WAL
        # The replicas reconnect on their own: the next calls succeed.
        deadline = time.monotonic() + 30
        while True:
            try:
                await caught_up(clients, timeout=5)
                break
            except grpc.aio.AioRpcError:
                assert time.monotonic() < deadline, "the replicas never reconnected"
                await asyncio.sleep(0.2)
        for client in clients:
            for doc, expected in acked.items():
                if not any(doc in pending for pending in inflight):
                    assert await doc_state(client, doc) == expected, doc
        # Writes work again, on either replica.
        passages, docs = document("after", 1, 2)
        await clients[1].upsert("kb", passages, docs)
        await caught_up(clients)
        assert await doc_state(clients[0], "after") == (1, 2)
    finally:
        for c in clients:
            await c.close()
        a.stop()
        b.stop()
        server.remove()


async def test_an_unreachable_database_is_a_clear_error_at_start(base_env, tmp_path) -> None:
    dsn = f"postgresql://ragline:secret@127.0.0.1:{free_port()}/ragline"
    env = {**base_env, "RAGLINE_RETRIEVE_POSTGRES_START_WAIT_S": "1"}
    proc, _ = launch(tmp_path, env, dsn, "nodb")
    assert proc.proc.wait(timeout=60) == 2
    log = proc.log()
    assert "PostgreSQL at postgresql://ragline:***@127.0.0.1" in log, log
    assert "secret" not in log and "Traceback" not in log, log


async def test_sharded_search_equals_unsharded_search_on_exact_indexes(tmp_path, pg_dsn) -> None:
    """One database; an unsharded replica and two shard replicas (--shards 2) over it, real gRPC
    servers in this process. Dense and filtered searches through the sharded client give exactly
    the unsharded hits; each shard indexes its own half, and the halves are the whole."""
    import numpy as np

    from ragline.clients import RetrieveStageClient, ShardedRetrieveClient
    from ragline.types import Passage
    from services.retrieve.server import build
    from services.retrieve.settings import RetrieveSettings

    def settings(name: str, **kw) -> RetrieveSettings:
        return RetrieveSettings(port=0, data_dir=tmp_path / name, store="postgres",
                                postgres_dsn=pg_dsn, index_kind="flat", refresh_s=0.2,
                                **kw)  # fmt: skip

    services = [build(settings("whole")), build(settings("s0", shards=2, shard=0)),
                build(settings("s1", shards=2, shard=1))]  # fmt: skip
    ports = [await s.start() for s in services]
    whole = RetrieveStageClient.connect(f"127.0.0.1:{ports[0]}")
    sharded = ShardedRetrieveClient.connect(f"127.0.0.1:{ports[1]};127.0.0.1:{ports[2]}")
    try:
        await whole.create_collection("kb", DIM)
        rng = np.random.default_rng(3)
        vectors = rng.standard_normal((400, DIM)).astype(np.float32)
        passages = [
            Passage(f"d{i // 4}#{i % 4}", f"d{i // 4}", i % 4, f"passage {i} word{i % 7}",
                    vectors[i] / np.linalg.norm(vectors[i]), {"group": str(i % 3)})
            for i in range(400)
        ]  # fmt: skip
        for start in range(0, 400, 100):
            await sharded.upsert("kb", passages[start : start + 100])  # writes: any replica
        clients = [RetrieveClient(f"127.0.0.1:{p}") for p in ports]
        await caught_up(clients)
        indexed = [(await c.stats("kb")).indexed for c in clients]
        assert indexed[0] == 400 and indexed[1] + indexed[2] == 400 and 0 < indexed[1] < 400
        for c in clients:
            await c.close()
        for q in range(20):
            query = rng.standard_normal(DIM).astype(np.float32)
            for where in (None, {"group": "1"}):
                a = await whole.search("kb", query, 10, where=where, mode="dense")
                b = await sharded.search("kb", query, 10, where=where, mode="dense")
                assert [h.id for h in a.hits] == [h.id for h in b.hits], (q, where)
                np.testing.assert_allclose([h.score for h in a.hits], [h.score for h in b.hits],
                                           atol=1e-6)  # fmt: skip
        # Sparse: the shards' full-text matches are disjoint and together the whole's.
        a = await whole.search("kb", None, 100, text="word3", mode="sparse")
        b = await sharded.search("kb", None, 100, text="word3", mode="sparse")
        assert sorted(h.id for h in a.hits) == sorted(h.id for h in b.hits) and len(a.hits) > 40
        assert "2 shards" in b.strategy
    finally:
        await whole.close()
        await sharded.close()
        for s in services:
            await s.stop()
