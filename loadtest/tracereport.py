"""``ragline trace report``: attribute /chat latency to stages from recorded spans.

Reads spans from JSON-lines files (``RAGLINE_TRACE_FILE``) or from an OTLP receiver it runs for a
window (OTLP/gRPC, which the services export, and optionally OTLP/HTTP), finds each ``/chat``
request's trace (the edge's HTTP server span), and splits its end-to-end time into, per stage:
queue wait (the stage's ``*.queue_wait`` spans), compute (server span minus queue wait) and
network/serialisation (the edge's gRPC client span minus the stage's server span); what remains
is the edge's own time. Prints P50/P95/P99 and each part's share of the mean end-to-end latency,
and names the dominant stage. The load-test report uses ``attribute()``.
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


# --- OTLP receiver (gRPC, what the services' exporter speaks; and HTTP) ---------------------

_KINDS = {1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


def _any_value(v):
    kind = v.WhichOneof("value")
    return (
        getattr(v, kind)
        if kind in ("string_value", "bool_value", "int_value", "double_value")
        else None
    )


def from_export_request(request) -> list[SpanRecord]:
    """The spans of an OTLP ``ExportTraceServiceRequest``."""
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


def from_otlp(body: bytes) -> list[SpanRecord]:
    """The spans of a serialised ``ExportTraceServiceRequest`` (an OTLP/HTTP protobuf body)."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    return from_export_request(ExportTraceServiceRequest.FromString(body))


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


class OtlpReceiver:
    """Collects spans sent over OTLP/gRPC (``TraceService/Export``, the services' exporter: point
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` at it) and, if given an HTTP address, OTLP/HTTP protobuf
    (``POST /v1/traces``). Port 0 picks a free port; ``grpc_port``/``http_port`` say which."""

    def __init__(self, grpc_address: str | None, http_address: str | None = None) -> None:
        self.spans: list[SpanRecord] = []
        self._lock = threading.Lock()
        self._grpc_server = self._http_server = None
        self.grpc_port = self.http_port = None
        if grpc_address:
            self._start_grpc(*_address(grpc_address))
        if http_address:
            self._start_http(*_address(http_address))

    def _add(self, spans: list[SpanRecord]) -> None:
        with self._lock:
            self.spans.extend(spans)

    def _start_grpc(self, host: str, port: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        receiver = self

        class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):  # noqa: N802 - the proto's naming
                receiver._add(from_export_request(request))
                return trace_service_pb2.ExportTraceServiceResponse()

        server = grpc.server(ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(), server)
        self.grpc_port = server.add_insecure_port(f"{host}:{port}")
        if not self.grpc_port:
            raise OSError(f"could not listen on {host}:{port} for OTLP/gRPC")
        server.start()
        self._grpc_server = server

    def _start_http(self, host: str, port: int) -> None:
        receiver = self

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
                receiver._add(received)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args):
                pass

        self._http_server = ThreadingHTTPServer((host, port), Handler)
        self.http_port = self._http_server.server_port
        threading.Thread(target=self._http_server.serve_forever, daemon=True).start()

    def stop(self) -> list[SpanRecord]:
        """Stop listening (an export under way finishes first); the spans received."""
        if self._grpc_server is not None:
            self._grpc_server.stop(grace=2).wait()
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
        with self._lock:
            return list(self.spans)


def receive_otlp(grpc_address: str | None, http_address: str | None, seconds: float) -> list:
    """Receive OTLP spans for ``seconds`` on the gRPC and/or HTTP address; the spans."""
    receiver = OtlpReceiver(grpc_address, http_address)
    if receiver.grpc_port:
        host = _address(grpc_address)[0]
        print(f"OTLP/gRPC receiver on {host}:{receiver.grpc_port} for {seconds:.0f}s",
              file=sys.stderr)  # fmt: skip
    if receiver.http_port:
        host = _address(http_address)[0]
        print(f"OTLP/HTTP receiver on http://{host}:{receiver.http_port}/v1/traces for "
              f"{seconds:.0f}s", file=sys.stderr)  # fmt: skip
    try:
        time.sleep(seconds)
    finally:
        spans = receiver.stop()
    return spans


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ragline trace", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="per-stage latency attribution")
    rep.add_argument("files", nargs="*", type=Path, help="JSON-lines span files")
    rep.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="receive OTLP/gRPC here instead (what the services export: point "
        "OTEL_EXPORTER_OTLP_ENDPOINT=http://HOST:PORT at it; 4317 is OTLP's port)",
    )
    rep.add_argument(
        "--listen-http", metavar="HOST:PORT", help="also (or only) OTLP/HTTP protobuf, /v1/traces"
    )
    rep.add_argument("--seconds", type=float, default=60.0, help="receiver window")
    rep.add_argument("--json", action="store_true", help="machine-readable output")
    ns = p.parse_args(argv)
    if ns.listen or ns.listen_http:
        spans = receive_otlp(ns.listen, ns.listen_http, ns.seconds)
    elif ns.files:
        missing = [str(f) for f in ns.files if not f.exists()]
        if missing:
            p.error(f"no such file: {', '.join(missing)}")
        spans = read_files(ns.files)
    else:
        p.error("give span files (RAGLINE_TRACE_FILE output) or --listen HOST:PORT (OTLP/gRPC)")
    report = attribute(spans)
    print(json.dumps(report.to_dict(), indent=2) if ns.json else format_report(report))
    return 0 if report.requests else 1
