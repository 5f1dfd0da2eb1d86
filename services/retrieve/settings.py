from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from ragline.config import GrpcServiceSettings, default_data_dir


def _default_dir() -> Path:
    return default_data_dir() / "retrieve"


class RetrieveSettings(GrpcServiceSettings):
    """Retrieve stage: persistent FAISS index plus its passages in SQLite."""

    model_config = SettingsConfigDict(env_prefix="RAGLINE_RETRIEVE_", extra="forbid", frozen=True)

    port: int = Field(50052, ge=0, le=65535, description="port to bind (0 picks a free one)")
    data_dir: Path = Field(default_factory=_default_dir, description="where the index lives")
    max_top_k: int = Field(100, ge=1, le=10_000, description="largest top_k a search may ask")
    max_passages_per_upsert: int = Field(1024, ge=1, description="most passages in one Upsert")
    workers: int = Field(2, ge=1, description="threads for searches and writes")
    read_only: bool = Field(
        False, description="serve searches from the writer's database; refuse writes"
    )
    refresh_s: float = Field(
        1.0, gt=0, description="how often a read-only replica picks up the writer's changes"
    )
