"""`ragline trace report` on a recorded span file, against figures computed by hand."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from loadtest.tracereport import attribute, format_report, main, pct, read_files

BASE = datetime(2026, 11, 24, 12, 0, 0, tzinfo=UTC).timestamp()


def span(trace, sid, parent, name, kind, start_ms, dur_ms, service, **attrs) -> dict:
    def iso(ms: float) -> str:
        return datetime.fromtimestamp(BASE + ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    return {
        "name": name,
        "context": {"trace_id": f"0x{trace:032x}", "span_id": f"0x{sid:016x}"},
        "kind": f"SpanKind.{kind}",
        "parent_id": f"0x{parent:016x}" if parent else None,
        "start_time": iso(start_ms),
        "end_time": iso(start_ms + dur_ms),
        "attributes": attrs,
        "resource": {"attributes": {"service.name": service}},
    }


def chat_trace(t: int, e2e: float, stages: dict[str, tuple[float, float, float]]) -> list[dict]:
    """stages: name -> (client ms, server ms, queue ms)."""
    rpc = {"embed": "Embed", "retrieve": "Retrieve", "generate": "Generate"}
    out = [
        span(t, 1, None, "POST /chat", "SERVER", 0, e2e, "ragline-api", **{"http.route": "/chat"})
    ]
    at = 1.0
    for i, (name, (client, server, queue)) in enumerate(stages.items()):
        cid, sid = 10 + i * 3, 11 + i * 3
        out.append(
            span(
                t,
                cid,
                1,
                f"/ragline.v1.{rpc[name]}/X",
                "CLIENT",
                at,
                client,
                "ragline-api",
                **{"rpc.service": f"ragline.v1.{rpc[name]}"},
            )
        )
        out.append(
            span(
                t,
                sid,
                cid,
                f"/ragline.v1.{rpc[name]}/X",
                "SERVER",
                at + 0.5,
                server,
                f"ragline-{name}",
                **{"rpc.service": f"ragline.v1.{rpc[name]}"},
            )
        )
        if queue:
            out.append(
                span(
                    t,
                    12 + i * 3,
                    sid,
                    f"{name}.queue_wait",
                    "INTERNAL",
                    at + 0.6,
                    queue,
                    f"ragline-{name}",
                )
            )
        at += client
    return out


@pytest.fixture
def recorded(tmp_path) -> Path:
    traces = [
        chat_trace(1, 100, {"embed": (10, 8, 3), "retrieve": (5, 4, 0), "generate": (80, 78, 20)}),
        chat_trace(
            2, 300, {"embed": (20, 18, 13), "retrieve": (7, 5, 0), "generate": (260, 250, 90)}
        ),
    ]
    noise = [
        span(
            9,
            1,
            None,
            "POST /documents",
            "SERVER",
            0,
            50,
            "ragline-api",
            **{"http.route": "/documents"},
        )
    ]
    path = tmp_path / "spans.jsonl"
    path.write_text("\n".join(json.dumps(s) for t in [*traces, noise] for s in t) + "\n")
    return path


def test_parts_shares_and_dominant_stage(recorded) -> None:
    report = attribute(read_files([recorded]))
    rows = {r.label: r for r in report.rows}
    assert report.requests == 2
    assert rows["end-to-end"].values == [100, 300]
    assert rows["embed queue"].values == pytest.approx([3, 13])
    assert rows["embed compute"].values == pytest.approx([5, 5])
    assert rows["embed network"].values == pytest.approx([2, 2])
    assert rows["generate compute"].values == pytest.approx([58, 160])
    assert rows["generate network"].values == pytest.approx([2, 10])
    assert rows["edge (api)"].values == pytest.approx([5, 13])
    assert rows["generate total"].share == pytest.approx(170 / 200)
    assert report.dominant == "generate"
    text = format_report(report)
    assert "dominant stage: generate (85% of mean end-to-end latency)" in text


def test_percentiles_are_nearest_rank() -> None:
    values = list(range(1, 101))
    assert (pct(values, 50), pct(values, 95), pct(values, 99)) == (50, 95, 99)
    assert pct([7.0], 99) == 7.0 and pct([], 50) == 0.0


def test_cli_prints_and_fails_without_traces(recorded, tmp_path, capsys) -> None:
    assert main(["report", str(recorded)]) == 0
    assert "2 /chat requests" in capsys.readouterr().out
    assert main(["report", "--json", str(recorded)]) == 0
    assert json.loads(capsys.readouterr().out)["dominant"] == "generate"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["report", str(empty)]) == 1
