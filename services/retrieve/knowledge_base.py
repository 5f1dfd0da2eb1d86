"""KnowledgeBase: the store and one index per collection, kept in agreement."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from ragline.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from ragline.vectors import normalize
from services.retrieve import snapshots
from services.retrieve.index import (
    FLAT,
    IndexKind,
    IndexPolicy,
    SearchParams,
    VectorIndex,
    index_kind,
)
from services.retrieve.store import (
    CollectionInfo,
    Condition,
    DocumentIn,
    PassageIn,
    PassageStore,
    StoredPassage,
    WriteResult,
    check_collection_name,
    check_filter,
    matches,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    passage: StoredPassage
    score: float


@dataclass(frozen=True)
class SearchResult:
    hits: list[Hit]
    index_type: str
    strategy: str  # "index" or "exact"
    version: int  # the collection version the searched index reflects


@dataclass(frozen=True)
class IndexConfig:
    """Server-wide index settings (RetrieveSettings); a collection's policy overrides
    ``policy`` field by field."""

    policy: IndexPolicy = field(default_factory=IndexPolicy)
    ef_search: int = 64
    max_ef_search: int = 1024
    nprobe: int = 16
    max_nprobe: int = 1024
    rebuild_fraction: float = 0.2  # rebuild HNSW/IVF once this share of it changed
    min_rebuild: int = 1000  # ... and at least this many vectors did
    filter_exact_limit: int = 2000  # filters matching fewer passages are scored exactly
    build_threads: int = 1
    snapshot_dir: Path | None = None
    background: bool = True  # False: builds run in the calling thread (tests)


# A background job: build a collection's index of this kind, or (None) adopt the writer's snapshot.
Job = tuple[str, IndexKind | None]


class KnowledgeBase:
    """Store plus indexes: SQLite commits first, then the index follows, under one write lock.

    Builds of HNSW/IVF indexes run in a background thread from a consistent SQLite snapshot;
    the finished index catches up from the change log under the write lock and replaces the old
    one, which searches keep using meanwhile. A read-only replica shares the writer's database:
    ``refresh()`` applies the change log since its index's version (a full reload only when the
    log no longer reaches back), and adopts the writer's snapshots instead of building its own.
    """

    def __init__(
        self,
        store: PassageStore,
        max_top_k: int = 100,
        read_only: bool = False,
        load: bool = True,
        config: IndexConfig | None = None,
    ) -> None:
        self.store = store
        self.max_top_k = max_top_k
        self.read_only = read_only
        self.config = config or IndexConfig()
        self.loaded = False
        self._indexes: dict[str, VectorIndex] = {}
        self._building: set[str] = set()
        self._seen_snapshots: dict[str, tuple[int, int]] = {}
        self._closing = False
        self._threads: list[threading.Thread] = []
        # Writes, refreshes and swaps are serialised so the index follows the store's commit
        # order; searches only read the (atomically replaced) dict entries.
        self._write_lock = threading.Lock()
        if not read_only and self.config.snapshot_dir is not None:
            snapshots.remove_partial(self.config.snapshot_dir)  # left by a killed writer
        if load:
            self.refresh()

    # --- following the store ------------------------------------------------------------------
    def refresh(self) -> list[str]:
        """Catch up with every collection that changed since the last look; drop deleted ones."""
        jobs: list[Job] = []
        with self._write_lock:
            infos = {i.name: i for i in self.store.list_collections()}
            changed = []
            for name in list(self._indexes):
                if name not in infos:
                    self._indexes.pop(name, None)
                    changed.append(name)
            for name, info in infos.items():
                index = self._indexes.get(name)
                try:
                    if index is None or index.dimension != info.dimension:
                        self._load(name)
                        changed.append(name)
                    elif index.version != info.version:
                        if not self._catch_up(name, index):
                            self._load(name)
                        changed.append(name)
                    jobs += self._plan(name)
                except NotFound:  # deleted since it was listed
                    continue
            self.loaded = True
        self._start(jobs)
        return changed

    def _load(self, name: str) -> VectorIndex:
        """From the snapshot when one covers the change log, else from SQLite as flat."""
        index = self._from_snapshot(name)
        if index is None or not self._catch_up(name, index):
            info, ids, vecs = self.store.snapshot(name)
            index = VectorIndex.build(info.dimension, FLAT, ids, vecs, IndexPolicy(),
                                      info.version)  # fmt: skip
        self._indexes[name] = index
        log.info("collection %s: %d vectors (%s, version %d)", name, len(index), index.kind.name,
                 index.version)  # fmt: skip
        return index

    def _from_snapshot(self, name: str) -> VectorIndex | None:
        if self.config.snapshot_dir is None:
            return None
        path = snapshots.path_for(self.config.snapshot_dir, name)
        if not path.exists():
            return None
        info = self.store.collection(name)
        try:
            header, main = snapshots.read(path)
        except (OSError, snapshots.SnapshotError) as exc:
            log.warning("ignoring snapshot %s: %s", path, exc)
            return None
        if header.collection != name or header.dimension != info.dimension:
            log.warning("ignoring snapshot %s: it is for another collection", path)
            return None
        kind = index_kind(header.kind)  # snapshots.read checked it names a kind that serves
        self._seen_snapshots[name] = _stamp(path)
        return VectorIndex(info.dimension, kind, main, header.built_version)

    def _catch_up(self, name: str, index: VectorIndex) -> bool:
        """Apply the change log since ``index.version``; False when it no longer reaches back."""
        changes = self.store.changes_since(name, index.version)
        if changes is None:
            return False
        if len(changes.touched):
            index.apply(changes.touched, changes.ids, changes.vectors)
        index.version = changes.info.version
        return True

    # --- background builds --------------------------------------------------------------------
    def policy(self, info: CollectionInfo) -> IndexPolicy:
        return IndexPolicy.from_dict(info.policy, self.config.policy)

    def _plan(self, name: str) -> list[Job]:
        """Builds this collection needs now (caller holds the write lock)."""
        index = self._indexes.get(name)
        if index is None or name in self._building:
            return []
        if self.read_only:
            return [(name, None)] if self._new_snapshot(name, index) else []
        target = self.policy(self.store.collection(name)).target(len(index), index.kind)
        stale = not index.kind.mutable and index.staleness() > self.config.rebuild_fraction
        if target != index.kind or (stale and index.changed >= self.config.min_rebuild):
            return [(name, target)]
        return []

    def _new_snapshot(self, name: str, index: VectorIndex) -> bool:
        if self.config.snapshot_dir is None:
            return False
        path = snapshots.path_for(self.config.snapshot_dir, name)
        try:
            stamp = _stamp(path)
        except OSError:
            return False
        return stamp != self._seen_snapshots.get(name)

    def _start(self, jobs: list[Job]) -> None:
        for name, kind in jobs:
            with self._write_lock:
                if name in self._building or self._closing:
                    continue
                self._building.add(name)
            if self.config.background:
                t = threading.Thread(target=self._build, args=(name, kind), daemon=True,
                                     name=f"retrieve-build-{name}")  # fmt: skip
                self._threads = [x for x in self._threads if x.is_alive()] + [t]
                t.start()
            else:
                self._build(name, kind)

    def _build(self, name: str, kind: IndexKind | None) -> None:
        """Build (or, on a replica, load the writer's snapshot), catch up, swap."""
        try:
            faiss.omp_set_num_threads(self.config.build_threads)
            if kind is None:
                new = self._from_snapshot(name)
            else:
                info, ids, vecs = self.store.snapshot(name)
                new = VectorIndex.build(info.dimension, kind, ids, vecs, self.policy(info),
                                        info.version)  # fmt: skip
                del ids, vecs
                if kind.snapshot and self.config.snapshot_dir is not None:
                    header = snapshots.SnapshotHeader(name, info.dimension, kind.name,
                                                      info.version, new.main_size)  # fmt: skip
                    snapshots.write(self.config.snapshot_dir, header, new.parts()[0])
                    self._seen_snapshots[name] = _stamp(
                        snapshots.path_for(self.config.snapshot_dir, name)
                    )
            if new is None:
                return
            with self._write_lock:
                old = self._indexes.get(name)
                if self._closing or old is None or old.dimension != new.dimension:
                    return
                if not self._catch_up(name, new):
                    log.warning("collection %s: change log moved past the build; retrying", name)
                    return
                self._indexes[name] = new
            log.info("collection %s: now served by %s (%d vectors, version %d)", name,
                     new.kind.name, len(new), new.version)  # fmt: skip
        except Exception:
            log.exception("building the index of collection %s failed", name)
        finally:
            with self._write_lock:
                self._building.discard(name)

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Wait for background builds (tests, benchmarks, shutdown)."""
        for t in list(self._threads):
            t.join(timeout)

    def close(self) -> None:
        with self._write_lock:
            self._closing = True

    def _check_writable(self) -> None:
        if self.read_only:
            raise FailedPrecondition(
                "this retrieve replica is read-only: send writes to the writer "
                "(RAGLINE_API_RETRIEVE_WRITE_ADDRESS)"
            )

    # --- writes -------------------------------------------------------------------------------
    def create_collection(
        self, name: str, dimension: int, exist_ok: bool, policy: dict | None = None
    ) -> CollectionInfo:
        self._check_writable()
        policy = {k: v for k, v in (policy or {}).items() if v not in (None, 0, "")}
        IndexPolicy.from_dict(policy, self.config.policy)  # refuses nonsense before writing
        with self._write_lock:
            info = self.store.create_collection(name, dimension, exist_ok, policy)
            if name not in self._indexes:
                self._indexes[name] = VectorIndex(info.dimension, version=info.version)
            jobs = self._plan(name)
        self._start(jobs)
        return info

    def delete_collection(self, name: str) -> bool:
        self._check_writable()
        check_collection_name(name)  # it names a snapshot file: never an arbitrary path
        with self._write_lock:
            deleted = self.store.delete_collection(name)
            self._indexes.pop(name, None)
            if self.config.snapshot_dir is not None:
                snapshots.remove(self.config.snapshot_dir, name)
        return deleted

    def upsert(
        self, collection: str, passages: Sequence[PassageIn], documents: Sequence[DocumentIn]
    ) -> WriteResult:
        self._check_writable()
        with self._write_lock:
            result = self.store.upsert(collection, passages, documents)
            jobs = self._follow(collection, result)
        self._start(jobs)
        return result

    def delete(
        self, collection: str, ids: Sequence[str], document_ids: Sequence[str]
    ) -> WriteResult:
        self._check_writable()
        with self._write_lock:
            result = self.store.delete(collection, ids, document_ids)
            jobs = self._follow(collection, result)
        self._start(jobs)
        return result

    def _follow(self, collection: str, result: WriteResult) -> list[Job]:
        """Apply a committed write to the index (caller holds the write lock)."""
        index = self._indexes.get(collection)
        if index is None:  # not loaded yet: the snapshot already includes this write
            self._load(collection)
        else:
            vecs = np.stack(result.added_vectors) if result.added_vectors else None
            index.apply(result.removed_rowids, result.added_rowids, vecs)
            index.version = result.version
        return self._plan(collection)

    # --- reads --------------------------------------------------------------------------------
    def dimension(self, collection: str) -> int:
        """The collection's dimension; ``NotFound`` (naming the existing ones) if it has none."""
        return self.store.collection(collection).dimension

    def search(
        self,
        collection: str,
        vector: np.ndarray,
        top_k: int,
        conditions: Sequence[Condition] = (),
        ef_search: int = 0,
        nprobe: int = 0,
    ) -> SearchResult:
        """The ``top_k`` passages nearest ``vector`` by cosine, best first, among those whose
        metadata satisfies every condition."""
        if not 1 <= top_k <= self.max_top_k:
            raise InvalidArgument(f"top_k must be between 1 and {self.max_top_k}, got {top_k}")
        params = self._params(top_k, ef_search, nprobe)
        conditions = check_filter(conditions)
        info = self.store.collection(collection)
        vector = np.asarray(vector, dtype=np.float32)
        if vector.size != info.dimension or vector.ndim > 2:
            raise InvalidArgument(
                f"query vector has dimension {vector.size}; collection {collection!r} "
                f"expects {info.dimension}"
            )
        query = vector.reshape(1, -1)
        index = self._index_for(info)
        strategy = "index"
        if not conditions:
            ranked = index.search(query, top_k, params)
        else:
            allowed = self.store.match(collection, conditions)
            if len(allowed) == 0:
                ranked = []
            elif not index.kind.exact and len(allowed) <= self.config.filter_exact_limit:
                # A graph or list search would mostly visit excluded vectors: score them all.
                strategy = "exact"
                ranked = self._exact(query, allowed, info.dimension, top_k)
            else:
                # Widen the search in proportion to what the filter excludes, within limits.
                widen = max(len(index), 1) / len(allowed)
                c = self.config
                params = SearchParams(
                    min(c.max_ef_search, max(params.ef_search, int(top_k * widen))),
                    min(c.max_nprobe, max(params.nprobe, int(params.nprobe * min(widen, 8)))),
                )
                ranked = index.search(query, top_k, params, allow=allowed)
        # A passage deleted between the index lookup and this read is left out; one replaced
        # meanwhile is checked against the filter again.
        passages = self.store.get_passages([rowid for rowid, _ in ranked])
        hits = [
            Hit(passages[rowid], score)
            for rowid, score in ranked
            if rowid in passages and matches(passages[rowid].metadata, conditions)
        ]
        return SearchResult(hits, index.kind.name, strategy, index.version)

    def _params(self, top_k: int, ef_search: int, nprobe: int) -> SearchParams:
        c = self.config
        if ef_search and not top_k <= ef_search <= c.max_ef_search:
            raise InvalidArgument(
                f"ef_search must be between top_k ({top_k}) and {c.max_ef_search}, got {ef_search}"
            )
        if nprobe and not 1 <= nprobe <= c.max_nprobe:
            raise InvalidArgument(f"nprobe must be between 1 and {c.max_nprobe}, got {nprobe}")
        return SearchParams(ef_search or max(c.ef_search, top_k), nprobe or c.nprobe)

    def _exact(self, query: np.ndarray, rowids: np.ndarray, dimension: int, k: int):
        ids, vecs = self.store.vectors(rowids.tolist(), dimension)
        if not len(ids):
            return []
        scores = normalize(vecs) @ normalize(query)[0]
        top = np.argsort(-scores, kind="stable")[:k]
        return [(int(ids[i]), float(scores[i])) for i in top]

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

    def indexed_version(self, collection: str) -> int:
        index = self._indexes.get(collection)
        return index.version if index is not None else 0

    def rebuilding(self, collection: str) -> bool:
        return collection in self._building

    def index_type(self, collection: str) -> str:
        index = self._indexes.get(collection)
        return index.kind.name if index is not None else FLAT.name

    def describe(self) -> str:
        return (
            ", ".join(f"{n} ({len(i)} {i.kind.name})" for n, i in sorted(self._indexes.items()))
            or "none"
        )


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size
