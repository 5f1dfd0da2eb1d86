from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ApiSettings(BaseSettings):
    """HTTP edge of ragline: /chat, /documents, /healthz."""

    model_config = SettingsConfigDict(env_prefix="RAGLINE_API_", extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8080, ge=0, le=65535, description="HTTP port")
    embed_address: str = Field(
        "127.0.0.1:50051", description="embed host:port, ip:port list, or dns:///name:port"
    )
    retrieve_address: str = Field(
        "127.0.0.1:50052", description="retrieve replicas that search (same forms)"
    )
    retrieve_write_address: str | None = Field(
        None, description="retrieve writer for ingestion (default: retrieve_address)"
    )
    generate_address: str = Field(
        "127.0.0.1:50053", description="generate host:port, ip:port list, or dns:///name:port"
    )
    collection: str = Field("default", description="knowledge-base collection to search")
    default_top_k: int = Field(4, ge=1, le=100, description="passages retrieved per question")
    max_top_k: int = Field(20, ge=1, le=100, description="largest top_k a request may ask for")
    max_query_chars: int = Field(4000, ge=1, description="longest question accepted")
    max_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="largest request body accepted (413 beyond)"
    )
    max_tokens: int = Field(256, ge=1, description="answer length limit in tokens")
    temperature: float = Field(0.0, ge=0, le=2, description="sampling temperature (0 = greedy)")
    context_chars: int = Field(
        3000, ge=200, description="passage characters put in the prompt (whole passages only)"
    )
    timeout_s: float = Field(60.0, gt=0, description="time budget of one /chat request")
    chunk_words: int = Field(160, ge=8, description="ingestion chunk size in words")
    chunk_overlap_words: int = Field(30, ge=0, description="ingestion chunk overlap in words")
    log_level: str = Field("INFO", description="logging level")
