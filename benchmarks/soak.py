"""Soak and overload: steady /chat load for a bounded time, then 3x that, then quiet.

Starts a stack (one replica per stage by default; benchmarks/stack.py), ingests the sample
handbook, and runs three phases against /chat with the answer cache off:

1. soak: ``--concurrency`` clients for ``--soak-s`` seconds (the issue's 10 minutes at the
   knee). Every ``--sample-s`` it records resident memory, open file descriptors and threads of
   every process. Reported: errors, and for each process RSS growth after warm-up (first
   sample after ``--warmup-s``) to the end, fds and threads first/last/max.
2. overload: ``3 x concurrency`` clients for ``--overload-s`` seconds against an edge whose
   admission is sized for the knee (``--max-inflight``/``--max-waiting``). Reported: ok, 429,
   5xx, timeouts and connection errors.
3. recovery: after the overload stops, single requests every 0.25 s until latency is back
   within 1.5x the soak's median; reported: seconds until then.

    .venv/bin/python benchmarks/soak.py --concurrency 4 --soak-s 600 --overload-s 60
    .venv/bin/python benchmarks/soak.py --concurrency 2 --soak-s 30 --overload-s 15  # quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack import ROOT, Stack, process_stats  # noqa: E402


@dataclass
class Outcome:
    start: float
    seconds: float
    status: int  # 0: timeout or connection error


def questions() -> list[str]:
    lines = (ROOT / "corpus" / "questions.csv").read_text().splitlines()[1:]
    return [line.split(",", 1)[0].strip('"') for line in lines]


async def load(base: str, clients: int, seconds: float, max_tokens: int, timeout: float,
               tag: str) -> list[Outcome]:  # fmt: skip
    qs = questions()
    out: list[Outcome] = []
    stop_at = time.monotonic() + seconds
    counter = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal counter
        while time.monotonic() < stop_at:
            counter += 1
            body = {
                "query": f"{qs[counter % len(qs)]} ({tag} {counter})",
                "max_tokens": max_tokens,
                "answerer": "generate",
            }  # every stage on the path, as in the figures
            t0 = time.monotonic()
            try:
                r = await client.post(f"{base}/chat", json=body)
                status = r.status_code
            except httpx.HTTPError:
                status = 0
            out.append(Outcome(t0, time.monotonic() - t0, status))
            if status == 429:
                await asyncio.sleep(0.05)  # a client that honours Retry-After, briefly

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    return out


async def sampler(stack: Stack, every: float, stop: asyncio.Event, samples: list[dict]) -> None:
    t0 = time.monotonic()
    while not stop.is_set():
        row = {"t": round(time.monotonic() - t0, 1)}
        for p in stack.all():
            if p.alive():
                row[p.name] = process_stats(p.pid())
        samples.append(row)
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            pass


def summarize(outcomes: list[Outcome]) -> dict:
    ok = [o.seconds for o in outcomes if o.status == 200]
    return {
        "requests": len(outcomes),
        "ok": len(ok),
        "shed_429": sum(o.status == 429 for o in outcomes),
        "5xx": sum(o.status >= 500 for o in outcomes),
        "timeouts_or_conn_errors": sum(o.status == 0 for o in outcomes),
        "other_4xx": sum(400 <= o.status < 500 and o.status != 429 for o in outcomes),
        "p50_s": round(statistics.median(ok), 3) if ok else None,
        "p95_s": round(statistics.quantiles(ok, n=20)[-1], 3) if len(ok) >= 20 else None,
    }


def resources(samples: list[dict], warmup_s: float) -> list[dict]:
    names = sorted({k for s in samples for k in s if k != "t"})
    rows = []
    for name in names:
        series = [(s["t"], s[name]) for s in samples if name in s]
        after = [v for t, v in series if t >= warmup_s] or [v for _, v in series]
        first, last = after[0], after[-1]
        rows.append({
            "process": name,
            "rss_mib_first": round(first["rss_kib"] / 1024, 1),
            "rss_mib_last": round(last["rss_kib"] / 1024, 1),
            "rss_growth_pct": round(100 * (last["rss_kib"] / first["rss_kib"] - 1), 1),
            "fds_first_last_max": (first["fds"], last["fds"], max(v["fds"] for v in after)),
            "threads_first_last_max": (first["threads"], last["threads"],
                                       max(v["threads"] for v in after)),
        })  # fmt: skip
    return rows


async def recovery(base: str, baseline_p50: float, max_tokens: int, limit_s: float) -> float | None:
    t0 = time.monotonic()
    async with httpx.AsyncClient(timeout=60) as client:
        while time.monotonic() - t0 < limit_s:
            q0 = time.monotonic()
            r = await client.post(
                f"{base}/chat",
                json={
                    "query": f"recovery probe {q0}",
                    "max_tokens": max_tokens,
                    "answerer": "generate",
                },
            )
            if r.status_code == 200 and time.monotonic() - q0 <= 1.5 * baseline_p50:
                return round(time.monotonic() - t0, 2)
            await asyncio.sleep(0.25)
    return None


async def run(ns: argparse.Namespace, stack: Stack) -> dict:
    samples: list[dict] = []
    stop = asyncio.Event()
    watch = asyncio.create_task(sampler(stack, ns.sample_s, stop, samples))
    print(f"soak: {ns.concurrency} clients for {ns.soak_s:.0f} s", flush=True)
    soak = await load(stack.base, ns.concurrency, ns.soak_s, ns.max_tokens, ns.timeout, "soak")
    stop.set()
    await watch
    soak_summary = summarize(soak)
    print(json.dumps(soak_summary), flush=True)
    clients = 3 * ns.concurrency
    print(f"overload: {clients} clients for {ns.overload_s:.0f} s", flush=True)
    over = await load(stack.base, clients, ns.overload_s, ns.max_tokens, ns.timeout, "over")
    over_summary = summarize(over)
    print(json.dumps(over_summary), flush=True)
    back = await recovery(stack.base, soak_summary["p50_s"] or 1.0, ns.max_tokens, 60)
    return {
        "soak": soak_summary,
        "resources": resources(samples, ns.warmup_s),
        "overload": over_summary,
        "recovered_after_s": back,
    }


def report(result: dict, ns: argparse.Namespace) -> str:
    s, o = result["soak"], result["overload"]
    lines = [
        f"Soak: {ns.concurrency} clients x {ns.soak_s:.0f} s, max_tokens {ns.max_tokens}: "
        f"{s['requests']} requests, {s['ok']} ok, {s['5xx']} 5xx, "
        f"{s['timeouts_or_conn_errors']} timeouts/connection errors, {s['shed_429']} 429; "
        f"P50 {s['p50_s']} s, P95 {s['p95_s']} s.",
        "",
        "| process | RSS after warm-up (MiB) | RSS at end (MiB) | growth | fds first/last/max "
        "| threads first/last/max |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["resources"]:
        lines.append(
            f"| {r['process']} | {r['rss_mib_first']} | {r['rss_mib_last']} | "
            f"{r['rss_growth_pct']}% | {'/'.join(map(str, r['fds_first_last_max']))} | "
            f"{'/'.join(map(str, r['threads_first_last_max']))} |"
        )
    lines += [
        "",
        f"Overload: {3 * ns.concurrency} clients x {ns.overload_s:.0f} s: {o['requests']} "
        f"requests, {o['ok']} ok, {o['shed_429']} 429, {o['5xx']} 5xx, "
        f"{o['timeouts_or_conn_errors']} timeouts/connection errors, {o['other_4xx']} other 4xx; "
        f"P95 of the answered {o['p95_s']} s.",
        f"Back to soak latency (within 1.5x its P50) {result['recovered_after_s']} s after the "
        "overload stopped.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, default=4, help="the knee (soak clients)")
    ap.add_argument("--soak-s", type=float, default=600)
    ap.add_argument("--overload-s", type=float, default=60)
    ap.add_argument("--warmup-s", type=float, default=30)
    ap.add_argument("--sample-s", type=float, default=5)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--replicas", type=int, default=1, help="replicas per stage")
    ap.add_argument("--max-inflight", type=int, default=0, help="edge slots (default: knee)")
    ap.add_argument("--max-waiting", type=int, default=0, help="edge queue (default: knee)")
    ap.add_argument("--json", type=Path)
    ns = ap.parse_args(argv)
    inflight = ns.max_inflight or ns.concurrency
    waiting = ns.max_waiting or ns.concurrency
    with tempfile.TemporaryDirectory(prefix="ragline-soak-") as tmp:
        stack = Stack(
            Path(tmp),
            {"embed": ns.replicas, "retrieve": ns.replicas, "generate": ns.replicas},
            ["--cache-ttl-s", "0", "--max-inflight", str(inflight),
             "--max-waiting", str(waiting), "--queue-wait-s", "2"],
            log_level="WARNING",
        )  # fmt: skip
        try:
            stack.start()
            print(f"ingested {stack.ingest(ROOT / 'corpus' / 'handbook')} documents", flush=True)
            result = asyncio.run(run(ns, stack))
        finally:
            stack.stop()
    print()
    print(report(result, ns))
    if ns.json:
        ns.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
