"""The edge's own cost: /chat answered from the answer cache, this tree against a baseline commit.

A cache hit touches no stage, so its latency is the edge's own work: HTTP, validation, the
cache key and lookup, the JSON answer. The script checks the baseline commit out into a
temporary git worktree, starts both stacks on loopback (four processes each, tracing off, the
same venv), ingests the sample handbook into both, asks every question of corpus/questions.csv
once (a miss, which stores the answer), then alternates rounds of cache-hit requests between
the two edges so that drift on a noisy machine hits both alike, and prints both side by side
with their ratio.

    .venv/bin/python benchmarks/edge_overhead.py --baseline 3a2eefb --requests 400 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ragline.clients import wait_for_serving  # noqa: E402
from tests.conftest import free_port  # noqa: E402

STAGES = ("embed", "retrieve", "generate")


def start_stack(tree: Path, env: dict[str, str], max_tokens: int):
    """The four services of ``tree`` (``python -m`` from it imports its own code first)."""
    ports = {n: free_port() for n in (*STAGES, "api")}
    quiet = dict(cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = [
        subprocess.Popen([sys.executable, "-m", f"services.{name}", "--port", str(ports[name]),
                          "--log-level", "WARNING"], **quiet)
        for name in STAGES
    ]  # fmt: skip
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "services.api", "--port", str(ports["api"]), "--log-level",
         "WARNING", "--max-tokens", str(max_tokens)]
        + [f"--{s}-address=127.0.0.1:{ports[s]}" for s in STAGES], **quiet,
    ))  # fmt: skip

    async def ready() -> None:
        await asyncio.gather(*(wait_for_serving(f"127.0.0.1:{ports[s]}", "", 120) for s in STAGES))

    asyncio.run(ready())
    base = f"http://127.0.0.1:{ports['api']}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    for page in sorted((ROOT / "corpus" / "handbook").glob("*.md")):
        r = httpx.post(f"{base}/documents", json={"document_id": page.name,
                       "text": page.read_text()}, timeout=120)  # fmt: skip
        r.raise_for_status()
    return procs, base


async def load(base: str, questions: list[str], requests: int, concurrency: int, hit: bool):
    latencies: list[float] = []
    errors: dict[str, int] = {}
    counter = iter(range(requests))
    async with httpx.AsyncClient(timeout=120) as client:

        async def worker() -> None:
            for i in counter:
                t0 = time.perf_counter()
                r = await client.post(f"{base}/chat", json={"query": questions[i % len(questions)]})
                if r.status_code == 200 and r.json()["cached"] is hit:
                    latencies.append(time.perf_counter() - t0)
                else:
                    why = f"{r.status_code} {r.text[:120]}"
                    errors[why] = errors.get(why, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return latencies, elapsed, errors


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--baseline", default="3a2eefb", help="commit to compare against")
    ap.add_argument("--requests", type=int, default=400, help="cache hits per edge per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ns = ap.parse_args()
    questions = [r["question"] for r in csv.DictReader((ROOT / "corpus" / "questions.csv").open())]
    worktree = Path(tempfile.mkdtemp(prefix="ragline-baseline-")) / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(worktree),
                    ns.baseline], check=True)  # fmt: skip
    arms = {f"baseline {ns.baseline}": worktree, "this tree": ROOT}
    stacks, procs = {}, []
    try:
        for name, tree in arms.items():
            env = {k: v for k, v in os.environ.items() if not k.startswith(("RAGLINE_", "OTEL_"))}
            env.update(RAGLINE_DATA_DIR=tempfile.mkdtemp(prefix="ragline-edge-"),
                       RAGLINE_LOG_FORMAT="text", OTEL_SDK_DISABLED="true")  # fmt: skip
            started, base = start_stack(tree, env, ns.max_tokens)
            procs += started
            stacks[name] = base
            # Every question once: a miss that stores the answer (both arms the same answers).
            _, _, errors = asyncio.run(load(base, questions, len(questions), 2, hit=False))
            if errors:
                raise SystemExit(f"{name}: warm-up answers failed or were cached: {errors}")
        results: dict[str, tuple[list[float], float, int]] = {n: ([], 0.0, 0) for n in stacks}
        for _ in range(ns.rounds):
            for name, base in stacks.items():
                lat, elapsed, errors = asyncio.run(
                    load(base, questions, ns.requests, ns.concurrency, hit=True)
                )
                seen, spent, failed = results[name]
                results[name] = (seen + lat, spent + elapsed, failed + sum(errors.values()))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)],
                       check=False)  # fmt: skip
    print(f"/chat cache hits: {ns.rounds} rounds x {ns.requests} per edge, concurrency "
          f"{ns.concurrency}, {len(questions)} questions, tracing off")  # fmt: skip
    print(f"{'edge':<22}{'hits/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'errors':>8}")
    row = {}
    for name, (lat, elapsed, errors) in results.items():
        row[name] = (len(lat) / elapsed, pct(lat, 50), pct(lat, 95), pct(lat, 99))
        rps, p50, p95, p99 = row[name]
        print(f"{name:<22}{rps:>9.1f}{p50:>9.2f}{p95:>9.2f}{p99:>9.2f}{errors:>8}")
    (b_rps, b50, b95, _), (t_rps, t50, t95, _) = row.values()
    print(f"this tree / baseline: hits/s {t_rps / b_rps:.3f}, p50 {t50 / b50:.3f}, "
          f"p95 {t95 / b95:.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
