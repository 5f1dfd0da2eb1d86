"""Retrieve at scale: Flat, HNSW and IVF over N x 384 vectors, through gRPC and in-process FAISS.

One run measures, side by side:
- recall@10 against exact search, on clustered synthetic queries and on real questions
  (corpus/questions.csv embedded with the default model, searched against the handbook's real
  chunk embeddings mixed into the synthetic vectors);
- P50/P99 latency of single queries, one at a time, through the retrieve service (gRPC, a real
  process on loopback, returning passages from SQLite) and through the same FAISS index
  in-process (the service's overhead is the difference);
- the service's start-up load time and resident memory per index type, the in-process build
  time of each index, the store's bulk-load rate and the gRPC upsert throughput.

The service's own code paths do the work: passages go into its SQLite store in big batches
(PassageStore.upsert), HNSW and IVF are built once here and written with the service's snapshot
writer, and the service loads them at start as it would after a restart (flat is loaded from
SQLite). Usage:

    nice -n 10 .venv/bin/python benchmarks/retrieve_scale.py              # 1,000,000 vectors
    .venv/bin/python benchmarks/retrieve_scale.py --n 20000 --queries 200  # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


from ragline.chunking import chunk_text  # noqa: E402
from ragline.clients import RetrieveClient, RetrieveStageClient, wait_for_serving  # noqa: E402
from ragline.types import Passage  # noqa: E402
from services.retrieve import snapshots  # noqa: E402
from services.retrieve.store import PassageIn, PassageStore  # noqa: E402

COLLECTION = "bench"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def clustered(
    n: int, clusters: int, seed: int, spread: float, real: np.ndarray, isotropic: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors in ``clusters`` clusters (centres from seed 1, so data and queries share
    them) and their labels.

    embedding-like (default): centres and spreads drawn from the principal components of the
    real handbook embeddings (their mean, directions and variances), plus a little isotropic
    noise, so the synthetic passages live where real embeddings do, with their low intrinsic
    dimension, and crowd the real chunks' neighbourhoods. isotropic: centres uniform on the
    sphere with isotropic noise in all 384 dimensions (``spread`` per dimension); near-ties
    everywhere, the worst case for graph indexes."""
    dim = real.shape[1]
    crng, rng = np.random.default_rng(1), np.random.default_rng(seed)
    mean = real.mean(axis=0)
    _, sv, basis = np.linalg.svd(real - mean, full_matrices=False)
    scale = (sv / np.sqrt(len(real))).astype(np.float32)
    if isotropic:
        centres = crng.standard_normal((clusters, dim)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    else:
        centres = (
            mean + (crng.standard_normal((clusters, len(sv))).astype(np.float32) * scale) @ basis
        )
    out = np.empty((n, dim), dtype=np.float32)
    labels = rng.integers(0, clusters, n)
    for start in range(0, n, 100_000):
        end = min(n, start + 100_000)
        block = centres[labels[start:end]].copy()
        if isotropic:
            block += spread * rng.standard_normal((end - start, dim)).astype(np.float32)
        else:
            z = rng.standard_normal((end - start, len(sv))).astype(np.float32)
            block += 0.5 * (z * scale) @ basis
            block += 0.01 * rng.standard_normal((end - start, dim)).astype(np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start:end] = block
    return out, labels


def real_embeddings() -> tuple[list[str], np.ndarray, np.ndarray]:
    """Chunks of the sample handbook and the sample questions, embedded with the default model."""
    from ragline.models import DEFAULT_EMBED_MODEL, resolve_embed_model
    from services.embed.model import EmbeddingModel

    model = EmbeddingModel(resolve_embed_model(DEFAULT_EMBED_MODEL, Path(tempfile.mkdtemp())))
    texts = [
        c.text for page in sorted((REPO / "corpus" / "handbook").glob("*.md"))
        for c in chunk_text(page.read_text())
    ]  # fmt: skip
    with (REPO / "corpus" / "questions.csv").open() as f:
        questions = [row["question"] for row in csv.DictReader(f)]
    passages = np.concatenate([model.embed(texts[i : i + 32])[0] for i in range(0, len(texts), 32)])
    queries = model.embed(questions, "query")[0]
    return texts, passages.astype(np.float32), queries.astype(np.float32)


def bulk_load(store: PassageStore, vectors: np.ndarray, labels: np.ndarray, texts: list[str],
              batch: int) -> np.ndarray:  # fmt: skip
    """Everything into the service's store, ``batch`` passages per transaction; the rowids."""
    rowids = np.empty(len(vectors), dtype=np.int64)
    for start in range(0, len(vectors), batch):
        end = min(len(vectors), start + batch)
        passages = [
            PassageIn(
                f"p{i}",
                f"doc{i // 8}",
                i % 8,
                texts[i] if i < len(texts) else f"synthetic passage {i} of cluster {labels[i]}",
                {"cluster": str(labels[i])},
                vectors[i],
            )
            for i in range(start, end)
        ]
        rowids[start:end] = store.upsert(COLLECTION, passages, []).added_rowids
        if (start // batch) % 20 == 0:
            log(f"  stored {end:,} / {len(vectors):,}")
    return rowids


def build(kind: str, vectors: np.ndarray, ids: np.ndarray, args) -> tuple[faiss.Index, float]:
    t0 = time.perf_counter()
    d = vectors.shape[1]
    if kind == "hnsw":
        inner = faiss.IndexHNSWFlat(d, args.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = args.ef_construction
    elif kind == "ivf":
        inner = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, args.nlist, faiss.METRIC_INNER_PRODUCT)
        inner.cp.niter = 10
        inner.cp.max_points_per_centroid = 64
        inner.train(vectors)
    else:
        inner = faiss.IndexFlatIP(d)
    index = faiss.IndexIDMap2(inner)
    for start in range(0, len(vectors), 100_000):  # progress for the long HNSW build
        index.add_with_ids(vectors[start : start + 100_000], ids[start : start + 100_000])
        if kind == "hnsw":
            log(f"  hnsw: {min(start + 100_000, len(vectors)):,} added")
    return index, time.perf_counter() - t0


def params(kind: str, value: int) -> faiss.SearchParameters | None:
    if kind == "hnsw":
        return faiss.SearchParametersHNSW(efSearch=value)
    if kind == "ivf":
        return faiss.SearchParametersIVF(nprobe=value)
    return None


def settings_of(kind: str, args) -> list[int]:
    """The per-request search parameter values measured for ``kind`` (ef_search / nprobe)."""
    if kind == "hnsw":
        return [int(v) for v in args.ef_search.split(",")]
    if kind == "ivf":
        return [int(v) for v in args.nprobe.split(",")]
    return [0]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def recall(found: list[list[int]], truth: np.ndarray, k: int = 10) -> float:
    return float(
        np.mean(
            [len(set(f[:k]) & set(t[:k].tolist())) / k for f, t in zip(found, truth, strict=True)]
        )
    )


def inprocess(index: faiss.Index, queries: np.ndarray, kind: str, value: int, args):
    faiss.omp_set_num_threads(1)  # one query at a time, as the service runs them
    sp = params(kind, value)
    lat, found = [], []
    for q in queries:
        t0 = time.perf_counter()
        _, ids = index.search(q[None, :], 10, params=sp)
        lat.append((time.perf_counter() - t0) * 1000)
        found.append(ids[0].tolist())
    faiss.omp_set_num_threads(args.threads)
    return lat, found


def rss_mib(pid: int) -> tuple[float, float]:
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def through_grpc(kind: str, data_dir: Path, queries: np.ndarray, rowid_of: dict, args,
                       upserts: int = 0, dim: int = 384) -> dict:  # fmt: skip
    port = free_port()
    cmd = [
        sys.executable, "-m", "services.retrieve", "--port", str(port), "--data-dir",
        str(data_dir), "--index-kind", kind, "--workers", "2", "--build-threads", "1",
        "--rebuild-min-changes", str(10**9), "--log-level", "warning",
    ]  # fmt: skip
    env = {**os.environ, "OTEL_SDK_DISABLED": "true", "RAGLINE_LOG_FORMAT": "text"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env)  # noqa: ASYNC220 (no work meanwhile)
    address = f"127.0.0.1:{port}"
    client = RetrieveClient(address, max_message_mb=64)
    out: dict = {}
    try:
        await wait_for_serving(address, "ragline.v1.Retrieve", timeout=1800)
        out["load_s"] = time.perf_counter() - t0
        out["rss_mib"], out["peak_rss_mib"] = rss_mib(proc.pid)
        stats = await client.stats(COLLECTION)
        assert stats.index_type == kind and stats.indexed == stats.count, stats
        for q in queries[:20]:  # warm the channel and the page cache
            await client.search(COLLECTION, q, 10)
        # The floor: a gRPC round trip that does no work (health check, same interceptors).
        floor = []
        for _ in range(300):
            t = time.perf_counter()
            await client.serving()
            floor.append((time.perf_counter() - t) * 1000)
        out["floor_p50"] = pct(floor, 50)
        for value in settings_of(kind, args):  # per-request ef_search / nprobe
            extra = {"ef_search": value} if kind == "hnsw" else {"nprobe": value}
            lat, found = [], []
            for q in queries:
                t = time.perf_counter()
                resp = await client.search(COLLECTION, q, 10, **(extra if value else {}))
                lat.append((time.perf_counter() - t) * 1000)
                found.append([rowid_of[h.id] for h in resp.hits])
            out[value] = lat, found
        if kind != "flat":  # a selective filter: one cluster (~n / clusters passages)
            flat_lat = []
            for i, q in enumerate(queries[:200]):
                t = time.perf_counter()
                resp = await client.search(COLLECTION, q, 10, where={"cluster": str(i)})
                flat_lat.append((time.perf_counter() - t) * 1000)
            out["filtered_lat"], out["filtered_strategy"] = flat_lat, resp.strategy
        if upserts:
            rng = np.random.default_rng(7)
            vecs = rng.standard_normal((upserts, dim)).astype(np.float32)
            writer = RetrieveStageClient.connect(address)  # takes ragline's own Passage
            t = time.perf_counter()
            for start in range(0, upserts, args.upsert_batch):
                batch = [
                    Passage(
                        f"new{i}",
                        f"new{i // 8}",
                        i % 8,
                        f"new passage {i}",
                        vecs[i],
                        {"cluster": "new"},
                    )  # fmt: skip
                    for i in range(start, min(upserts, start + args.upsert_batch))
                ]
                await writer.upsert(COLLECTION, batch, timeout=600)
            out["upsert_per_s"] = upserts / (time.perf_counter() - t)
            await writer.close()
    finally:
        await client.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    return out


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="synthetic vectors")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--data", choices=["embedding-like", "isotropic"], default="embedding-like")
    parser.add_argument("--spread", type=float, default=0.06, help="isotropic: noise per dimension")
    parser.add_argument("--queries", type=int, default=1000, help="synthetic queries")
    parser.add_argument("--flat-queries", type=int, default=100, help="queries timed on flat")
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=64)
    parser.add_argument("--ef-search", default="64,128", help="HNSW values to measure")
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--nprobe", default="16,64", help="IVF values to measure")
    parser.add_argument("--threads", type=int, default=2, help="FAISS threads for builds")
    parser.add_argument("--batch", type=int, default=10_000, help="passages per store batch")
    parser.add_argument("--upserts", type=int, default=20_000, help="gRPC upserts timed")
    parser.add_argument("--upsert-batch", type=int, default=256)
    parser.add_argument("--kinds", default="flat,hnsw,ivf")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp dir")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    kinds = args.kinds.split(",")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ragline-scale-"))
    results: dict = {
        "n": args.n,
        "dim": args.dim,
        "args": {k: str(v) for k, v in vars(args).items()},
    }

    log(f"{args.n:,} x {args.dim} {args.data} clustered vectors ({args.clusters} clusters)")
    texts, real, real_queries = real_embeddings()
    iso = args.data == "isotropic"
    synth, labels = clustered(args.n, args.clusters, 3, args.spread, real, iso)
    vectors = np.concatenate([real, synth])  # the handbook's chunks come first: p0..p{m-1}
    labels = np.concatenate([np.full(len(real), -1), labels])
    del synth
    # Same centres, other draws: queries near the data but not in it.
    qsynth, _ = clustered(args.queries, args.clusters, 2, args.spread, real, iso)

    log(f"bulk load into the service's SQLite store at {work} (batches of {args.batch:,})")
    store = PassageStore(work, log_keep=4 * len(vectors))
    store.create_collection(COLLECTION, args.dim, exist_ok=False)
    t0 = time.perf_counter()
    rowids = bulk_load(store, vectors, labels, texts, args.batch)
    results["store_load_per_s"] = len(vectors) / (time.perf_counter() - t0)
    version = store.collection(COLLECTION).version
    store.close()
    rowid_of = {f"p{i}": int(r) for i, r in enumerate(rowids)}
    log(f"  {results['store_load_per_s']:,.0f} passages/s")

    log("exact ground truth (flat, batched)")
    flat, results["build_s_flat"] = build("flat", vectors, rowids, args)
    truth = flat.search(qsynth, 10)[1]
    truth_real = flat.search(real_queries, 10)[1]

    table = []
    for kind in kinds:
        if kind == "flat":
            index, build_s = flat, results["build_s_flat"]
        else:
            log(f"building {kind} in-process ({args.threads} threads)")
            index, build_s = build(kind, vectors, rowids, args)
            header = snapshots.SnapshotHeader(COLLECTION, args.dim, kind, version, index.ntotal)
            t0 = time.perf_counter()
            snapshots.write(work / "snapshots", header, index)
            log(f"  built in {build_s:.0f} s; snapshot written in {time.perf_counter() - t0:.1f} s")
        nq = args.flat_queries if kind == "flat" else len(qsynth)
        log(f"{kind}: service start-up and {nq} queries through gRPC")
        last = kind == kinds[-1]
        svc = await through_grpc(
            kind, work, qsynth[:nq], rowid_of, args, args.upserts if last else 0, args.dim
        )
        for value in settings_of(kind, args):
            lat_in, found_in = inprocess(index, qsynth[:nq], kind, value, args)
            _, found_real = inprocess(index, real_queries, kind, value, args)
            lat, found = svc[value]
            name = {"hnsw": f"hnsw ef_search={value}", "ivf": f"ivf nprobe={value}"}
            row = {
                "kind": name.get(kind, kind),
                "build_s": build_s,
                "recall_inproc": recall(found_in, truth[:nq]),
                "recall_grpc": recall(found, truth[:nq]),
                "recall_real_questions": recall(found_real, truth_real),
                "p50_inproc": pct(lat_in, 50),
                "p99_inproc": pct(lat_in, 99),
                "p50_grpc": pct(lat, 50),
                "p99_grpc": pct(lat, 99),
                "load_s": svc["load_s"],
                "rss_mib": svc["rss_mib"],
                "peak_rss_mib": svc["peak_rss_mib"],
            }
            if "filtered_lat" in svc:
                row["filtered_p50"] = pct(svc["filtered_lat"], 50)
                row["filtered_p99"] = pct(svc["filtered_lat"], 99)
                row["filtered_strategy"] = svc["filtered_strategy"]
            table.append(row)
            log(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
        if "upsert_per_s" in svc:
            results["grpc_upsert_per_s"] = svc["upsert_per_s"]
        results.setdefault("grpc_floor_p50", {})[kind] = svc["floor_p50"]
        if kind != "flat":
            del index
    results["rows"] = table

    print()
    print(f"retrieve at {len(vectors):,} x {args.dim} ({args.n:,} {args.data} + {len(real)} real "
          f"handbook chunks); {len(qsynth)} synthetic queries ({args.flat_queries} on flat), "
          f"{len(real_queries)} real questions; IVF {args.nlist} lists, HNSW M {args.hnsw_m} "
          f"efConstruction {args.ef_construction}")  # fmt: skip
    print()
    print("| index | recall@10 in-proc | recall@10 gRPC | recall@10 real q | P50 in-proc ms "
          "| P50 gRPC ms | overhead ms | P99 in-proc ms | P99 gRPC ms | build s | load s "
          "| RSS MiB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(
            f"| {r['kind']} | {r['recall_inproc']:.3f} | {r['recall_grpc']:.3f} | "
            f"{r['recall_real_questions']:.3f} | {r['p50_inproc']:.2f} | {r['p50_grpc']:.2f} | "
            f"{r['p50_grpc'] - r['p50_inproc']:+.2f} | {r['p99_inproc']:.2f} | "
            f"{r['p99_grpc']:.2f} | {r['build_s']:.0f} | {r['load_s']:.1f} | "
            f"{r['rss_mib']:.0f} |"
        )
    print()
    shown = set()
    for r in table:
        if "filtered_p50" in r and r["kind"].split()[0] not in shown:
            shown.add(r["kind"].split()[0])
            print(f"{r['kind']}: one-cluster filter ({r['filtered_strategy']}) "
                  f"P50 {r['filtered_p50']:.2f} ms, P99 {r['filtered_p99']:.2f} ms")  # fmt: skip
    floors = ", ".join(f"{k} {v:.2f}" for k, v in results["grpc_floor_p50"].items())
    print(f"gRPC round trip doing no work (health check) P50 ms, per service run: {floors}")
    print(f"store bulk load: {results['store_load_per_s']:,.0f} passages/s "
          f"(batches of {args.batch:,}, one transaction each)")  # fmt: skip
    if "grpc_upsert_per_s" in results:
        print(f"gRPC upsert into the {kinds[-1]} collection: {results['grpc_upsert_per_s']:,.0f} "
              f"passages/s (batches of {args.upsert_batch}, acknowledged = durable)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if not args.workdir:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
