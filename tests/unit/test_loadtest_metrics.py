"""The load test's serving metrics, its SSE reading and its question cursor, without sockets.

Streams come from the edge's own code (``ChatPipeline.answer_stream`` encoded by
``services.api.http.sse_events``) through an httpx ``MockTransport``, so the parser is held to
the format the edge really sends.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest

from loadtest import httpload, metrics, sweep
from loadtest.chatstream import SseParser, StreamRecorder
from loadtest.httpload import Plan, QuestionCursor, run_plan
from loadtest.metrics import Dist, Sample, Slo
from ragline.errors import Unavailable
from ragline.types import CompletionChunk, Hit, SearchResult, Usage
from services.api.chat import ChatLimits
from services.api.http import sse_events
from services.api.pipeline import AnswerPolicy, ChatPipeline


def ok(start: float, e2e: float, ttft: float | None = None, tokens: int = 0, **kw) -> Sample:
    return Sample(start=start, latency_ms=e2e, status=200, outcome="ok", ttft_ms=ttft,
                  completion_tokens=tokens, **kw)  # fmt: skip


def failed(start: float, status: int, ms: float = 5.0, error: str = "") -> Sample:
    return Sample(start=start, latency_ms=ms, status=status, outcome=httpload.classify(status),
                  error=error)  # fmt: skip


def test_percentiles_interpolate_as_numpy_does() -> None:
    rng = np.random.default_rng(7)
    for n in (1, 2, 5, 37, 200):
        values = list(rng.exponential(300.0, n))
        for q in (50, 95, 99):
            assert metrics.percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert metrics.percentile([], 95) == 0.0
    assert Dist.of([]) == Dist()


def test_ttft_tpot_and_itl_distributions_from_synthetic_requests() -> None:
    rng = np.random.default_rng(3)
    samples, ttfts, tpots, itls, e2es = [], [], [], [], []
    for i in range(60):
        ttft = float(rng.uniform(100, 900))
        gaps = [float(g) for g in rng.uniform(20, 60, int(rng.integers(1, 30)))]
        e2e = ttft + sum(gaps) + 5.0  # the done event arrives after the last token
        tokens = len(gaps) + 1
        samples.append(ok(i * 0.1, e2e, ttft, tokens, itl_ms=gaps))
        ttfts.append(ttft), itls.extend(gaps), e2es.append(e2e)
        tpots.append((e2e - ttft) / (tokens - 1))
    # A one-token answer has a TTFT but no TPOT; a failure is counted, not timed.
    samples.append(ok(6.0, 400.0, 390.0, 1))
    samples.append(failed(6.1, 500, ms=99999.0))
    s = metrics.summarize(samples, concurrency=4, ramp_up_s=0.0, end=10.0)
    for dist, values in ((s.ttft, [*ttfts, 390.0]), (s.tpot, tpots), (s.itl, itls),
                         (s.e2e, [*e2es, 400.0])):  # fmt: skip
        assert dist.n == len(values)
        assert dist.mean == pytest.approx(np.mean(values))
        for q in (50, 95, 99):
            assert getattr(dist, f"p{q}") == pytest.approx(np.percentile(values, q))
    assert samples[0].tpot_ms == pytest.approx(tpots[0])
    assert samples[-2].tpot_ms is None and ok(0, 10).tpot_ms is None
    assert s.completion_tokens == sum(x.completion_tokens for x in samples[:-1])
    assert s.output_throughput == pytest.approx(s.completion_tokens / 10.0)
    assert s.request_throughput == pytest.approx(61 / 10.0)


def test_goodput_counts_only_successes_that_met_the_slo() -> None:
    slo = Slo(ttft_ms=1000, e2e_ms=5000)
    samples = [
        ok(0, 3000, ttft=400),  # met
        ok(0, 5000, ttft=1000),  # met, at both limits
        ok(0, 4000, ttft=1200),  # first token too late
        ok(0, 6000, ttft=300),  # whole answer too late
        ok(0, 800),  # not streamed: its first token came with the answer, 800 ms: met
        ok(0, 1500),  # not streamed: 1,500 ms to the first token: missed
        failed(0, 500, ms=10),  # fast, but failed
        failed(0, 429, ms=1),  # refused
    ]
    s = metrics.summarize(samples, 8, 0.0, end=4.0, slo=slo)
    assert s.slo_met == 3 and s.goodput == pytest.approx(3 / 4.0)
    assert s.request_throughput == pytest.approx(6 / 4.0)
    assert (s.slo_ttft_ms, s.slo_e2e_ms) == (1000, 5000)
    assert "goodput" in metrics.format_summary(s) and "TTFT <= 1,000 ms" in (
        metrics.format_summary(s)
    )


def test_429s_are_counted_apart_and_left_out_of_the_error_rate() -> None:
    samples = [
        *(ok(1.0 + i * 0.1, 100) for i in range(6)),
        *(failed(2.0, 429) for _ in range(10)),
        failed(3.0, 503),
        Sample(start=3.5, latency_ms=60000, status=0, outcome="error", error="timeout"),
        Sample(start=3.6, latency_ms=900, status=200, outcome="error", error="generate down"),
        failed(4.0, 400),
        ok(0.5, 100),  # in the ramp-up: asked, but not in the steady figures
    ]
    s = metrics.summarize(samples, 4, ramp_up_s=1.0, end=11.0)
    assert s.requests == 20 and s.shed == 10 and s.admitted == 10
    assert s.ok == 6 and s.errors == 3 and s.bad == 1 and s.timeouts == 1
    assert s.error_rate == pytest.approx(3 / 10)  # not 3 / 20: 429s are not admitted
    assert s.failed_rate == pytest.approx(4 / 10)
    assert s.shed_rate == pytest.approx(10 / 20)
    assert s.window_s == pytest.approx(10.0) and s.request_throughput == pytest.approx(0.6)
    assert s.e2e.n == 6 and s.e2e.p99 == 100  # neither the timeout nor the 429s are timed
    assert s.questions_sent == 21  # every request asked a question, the ramp-up's too
    assert metrics.summarize([failed(0, 429)], 1, 0.0, 1.0).error_rate == 0.0


def test_prefix_cache_figures_sum_over_successes() -> None:
    samples = [
        ok(0, 100, prompt_tokens=500, cached_prompt_tokens=400),
        ok(0, 100, prompt_tokens=300, cached_prompt_tokens=0),
        Sample(0, 50, 500, "error", prompt_tokens=999, cached_prompt_tokens=999),
    ]
    s = metrics.summarize(samples, 2, 0.0, 1.0)
    assert (s.prompt_tokens, s.cached_prompt_tokens) == (800, 400)
    assert s.cache_hit_ratio == pytest.approx(0.5)
    assert metrics.summarize([ok(0, 1)], 1, 0.0, 1.0).cache_hit_ratio == 0.0


def test_summary_json_reads_back_as_written() -> None:
    samples = [ok(0, 900, 300, 5, itl_ms=[100, 150, 200, 50], prompt_tokens=80,
                  cached_prompt_tokens=60, repeat=True), failed(0, 429)]  # fmt: skip
    s = metrics.summarize(samples, 3, 0.0, 2.0, Slo(500, 1000))
    data = json.loads(json.dumps(s.to_dict()))
    assert data["error_rate"] == 0.0 and data["cache_hit_ratio"] == pytest.approx(0.75)
    assert data["ttft"]["p95"] == 300 and data["questions_repeated"] == 1
    assert metrics.Summary.from_dict(data) == s
    level = sweep.Level(3, s, {"generate": 800.0})
    again = sweep.Level.from_dict(json.loads(json.dumps(level.to_dict())))
    assert again.summary == s and again.attribution == level.attribution


# --- the question cursor -------------------------------------------------------------------


def test_the_cursor_recycles_in_order_and_counts_repeats_by_text() -> None:
    q = QuestionCursor(["a", "b", "c"])
    assert [q.take() for _ in range(5)] == [
        ("a", False), ("b", False), ("c", False), ("a", True), ("b", True),
    ]  # fmt: skip
    assert (q.sent, q.repeats) == (5, 2)
    dup = QuestionCursor(["a", "a", "b"])
    assert [r for _, r in (dup.take() for _ in range(3))] == [False, True, False]
    with pytest.raises(ValueError):
        QuestionCursor([])


def recording_transport(asked: list[str], stream: bool = False) -> httpx.MockTransport:
    """An edge stand-in that answers every /chat at once and writes down what it was asked."""

    async def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        asked.append(body["query"])
        assert request.headers["cache-control"] == "no-cache"
        await asyncio.sleep(0.002)
        usage = {"prompt_tokens": 10, "completion_tokens": 3}
        return httpx.Response(200, json={"answer": "x", "usage": usage, "timings_ms": {}})

    return httpx.MockTransport(handler)


async def test_a_sweep_continues_its_cursor_across_levels_and_the_monolith_gets_the_same() -> None:
    questions = [f"question {i}?" for i in range(40)]
    plan = Plan(url="http://edge", questions=questions, requests=6, duration_s=30)
    asked: list[str] = []
    run = await sweep.sweep(plan, [1, 2, 3], 0.0, "ragline", True, recording_transport(asked))
    assert asked == questions[:18], "in file order, none twice, each level after the last"
    assert (run.questions.sent, run.questions.repeats) == (18, 0)
    assert [lv.summary.questions_sent for lv in run.levels] == [6, 6, 6]
    assert sum(lv.summary.questions_repeated for lv in run.levels) == 0
    assert run.questions_dict() == {"distinct_in_file": 40, "sent": 18, "repeats": 0}

    theirs: list[str] = []
    mono = await sweep.sweep(plan, [1, 2, 3], 0.0, "monolith", True, recording_transport(theirs))
    assert theirs == asked, "the monolith's own fresh cursor: the same questions, same order"

    # A sweep longer than the file recycles it, and says how many were repeats.
    many: list[str] = []
    short = Plan(url="http://edge", questions=questions[:5], requests=4, duration_s=30)
    run = await sweep.sweep(short, [1, 2], 0.0, "ragline", True, recording_transport(many))
    assert many == questions[:5] + questions[:3]
    assert [lv.summary.questions_repeated for lv in run.levels] == [0, 3]
    assert mono.levels[0].summary.ok == 6


async def test_a_refused_question_is_asked_again_not_swapped_for_the_next() -> None:
    """Overload must not change the mix: a 429'd user asks the same question after waiting."""
    asked: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        q = json.loads(request.content)["query"]
        asked.append(q)
        if asked.count(q) == 1:  # every question is refused once
            return httpx.Response(429, headers={"Retry-After": "0"}, json={"error": {}})
        return httpx.Response(200, json={"answer": "x", "usage": {}, "timings_ms": {}})

    plan = Plan(url="http://edge", questions=["a?", "b?", "c?"], requests=6, duration_s=30)
    samples, _ = await run_plan(plan, transport=httpx.MockTransport(handler))
    assert asked == ["a?", "a?", "b?", "b?", "c?", "c?"]
    assert [s.outcome for s in samples] == ["shed", "ok"] * 3


# --- streams in the edge's format ----------------------------------------------------------


class Stages:
    """Embed, retrieve and generate doubles; generate streams ``pieces`` with a pause each."""

    def __init__(self, pieces: list[str], fail: bool = False) -> None:
        self.pieces = pieces
        self.fail = fail

    async def embed_query(self, query, timeout=None):
        return np.ones(3, dtype=np.float32)

    async def embed(self, texts, kind, truncate=True, timeout=None):
        raise AssertionError("the LLM answerer embeds no sentences")

    async def search(self, collection, vector, top_k, timeout=None, **_):
        return SearchResult([Hit("hb.md#0", 0.9, "Leave\nYou get 27 days of annual leave.")])

    async def generate(self, messages, params, timeout=None):
        raise AssertionError("streamed requests do not call generate")

    async def stream(self, messages, params, timeout=None):
        for piece in self.pieces:
            await asyncio.sleep(0.01)
            yield CompletionChunk(piece)
        if self.fail:
            raise Unavailable("generate replica went away")
        yield CompletionChunk("", "stop", Usage(120, len(self.pieces), 96))


def edge_transport(stages: Stages, cut_after: int | None = None) -> httpx.MockTransport:
    """/chat answered as the edge streams: the pipeline's events through its SSE encoder."""
    pipeline = ChatPipeline(stages, stages, stages, collection="kb", timeout_s=10,
                            answering=AnswerPolicy(answerer="generate"))  # fmt: skip

    async def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert body["stream"] is True and body["answerer"] == "generate"
        events = pipeline.answer_stream(body["query"], 4, ChatLimits().params(64),
                                        answerer=body["answerer"])  # fmt: skip

        async def sse():
            n = 0
            async for chunk in sse_events(events):
                if cut_after is not None and n >= cut_after:
                    return
                n += 1
                yield chunk

        return httpx.Response(200, content=sse(), headers={"content-type": "text/event-stream"})

    return httpx.MockTransport(handler)


def stream_plan() -> Plan:
    body = json.loads(httpload.SWEEP_BODY)
    return Plan(url="http://edge", questions=["How much leave?"], requests=1, stream=True,
                body=body, duration_s=30)  # fmt: skip


async def test_a_stream_in_the_edges_format_gives_ttft_itl_tpot_and_usage() -> None:
    pieces = ["You", " get", " 27", " days", " [hb.md#0]."]
    samples, _ = await httpload.run_plan(stream_plan(), transport=edge_transport(Stages(pieces)))
    (s,) = samples
    assert s.outcome == "ok" and s.error == ""
    assert s.ttft_ms is not None and 0 < s.ttft_ms <= s.latency_ms
    assert len(s.itl_ms) == len(pieces) - 1, "one gap between each two token events"
    assert all(g >= 0 for g in s.itl_ms) and s.ttft_ms + sum(s.itl_ms) <= s.latency_ms
    assert sum(s.itl_ms) >= 0.01 * 1000 * (len(pieces) - 1) * 0.5  # the pieces came 10 ms apart
    assert (s.prompt_tokens, s.completion_tokens, s.cached_prompt_tokens) == (120, 5, 96)
    assert s.tpot_ms == pytest.approx((s.latency_ms - s.ttft_ms) / 4)
    assert {"embed", "retrieve", "generate", "total"} <= set(s.timings_ms)
    assert s.cached is False


async def test_an_error_event_or_a_cut_stream_is_an_error_though_the_status_was_200() -> None:
    failing = edge_transport(Stages(["You", " get"], fail=True))
    (s,), _ = await httpload.run_plan(stream_plan(), transport=failing)
    assert s.status == 200 and s.outcome == "error" and "went away" in s.error
    assert s.ttft_ms is not None, "the tokens before the failure were still timed"
    cut = edge_transport(Stages(["You", " get", " 27"]), cut_after=3)  # sources + two tokens
    (s,), _ = await httpload.run_plan(stream_plan(), transport=cut)
    assert s.outcome == "error" and s.error == "the stream ended without a done event"


async def test_a_refused_stream_reads_the_json_error_and_counts_as_429() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        err = {"error": {"code": "resource_exhausted", "message": "too many chats in flight"}}
        return httpx.Response(429, json=err, headers={"retry-after": "0"})

    (s,), _ = await httpload.run_plan(stream_plan(), transport=httpx.MockTransport(handler))
    assert s.outcome == "shed" and s.error == "too many chats in flight"


def test_sse_parser_follows_the_event_stream_rules() -> None:
    parser = SseParser()
    lines = [": a comment", "event: token", 'data: {"text":', 'data: "hi"}', "", "",
             "data:no space", "", "event: done", "data: {}"]  # fmt: skip
    events = [e for line in lines if (e := parser.feed(line))]
    assert events == [("token", '{"text":\n"hi"}'), ("message", "no space")]
    assert parser.flush() == ("done", "{}"), "an unterminated last event is not lost"
    assert parser.flush() is None

    recorder = StreamRecorder(sample := Sample(0, 0, 200, "ok"))
    for name, data, at in [("sources", "[]", 5.0), ("token", '{"text": "a"}', 40.0),
                           ("token", '{"text": "b"}', 70.0), ("replace", "{}", 75.0),
                           ("token", '{"text": "c"}', 110.0)]:  # fmt: skip
        recorder.event(name, data, at)
    recorder.event("done", json.dumps({"usage": {"prompt_tokens": 7, "completion_tokens": 3}}), 120)
    assert sample.ttft_ms == 40.0 and sample.itl_ms == [30.0, 40.0]
    assert sample.cached_prompt_tokens == 0, "a missing cached_prompt_tokens counts as 0"
    recorder.finish()
    assert sample.error == ""
