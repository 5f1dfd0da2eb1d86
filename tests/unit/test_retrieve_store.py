"""KnowledgeBase (SQLite store + FAISS index) without sockets."""

from __future__ import annotations

import sqlite3
import threading
from unittest import mock

import numpy as np
import pytest

from ragline.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.retrieve.index import VectorIndex
from services.retrieve.knowledge_base import KnowledgeBase
from services.retrieve.store import DocumentIn, PassageIn, PassageStore

DIM = 8


def unit(seed: int, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def passage(doc: str, chunk: int, seed: int, text: str = "", dim: int = DIM) -> PassageIn:
    return PassageIn(
        f"{doc}#{chunk}",
        doc,
        chunk,
        text or f"{doc} chunk {chunk}",
        {"source": doc},
        unit(seed, dim),
    )


def ids(hits) -> list[str]:
    return [h.passage.id for h in hits]


@pytest.fixture
def kb(tmp_path) -> KnowledgeBase:
    kb = KnowledgeBase(PassageStore(tmp_path))
    kb.create_collection("docs", DIM, exist_ok=False)
    return kb


def test_upsert_search_ranks_the_matching_vector_first(kb) -> None:
    result = kb.upsert("docs", [passage("a", i, i) for i in range(5)], [])
    assert (result.upserted, result.removed, result.count) == (5, 0, 5)
    hits = kb.search("docs", unit(3), 3).hits
    assert hits[0].passage.id == "a#3" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert hits[0].passage.metadata == {"source": "a"}
    assert (hits[0].passage.document_id, hits[0].passage.chunk) == ("a", 3)


def test_vectors_are_compared_by_cosine_whatever_their_length(kb) -> None:
    kb.upsert("docs", [PassageIn("big", "d", 0, "t", {}, 50 * unit(1))], [])
    assert kb.search("docs", 0.01 * unit(1), 1).hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_top_k_larger_than_the_collection_returns_what_exists(kb) -> None:
    kb.upsert("docs", [passage("a", i, i) for i in range(3)], [])
    assert len(kb.search("docs", unit(0), 100).hits) == 3


def test_upsert_by_id_replaces(kb) -> None:
    kb.upsert("docs", [passage("a", 0, 1, "old")], [])
    result = kb.upsert("docs", [passage("a", 0, 2, "new")], [])
    assert (result.upserted, result.removed, result.count) == (1, 0, 1)
    assert kb.store.stats("docs").count == 1 and kb.indexed("docs") == 1
    hit = kb.search("docs", unit(2), 1).hits[0]
    assert hit.passage.text == "new" and hit.score == pytest.approx(1.0, abs=1e-5)


def test_named_document_is_replaced_whole_and_its_hash_kept(kb) -> None:
    kb.upsert("docs", [passage("a", i, i) for i in range(3)], [DocumentIn("a", "h1", 3)])
    kb.upsert("docs", [passage("b", 0, 20)], [DocumentIn("b", "hb", 1)])
    result = kb.upsert("docs", [passage("a", 0, 10)], [DocumentIn("a", "h2", 1)])
    assert (result.upserted, result.removed, result.count) == (1, 2, 2)
    assert kb.store.get_documents("docs", ["a", "zzz"]) == [DocumentIn("a", "h2", 1)]
    assert sorted(ids(kb.search("docs", unit(1), 5).hits)) == ["a#0", "b#0"]
    assert kb.indexed("docs") == 2


def test_delete_by_id_and_by_document(kb) -> None:
    kb.upsert(
        "docs",
        [passage("a", 0, 1), passage("a", 1, 2), passage("b", 0, 3)],
        [DocumentIn("a", "ha", 2), DocumentIn("b", "hb", 1)],
    )
    assert kb.delete("docs", ["a#1", "not-there"], []).removed == 1
    result = kb.delete("docs", [], ["a"])
    assert (result.removed, result.count) == (1, 1)
    assert ids(kb.search("docs", unit(1), 10).hits) == ["b#0"]
    assert kb.store.get_documents("docs", ["a", "b"]) == [DocumentIn("b", "hb", 1)]
    assert kb.indexed("docs") == 1


def test_stats_count_passages_and_documents_and_stamp_writes(kb) -> None:
    assert kb.store.stats("docs").info.last_write_ms == 0
    kb.upsert("docs", [passage("a", 0, 1), passage("a", 1, 2)], [DocumentIn("a", "h", 2)])
    stats = kb.store.stats("docs")
    assert (stats.count, stats.documents, stats.info.dimension) == (2, 1, DIM)
    assert stats.info.last_write_ms > 0


def test_every_write_changes_the_version_even_when_the_count_does_not(kb) -> None:
    kb.upsert("docs", [passage("a", 0, 1)], [])
    before = kb.store.collection("docs")
    with mock.patch("services.retrieve.store._now_ms", return_value=before.last_write_ms):
        kb.upsert("docs", [passage("a", 0, 2)], [])  # same count, same millisecond
    after = kb.store.collection("docs")
    assert after.version > before.version and after.last_write_ms > before.last_write_ms
    kb.delete("docs", ["not-there"], [])  # changes nothing, so no new version
    assert kb.store.collection("docs") == after


def test_reopen_from_disk_gives_the_same_results(tmp_path) -> None:
    kb = KnowledgeBase(PassageStore(tmp_path))
    kb.create_collection("docs", DIM, exist_ok=False)
    kb.upsert("docs", [passage("a", i, i) for i in range(20)], [DocumentIn("a", "h", 20)])
    kb.delete("docs", ["a#7"], [])
    kb.upsert("docs", [passage("a", 3, 99, "replaced")], [])
    before = [(h.passage.id, round(h.score, 5)) for h in kb.search("docs", unit(7), 5).hits]
    kb.store.close()
    reopened = KnowledgeBase(PassageStore(tmp_path))
    after = [(h.passage.id, round(h.score, 5)) for h in reopened.search("docs", unit(7), 5).hits]
    assert before == after and "a#7" not in dict(after)
    assert reopened.search("docs", unit(99), 1).hits[0].passage.text == "replaced"
    assert reopened.store.stats("docs").documents == 1
    assert reopened.indexed("docs") == 19


def test_failed_upsert_changes_nothing(kb) -> None:
    kb.upsert("docs", [passage("a", 0, 1)], [DocumentIn("a", "h1", 1)])
    version = kb.store.collection("docs").version
    nan = PassageIn("b#0", "b", 0, "x", {}, np.full(DIM, np.nan, np.float32))
    with pytest.raises(InvalidArgument, match="NaN"):
        # The named document would lose a#0 if the write were applied halfway.
        kb.upsert("docs", [passage("b", 1, 2), nan], [DocumentIn("a", "h2", 0)])
    assert kb.store.stats("docs").count == 1 and kb.indexed("docs") == 1
    assert kb.store.get_documents("docs", ["a"]) == [DocumentIn("a", "h1", 1)]
    assert kb.store.collection("docs").version == version
    assert ids(kb.search("docs", unit(2), 10).hits) == ["a#0"]


def test_read_only_replica_refuses_writes_and_follows_the_writer(tmp_path) -> None:
    writer = KnowledgeBase(PassageStore(tmp_path))
    writer.create_collection("docs", DIM, exist_ok=False)
    writer.upsert("docs", [passage("a", 0, 1, "v1")], [])
    reader = KnowledgeBase(PassageStore(tmp_path), read_only=True)
    for write in (
        lambda: reader.upsert("docs", [passage("b", 0, 2)], []),
        lambda: reader.delete("docs", ["a#0"], []),
        lambda: reader.create_collection("other", DIM, exist_ok=True),
        lambda: reader.delete_collection("docs"),
    ):
        with pytest.raises(FailedPrecondition, match="read-only"):
            write()
    assert writer.store.stats("docs").count == 1  # the refused delete did not reach SQLite

    # A replacement keeps the count; the follower must still see it.
    writer.upsert("docs", [passage("a", 0, 5, "v2")], [])
    assert reader.refresh() == ["docs"]
    assert reader.search("docs", unit(5), 1).hits[0].passage.text == "v2"
    assert reader.refresh() == []  # nothing changed: nothing rebuilt

    writer.delete_collection("docs")
    writer.create_collection("docs", 2 * DIM, exist_ok=False)
    writer.upsert("docs", [passage("c", 0, 3, dim=2 * DIM)], [])
    # Recreated with another dimension: a search finds the new index without waiting a tick.
    assert ids(reader.search("docs", unit(3, 2 * DIM), 1).hits) == ["c#0"]


def test_index_is_loaded_on_first_write_when_not_loaded_yet(tmp_path) -> None:
    KnowledgeBase(PassageStore(tmp_path)).create_collection("docs", DIM, exist_ok=False)
    kb = KnowledgeBase(PassageStore(tmp_path), load=False)
    assert not kb.loaded
    kb.upsert("docs", [passage("a", 0, 1)], [])
    assert kb.indexed("docs") == 1 and ids(kb.search("docs", unit(1), 1).hits) == ["a#0"]


def test_get_documents_accepts_more_ids_than_sqlite_has_parameters(kb) -> None:
    docs = [DocumentIn(f"d{i}", f"h{i}", 1) for i in range(1500)]
    kb.upsert("docs", [passage("d0", 0, 1)], docs)
    found = kb.store.get_documents("docs", [f"d{i}" for i in range(0, 3000, 2)])
    assert len(found) == 750 and {d.content_hash for d in found} >= {"h0", "h1498"}


def test_database_from_before_versions_is_upgraded(tmp_path) -> None:
    with sqlite3.connect(tmp_path / "ragline.sqlite3") as conn:
        conn.execute(
            "CREATE TABLE collections (name TEXT PRIMARY KEY, dimension INTEGER NOT NULL,"
            " metric TEXT NOT NULL, created_ms INTEGER NOT NULL,"
            " last_write_ms INTEGER NOT NULL DEFAULT 0)"
        )
        conn.execute("INSERT INTO collections VALUES ('old', 8, 'inner_product', 1, 0)")
    conn.close()
    kb = KnowledgeBase(PassageStore(tmp_path))
    kb.upsert("old", [passage("a", 0, 1)], [])
    assert kb.store.collection("old").version > 0
    assert ids(kb.search("old", unit(1), 1).hits) == ["a#0"]


def test_concurrent_writes_and_searches_keep_index_and_store_in_agreement(kb) -> None:
    errors: list[BaseException] = []

    def write(worker: int) -> None:
        try:
            for i in range(40):
                doc = f"w{worker}-{i % 5}"
                kb.upsert("docs", [passage(doc, c, 1000 * worker + i + c) for c in range(3)],
                          [DocumentIn(doc, str(i), 3)])  # fmt: skip
                if i % 7 == 0:
                    kb.delete("docs", [], [f"w{worker}-{(i + 1) % 5}"])
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    def search() -> None:
        try:
            for i in range(200):
                for hit in kb.search("docs", unit(i), 10).hits:
                    assert hit.passage.text
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(2)]
    threads += [threading.Thread(target=search) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert kb.indexed("docs") == kb.store.stats("docs").count
    rowids, vecs = kb.store.load_vectors("docs")
    assert len(rowids) == kb.indexed("docs") and vecs.shape == (len(rowids), DIM)


def test_vector_index_add_remove_search() -> None:
    index = VectorIndex(DIM)
    index.add(np.array([10, 20, 30]), np.stack([unit(1), unit(2), unit(3)]))
    assert index.search(unit(2), 5)[0] == (20, pytest.approx(1.0, abs=1e-5))
    assert index.remove_ids([20, 99]) == 1
    assert [i for i, _ in index.search(unit(2), 5)] != [] and 20 not in dict(
        index.search(unit(2), 5)
    )
    with pytest.raises(InvalidArgument, match="dimension 8"):
        index.search(np.ones(DIM + 1, np.float32), 1)
    assert VectorIndex(DIM).search(unit(1), 3) == []


@pytest.mark.parametrize(
    ("call", "error", "fragment"),
    [
        (lambda kb: kb.search("nope", unit(1), 1).hits, NotFound, "does not exist.*existing: docs"),
        (lambda kb: kb.search("docs", unit(1), 0).hits, InvalidArgument, "between 1 and 100"),
        (lambda kb: kb.search("docs", unit(1), 101).hits, InvalidArgument, "between 1 and 100"),
        (
            lambda kb: kb.search("docs", np.ones(3, np.float32), 1).hits,
            InvalidArgument,
            "expects 8",
        ),
        (lambda kb: kb.create_collection("docs", 16, True), AlreadyExists, "dimension 8"),
        (lambda kb: kb.create_collection("docs", 8, False), AlreadyExists, "exist_ok"),
        (lambda kb: kb.create_collection("bad name!", 8, True), InvalidArgument, "letters"),
        (lambda kb: kb.create_collection("x" * 65, 8, True), InvalidArgument, "1-64"),
        (lambda kb: kb.create_collection("new", 0, True), InvalidArgument, "dimension must"),
        (lambda kb: kb.upsert("nope", [passage("a", 0, 1)], []), NotFound, "CreateCollection"),
        (lambda kb: kb.upsert("docs", [passage("a", 0, 1, " ")], []), InvalidArgument, "no text"),
        (
            lambda kb: kb.upsert("docs", [passage("a", 0, 1), passage("a", 0, 2)], []),
            InvalidArgument,
            "twice",
        ),
        (
            lambda kb: kb.upsert("docs", [PassageIn("", "d", 0, "t", {}, unit(1))], []),
            InvalidArgument,
            "passage id is empty",
        ),
        (
            lambda kb: kb.upsert("docs", [PassageIn("i" * 257, "d", 0, "t", {}, unit(1))], []),
            InvalidArgument,
            "longer than 256",
        ),
        (
            lambda kb: kb.upsert("docs", [PassageIn("p", "d", 0, "t", {"n": 1}, unit(1))], []),
            InvalidArgument,
            "must be strings",
        ),
        (
            lambda kb: kb.upsert("docs", [PassageIn("p", "d", 0, "t", {}, np.ones(9))], []),
            InvalidArgument,
            "dimension 9; collection 'docs' expects 8",
        ),
        (lambda kb: kb.delete("nope", ["a"], []), NotFound, "does not exist"),
        (lambda kb: kb.store.get_documents("nope", ["a"]), NotFound, "does not exist"),
    ],
)
def test_bad_requests_say_what_to_fix(kb, call, error, fragment) -> None:
    with pytest.raises(error, match=fragment):
        call(kb)
