"""``ragline trace report``: attribute /chat latency to stages from recorded spans.

Reads spans from JSON-lines files (``RAGLINE_TRACE_FILE``) or from an OTLP/HTTP receiver it runs
for a window, finds each ``/chat`` request's trace (the edge's HTTP server span), and splits its
end-to-end time into, per stage: queue wait (the stage's ``*.queue_wait`` spans), compute (server
span minus queue wait) and network/serialisation (the edge's gRPC client span minus the stage's
server span); what remains is the edge's own time. Prints P50/P95/P99 and each part's share of
the mean end-to-end latency, and names the dominant stage. The load-test report uses
``attribute()``.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

STAGES = {
    "ragline.v1.Embed": "embed",
    "ragline.v1.Retrieve": "retrieve",
    "ragline.v1.Generate": "generate",
}


@dataclass(frozen=True)
class SpanRecord:
    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    kind: str  # "SERVER" | "CLIENT" | "INTERNAL" | ...
    start_ns: int
    end_ns: int
    attributes: dict = field(default_factory=dict)
    service: str = ""

    @property
    def ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


def _iso_ns(value: str) -> int:
    dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return int(dt.timestamp()) * 1_000_000_000 + dt.microsecond * 1000


def _hex(value: str | None) -> str | None:
    return value[2:] if value and value.startswith("0x") else value


def from_json_line(line: str) -> SpanRecord:
    raw = json.loads(line)
    return SpanRecord(
        trace_id=_hex(raw["context"]["trace_id"]),
        span_id=_hex(raw["context"]["span_id"]),
        parent_id=_hex(raw.get("parent_id")),
        name=raw["name"],
        kind=raw.get("kind", "").removeprefix("SpanKind."),
        start_ns=_iso_ns(raw["start_time"]),
        end_ns=_iso_ns(raw["end_time"]),
        attributes=raw.get("attributes") or {},
        service=(raw.get("resource") or {}).get("attributes", {}).get("service.name", ""),
    )


def read_files(paths: Iterable[Path]) -> list[SpanRecord]:
    spans = []
    for path in paths:
        with path.open(encoding="utf-8") as fh:
            spans.extend(from_json_line(line) for line in fh if line.strip())
    return spans


@dataclass
class Row:
    label: str
    values: list[float]  # ms per request
    share: float  # of mean end-to-end


@dataclass
class Report:
    requests: int
    rows: list[Row]
    dominant: str
    stage_means: dict[str, float]

    def to_dict(self) -> dict:
        return {
            "requests": self.requests,
            "dominant": self.dominant,
            "rows": [
                {
                    "label": r.label,
                    "p50": pct(r.values, 50),
                    "p95": pct(r.values, 95),
                    "p99": pct(r.values, 99),
                    "mean": _mean(r.values),
                    "share": r.share,
                }
                for r in self.rows
            ],
        }


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def is_chat_root(span: SpanRecord) -> bool:
    route = span.attributes.get("http.route") or span.attributes.get("http.target")
    return span.kind == "SERVER" and route == "/chat"


def attribute(spans: Iterable[SpanRecord]) -> Report:
    by_trace: dict[str, list[SpanRecord]] = defaultdict(list)
    for span in spans:
        by_trace[span.trace_id].append(span)
    parts: dict[str, list[float]] = defaultdict(list)
    e2e: list[float] = []
    for trace_spans in by_trace.values():
        roots = [s for s in trace_spans if is_chat_root(s)]
        if not roots:
            continue
        root = roots[0]
        children: dict[str | None, list[SpanRecord]] = defaultdict(list)
        for s in trace_spans:
            children[s.parent_id].append(s)
        per: dict[str, dict[str, float]] = {
            name: {"client": 0.0, "server": 0.0, "queue": 0.0} for name in STAGES.values()
        }
        for client in trace_spans:
            stage = STAGES.get(str(client.attributes.get("rpc.service", "")))
            if client.kind != "CLIENT" or stage is None:
                continue
            per[stage]["client"] += client.ms
            for server in children[client.span_id]:
                if server.kind != "SERVER":
                    continue
                per[stage]["server"] += server.ms
                per[stage]["queue"] += sum(
                    q.ms for q in children[server.span_id] if q.name.endswith("queue_wait")
                )
        e2e.append(root.ms)
        for stage, t in per.items():
            parts[f"{stage} total"].append(t["client"])
            parts[f"{stage} queue"].append(t["queue"])
            parts[f"{stage} compute"].append(t["server"] - t["queue"])
            parts[f"{stage} network"].append(t["client"] - t["server"])
        parts["edge (api)"].append(root.ms - sum(t["client"] for t in per.values()))
    mean_e2e = _mean(e2e) or 1.0
    rows = [Row("end-to-end", e2e, 1.0 if e2e else 0.0)]
    for stage in STAGES.values():
        for part in ("total", "queue", "compute", "network"):
            values = parts[f"{stage} {part}"]
            rows.append(Row(f"{stage} {part}", values, _mean(values) / mean_e2e))
    rows.append(Row("edge (api)", parts["edge (api)"], _mean(parts["edge (api)"]) / mean_e2e))
    stage_means = {s: _mean(parts[f"{s} total"]) for s in STAGES.values()}
    stage_means["edge"] = _mean(parts["edge (api)"])
    dominant = max(stage_means, key=stage_means.get) if e2e else ""
    return Report(len(e2e), rows, dominant, stage_means)


def format_report(report: Report) -> str:
    if not report.requests:
        return "no /chat traces found (is tracing on? RAGLINE_TRACE_FILE or OTLP)"
    lines = [
        f"{report.requests} /chat requests",
        f"{'part':<18}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'share':>8}",
    ]
    for row in report.rows:
        indent = "  " if row.label.split()[-1] in ("queue", "compute", "network") else ""
        lines.append(
            f"{indent + row.label:<18}{pct(row.values, 50):>10.1f}{pct(row.values, 95):>10.1f}"
            f"{pct(row.values, 99):>10.1f}{row.share:>8.1%}"
        )
    share = report.stage_means[report.dominant] / (_mean(report.rows[0].values) or 1)
    lines.append(f"dominant stage: {report.dominant} ({share:.0%} of mean end-to-end latency)")
    return "\n".join(lines)


# --- OTLP/HTTP receiver --------------------------------------------------------------------

_KINDS = {1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


def _any_value(v):
    kind = v.WhichOneof("value")
    return (
        getattr(v, kind)
        if kind in ("string_value", "bool_value", "int_value", "double_value")
        else None
    )


def from_otlp(body: bytes) -> list[SpanRecord]:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    request = ExportTraceServiceRequest.FromString(body)
    out = []
    for rs in request.resource_spans:
        resource = {kv.key: _any_value(kv.value) for kv in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(
                    SpanRecord(
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_id=s.parent_span_id.hex() or None,
                        name=s.name,
                        kind=_KINDS.get(s.kind, "UNSPECIFIED"),
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        attributes={kv.key: _any_value(kv.value) for kv in s.attributes},
                        service=str(resource.get("service.name", "")),
                    )
                )
    return out


def receive_otlp(host: str, port: int, seconds: float) -> list[SpanRecord]:
    """Run an OTLP/HTTP (protobuf) receiver on ``host:port`` for ``seconds``."""
    spans: list[SpanRecord] = []
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path.rstrip("/") != "/v1/traces":
                self.send_response(404)
                self.end_headers()
                return
            try:
                received = from_otlp(body)
            except Exception:
                self.send_response(400)
                self.end_headers()
                return
            with lock:
                spans.extend(received)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    print(
        f"OTLP/HTTP receiver on http://{host}:{server.server_port}/v1/traces for {seconds:.0f}s",
        file=sys.stderr,
    )
    time.sleep(seconds)
    server.shutdown()
    return spans


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ragline trace", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="per-stage latency attribution")
    rep.add_argument("files", nargs="*", type=Path, help="JSON-lines span files")
    rep.add_argument("--listen", metavar="HOST:PORT", help="receive OTLP/HTTP here instead")
    rep.add_argument("--seconds", type=float, default=60.0, help="receiver window")
    rep.add_argument("--json", action="store_true", help="machine-readable output")
    ns = p.parse_args(argv)
    if ns.listen:
        host, _, port = ns.listen.rpartition(":")
        spans = receive_otlp(host or "127.0.0.1", int(port), ns.seconds)
    elif ns.files:
        missing = [str(f) for f in ns.files if not f.exists()]
        if missing:
            p.error(f"no such file: {', '.join(missing)}")
        spans = read_files(ns.files)
    else:
        p.error("give span files (RAGLINE_TRACE_FILE output) or --listen HOST:PORT")
    report = attribute(spans)
    print(json.dumps(report.to_dict(), indent=2) if ns.json else format_report(report))
    return 0 if report.requests else 1
