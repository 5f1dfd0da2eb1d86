from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from ragline.config import GrpcServiceSettings, default_data_dir
from ragline.models import DEFAULT_EMBED_MODEL


class EmbedSettings(GrpcServiceSettings):
    """Embed stage: a BERT-family sentence-embedding model in ONNX Runtime."""

    model_config = SettingsConfigDict(env_prefix="RAGLINE_EMBED_", extra="forbid", frozen=True)

    port: int = Field(50051, ge=0, le=65535, description="port to bind (0 picks a free one)")
    model: str = Field(
        DEFAULT_EMBED_MODEL,
        description="model directory (model.onnx, tokenizer.json, ragline.json) or builtin name",
    )
    data_dir: Path = Field(
        default_factory=default_data_dir, description="where the builtin model is assembled"
    )
    providers: str = Field(
        "CPUExecutionProvider", description="comma-separated ONNX Runtime execution providers"
    )
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads (0: auto)")
    inter_op_threads: int = Field(
        0, ge=0, description="ONNX Runtime inter-op threads (0: auto; graphs run sequentially)"
    )
    spinning: bool = Field(
        False, description="let ONNX Runtime threads spin between runs (faster on idle cores)"
    )
    max_client_batch_size: int = Field(32, ge=1, description="most texts in one request")
    batching: bool = Field(True, description="coalesce concurrent requests into shared runs")
    max_batch_size: int = Field(32, ge=1, description="most texts in one ONNX Runtime run")
    max_batch_tokens: int = Field(
        16384, ge=1, description="padded tokens (texts x longest) per run, like TEI's"
    )
    max_wait_us: int = Field(
        0, ge=0, description="hold an under-full batch this long for more requests (Triton)"
    )

    max_text_chars: int = Field(100_000, ge=1, description="longest single text accepted")
    max_concurrent_requests: int = Field(
        512, ge=1, description="requests in flight or waiting; beyond it RESOURCE_EXHAUSTED"
    )
