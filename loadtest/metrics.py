"""Per-request serving metrics and a load level's summary, in the field's terms.

The names and definitions are vLLM's ``benchmark_serving`` and GenAI-Perf's:

- **TTFT**: request sent -> first ``token`` event; **ITL**: every gap between two consecutive
  token events (pooled over requests); **TPOT**: ``(e2e - TTFT) / (completion_tokens - 1)``,
  for requests with more than one completion token; **e2e**: request sent -> response ended.
- **request throughput**: successful requests / the window; **output token throughput**: their
  completion tokens / the window; **goodput**: successful requests that also met the SLO
  (TTFT <= ``slo.ttft_ms`` and e2e <= ``slo.e2e_ms``) / the window. Without streaming the
  first token arrives with the whole answer, so a request's TTFT for the SLO is its e2e.
- latency distributions cover successful requests only, as both tools report them: a failure
  is counted (errors, the failed share), not timed.
- a **429** is a refusal before any work: counted apart. The error rate and the failed share
  are over **admitted** requests (everything but 429s): errors (5xx, timeouts, transport
  failures, an error event inside a 200 stream) / admitted, and (admitted - successful) /
  admitted (errors and other 4xx).
- prefix cache: prompt tokens, the cached part of them (``usage.cached_prompt_tokens``), and
  the hit ratio cached / prompt, summed over successful requests.

Percentiles interpolate linearly between the two nearest ranks (numpy's default, which both
tools use).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

STAGES = ("embed", "retrieve", "generate")


@dataclass
class Sample:
    """One request: when it started (s since the run began), how it ended, what the server said."""

    start: float
    latency_ms: float  # e2e: sent -> the response's last byte
    status: int  # HTTP status; 0 when no response came (timeout, connection error)
    outcome: str  # ok | shed | error | bad
    error: str = ""
    user: int = 0
    timings_ms: dict[str, float] = field(default_factory=dict)
    trace_id: str = ""
    cached: bool = False  # answered from an answer cache
    ttft_ms: float | None = None  # streaming: sent -> the first token event
    itl_ms: list[float] = field(default_factory=list)  # streaming: gaps between token events
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    nbytes: int = 0
    retry_after_s: float = 0.0  # what a 429/503 asked the client to wait
    repeat: bool = False  # its question had been sent before by the same cursor

    @property
    def tpot_ms(self) -> float | None:
        """Time per output token after the first (None without a TTFT or a second token)."""
        if self.ttft_ms is None or self.completion_tokens < 2:
            return None
        return (self.latency_ms - self.ttft_ms) / (self.completion_tokens - 1)


@dataclass(frozen=True)
class Slo:
    """What a request must meet to count toward goodput."""

    ttft_ms: float = 5000.0
    e2e_ms: float = 30000.0

    def met(self, s: Sample) -> bool:
        ttft = s.latency_ms if s.ttft_ms is None else s.ttft_ms
        return s.outcome == "ok" and ttft <= self.ttft_ms and s.latency_ms <= self.e2e_ms


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between the nearest ranks (numpy.percentile's default)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))


@dataclass(frozen=True)
class Dist:
    """A latency distribution in ms; ``n == 0`` when nothing was measured."""

    n: int = 0
    mean: float = 0.0
    p50: float = 0.0
    p95: float = 0.0
    p99: float = 0.0

    @classmethod
    def of(cls, values: Sequence[float]) -> Dist:
        if not values:
            return cls()
        return cls(
            len(values),
            sum(values) / len(values),
            percentile(values, 50),
            percentile(values, 95),
            percentile(values, 99),
        )


_DISTS = ("ttft", "tpot", "itl", "e2e")
_DERIVED = ("error_rate", "failed_rate", "shed_rate", "cache_hit_ratio")


@dataclass
class Summary:
    concurrency: int
    requests: int  # steady-state requests (started after the ramp-up)
    admitted: int  # requests - 429s
    ok: int
    errors: int  # 5xx, timeouts, transport failures, error events in a 200 stream
    shed: int  # 429
    bad: int  # other 4xx
    timeouts: int
    window_s: float
    request_throughput: float  # successful requests / s
    output_throughput: float  # their completion tokens / s
    goodput: float  # successful requests within the SLO / s
    slo_met: int
    slo_ttft_ms: float
    slo_e2e_ms: float
    ttft: Dist = field(default_factory=Dist)
    tpot: Dist = field(default_factory=Dist)
    itl: Dist = field(default_factory=Dist)
    e2e: Dist = field(default_factory=Dist)
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    questions_sent: int = 0  # every request of the level, ramp-up included
    questions_repeated: int = 0
    stage_ms: dict[str, float] = field(default_factory=dict)  # mean per stage, from timings_ms

    @property
    def error_rate(self) -> float:
        return self.errors / self.admitted if self.admitted else 0.0

    @property
    def failed_rate(self) -> float:
        """The share of admitted requests that did not succeed (errors and other 4xx)."""
        return (self.admitted - self.ok) / self.admitted if self.admitted else 0.0

    @property
    def shed_rate(self) -> float:
        return self.shed / self.requests if self.requests else 0.0

    @property
    def cache_hit_ratio(self) -> float:
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), **{k: getattr(self, k) for k in _DERIVED}}

    @classmethod
    def from_dict(cls, data: dict) -> Summary:
        """What ``to_dict`` wrote (the derived rates are recomputed)."""
        fields = {k: v for k, v in data.items() if k not in _DERIVED}
        for name in _DISTS:
            if isinstance(fields.get(name), dict):
                fields[name] = Dist(**fields[name])
        return cls(**fields)


def summarize(
    samples: Sequence[Sample],
    concurrency: int,
    ramp_up_s: float,
    end: float,
    slo: Slo | None = None,
) -> Summary:
    """Figures over requests started after the ramp-up (all of them when there is none).

    Throughput counts answers to requests sent in the steady window, per second of it:
    counting completions inside the window instead would credit a server for answers to
    requests sent during the ramp-up while every steady-state request times out.
    """
    slo = slo or Slo()
    steady = [s for s in samples if s.start >= ramp_up_s] or list(samples)
    window_start = ramp_up_s if any(s.start >= ramp_up_s for s in samples) else 0.0
    window = max(end - window_start, 1e-9)
    ok = [s for s in steady if s.outcome == "ok"]
    shed = sum(s.outcome == "shed" for s in steady)
    met = sum(slo.met(s) for s in ok)
    completion = sum(s.completion_tokens for s in ok)
    stage_ms: dict[str, float] = {}
    with_timings = [s for s in ok if s.timings_ms and not s.cached]
    for stage in (*STAGES, "total"):
        values = [s.timings_ms[stage] for s in with_timings if stage in s.timings_ms]
        if values:
            stage_ms[stage] = sum(values) / len(values)
    return Summary(
        concurrency=concurrency,
        requests=len(steady),
        admitted=len(steady) - shed,
        ok=len(ok),
        errors=sum(s.outcome == "error" for s in steady),
        shed=shed,
        bad=sum(s.outcome == "bad" for s in steady),
        timeouts=sum(s.error == "timeout" for s in steady),
        window_s=window,
        request_throughput=len(ok) / window,
        output_throughput=completion / window,
        goodput=met / window,
        slo_met=met,
        slo_ttft_ms=slo.ttft_ms,
        slo_e2e_ms=slo.e2e_ms,
        ttft=Dist.of([s.ttft_ms for s in ok if s.ttft_ms is not None]),
        tpot=Dist.of([t for s in ok if (t := s.tpot_ms) is not None]),
        itl=Dist.of([gap for s in ok for gap in s.itl_ms]),
        e2e=Dist.of([s.latency_ms for s in ok]),
        prompt_tokens=sum(s.prompt_tokens for s in ok),
        cached_prompt_tokens=sum(s.cached_prompt_tokens for s in ok),
        completion_tokens=completion,
        questions_sent=len(samples),
        questions_repeated=sum(s.repeat for s in samples),
        stage_ms=stage_ms,
    )


def dist_cells(d: Dist) -> tuple[str, str]:
    """(mean, "P50 / P95 / P99") in ms for a table; dashes when nothing was measured."""
    if not d.n:
        return "–", "–"
    return f"{d.mean:,.0f}", f"{d.p50:,.0f} / {d.p95:,.0f} / {d.p99:,.0f}"


def format_summary(s: Summary) -> str:
    """One level's figures, laid out as vLLM's benchmark_serving prints them."""

    def dist(title: str, d: Dist, unit: str = "ms") -> list[str]:
        if not d.n:
            return [f"{title:<34}(not measured)"]
        return [
            f"{title + ' mean':<34}{d.mean:,.1f} {unit}",
            f"{title + ' P50 / P95 / P99':<34}{d.p50:,.1f} / {d.p95:,.1f} / {d.p99:,.1f} {unit}",
        ]

    lines = [
        f"{'concurrency':<34}{s.concurrency}",
        f"{'requests (steady state)':<34}{s.requests} in {s.window_s:.1f} s",
        f"{'successful':<34}{s.ok}",
        f"{'refused (429)':<34}{s.shed} ({s.shed_rate:.1%} of requests)",
        f"{'errors':<34}{s.errors} ({s.error_rate:.1%} of admitted; {s.timeouts} timeouts)",
        f"{'failed':<34}{s.admitted - s.ok} ({s.failed_rate:.1%} of admitted)",
        f"{'request throughput':<34}{s.request_throughput:.2f} req/s",
        f"{'output token throughput':<34}{s.output_throughput:.1f} tok/s",
        f"{'goodput':<34}{s.goodput:.2f} req/s (SLO: TTFT <= {s.slo_ttft_ms:,.0f} ms, "
        f"e2e <= {s.slo_e2e_ms:,.0f} ms; {s.slo_met} met it)",
        *dist("TTFT", s.ttft),
        *dist("TPOT", s.tpot),
        *dist("ITL", s.itl),
        *dist("e2e", s.e2e),
        f"{'prompt tokens (cached)':<34}{s.prompt_tokens:,} ({s.cached_prompt_tokens:,} cached, "
        f"hit ratio {s.cache_hit_ratio:.1%})",
        f"{'completion tokens':<34}{s.completion_tokens:,}",
        f"{'questions sent (repeats)':<34}{s.questions_sent} ({s.questions_repeated})",
    ]
    if s.bad:
        lines.append(f"{'other 4xx':<34}{s.bad} (check the request body and API key)")
    if s.stage_ms:
        parts = ", ".join(f"{k} {v:.0f} ms" for k, v in s.stage_ms.items())
        lines.append(f"{'stage means':<34}{parts} (server-reported timings_ms)")
    return "\n".join(lines)
