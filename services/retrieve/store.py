"""PassageStore: collections, passages (with their vectors) and documents in SQLite.

SQLite is the durable source of truth: every write is one transaction, committed (WAL,
synchronous=FULL) before the RPC is acknowledged, and the vectors live in it too, so the FAISS
index can always be rebuilt to agree with it (docs/decisions/0003).
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ragline.errors import AlreadyExists, InvalidArgument, NotFound

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_ID = 256

SCHEMA = """
CREATE TABLE IF NOT EXISTS collections (
    name TEXT PRIMARY KEY,
    dimension INTEGER NOT NULL,
    metric TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    last_write_ms INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS passages (
    rowid INTEGER PRIMARY KEY AUTOINCREMENT,
    collection TEXT NOT NULL,
    id TEXT NOT NULL,
    document_id TEXT NOT NULL,
    chunk INTEGER NOT NULL,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    vector BLOB NOT NULL,
    UNIQUE (collection, id)
);
CREATE INDEX IF NOT EXISTS passages_by_document ON passages (collection, document_id);
CREATE TABLE IF NOT EXISTS documents (
    collection TEXT NOT NULL,
    document_id TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    chunks INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (collection, document_id)
);
"""


@dataclass(frozen=True)
class PassageIn:
    id: str
    document_id: str
    chunk: int
    text: str
    metadata: dict[str, str]
    vector: np.ndarray


@dataclass(frozen=True)
class DocumentIn:
    document_id: str
    content_hash: str
    chunks: int


@dataclass(frozen=True)
class StoredPassage:
    rowid: int
    id: str
    document_id: str
    chunk: int
    text: str
    metadata: dict[str, str]


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    dimension: int
    metric: str
    count: int = 0
    documents: int = 0
    last_write_ms: int = 0


@dataclass
class WriteResult:
    upserted: int = 0
    removed: int = 0
    added_rowids: list[int] = field(default_factory=list)
    added_vectors: list[np.ndarray] = field(default_factory=list)
    removed_rowids: list[int] = field(default_factory=list)


def check_collection_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidArgument(
            f"collection name {name!r} is invalid: use 1-64 letters, digits, '_' or '-'"
        )
    return name


def _check_id(value: str, what: str) -> None:
    if not value:
        raise InvalidArgument(f"{what} is empty")
    if len(value) > MAX_ID:
        raise InvalidArgument(f"{what} is longer than {MAX_ID} characters")


def _now_ms() -> int:
    return int(time.time() * 1000)


class PassageStore:
    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / "ragline.sqlite3"
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # --- collections -------------------------------------------------------------------------
    def create_collection(self, name: str, dimension: int, exist_ok: bool) -> CollectionInfo:
        check_collection_name(name)
        if not 1 <= dimension <= 8192:
            raise InvalidArgument(f"dimension must be between 1 and 8192, got {dimension}")
        with self._lock:
            row = self._conn.execute(
                "SELECT dimension FROM collections WHERE name=?", (name,)
            ).fetchone()
            if row is not None:
                if exist_ok and row[0] == dimension:
                    return CollectionInfo(name, dimension, "inner_product")
                raise AlreadyExists(
                    f"collection {name!r} already exists with dimension {row[0]}"
                    + ("" if exist_ok else "; pass exist_ok to reuse it")
                )
            self._conn.execute(
                "INSERT INTO collections (name, dimension, metric, created_ms) VALUES (?,?,?,?)",
                (name, dimension, "inner_product", _now_ms()),
            )
        return CollectionInfo(name, dimension, "inner_product")

    def list_collections(self) -> list[CollectionInfo]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT name, dimension, metric, last_write_ms FROM collections ORDER BY name"
            ).fetchall()
        return [CollectionInfo(n, d, m, last_write_ms=w) for n, d, m, w in rows]

    def collection(self, name: str) -> CollectionInfo:
        with self._lock:
            row = self._conn.execute(
                "SELECT name, dimension, metric, last_write_ms FROM collections WHERE name=?",
                (name,),
            ).fetchone()
            if row is None:
                names = [r[0] for r in self._conn.execute("SELECT name FROM collections")]
                raise NotFound(
                    f"collection {name!r} does not exist; create it with CreateCollection or "
                    f"ingest documents first (existing: {', '.join(names) or 'none'})"
                )
            count = self._conn.execute(
                "SELECT COUNT(*) FROM passages WHERE collection=?", (name,)
            ).fetchone()[0]
            docs = self._conn.execute(
                "SELECT COUNT(*) FROM documents WHERE collection=?", (name,)
            ).fetchone()[0]
        return CollectionInfo(row[0], row[1], row[2], count, docs, row[3])

    def delete_collection(self, name: str) -> bool:
        with self._lock, self._transaction():
            for table in ("passages", "documents"):
                self._conn.execute(f"DELETE FROM {table} WHERE collection=?", (name,))
            cur = self._conn.execute("DELETE FROM collections WHERE name=?", (name,))
        return cur.rowcount > 0

    # --- writes -------------------------------------------------------------------------------
    def upsert(
        self, collection: str, passages: Sequence[PassageIn], documents: Sequence[DocumentIn]
    ) -> WriteResult:
        info = self.collection(collection)
        seen: set[str] = set()
        for p in passages:
            _check_id(p.id, "passage id")
            _check_id(p.document_id, f"document_id of passage {p.id!r}")
            if p.id in seen:
                raise InvalidArgument(f"passage id {p.id!r} appears twice in one upsert")
            seen.add(p.id)
            if not p.text.strip():
                raise InvalidArgument(f"passage {p.id!r} has no text")
            if p.vector.shape != (info.dimension,):
                raise InvalidArgument(
                    f"passage {p.id!r} has a vector of dimension {p.vector.shape[-1]}; "
                    f"collection {collection!r} expects {info.dimension}"
                )
        for d in documents:
            _check_id(d.document_id, "document_id")
        result = WriteResult()
        with self._lock, self._transaction():
            named = {d.document_id for d in documents}
            # A named document keeps exactly the passages of this request.
            for doc_id in named:
                rows = self._conn.execute(
                    "SELECT rowid, id FROM passages WHERE collection=? AND document_id=?",
                    (collection, doc_id),
                ).fetchall()
                stale = [rowid for rowid, pid in rows if pid not in seen]
                self._delete_rowids(stale, result)
            for p in passages:
                old = self._conn.execute(
                    "SELECT rowid FROM passages WHERE collection=? AND id=?", (collection, p.id)
                ).fetchone()
                if old is not None:
                    self._delete_rowids([old[0]], result)
                    result.removed -= 1  # a replacement is not a removal
                vec = np.ascontiguousarray(p.vector, dtype="<f4")
                cur = self._conn.execute(
                    "INSERT INTO passages (collection, id, document_id, chunk, text, metadata,"
                    " vector) VALUES (?,?,?,?,?,?,?)",
                    (
                        collection,
                        p.id,
                        p.document_id,
                        p.chunk,
                        p.text,
                        json.dumps(p.metadata, ensure_ascii=False),
                        vec.tobytes(),
                    ),
                )
                result.added_rowids.append(cur.lastrowid)
                result.added_vectors.append(vec)
                result.upserted += 1
            now = _now_ms()
            for d in documents:
                self._conn.execute(
                    "INSERT INTO documents (collection, document_id, content_hash, chunks,"
                    " updated_ms) VALUES (?,?,?,?,?) ON CONFLICT (collection, document_id) DO"
                    " UPDATE SET content_hash=excluded.content_hash, chunks=excluded.chunks,"
                    " updated_ms=excluded.updated_ms",
                    (collection, d.document_id, d.content_hash, d.chunks, now),
                )
            self._touch(collection, now)
        return result

    def delete(
        self, collection: str, ids: Iterable[str], document_ids: Iterable[str]
    ) -> WriteResult:
        self.collection(collection)
        ids, document_ids = list(ids), list(document_ids)
        result = WriteResult()
        with self._lock, self._transaction():
            for pid in ids:
                row = self._conn.execute(
                    "SELECT rowid FROM passages WHERE collection=? AND id=?", (collection, pid)
                ).fetchone()
                if row is not None:
                    self._delete_rowids([row[0]], result)
            for doc_id in document_ids:
                rows = self._conn.execute(
                    "SELECT rowid FROM passages WHERE collection=? AND document_id=?",
                    (collection, doc_id),
                ).fetchall()
                self._delete_rowids([r[0] for r in rows], result)
                self._conn.execute(
                    "DELETE FROM documents WHERE collection=? AND document_id=?",
                    (collection, doc_id),
                )
            self._touch(collection, _now_ms())
        return result

    def _delete_rowids(self, rowids: list[int], result: WriteResult) -> None:
        for rowid in rowids:
            self._conn.execute("DELETE FROM passages WHERE rowid=?", (rowid,))
            result.removed_rowids.append(rowid)
            result.removed += 1

    def _touch(self, collection: str, now: int) -> None:
        self._conn.execute("UPDATE collections SET last_write_ms=? WHERE name=?", (now, collection))

    def _transaction(self):
        conn = self._conn

        class _Tx:
            def __enter__(self):
                conn.execute("BEGIN IMMEDIATE")

            def __exit__(self, exc_type, exc, tb):
                conn.execute("ROLLBACK" if exc_type else "COMMIT")
                return False

        return _Tx()

    # --- reads --------------------------------------------------------------------------------
    def load_vectors(self, collection: str, dimension: int) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT rowid, vector FROM passages WHERE collection=? ORDER BY rowid",
                (collection,),
            ).fetchall()
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(-1, dimension)
        return ids, vecs.astype(np.float32)

    def get_passages(self, rowids: Sequence[int]) -> dict[int, StoredPassage]:
        if not rowids:
            return {}
        marks = ",".join("?" * len(rowids))
        with self._lock:
            rows = self._conn.execute(
                "SELECT rowid, id, document_id, chunk, text, metadata FROM passages"
                f" WHERE rowid IN ({marks})",
                list(rowids),
            ).fetchall()
        return {r[0]: StoredPassage(r[0], r[1], r[2], r[3], r[4], json.loads(r[5])) for r in rows}

    def get_documents(self, collection: str, document_ids: Sequence[str]) -> list[DocumentIn]:
        self.collection(collection)
        if not document_ids:
            return []
        marks = ",".join("?" * len(document_ids))
        with self._lock:
            rows = self._conn.execute(
                "SELECT document_id, content_hash, chunks FROM documents"
                f" WHERE collection=? AND document_id IN ({marks})",
                [collection, *document_ids],
            ).fetchall()
        return [DocumentIn(*r) for r in rows]
