"""The sweep's judgement and report: levels, the knee, the bottleneck, the comparison with the
monolith, the Markdown tables, the plots and sweep.json (``loadtest sweep`` runs the levels;
``loadtest/metrics.py`` defines each figure)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loadtest.httpload import STAGES, QuestionCursor, Summary
from loadtest.metrics import dist_cells


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
        return cls(
            data["concurrency"],
            Summary.from_dict(data["summary"]),
            dict(data["attribution"]),
            data.get("source", ""),
        )


@dataclass
class SystemRun:
    """One system's sweep: its levels and the question cursor they shared."""

    levels: list[Level]
    questions: QuestionCursor

    def questions_dict(self) -> dict[str, int]:
        return {
            "distinct_in_file": len(set(self.questions.questions)),
            "sent": self.questions.sent,
            "repeats": self.questions.repeats,
        }


def stage_totals(attribution: dict[str, float]) -> dict[str, float]:
    """Per stage (embed, retrieve, generate, edge...) whatever the attribution's source."""
    totals: dict[str, float] = {}
    for part, ms in attribution.items():
        stage = part.split(" ")[0] if part.split(" ")[0] in STAGES else part
        totals[stage] = totals.get(stage, 0.0) + ms
    return totals


def find_knee(
    levels: Sequence[Level], max_error_rate: float, slo_p95_ms: float = 0.0
) -> int | None:
    """Index of the highest-goodput level whose failed share of admitted requests is within
    ``max_error_rate`` (and, when ``slo_p95_ms`` is set, whose P95 e2e is within it); None when
    no level qualifies. Ties go to the lower concurrency."""
    within = [
        i
        for i, lv in enumerate(levels)
        if lv.summary.goodput > 0
        and lv.summary.failed_rate <= max_error_rate
        and (slo_p95_ms <= 0 or lv.summary.e2e.p95 <= slo_p95_ms)
    ]
    if not within:
        return None
    return max(within, key=lambda i: (levels[i].summary.goodput, -levels[i].concurrency))


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


def _users(lv: Level, i: int, knee: int | None) -> str:
    return f"**{lv.concurrency} (knee)**" if i == knee else str(lv.concurrency)


def table(levels: Sequence[Level], knee: int | None = None) -> str:
    """Requests, outcomes and throughput per level; the knee's row is marked."""
    rows = [
        "| users | sent | repeats | 429 | admitted | ok | errors (of admitted) "
        "| failed (of admitted) | req/s | goodput (req/s) | output tok/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, lv in enumerate(levels):
        s = lv.summary
        rows.append(
            f"| {_users(lv, i, knee)} | {s.questions_sent} | {s.questions_repeated} | {s.shed} "
            f"| {s.admitted} | {s.ok} | {s.error_rate:.1%} | {s.failed_rate:.1%} "
            f"| {s.request_throughput:.2f} | {s.goodput:.2f} | {s.output_throughput:.1f} |"
        )
    return "\n".join(rows)


def latency_table(levels: Sequence[Level], knee: int | None = None) -> str:
    """TTFT, TPOT, ITL and e2e (ms, successful requests): mean and P50 / P95 / P99."""
    names = ("TTFT", "TPOT", "ITL", "e2e")
    header = "".join(f" {n} mean | {n} P50 / P95 / P99 |" for n in names)
    rows = [f"| users |{header}", "|---:|" + "---:|" * (2 * len(names))]
    for i, lv in enumerate(levels):
        s = lv.summary
        cells = [c for d in (s.ttft, s.tpot, s.itl, s.e2e) for c in dist_cells(d)]
        rows.append(f"| {_users(lv, i, knee)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def cache_table(levels: Sequence[Level], knee: int | None = None) -> str:
    """Prompt tokens and the prefix cache's share of them, per level (successful requests)."""
    rows = [
        "| users | prompt tokens | cached prompt tokens | hit ratio | completion tokens |",
        "|---:|---:|---:|---:|---:|",
    ]
    for i, lv in enumerate(levels):
        s = lv.summary
        rows.append(
            f"| {_users(lv, i, knee)} | {s.prompt_tokens:,} | {s.cached_prompt_tokens:,} "
            f"| {s.cache_hit_ratio:.1%} | {s.completion_tokens:,} |"
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
    """ragline against the monolith: goodput at the knees (ours / theirs), and per level the
    goodput ratio (ours / theirs) and P95 e2e and TTFT ratios (theirs / ours: > 1 = ours
    faster)."""

    goodput_knee_ratio: float | None
    ragline_knee: int | None  # concurrency of the knee, None when no level qualified
    monolith_knee: int | None
    ragline_goodput: float  # at the knee (or the best level standing in)
    monolith_goodput: float
    note: str
    goodput_ratios: dict[int, float] = field(default_factory=dict)
    e2e_p95_ratios: dict[int, float] = field(default_factory=dict)
    ttft_p95_ratios: dict[int, float] = field(default_factory=dict)
    baseline: str = "monolith"  # which system "monolith_*" describes (monolith, chatchat)


BASELINE_TITLES = {"monolith": "the replicated monolith", "chatchat": "Langchain-Chatchat"}


def compare(
    ours: Sequence[Level],
    theirs: Sequence[Level],
    err: float,
    slo_p95_ms: float = 0.0,
    baseline: str = "monolith",
):
    """When a system has no knee, its best goodput stands in and the note says so."""

    def best(levels: Sequence[Level]) -> tuple[int | None, float, str]:
        knee = find_knee(levels, err, slo_p95_ms)
        if knee is not None:
            kl = levels[knee]
            return kl.concurrency, kl.summary.goodput, f"knee at {kl.concurrency} users"
        top = max(levels, key=lambda lv: lv.summary.goodput)
        return (
            None,
            top.summary.goodput,
            (
                f"no knee (no level with goodput > 0 and failures <= {err:.0%}); "
                f"its best goodput, at {top.concurrency} users, stands in"
            ),
        )

    knee_a, a, note_a = best(ours)
    knee_b, b, note_b = best(theirs)
    cmp = Comparison(
        a / b if b > 0 else None,
        knee_a,
        knee_b,
        a,
        b,
        f"ragline {note_a}; {baseline} {note_b}",
        baseline=baseline,
    )
    for lv in ours:
        other = next((t for t in theirs if t.concurrency == lv.concurrency), None)
        if other is None:
            continue
        s, o = lv.summary, other.summary
        if o.goodput > 0:
            cmp.goodput_ratios[lv.concurrency] = s.goodput / o.goodput
        if s.ok and o.ok and s.e2e.p95 > 0:
            cmp.e2e_p95_ratios[lv.concurrency] = o.e2e.p95 / s.e2e.p95
        if s.ttft.n and o.ttft.n and s.ttft.p95 > 0:
            cmp.ttft_p95_ratios[lv.concurrency] = o.ttft.p95 / s.ttft.p95
    return cmp


def plot(out: Path, runs: dict[str, Sequence[Level]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, levels in runs.items():
        xs = [lv.concurrency for lv in levels]
        ax.plot(xs, [lv.summary.goodput for lv in levels], marker="o", label=f"{name} goodput")
        ax.plot(xs, [lv.summary.request_throughput for lv in levels], marker="s", ls="--",
                label=f"{name} all successes")  # fmt: skip
    ax.set_xlabel("concurrent users")
    ax.set_ylabel("requests/s")
    ax.set_title("Goodput (within the SLO) and throughput")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    written.append(out / "throughput.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, levels in runs.items():
        xs = [lv.concurrency for lv in levels]
        ax.plot(xs, [lv.summary.e2e.p95 for lv in levels], marker="o", label=f"{name} P95 e2e")
        if any(lv.summary.ttft.n for lv in levels):
            ax.plot(xs, [lv.summary.ttft.p95 for lv in levels], marker="s", ls="--",
                    label=f"{name} P95 TTFT")  # fmt: skip
    ax.set_xlabel("concurrent users")
    ax.set_ylabel("latency (ms)")
    ax.set_title("P95 latency of successful requests")
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


@dataclass(frozen=True)
class Criteria:
    """What the report judges levels by."""

    slo_ttft_ms: float
    slo_e2e_ms: float
    max_error_rate: float
    slo_p95_ms: float = 0.0  # 0: no P95 cap on the knee

    def sentence(self) -> str:
        cap = f" and P95 e2e <= {self.slo_p95_ms:,.0f} ms" if self.slo_p95_ms > 0 else ""
        return (
            f"SLO: TTFT <= {self.slo_ttft_ms:,.0f} ms and e2e <= {self.slo_e2e_ms:,.0f} ms; "
            "goodput counts successful requests that met both. Knee: the highest goodput with "
            f"failures <= {self.max_error_rate:.1%} of admitted requests{cap}."
        )


def markdown(
    runs: dict[str, SystemRun],
    args: dict,
    criteria: Criteria,
    comparison: Comparison | dict[str, Comparison] | None,
    plots: Sequence[Path],
) -> str:
    lines = ["# Load-test sweep", ""]
    lines += [f"Command: `loadtest sweep {args.get('argv', '')}`".rstrip(), ""]
    lines += [f"Machine: {args.get('machine', '')}", ""] if args.get("machine") else []
    if args.get("body"):
        stream = "streamed (SSE)" if args.get("stream") else "not streamed (TTFT = e2e for the SLO)"
        lines += [f"Body: `{json.dumps(args['body'])}`, {stream}; answer caches bypassed.", ""]
    lines += [criteria.sentence(), ""]
    lines += [
        "Latencies are over successful requests; errors are 5xx, timeouts, transport failures "
        "and error events inside a 200 stream; 429s are refusals, counted apart and left out "
        "of the admitted requests.",
        "",
    ]
    for name, run in runs.items():
        levels = run.levels
        knee = find_knee(levels, criteria.max_error_rate, criteria.slo_p95_ms)
        stage, sentence = bottleneck(levels, knee)
        q = run.questions_dict()
        lines += [f"## {name}", ""]
        repeats = (
            " (the file ran out: give more questions or a shorter sweep)" if q["repeats"] else ""
        )
        lines += [
            f"Questions: {q['sent']:,} sent over the sweep from {q['distinct_in_file']:,} "
            f"distinct in the file; repeats: {q['repeats']:,}{repeats}.",
            "",
        ]
        lines += [table(levels, knee), ""]
        lines += ["Latency (ms, successful requests):", "", latency_table(levels, knee), ""]
        lines += ["Prefix cache (successful requests):", "", cache_table(levels, knee), ""]
        if knee is None:
            lines.append(
                f"**Knee:** none: no level had goodput > 0 with failures <= "
                f"{criteria.max_error_rate:.1%} of admitted requests."
            )
        else:
            s = levels[knee].summary
            lines.append(
                f"**Knee:** {levels[knee].concurrency} users, goodput {s.goodput:.2f} req/s "
                f"({s.request_throughput:.2f} req/s successful), P95 TTFT "
                f"{s.ttft.p95:,.0f} ms, P95 e2e {s.e2e.p95:,.0f} ms, failures {s.failed_rate:.1%}."
            )
        lines += ["", f"**Bottleneck:** {sentence}", ""]
        source = levels[0].source if levels else ""
        lines += [f"Stage attribution (mean ms per answered request, from {source}):", ""]
        lines += [attribution_table(levels), ""]
    for cmp in _comparisons(comparison).values():
        other = cmp.baseline
        lines += [f"## ragline vs {BASELINE_TITLES.get(other, other)}", ""]
        ratio = f"{cmp.goodput_knee_ratio:.2f}x" if cmp.goodput_knee_ratio else "n/a"
        lines += [
            f"Goodput at the knee, ragline / {other}: **{ratio}** "
            f"({cmp.ragline_goodput:.2f} vs {cmp.monolith_goodput:.2f} req/s; "
            f"{cmp.note}).",
            "",
            f"| users | goodput ragline / {other} | P95 e2e {other} / ragline "
            f"| P95 TTFT {other} / ragline |",
            "|---:|---:|---:|---:|",
        ]
        for c in sorted({*cmp.goodput_ratios, *cmp.e2e_p95_ratios, *cmp.ttft_p95_ratios}):
            cells = [
                f"{r[c]:.2f}x" if c in r else "–"
                for r in (
                    cmp.goodput_ratios,
                    cmp.e2e_p95_ratios,
                    cmp.ttft_p95_ratios,
                )
            ]
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    return "\n".join(lines)


def _comparisons(comparison: Comparison | dict[str, Comparison] | None) -> dict[str, Comparison]:
    if comparison is None:
        return {}
    if isinstance(comparison, Comparison):
        return {comparison.baseline: comparison}
    return comparison


def report_json(
    runs: dict[str, SystemRun],
    meta: dict,
    criteria: Criteria,
    comparison: Comparison | dict[str, Comparison] | None,
) -> dict:
    """sweep.json: per system its levels (``Level.from_dict`` reads each back), its knee and
    its questions; the criteria; the comparison with the monolith."""
    by = _comparisons(comparison)
    knees = {}
    for name, run in runs.items():
        knee = find_knee(run.levels, criteria.max_error_rate, criteria.slo_p95_ms)
        knees[name] = run.levels[knee].concurrency if knee is not None else None
    return {
        "meta": meta,
        "criteria": asdict(criteria),
        "runs": {k: [lv.to_dict() for lv in v.levels] for k, v in runs.items()},
        "knees": knees,
        "questions": {k: v.questions_dict() for k, v in runs.items()},
        "comparison": asdict(by["monolith"]) if "monolith" in by else None,
        "comparisons": {k: asdict(v) for k, v in by.items()},
    }
