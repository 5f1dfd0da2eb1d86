"""OpenTelemetry setup shared by every service.

``setup_tracing(service_name)`` installs a tracer provider with the service's resource
attributes. Standard ``OTEL_*`` variables are honoured by the SDK (sampler, resource
attributes); ``OTEL_EXPORTER_OTLP_ENDPOINT`` adds an OTLP exporter when the optional
``otlp`` extra is installed, and ``RAGLINE_TRACE_FILE`` writes finished spans as JSON lines.
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
        provider.add_span_processor(BatchSpanProcessor(JsonLinesSpanExporter(Path(trace_file))))
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
