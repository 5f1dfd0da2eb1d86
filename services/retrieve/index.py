"""VectorIndex: exact inner-product search over normalised vectors, keyed by SQLite rowid."""

from __future__ import annotations

import threading

import faiss
import numpy as np

from ragline.vectors import normalize


class VectorIndex:
    index_type = "flat"

    def __init__(self, dimension: int) -> None:
        self.dimension = dimension
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(dimension))
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._index.ntotal

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids) == 0:
            return
        vecs = np.ascontiguousarray(normalize(vectors.reshape(-1, self.dimension)), np.float32)
        with self._lock:
            self._index.add_with_ids(vecs, np.asarray(ids, dtype=np.int64))

    def remove(self, ids: list[int]) -> None:
        if ids:
            with self._lock:
                self._index.remove_ids(np.asarray(ids, dtype=np.int64))

    def search(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        query = np.ascontiguousarray(normalize(vector.reshape(1, self.dimension)), np.float32)
        with self._lock:
            k = min(k, self._index.ntotal)
            if k == 0:
                return []
            scores, ids = self._index.search(query, k)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]
