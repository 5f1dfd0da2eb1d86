from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from ragline.chunking import ChunkingPolicy


class ApiSettings(BaseSettings):
    """HTTP edge of ragline: /chat, /documents, /healthz."""

    model_config = SettingsConfigDict(env_prefix="RAGLINE_API_", extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8080, ge=0, le=65535, description="HTTP port")
    embed_address: str = Field(
        "127.0.0.1:50051", description="embed host:port, ip:port list, or dns:///name:port"
    )
    retrieve_address: str = Field(
        "127.0.0.1:50052",
        description="retrieve replicas that search (same forms); ';' between shards' addresses "
        "searches every shard and merges (replicas started with --shards/--shard)",
    )
    retrieve_write_address: str | None = Field(
        None, description="retrieve writer for ingestion (default: retrieve_address)"
    )
    generate_address: str = Field(
        "127.0.0.1:50053", description="generate host:port, ip:port list, or dns:///name:port"
    )
    collection: str = Field(
        "default", description="knowledge-base collection a request searches unless it names one"
    )
    default_top_k: int = Field(4, ge=1, le=100, description="passages retrieved per question")
    max_top_k: int = Field(20, ge=1, le=100, description="largest top_k a request may ask for")
    max_query_chars: int = Field(4000, ge=1, description="longest question accepted")
    max_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="largest request body accepted (413 beyond)"
    )
    max_tokens: int = Field(256, ge=1, description="answer length limit in tokens")
    temperature: float = Field(0.0, ge=0, le=2, description="sampling temperature (0 = greedy)")
    context_tokens: int = Field(
        800, ge=50, description="token budget of the sources in a prompt (whole passages only)"
    )
    max_history_messages: int = Field(
        10, ge=0, description="earlier chat messages a prompt keeps at most (oldest dropped first)"
    )
    history_tokens: int = Field(
        400,
        ge=0,
        description="token budget of the chat history in a prompt (whole messages, oldest "
        "dropped first; the answer says history_truncated)",
    )
    prompt_strategy: Literal["stuff", "score"] = Field(
        "stuff", description="stuff: all passages within budget; score: near the best only"
    )
    passage_order: Literal["document", "score"] = Field(
        "document",
        description="order of the passages in a prompt: document (by source, then position: "
        "questions on one topic share a prompt prefix generate's prefix cache reuses) or score",
    )
    answerer: Literal["generate", "extractive", "auto"] = Field(
        "extractive",
        description="generate: the LLM; extractive: the closest sentences, quoted, no LLM; "
        "auto: the LLM, replaced by extractive when its answer is not grounded",
    )
    score_threshold: float = Field(
        0.35, ge=0, le=1, description="passages below this cosine similarity are not used"
    )
    bm25_threshold: float = Field(
        0.0,
        ge=0,
        description="a passage below score_threshold is still used when BM25 scores "
        "it at least this (0: cosine alone decides)",
    )
    condense: Literal["history", "off"] = Field(
        "history",
        description="follow-ups: a question sent with history is also searched together with "
        "the user turns before it, and the search whose best passage scores higher is used, "
        "unless the question alone scores condense_own_score (off: the question alone)",
    )
    condense_own_score: float = Field(
        0.5,
        ge=0,
        le=1,
        description="a follow-up whose own best passage scores at least this (cosine) is not "
        "condensed: it changed the subject",
    )
    search_mode: Literal["", "dense", "sparse", "hybrid"] = Field(
        "", description="retrieval mode ('': the collection's default, see retrieve's)"
    )
    min_sentence_score: float = Field(
        0.0, ge=0, le=1, description="extractive: below this best-sentence cosine, not found"
    )
    timeout_s: float = Field(60.0, gt=0, description="time budget of one /chat request")
    embed_timeout_s: float = Field(5.0, gt=0, description="embed's share of the budget, at most")
    retrieve_timeout_s: float = Field(5.0, gt=0, description="retrieve's share, at most")
    max_inflight: int = Field(64, ge=1, description="chat requests in flight before queueing")
    max_waiting: int = Field(64, ge=0, description="chat requests waiting for a slot")
    queue_wait_s: float = Field(0.5, ge=0, description="longest wait for a slot before 429")
    adaptive_admission: bool = Field(
        False,
        description="lower the in-flight cap when a stage refuses for capacity (AIMD), so the "
        "edge refuses first",
    )
    cache_ttl_s: float = Field(3600.0, ge=0, description="answer cache TTL (0 turns it off)")
    cache_max_entries: int = Field(10_000, ge=1, description="in-process cache size")
    redis_url: str | None = Field(None, description="share the answer cache in Redis")
    semantic_cache_threshold: float | None = Field(
        None, gt=0, le=1, description="also serve answers to questions this similar (cosine)"
    )
    semantic_cache_max_entries: int = Field(
        1000, ge=1, description="questions the semantic cache remembers (per edge process)"
    )
    kb_poll_s: float = Field(
        1.0, gt=0, description="how often the knowledge base version is checked (cache)"
    )
    max_fails: int = Field(3, ge=1, description="failures in a row that eject a replica")
    fail_timeout_s: float = Field(30.0, gt=0, description="how long an ejected replica rests")
    health_interval_s: float = Field(2.0, gt=0, description="active health check period")
    api_keys: str | None = Field(
        None, description="comma-separated keys; when set, requests need Bearer auth"
    )
    api_keys_file: Path | None = Field(
        None, description="file with one API key per line (# comments); adds to api_keys"
    )
    tls_cert: Path | None = Field(None, description="serve HTTPS with this certificate (PEM)")
    tls_key: Path | None = Field(None, description="private key of --tls-cert (PEM)")
    grpc_tls_ca: Path | None = Field(
        None, description="CA that verifies the stages: TLS to them (env RAGLINE_GRPC_TLS_CA too)"
    )
    grpc_tls_cert: Path | None = Field(
        None, description="the edge's client certificate for mutual TLS to the stages"
    )
    grpc_tls_key: Path | None = Field(None, description="private key of --grpc-tls-cert")
    grpc_tls_server_name: str | None = Field(
        None, description="name checked in the stages' certificates (default: the host)"
    )
    model_name: str = Field("ragline", description="model name reported by /v1 endpoints")
    chunk_words: int = Field(
        ChunkingPolicy.max_words, ge=8, description="ingestion chunk size in words"
    )
    chunk_overlap_words: int = Field(
        ChunkingPolicy.overlap_words, ge=0, description="ingestion chunk overlap in words"
    )
    chunk_tokens: int = Field(
        240, ge=0, description="ingestion chunk size cap in embedding-model tokens (0: off)"
    )
    log_level: str = Field("INFO", description="logging level")
