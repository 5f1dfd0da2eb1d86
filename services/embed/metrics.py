"""Prometheus metrics of the embed stage (names follow TEI's where they overlap)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

QUEUE_SECONDS = Histogram(
    "ragline_embed_queue_seconds",
    "Time a text waited in the batcher queue before its batch started",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
INFERENCE_SECONDS = Histogram(
    "ragline_embed_inference_seconds",
    "Duration of one ONNX Runtime run (one batch)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
BATCH_SIZE = Histogram(
    "ragline_embed_batch_size",
    "Texts per ONNX Runtime run",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
TOKENS = Counter("ragline_embed_tokens", "Tokens run through the model", ["kind"])
QUEUE_SIZE = Gauge("ragline_embed_queue_size", "Texts waiting in the batcher queue")
REJECTED = Counter("ragline_embed_rejected", "Requests refused because the queue was full")
EXPIRED = Counter("ragline_embed_expired", "Texts dropped because their deadline passed")


def observe_batch(*, batch_size: int, real: int, padded: int, seconds: float) -> None:
    BATCH_SIZE.observe(batch_size)
    TOKENS.labels("real").inc(real)
    TOKENS.labels("padded").inc(padded)
    INFERENCE_SECONDS.observe(seconds)
