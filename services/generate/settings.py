from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from ragline.config import GrpcServiceSettings
from ragline.models import DEFAULT_GENERATE_MODEL


class GenerateSettings(GrpcServiceSettings):
    """Generate stage: the LLM (llama.cpp on CPU, exllamav2 on a pinned GPU)."""

    model_config = SettingsConfigDict(env_prefix="RAGLINE_GENERATE_", extra="forbid", frozen=True)

    port: int = Field(50053, ge=0, le=65535, description="port to bind (0 picks a free one)")
    backend: Literal["llamacpp", "exllamav2"] = Field("llamacpp", description="LLM runtime")
    model: str = Field(
        DEFAULT_GENERATE_MODEL,
        description="builtin name (`ragline models list`), .gguf file (llamacpp) or model dir "
        "(exllamav2)",
    )
    context_length: int = Field(2048, ge=128, description="context window in tokens")
    threads: int = Field(0, ge=0, description="CPU threads for llama.cpp (0: all cores)")

    def cpu_threads(self) -> int:
        """llama.cpp threads: the setting, or every core this process may use."""
        return self.threads or len(os.sched_getaffinity(0)) or 1

    def kv_cells(self) -> int:
        """KV cache cells: the setting, or one full context per slot."""
        return self.cache_tokens or self.batch_slots() * self.context_length

    def batch_slots(self) -> int:
        """Continuous-batching slots: the setting, or sized from the machine (see the field)."""
        if self.max_batch_size:
            return self.max_batch_size
        return 16 if self.backend == "exllamav2" else min(16, 4 * self.cpu_threads())

    max_queue: int = Field(16, ge=1, description="requests waiting; beyond it RESOURCE_EXHAUSTED")
    max_queue_wait_s: float = Field(
        5.0,
        ge=0,
        description="a request that would wait longer for a slot (measured completion rate) "
        "is refused at once with RESOURCE_EXHAUSTED, so a first token comes within about this "
        "or a 429 does (0: only the deadline bounds the wait)",
    )
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request sends 0")
    max_tokens_limit: int = Field(1024, ge=1, description="largest max_tokens accepted")
    gpu: int | None = Field(
        None, ge=0, description="pin to this GPU (sets CUDA_VISIBLE_DEVICES before CUDA starts)"
    )
    cache_tokens: int = Field(
        0,
        ge=0,
        description="KV cache size in tokens (0: context_length per slot); llama.cpp gives "
        "each of the slots an equal share (which caps its context)",
    )
    max_batch_size: int = Field(
        0,
        ge=0,
        description="sequences decoded together (continuous batching slots); 0: 4 per CPU "
        "thread up to 16 for llama.cpp (measured on 2 cores: 8 slots kept requests out of the "
        "queue up to 8 users and doubled goodput within a 5 s TTFT SLO over 4), 16 for "
        "exllamav2",
    )
    batch_tokens: int = Field(
        64,
        ge=16,
        description="llama.cpp: most tokens (decode + prompt chunks) per model step; small "
        "steps keep decoding sequences moving while long prompts prefill, and the prefix "
        "cache reuses whole chunks of this size",
    )
    prefix_cache_mb: int = Field(
        1024,
        ge=0,
        description="llama.cpp: host RAM for the KV state of earlier prompts, shared by all "
        "requests; a prompt reuses its longest cached prefix and prefills only the rest (0: off)",
    )

    @model_validator(mode="after")
    def _exllamav2_pages(self) -> GenerateSettings:
        """exllamav2 allocates its cache in 256-token pages: any other length fails at start."""
        if self.backend == "exllamav2":
            cells = max(self.kv_cells(), self.context_length)
            if cells % 256:
                raise ValueError(
                    f"exllamav2's cache length must be a multiple of 256; {cells} tokens is not "
                    f"(set RAGLINE_GENERATE_CACHE_TOKENS to {-(-cells // 256) * 256}, or a "
                    "context_length that is a multiple of 256)"
                )
        return self
