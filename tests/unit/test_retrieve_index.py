"""Filters, search parameters, index kinds and policy, background builds, snapshots, change log."""

from __future__ import annotations

import dataclasses
import threading
import typing

import faiss
import numpy as np
import pytest

from ragline.errors import InvalidArgument
from ragline.v1 import retrieve_pb2
from services.retrieve import snapshots
from services.retrieve.hybrid import MODES, RRF_K, SearchMode, candidates, fuse, plan, search_mode
from services.retrieve.index import (
    AUTO,
    FLAT,
    HNSW,
    IVF,
    IVF_POINTS_PER_LIST,
    KINDS,
    IndexPolicy,
    SearchParams,
    VectorIndex,
    index_kind,
)
from services.retrieve.knowledge_base import IndexConfig, KnowledgeBase
from services.retrieve.server import (
    KIND_BY_PB,
    MODE_BY_PB,
    PB_BY_KIND,
    PB_BY_MODE,
    mode_from_pb,
    policy_from_pb,
    policy_pb,
)
from services.retrieve.settings import RetrieveSettings
from services.retrieve.store import Condition, DocumentIn, PassageIn, PassageStore

DIM = 16


def unit(seed: int, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def passage(i: int, seed: int | None = None, **meta: str) -> PassageIn:
    meta = {"lang": ["en", "fr", "de"][i % 3], "team": f"t{i % 10}", **meta}
    return PassageIn(f"d{i}#0", f"d{i}", 0, f"text {i}", meta, unit(i if seed is None else seed))


def make_kb(tmp_path, read_only=False, **config) -> KnowledgeBase:
    config.setdefault("background", False)
    config.setdefault("snapshot_dir", tmp_path / "snapshots")
    return KnowledgeBase(PassageStore(tmp_path), read_only=read_only, config=IndexConfig(**config))


def exact_ids(kb: KnowledgeBase, name: str, query: np.ndarray, k: int) -> list[str]:
    ids, vecs = kb.store.load_vectors(name)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    top = ids[np.argsort(-(vecs @ query))[:k]].tolist()
    passages = kb.store.get_passages(top)
    return [passages[r].id for r in top]


# --- filters -----------------------------------------------------------------------------------
@pytest.fixture
def kb(tmp_path) -> KnowledgeBase:
    kb = make_kb(tmp_path)
    kb.create_collection("docs", DIM, exist_ok=False)
    kb.upsert("docs", [passage(i) for i in range(60)], [])
    return kb


def test_filter_equals_and_any_of_return_only_matching_passages(kb) -> None:
    en = kb.search("docs", unit(4), 50, [Condition("lang", ("en",))]).hits
    assert len(en) == 20 and all(h.passage.metadata["lang"] == "en" for h in en)
    both = kb.search("docs", unit(4), 50, [Condition("lang", ("en", "fr"))]).hits
    assert len(both) == 40 and {h.passage.metadata["lang"] for h in both} == {"en", "fr"}
    # Conditions combine with AND; the best match of the filtered set comes first.
    hits = kb.search(
        "docs", unit(13), 5, [Condition("lang", ("fr", "de")), Condition("team", ("t3",))]
    ).hits
    assert hits[0].passage.id == "d13#0"
    assert sorted(h.passage.id for h in hits) == ["d13#0", "d23#0", "d43#0", "d53#0"]
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert kb.search("docs", unit(1), 5, [Condition("nope", ("x",))]).hits == []
    assert kb.search("docs", unit(1), 5, [Condition("lang", ("xx",))]).hits == []


def test_filter_follows_replacements_and_deletes(kb) -> None:
    kb.upsert("docs", [passage(0, lang="xx")], [])  # d0 was "en"
    hits = kb.search("docs", unit(0), 5, [Condition("lang", ("xx",))]).hits
    assert [h.passage.id for h in hits] == ["d0#0"]
    assert "d0#0" not in {
        h.passage.id for h in kb.search("docs", unit(0), 50, [Condition("lang", ("en",))]).hits
    }
    kb.delete("docs", [], ["d0"])
    assert kb.search("docs", unit(0), 5, [Condition("lang", ("xx",))]).hits == []


@pytest.mark.parametrize(
    ("conditions", "fragment"),
    [
        ([Condition("", ("a",))], "empty key"),
        ([Condition("lang", ())], "has no value"),
        ([Condition("lang", tuple(str(i) for i in range(1025)))], "at most 1024"),
        ([Condition(f"k{i}", ("a",)) for i in range(17)], "at most 16"),
    ],
)
def test_bad_filters_say_what_to_fix(kb, conditions, fragment) -> None:
    with pytest.raises(InvalidArgument, match=fragment):
        kb.search("docs", unit(1), 5, conditions)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(ef_search=5), "ef_search must be between top_k \\(10\\) and 1024"),
        (dict(ef_search=5000), "ef_search must be between"),
        (dict(nprobe=5000), "nprobe must be between 1 and 1024"),
    ],
)
def test_search_parameters_outside_the_limits_are_refused(kb, kwargs, fragment) -> None:
    with pytest.raises(InvalidArgument, match=fragment):
        kb.search("docs", unit(1), 10, **kwargs)


# --- index kinds ------------------------------------------------------------------------------
def test_every_proto_index_kind_maps_to_a_registry_kind_and_back() -> None:
    assert set(KIND_BY_PB) == set(retrieve_pb2.IndexKind.values())
    assert set(PB_BY_KIND) == set(KINDS.values())  # no kind the proto cannot name
    for name, number in retrieve_pb2.IndexKind.items():
        kind = KIND_BY_PB[number]
        assert name == f"INDEX_KIND_{kind.name.upper()}" and PB_BY_KIND[kind] == number
        assert policy_pb(IndexPolicy(kind=kind)).kind == number
        # 0 (AUTO) is proto3's unset: the server's default kind, not "auto" itself.
        assert policy_from_pb(retrieve_pb2.IndexPolicy(kind=number))["kind"] == (
            kind.name if number else None
        )
    with pytest.raises(InvalidArgument, match="kind 9 is unknown: use one of INDEX_KIND_AUTO, "):
        policy_from_pb(retrieve_pb2.IndexPolicy(kind=9))


def test_unknown_index_kind_names_the_valid_ones() -> None:
    assert [index_kind(n) for n in ("auto", "flat", "hnsw", "ivf")] == [AUTO, FLAT, HNSW, IVF]
    for bad in ("lsh", "HNSW", "", ["hnsw"]):
        with pytest.raises(InvalidArgument) as exc:
            index_kind(bad)
        assert str(exc.value) == f"index kind must be one of auto, flat, hnsw, ivf, got {bad!r}"


def test_settings_accept_exactly_the_registry_kinds() -> None:
    annotation = RetrieveSettings.model_fields["index_kind"].annotation
    assert typing.get_args(annotation) == tuple(KINDS)


# --- search modes -----------------------------------------------------------------------------
def test_every_proto_search_mode_maps_to_a_registry_mode_and_back() -> None:
    assert set(MODE_BY_PB) == set(retrieve_pb2.SearchMode.values())
    assert set(PB_BY_MODE) == set(SearchMode)  # no mode the proto cannot name
    for name, number in retrieve_pb2.SearchMode.items():
        mode = MODE_BY_PB[number]
        if number == retrieve_pb2.SEARCH_MODE_UNSPECIFIED:
            assert mode is None  # proto3's unset: the collection's default
        else:
            assert name == f"SEARCH_MODE_{mode.value.upper()}" and PB_BY_MODE[mode] == number
    with pytest.raises(InvalidArgument, match="mode 7 is unknown: use one of SEARCH_MODE_UNSP"):
        mode_from_pb(7, "mode")


def test_settings_accept_exactly_the_registry_modes() -> None:
    annotation = RetrieveSettings.model_fields["default_search_mode"].annotation
    assert typing.get_args(annotation) == tuple(MODES)
    assert search_mode(RetrieveSettings().default_search_mode) is SearchMode.HYBRID
    for bad in ("bm25", "HYBRID", "", None):
        with pytest.raises(InvalidArgument, match="one of dense, sparse, hybrid, got"):
            search_mode(bad)


def test_what_runs_for_each_mode_given_what_was_sent() -> None:
    dense, sparse, hybrid = SearchMode.DENSE, SearchMode.SPARSE, SearchMode.HYBRID
    assert plan(hybrid, True, True) == (hybrid, "")
    assert plan(hybrid, True, False) == (dense, "hybrid without query_text")
    assert plan(dense, True, True) == (dense, "") and plan(sparse, True, True) == (sparse, "")
    assert plan(sparse, False, True) == (sparse, "")
    for mode, has_vector, has_text, fragment in [
        (hybrid, False, True, "needs vector"),
        (hybrid, False, False, "send both"),
        (dense, False, True, "needs vector"),
        (sparse, True, False, "needs query_text"),
    ]:
        with pytest.raises(InvalidArgument, match=fragment):
            plan(mode, has_vector, has_text)


def test_reciprocal_rank_fusion() -> None:
    assert RRF_K == 60 and [candidates(k) for k in (1, 5, 6, 100)] == [20, 20, 24, 400]
    fused = fuse([1, 2, 3], [3, 4, 1])
    assert [i for i, _ in fused] == [1, 3, 2, 4]
    scores = dict(fused)
    assert scores[1] == pytest.approx(1 / 61 + 1 / 63) and scores[4] == pytest.approx(1 / 62)
    assert [i for i, _ in fuse([7], [8])] == [7, 8]  # a tie keeps the first ranking's first
    assert fuse([], []) == []


def test_what_each_kind_says_about_itself() -> None:
    assert FLAT.mutable and FLAT.exact and not FLAT.snapshot
    for kind in (HNSW, IVF):
        assert not kind.mutable and not kind.exact and kind.snapshot and kind.concrete
    assert not AUTO.concrete
    with pytest.raises(ValueError, match="cannot serve searches"):
        VectorIndex(DIM, AUTO)
    with pytest.raises(TypeError, match="index_kind"):
        IndexPolicy(kind="hnsw")  # type: ignore[arg-type]
    sel = faiss.IDSelectorRange(0, 10)
    assert FLAT.search_params(SearchParams(), 5, None) is None
    assert FLAT.search_params(SearchParams(), 5, sel).sel is not None
    assert HNSW.search_params(SearchParams(ef_search=16), 40, None).efSearch == 40  # >= k
    assert HNSW.search_params(SearchParams(ef_search=64), 40, sel).efSearch == 64
    assert IVF.search_params(SearchParams(nprobe=7), 40, sel).nprobe == 7


def test_ivf_needs_two_lists_of_training_points_else_it_is_served_flat(tmp_path) -> None:
    minimum = 2 * IVF_POINTS_PER_LIST
    assert IVF.min_vectors == minimum == 78
    policy = IndexPolicy(kind=IVF)
    assert policy.target(minimum - 1) == FLAT and policy.target(minimum) == IVF
    assert IVF.nlist(minimum, policy) == 2  # not 4 x sqrt(78) = 35 badly trained lists
    assert IVF.nlist(10_000, IndexPolicy(kind=IVF, ivf_nlist=300)) == 256  # 10,000 // 39
    kb = make_kb(tmp_path)
    kb.create_collection("docs", DIM, exist_ok=False, policy={"kind": "ivf"})
    assert kb.store.collection("docs").policy == {"kind": "ivf"}  # stored by name
    kb.upsert("docs", [passage(i) for i in range(minimum - 1)], [])
    assert kb.index_type("docs") == "flat"
    kb.upsert("docs", [passage(minimum - 1)], [])
    assert kb.index_type("docs") == "ivf"
    assert kb.search("docs", unit(5), 1, nprobe=2).hits[0].passage.id == "d5#0"


def test_auto_goes_hnsw_at_the_threshold_and_back_to_flat_only_below_half() -> None:
    policy = IndexPolicy(threshold=1000)
    assert policy.target(999) == FLAT and policy.target(1000) == HNSW
    assert policy.target(500, HNSW) == HNSW and policy.target(499, HNSW) == FLAT
    assert policy.target(999, FLAT) == FLAT


def test_policy_round_trips_through_its_stored_form() -> None:
    policy = IndexPolicy(kind=IVF, threshold=5, ivf_nlist=12)
    stored = policy.to_dict()
    assert stored["kind"] == "ivf" and stored["ivf_nlist"] == 12
    assert IndexPolicy.from_dict(stored) == policy
    # Unset (zero) fields take the default's; the kind is looked up by name.
    assert IndexPolicy.from_dict({"kind": "hnsw", "threshold": 0}, policy) == IndexPolicy(
        kind=HNSW, threshold=5, ivf_nlist=12
    )


# --- index policy -----------------------------------------------------------------------------
def test_auto_policy_switches_to_hnsw_past_the_threshold_and_keeps_answering(tmp_path) -> None:
    kb = make_kb(tmp_path, policy=IndexPolicy(threshold=200), min_rebuild=50)
    kb.create_collection("docs", DIM, exist_ok=False)
    kb.upsert("docs", [passage(i) for i in range(150)], [])
    assert kb.index_type("docs") == "flat"
    kb.upsert("docs", [passage(i) for i in range(150, 260)], [])
    assert kb.index_type("docs") == "hnsw" and kb.indexed("docs") == 260
    result = kb.search("docs", unit(7), 10, ef_search=200)
    assert result.index_type == "hnsw" and result.hits[0].passage.id == "d7#0"
    assert result.version == kb.store.collection("docs").version
    # Writes after the build land in the delta and tombstones until the next rebuild.
    kb.upsert("docs", [passage(7, seed=999)], [])
    kb.delete("docs", [], ["d8"])
    hits = kb.search("docs", unit(999), 3).hits
    assert hits[0].passage.id == "d7#0" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert "d8#0" not in {h.passage.id for h in kb.search("docs", unit(8), 20).hits}
    assert kb.indexed("docs") == kb.store.stats("docs").count == 259
    # Enough change rebuilds it (inline here; a background thread in the server).
    kb.upsert("docs", [passage(i, seed=i + 5000) for i in range(100)], [])
    index = kb._indexes["docs"]
    assert index.kind is HNSW and index.changed == 0 and len(index) == 260  # d8 is back
    assert snapshots.read_header(tmp_path / "snapshots" / "docs.faiss").kind == "hnsw"


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_indexes_agree_with_exact_search(tmp_path, kind) -> None:
    kb = make_kb(tmp_path, nprobe=64)
    kb.create_collection("docs", DIM, exist_ok=False, policy={"kind": kind})
    kb.upsert("docs", [passage(i) for i in range(400)], [])
    kb.wait_idle()
    assert kb.index_type("docs") == kind
    for seed in range(10_000, 10_020):
        query = unit(seed)
        got = [h.passage.id for h in kb.search("docs", query, 10, ef_search=256).hits]
        assert got == exact_ids(kb, "docs", query, 10)
    # A selective filter is scored exactly; a broad one searches the index with the filter.
    result = kb.search("docs", unit(3), 5, [Condition("team", ("t3",))])
    assert result.strategy == "dense:exact (hybrid without query_text)"
    assert result.hits[0].passage.id == "d3#0"
    # Hybrid's dense half takes the same path; its candidates are max(4 x top_k, 20).
    result = kb.search("docs", unit(3), 5, [Condition("team", ("t3",))], text="13")
    assert result.strategy == "hybrid:exact"
    assert {"d3#0", "d13#0"} <= {h.passage.id for h in result.hits}  # dense's and BM25's first
    assert all(h.passage.metadata["team"] == "t3" for h in result.hits)
    kb.config = IndexConfig(filter_exact_limit=0, nprobe=64)
    result = kb.search("docs", unit(3), 5, [Condition("team", ("t3",))], mode=SearchMode.DENSE)
    assert result.strategy == "dense:index" and result.hits[0].passage.id == "d3#0"
    assert all(h.passage.metadata["team"] == "t3" for h in result.hits)


def test_policy_nonsense_is_refused_before_anything_is_written(tmp_path) -> None:
    kb = make_kb(tmp_path)
    for policy, fragment in [({"kind": "lsh"}, "kind must be"), ({"hnsw_m": 1000}, "hnsw_m")]:
        with pytest.raises(InvalidArgument, match=fragment):
            kb.create_collection("docs", DIM, exist_ok=False, policy=policy)
    assert kb.store.list_collections() == []


def test_searches_keep_working_while_a_build_runs_in_the_background(tmp_path) -> None:
    kb = make_kb(tmp_path, background=True, policy=IndexPolicy(threshold=300))
    kb.create_collection("docs", DIM, exist_ok=False)
    kb.upsert("docs", [passage(i) for i in range(299)], [])
    gate = threading.Event()
    build = VectorIndex.build

    def slow_build(*args, **kwargs):
        gate.wait(30)
        return build(*args, **kwargs)

    VectorIndex.build = staticmethod(slow_build)  # type: ignore[method-assign]
    try:
        kb.upsert("docs", [passage(299)], [])
        assert kb.rebuilding("docs")
        kb.upsert("docs", [passage(300, seed=100_077)], [])  # written while the build waits
        result = kb.search("docs", unit(100_077), 1)
        assert result.index_type == "flat" and result.hits[0].passage.id == "d300#0"
        gate.set()
        kb.wait_idle()
    finally:
        VectorIndex.build = build  # type: ignore[method-assign]
    assert not kb.rebuilding("docs") and kb.index_type("docs") == "hnsw"
    # The build started before d300 was written; it caught up from the change log.
    assert kb.search("docs", unit(100_077), 1).hits[0].passage.id == "d300#0"
    assert kb.indexed("docs") == 301


# --- snapshots and the change log ---------------------------------------------------------------
def test_restart_loads_the_snapshot_and_catches_up_from_the_log(tmp_path) -> None:
    kb = make_kb(tmp_path)
    kb.create_collection("docs", DIM, exist_ok=False, policy={"kind": "hnsw"})
    kb.upsert("docs", [passage(i) for i in range(300)], [DocumentIn("d1", "h", 1)])
    header = snapshots.read_header(tmp_path / "snapshots" / "docs.faiss")
    kb.upsert("docs", [passage(5, seed=555)], [])  # after the snapshot
    kb.delete("docs", ["d6#0"], [])
    kb.store.close()

    reopened = make_kb(tmp_path)
    index = reopened._indexes["docs"]
    assert index.kind is HNSW and index.built_version == header.built_version
    assert index.version == reopened.store.collection("docs").version
    assert reopened.search("docs", unit(555), 1).hits[0].passage.id == "d5#0"
    assert "d6#0" not in {h.passage.id for h in reopened.search("docs", unit(6), 10).hits}
    assert reopened.indexed("docs") == 299


def test_snapshot_the_log_no_longer_covers_is_ignored(tmp_path) -> None:
    kb = make_kb(tmp_path)
    kb.create_collection("docs", DIM, exist_ok=False, policy={"kind": "hnsw"})
    kb.upsert("docs", [passage(i) for i in range(100)], [])
    old = snapshots.read_header(tmp_path / "snapshots" / "docs.faiss")
    kb.store.log_keep = 20  # trim hard: the snapshot's version falls out of the log
    for i in range(30):
        kb.upsert("docs", [passage(i, seed=1000 + i)], [])
    kb.store.close()
    reopened = make_kb(tmp_path, min_rebuild=10**9)
    assert reopened.store.collection("docs").log_floor > old.built_version
    # Loaded from SQLite and rebuilt (inline here), not from the stale snapshot.
    assert reopened._indexes["docs"].built_version > old.built_version
    assert reopened.search("docs", unit(1029), 1).hits[0].passage.id == "d29#0"
    assert reopened.indexed("docs") == 100


@pytest.mark.parametrize(
    "damage", [lambda b: b[: len(b) // 2], lambda b: b"garbage" + b, lambda b: b[:-3]]
)
def test_damaged_snapshot_falls_back_to_sqlite(tmp_path, damage) -> None:
    kb = make_kb(tmp_path)
    kb.create_collection("docs", DIM, exist_ok=False, policy={"kind": "hnsw"})
    kb.upsert("docs", [passage(i) for i in range(100)], [])
    kb.store.close()
    path = tmp_path / "snapshots" / "docs.faiss"
    path.write_bytes(damage(path.read_bytes()))
    reopened = make_kb(tmp_path)  # loads flat from SQLite, then rebuilds (inline here)
    assert reopened.search("docs", unit(42), 1).hits[0].passage.id == "d42#0"
    assert reopened.indexed("docs") == 100


@pytest.mark.parametrize("kind", ["auto", "lsh"])
def test_snapshot_naming_a_kind_that_cannot_serve_is_ignored(tmp_path, kind) -> None:
    kb = make_kb(tmp_path)
    kb.create_collection("docs", DIM, exist_ok=False, policy={"kind": "hnsw"})
    kb.upsert("docs", [passage(i) for i in range(100)], [])
    kb.store.close()
    path = tmp_path / "snapshots" / "docs.faiss"
    header, main = snapshots.read(path)
    snapshots.write(path.parent, dataclasses.replace(header, kind=kind), main)
    with pytest.raises(snapshots.SnapshotError, match=f"no index kind '{kind}'"):
        snapshots.read(path)
    reopened = make_kb(tmp_path)  # loads flat from SQLite, then rebuilds (inline here)
    assert reopened.index_type("docs") == "hnsw" and reopened.indexed("docs") == 100
    assert snapshots.read_header(path).kind == "hnsw"
    assert reopened.search("docs", unit(42), 1).hits[0].passage.id == "d42#0"


def test_follower_applies_the_change_log_incrementally(tmp_path) -> None:
    writer = make_kb(tmp_path)
    writer.create_collection("docs", DIM, exist_ok=False)
    writer.upsert("docs", [passage(i) for i in range(50)], [])
    reader = make_kb(tmp_path, read_only=True)
    index = reader._indexes["docs"]
    writer.upsert("docs", [passage(3, seed=333), passage(50)], [])
    writer.delete("docs", ["d4#0"], [])
    assert reader.refresh() == ["docs"]
    assert reader._indexes["docs"] is index  # caught up in place, not rebuilt
    assert reader.search("docs", unit(333), 1).hits[0].passage.id == "d3#0"
    assert reader.indexed("docs") == 50 == writer.store.stats("docs").count
    assert reader.indexed_version("docs") == writer.store.collection("docs").version


def test_follower_adopts_the_writers_snapshot(tmp_path) -> None:
    writer = make_kb(tmp_path, policy=IndexPolicy(threshold=100))
    writer.create_collection("docs", DIM, exist_ok=False)
    reader = make_kb(tmp_path, read_only=True)
    writer.upsert("docs", [passage(i) for i in range(120)], [])
    assert writer.index_type("docs") == "hnsw"
    reader.refresh()  # catches up (flat), sees the new snapshot and adopts it (inline here)
    assert reader.index_type("docs") == "hnsw"
    assert reader.search("docs", unit(9), 1).hits[0].passage.id == "d9#0"
    assert reader.indexed("docs") == 120


def test_vector_index_tombstones_and_delta() -> None:
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((200, DIM)).astype(np.float32)
    index = VectorIndex.build(DIM, HNSW, np.arange(1, 201), vecs, IndexPolicy())
    assert len(index) == 200 and index.staleness() == 0
    index.apply([5, 6, 999], [6, 201], np.stack([vecs[0], vecs[1]]))
    assert len(index) == 200 and index.changed == 4
    got = dict(index.search(vecs[0], 5, SearchParams(ef_search=64)))
    assert 5 not in got and {1, 6} <= set(got)
    assert index.search(vecs[0], 3, allow=np.array([6, 7]))[0][0] == 6


def test_delete_collection_refuses_what_is_not_a_collection_name(tmp_path) -> None:
    # Found by the gRPC fuzzer: a 20,000-character name reached the snapshot file path.
    kb = make_kb(tmp_path)
    for bad in ("a" * 20000, "../etc", ""):
        with pytest.raises(InvalidArgument, match="collection name"):
            kb.delete_collection(bad)
