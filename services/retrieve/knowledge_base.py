"""KnowledgeBase: the store and one index per collection, kept in agreement; dense, sparse
(BM25) and hybrid search over them."""

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
from services.retrieve.hybrid import SearchMode, candidates, fuse, plan, search_mode
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
    score: float  # cosine to the query vector (0 when none was sent)
    bm25_score: float = 0.0  # BM25 of the query text, higher is better (0: not a BM25 hit)
    rrf_score: float = 0.0  # hybrid: the fused score the hits are ordered by


@dataclass(frozen=True)
class SearchResult:
    hits: list[Hit]
    index_type: str
    # "<mode>:<how>": dense:index, dense:exact (a selective filter, scored exactly), sparse:bm25,
    # hybrid:index, hybrid:exact; " (hybrid without query_text)" when hybrid fell back to dense.
    strategy: str
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
    search_mode: SearchMode = SearchMode.HYBRID  # of collections created without one


# A background job: build a collection's index of this kind, or (None) adopt the writer's snapshot.
Job = tuple[str, IndexKind | None]


class KnowledgeBase:
    """Store plus indexes: SQLite commits first, then the index follows, under one write lock.

    Builds of HNSW/IVF indexes run in a background thread from a consistent SQLite snapshot;
    the finished index catches up from the change log under the write lock and replaces the old
    one, which searches keep using meanwhile. A read-only replica shares the writer's database:
    ``refresh()`` applies the change log since its index's version (a full reload only when the
    log no longer reaches back), and adopts the writer's snapshots instead of building its own.

    On a shared store (PostgreSQL) every replica writes and none is special: a replica's own
    write reaches its index through the change log like everyone else's (so no write made
    elsewhere in between is skipped), and each replica builds and snapshots its own indexes.
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
        self.shared = store.shared
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
            self.store.release_thread()  # this thread's database connection ends with it

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
        self,
        name: str,
        dimension: int,
        exist_ok: bool,
        policy: dict | None = None,
        search_mode: SearchMode | None = None,
    ) -> CollectionInfo:
        """``search_mode``: the collection's default; None follows the server's setting."""
        self._check_writable()
        policy = {k: v for k, v in (policy or {}).items() if v not in (None, 0, "")}
        IndexPolicy.from_dict(policy, self.config.policy)  # refuses nonsense before writing
        mode = search_mode.value if search_mode is not None else ""
        with self._write_lock:
            info = self.store.create_collection(name, dimension, exist_ok, policy, mode)
            if name not in self._indexes:
                if self.shared:  # it may exist already, written by another replica
                    self._load(name)
                else:
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
        elif self.shared:  # others may have written since this index's version: the log has all
            if not self._catch_up(collection, index):
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

    def search_mode(self, info: CollectionInfo) -> SearchMode:
        """The collection's default search mode (the server's when it was created without)."""
        return search_mode(info.search_mode) if info.search_mode else self.config.search_mode

    def search(
        self,
        collection: str,
        vector: np.ndarray | None,
        top_k: int,
        conditions: Sequence[Condition] = (),
        ef_search: int = 0,
        nprobe: int = 0,
        *,
        text: str = "",
        mode: SearchMode | None = None,
    ) -> SearchResult:
        """The ``top_k`` best passages, best first, among those whose metadata satisfies every
        condition: nearest ``vector`` by cosine (dense), best matches of ``text`` by BM25
        (sparse), or both fused by reciprocal rank (hybrid); ``mode`` None: the collection's
        default. Every hit's ``score`` is its cosine to ``vector`` (0 without one)."""
        if not 1 <= top_k <= self.max_top_k:
            raise InvalidArgument(f"top_k must be between 1 and {self.max_top_k}, got {top_k}")
        params = self._params(top_k, ef_search, nprobe)
        conditions = check_filter(conditions)
        info = self.store.collection(collection)
        query = None
        if vector is not None and np.size(vector):
            vector = np.asarray(vector, dtype=np.float32)
            if vector.size != info.dimension or vector.ndim > 2:
                raise InvalidArgument(
                    f"query vector has dimension {vector.size}; collection {collection!r} "
                    f"expects {info.dimension}"
                )
            query = vector.reshape(1, -1)
        ran, note = plan(mode or self.search_mode(info), query is not None, bool(text.strip()))
        dense: list[tuple[int, float]] = []
        sparse: list[tuple[int, float]] = []
        if ran is SearchMode.SPARSE:
            version, sparse = self.store.bm25(collection, text, top_k, conditions)
            how, index_type = "bm25", self.index_type(collection)
            ranked = [rowid for rowid, _ in sparse]
            rrf: dict[int, float] = {}
        else:
            k = top_k if ran is SearchMode.DENSE else candidates(top_k)
            index, dense, how = self._dense(info, query, k, conditions, params)
            version, index_type = index.version, index.kind.name
            ranked = [rowid for rowid, _ in dense]
            rrf = {}
            if ran is SearchMode.HYBRID:
                fts_version, sparse = self.store.bm25(collection, text, k, conditions)
                version = min(version, fts_version)  # what both rankings reflect at least
                rrf = dict(fuse(ranked, [rowid for rowid, _ in sparse])[:top_k])
                ranked = list(rrf)
        cosine = dict(dense)
        if query is not None:  # BM25 hits the dense ranking missed: score = cosine everywhere
            cosine |= self._cosines(query, [r for r in ranked if r not in cosine], info.dimension)
        bm25 = dict(sparse)
        # A passage deleted between the ranking and this read is left out; one replaced
        # meanwhile is checked against the filter again.
        passages = self.store.get_passages(ranked)
        hits = [
            Hit(passages[r], cosine.get(r, 0.0), bm25.get(r, 0.0), rrf.get(r, 0.0))
            for r in ranked
            if r in passages and matches(passages[r].metadata, conditions)
        ]
        strategy = f"{ran.value}:{how}" + (f" ({note})" if note else "")
        return SearchResult(hits, index_type, strategy, version)

    def _dense(
        self,
        info: CollectionInfo,
        query: np.ndarray,
        k: int,
        conditions: Sequence[Condition],
        params: SearchParams,
    ) -> tuple[VectorIndex, list[tuple[int, float]], str]:
        """The index searched, its ``k`` nearest ``(rowid, cosine)`` and how it ran ("index", or
        "exact": a selective filter's passages scored exactly)."""
        index = self._index_for(info)
        if not conditions:
            return index, index.search(query, k, params), "index"
        allowed = self.store.match(info.name, conditions)
        if len(allowed) == 0:
            return index, [], "index"
        if not index.kind.exact and len(allowed) <= self.config.filter_exact_limit:
            # A graph or list search would mostly visit excluded vectors: score them all.
            return index, self._exact(query, allowed, info.dimension, k), "exact"
        # Widen the search in proportion to what the filter excludes, within limits.
        widen = max(len(index), 1) / len(allowed)
        c = self.config
        params = SearchParams(
            min(c.max_ef_search, max(params.ef_search, int(k * widen))),
            min(c.max_nprobe, max(params.nprobe, int(params.nprobe * min(widen, 8)))),
        )
        return index, index.search(query, k, params, allow=allowed), "index"

    def _cosines(self, query: np.ndarray, rowids: list[int], dimension: int) -> dict[int, float]:
        if not rowids:
            return {}
        ids, vecs = self.store.vectors(rowids, dimension)
        scores = normalize(vecs) @ normalize(query)[0]
        return dict(zip(ids.tolist(), scores.tolist(), strict=True))

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
