"""Retrieve on PostgreSQL next to SQLite, and sharded next to unsharded: the same data, one run.

    .venv/bin/python benchmarks/retrieve_postgres.py                       # 50,000 passages
    .venv/bin/python benchmarks/retrieve_postgres.py --n 4000 --queries 100 --writes 10  # quick

Starts a throwaway PostgreSQL (services/retrieve/local_postgres.py, loopback, fsync on) and
retrieve services as real processes, each with its own data directory:
- ``sqlite``: the embedded default (SQLite in its data dir);
- ``postgres-a`` and ``postgres-b``: two replicas of one postgres store (no replica special);
- ``shard-0`` and ``shard-1``: ``--shards 2`` over the same database, searched together through
  the edge's ``ShardedRetrieveClient`` (both halves asked at once, top-k merged).

Measured, in this order:
1. **Upserts**: the same passages through gRPC to ``sqlite`` and to ``postgres-a``, batches of
   ``--batch``, one at a time, each acknowledged only once durable: passages/s.
2. **Search**: the same queries, one at a time, against ``sqlite``, ``postgres-a`` and the two
   shards: P50/P99 ms, dense and hybrid; the sharded results' recall@10 against unsharded
   ``postgres-a`` (every index exact: ``--index-kind flat``, so 1.000 is the right answer).
3. **Staleness**: a write to ``postgres-a``, then the time until ``postgres-b`` serves it (the
   follower is woken by NOTIFY): P50 and max over ``--writes`` writes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ragline.clients import (  # noqa: E402
    RetrieveClient,
    RetrieveStageClient,
    ShardedRetrieveClient,
    wait_for_serving,
)
from ragline.types import Passage  # noqa: E402
from services.retrieve.local_postgres import LocalPostgres  # noqa: E402
from tests.conftest import ServiceProcess, free_port  # noqa: E402

COLLECTION = "bench"
SERVICE = "ragline.v1.Retrieve"
WORDS = [f"w{i:04d}" for i in range(5000)]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(values), p)) if values else float("nan")


def data(n: int, dim: int, seed: int = 1) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(n // 100, 1), dim)).astype(np.float32)
    vecs = centres[rng.integers(0, len(centres), n)] + 0.4 * rng.standard_normal((n, dim))
    vecs = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)
    texts = [" ".join(rng.choice(WORDS, 30)) for _ in range(n)]
    return vecs, texts


async def upsert_all(client: RetrieveStageClient, vecs, texts, batch: int) -> float:
    passages = [Passage(f"p{i}", f"d{i // 8}", i % 8, texts[i], vecs[i], {"g": str(i % 10)})
                for i in range(len(texts))]  # fmt: skip
    start = time.perf_counter()
    for i in range(0, len(passages), batch):
        await client.upsert(COLLECTION, passages[i : i + batch], timeout=120)
    return len(passages) / (time.perf_counter() - start)


async def timed_searches(client, queries, texts, mode: str) -> tuple[list[float], list[list[str]]]:
    times, found = [], []
    for q, text in zip(queries, texts, strict=True):
        start = time.perf_counter()
        result = await client.search(COLLECTION, q, 10, 30, text=text, mode=mode)
        times.append((time.perf_counter() - start) * 1000)
        found.append([h.id for h in result.hits])
    return times, found


async def caught_up(addresses: list[str], timeout: float = 600) -> None:
    clients = [RetrieveClient(a) for a in addresses]
    try:
        deadline = time.monotonic() + timeout
        while True:
            stats = [await c.stats(COLLECTION) for c in clients]
            if len({s.version for s in stats}) == 1 and all(
                s.indexed_version == s.version for s in stats
            ):
                return
            if time.monotonic() > deadline:
                raise TimeoutError([(s.version, s.indexed_version) for s in stats])
            await asyncio.sleep(0.1)
    finally:
        for c in clients:
            await c.close()


async def run(ns: argparse.Namespace, work: Path) -> None:
    pg = LocalPostgres(free_port()).start()
    dsn = pg.create_database("bench")
    procs: dict[str, ServiceProcess] = {}
    addr: dict[str, str] = {}
    try:
        common = ["--index-kind", "flat", "--refresh-s", "1", "--workers", "2"]
        layout = {
            "sqlite": [],
            "postgres-a": ["--store", "postgres", "--postgres-dsn", dsn],
            "postgres-b": ["--store", "postgres", "--postgres-dsn", dsn],
            "shard-0": ["--store", "postgres", "--postgres-dsn", dsn, "--shards", "2",
                        "--shard", "0"],
            "shard-1": ["--store", "postgres", "--postgres-dsn", dsn, "--shards", "2",
                        "--shard", "1"],
        }  # fmt: skip
        for name, extra in layout.items():
            port = free_port()
            args = ["--port", str(port), "--data-dir", str(work / name), *common, *extra]
            procs[name] = ServiceProcess("retrieve", args, work, {**_env()}, label=name)
            addr[name] = f"127.0.0.1:{port}"
        for a in addr.values():
            await wait_for_serving(a, SERVICE, timeout=120)
        log(f"services up: {', '.join(addr)}; PostgreSQL 127.0.0.1:{pg.port}")

        vecs, texts = data(ns.n, ns.dim)
        sqlite = RetrieveStageClient.connect(addr["sqlite"])
        pga = RetrieveStageClient.connect(addr["postgres-a"])
        pgb = RetrieveStageClient.connect(addr["postgres-b"])
        sharded = ShardedRetrieveClient.connect(f"{addr['shard-0']};{addr['shard-1']}")
        for c in (sqlite, pga):
            await c.create_collection(COLLECTION, ns.dim)
        rates = {}
        for name, client in (("sqlite", sqlite), ("postgres", pga)):
            rates[name] = await upsert_all(client, vecs, texts, ns.batch)
            log(f"{name}: {rates[name]:.0f} passages/s upserted")
        await caught_up([addr[n] for n in layout if n != "sqlite"])

        rng = np.random.default_rng(7)
        picks = rng.integers(0, ns.n, ns.queries)
        queries = vecs[picks] + 0.05 * rng.standard_normal((ns.queries, ns.dim)).astype(np.float32)
        qtexts = [" ".join(texts[i].split()[:4]) for i in picks]
        rows = []
        results: dict[tuple[str, str], list[list[str]]] = {}
        for mode in ("dense", "hybrid"):
            for name, client in (("sqlite", sqlite), ("postgres", pga),
                                 ("postgres, 2 shards", sharded)):  # fmt: skip
                await timed_searches(client, queries[:20], qtexts[:20], mode)  # warm
                times, found = await timed_searches(client, queries, qtexts, mode)
                results[(name, mode)] = found
                rows.append((name, mode, pct(times, 50), pct(times, 99)))
                log(f"{name} {mode}: P50 {pct(times, 50):.2f} ms, P99 {pct(times, 99):.2f} ms")

        def recall(a: str, b: str, mode: str) -> float:
            pairs = zip(results[(a, mode)], results[(b, mode)], strict=True)
            hits = [len(set(x) & set(y)) / max(len(y), 1) for x, y in pairs]
            return float(np.mean(hits))

        lags = []
        for i in range(ns.writes):
            v = rng.standard_normal(ns.dim).astype(np.float32)
            v /= np.linalg.norm(v)
            await pga.upsert(COLLECTION, [Passage(f"fresh{i}", f"fresh{i}", 0, "fresh", v)])
            start = time.perf_counter()
            while True:
                hits = (await pgb.search(COLLECTION, v, 1, mode="dense")).hits
                if hits and hits[0].id == f"fresh{i}":
                    break
                await asyncio.sleep(0.002)
            lags.append((time.perf_counter() - start) * 1000)

        print(f"{ns.n:,} passages of dimension {ns.dim}, flat (exact) indexes; {ns.queries} "
              f"queries one at a time, top 10; upserts in batches of {ns.batch}.\n")  # fmt: skip
        print("| store | upsert passages/s | vs SQLite |")
        print("|---|---:|---:|")
        print(f"| SQLite | {rates['sqlite']:,.0f} | 1.00x |")
        ratio = rates["postgres"] / rates["sqlite"]
        print(f"| PostgreSQL | {rates['postgres']:,.0f} | {ratio:.2f}x |")
        print()
        print("| searched | mode | P50 ms | P99 ms | recall@10 vs unsharded PostgreSQL |")
        print("|---|---|---:|---:|---:|")
        for name, mode, p50, p99 in rows:
            r = recall(name, "postgres", mode) if name != "postgres" else 1.0
            print(f"| {name} | {mode} | {p50:.2f} | {p99:.2f} | {r:.3f} |")
        print()
        print(f"Staleness (a write to one postgres replica until the other serves it, "
              f"{ns.writes} writes): P50 {pct(lags, 50):.0f} ms, max {max(lags):.0f} ms "
              f"(bound: refresh_s 1 s + apply).")  # fmt: skip
        for c in (sqlite, pga, pgb, sharded):
            await c.close()
    finally:
        for p in procs.values():
            p.stop()
        pg.remove()


def _env() -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAGLINE_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=50_000, help="passages")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=256, help="passages per upsert")
    parser.add_argument("--writes", type=int, default=50, help="writes timed for staleness")
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ragline-bench-pg-") as tmp:
        asyncio.run(run(ns, Path(tmp)))


if __name__ == "__main__":
    main()
