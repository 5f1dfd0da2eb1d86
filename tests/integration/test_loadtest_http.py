"""`loadtest http` and `loadtest sweep` against a real pipeline (four processes, traced)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.conftest import REPO_ROOT, Pipeline, free_port

pytestmark = pytest.mark.slow

DOCS = {
    "leave.md": "# Leave\n\nYou get 27 days of annual leave. Book leave in Timewise.",
    "expenses.md": "# Expenses\n\nSubmit expense claims in Spendwise within 30 days.",
}
QUESTIONS = "question\nHow much annual leave do I get?\nWhere do I submit expense claims?\n"


@pytest.fixture(scope="module")
def pipeline(base_env, tmp_path_factory) -> Iterator[tuple[Pipeline, object]]:
    tmp = tmp_path_factory.mktemp("loadtest")
    env = {
        **base_env,
        "RAGLINE_DATA_DIR": str(tmp / "data"),
        "RAGLINE_TRACE_FILE": str(tmp / "spans-{service}.jsonl"),
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    p = Pipeline(env, tmp, "--max-tokens", "8")
    try:
        p.ingest(DOCS)
        (tmp / "questions.csv").write_text(QUESTIONS)
        yield p, tmp
    finally:
        p.stop()


def loadtest(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loadtest", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_http_plan_runs_every_request_through_the_stages(pipeline, tmp_path) -> None:
    p, tmp = pipeline
    out = loadtest(
        "http", "--url", p.url, "-c", "2", "-n", "6", "-z", "60",
        "--questions", str(tmp / "questions.csv"),
        "--json", str(tmp_path / "run.json"), "--jtl", str(tmp_path / "run.jtl"),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "request throughput" in out.stdout and "e2e P50 / P95 / P99" in out.stdout
    assert "goodput" in out.stdout and "TTFT <= 5,000 ms" in out.stdout
    assert "[" in out.stderr, "progress lines go to stderr"
    data = json.loads((tmp_path / "run.json").read_text())
    samples = data["samples"]
    assert len(samples) == 6 and data["summary"]["ok"] == 6
    assert data["summary"]["questions_sent"] == 6 and data["summary"]["questions_repeated"] == 4
    assert all(s["completion_tokens"] > 0 and s["prompt_tokens"] > 0 for s in samples)
    # Three questions asked twice each: no-cache made every one run the stages.
    assert not any(s["cached"] for s in samples)
    assert all(s["timings_ms"]["generate"] > 0 for s in samples)
    assert all(re.fullmatch(r"[0-9a-f]{32}", s["trace_id"]) for s in samples)
    assert {s["user"] for s in samples} == {0, 1}
    jtl = (tmp_path / "run.jtl").read_text().splitlines()
    assert jtl[0].startswith("timeStamp,elapsed,label,responseCode") and len(jtl) == 7
    assert all(",200,OK," in row and ",true," in row for row in jtl[1:])


def test_http_plan_times_the_first_token_when_streaming(pipeline, tmp_path) -> None:
    p, tmp = pipeline
    body = '{"query": "{question}", "answerer": "generate", "max_tokens": 8}'
    out = loadtest(
        "http", "--url", p.url, "-c", "1", "-n", "2", "--stream", "-q", "--body", body,
        "--questions", str(tmp / "questions.csv"), "--json", str(tmp_path / "s.json"),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "s.json").read_text())
    samples = data["samples"]
    assert all(s["outcome"] == "ok" for s in samples)
    assert all(0 < s["ttft_ms"] <= s["latency_ms"] for s in samples)
    for s in samples:
        # The edge's done event carries the usage: 8 tokens at most, and one event per piece.
        assert 1 <= s["completion_tokens"] <= 8 and s["prompt_tokens"] > 0
        assert s["cached_prompt_tokens"] >= 0
        assert s["ttft_ms"] + sum(s["itl_ms"]) <= s["latency_ms"]
        if s["completion_tokens"] > 1:
            assert s["itl_ms"] and s["tpot_ms"] > 0
    summary = data["summary"]
    assert summary["ttft"]["n"] == 2 and summary["e2e"]["n"] == 2
    assert summary["output_throughput"] > 0
    assert "TTFT P50 / P95 / P99" in out.stdout and "ITL" in out.stdout


def test_http_plan_against_nothing_counts_errors_and_fails_clearly(tmp_path) -> None:
    (tmp_path / "q.csv").write_text(QUESTIONS)
    out = loadtest(
        "http", "--url", f"http://127.0.0.1:{free_port()}", "-c", "2", "-n", "4", "-q",
        "--questions", str(tmp_path / "q.csv"), "-t", "5",
    )  # fmt: skip
    assert out.returncode == 1
    assert "every request failed" in out.stderr and "Traceback" not in out.stderr
    assert re.search(r"errors\s+4 \(100.0%", out.stdout)


def test_sweep_tiny_run_writes_the_table_plots_and_trace_attribution(pipeline, tmp_path) -> None:
    p, tmp = pipeline
    report_dir = tmp_path / "report"
    out = loadtest(
        "sweep", "--url", p.url, "--levels", "1,2", "-z", "3", "--cooldown", "0.5",
        "--questions", str(tmp / "questions.csv"), "--slo-ttft-ms", "60000",
        "--slo-e2e-ms", "60000",
        "--traces", str(tmp / "spans-*.jsonl"), "--trace-flush-s", "1",
        "--out", str(report_dir),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = (report_dir / "report.md").read_text()
    assert "| users | sent | repeats | 429 | admitted | ok | errors (of admitted)" in report
    assert "| users | TTFT mean | TTFT P50 / P95 / P99 | TPOT mean" in report
    assert "SLO: TTFT <= 60,000 ms and e2e <= 60,000 ms" in report
    assert '"answerer": "generate"' in report and "streamed (SSE)" in report
    # a level's row: users (the knee marked), then sent, repeats, 429, admitted, ok
    assert re.search(r"^\| (\*\*)?1( \(knee\)\*\*)? \| \d+ \| \d+ \| 0 \|", report, re.M)
    assert re.search(r"^\| (\*\*)?2( \(knee\)\*\*)? \| \d+ \| \d+ \| 0 \|", report, re.M)
    assert "(knee)**" in report and "**Knee:** " in report
    assert "**Bottleneck:** generate" in report
    assert "from traces" in report and "generate compute (ms)" in report
    for name in ("throughput.png", "latency.png", "stages-ragline.png"):
        assert (report_dir / name).read_bytes()[:4] == b"\x89PNG"
        assert f"]({name})" in report
    data = json.loads((report_dir / "sweep.json").read_text())
    levels = data["runs"]["ragline"]
    assert [lv["concurrency"] for lv in levels] == [1, 2]
    assert all(lv["source"] == "traces" and lv["summary"]["ok"] > 0 for lv in levels)
    assert all(lv["attribution"]["generate compute"] > 0 for lv in levels)
    # streamed by default: TTFT measured, tokens counted from the done events' usage
    assert all(lv["summary"]["ttft"]["n"] > 0 for lv in levels)
    assert all(lv["summary"]["completion_tokens"] > 0 for lv in levels)
    assert data["knees"]["ragline"] in (1, 2)
    # two questions in the file: the cursor went on across the levels and counted the repeats
    q = data["questions"]["ragline"]
    assert q["distinct_in_file"] == 2 and q["repeats"] == q["sent"] - 2
    assert q["sent"] == sum(lv["summary"]["questions_sent"] for lv in levels)
    assert f"{q['sent']:,} sent over the sweep from 2 distinct" in report
    assert "2 users:" in out.stderr and "goodput" in out.stderr, "progress per level"
