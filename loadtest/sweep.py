"""`loadtest sweep`: the write-up's table for any deployment, in the serving field's terms
(vLLM's benchmark_serving, GenAI-Perf), its knee, and the stage to scale.

For each concurrency level (default 20, 50, 100, 150) it runs the /chat plan of
`loadtest http`, streaming (``--no-stream`` to turn it off) and asking for the LLM
(``{"query": "{question}", "answerer": "generate", "max_tokens": 64}`` unless ``--body``), with
one question cursor for the whole sweep: no question is asked twice until all have been.
Per level (``loadtest/metrics.py`` defines each figure):

- request throughput, output token throughput, and **goodput**: successful requests per second
  that met the SLO (``--slo-ttft-ms``, default 5 s, and ``--slo-e2e-ms``, default 30 s);
- TTFT, TPOT, ITL and e2e latency: mean, P50, P95, P99 over successful requests;
- 429s apart from errors; the error rate and the failed share over admitted requests (not 429);
- the prefix cache: prompt tokens, cached prompt tokens, and their ratio.

Then:

- **knee**: the level with the highest goodput whose failed share of admitted requests is
  within ``--max-error-rate`` (default 1%; ``--slo-p95-ms`` also caps its P95 e2e): the load to
  size for.
- **attribution**: where a request's time goes at each level. With `--traces` (the JSON-lines
  span files the services write under ``RAGLINE_TRACE_FILE``) the split comes from the traces
  of exactly the requests the level sent (their ``x-trace-id``): per stage queue wait, compute
  and network, plus the edge's own time (`ragline trace report`'s attribution). Without traces,
  from the ``timings_ms`` every /chat answer carries (per stage as the edge saw it, queueing
  included) and the rest of the client's time as "edge + network".
- **bottleneck**: the stage holding the largest share of latency at the first level past the
  knee (the highest level when none is past it), with how much its time grew from the lowest
  level: the stage to scale next.
- a Markdown report with PNG plots (throughput and goodput, P95 e2e and TTFT against
  concurrency, stage breakdown per level) and the raw figures as JSON.

`--compare-monolith` also sweeps the write-up's architecture on the same machine (N monolith
instances behind nginx least_conn, started and stopped here; see `loadtest/monolith.py`) with
the same questions in the same order (its own cursor) and the same body and streaming, and
reports the same tables and the ratio of goodput at the knees.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import httpx

from loadtest.httpload import (
    STAGES,
    Plan,
    QuestionCursor,
    Sample,
    add_plan_arguments,
    plan_from_args,
    progress_line,
    run_plan,
    summarize,
)
from loadtest.sweepreport import (
    Comparison,
    Criteria,
    Level,
    SystemRun,
    attribution_table,
    bottleneck,
    cache_table,
    compare,
    find_knee,
    latency_table,
    markdown,
    plot,
    report_json,
    stage_totals,
    table,
)

__all__ = [
    "Comparison", "Criteria", "Level", "SystemRun", "attribution_table", "bottleneck",
    "cache_table", "compare", "find_knee", "latency_table", "markdown", "plot", "report_json",
    "stage_totals", "table",
]  # fmt: skip


def timings_attribution(samples: Sequence[Sample]) -> dict[str, float]:
    """Mean ms per stage from the answers' ``timings_ms``; the client's remainder is the edge's.

    Only answered, uncached requests count: a cache hit or a failure has no stage timings.
    """
    done = [s for s in samples if s.outcome == "ok" and s.timings_ms and not s.cached]
    if not done:
        return {}
    out = {}
    for stage in STAGES:
        out[stage] = sum(s.timings_ms.get(stage, 0.0) for s in done) / len(done)
    client = sum(s.latency_ms for s in done) / len(done)
    out["edge + network"] = max(0.0, client - sum(out[s] for s in STAGES))
    return out


def trace_attribution(spans, trace_ids: Sequence[str]) -> dict[str, float]:
    """The level's requests' traces, split like `ragline trace report` (queue/compute/network)."""
    from loadtest.tracereport import attribute

    wanted = set(trace_ids)
    report = attribute(s for s in spans if s.trace_id in wanted)
    if not report.requests:
        return {}
    out: dict[str, float] = {}
    for row in report.rows[1:]:
        stage, _, part = row.label.partition(" ")
        if part in ("queue", "compute", "network"):
            out[f"{stage} {part}"] = sum(row.values) / len(row.values) if row.values else 0.0
        elif row.label == "edge (api)":
            out["edge"] = sum(row.values) / len(row.values) if row.values else 0.0
    return out


async def sweep(
    plan: Plan,
    levels: Sequence[int],
    cooldown_s: float,
    label: str,
    quiet: bool,
    transport: httpx.AsyncBaseTransport | None = None,
) -> SystemRun:
    """The plan at each level, one question cursor for them all (a fresh one per system)."""
    cursor = QuestionCursor(plan.questions)
    results = []
    for i, c in enumerate(levels):
        level_plan = Plan(**{**asdict(plan), "concurrency": c})
        if not quiet:
            print(f"{label}: {c} users for {plan.duration_s:.0f} s", file=sys.stderr, flush=True)
        samples, end = await run_plan(
            level_plan, None if quiet else progress_line(f"  {c:>4} "), cursor, transport
        )
        summary = summarize(samples, level_plan, end)
        results.append(
            Level(
                c,
                summary,
                timings_attribution(samples),
                # answered requests only: a 429's trace has no stage in it
                trace_ids=sorted({s.trace_id for s in samples if s.trace_id and s.outcome == "ok"}),
            )
        )
        if not quiet:
            s = summary
            ttft = f"P95 TTFT {s.ttft.p95:,.0f} ms, " if s.ttft.n else ""
            print(
                f"  {c:>4} users: {s.request_throughput:.2f} req/s, goodput {s.goodput:.2f} "
                f"req/s, {s.output_throughput:.1f} tok/s, {ttft}P95 e2e {s.e2e.p95:,.0f} ms, "
                f"errors {s.error_rate:.1%} and failed {s.failed_rate:.1%} of admitted, "
                f"429 {s.shed}",
                file=sys.stderr,
                flush=True,
            )
        if i + 1 < len(levels):
            await asyncio.sleep(cooldown_s)  # let queues drain before the next level
    return SystemRun(results, cursor)


def apply_traces(levels: Sequence[Level], pattern: str, flush_s: float) -> int:
    """Replace each level's attribution with its requests' traces; returns traces used."""
    from loadtest.tracereport import read_files

    time.sleep(flush_s)  # span processors export in batches
    paths = [Path(p) for p in sorted(glob.glob(pattern))]
    if not paths:
        print(f"loadtest sweep: no span files match {pattern!r}", file=sys.stderr)
        return 0
    spans = read_files(paths)
    used = 0
    for lv in levels:
        parts = trace_attribution(spans, lv.trace_ids)
        if parts:
            lv.attribution, lv.source = parts, "traces"
            used += 1
    return used


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"--levels {text!r}: expected comma-separated integers") from None
    if not levels or min(levels) < 1:
        raise ValueError("--levels: at least one level, each at least 1")
    return levels


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="loadtest sweep",
        description="The /chat plan at several concurrency levels: throughput, goodput, TTFT, "
        "TPOT, ITL and e2e per level, the knee, the bottleneck stage.",
    )
    add_plan_arguments(p, sweep=True)
    p.add_argument("--levels", default="20,50,100,150", help="concurrency levels")
    p.add_argument(
        "--max-error-rate",
        type=float,
        default=0.01,
        help="failed share of admitted requests the knee may have (default %(default)s)",
    )
    p.add_argument(
        "--slo-p95-ms",
        type=float,
        default=0.0,
        help="also cap the knee's P95 e2e (ms; default 0: off, the goodput SLO decides)",
    )
    p.add_argument("--cooldown", type=float, default=5.0, help="seconds between levels")
    p.add_argument("--out", type=Path, default=Path("loadtest-report"), help="report directory")
    p.add_argument("--traces", default="", help="span files (glob) written via RAGLINE_TRACE_FILE")
    p.add_argument("--trace-flush-s", type=float, default=6.0, help="wait for spans to be written")
    p.add_argument("--label", default="ragline", help="name of the system under test")
    p.add_argument("--machine", default="", help="described in the report")
    p.add_argument("--compare-monolith", action="store_true", help="also sweep the monolith")
    p.add_argument("--monolith-url", default="", help="a running monolith (else one is started)")
    p.add_argument("--monolith-instances", type=int, default=3, help="instances behind nginx")
    p.add_argument(
        "--compare-chatchat", action="store_true", help="also sweep Langchain-Chatchat 0.3"
    )
    p.add_argument("--chatchat-url", default="", help="a running Chatchat (else one is started)")
    p.add_argument("--chatchat-instances", type=int, default=3, help="instances behind nginx")
    p.add_argument(
        "--chatchat-layout",
        choices=("per-instance", "shared"),
        default="per-instance",
        help="one llama.cpp server per Chatchat instance (the seed's), or one for all",
    )
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument(
        "--rebuild",
        type=Path,
        default=None,
        help="write the report, comparisons and plots again from a sweep.json (no load sent)",
    )
    args = p.parse_args(argv)
    if args.rebuild is not None:
        return rebuild(args.rebuild, args.out)
    try:
        levels = parse_levels(args.levels)
        plan = plan_from_args(args, levels[0])
    except (ValueError, OSError) as exc:
        print(f"loadtest sweep: {exc}", file=sys.stderr)
        return 2
    if args.label == "monolith" and args.compare_monolith:
        print(
            "loadtest sweep: --label monolith would collide with --compare-monolith",
            file=sys.stderr,
        )
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, SystemRun] = {}
    try:
        runs[args.label] = asyncio.run(sweep(plan, levels, args.cooldown, args.label, args.quiet))
        if args.traces:
            used = apply_traces(runs[args.label].levels, args.traces, args.trace_flush_s)
            if not args.quiet:
                print(f"traces attributed {used} of {len(levels)} levels", file=sys.stderr)
        if args.compare_monolith:
            runs["monolith"] = _sweep_monolith(args, plan, levels)
        if args.compare_chatchat:
            runs["chatchat"] = _sweep_chatchat(args, plan, levels)
    except KeyboardInterrupt:
        print("loadtest sweep: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"loadtest sweep: {exc}", file=sys.stderr)
        return 1
    criteria = Criteria(plan.slo_ttft_ms, plan.slo_e2e_ms, args.max_error_rate, args.slo_p95_ms)
    meta = {
        "argv": shlex.join(argv),
        "machine": args.machine,
        "body": plan.body,
        "stream": plan.stream,
    }
    report = write_report(runs, meta, criteria, args.out, ours=args.label)
    print(report)
    print(f"report: {args.out / 'report.md'}", file=sys.stderr)
    return 0 if any(lv.summary.ok for lv in runs[args.label].levels) else 1


def write_report(
    runs: dict[str, SystemRun], meta: dict, criteria: Criteria, out: Path, ours: str
) -> str:
    """report.md, sweep.json and the plots in ``out``, with one comparison per baseline swept;
    returns the report's text."""
    comparison = {
        name: compare(
            runs[ours].levels,
            runs[name].levels,
            criteria.max_error_rate,
            criteria.slo_p95_ms,
            baseline=name,
        )  # fmt: skip
        for name in ("monolith", "chatchat")
        if name in runs
    }
    out.mkdir(parents=True, exist_ok=True)
    plots = plot(out, {k: v.levels for k, v in runs.items()})
    report = markdown(runs, meta, criteria, comparison, plots)
    (out / "report.md").write_text(report)
    (out / "sweep.json").write_text(
        json.dumps(report_json(runs, meta, criteria, comparison), indent=1)
    )
    return report


class _Asked:
    """A finished sweep's question counts, read back from its sweep.json."""

    def __init__(self, counts: dict[str, int]) -> None:
        self.questions = [""] * counts["distinct_in_file"]  # only the count is reported
        self.sent, self.repeats = counts["sent"], counts["repeats"]


def rebuild(path: Path, out: Path) -> int:
    """report.md, sweep.json and the plots of a saved sweep, with today's report code."""
    data = json.loads(path.read_text())
    runs = {
        name: SystemRun([Level.from_dict(lv) for lv in levels], _Asked(data["questions"][name]))
        for name, levels in data["runs"].items()
    }
    write_report(runs, data["meta"], Criteria(**data["criteria"]), out, ours=next(iter(runs)))
    print(f"report: {out / 'report.md'}", file=sys.stderr)
    return 0


def _sweep_monolith(args: argparse.Namespace, plan: Plan, levels: Sequence[int]) -> SystemRun:
    """The same plan (questions, body, streaming, SLO) against the monolith."""
    if args.monolith_url:
        mono_plan = Plan(**{**asdict(plan), "url": args.monolith_url})
        return asyncio.run(sweep(mono_plan, levels, args.cooldown, "monolith", args.quiet))
    from loadtest.monolith import MonolithCluster

    if not args.quiet:
        print(
            f"starting {args.monolith_instances} monolith instances behind nginx",
            file=sys.stderr,
            flush=True,
        )
    # nginx must not cut off an answer the client still waits for
    read_timeout = max(60.0, plan.timeout_s)
    with MonolithCluster(instances=args.monolith_instances, read_timeout_s=read_timeout) as cluster:
        mono_plan = Plan(**{**asdict(plan), "url": cluster.url})
        return asyncio.run(sweep(mono_plan, levels, args.cooldown, "monolith", args.quiet))


def _sweep_chatchat(args: argparse.Namespace, plan: Plan, levels: Sequence[int]) -> SystemRun:
    """The same questions, streaming and SLO against Chatchat's /chat/kb_chat; its request,
    its cluster and the transport that reads its answers are in ``loadtest/chatchat.py``."""
    from loadtest.chatchat import sweep_chatchat

    def run(cc_plan: Plan, transport: httpx.AsyncBaseTransport) -> SystemRun:
        return asyncio.run(sweep(cc_plan, levels, args.cooldown, "chatchat", args.quiet, transport))

    return sweep_chatchat(args, plan, run)


if __name__ == "__main__":
    sys.exit(main())
