"""KnowledgeBase: the store and one index per collection, kept in agreement."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ragline.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
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
    """Store plus indexes: SQLite commits first, then the index follows, under one write lock.

    A read-only replica shares the writer's database and follows it: ``refresh()`` rebuilds the
    index of every collection whose version changed. ``load=False`` defers the first load to an
    explicit ``refresh()`` (the server does it in warmup, while health says NOT_SERVING).
    """

    def __init__(
        self,
        store: PassageStore,
        max_top_k: int = 100,
        read_only: bool = False,
        load: bool = True,
    ) -> None:
        self.store = store
        self.max_top_k = max_top_k
        self.read_only = read_only
        self.loaded = False
        self._indexes: dict[str, VectorIndex] = {}
        self._versions: dict[str, int] = {}
        # Writes and refreshes are serialised so the index follows the store's commit order;
        # searches only read the (atomically replaced) dict entries and the index's own lock.
        self._write_lock = threading.Lock()
        if load:
            self.refresh()

    # --- following the store ------------------------------------------------------------------
    def refresh(self) -> list[str]:
        """Load collections that are new or changed since the last look; drop deleted ones."""
        with self._write_lock:
            infos = {i.name: i for i in self.store.list_collections()}
            changed = []
            for name in list(self._indexes):
                if name not in infos:
                    self._indexes.pop(name, None)
                    self._versions.pop(name, None)
                    changed.append(name)
            for name, info in infos.items():
                if name in self._indexes and self._versions.get(name) == info.version:
                    continue
                try:
                    self._load(name)
                except NotFound:  # deleted since it was listed
                    continue
                changed.append(name)
            self.loaded = True
        return changed

    def _load(self, name: str) -> VectorIndex:
        info, ids, vecs = self.store.snapshot(name)
        index = VectorIndex(info.dimension)
        index.add(ids, vecs)
        self._indexes[name] = index
        self._versions[name] = info.version
        log.info("collection %s: %d vectors loaded (version %d)", name, len(index), info.version)
        return index

    def _check_writable(self) -> None:
        if self.read_only:
            raise FailedPrecondition(
                "this retrieve replica is read-only: send writes to the writer "
                "(RAGLINE_API_RETRIEVE_WRITE_ADDRESS)"
            )

    # --- writes -------------------------------------------------------------------------------
    def create_collection(self, name: str, dimension: int, exist_ok: bool) -> CollectionInfo:
        self._check_writable()
        with self._write_lock:
            info = self.store.create_collection(name, dimension, exist_ok)
            if name not in self._indexes:
                self._indexes[name] = VectorIndex(info.dimension)
                self._versions[name] = info.version
        return info

    def delete_collection(self, name: str) -> bool:
        self._check_writable()
        with self._write_lock:
            deleted = self.store.delete_collection(name)
            self._indexes.pop(name, None)
            self._versions.pop(name, None)
        return deleted

    def upsert(
        self, collection: str, passages: Sequence[PassageIn], documents: Sequence[DocumentIn]
    ) -> WriteResult:
        self._check_writable()
        with self._write_lock:
            result = self.store.upsert(collection, passages, documents)
            self._follow(collection, result)
        return result

    def delete(
        self, collection: str, ids: Sequence[str], document_ids: Sequence[str]
    ) -> WriteResult:
        self._check_writable()
        with self._write_lock:
            result = self.store.delete(collection, ids, document_ids)
            self._follow(collection, result)
        return result

    def _follow(self, collection: str, result: WriteResult) -> None:
        """Apply a committed write to the index (caller holds the write lock)."""
        index = self._indexes.get(collection)
        if index is None:  # not loaded yet: the snapshot already includes this write
            self._load(collection)
            return
        index.remove_ids(result.removed_rowids)
        if result.added_rowids:
            index.add(np.asarray(result.added_rowids), np.stack(result.added_vectors))
        self._versions[collection] = result.version

    # --- reads --------------------------------------------------------------------------------
    def dimension(self, collection: str) -> int:
        """The collection's dimension; ``NotFound`` (naming the existing ones) if it has none."""
        return self.store.collection(collection).dimension

    def search(self, collection: str, vector: np.ndarray, top_k: int) -> list[Hit]:
        """The ``top_k`` passages nearest ``vector`` by cosine, best first."""
        if not 1 <= top_k <= self.max_top_k:
            raise InvalidArgument(f"top_k must be between 1 and {self.max_top_k}, got {top_k}")
        info = self.store.collection(collection)
        vector = np.asarray(vector, dtype=np.float32)
        if vector.size != info.dimension or vector.ndim > 2:
            raise InvalidArgument(
                f"query vector has dimension {vector.size}; collection {collection!r} "
                f"expects {info.dimension}"
            )
        index = self._index_for(info)
        ranked = index.search(vector.reshape(1, -1), top_k)
        # A passage deleted between the index lookup and this read is left out.
        passages = self.store.get_passages([rowid for rowid, _ in ranked])
        return [Hit(passages[rowid], score) for rowid, score in ranked if rowid in passages]

    def _index_for(self, info: CollectionInfo) -> VectorIndex:
        index = self._indexes.get(info.name)
        if index is None or index.dimension != info.dimension:
            # Created (or recreated) by the writer since this replica last looked.
            self.refresh()
            index = self._indexes.get(info.name)
        if index is None or index.dimension != info.dimension:
            raise Unavailable(f"collection {info.name!r} changed while loading it; retry")
        return index

    def indexed(self, collection: str) -> int:
        """Vectors in the index this process searches (lags the store on a read-only replica)."""
        index = self._indexes.get(collection)
        return len(index) if index is not None else 0

    def index_type(self, collection: str) -> str:
        index = self._indexes.get(collection)
        return index.index_type if index is not None else VectorIndex.index_type

    def describe(self) -> str:
        return ", ".join(f"{n} ({len(i)})" for n, i in sorted(self._indexes.items())) or "none"
