"""Cost of tracing: /chat throughput and P95 with tracing off vs 100% sampled, in one run.

Starts the four services twice on loopback (OTEL_SDK_DISABLED=true, then every span recorded to
JSON-lines files with the default always-on sampler), ingests the sample handbook, and sends
the handbook's questions through POST /chat at a fixed concurrency. Short answers
(--max-tokens) keep generation from hiding the per-request overhead of tracing.

    .venv/bin/python benchmarks/tracing_cost.py --requests 60 --concurrency 4 --max-tokens 16
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

from loadtest.tracereport import attribute, format_report, read_files  # noqa: E402
from ragline.clients import wait_for_serving  # noqa: E402
from tests.conftest import free_port  # noqa: E402


def start_stack(env: dict[str, str], max_tokens: int) -> tuple[list[subprocess.Popen], str]:
    ports = {n: free_port() for n in ("embed", "retrieve", "generate", "api")}
    procs = []
    for name in ("embed", "retrieve", "generate"):
        procs.append(subprocess.Popen(
            [sys.executable, "-m", f"services.{name}", "--port", str(ports[name]),
             "--log-level", "WARNING"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))  # fmt: skip
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "services.api", "--port", str(ports["api"]), "--log-level",
         "WARNING", "--max-tokens", str(max_tokens)]
        + [f"--{s}-address=127.0.0.1:{ports[s]}" for s in ("embed", "retrieve", "generate")],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    ))  # fmt: skip

    async def ready() -> None:
        await asyncio.gather(
            *(
                wait_for_serving(f"127.0.0.1:{ports[s]}", "", 60)
                for s in ("embed", "retrieve", "generate")
            )  # noqa: E501
        )

    asyncio.run(ready())
    base = f"http://127.0.0.1:{ports['api']}"
    for _ in range(300):
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    for page in sorted((ROOT / "corpus" / "handbook").glob("*.md")):
        r = httpx.post(
            f"{base}/documents",
            json={"document_id": page.name, "text": page.read_text()},
            timeout=60,
        )  # noqa: E501
        r.raise_for_status()
    return procs, base


async def load(base: str, questions: list[str], requests: int, concurrency: int,
               answerer: str = ""):  # fmt: skip
    latencies: list[float] = []
    errors = 0
    counter = iter(range(requests))

    async with httpx.AsyncClient(timeout=120) as client:

        async def worker() -> None:
            nonlocal errors
            for i in counter:
                t0 = time.perf_counter()
                # no-cache: every request runs the stages (questions repeat within a run)
                body = {"query": questions[i % len(questions)]}
                if answerer:
                    body["answerer"] = answerer
                r = await client.post(f"{base}/chat", json=body,
                                      headers={"Cache-Control": "no-cache"})  # fmt: skip
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    latencies.sort()
    return len(latencies) / elapsed, latencies[int(0.95 * (len(latencies) - 1))] * 1000, errors


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument(
        "--answerer",
        default="",
        choices=["", "extractive", "generate", "auto"],
        help="the requests' answerer (default: the edge's, extractive)",
    )
    ns = ap.parse_args()
    questions = [r["question"] for r in csv.DictReader((ROOT / "corpus" / "questions.csv").open())]
    results = {}
    spans_dir = Path(tempfile.mkdtemp(prefix="ragline-trace-"))
    for mode in ("off", "on"):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAGLINE_", "OTEL_"))}
        env["RAGLINE_DATA_DIR"] = tempfile.mkdtemp(prefix=f"ragline-{mode}-")
        env["RAGLINE_LOG_FORMAT"] = "text"
        if mode == "off":
            env["OTEL_SDK_DISABLED"] = "true"
        else:
            env["RAGLINE_TRACE_FILE"] = str(spans_dir / "{service}.jsonl")
        procs, base = start_stack(env, ns.max_tokens)
        try:
            asyncio.run(load(base, questions, 8, ns.concurrency, ns.answerer))  # warm-up
            results[mode] = asyncio.run(load(base, questions, ns.requests, ns.concurrency,
                                             ns.answerer))  # fmt: skip
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(30)
    off, on = results["off"], results["on"]
    print(
        f"{ns.requests} /chat requests, concurrency {ns.concurrency}, max_tokens "
        f"{ns.max_tokens}, answerer {ns.answerer or 'the edge default (extractive)'}"
    )
    print(f"{'tracing':<10}{'req/s':>8}{'p95 ms':>10}{'errors':>8}")
    for mode, (rps, p95, errors) in results.items():
        print(f"{mode:<10}{rps:>8.2f}{p95:>10.1f}{errors:>8}")
    print(f"throughput on/off: {on[0] / off[0]:.3f}  (loss {1 - on[0] / off[0]:+.1%}); "
          f"p95 on/off: {on[1] / off[1]:.3f}")  # fmt: skip
    print("\nattribution of the traced run (ragline trace report):")
    print(format_report(attribute(read_files(sorted(spans_dir.glob("*.jsonl"))))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
