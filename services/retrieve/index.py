"""VectorIndex: FAISS inner-product search over normalised vectors, keyed by SQLite rowid.

A flat index is mutated in place. An HNSW or IVF index is built once (in the background, see
``KnowledgeBase``) and never mutated: later writes go to a small flat *delta* index and removals
become *tombstones* (a bitmap over rowids that the main search skips), until the next rebuild
folds them in. So searches on the main index need no lock, and a build never blocks them.

Each kind is an ``IndexKind`` in ``KINDS``, looked up by name with ``index_kind()``: how to build
it, how to search it, and what the rest of the stage needs to know about it.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, fields, replace

import faiss
import numpy as np

from ragline.errors import InvalidArgument
from ragline.vectors import normalize

# FAISS's k-means wants this many training points per list (its min_points_per_centroid): fewer
# lists beat a badly trained quantizer, and IVF needs enough vectors to train even two lists.
IVF_POINTS_PER_LIST = 39


@dataclass(frozen=True)
class SearchParams:
    ef_search: int = 64
    nprobe: int = 16


@dataclass(frozen=True)
class IndexKind:
    """One kind of index a collection can be served by, or (``auto``) a rule picking one."""

    name: str
    concrete: bool = True  # serves searches itself; auto only picks a kind that does
    mutable: bool = False  # updated in place; else a delta + tombstones until a rebuild
    exact: bool = False  # scores every vector: no point in bypassing it for a filter
    snapshot: bool = False  # slower to build than to read back: saved beside SQLite
    min_vectors: int = 0  # below this the collection is served flat

    def target(self, n: int, current: IndexKind, policy: IndexPolicy) -> IndexKind:
        """The concrete kind a collection of ``n`` vectors under this policy kind gets."""
        return self if n >= self.min_vectors else FLAT

    def build(self, dimension: int, rows: np.ndarray, policy: IndexPolicy) -> faiss.Index:
        """An empty FAISS index of this kind, trained on ``rows`` where it needs training."""
        raise TypeError(f"index kind {self.name!r} picks another kind; it cannot be built")

    def search_params(
        self, params: SearchParams, k: int, sel: faiss.IDSelector | None
    ) -> faiss.SearchParameters | None:
        """The FAISS parameters of a ``k``-nearest search restricted to ``sel``."""
        return faiss.SearchParameters(sel=sel) if sel is not None else None

    def __repr__(self) -> str:
        return f"<index kind {self.name}>"


class _Auto(IndexKind):
    """Flat below the policy's threshold, HNSW from there on (docs/decisions/0003)."""

    def target(self, n: int, current: IndexKind, policy: IndexPolicy) -> IndexKind:
        # Back to flat only well below the threshold, so a collection hovering around it does
        # not flip between kinds.
        keep = current == HNSW and n >= policy.threshold // 2
        return HNSW if n >= policy.threshold or keep else FLAT


class _Flat(IndexKind):
    """Exact search over every vector, updated in place."""

    def build(self, dimension: int, rows: np.ndarray, policy: IndexPolicy) -> faiss.Index:
        return faiss.IndexFlatIP(dimension)


class _Hnsw(IndexKind):
    """A graph: no training, recall held by ``ef_search`` as the collection grows."""

    def build(self, dimension: int, rows: np.ndarray, policy: IndexPolicy) -> faiss.Index:
        index = faiss.IndexHNSWFlat(dimension, policy.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = policy.ef_construction
        return index

    def search_params(
        self, params: SearchParams, k: int, sel: faiss.IDSelector | None
    ) -> faiss.SearchParameters:
        return faiss.SearchParametersHNSW(efSearch=max(params.ef_search, k), sel=sel)


class _Ivf(IndexKind):
    """Inverted lists around k-means centroids, ``nprobe`` of them searched."""

    def build(self, dimension: int, rows: np.ndarray, policy: IndexPolicy) -> faiss.Index:
        quantizer = faiss.IndexFlatIP(dimension)
        index = faiss.IndexIVFFlat(
            quantizer, dimension, self.nlist(len(rows), policy), faiss.METRIC_INNER_PRODUCT
        )
        index.cp.niter = 10
        # k-means on a sample: nearly as good lists, far sooner (docs/decisions/0003).
        index.cp.max_points_per_centroid = 64
        index.train(rows)
        return index

    def nlist(self, n: int, policy: IndexPolicy) -> int:
        want = policy.ivf_nlist or int(4 * math.sqrt(max(n, 1)))
        return max(1, min(want, n // IVF_POINTS_PER_LIST))

    def search_params(
        self, params: SearchParams, k: int, sel: faiss.IDSelector | None
    ) -> faiss.SearchParameters:
        return faiss.SearchParametersIVF(nprobe=params.nprobe, sel=sel)


AUTO = _Auto("auto", concrete=False)
FLAT = _Flat("flat", mutable=True, exact=True)
HNSW = _Hnsw("hnsw", snapshot=True)
IVF = _Ivf("ivf", snapshot=True, min_vectors=2 * IVF_POINTS_PER_LIST)
KINDS: dict[str, IndexKind] = {k.name: k for k in (AUTO, FLAT, HNSW, IVF)}


def index_kind(name: str) -> IndexKind:
    """The kind called ``name``; ``InvalidArgument`` naming the valid ones if there is none."""
    try:
        return KINDS[name]
    except (KeyError, TypeError):  # TypeError: not even a string (a policy read from JSON)
        raise InvalidArgument(
            f"index kind must be one of {', '.join(KINDS)}, got {name!r}"
        ) from None


@dataclass(frozen=True)
class IndexPolicy:
    """Which index a collection gets (docs/decisions/0003): ``auto`` is flat below
    ``threshold`` vectors and HNSW from there on."""

    kind: IndexKind = AUTO
    threshold: int = 20_000
    hnsw_m: int = 32
    ef_construction: int = 64
    ivf_nlist: int = 0  # 0: about 4 x sqrt(n)

    def __post_init__(self) -> None:
        if not isinstance(self.kind, IndexKind):
            raise TypeError(f"kind is an IndexKind (index_kind({self.kind!r})), not a name")
        if not 1 <= self.threshold <= 10**9:
            raise InvalidArgument(f"index threshold must be 1..1e9, got {self.threshold}")
        if not 4 <= self.hnsw_m <= 128:
            raise InvalidArgument(f"hnsw_m must be between 4 and 128, got {self.hnsw_m}")
        if not 8 <= self.ef_construction <= 1024:
            raise InvalidArgument(
                f"ef_construction must be between 8 and 1024, got {self.ef_construction}"
            )
        if not 0 <= self.ivf_nlist <= 65536:
            raise InvalidArgument(f"ivf_nlist must be between 0 and 65536, got {self.ivf_nlist}")

    def target(self, n: int, current: IndexKind = FLAT) -> IndexKind:
        """The index kind a collection of ``n`` vectors should be served by."""
        return self.kind.target(n, current, self)

    def to_dict(self) -> dict[str, object]:
        """The fields, the kind by name (as a collection's policy is stored)."""
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"kind": self.kind.name}

    @classmethod
    def from_dict(cls, data: dict, default: IndexPolicy | None = None) -> IndexPolicy:
        base = default or cls()
        names = {f.name for f in fields(cls)}
        known = {k: v for k, v in data.items() if k in names and v not in (None, 0, "")}
        if "kind" in known:
            known["kind"] = index_kind(known["kind"])
        return replace(base, **known)


def _bitmap(flags: np.ndarray) -> tuple[faiss.IDSelector, np.ndarray]:
    """A selector over rowids from a bool array; the packed bytes must outlive the selector."""
    packed = np.packbits(flags, bitorder="little")
    return faiss.IDSelectorBitmap(len(packed), faiss.swig_ptr(packed)), packed


def allow_selector(rowids: np.ndarray) -> tuple[faiss.IDSelector, np.ndarray]:
    flags = np.zeros(int(rowids.max()) + 1 if len(rowids) else 1, dtype=bool)
    flags[rowids] = True
    return _bitmap(flags)


class VectorIndex:
    """One index generation of a collection; ``version`` is the collection version it reflects."""

    def __init__(self, dimension: int, kind: IndexKind = FLAT, main: faiss.Index | None = None,
                 version: int = 0) -> None:  # fmt: skip
        if not isinstance(kind, IndexKind) or not kind.concrete:
            raise ValueError(f"{kind!r} cannot serve searches: give flat, hnsw or ivf")
        self.dimension = dimension
        self.kind = kind
        self.version = version
        self.built_version = version  # the version its main index was built from
        self._main = main if main is not None else _flat_map(dimension)
        self._main_ids = np.sort(faiss.vector_to_array(self._main.id_map)).astype(np.int64)
        self._delta = _flat_map(dimension)
        self._dead = np.zeros(0, dtype=bool)  # tombstones over rowids (hnsw/ivf only)
        self._dead_in_main = 0
        self._tomb: tuple[faiss.IDSelector, np.ndarray] | None = None
        self._lock = threading.Lock()

    # --- building ---------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        dimension: int,
        kind: IndexKind,
        ids: np.ndarray,
        vectors: np.ndarray,
        policy: IndexPolicy,
        version: int = 0,
    ) -> VectorIndex:
        """A new index of ``kind`` over ``vectors`` (HNSW adds and IVF trains here: slow)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        rows = _rows(vectors, dimension, "vectors")
        main = faiss.IndexIDMap2(kind.build(dimension, rows, policy))
        if len(ids):
            main.add_with_ids(rows, ids)
        return cls(dimension, kind, main, version)

    # --- writes -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._main.ntotal - self._dead_in_main + self._delta.ntotal

    @property
    def main_size(self) -> int:
        return self._main.ntotal

    @property
    def changed(self) -> int:
        """Vectors written or removed since the main index was built (hnsw/ivf)."""
        return 0 if self.kind.mutable else self._delta.ntotal + self._dead_in_main

    def staleness(self) -> float:
        """Share of the main index that changed since it was built (delta + tombstones)."""
        if self.kind.mutable:
            return 0.0
        return (self._delta.ntotal + self._dead_in_main) / max(self._main.ntotal, 1)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add ``vectors`` under ``ids`` (SQLite rowids, never reused)."""
        self.apply([], ids, vectors)

    def remove_ids(self, ids) -> int:
        """Remove the vectors of ``ids`` (absent ones are ignored); returns how many went."""
        before = len(self)
        self.apply(ids, [], np.zeros((0, self.dimension), np.float32))
        return before - len(self)

    def apply(self, removed, added_ids, added_vectors) -> None:
        """Remove ``removed`` ids, then add ``added_ids`` (a replaced passage is in both)."""
        removed = np.unique(np.asarray(removed, dtype=np.int64).reshape(-1))
        added_ids = np.ascontiguousarray(added_ids, dtype=np.int64).reshape(-1)
        rows = _rows(added_vectors, self.dimension, "vectors") if len(added_ids) else None
        if rows is not None and len(rows) != len(added_ids):
            raise ValueError(f"{len(added_ids)} ids for {len(rows)} vectors")
        with self._lock:
            if self.kind.mutable:
                if len(removed):
                    self._main.remove_ids(removed)
                if rows is not None:
                    self._main.add_with_ids(rows, added_ids)
                return
            if len(removed):
                self._delta.remove_ids(removed)
                in_main = removed[self._in_main(removed)]
                if len(in_main):
                    top = int(in_main.max()) + 1
                    if top > len(self._dead):
                        self._dead = np.concatenate(
                            [
                                self._dead,
                                np.zeros(
                                    max(top, 2 * len(self._dead)) - len(self._dead), dtype=bool
                                ),
                            ]  # fmt: skip
                        )
                    self._dead_in_main += int((~self._dead[in_main]).sum())
                    self._dead[in_main] = True
                    self._tomb = _bitmap(self._dead)
            if rows is not None:
                self._delta.add_with_ids(rows, added_ids)

    def _in_main(self, ids: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self._main_ids, ids)
        pos = np.minimum(pos, max(len(self._main_ids) - 1, 0))
        if not len(self._main_ids):
            return np.zeros(len(ids), dtype=bool)
        return self._main_ids[pos] == ids

    # --- reads ------------------------------------------------------------------------------
    def search(
        self,
        vector: np.ndarray,
        k: int,
        params: SearchParams | None = None,
        allow: np.ndarray | None = None,
    ) -> list[tuple[int, float]]:
        """The ``k`` nearest ids with their cosine, best first (fewer when the index is small),
        among ``allow`` when given."""
        query = _rows(vector, self.dimension, "query vector")
        if len(query) != 1:
            raise InvalidArgument(f"one query vector expected, got {len(query)}")
        params = params or SearchParams()
        keep = allow_selector(allow) if allow is not None else None
        results: list[tuple[np.ndarray, np.ndarray]] = []
        with self._lock:
            tomb = self._tomb
            if self._delta.ntotal:
                results.append(self._search(self._delta, FLAT, query, k, params, keep, None))
            if self.kind.mutable:  # searched under the lock
                results.append(self._search(self._main, self.kind, query, k, params, keep, None))
        if not self.kind.mutable:
            results.append(self._search(self._main, self.kind, query, k, params, keep, tomb))
        ids = np.concatenate([r[0] for r in results]) if results else np.zeros(0, np.int64)
        scores = np.concatenate([r[1] for r in results]) if results else np.zeros(0, np.float32)
        order = np.argsort(-scores, kind="stable")
        out = [(int(ids[i]), float(scores[i])) for i in order if ids[i] >= 0]
        return out[:k]

    def _search(self, index, kind, query, k, params, keep, tomb) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, index.ntotal)
        if k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        # Every selector object stays referenced here until the search returns.
        sel = not_dead = faiss.IDSelectorNot(tomb[0]) if tomb is not None else None
        if keep is not None:
            sel = faiss.IDSelectorAnd(keep[0], not_dead) if not_dead is not None else keep[0]
        scores, ids = index.search(query, k, params=kind.search_params(params, k, sel))
        return ids[0], scores[0]

    # --- snapshots ----------------------------------------------------------------------------
    def parts(self) -> tuple[faiss.Index, faiss.Index, np.ndarray]:
        """Main index, delta index and tombstoned rowids, for a snapshot (under the lock the
        caller holds while no write can happen)."""
        return self._main, self._delta, np.flatnonzero(self._dead).astype(np.int64)

    @classmethod
    def from_parts(cls, dimension: int, kind: IndexKind, main: faiss.Index, delta: faiss.Index,
                   dead: np.ndarray, version: int, built_version: int) -> VectorIndex:  # fmt: skip
        index = cls(dimension, kind, main, version)
        index.built_version = built_version
        if delta.ntotal:
            index._delta = delta
        if len(dead):
            index._dead = np.zeros(int(dead.max()) + 1, dtype=bool)
            index._dead[dead] = True
            index._dead_in_main = int(index._in_main(dead).sum())
            index._tomb = _bitmap(index._dead)
        return index


def _flat_map(dimension: int) -> faiss.Index:
    """An empty exact index keyed by rowid (a flat main index, or any delta)."""
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dimension))


def _rows(vectors: np.ndarray, dimension: int, what: str) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim not in (1, 2) or vectors.shape[-1] != dimension:
        raise InvalidArgument(
            f"{what} has shape {vectors.shape}; this index holds vectors of dimension {dimension}"
        )
    return np.ascontiguousarray(normalize(vectors.reshape(-1, dimension)), np.float32)
