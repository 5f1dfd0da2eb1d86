"""`loadtest sweep`: the write-up's table for any deployment, its knee, and the stage to scale.

For each concurrency level (default 20, 50, 100, 150) it runs the /chat plan of
`loadtest http` and prints one row: throughput, mean, P95, P99, errors (5xx and timeouts) and
shed (429). Then:

- **knee**: the level with the highest throughput whose P95 stays within the SLO
  (`--slo-p95-ms`) and whose error rate stays within `--max-error-rate`: the load to size for.
- **attribution**: where a request's time goes at each level. With `--traces` (the JSON-lines
  span files the services write under ``RAGLINE_TRACE_FILE``) the split comes from the traces
  of exactly the requests the level sent (their ``x-trace-id``): per stage queue wait, compute
  and network, plus the edge's own time (`ragline trace report`'s attribution). Without traces,
  from the ``timings_ms`` every /chat answer carries (per stage as the edge saw it, queueing
  included) and the rest of the client's time as "edge + network".
- **bottleneck**: the stage holding the largest share of latency at the first level past the
  knee (the highest level when none is past it), with how much its time grew from the lowest
  level: the stage to scale next.
- a Markdown report with PNG plots (throughput and latency against concurrency, stage
  breakdown per level) and the raw figures as JSON.

`--compare-monolith` also sweeps the write-up's architecture on the same machine (N monolith
instances behind nginx least_conn, started and stopped here; see `loadtest/monolith.py`) and
reports the ratio of throughput at the knee and of P95 at each level.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loadtest.httpload import (
    STAGES,
    Plan,
    Sample,
    Summary,
    add_plan_arguments,
    plan_from_args,
    progress_line,
    run_plan,
    summarize,
)


@dataclass
class Level:
    concurrency: int
    summary: Summary
    attribution: dict[str, float] = field(default_factory=dict)  # part -> mean ms per request
    source: str = "timings_ms"  # or "traces"
    trace_ids: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "concurrency": self.concurrency,
            "summary": self.summary.to_dict(),
            "attribution": self.attribution,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Level:
        s = dict(data["summary"])
        s.pop("error_rate", None)
        s.pop("shed_rate", None)
        return cls(
            data["concurrency"], Summary(**s), dict(data["attribution"]), data.get("source", "")
        )


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


def stage_totals(attribution: dict[str, float]) -> dict[str, float]:
    """Per stage (embed, retrieve, generate, edge...) whatever the attribution's source."""
    totals: dict[str, float] = {}
    for part, ms in attribution.items():
        stage = part.split(" ")[0] if part.split(" ")[0] in STAGES else part
        totals[stage] = totals.get(stage, 0.0) + ms
    return totals


def find_knee(levels: Sequence[Level], slo_p95_ms: float, max_error_rate: float) -> int | None:
    """Index of the highest-throughput level within the SLO, or None when none is."""
    within = [
        i
        for i, lv in enumerate(levels)
        if lv.summary.ok > 0
        and lv.summary.p95_ms <= slo_p95_ms
        and lv.summary.error_rate <= max_error_rate
    ]
    if not within:
        return None
    return max(within, key=lambda i: (levels[i].summary.throughput, -levels[i].concurrency))


def bottleneck(levels: Sequence[Level], knee: int | None) -> tuple[str, str]:
    """(stage, sentence): the largest share of latency at the first level past the knee."""
    with_parts = [i for i, lv in enumerate(levels) if lv.attribution]
    if not with_parts:
        return "", "no stage timings were recorded (did any request succeed?)"
    past = [i for i in with_parts if knee is None or i > knee]
    at = past[0] if past else with_parts[-1]
    totals = stage_totals(levels[at].attribution)
    stage = max(totals, key=totals.get)
    whole = sum(totals.values()) or 1.0
    first = stage_totals(levels[with_parts[0]].attribution).get(stage, 0.0)
    growth = (
        f"; it grew from {first:.0f} ms at {levels[with_parts[0]].concurrency} users"
        if at != with_parts[0]
        else ""
    )
    queue = levels[at].attribution.get(f"{stage} queue")
    queued = f", {queue:.0f} ms of it queueing" if queue else ""
    sentence = (
        f"{stage}: {totals[stage]:.0f} ms of {whole:.0f} ms ({totals[stage] / whole:.0%}) per "
        f"request at {levels[at].concurrency} users{queued}{growth}. Scale {stage} next."
    )
    return stage, sentence


def table(levels: Sequence[Level]) -> str:
    rows = [
        "| concurrent users | throughput (req/s) | mean (ms) | P95 (ms) | P99 (ms) "
        "| errors | shed (429) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lv in levels:
        s = lv.summary
        rows.append(
            f"| {lv.concurrency} | {s.throughput:.2f} | {s.mean_ms:,.0f} | {s.p95_ms:,.0f} "
            f"| {s.p99_ms:,.0f} | {s.error_rate:.1%} | {s.shed_rate:.1%} |"
        )
    return "\n".join(rows)


def attribution_table(levels: Sequence[Level]) -> str:
    parts: list[str] = []
    for lv in levels:
        parts += [p for p in lv.attribution if p not in parts]
    if not parts:
        return "(no stage timings)"
    rows = [
        "| users | " + " | ".join(f"{p} (ms)" for p in parts) + " |",
        "|---:|" + "---:|" * len(parts),
    ]
    for lv in levels:
        cells = [f"{lv.attribution[p]:,.0f}" if p in lv.attribution else "" for p in parts]
        rows.append(f"| {lv.concurrency} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


@dataclass
class Comparison:
    knee_ratio: float | None
    knee_note: str
    p95_ratios: dict[int, float]


def compare(ours: Sequence[Level], theirs: Sequence[Level], slo: float, err: float) -> Comparison:
    """Throughput at the knee (ours / theirs) and P95 per level (theirs / ours: >1 = ours faster).

    When a system has no level within the SLO, its best throughput stands in and the note says so.
    """

    def best(levels: Sequence[Level]) -> tuple[float, str]:
        knee = find_knee(levels, slo, err)
        if knee is not None:
            return levels[knee].summary.throughput, f"knee at {levels[knee].concurrency} users"
        top = max(levels, key=lambda lv: lv.summary.throughput)
        return top.summary.throughput, f"no level within the SLO; best at {top.concurrency} users"

    a, note_a = best(ours)
    b, note_b = best(theirs)
    p95 = {}
    for lv in ours:
        other = next((t for t in theirs if t.concurrency == lv.concurrency), None)
        if other and lv.summary.p95_ms > 0 and other.summary.ok and lv.summary.ok:
            p95[lv.concurrency] = other.summary.p95_ms / lv.summary.p95_ms
    return Comparison(a / b if b > 0 else None, f"ragline {note_a}; monolith {note_b}", p95)


def plot(out: Path, runs: dict[str, Sequence[Level]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, levels in runs.items():
        xs = [lv.concurrency for lv in levels]
        ax.plot(xs, [lv.summary.throughput for lv in levels], marker="o", label=name)
    ax.set_xlabel("concurrent users")
    ax.set_ylabel("throughput (req/s)")
    ax.set_title("Throughput")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    written.append(out / "throughput.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, levels in runs.items():
        xs = [lv.concurrency for lv in levels]
        ax.plot(xs, [lv.summary.mean_ms for lv in levels], marker="o", label=f"{name} mean")
        ax.plot(xs, [lv.summary.p95_ms for lv in levels], marker="s", ls="--", label=f"{name} P95")
    ax.set_xlabel("concurrent users")
    ax.set_ylabel("latency (ms)")
    ax.set_title("Latency")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    written.append(out / "latency.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    for name, levels in runs.items():
        parts: list[str] = []
        for lv in levels:
            parts += [p for p in lv.attribution if p not in parts]
        if not parts:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [str(lv.concurrency) for lv in levels]
        bottom = [0.0] * len(levels)
        for part in parts:
            values = [lv.attribution.get(part, 0.0) for lv in levels]
            ax.bar(xs, values, bottom=bottom, label=part)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.set_xlabel("concurrent users")
        ax.set_ylabel("mean ms per request")
        ax.set_title(f"Where the time goes: {name}")
        ax.legend(fontsize="small")
        fig.tight_layout()
        written.append(out / f"stages-{name}.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


def markdown(
    runs: dict[str, Sequence[Level]],
    args: dict,
    slo: float,
    err: float,
    comparison: Comparison | None,
    plots: Sequence[Path],
) -> str:
    lines = ["# Load-test sweep", ""]
    lines += [f"Command: `loadtest sweep {args.get('argv', '')}`".rstrip(), ""]
    lines += [f"Machine: {args.get('machine', '')}", ""] if args.get("machine") else []
    for name, levels in runs.items():
        knee = find_knee(levels, slo, err)
        stage, sentence = bottleneck(levels, knee)
        lines += [f"## {name}", "", table(levels), ""]
        if knee is None:
            lines.append(f"**Knee:** no level kept P95 <= {slo:,.0f} ms with errors <= {err:.0%}.")
        else:
            kl = levels[knee]
            lines.append(
                f"**Knee:** {kl.concurrency} users, {kl.summary.throughput:.2f} req/s at P95 "
                f"{kl.summary.p95_ms:,.0f} ms (SLO: P95 <= {slo:,.0f} ms, errors <= {err:.0%})."
            )
        lines += ["", f"**Bottleneck:** {sentence}", ""]
        source = levels[0].source if levels else ""
        lines += [f"Stage attribution (mean ms per answered request, from {source}):", ""]
        lines += [attribution_table(levels), ""]
    if comparison is not None:
        lines += ["## ragline vs the replicated monolith", ""]
        ratio = f"{comparison.knee_ratio:.2f}x" if comparison.knee_ratio else "n/a"
        lines += [
            f"Throughput at the knee, ragline / monolith: **{ratio}** ({comparison.knee_note})."
        ]
        lines += ["", "| users | P95 monolith / ragline |", "|---:|---:|"]
        lines += [f"| {c} | {r:.2f}x |" for c, r in comparison.p95_ratios.items()]
        lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    return "\n".join(lines)


async def sweep(
    plan: Plan, levels: Sequence[int], cooldown_s: float, label: str, quiet: bool
) -> tuple[list[Level], dict[int, list[Sample]]]:
    results, samples_by_level = [], {}
    for i, c in enumerate(levels):
        level_plan = Plan(**{**asdict(plan), "concurrency": c})
        if not quiet:
            print(f"{label}: {c} users for {plan.duration_s:.0f} s", file=sys.stderr, flush=True)
        samples, end = await run_plan(level_plan, None if quiet else progress_line(f"  {c:>4} "))
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
        samples_by_level[c] = samples
        if not quiet:
            s = summary
            print(
                f"  {c:>4} users: {s.throughput:.2f} req/s, mean {s.mean_ms:,.0f} ms, "
                f"P95 {s.p95_ms:,.0f} ms, errors {s.error_rate:.1%}, shed {s.shed_rate:.1%}",
                file=sys.stderr,
                flush=True,
            )
        if i + 1 < len(levels):
            await asyncio.sleep(cooldown_s)  # let queues drain before the next level
    return results, samples_by_level


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
        description="The /chat plan at several concurrency levels: table, knee, bottleneck.",
    )
    add_plan_arguments(p, sweep=True)
    p.add_argument("--levels", default="20,50,100,150", help="concurrency levels")
    p.add_argument("--slo-p95-ms", type=float, default=2000.0, help="P95 the knee must keep")
    p.add_argument("--max-error-rate", type=float, default=0.01, help="errors the knee may have")
    p.add_argument("--cooldown", type=float, default=5.0, help="seconds between levels")
    p.add_argument("--out", type=Path, default=Path("loadtest-report"), help="report directory")
    p.add_argument("--traces", default="", help="span files (glob) written via RAGLINE_TRACE_FILE")
    p.add_argument("--trace-flush-s", type=float, default=6.0, help="wait for spans to be written")
    p.add_argument("--label", default="ragline", help="name of the system under test")
    p.add_argument("--machine", default="", help="described in the report")
    p.add_argument("--compare-monolith", action="store_true", help="also sweep the monolith")
    p.add_argument("--monolith-url", default="", help="a running monolith (else one is started)")
    p.add_argument("--monolith-instances", type=int, default=3, help="instances behind nginx")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        levels = parse_levels(args.levels)
        plan = plan_from_args(args, levels[0])
    except (ValueError, OSError) as exc:
        print(f"loadtest sweep: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[Level]] = {}
    try:
        runs[args.label], _ = asyncio.run(
            sweep(plan, levels, args.cooldown, args.label, args.quiet)
        )
        if args.traces:
            used = apply_traces(runs[args.label], args.traces, args.trace_flush_s)
            if not args.quiet:
                print(f"traces attributed {used} of {len(levels)} levels", file=sys.stderr)
        if args.compare_monolith:
            runs["monolith"] = _sweep_monolith(args, plan, levels)
    except KeyboardInterrupt:
        print("loadtest sweep: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"loadtest sweep: {exc}", file=sys.stderr)
        return 1
    comparison = (
        compare(runs[args.label], runs["monolith"], args.slo_p95_ms, args.max_error_rate)
        if "monolith" in runs
        else None
    )
    plots = plot(args.out, runs)
    meta = {"argv": shlex.join(argv), "machine": args.machine}
    report = markdown(runs, meta, args.slo_p95_ms, args.max_error_rate, comparison, plots)
    (args.out / "report.md").write_text(report)
    (args.out / "sweep.json").write_text(
        json.dumps(
            {
                "meta": meta,
                "slo_p95_ms": args.slo_p95_ms,
                "max_error_rate": args.max_error_rate,
                "runs": {k: [lv.to_dict() for lv in v] for k, v in runs.items()},
                "comparison": asdict(comparison) if comparison else None,
            },
            indent=1,
        )
    )
    print(report)
    print(f"report: {args.out / 'report.md'}", file=sys.stderr)
    return 0 if any(lv.summary.ok for lv in runs[args.label]) else 1


def _sweep_monolith(args: argparse.Namespace, plan: Plan, levels: Sequence[int]) -> list[Level]:
    if args.monolith_url:
        mono_plan = Plan(**{**asdict(plan), "url": args.monolith_url})
        return asyncio.run(sweep(mono_plan, levels, args.cooldown, "monolith", args.quiet))[0]
    from loadtest.monolith import MonolithCluster

    if not args.quiet:
        print(
            f"starting {args.monolith_instances} monolith instances behind nginx",
            file=sys.stderr,
            flush=True,
        )
    with MonolithCluster(instances=args.monolith_instances) as cluster:
        mono_plan = Plan(**{**asdict(plan), "url": cluster.url})
        return asyncio.run(sweep(mono_plan, levels, args.cooldown, "monolith", args.quiet))[0]


if __name__ == "__main__":
    sys.exit(main())
