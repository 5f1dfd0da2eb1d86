"""`loadtest http`: the write-up's JMeter plan for `POST /chat`, in Python, reported in the
serving field's terms (vLLM's benchmark_serving, GenAI-Perf; see ``loadtest/metrics.py``).

The plan (JMeter's thread group, as the write-up ran it): N virtual users started evenly over a
ramp-up period, each sending one request at a time in a loop until the duration ends; questions
come from a CSV file (default ``corpus/load_questions.csv``) shared by all users in order and
recycled at its end (JMeter's CSV Data Set Config), each put into a JSON body
(`{"query": "{question}"}` by default; `loadtest sweep` asks for the LLM by default).

What is counted: a request is **ok** (2xx), **shed** (429: the server refused it at once; the
write-up's stack had no such answer), an **error** (5xx, a connection failure, a client-side
timeout, or an ``error`` event inside a 200 stream) or **bad** (another 4xx: the plan is
wrong). The figures cover the steady state: requests started after the ramp-up (all of them
when there is none). With `--stream` the edge's Server-Sent Events are timed: the first
``token`` event (TTFT), every gap after it (ITL), and the ``done`` event's usage (prompt,
cached prompt and completion tokens) and stage timings.

A user refused with 429 (or 503) waits what `Retry-After` says before asking again, as real
clients do (`--ignore-retry-after` makes it ask again at once, as JMeter's loop does); the
refusals are counted either way, apart from errors. Answer caches are bypassed
(`Cache-Control: no-cache`) unless `--cache`: a load test that replays its questions would
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

from loadtest import metrics
from loadtest.chatstream import SseParser, StreamRecorder, record_answer
from loadtest.metrics import STAGES, Sample, Slo, Summary, format_summary, percentile

__all__ = ["STAGES", "Plan", "Sample", "Slo", "Summary", "format_summary", "percentile"]

REPO = Path(__file__).resolve().parent.parent
DEFAULT_QUESTIONS = REPO / "corpus" / "load_questions.csv"
DEFAULT_BODY = '{"query": "{question}"}'
# The sweep measures generation: the edge's default answerer is extractive (no LLM).
SWEEP_BODY = '{"query": "{question}", "answerer": "generate", "max_tokens": 64}'


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
    slo_ttft_ms: float = Slo.ttft_ms
    slo_e2e_ms: float = Slo.e2e_ms

    @property
    def slo(self) -> Slo:
        return Slo(self.slo_ttft_ms, self.slo_e2e_ms)


def summarize(samples: Sequence[Sample], plan: Plan, end: float) -> Summary:
    """The plan's figures (``loadtest.metrics.summarize``): its ramp-up, concurrency and SLO."""
    return metrics.summarize(samples, plan.concurrency, plan.ramp_up_s, end, plan.slo)


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


class QuestionCursor:
    """JMeter's shared CSV data set: the next question for whichever user asks, recycled at its
    end. A sweep keeps one cursor across its levels, so no question is asked twice before every
    one has been; a question asked again is a repeat (by its text)."""

    def __init__(self, questions: Sequence[str]) -> None:
        if not questions:
            raise ValueError("no questions to ask")
        self.questions = list(questions)
        self.sent = 0
        self.repeats = 0
        self._seen: set[str] = set()

    def take(self) -> tuple[str, bool]:
        """The next question, and whether it was sent before."""
        q = self.questions[self.sent % len(self.questions)]
        self.sent += 1
        repeat = q in self._seen
        self._seen.add(q)
        self.repeats += repeat
        return q, repeat


async def _one(
    client: httpx.AsyncClient,
    plan: Plan,
    question: str,
    user: int,
    t0: float,
    repeat: bool = False,
) -> Sample:
    body = render_body(plan.body, question)
    if plan.stream:
        body = {**body, "stream": True}
    start = time.perf_counter()
    sample = Sample(
        start=start - t0, latency_ms=0.0, status=0, outcome="error", user=user, repeat=repeat
    )
    try:
        if plan.stream:
            async with client.stream("POST", plan.path, json=body) as resp:
                sample.retry_after_s = _retry_after(resp)
                sample.status = resp.status_code
                sample.trace_id = resp.headers.get("x-trace-id", "")
                if resp.status_code != 200:  # a refusal is a JSON body, not events
                    sample.nbytes = len(await resp.aread())
                    sample.error = _error_text(resp)
                else:
                    await _read_events(resp, sample, start)
        else:
            resp = await client.post(plan.path, json=body)
            sample.retry_after_s = _retry_after(resp)
            sample.status = resp.status_code
            sample.nbytes = len(resp.content)
            sample.trace_id = resp.headers.get("x-trace-id", "")
            if resp.status_code == 200:
                record_answer(sample, resp.json())
            else:
                sample.error = _error_text(resp)
        sample.outcome = classify(sample.status)
        if sample.outcome == "ok" and sample.error:  # an error event inside a 200 stream
            sample.outcome = "error"
    except httpx.TimeoutException:
        sample.error = "timeout"
    except httpx.HTTPError as exc:
        sample.error = f"{type(exc).__name__}: {exc}"[:200] or type(exc).__name__
    except ValueError as exc:  # a 200 whose body or done event is not JSON
        sample.error = f"unreadable answer: {exc}"[:200]
        sample.outcome = "error"
    sample.latency_ms = (time.perf_counter() - start) * 1000
    return sample


async def _read_events(resp: httpx.Response, sample: Sample, start: float) -> None:
    parser, recorder = SseParser(), StreamRecorder(sample)
    async for line in resp.aiter_lines():
        sample.nbytes += len(line) + 1
        if event := parser.feed(line):
            recorder.event(*event, (time.perf_counter() - start) * 1000)
    if event := parser.flush():
        recorder.event(*event, (time.perf_counter() - start) * 1000)
    recorder.finish()


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


async def run_plan(
    plan: Plan,
    progress: ProgressFn | None = None,
    questions: QuestionCursor | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> tuple[list[Sample], float]:
    """Run the plan; returns the samples and when the run ended (s since it began).

    ``questions``: a cursor to continue (a sweep's, across its levels); else a fresh one over
    the plan's questions. ``transport``: httpx's (a ``MockTransport`` in tests); else TCP.
    """
    if questions is None:
        if not plan.questions:
            raise ValueError("the plan has no questions")
        questions = QuestionCursor(plan.questions)
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
        refused: tuple[str, bool] | None = None
        while budget_left():
            started += 1
            # A refused question is asked again (as its user would), not swapped for the next
            # one: otherwise overload would answer the cheap questions (not found, no LLM) and
            # drop the expensive ones, and the mix a level measures would drift.
            question, repeat = refused or questions.take()
            sample = await _one(client, plan, question, n, t0, repeat)
            samples.append(sample)
            refused = (question, repeat) if sample.outcome == "shed" else None
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
        base_url=plan.url.rstrip("/"),
        headers=headers,
        limits=limits,
        timeout=timeout,
        transport=transport,
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
        answered = [s for s in recent if s.outcome == "ok"]
        p95 = percentile([s.latency_ms for s in answered], 95)
        ttfts = [s.ttft_ms for s in answered if s.ttft_ms is not None]
        ttft = f"  TTFT P95(5s) {percentile(ttfts, 95):>7.0f} ms" if ttfts else ""
        print(
            f"{prefix}[{t:5.0f}s] users {active:>4}  ok {ok:>6}  errors {errors:>5}  "
            f"429 {shed:>5}  e2e P95(5s) {p95:>8.0f} ms{ttft}",
            file=sys.stderr,
            flush=True,
        )

    return show


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
    p.add_argument(
        "-t",
        "--timeout",
        type=float,
        default=90.0,
        help="seconds per request (longer than the edge's 60 s budget, so its own 504 is seen)",
    )
    p.add_argument(
        "--questions",
        type=Path,
        default=DEFAULT_QUESTIONS,
        help="CSV of questions (default corpus/load_questions.csv)",
    )
    p.add_argument("--column", default="question", help="the CSV column with the questions")
    p.add_argument(
        "--body",
        default=SWEEP_BODY if sweep else DEFAULT_BODY,
        help='JSON body template; "{question}" is replaced (default %(default)s)',
    )
    p.add_argument("-H", "--header", action="append", default=[], help="'Name: value'")
    p.add_argument("--api-key", default="", help="sent as 'Authorization: Bearer KEY'")
    p.add_argument(
        "--cache", action="store_true", help="let answer caches answer (default: bypass)"
    )
    p.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=sweep,
        help="ask for SSE and time the first token and each one after it"
        + (" (default: on)" if sweep else " (default: off)"),
    )
    p.add_argument(
        "--ignore-retry-after",
        action="store_true",
        help="a refused (429/503) user asks again at once instead of waiting Retry-After",
    )
    p.add_argument(
        "--slo-ttft-ms",
        type=float,
        default=Slo.ttft_ms,
        help="goodput counts requests whose first token came within this (default %(default)s)",
    )
    p.add_argument(
        "--slo-e2e-ms",
        type=float,
        default=Slo.e2e_ms,
        help="... and whose whole answer came within this (default %(default)s)",
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
    if args.slo_ttft_ms <= 0 or args.slo_e2e_ms <= 0:
        raise ValueError("--slo-ttft-ms and --slo-e2e-ms must be positive")
    if not args.questions.exists():
        hint = (
            "; try --questions corpus/questions.csv" if args.questions == DEFAULT_QUESTIONS else ""
        )
        raise ValueError(f"--questions {args.questions}: no such file{hint}")
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
        slo_ttft_ms=args.slo_ttft_ms,
        slo_e2e_ms=args.slo_e2e_ms,
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
                 "samples": [{**asdict(s), "tpot_ms": s.tpot_ms} for s in samples]},
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
