"""KnowledgeBase (SQLite store + FAISS index) without sockets."""

from __future__ import annotations

import numpy as np
import pytest

from ragline.errors import AlreadyExists, InvalidArgument, NotFound
from services.retrieve.knowledge_base import KnowledgeBase
from services.retrieve.store import DocumentIn, PassageIn, PassageStore

DIM = 8


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def passage(doc: str, chunk: int, seed: int, text: str = "") -> PassageIn:
    return PassageIn(
        f"{doc}#{chunk}", doc, chunk, text or f"{doc} chunk {chunk}", {"source": doc}, unit(seed)
    )


@pytest.fixture
def kb(tmp_path) -> KnowledgeBase:
    kb = KnowledgeBase(PassageStore(tmp_path))
    kb.create_collection("docs", DIM, exist_ok=False)
    return kb


def test_upsert_search_ranks_the_matching_vector_first(kb) -> None:
    kb.upsert("docs", [passage("a", i, i) for i in range(5)], [])
    hits = kb.search("docs", unit(3)[None], 3)
    assert hits[0].passage.id == "a#3" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert hits[0].passage.metadata == {"source": "a"}


def test_upsert_by_id_replaces(kb) -> None:
    kb.upsert("docs", [passage("a", 0, 1, "old")], [])
    result = kb.upsert("docs", [passage("a", 0, 2, "new")], [])
    assert (result.upserted, result.removed) == (1, 0)
    assert kb.store.collection("docs").count == 1
    assert kb.search("docs", unit(2)[None], 1)[0].passage.text == "new"


def test_named_document_is_replaced_whole_and_its_hash_kept(kb) -> None:
    kb.upsert("docs", [passage("a", i, i) for i in range(3)], [DocumentIn("a", "h1", 3)])
    result = kb.upsert("docs", [passage("a", 0, 10)], [DocumentIn("a", "h2", 1)])
    assert result.removed == 2
    assert kb.store.collection("docs").count == 1
    assert kb.store.get_documents("docs", ["a", "zzz"]) == [DocumentIn("a", "h2", 1)]
    assert all(h.passage.id == "a#0" for h in kb.search("docs", unit(1)[None], 5))


def test_delete_by_id_and_by_document(kb) -> None:
    kb.upsert("docs", [passage("a", 0, 1), passage("a", 1, 2), passage("b", 0, 3)], [])
    assert kb.delete("docs", ["a#1"], []).removed == 1
    assert kb.delete("docs", [], ["a"]).removed == 1
    assert [h.passage.id for h in kb.search("docs", unit(1)[None], 10)] == ["b#0"]


def test_reopen_from_disk_gives_the_same_results(tmp_path) -> None:
    kb = KnowledgeBase(PassageStore(tmp_path))
    kb.create_collection("docs", DIM, exist_ok=False)
    kb.upsert("docs", [passage("a", i, i) for i in range(20)], [DocumentIn("a", "h", 20)])
    kb.delete("docs", ["a#7"], [])
    before = [(h.passage.id, round(h.score, 5)) for h in kb.search("docs", unit(7)[None], 5)]
    kb.store.close()
    reopened = KnowledgeBase(PassageStore(tmp_path))
    after = [(h.passage.id, round(h.score, 5)) for h in reopened.search("docs", unit(7)[None], 5)]
    assert before == after and "a#7" not in dict(after)
    assert reopened.store.collection("docs").documents == 1


def test_failed_upsert_changes_nothing(kb) -> None:
    kb.upsert("docs", [passage("a", 0, 1)], [])
    bad = PassageIn("b#0", "b", 0, "x", {}, np.ones(DIM + 1, np.float32))
    with pytest.raises(InvalidArgument, match="expects 8"):
        kb.upsert("docs", [passage("b", 1, 2), bad], [])
    assert kb.store.collection("docs").count == 1
    assert len(kb.search("docs", unit(2)[None], 10)) == 1


@pytest.mark.parametrize(
    ("call", "error", "fragment"),
    [
        (lambda kb: kb.search("nope", unit(1)[None], 1), NotFound, "does not exist"),
        (lambda kb: kb.search("docs", unit(1)[None], 0), InvalidArgument, "between 1 and"),
        (lambda kb: kb.create_collection("docs", 16, True), AlreadyExists, "dimension 8"),
        (lambda kb: kb.create_collection("bad name!", 8, True), InvalidArgument, "letters"),
        (lambda kb: kb.upsert("docs", [passage("a", 0, 1, " ")], []), InvalidArgument, "no text"),
        (
            lambda kb: kb.upsert("docs", [passage("a", 0, 1), passage("a", 0, 2)], []),
            InvalidArgument,
            "twice",
        ),
    ],
)
def test_bad_requests_say_what_to_fix(kb, call, error, fragment) -> None:
    with pytest.raises(error, match=fragment):
        call(kb)
