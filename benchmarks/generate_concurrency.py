"""Generate: aggregate tokens/s and P95 time to first token at 1, 4, 16 and 64 concurrent streams.

Two generate servers run in turn as real processes on loopback with the default model (CPU,
llama.cpp): continuous batching (``--max-batch-size 16``) and the baseline of one sequence at
a time (``--max-batch-size 1``, what the walking skeleton did). Every level sends each client's
streams back to back until ``--requests`` streams finished, each asking for ``--max-tokens``
tokens at temperature 0 from a story prompt (which runs to the limit, so the output length is
fixed in practice; the table counts the tokens actually generated). One run prints both
tables and the ratios: batched/sequential at each level and batched N streams / batched 1.
Both servers queue every stream (``RAGLINE_GENERATE_MAX_QUEUE_WAIT_S`` raised): this measures
the scheduler's throughput and waits, not the admission that refuses what would wait over 5 s
in serving (at 64 streams on one sequence at a time, most would be refused).

    .venv/bin/python benchmarks/generate_concurrency.py
    .venv/bin/python benchmarks/generate_concurrency.py --levels 1,8 --max-tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ragline.clients import GenerateClient, sampling_params, wait_for_serving  # noqa: E402

TOPICS = ["a dragon who learns to cook", "a lighthouse keeper on Mars", "a clockwork fox",
          "two robots who open a bakery", "a city under the sea", "a very patient snail",
          "the last librarian", "a train that never stops"]  # fmt: skip


async def level(address: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    client = GenerateClient(address)
    ttft: list[float] = []
    tokens = 0
    sent = 0

    async def one(i: int) -> None:
        nonlocal tokens
        req = client.request(
            [{"role": "user", "content": f"Write a long story about {TOPICS[i % len(TOPICS)]}."}],
            sampling_params(max_tokens=max_tokens, temperature=0.0),
        )
        t0 = time.perf_counter()
        first = None
        async for chunk in client.stream(req, timeout=600):
            if first is None and chunk.text:
                first = time.perf_counter() - t0
            if chunk.HasField("usage"):
                tokens += chunk.usage.completion_tokens
        ttft.append(first if first is not None else time.perf_counter() - t0)

    async def worker() -> None:
        nonlocal sent
        while sent < requests:
            sent += 1
            await one(sent)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    await client.close()
    return {
        "concurrency": concurrency,
        "streams": len(ttft),
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "ttft_p50_ms": float(np.percentile(ttft, 50)) * 1000,
        "ttft_p95_ms": float(np.percentile(ttft, 95)) * 1000,
        "wall_s": wall,
    }


def serve(slots: int, port: int, log: Path, extra: list[str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAGLINE_GENERATE_")}
    env["RAGLINE_GENERATE_MAX_QUEUE_WAIT_S"] = "3600"  # queue everything: see the docstring
    env.setdefault("RAGLINE_DATA_DIR", str(log.parent / "data"))
    return subprocess.Popen(
        [sys.executable, "-m", "services.generate", "--port", str(port),
         "--max-batch-size", str(slots), "--max-queue", "256", "--log-level", "WARNING", *extra],
        cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default="1,4,16,64")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=0, help="streams per level (default 2x)")
    ap.add_argument("--slots", type=int, default=16, help="batched server's --max-batch-size")
    ap.add_argument("--json", type=Path)
    ap.add_argument("server_args", nargs="*", help="extra flags for both servers (after --)")
    ns = ap.parse_args(argv)
    levels = [int(x) for x in ns.levels.split(",")]
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="ragline-genbench-") as tmp:
        for label, slots in (("batched", ns.slots), ("sequential", 1)):
            port = free_port()
            proc = serve(slots, port, Path(tmp) / f"{label}.log", ns.server_args)
            try:
                asyncio.run(wait_for_serving(f"127.0.0.1:{port}", "ragline.v1.Generate", 120))
                rows = []
                for c in levels:
                    n = ns.requests or max(2 * c, 4)
                    row = asyncio.run(level(f"127.0.0.1:{port}", c, n, ns.max_tokens))
                    print(f"{label:10s} c={c:3d}: {row['tokens_per_s']:7.1f} tok/s, "
                          f"TTFT p95 {row['ttft_p95_ms']:8.0f} ms", flush=True)  # fmt: skip
                    rows.append(row)
                results[label] = rows
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    single = results["batched"][0]["tokens_per_s"]
    print()
    print(
        "| concurrent streams | batched tok/s | sequential tok/s | batched / sequential | "
        f"batched / batched at {levels[0]} | batched TTFT P95 | sequential TTFT P95 |"
    )
    print("|---|---|---|---|---|---|---|")
    for b, s in zip(results["batched"], results["sequential"], strict=True):
        print(
            f"| {b['concurrency']} | {b['tokens_per_s']:.1f} | {s['tokens_per_s']:.1f} | "
            f"{b['tokens_per_s'] / s['tokens_per_s']:.2f}x | {b['tokens_per_s'] / single:.2f}x | "
            f"{b['ttft_p95_ms']:.0f} ms | {s['ttft_p95_ms']:.0f} ms |"
        )
    if ns.json:
        ns.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
