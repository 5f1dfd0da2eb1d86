"""KnowledgeBase (SQLite store + FAISS index + FTS5 text index) without sockets; the tests
that take ``kb`` run on the PostgreSQL store too (a real server on loopback)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from unittest import mock

import numpy as np
import pytest

from ragline.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.retrieve import fulltext
from services.retrieve.hybrid import SearchMode
from services.retrieve.index import VectorIndex
from services.retrieve.knowledge_base import IndexConfig, KnowledgeBase
from services.retrieve.store import Condition, DocumentIn, PassageIn, PassageStore

DENSE, SPARSE, HYBRID = SearchMode.DENSE, SearchMode.SPARSE, SearchMode.HYBRID

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


@pytest.fixture(params=["sqlite", "postgres"])
def kb(request, tmp_path) -> Iterator[KnowledgeBase]:
    if request.param == "sqlite":
        store = PassageStore(tmp_path)
    else:
        from services.retrieve.pgstore import PostgresStore

        store = PostgresStore(request.getfixturevalue("pg_dsn"))
    kb = KnowledgeBase(store)
    kb.create_collection("docs", DIM, exist_ok=False)
    yield kb
    store.close()


@pytest.fixture
def sqlite_kb(tmp_path) -> KnowledgeBase:
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


def test_documents_are_listed_in_pages_with_counts_metadata_and_write_time(kb) -> None:
    names = [f"d{i:02d}" for i in range(5)]
    for i, doc in enumerate(names):
        chunks = [passage(doc, c, 10 * i + c) for c in range(i + 1)]
        kb.upsert("docs", chunks, [DocumentIn(doc, f"h{i}", len(chunks))])
    kb.create_collection("empty", DIM, exist_ok=False)
    first, after = kb.store.list_documents("docs", 2)
    assert [d.document_id for d in first] == ["d00", "d01"] and after == "d01"
    rest, end = kb.store.list_documents("docs", 10, after)
    assert [d.document_id for d in rest] == ["d02", "d03", "d04"] and end == ""
    d = rest[-1]
    assert (d.content_hash, d.chunks, d.metadata) == ("h4", 5, {"source": "d04"})
    assert d.updated_ms > 0
    assert [x.document_id for x in kb.store.describe_documents("docs", ["d03", "nope"])] == ["d03"]
    stats = {s.info.name: (s.count, s.documents) for s in kb.store.list_collection_stats()}
    assert stats == {"docs": (15, 5), "empty": (0, 0)}
    with pytest.raises(NotFound, match="does not exist"):
        kb.store.list_documents("nope")
    with pytest.raises(InvalidArgument, match="limit"):
        kb.store.list_documents("docs", 5000)


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
        # (the postgres store takes its clock from the same function)
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
    # The text index is the writer's own SQLite tables: a replica reads it as it is.
    assert texts(reader.search("docs", None, 5, text="v1 v2", mode=SPARSE).hits) == ["v2"]

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
    kb.store.check_fulltext("docs")  # the text index agrees with the passages too


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
        (
            lambda kb: kb.search("docs", unit(1), 5, mode=SPARSE),
            InvalidArgument,
            r"sparse search needs query_text \(the question's text\): send it, or set mode "
            "SEARCH_MODE_DENSE",
        ),
        (
            lambda kb: kb.search("docs", None, 5, text="x", mode=DENSE),
            InvalidArgument,
            r"dense search needs vector \(the query's embedding\): send it, or set mode "
            "SEARCH_MODE_SPARSE",
        ),
        (
            lambda kb: kb.search("docs", None, 5, text="x"),  # the default: hybrid
            InvalidArgument,
            "hybrid search needs vector .* too: send it, or set mode SEARCH_MODE_SPARSE",
        ),
        (
            lambda kb: kb.search("docs", None, 5, text="  ", mode=HYBRID),
            InvalidArgument,
            "hybrid search needs vector .* and query_text .*: send both",
        ),
        (
            lambda kb: kb.search("docs", np.ones(3, np.float32), 5, text="x", mode=SPARSE),
            InvalidArgument,
            "expects 8",  # a vector sent with a sparse search is still checked
        ),
        (lambda kb: kb.search("nope", None, 1, text="x", mode=SPARSE), NotFound, "existing"),
    ],
)
def test_bad_requests_say_what_to_fix(kb, call, error, fragment) -> None:
    with pytest.raises(error, match=fragment):
        call(kb)


# --- BM25 and hybrid search --------------------------------------------------------------------
def texts(hits) -> list[str]:
    return [h.passage.text for h in hits]


@pytest.fixture
def corpus(kb) -> KnowledgeBase:
    """Forty ordinary passages near random vectors, and a few with rare terms whose vectors
    point away from the test query (unit(5)), so dense search never finds them."""
    away = -unit(5)
    kb.upsert(
        "docs",
        [passage("p", i, i, f"ordinary passage {i} about leave and expenses") for i in range(40)]
        + [
            PassageIn("code#0", "code", 0, "Error E-1042: the spool directory is full", {}, away),
            PassageIn("near#0", "near", 0, "the e of 1042, and e-1043 is near", {}, away),
            PassageIn(
                "conf#0", "conf", 0, "set smtpd_recipient_restrictions; run postconf -XV", {}, away
            ),  # fmt: skip
            PassageIn("fr#0", "fr", 0, "Crème brûlée à la carte", {"source": "menu"}, away),
        ],
        [],
    )
    return kb


def test_bm25_finds_an_exact_rare_term_that_dense_misses_and_hybrid_keeps_it(corpus) -> None:
    query, question = unit(5), "what does error E-1042 mean?"
    dense = corpus.search("docs", query, 5, mode=DENSE)
    assert "code#0" not in ids(dense.hits) and dense.strategy == "dense:index"
    sparse = corpus.search("docs", query, 5, text=question, mode=SPARSE)
    assert ids(sparse.hits)[0] == "code#0" and sparse.strategy == "sparse:bm25"
    assert "near#0" not in ids(sparse.hits)  # "e ... 1042" apart is not the code E-1042
    hybrid = corpus.search("docs", query, 5, text=question)  # the default mode
    assert hybrid.strategy == "hybrid:index" and len(hybrid.hits) == 5
    assert "code#0" in ids(hybrid.hits) and ids(hybrid.hits)[0] == ids(dense.hits)[0] == "p#5"
    rrf = [h.rrf_score for h in hybrid.hits]
    assert rrf == sorted(rrf, reverse=True) and rrf[0] == pytest.approx(1 / 61)
    code = hybrid.hits[ids(hybrid.hits).index("code#0")]
    # Found only by BM25, yet `score` is still its cosine to the query (-1 by construction).
    assert code.score == pytest.approx(-1.0, abs=1e-5) and code.bm25_score > 0
    assert code.bm25_score == pytest.approx(sparse.hits[0].bm25_score)
    assert dense.hits[0].bm25_score == 0 and dense.hits[0].rrf_score == 0
    # Without a vector a sparse hit has no cosine to report.
    assert corpus.search("docs", None, 1, text="E-1042", mode=SPARSE).hits[0].score == 0


@pytest.mark.parametrize(
    ("question", "found"),
    [
        ("smtpd_recipient_restrictions", "conf#0"),  # an identifier, whole
        ("which recipient restrictions apply", "conf#0"),  # ... and its words in a question
        ("postconf -XV", "conf#0"),
        ("creme brulee", "fr#0"),  # accents folded (remove_diacritics 2)
        ("CRÈME", "fr#0"),
        ("e-1043", "near#0"),
    ],
)
def test_tokenizer_matches_codes_identifiers_and_accents(corpus, question, found) -> None:
    assert ids(corpus.search("docs", None, 1, text=question, mode=SPARSE).hits) == [found]


NASTY = [
    '"foo" AND (',
    "NEAR(leave expenses, 2)",
    "NEAR",
    "AND",
    "OR OR OR",
    "NOT leave",
    "*",
    "leave*",
    "^leave",
    "text:leave",
    "{text}: leave",
    "-",
    "+leave -expenses",
    '"',
    '""""',
    "'; DROP TABLE passages; --",
    "(((",
    ")",
    "东京 🙂 ü",
    "\x00leave\x00",
    "leave\ud800",
    "",
    "   ",
    "word " * 5000,
    " ".join(f"t{i}" for i in range(1000)),
]


@pytest.mark.parametrize("text", NASTY)
def test_any_query_text_is_searched_literally_and_never_errors(corpus, text) -> None:
    version, found = corpus.store.bm25("docs", text, 10)
    assert version == corpus.store.collection("docs").version
    assert all(score > 0 for _, score in found)
    if text.strip():
        corpus.search("docs", None, 10, text=text, mode=SPARSE)
    assert len(corpus.search("docs", unit(1), 10, text=text).hits) == 10  # hybrid, or dense


def test_query_words_are_literal_terms_not_fts_syntax(kb) -> None:
    kb.upsert("docs", [passage("syntax", 0, 50, "NEAR the door AND the window OR not")], [])
    kb.upsert("docs", [passage("p", i, i, f"plain passage {i}") for i in range(5)], [])
    for word in ("NEAR", "and", "Or", "NOT"):
        assert ids(kb.search("docs", None, 1, text=word, mode=SPARSE).hits) == ["syntax#0"]
    hits = kb.search("docs", None, 50, text='"foo" AND (', mode=SPARSE).hits
    assert ids(hits) == ["syntax#0"]  # only the literal word "and" matched


def test_filters_apply_to_sparse_and_hybrid_hits(corpus) -> None:
    kb = corpus
    menu = [Condition("source", ("menu",))]
    assert ids(kb.search("docs", None, 10, menu, text="crème E-1042", mode=SPARSE).hits) == ["fr#0"]
    none = [Condition("source", ("nothing",))]
    assert kb.search("docs", None, 10, none, text="E-1042", mode=SPARSE).hits == []
    some = [Condition("source", ("p", "code"))]  # no passage of "code" has the field
    hits = kb.search("docs", unit(5), 10, some, text="E-1042 leave").hits
    assert len(hits) == 10 and {h.passage.metadata.get("source") for h in hits} == {"p"}


def test_text_index_follows_replacements_deletes_and_reopening(tmp_path) -> None:
    def found(kb: KnowledgeBase, text: str) -> list[str]:
        return sorted(ids(kb.search("docs", None, 50, text=text, mode=SPARSE).hits))

    kb = KnowledgeBase(PassageStore(tmp_path))
    kb.create_collection("docs", DIM, exist_ok=False)
    kb.create_collection("other", DIM, exist_ok=False)
    kb.upsert("other", [passage("o", 0, 1, "alpha in another collection")], [])
    kb.upsert("docs", [passage("a", i, i, f"alpha chunk {i}") for i in range(3)],
              [DocumentIn("a", "h1", 3)])  # fmt: skip
    kb.upsert("docs", [passage("b", 0, 9, "beta alpha")], [DocumentIn("b", "hb", 1)])
    assert found(kb, "alpha") == ["a#0", "a#1", "a#2", "b#0"]
    kb.upsert("docs", [passage("a", 1, 1, "omega now")], [])  # replaced by id
    kb.upsert("docs", [passage("a", 0, 0, "gamma only")], [DocumentIn("a", "h2", 1)])  # whole doc
    kb.delete("docs", [], ["b"])
    assert (found(kb, "alpha"), found(kb, "omega"), found(kb, "gamma")) == ([], [], ["a#0"])
    kb.store.check_fulltext("docs")
    kb.store.close()

    reopened = KnowledgeBase(PassageStore(tmp_path))
    assert (found(reopened, "alpha"), found(reopened, "gamma")) == ([], ["a#0"])
    reopened.store.check_fulltext("docs")
    # A collection deleted and created again starts with an empty text index.
    reopened.delete_collection("docs")
    reopened.create_collection("docs", DIM, exist_ok=False)
    assert found(reopened, "gamma alpha") == []
    assert ids(reopened.search("other", None, 5, text="alpha", mode=SPARSE).hits) == ["o#0"]
    reopened.store.check_fulltext("docs")
    reopened.store.check_fulltext("other")


def test_bm25_statistics_are_the_collections_own(tmp_path) -> None:
    kb = KnowledgeBase(PassageStore(tmp_path))
    for name in ("docs", "Docs"):  # names differ only in case: two indexes all the same
        kb.create_collection(name, DIM, exist_ok=False)
    kb.upsert("docs", [passage("d", 0, 1, "rare word"), passage("d", 1, 2, "common")], [])
    before = kb.search("docs", None, 1, text="rare", mode=SPARSE).hits[0].bm25_score
    kb.upsert("Docs", [passage("x", i, i, "rare rare rare") for i in range(30)], [])
    after = kb.search("docs", None, 1, text="rare", mode=SPARSE).hits[0].bm25_score
    assert after == pytest.approx(before)  # another collection's text changes nothing here
    assert len(kb.search("Docs", None, 50, text="rare", mode=SPARSE).hits) == 30


def test_database_from_before_the_text_index_gets_it_at_open(tmp_path) -> None:
    kb = KnowledgeBase(PassageStore(tmp_path))
    kb.create_collection("docs", DIM, exist_ok=False)
    kb.upsert("docs", [passage("a", i, i, f"alpha {i}") for i in range(5)],
              [DocumentIn("a", "h", 5)])  # fmt: skip
    kb.delete("docs", ["a#2"], [])
    kb.store.close()
    # Take the database back to what the release before this one wrote.
    with sqlite3.connect(tmp_path / "ragline.sqlite3") as conn:
        fulltext.drop(conn, "docs")
        conn.execute("DELETE FROM counters WHERE name='fts_layout'")
        conn.execute("ALTER TABLE collections DROP COLUMN search_mode")
        left = "SELECT name FROM sqlite_master WHERE name LIKE 'passages\\_%' ESCAPE '\\'"
        assert [r[0] for r in conn.execute(left)] == ["passages_by_document"]
    conn.close()

    kb = KnowledgeBase(PassageStore(tmp_path))
    kb.store.check_fulltext("docs")
    hits = kb.search("docs", None, 10, text="alpha", mode=SPARSE).hits
    assert sorted(ids(hits)) == ["a#0", "a#1", "a#3", "a#4"]  # nothing lost, nothing revived
    stats = kb.store.stats("docs")
    assert (stats.count, stats.documents, stats.info.search_mode) == (4, 1, "")
    assert ids(kb.search("docs", unit(3), 1).hits) == ["a#3"]
    kb.upsert("docs", [passage("a", 5, 5, "alpha five")], [])  # and it keeps following writes
    assert "a#5" in ids(kb.search("docs", None, 10, text="five", mode=SPARSE).hits)

    # A new tokenizer layout rebuilds every index at the next open.
    kb.store.close()
    with mock.patch.object(fulltext, "LAYOUT", fulltext.LAYOUT + 1):
        kb = KnowledgeBase(PassageStore(tmp_path))
        layout = kb.store._conn.execute(
            "SELECT value FROM counters WHERE name='fts_layout'"
        ).fetchone()[0]
        assert layout == fulltext.LAYOUT
        assert len(kb.search("docs", None, 10, text="alpha", mode=SPARSE).hits) == 5
        kb.store.check_fulltext("docs")


def test_a_collections_default_mode_and_the_servers(tmp_path) -> None:
    kb = KnowledgeBase(PassageStore(tmp_path), config=IndexConfig(search_mode=DENSE))
    kb.create_collection("server", DIM, exist_ok=False)
    kb.create_collection("own", DIM, exist_ok=False, search_mode=SPARSE)
    for name in ("server", "own"):
        kb.upsert(name, [passage("a", 0, 1, "alpha")], [])
    assert kb.search("server", unit(1), 1, text="alpha").strategy == "dense:index"
    assert kb.search("own", None, 1, text="alpha").strategy == "sparse:bm25"
    assert kb.search("own", unit(1), 1, text="alpha", mode=HYBRID).strategy == "hybrid:index"
    assert [kb.search_mode(i) for i in kb.store.list_collections()] == [SPARSE, DENSE]
    kb.store.close()
    # The server's setting is followed by the collections created without one, as it changes.
    kb = KnowledgeBase(PassageStore(tmp_path))
    assert kb.search("server", unit(1), 1).strategy == "dense:index (hybrid without query_text)"
    assert kb.search("own", None, 1, text="alpha").strategy == "sparse:bm25"
