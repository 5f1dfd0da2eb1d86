"""The /chat plan's bookkeeping and the sweep's knee, attribution and report, on recorded data."""

from __future__ import annotations

import json

import pytest

from loadtest import httpload, sweep
from loadtest.httpload import Plan, Sample, Summary
from loadtest.tracereport import SpanRecord


def sample(start: float, ms: float, status: int = 200, **kw) -> Sample:
    return Sample(
        start=start, latency_ms=ms, status=status, outcome=httpload.classify(status), **kw
    )


def summary(c: int, rps: float, p95: float, errors: int = 0, requests: int = 100) -> Summary:
    return Summary(
        concurrency=c,
        requests=requests,
        ok=requests - errors,
        errors=errors,
        shed=0,
        bad=0,
        throughput=rps,
        mean_ms=p95 * 0.6,
        p50_ms=p95 * 0.5,
        p95_ms=p95,
        p99_ms=p95 * 1.2,
        window_s=60,
    )


def test_outcomes_follow_what_the_server_said() -> None:
    assert [httpload.classify(s) for s in (200, 429, 500, 503, 504, 400, 401)] == [
        "ok", "shed", "error", "error", "error", "bad", "bad",
    ]  # fmt: skip


def test_summary_counts_the_steady_window_and_leaves_shed_out_of_latency() -> None:
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
    assert s.throughput == pytest.approx(3 / 10.0)  # the steady ones answered: 2.5, 3.0, 11.5
    assert s.mean_ms == pytest.approx((1000 + 2000 + 3000 + 60000 + 4000) / 5)
    assert s.p95_ms == 60000 and s.p50_ms == 3000
    assert s.error_rate == pytest.approx(2 / 6) and s.shed_rate == pytest.approx(1 / 6)
    assert s.stage_ms["generate"] == pytest.approx(1400) and s.stage_ms["embed"] == 15


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
    q = httpload._Questions(["a", "b", "c"])
    assert [q.take() for _ in range(7)] == ["a", "b", "c", "a", "b", "c", "a"]


def test_knee_is_the_best_throughput_within_the_slo() -> None:
    levels = [
        sweep.Level(20, summary(20, 8.2, 380)),
        sweep.Level(50, summary(50, 14.7, 820)),
        sweep.Level(100, summary(100, 16.3, 1650, errors=1)),
        sweep.Level(150, summary(150, 15.1, 2900, errors=7)),
    ]  # the write-up's table
    assert sweep.find_knee(levels, slo_p95_ms=2000, max_error_rate=0.012) == 2
    assert sweep.find_knee(levels, slo_p95_ms=2000, max_error_rate=0.0) == 1
    assert sweep.find_knee(levels, slo_p95_ms=1000, max_error_rate=0.1) == 1
    assert sweep.find_knee(levels, slo_p95_ms=100, max_error_rate=0.1) is None


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
    cmp = sweep.compare(ours, theirs, slo=2000, err=0.01)
    assert cmp.knee_ratio == pytest.approx(4.0)  # 20 req/s vs the monolith's 5 (its knee)
    assert cmp.p95_ratios == {20: pytest.approx(2.0), 50: pytest.approx(3000 / 900)}
    plots = sweep.plot(tmp_path, {"ragline": ours, "monolith": theirs})
    assert {p.name for p in plots} == {"throughput.png", "latency.png", "stages-ragline.png"}
    for p in plots:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = sweep.markdown(
        {"ragline": ours, "monolith": theirs}, {"argv": "--levels 20,50"}, 2000, 0.01, cmp, plots
    )
    assert "| 50 | 20.00 | 540 | 900 | 1,080 | 0.0% | 0.0% |" in report
    assert "**Knee:** 50 users, 20.00 req/s" in report
    assert "ragline / monolith: **4.00x**" in report
    assert "![throughput](throughput.png)" in report
    assert "Scale generate next" in report
    again = sweep.Level.from_dict(json.loads(json.dumps(ours[1].to_dict())))
    assert again.summary == ours[1].summary and again.attribution == ours[1].attribution


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
    body = '{"query": "{question}", "max_tokens": 8}'
    args = p.parse_args(["--questions", str(q), "-H", "X-Tenant: a", "--body", body])
    plan = httpload.plan_from_args(args, 5)
    assert plan.headers == {"X-Tenant": "a"} and plan.body["max_tokens"] == 8
    assert plan.questions == ["hello?"] and plan.concurrency == 5


def test_sweep_cli_exits_2_with_a_message_for_bad_levels(capsys) -> None:
    assert sweep.main(["--levels", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err
