"""VectorIndex: exact inner-product search over normalised vectors, keyed by SQLite rowid."""

from __future__ import annotations

import threading

import faiss
import numpy as np

from ragline.errors import InvalidArgument
from ragline.vectors import normalize


class VectorIndex:
    """``IndexIDMap2(IndexFlatIP)``: inner product of L2-normalised vectors is their cosine.

    FAISS may not be searched while it is being modified, so one lock covers every call; a flat
    search of one query is single-threaded in FAISS and short, so readers barely contend.
    """

    index_type = "flat"

    def __init__(self, dimension: int) -> None:
        self.dimension = dimension
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(dimension))
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._index.ntotal

    def _rows(self, vectors: np.ndarray, what: str) -> np.ndarray:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim not in (1, 2) or vectors.shape[-1] != self.dimension:
            raise InvalidArgument(
                f"{what} has shape {vectors.shape}; this index holds vectors of dimension "
                f"{self.dimension}"
            )
        return np.ascontiguousarray(normalize(vectors.reshape(-1, self.dimension)), np.float32)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add ``vectors`` under ``ids`` (SQLite rowids, never reused)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) == 0:
            return
        rows = self._rows(vectors, "vectors")
        if len(rows) != len(ids):
            raise ValueError(f"{len(ids)} ids for {len(rows)} vectors")
        with self._lock:
            self._index.add_with_ids(rows, ids)

    def remove_ids(self, ids: list[int] | np.ndarray) -> int:
        """Remove the vectors of ``ids`` (absent ones are ignored); returns how many went."""
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) == 0:
            return 0
        with self._lock:
            return int(self._index.remove_ids(ids))

    def search(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        """The ``k`` nearest ids with their cosine, best first (fewer when the index is small)."""
        query = self._rows(vector, "query vector")
        if len(query) != 1:
            raise InvalidArgument(f"one query vector expected, got {len(query)}")
        with self._lock:
            k = min(k, self._index.ntotal)
            if k <= 0:
                return []
            scores, ids = self._index.search(query, k)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]
