"""OpenTelemetry setup shared by every service.

``setup_tracing(service_name)`` installs a tracer provider with the service's resource
attributes. Standard ``OTEL_*`` variables are honoured by the SDK (``OTEL_SDK_DISABLED``,
``OTEL_TRACES_SAMPLER``/``OTEL_TRACES_SAMPLER_ARG`` for the sampling ratio, resource
attributes); ``OTEL_EXPORTER_OTLP_ENDPOINT`` adds an OTLP exporter when the optional ``otlp``
extra is installed, and ``RAGLINE_TRACE_FILE`` writes finished spans as JSON lines (``{service}``
in the path is replaced by the service name, so each process can have its own file).

W3C trace context crosses every hop through the OpenTelemetry gRPC interceptors
(``grpc_server_interceptors``/``grpc_client_interceptors``) and the FastAPI instrumentation.
Health checks are not traced.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

import ragline

log = logging.getLogger(__name__)
_provider: TracerProvider | None = None


class JsonLinesSpanExporter(SpanExporter):
    """Appends one compact JSON object per finished span to a file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._file = self.path.open("a", encoding="utf-8")

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [json.dumps(json.loads(span.to_json()), separators=(",", ":")) for span in spans]
        with self._lock:
            self._file.write("\n".join(lines) + "\n")
            self._file.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            self._file.close()


def setup_tracing(service_name: str) -> TracerProvider:
    """Install (once per process) the tracer provider for ``service_name``."""
    global _provider
    if _provider is not None:
        return _provider
    resource = Resource.create(
        {
            "service.name": os.environ.get("OTEL_SERVICE_NAME", service_name),
            "service.namespace": "ragline",
            "service.version": ragline.__version__,
            "service.instance.id": os.environ.get("RAGLINE_INSTANCE_ID", uuid.uuid4().hex[:12]),
        }
    )
    provider = TracerProvider(resource=resource)
    trace_file = os.environ.get("RAGLINE_TRACE_FILE")
    if trace_file:
        path = Path(trace_file.replace("{service}", service_name))
        provider.add_span_processor(BatchSpanProcessor(JsonLinesSpanExporter(path)))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    ):
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.warning(
                "OTEL_EXPORTER_OTLP_ENDPOINT is set but the OTLP exporter is not installed: "
                "pip install 'ragline[otlp]'"
            )
        else:
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    atexit.register(provider.shutdown)
    _provider = provider
    return provider


def _not_health():
    from opentelemetry.instrumentation.grpc import filters

    return filters.negate(filters.service_name("grpc.health.v1.Health"))


def grpc_server_interceptors() -> list:
    """Server span per RPC, parented on the caller's W3C trace context (health excluded)."""
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(filter_=_not_health())]


def grpc_client_interceptors() -> list:
    """Client span per RPC, injecting W3C trace context into the call's metadata."""
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors(filter_=_not_health()))


def current_trace_id() -> str:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""
