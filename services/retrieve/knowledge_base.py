"""KnowledgeBase: the store and one index per collection, kept in agreement."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ragline.errors import FailedPrecondition, InvalidArgument
from services.retrieve.index import VectorIndex
from services.retrieve.store import (
    CollectionInfo,
    DocumentIn,
    PassageIn,
    PassageStore,
    StoredPassage,
    WriteResult,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    passage: StoredPassage
    score: float


class KnowledgeBase:
    """Store plus indexes. A read-only replica shares the writer's database and follows it:
    ``refresh()`` rebuilds the index of every collection whose last write changed."""

    def __init__(self, store: PassageStore, max_top_k: int = 100, read_only: bool = False) -> None:
        self.store = store
        self.max_top_k = max_top_k
        self.read_only = read_only
        self._indexes: dict[str, VectorIndex] = {}
        self._versions: dict[str, tuple[int, int]] = {}
        # Writes are serialised so the index follows the store's commit order.
        self._write_lock = threading.Lock()
        self.refresh()

    def refresh(self) -> list[str]:
        """Load collections that are new or changed since the last look; drop deleted ones."""
        infos = {i.name: i for i in self.store.list_collections()}
        changed = []
        for name in list(self._indexes):
            if name not in infos:
                self._indexes.pop(name, None)
                self._versions.pop(name, None)
                changed.append(name)
        for name, info in infos.items():
            version = (info.last_write_ms, self.store.collection(name).count)
            if self._versions.get(name) != version:
                index = self._rebuild(info)
                with self._write_lock:
                    self._indexes[name] = index
                    self._versions[name] = version
                changed.append(name)
        return changed

    def _check_writable(self) -> None:
        if self.read_only:
            raise FailedPrecondition(
                "this retrieve replica is read-only: send writes to the writer "
                "(RAGLINE_API_RETRIEVE_WRITE_ADDRESS)"
            )

    def _rebuild(self, info: CollectionInfo) -> VectorIndex:
        index = VectorIndex(info.dimension)
        ids, vecs = self.store.load_vectors(info.name, info.dimension)
        index.add(ids, vecs)
        log.info("collection %s: %d vectors loaded", info.name, len(index))
        return index

    def create_collection(self, name: str, dimension: int, exist_ok: bool) -> CollectionInfo:
        self._check_writable()
        with self._write_lock:
            info = self.store.create_collection(name, dimension, exist_ok)
            self._indexes.setdefault(name, VectorIndex(dimension))
        return info

    def delete_collection(self, name: str) -> bool:
        self._check_writable()
        with self._write_lock:
            deleted = self.store.delete_collection(name)
            self._indexes.pop(name, None)
        return deleted

    def upsert(
        self, collection: str, passages: Sequence[PassageIn], documents: Sequence[DocumentIn]
    ) -> WriteResult:
        self._check_writable()
        with self._write_lock:
            result = self.store.upsert(collection, passages, documents)
            index = self._indexes[collection]
            index.remove(result.removed_rowids)
            if result.added_rowids:
                index.add(np.array(result.added_rowids), np.stack(result.added_vectors))
        return result

    def delete(
        self, collection: str, ids: Sequence[str], document_ids: Sequence[str]
    ) -> WriteResult:
        with self._write_lock:
            result = self.store.delete(collection, ids, document_ids)
            self._indexes[collection].remove(result.removed_rowids)
        return result

    def search(self, collection: str, vector: np.ndarray, top_k: int) -> list[Hit]:
        if not 1 <= top_k <= self.max_top_k:
            raise InvalidArgument(f"top_k must be between 1 and {self.max_top_k}, got {top_k}")
        info = self.store.collection(collection)
        if vector.shape != (1, info.dimension):
            raise InvalidArgument(
                f"query vector has dimension {vector.shape[-1] * vector.shape[0]}; collection "
                f"{collection!r} expects {info.dimension}"
            )
        index = self._indexes.get(collection)
        if index is None:  # created by the writer since this replica last looked
            self.refresh()
            index = self._indexes[collection]
        ranked = index.search(vector[0], top_k)
        passages = self.store.get_passages([rowid for rowid, _ in ranked])
        return [Hit(passages[rowid], score) for rowid, score in ranked if rowid in passages]

    def indexed(self, collection: str) -> int:
        index = self._indexes.get(collection)
        return len(index) if index is not None else 0

    def index_type(self, collection: str) -> str:
        index = self._indexes.get(collection)
        return index.index_type if index is not None else ""
