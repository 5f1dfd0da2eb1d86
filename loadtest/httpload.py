"""`loadtest http`: the write-up's JMeter plan for `POST /chat`, in Python.

The plan (JMeter's thread group, as the write-up ran it): N virtual users started evenly over a
ramp-up period, each sending one request at a time in a loop until the duration ends; questions
come from a CSV file shared by all users in order and recycled at its end (JMeter's CSV Data Set
Config), each put into a JSON body (`{"query": "{question}"}` by default).

What is counted: a request is **ok** (2xx), **shed** (429: the server refused it at once; the
write-up's stack had no such answer), an **error** (5xx, a connection failure or a client-side
timeout: what JMeter would count as failed) or **bad** (another 4xx: the plan is wrong). The
table's figures cover the steady state: requests started after the ramp-up (all of them when
there is none); throughput is completed requests per second over that window.

A user refused with 429 (or 503) waits what `Retry-After` says before asking again, as real
clients do (`--ignore-retry-after` makes it ask again at once, as JMeter's loop does); the
refusals are counted either way. Throughput is goodput: answered requests among those sent
after the ramp-up, per second of that window. Answer caches are bypassed
(`Cache-Control: no-cache`) unless `--cache`: a load test that replays 40 questions would
otherwise measure the cache. Every request is bounded by `--timeout` and the run by
`--duration` (and `-n`): it always stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
DEFAULT_QUESTIONS = REPO / "corpus" / "questions.csv"
STAGES = ("embed", "retrieve", "generate")


@dataclass
class Sample:
    """One request: when it started (s since the run began), how it ended, what the server said."""

    start: float
    latency_ms: float
    status: int  # HTTP status; 0 when no response came (timeout, connection error)
    outcome: str  # ok | shed | error | bad
    error: str = ""
    user: int = 0
    timings_ms: dict[str, float] = field(default_factory=dict)
    trace_id: str = ""
    cached: bool = False
    ttft_ms: float | None = None  # streaming: time to the first token event
    nbytes: int = 0
    retry_after_s: float = 0.0  # what a 429/503 asked the client to wait


@dataclass
class Plan:
    url: str = "http://127.0.0.1:8080"
    path: str = "/chat"
    concurrency: int = 20
    ramp_up_s: float = 0.0
    duration_s: float = 60.0
    requests: int = 0  # 0: no count limit, the duration ends the run
    timeout_s: float = 60.0
    questions: Sequence[str] = ()
    body: dict = field(default_factory=lambda: {"query": "{question}"})
    headers: dict[str, str] = field(default_factory=dict)
    cache: bool = False
    stream: bool = False
    api_key: str = ""
    honor_retry_after: bool = True


@dataclass
class Summary:
    concurrency: int
    requests: int  # steady-state requests (started after the ramp-up)
    ok: int
    errors: int  # 5xx + timeouts + connection failures
    shed: int  # 429
    bad: int  # other 4xx
    throughput: float  # answered steady-window requests per second of the window
    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    window_s: float
    stage_ms: dict[str, float] = field(default_factory=dict)  # mean per stage, from timings_ms
    ttft_p95_ms: float | None = None
    timeouts: int = 0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def shed_rate(self) -> float:
        return self.shed / self.requests if self.requests else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "error_rate": self.error_rate, "shed_rate": self.shed_rate}


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (what JMeter's aggregate report shows)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return float(ordered[int(rank) - 1])


def summarize(samples: Sequence[Sample], plan: Plan, end: float) -> Summary:
    """Figures over requests started after the ramp-up; latency stats over answered ones.

    Mean and percentiles include failed requests' times (as JMeter's do) but not shed ones: a
    429 answered in a millisecond would make an overloaded server look fast.
    """
    steady = [s for s in samples if s.start >= plan.ramp_up_s] or list(samples)
    window_start = plan.ramp_up_s if any(s.start >= plan.ramp_up_s for s in samples) else 0.0
    window = max(end - window_start, 1e-9)
    timed = [s.latency_ms for s in steady if s.outcome != "shed"]
    ok = [s for s in steady if s.outcome == "ok"]
    # Throughput (goodput): answered requests among those sent in the steady window, per second
    # of it. Counting completions inside the window instead would credit a server for answers
    # to requests sent during the ramp-up while every steady-state request times out.
    stage_ms: dict[str, float] = {}
    with_timings = [s for s in ok if s.timings_ms and not s.cached]
    for stage in (*STAGES, "total"):
        values = [s.timings_ms[stage] for s in with_timings if stage in s.timings_ms]
        if values:
            stage_ms[stage] = sum(values) / len(values)
    ttfts = [s.ttft_ms for s in ok if s.ttft_ms is not None]
    return Summary(
        concurrency=plan.concurrency,
        requests=len(steady),
        ok=len(ok),
        errors=sum(s.outcome == "error" for s in steady),
        shed=sum(s.outcome == "shed" for s in steady),
        bad=sum(s.outcome == "bad" for s in steady),
        throughput=len(ok) / window,
        mean_ms=sum(timed) / len(timed) if timed else 0.0,
        p50_ms=percentile(timed, 50),
        p95_ms=percentile(timed, 95),
        p99_ms=percentile(timed, 99),
        window_s=window,
        stage_ms=stage_ms,
        ttft_p95_ms=percentile(ttfts, 95) if ttfts else None,
        timeouts=sum(s.error == "timeout" for s in steady),
    )


def read_questions(path: Path, column: str = "question") -> list[str]:
    """Questions from a CSV with a header (the named column, else the first) or a plain list."""
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        raise ValueError(f"{path}: no questions in the file")
    header = [h.strip().lower() for h in rows[0]]
    if column in header:
        idx = header.index(column)
        rows = rows[1:]
    else:
        idx = 0
    questions = [r[idx].strip() for r in rows if len(r) > idx and r[idx].strip()]
    if not questions:
        raise ValueError(f"{path}: no questions in column {column!r}")
    return questions


def render_body(template, question: str):
    """Replace ``{question}`` in every string of the JSON body template."""
    if isinstance(template, str):
        return template.replace("{question}", question)
    if isinstance(template, dict):
        return {k: render_body(v, question) for k, v in template.items()}
    if isinstance(template, list):
        return [render_body(v, question) for v in template]
    return template


def classify(status: int) -> str:
    if 200 <= status < 300:
        return "ok"
    if status == 429:
        return "shed"
    if status >= 500:
        return "error"
    return "bad"


class _Questions:
    """JMeter's shared CSV data set: the next question for whichever user asks, recycled."""

    def __init__(self, questions: Sequence[str]) -> None:
        self._questions = list(questions)
        self._next = 0

    def take(self) -> str:
        q = self._questions[self._next % len(self._questions)]
        self._next += 1
        return q


async def _one(
    client: httpx.AsyncClient, plan: Plan, question: str, user: int, t0: float
) -> Sample:
    body = render_body(plan.body, question)
    if plan.stream:
        body = {**body, "stream": True}
    start = time.perf_counter()
    sample = Sample(start=start - t0, latency_ms=0.0, status=0, outcome="error", user=user)
    try:
        if plan.stream:
            async with client.stream("POST", plan.path, json=body) as resp:
                sample.retry_after_s = _retry_after(resp)
                sample.status = resp.status_code
                sample.trace_id = resp.headers.get("x-trace-id", "")
                event = ""
                async for line in resp.aiter_lines():
                    sample.nbytes += len(line) + 1
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        if event == "token" and sample.ttft_ms is None:
                            sample.ttft_ms = (time.perf_counter() - start) * 1000
                        elif event == "done":
                            done = json.loads(line[5:])
                            sample.timings_ms = done.get("timings_ms") or {}
                            sample.cached = bool(done.get("cached"))
                        elif event == "error":
                            sample.error = line[5:].strip()[:200]
        else:
            resp = await client.post(plan.path, json=body)
            sample.retry_after_s = _retry_after(resp)
            sample.status = resp.status_code
            sample.nbytes = len(resp.content)
            sample.trace_id = resp.headers.get("x-trace-id", "")
            if resp.status_code == 200:
                data = resp.json()
                sample.timings_ms = data.get("timings_ms") or {}
                sample.cached = bool(data.get("cached"))
            else:
                sample.error = _error_text(resp)
        sample.outcome = classify(sample.status)
        if sample.outcome == "ok" and sample.error:  # an error event inside a 200 stream
            sample.outcome = "error"
    except httpx.TimeoutException:
        sample.error = "timeout"
    except httpx.HTTPError as exc:
        sample.error = f"{type(exc).__name__}: {exc}"[:200] or type(exc).__name__
    sample.latency_ms = (time.perf_counter() - start) * 1000
    return sample


def _retry_after(resp: httpx.Response) -> float:
    if resp.status_code not in (429, 503):
        return 0.0
    try:
        return max(0.0, float(resp.headers.get("retry-after", "0")))
    except ValueError:  # an HTTP date: not sent by ragline; treat as "soon"
        return 1.0


def _error_text(resp: httpx.Response) -> str:
    try:
        data = resp.json()
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            return str(data["error"].get("message", ""))[:200]
        return json.dumps(data)[:200]
    except ValueError:
        return resp.text[:200]


ProgressFn = Callable[[float, int, list[Sample]], None]


async def run_plan(plan: Plan, progress: ProgressFn | None = None) -> tuple[list[Sample], float]:
    """Run the plan; returns the samples and when the run ended (s since it began)."""
    if not plan.questions:
        raise ValueError("the plan has no questions")
    headers = dict(plan.headers)
    if not plan.cache:
        headers.setdefault("Cache-Control", "no-cache")
    if plan.api_key:
        headers.setdefault("Authorization", f"Bearer {plan.api_key}")
    limits = httpx.Limits(
        max_connections=plan.concurrency, max_keepalive_connections=plan.concurrency
    )
    timeout = httpx.Timeout(plan.timeout_s, connect=min(10.0, plan.timeout_s))
    samples: list[Sample] = []
    questions = _Questions(plan.questions)
    started = 0
    stop_at = plan.duration_s
    t0 = time.perf_counter()

    def elapsed() -> float:
        return time.perf_counter() - t0

    def budget_left() -> bool:
        return elapsed() < stop_at and (plan.requests <= 0 or started < plan.requests)

    async def user(n: int) -> None:
        nonlocal started
        delay = plan.ramp_up_s * n / plan.concurrency if plan.concurrency else 0.0
        await asyncio.sleep(delay)
        while budget_left():
            started += 1
            sample = await _one(client, plan, questions.take(), n, t0)
            samples.append(sample)
            if sample.retry_after_s and plan.honor_retry_after:
                # A refused user waits as told, as real clients do, instead of hammering a
                # server that said it is full (JMeter's plan does not; --ignore-retry-after).
                await asyncio.sleep(min(sample.retry_after_s, max(0.0, stop_at - elapsed())))

    async def report() -> None:
        while True:
            await asyncio.sleep(1.0)
            active = min(
                plan.concurrency,
                plan.concurrency
                if plan.ramp_up_s <= 0
                else int(elapsed() / plan.ramp_up_s * plan.concurrency) + 1,
            )
            progress(elapsed(), active, samples)

    async with httpx.AsyncClient(
        base_url=plan.url.rstrip("/"), headers=headers, limits=limits, timeout=timeout
    ) as client:
        reporter = asyncio.create_task(report()) if progress else None
        try:
            # Users stop starting requests at the deadline; each in-flight one is bounded by
            # its own timeout, so the whole run ends by duration + timeout.
            await asyncio.gather(*(user(n) for n in range(plan.concurrency)))
        finally:
            if reporter:
                reporter.cancel()
    # The measurement window ends at the deadline: completions in the drain after it (no new
    # requests start then) would deflate throughput.
    return samples, min(elapsed(), plan.duration_s)


def progress_line(prefix: str = "") -> ProgressFn:
    """A progress line on stderr about once a second."""

    def show(t: float, active: int, samples: list[Sample]) -> None:
        recent = [s for s in samples if s.start + s.latency_ms / 1000 >= t - 5]
        ok = sum(s.outcome == "ok" for s in samples)
        errors = sum(s.outcome == "error" for s in samples)
        shed = sum(s.outcome == "shed" for s in samples)
        p95 = percentile([s.latency_ms for s in recent if s.outcome != "shed"], 95)
        print(
            f"{prefix}[{t:5.0f}s] users {active:>4}  ok {ok:>6}  errors {errors:>5}  "
            f"shed {shed:>5}  P95(5s) {p95:>8.0f} ms",
            file=sys.stderr,
            flush=True,
        )

    return show


def format_summary(summary: Summary) -> str:
    lines = [
        f"concurrency      {summary.concurrency}",
        f"requests         {summary.requests} in {summary.window_s:.1f} s (steady state)",
        f"throughput       {summary.throughput:.2f} req/s",
        f"mean             {summary.mean_ms:.0f} ms",
        f"P50 / P95 / P99  {summary.p50_ms:.0f} / {summary.p95_ms:.0f} / {summary.p99_ms:.0f} ms",
        f"errors           {summary.errors} ({summary.error_rate:.1%}; "
        f"{summary.timeouts} timeouts)",
        f"shed (429)       {summary.shed} ({summary.shed_rate:.1%})",
    ]
    if summary.bad:
        lines.append(f"other 4xx        {summary.bad} (check the request body and API key)")
    if summary.ttft_p95_ms is not None:
        lines.append(f"P95 first token  {summary.ttft_p95_ms:.0f} ms")
    if summary.stage_ms:
        parts = ", ".join(f"{k} {v:.0f} ms" for k, v in summary.stage_ms.items())
        lines.append(f"stage means      {parts} (server-reported timings_ms)")
    return "\n".join(lines)


JTL_HEADER = [
    "timeStamp", "elapsed", "label", "responseCode", "responseMessage", "threadName",
    "success", "failureMessage", "bytes", "allThreads", "Latency",
]  # fmt: skip


def write_jtl(path: Path, samples: Sequence[Sample], plan: Plan, wall_start: float) -> None:
    """Samples in JMeter's CSV result format, so JMeter's report generator can read them."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(JTL_HEADER)
        for s in samples:
            w.writerow(
                [
                    int((wall_start + s.start) * 1000),
                    round(s.latency_ms),
                    f"POST {plan.path}",
                    s.status or "timeout",
                    "OK" if s.outcome == "ok" else s.error or s.outcome,
                    f"users 1-{s.user + 1}",
                    str(s.outcome == "ok").lower(),
                    "" if s.outcome == "ok" else s.error or s.outcome,
                    s.nbytes,
                    plan.concurrency,
                    round(s.ttft_ms if s.ttft_ms is not None else s.latency_ms),
                ]
            )


def add_plan_arguments(p: argparse.ArgumentParser, *, sweep: bool = False) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8080", help="the edge (or nginx) base URL")
    p.add_argument("--path", default="/chat")
    if not sweep:
        p.add_argument("-c", "--concurrency", type=int, default=20, help="virtual users")
    p.add_argument("--ramp-up", type=float, default=0.0, help="seconds to start every user")
    p.add_argument("-z", "--duration", type=float, default=60.0, help="seconds per run")
    p.add_argument("-n", "--requests", type=int, default=0, help="stop after N requests (0: no)")
    p.add_argument("-t", "--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS, help="CSV of questions")
    p.add_argument("--column", default="question", help="the CSV column with the questions")
    p.add_argument(
        "--body",
        default='{"query": "{question}"}',
        help='JSON body template; "{question}" is replaced (e.g. add "max_tokens": 64)',
    )
    p.add_argument("-H", "--header", action="append", default=[], help="'Name: value'")
    p.add_argument("--api-key", default="", help="sent as 'Authorization: Bearer KEY'")
    p.add_argument(
        "--cache", action="store_true", help="let answer caches answer (default: bypass)"
    )
    p.add_argument("--stream", action="store_true", help="ask for SSE and time the first token")
    p.add_argument(
        "--ignore-retry-after",
        action="store_true",
        help="a refused (429/503) user asks again at once instead of waiting Retry-After",
    )


def plan_from_args(args: argparse.Namespace, concurrency: int) -> Plan:
    try:
        body = json.loads(args.body)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ValueError("--body must be a JSON object")
    headers = {}
    for h in args.header:
        name, sep, value = h.partition(":")
        if not sep:
            raise ValueError(f"--header {h!r}: expected 'Name: value'")
        headers[name.strip()] = value.strip()
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    if args.duration <= 0 and args.requests <= 0:
        raise ValueError("give a duration (-z) or a request count (-n) so the run ends")
    return Plan(
        url=args.url,
        path=args.path,
        concurrency=concurrency,
        ramp_up_s=max(0.0, args.ramp_up),
        duration_s=args.duration if args.duration > 0 else float("inf"),
        requests=args.requests,
        timeout_s=args.timeout,
        questions=read_questions(args.questions, args.column),
        body=body,
        headers=headers,
        cache=args.cache,
        stream=args.stream,
        api_key=args.api_key,
        honor_retry_after=not args.ignore_retry_after,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="loadtest http", description="The /chat load plan (JMeter-style) against one URL."
    )
    add_plan_arguments(p)
    p.add_argument("--json", type=Path, help="write the summary and every sample here")
    p.add_argument("--jtl", type=Path, help="write samples in JMeter's CSV (.jtl) format here")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    try:
        plan = plan_from_args(args, args.concurrency)
    except (ValueError, OSError) as exc:
        print(f"loadtest http: {exc}", file=sys.stderr)
        return 2
    wall_start = time.time()
    try:
        samples, end = asyncio.run(run_plan(plan, None if args.quiet else progress_line()))
    except KeyboardInterrupt:
        print("loadtest http: interrupted", file=sys.stderr)
        return 130
    summary = summarize(samples, plan, end)
    print(format_summary(summary))
    if args.json:
        args.json.write_text(
            json.dumps(
                {"plan": {**asdict(plan), "questions": len(plan.questions)},
                 "summary": summary.to_dict(),
                 "samples": [asdict(s) for s in samples]},
                indent=1,
            )
        )  # fmt: skip
    if args.jtl:
        write_jtl(args.jtl, samples, plan, wall_start)
    if not samples:
        print("loadtest http: no request completed", file=sys.stderr)
        return 1
    if summary.ok == 0:
        first = next((s.error or str(s.status) for s in samples if s.outcome != "ok"), "")
        print(f"loadtest http: every request failed (first: {first})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
