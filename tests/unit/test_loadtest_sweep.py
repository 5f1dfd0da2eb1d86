"""The /chat plan's bookkeeping and the sweep's knee, attribution and report, on recorded data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loadtest import httpload, sweep
from loadtest.httpload import Plan, Sample, Summary
from loadtest.metrics import Dist
from loadtest.tracereport import SpanRecord


def sample(start: float, ms: float, status: int = 200, **kw) -> Sample:
    return Sample(
        start=start, latency_ms=ms, status=status, outcome=httpload.classify(status), **kw
    )


def summary(
    c: int,
    goodput: float,
    p95: float,
    failed: int = 0,
    admitted: int = 100,
    shed: int = 0,
    rps: float | None = None,
) -> Summary:
    """A level's summary: ``failed`` of ``admitted`` requests were errors, ``shed`` got 429."""
    e2e = Dist(admitted - failed, p95 * 0.6, p95 * 0.5, p95, p95 * 1.2)
    return Summary(
        concurrency=c,
        requests=admitted + shed,
        admitted=admitted,
        ok=admitted - failed,
        errors=failed,
        shed=shed,
        bad=0,
        timeouts=0,
        window_s=60,
        request_throughput=goodput if rps is None else rps,
        output_throughput=goodput * 40,
        goodput=goodput,
        slo_met=round(goodput * 60),
        slo_ttft_ms=5000,
        slo_e2e_ms=30000,
        ttft=Dist(admitted - failed, p95 * 0.1, p95 * 0.08, p95 * 0.2, p95 * 0.3),
        e2e=e2e,
        prompt_tokens=1000,
        cached_prompt_tokens=250,
        completion_tokens=round(goodput * 40 * 60),
        questions_sent=admitted + shed,
    )


def test_outcomes_follow_what_the_server_said() -> None:
    assert [httpload.classify(s) for s in (200, 429, 500, 503, 504, 400, 401)] == [
        "ok", "shed", "error", "error", "error", "bad", "bad",
    ]  # fmt: skip


def test_summary_counts_the_steady_window_and_times_only_answers() -> None:
    plan = Plan(concurrency=4, ramp_up_s=2.0, duration_s=12.0)
    samples = [
        sample(0.5, 1900),  # started in the ramp-up: not in the stats, but completes in window
        sample(2.5, 1000, timings_ms={"embed": 10, "retrieve": 5, "generate": 900, "total": 915}),
        sample(3.0, 2000, timings_ms={"embed": 20, "retrieve": 5, "generate": 1900, "total": 1925}),
        sample(4.0, 1, status=429),
        sample(5.0, 3000, status=504),
        Sample(start=6.0, latency_ms=60000, status=0, outcome="error", error="timeout"),
        sample(11.5, 4000),  # completes after the deadline: still an answer to a steady request
    ]
    s = httpload.summarize(samples, plan, end=12.0)
    assert s.requests == 6 and s.ok == 3 and s.shed == 1 and s.errors == 2 and s.timeouts == 1
    assert s.admitted == 5
    assert s.request_throughput == pytest.approx(3 / 10.0)  # the steady ones answered
    assert s.e2e.mean == pytest.approx((1000 + 2000 + 4000) / 3)  # answers only
    assert s.e2e.p50 == 2000 and s.e2e.p95 == pytest.approx(np.percentile([1000, 2000, 4000], 95))
    assert s.error_rate == pytest.approx(2 / 5) and s.shed_rate == pytest.approx(1 / 6)
    assert s.stage_ms["generate"] == pytest.approx(1400) and s.stage_ms["embed"] == 15
    assert s.goodput == pytest.approx(3 / 10.0), "non-streamed within the default SLO"


def test_questions_come_from_the_named_column_or_the_first(tmp_path) -> None:
    f = tmp_path / "q.csv"
    f.write_text('expected_source,question\na.md,"Hi, there?"\nb.md,Second\n')
    assert httpload.read_questions(f) == ["Hi, there?", "Second"]
    plain = tmp_path / "plain.csv"
    plain.write_text("first question\nsecond question\n")
    assert httpload.read_questions(plain) == ["first question", "second question"]
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="no questions"):
        httpload.read_questions(tmp_path / "empty.csv")


def test_body_template_puts_the_question_everywhere_it_is_named() -> None:
    body = httpload.render_body(
        {"query": "{question}", "max_tokens": 64, "meta": ["q: {question}"]}, 'say "hi"'
    )
    assert body == {"query": 'say "hi"', "max_tokens": 64, "meta": ['q: say "hi"']}
    assert json.loads(json.dumps(body))["query"] == 'say "hi"'


def test_questions_are_shared_in_order_and_recycled() -> None:
    q = httpload.QuestionCursor(["a", "b", "c"])
    assert [q.take()[0] for _ in range(7)] == ["a", "b", "c", "a", "b", "c", "a"]


def test_knee_is_the_best_goodput_within_the_failure_budget_of_admitted_requests() -> None:
    levels = [
        sweep.Level(20, summary(20, 8.2, 380)),
        sweep.Level(50, summary(50, 14.7, 820)),
        # most successful requests per second, but fewer within the SLO: goodput decides
        sweep.Level(100, summary(100, 12.0, 1650, failed=1, rps=16.3)),
        sweep.Level(150, summary(150, 15.1, 2900, failed=7)),
    ]
    assert sweep.find_knee(levels, max_error_rate=0.07) == 3
    assert sweep.find_knee(levels, max_error_rate=0.01) == 1
    assert sweep.find_knee(levels, max_error_rate=0.01, slo_p95_ms=500) == 0
    assert sweep.find_knee(levels, max_error_rate=0.01, slo_p95_ms=100) is None
    # 429s are refusals, not failures: 1 error among 100 admitted is 1% however many were shed
    shed = [sweep.Level(10, summary(10, 5, 300)), sweep.Level(20, summary(20, 6, 300, failed=1,
                                                                          shed=400))]  # fmt: skip
    assert sweep.find_knee(shed, max_error_rate=0.01) == 1
    assert sweep.find_knee(shed, max_error_rate=0.005) == 0
    # nothing within the SLO: no knee, however many succeeded
    assert sweep.find_knee([sweep.Level(5, summary(5, 0.0, 90000, rps=3))], 0.01) is None


def test_bottleneck_is_the_largest_share_past_the_knee_and_says_how_it_grew() -> None:
    levels = [
        sweep.Level(20, summary(20, 8, 400), {"embed": 100, "retrieve": 5, "generate": 150}),
        sweep.Level(50, summary(50, 14, 800), {"embed": 300, "retrieve": 6, "generate": 250}),
        sweep.Level(100, summary(100, 15, 2500), {"embed": 900, "retrieve": 8, "generate": 400}),
    ]
    stage, sentence = sweep.bottleneck(levels, knee=1)
    assert stage == "embed"
    assert "100 users" in sentence and "grew from 100 ms at 20 users" in sentence
    assert "Scale embed next" in sentence
    # No knee: the first level is already past it.
    assert sweep.bottleneck(levels, None)[0] == "generate"
    # Trace parts (queue/compute/network) add up per stage and queueing is named.
    traced = [
        sweep.Level(
            10,
            summary(10, 1, 100),
            {"generate queue": 700, "generate compute": 300, "embed compute": 20, "edge": 5},
        )
    ]
    stage, sentence = sweep.bottleneck(traced, None)
    assert stage == "generate" and "700 ms of it queueing" in sentence


def test_timings_attribution_leaves_the_rest_to_the_edge() -> None:
    done = [
        sample(0, 1100, timings_ms={"embed": 10, "retrieve": 5, "generate": 1000, "total": 1015}),
        sample(0, 5, cached=True, timings_ms={}),
        sample(0, 5, status=500),
    ]
    parts = sweep.timings_attribution(done)
    assert parts == {"embed": 10, "retrieve": 5, "generate": 1000, "edge + network": 85}


def span(trace: str, sid: str, parent: str | None, name: str, kind: str, t0: int, t1: int, **a):
    return SpanRecord(trace, sid, parent, name, kind, t0 * 10**6, t1 * 10**6, a)


def test_trace_attribution_uses_only_the_levels_own_traces() -> None:
    spans = []
    for trace, gen_ms in (("t1", 800), ("t2", 1200), ("other", 99999)):
        spans += [
            span(trace, "r", None, "POST /chat", "SERVER", 0, gen_ms + 100,
                 **{"http.route": "/chat"}),
            span(trace, "c", "r", "Generate", "CLIENT", 50, 50 + gen_ms,
                 **{"rpc.service": "ragline.v1.Generate"}),
            span(trace, "s", "c", "Generate", "SERVER", 51, 49 + gen_ms),
            span(trace, "q", "s", "generate.queue_wait", "INTERNAL", 51, 251),
        ]  # fmt: skip
    parts = sweep.trace_attribution(spans, ["t1", "t2"])
    assert parts["generate queue"] == pytest.approx(200)
    assert parts["generate compute"] == pytest.approx((798 + 1198) / 2 - 200)
    assert parts["generate network"] == pytest.approx(2)
    assert parts["edge"] == pytest.approx(100)
    assert sweep.trace_attribution(spans, ["missing"]) == {}


def test_comparison_ratios_and_the_report(tmp_path) -> None:
    ours = [
        sweep.Level(20, summary(20, 10, 500), {"embed": 10, "generate": 400}),
        sweep.Level(50, summary(50, 20, 900), {"embed": 12, "generate": 800}),
    ]
    theirs = [sweep.Level(20, summary(20, 5, 1000)), sweep.Level(50, summary(50, 4, 3000))]
    cmp = sweep.compare(ours, theirs, err=0.01)
    assert cmp.goodput_knee_ratio == pytest.approx(4.0)  # 20 req/s vs the monolith's 5
    assert (cmp.ragline_knee, cmp.monolith_knee) == (50, 20)
    assert cmp.goodput_ratios == {20: pytest.approx(2.0), 50: pytest.approx(5.0)}
    assert cmp.e2e_p95_ratios == {20: pytest.approx(2.0), 50: pytest.approx(3000 / 900)}
    assert cmp.ttft_p95_ratios[50] == pytest.approx(3000 / 900)
    plots = sweep.plot(tmp_path, {"ragline": ours, "monolith": theirs})
    assert {p.name for p in plots} == {"throughput.png", "latency.png", "stages-ragline.png"}
    for p in plots:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cursor = httpload.QuestionCursor([f"q{i}" for i in range(500)])
    for _ in range(200):
        cursor.take()
    runs = {"ragline": sweep.SystemRun(ours, cursor), "monolith": sweep.SystemRun(theirs, cursor)}
    criteria = sweep.Criteria(5000, 30000, 0.01)
    meta = {"argv": "--levels 20,50", "body": {"query": "{question}"}, "stream": True}
    report = sweep.markdown(runs, meta, criteria, cmp, plots)
    assert "SLO: TTFT <= 5,000 ms and e2e <= 30,000 ms" in report
    assert "failures <= 1.0% of admitted requests" in report
    assert "| **50 (knee)** | 100 | 0 | 0 | 100 | 100 | 0.0% | 0.0% | 20.00 | 20.00 | 800.0 |" in (
        report
    )
    assert "| 20 | 50 | 40 / 100 / 150 | – | – | – | – | 300 | 250 / 500 / 600 |" in report
    assert "| **50 (knee)** | 1,000 | 250 | 25.0% | 48,000 |" in report
    assert "**Knee:** 50 users, goodput 20.00 req/s" in report
    assert "Questions: 200 sent over the sweep from 500 distinct in the file; repeats: 0." in report
    assert "Goodput at the knee, ragline / monolith: **4.00x**" in report
    assert "| 50 | 5.00x | 3.33x | 3.33x |" in report
    assert "![throughput](throughput.png)" in report
    assert "Scale generate next" in report
    data = json.loads(json.dumps(sweep.report_json(runs, meta, criteria, cmp)))
    assert data["knees"] == {"ragline": 50, "monolith": 20}
    assert data["comparison"]["goodput_knee_ratio"] == pytest.approx(4.0)
    assert data["criteria"] == {"slo_ttft_ms": 5000, "slo_e2e_ms": 30000,
                                "max_error_rate": 0.01, "slo_p95_ms": 0.0}  # fmt: skip
    assert data["questions"]["ragline"] == {"distinct_in_file": 500, "sent": 200, "repeats": 0}
    again = sweep.Level.from_dict(data["runs"]["ragline"][1])
    assert again.summary == ours[1].summary and again.attribution == ours[1].attribution


def test_without_a_knee_the_best_goodput_stands_in_and_the_note_says_so() -> None:
    ours = [sweep.Level(20, summary(20, 10, 500))]
    theirs = [sweep.Level(20, summary(20, 2, 9000, failed=30))]
    cmp = sweep.compare(ours, theirs, err=0.01)
    assert cmp.goodput_knee_ratio == pytest.approx(5.0) and cmp.monolith_knee is None
    assert "monolith no knee" in cmp.note and "at 20 users, stands in" in cmp.note
    nothing = [sweep.Level(20, summary(20, 0.0, 90000, failed=100))]
    assert sweep.compare(ours, nothing, err=0.01).goodput_knee_ratio is None


def test_levels_and_plans_refuse_what_would_not_end_or_make_sense(tmp_path) -> None:
    assert sweep.parse_levels("20, 50,100") == [20, 50, 100]
    for bad in ("", "0,5", "a,b"):
        with pytest.raises(ValueError):
            sweep.parse_levels(bad)
    q = tmp_path / "q.csv"
    q.write_text("question\nhello?\n")
    import argparse

    p = argparse.ArgumentParser()
    httpload.add_plan_arguments(p, sweep=True)
    with pytest.raises(ValueError, match="ends"):
        httpload.plan_from_args(p.parse_args(["--questions", str(q), "-z", "0"]), 5)
    with pytest.raises(ValueError, match="JSON"):
        httpload.plan_from_args(p.parse_args(["--questions", str(q), "--body", "{x"]), 5)
    with pytest.raises(ValueError, match="positive"):
        httpload.plan_from_args(p.parse_args(["--questions", str(q), "--slo-e2e-ms", "0"]), 5)
    with pytest.raises(ValueError, match="no such file"):
        httpload.plan_from_args(p.parse_args(["--questions", str(tmp_path / "none.csv")]), 5)
    body = '{"query": "{question}", "max_tokens": 8}'
    args = p.parse_args(["--questions", str(q), "-H", "X-Tenant: a", "--body", body])
    plan = httpload.plan_from_args(args, 5)
    assert plan.headers == {"X-Tenant": "a"} and plan.body["max_tokens"] == 8
    assert plan.questions == ["hello?"] and plan.concurrency == 5


def test_the_sweep_streams_and_asks_for_the_llm_by_default_and_http_does_not(tmp_path) -> None:
    import argparse

    q = tmp_path / "q.csv"
    q.write_text("question\nhello?\n")
    assert httpload.DEFAULT_QUESTIONS.name == "load_questions.csv"
    swept = argparse.ArgumentParser()
    httpload.add_plan_arguments(swept, sweep=True)
    plan = httpload.plan_from_args(swept.parse_args(["--questions", str(q)]), 2)
    assert plan.stream is True
    assert plan.body == {"query": "{question}", "answerer": "generate", "max_tokens": 64}
    assert (plan.slo_ttft_ms, plan.slo_e2e_ms) == (5000, 30000)
    args = swept.parse_args(["--questions", str(q), "--no-stream", "--slo-ttft-ms", "800"])
    plan = httpload.plan_from_args(args, 2)
    assert plan.stream is False and plan.slo == httpload.Slo(800, 30000)
    single = argparse.ArgumentParser()
    httpload.add_plan_arguments(single)
    plan = httpload.plan_from_args(single.parse_args(["--questions", str(q)]), 2)
    assert plan.stream is False and plan.body == {"query": "{question}"}


def test_sweep_cli_exits_2_with_a_message_for_bad_levels(capsys) -> None:
    assert sweep.main(["--levels", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err


def test_each_baseline_gets_its_own_comparison(tmp_path) -> None:
    ours = [sweep.Level(20, summary(20, 10, 500))]
    mono = [sweep.Level(20, summary(20, 5, 1000))]
    chat = [sweep.Level(20, summary(20, 2, 4000))]
    cmps = {"monolith": sweep.compare(ours, mono, err=0.01, baseline="monolith"),
            "chatchat": sweep.compare(ours, chat, err=0.01, baseline="chatchat")}  # fmt: skip
    cursor = httpload.QuestionCursor(["q"])
    runs = {n: sweep.SystemRun(lv, cursor) for n, lv in
            (("ragline", ours), ("monolith", mono), ("chatchat", chat))}  # fmt: skip
    criteria = sweep.Criteria(5000, 30000, 0.01)
    report = sweep.markdown(runs, {"argv": ""}, criteria, cmps, [])
    assert "## ragline vs the replicated monolith" in report
    assert "## ragline vs Langchain-Chatchat" in report
    assert "Goodput at the knee, ragline / chatchat: **5.00x**" in report
    data = sweep.report_json(runs, {}, criteria, cmps)
    assert data["comparison"]["baseline"] == "monolith"
    assert data["comparisons"]["chatchat"]["goodput_knee_ratio"] == pytest.approx(5.0)
    # a saved sweep's report is written again from its sweep.json alone
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps(data))
    assert sweep.main(["--rebuild", str(saved), "--out", str(tmp_path / "again")]) == 0
    again = (tmp_path / "again" / "report.md").read_text()
    assert "Goodput at the knee, ragline / chatchat: **5.00x**" in again
