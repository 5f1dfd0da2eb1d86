"""Faults under load: kill -9 (or SIGSTOP) one replica of each stage in turn, then restart it.

Starts two replicas of every stage and one edge (benchmarks/stack.py), ingests the sample
handbook, and keeps steady /chat traffic going (cache off, short answers) while, stage by
stage, replica 1 is killed with SIGKILL (or hung with SIGSTOP) and later restarted on the same
port (or resumed). For each stage it reports the requests sent in that stage's window, the
failed ones (5xx, timeouts, connection errors; 429 counted apart), how long the edge took to
stop sending to the dead replica (its /readyz state leaves SERVING), and how long the restarted
replica took to serve traffic again (its own request counter moves), model load included.

    .venv/bin/python benchmarks/faults.py --concurrency 4 --down-s 5 --max-tokens 8
    .venv/bin/python benchmarks/faults.py --signal STOP        # a hang instead of a crash
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack import ROOT, Stack  # noqa: E402


@dataclass
class Outcome:
    start: float
    end: float
    status: int  # 0: no HTTP answer (timeout, connection error)


@dataclass
class StageResult:
    stage: str
    replica: str
    requests: int
    ok: int
    failed: int
    shed: int
    in_flight_at_fault: int
    out_of_rotation_s: float | None
    back_in_traffic_s: float | None


async def traffic(base: str, concurrency: int, max_tokens: int, stop: asyncio.Event,
                  outcomes: list[Outcome], timeout: float) -> None:  # fmt: skip
    questions = [
        line.split(",", 1)[0].strip('"')
        for line in (ROOT / "corpus" / "questions.csv").read_text().splitlines()[1:]
    ]
    counter = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal counter
        while not stop.is_set():
            counter += 1
            query = f"{questions[counter % len(questions)]} (request {counter})"
            t0 = time.monotonic()
            try:
                r = await client.post(
                    f"{base}/chat",
                    # the LLM answers, so every stage (generate too) is on the request path
                    json={"query": query, "max_tokens": max_tokens, "answerer": "generate"},
                )
                status = r.status_code
            except httpx.HTTPError:
                status = 0
            outcomes.append(Outcome(t0, time.monotonic(), status))

    async with httpx.AsyncClient(timeout=timeout) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))


async def run(ns: argparse.Namespace, stack: Stack) -> list[StageResult]:
    outcomes: list[Outcome] = []
    stop = asyncio.Event()
    load = asyncio.create_task(
        traffic(stack.base, ns.concurrency, ns.max_tokens, stop, outcomes, ns.request_timeout)
    )
    results = []
    try:
        await asyncio.sleep(ns.warm_s)
        for stage in ns.stages:
            replica = stack.stages[stage][1]
            window_start = time.monotonic()
            t_fault = time.monotonic()
            if ns.signal == "KILL":
                await asyncio.to_thread(replica.kill)
            else:
                replica.signal(signal.SIGSTOP)
            out_s = None
            while time.monotonic() - t_fault < ns.down_s:
                if out_s is None:
                    state = await asyncio.to_thread(stack.replica_state, stage, 1)
                    if state != "SERVING":
                        out_s = time.monotonic() - t_fault
                await asyncio.sleep(0.05)
            t_back = time.monotonic()
            if ns.signal == "KILL":
                await asyncio.to_thread(stack.restart, stage, 1)
            else:
                replica.signal(signal.SIGCONT)
            before = await asyncio.to_thread(replica.handled, stage)
            back_s = None
            while time.monotonic() - t_back < ns.recover_timeout_s:
                if await asyncio.to_thread(replica.handled, stage) > before:
                    back_s = time.monotonic() - t_back
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(ns.settle_s)
            window_end = time.monotonic()
            # every request that was running at any moment of this stage's window
            window = [o for o in outcomes if o.start <= window_end and o.end >= window_start]
            results.append(
                StageResult(
                    stage=stage,
                    replica=replica.name,
                    requests=len(window),
                    ok=sum(o.status == 200 for o in window),
                    failed=sum(o.status != 200 and o.status != 429 for o in window),
                    shed=sum(o.status == 429 for o in window),
                    in_flight_at_fault=sum(1 for o in outcomes if o.start < t_fault <= o.end),
                    out_of_rotation_s=None if out_s is None else round(out_s, 2),
                    back_in_traffic_s=None if back_s is None else round(back_s, 2),
                )
            )
            print(json.dumps(asdict(results[-1])), flush=True)
    finally:
        stop.set()
        await load
    return results


def table(results: list[StageResult], ns: argparse.Namespace) -> str:
    verb = "kill -9 + restart" if ns.signal == "KILL" else "SIGSTOP + SIGCONT"
    lines = [
        f"| stage ({verb} of replica 1 of 2) | requests | ok | failed | 429 | in flight at "
        "fault (all replicas) | out of rotation after | taking traffic again after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        out = "not seen" if r.out_of_rotation_s is None else f"{r.out_of_rotation_s:.2f} s"
        back = "not seen" if r.back_in_traffic_s is None else f"{r.back_in_traffic_s:.2f} s"
        lines.append(
            f"| {r.stage} | {r.requests} | {r.ok} | {r.failed} | {r.shed} | "
            f"{r.in_flight_at_fault} | {out} | {back} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=lambda s: s.split(","), default=["embed", "retrieve",
                    "generate"], help="comma-separated, in this order")  # fmt: skip
    ap.add_argument("--signal", choices=["KILL", "STOP"], default="KILL")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--warm-s", type=float, default=3.0)
    ap.add_argument("--down-s", type=float, default=5.0, help="how long the replica stays down")
    ap.add_argument("--settle-s", type=float, default=2.0)
    ap.add_argument("--recover-timeout-s", type=float, default=60.0)
    ap.add_argument("--request-timeout", type=float, default=60.0)
    ap.add_argument("--health-interval-s", type=float, default=0.5)
    ap.add_argument("--json", type=Path, help="also write the results here")
    ns = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ragline-faults-") as tmp:
        stack = Stack(
            Path(tmp),
            {"embed": 2, "retrieve": 2, "generate": 2},
            ["--cache-ttl-s", "0", "--health-interval-s", str(ns.health_interval_s),
             "--retrieve-timeout-s", "2", "--embed-timeout-s", "2"],
            log_level="WARNING",
        )  # fmt: skip
        try:
            stack.start()
            print(f"ingested {stack.ingest(ROOT / 'corpus' / 'handbook')} documents", flush=True)
            results = asyncio.run(run(ns, stack))
        finally:
            stack.stop()
    print()
    print(table(results, ns))
    if ns.json:
        ns.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
