"""`ragline trace report --listen` receives what the services really export: OTLP/gRPC from
ragline's own tracing setup (the SDK's OTLP gRPC span exporter), and OTLP/HTTP protobuf."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx

from loadtest.tracereport import OtlpReceiver, attribute
from tests.conftest import REPO_ROOT, free_port

# A process traced exactly as every service is (ragline.telemetry.setup_tracing with
# OTEL_EXPORTER_OTLP_ENDPOINT): one /chat with a generate call; exiting flushes the exporter.
EMIT = """
import time
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from ragline.telemetry import setup_tracing

setup_tracing("ragline-api")
tracer = trace.get_tracer("test")
with tracer.start_as_current_span("POST /chat", kind=SpanKind.SERVER,
                                  attributes={"http.route": "/chat"}):
    with tracer.start_as_current_span("/ragline.v1.Generate/Generate", kind=SpanKind.CLIENT,
                                      attributes={"rpc.service": "ragline.v1.Generate"}):
        time.sleep(0.05)
"""


def emit_spans(base_env: dict[str, str], endpoint: str) -> None:
    import opentelemetry.exporter.otlp.proto.grpc  # noqa: F401 - the services' exporter (otlp extra)

    env = {**base_env, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"}
    done = subprocess.run([sys.executable, "-c", EMIT], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Failed to export" not in done.stderr, done.stderr


def test_the_report_receives_the_services_otlp_grpc_export(base_env) -> None:
    port = free_port()
    report = subprocess.Popen(
        [sys.executable, "-m", "cli", "trace", "report", "--json",
         "--listen", f"127.0.0.1:{port}", "--seconds", "8"],
        cwd=REPO_ROOT, env=base_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        banner = report.stderr.readline()
        assert f"OTLP/gRPC receiver on 127.0.0.1:{port}" in banner, banner
        emit_spans(base_env, f"http://127.0.0.1:{port}")
        out, err = report.communicate(timeout=30)
    finally:
        report.kill()
    assert report.returncode == 0, err
    result = json.loads(out)
    rows = {r["label"]: r for r in result["rows"]}
    assert result["requests"] == 1 and result["dominant"] == "generate", out
    assert 50 <= rows["generate total"]["p50"] <= rows["end-to-end"]["p50"], out


def test_one_receiver_takes_otlp_grpc_and_http_at_once(base_env) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
    from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

    receiver = OtlpReceiver("127.0.0.1:0", "127.0.0.1:0")
    try:
        emit_spans(base_env, f"http://127.0.0.1:{receiver.grpc_port}")
        request = ExportTraceServiceRequest(
            resource_spans=[
                ResourceSpans(
                    resource={"attributes": [KeyValue(key="service.name",
                                                      value=AnyValue(string_value="other"))]},
                    scope_spans=[ScopeSpans(spans=[Span(
                        trace_id=b"\x01" * 16, span_id=b"\x02" * 8, name="POST /chat",
                        kind=Span.SPAN_KIND_SERVER, start_time_unix_nano=1_000_000,
                        end_time_unix_nano=51_000_000,
                        attributes=[KeyValue(key="http.route",
                                             value=AnyValue(string_value="/chat"))],
                    )])],
                )
            ]
        )  # fmt: skip
        url = f"http://127.0.0.1:{receiver.http_port}"
        r = httpx.post(f"{url}/v1/traces", content=request.SerializeToString(),
                       headers={"Content-Type": "application/x-protobuf"})  # fmt: skip
        assert r.status_code == 200
        assert httpx.post(f"{url}/v1/logs", content=b"").status_code == 404
        assert httpx.post(f"{url}/v1/traces", content=b"\xff\xff").status_code == 400
    finally:
        spans = receiver.stop()
    assert {s.service for s in spans} == {"ragline-api", "other"}
    report = attribute(spans)
    assert report.requests == 2 and 50.0 in report.rows[0].values
    http_span = next(s for s in spans if s.service == "other")
    assert http_span.trace_id == "01" * 16 and http_span.kind == "SERVER"
