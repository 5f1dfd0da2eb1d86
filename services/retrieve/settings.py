from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from ragline.config import GrpcServiceSettings, default_data_dir


def _default_dir() -> Path:
    return default_data_dir() / "retrieve"


class RetrieveSettings(GrpcServiceSettings):
    """Retrieve stage: persistent FAISS index plus its passages in SQLite or PostgreSQL."""

    model_config = SettingsConfigDict(env_prefix="RAGLINE_RETRIEVE_", extra="forbid", frozen=True)

    port: int = Field(50052, ge=0, le=65535, description="port to bind (0 picks a free one)")
    data_dir: Path = Field(default_factory=_default_dir, description="where the index lives")
    store: Literal["sqlite", "postgres"] = Field(
        "sqlite",
        description="where passages live: sqlite (a file in data_dir, one writer) or postgres "
        "(RAGLINE_RETRIEVE_POSTGRES_DSN: every replica writes and follows its change log)",
    )
    postgres_dsn: str = Field(
        "",
        description="libpq connection string of the postgres store, e.g. "
        "postgresql://ragline@db:5432/ragline (a password: PGPASSWORD or ~/.pgpass)",
    )
    shards: int = Field(
        1,
        ge=1,
        le=1024,
        description="postgres store: collections are split over this many "
        "shards by passage id hash; this replica indexes one (--shard)",
    )
    shard: int = Field(0, ge=0, description="the shard this replica indexes (0 .. shards-1)")
    postgres_start_wait_s: float = Field(
        60, ge=0, description="how long a starting replica waits for the postgres store"
    )
    max_top_k: int = Field(100, ge=1, le=10_000, description="largest top_k a search may ask")
    max_passages_per_upsert: int = Field(1024, ge=1, description="most passages in one Upsert")
    workers: int = Field(2, ge=1, description="threads for searches and writes")
    read_only: bool = Field(
        False, description="serve searches from the writer's database; refuse writes"
    )
    refresh_s: float = Field(
        1.0,
        gt=0,
        description="how often a follower (a read-only replica, or any replica of a postgres "
        "store, which NOTIFY also wakes) picks up changes written elsewhere",
    )
    # The names in services.retrieve.index.KINDS (a unit test keeps them equal), spelled out so
    # that reading the settings (flags, README table) does not import FAISS.
    index_kind: Literal["auto", "flat", "hnsw", "ivf"] = Field(
        "auto", description="index of new collections (auto: flat, then HNSW past the threshold)"
    )
    index_threshold: int = Field(
        20_000, ge=1, description="vectors at which an auto collection switches to HNSW"
    )
    hnsw_m: int = Field(32, ge=4, le=128, description="HNSW neighbours per node")
    ef_construction: int = Field(64, ge=8, le=1024, description="HNSW construction beam width")
    ivf_nlist: int = Field(0, ge=0, le=65536, description="IVF lists (0: about 4 x sqrt(n))")
    ef_search: int = Field(64, ge=1, description="HNSW search beam width when a request sends 0")
    max_ef_search: int = Field(1024, ge=1, description="largest ef_search a request may ask")
    nprobe: int = Field(16, ge=1, description="IVF lists probed when a request sends 0")
    max_nprobe: int = Field(1024, ge=1, description="largest nprobe a request may ask")
    rebuild_fraction: float = Field(
        0.2, gt=0, description="rebuild HNSW/IVF in the background once this share changed"
    )
    rebuild_min_changes: int = Field(
        1000, ge=1, description="... and at least this many vectors changed"
    )
    filter_exact_limit: int = Field(
        2000, ge=0, description="filters matching at most this many passages are scored exactly"
    )
    build_threads: int = Field(1, ge=1, description="threads for background index builds")
    snapshots: bool = Field(
        True, description="save built HNSW/IVF indexes beside the database (fast restarts)"
    )
    change_log_size: int = Field(
        2_000_000, ge=1000, description="change-log entries kept per collection for followers"
    )
    # The names in services.retrieve.hybrid.MODES (a unit test keeps them equal).
    default_search_mode: Literal["dense", "sparse", "hybrid"] = Field(
        "hybrid",
        description="search mode when neither the request nor its collection names one "
        "(hybrid: BM25 and dense, fused by reciprocal rank)",
    )

    @model_validator(mode="after")
    def _postgres_dsn(self) -> RetrieveSettings:
        if self.store == "postgres" and not self.postgres_dsn.strip():
            raise ValueError(
                "store is postgres but postgres_dsn is empty: set RAGLINE_RETRIEVE_POSTGRES_DSN "
                "(e.g. postgresql://ragline@127.0.0.1:5432/ragline)"
            )
        if self.shard >= self.shards:
            raise ValueError(f"shard {self.shard} is not below shards ({self.shards})")
        if self.shards > 1 and self.store != "postgres":
            raise ValueError(
                "shards need the postgres store (RAGLINE_RETRIEVE_STORE=postgres): every shard "
                "replica reads the one database"
            )
        return self
