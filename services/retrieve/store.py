"""PassageStore: collections, passages (with their vectors) and documents in SQLite.

SQLite is the durable source of truth: every write is one transaction, committed (WAL,
synchronous=FULL) before the RPC is acknowledged, and the vectors live in it too, so the FAISS
index can always be rebuilt to agree with it (docs/decisions/0003). The BM25 index over the
passages' text is in SQLite as well (``fulltext``), kept by triggers in the same transactions.

One connection writes, under a lock; every reading thread has its own connection, so a search
never waits behind a write's fsync (WAL readers see the last committed snapshot).
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ragline.errors import AlreadyExists, InvalidArgument, NotFound
from services.retrieve import fulltext

log = logging.getLogger(__name__)
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_ID = 256
MAX_DIMENSION = 8192
METRIC = "inner_product"
# Bound on host parameters per statement (SQLite builds before 3.32 allow 999).
_BATCH = 500
DEFAULT_PAGE = 100
MAX_PAGE = 1000

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
CREATE TABLE IF NOT EXISTS passage_fields (
    collection TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    rowid INTEGER NOT NULL,
    PRIMARY KEY (collection, key, value, rowid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS changes (
    collection TEXT NOT NULL,
    version INTEGER NOT NULL,
    rowid INTEGER NOT NULL,
    PRIMARY KEY (collection, version, rowid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO counters (name, value) VALUES ('writes', 0);
"""
# `counters.writes` is one counter for the whole database: a collection's `version` takes its
# next value on every change, so a follower can tell any two states apart (timestamps and
# counts cannot: two writes in one millisecond, or a replace that keeps the count).
# `passage_fields` indexes every metadata (key, value) for filters: a filter costs in proportion
# to the passages it matches, not to the collection. `changes` is the change log followers and
# snapshots catch up from: every rowid a write touched, under the write's version; it is
# complete for versions above the collection's `log_floor` (older entries are trimmed).
_COLUMNS = {
    "version": "INTEGER NOT NULL DEFAULT 0",
    "index_policy": "TEXT NOT NULL DEFAULT '{}'",
    "log_floor": "INTEGER NOT NULL DEFAULT 0",
    "log_size": "INTEGER NOT NULL DEFAULT 0",
    "search_mode": "TEXT NOT NULL DEFAULT ''",  # '': the server's default_search_mode
}
MAX_FILTER_CONDITIONS = 16
MAX_FILTER_VALUES = 1024


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
class StoredDocument:
    """A document as listed: its recorded version, when it was written, and the metadata of
    its first passage (what it was ingested with)."""

    document_id: str
    content_hash: str
    chunks: int
    updated_ms: int
    metadata: dict[str, str]


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
    metric: str = METRIC
    last_write_ms: int = 0  # 0 until the first write
    version: int = 0  # changes on every write (see `counters` above)
    policy: dict = field(default_factory=dict, compare=False)  # IndexPolicy fields, as created
    log_floor: int = 0  # the change log is complete for versions above this
    search_mode: str = ""  # the collection's default search mode; "": the server's


@dataclass(frozen=True)
class CollectionStats:
    info: CollectionInfo
    count: int  # passages
    documents: int  # documents with a recorded content hash


@dataclass
class WriteResult:
    upserted: int = 0
    removed: int = 0
    count: int = 0  # passages in the collection once this write committed
    version: int = 0  # the collection's version once this write committed
    added_rowids: list[int] = field(default_factory=list)
    added_vectors: list[np.ndarray] = field(default_factory=list)
    removed_rowids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Condition:
    """Metadata field ``key`` equals one of ``values`` (one value: plain equality)."""

    key: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class Changes:
    """What a follower at some version must apply to reach ``info.version``."""

    info: CollectionInfo
    touched: np.ndarray  # every rowid written since: remove these first
    ids: np.ndarray  # then add these (the touched rowids that still exist)
    vectors: np.ndarray


def check_filter(conditions: Sequence[Condition]) -> list[Condition]:
    if len(conditions) > MAX_FILTER_CONDITIONS:
        raise InvalidArgument(
            f"filter has {len(conditions)} conditions; at most {MAX_FILTER_CONDITIONS} are allowed"
        )
    for i, c in enumerate(conditions):
        if not c.key:
            raise InvalidArgument(f"filter condition {i} has an empty key: name a metadata field")
        if len(c.key) > MAX_ID:
            raise InvalidArgument(f"filter condition {i}: key is longer than {MAX_ID} characters")
        if not c.values:
            raise InvalidArgument(
                f"filter condition {i} on {c.key!r} has no value: set `equals` or a non-empty "
                "`any_of`"
            )
        if len(c.values) > MAX_FILTER_VALUES:
            raise InvalidArgument(
                f"filter condition {i} on {c.key!r} lists {len(c.values)} values; "
                f"at most {MAX_FILTER_VALUES} are allowed"
            )
    return list(conditions)


def matches(metadata: dict[str, str], conditions: Sequence[Condition]) -> bool:
    return all(metadata.get(c.key) in c.values for c in conditions)


_INFO = "name, dimension, metric, last_write_ms, version, index_policy, log_floor, search_mode"


def _info(row) -> CollectionInfo:
    return CollectionInfo(
        row[0], row[1], row[2], last_write_ms=row[3], version=row[4],
        policy=json.loads(row[5]), log_floor=row[6], search_mode=row[7],
    )  # fmt: skip


# A document's record and the metadata of its first passage (by the (collection, document_id)
# index: one short range per document).
_DOCUMENTS = (
    "SELECT d.document_id, d.content_hash, d.chunks, d.updated_ms, (SELECT p.metadata FROM"
    " passages p WHERE p.collection=d.collection AND p.document_id=d.document_id"
    " ORDER BY p.chunk LIMIT 1) FROM documents d"
)


def _document(row) -> StoredDocument:
    return StoredDocument(row[0], row[1], row[2], row[3], json.loads(row[4] or "{}"))


def check_collection_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidArgument(
            f"collection name {name!r} is invalid: use 1-64 letters, digits, '_' or '-'"
        )
    return name


def _check_id(value: str, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{what} is empty")
    if len(value) > MAX_ID:
        raise InvalidArgument(f"{what} is longer than {MAX_ID} characters")


def _check_passage(p: PassageIn, dimension: int, collection: str) -> np.ndarray:
    _check_id(p.id, "passage id")
    _check_id(p.document_id, f"document_id of passage {p.id!r}")
    if not isinstance(p.text, str) or not p.text.strip():
        raise InvalidArgument(f"passage {p.id!r} has no text")
    if not isinstance(p.chunk, int) or p.chunk < 0:
        raise InvalidArgument(f"passage {p.id!r}: chunk must be a non-negative integer")
    bad = [k for k, v in p.metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise InvalidArgument(f"passage {p.id!r}: metadata keys and values must be strings: {bad}")
    vec = np.asarray(p.vector)
    if vec.shape != (dimension,):
        got = vec.shape[-1] if vec.ndim == 1 else "x".join(map(str, vec.shape))
        raise InvalidArgument(
            f"passage {p.id!r} has a vector of dimension {got}; "
            f"collection {collection!r} expects {dimension}"
        )
    vec = np.ascontiguousarray(vec, dtype="<f4")
    if not np.isfinite(vec).all():
        raise InvalidArgument(f"vector of passage {p.id!r} contains NaN or infinite values")
    return vec


def check_new_collection(name: str, dimension: int) -> None:
    """What both stores check before creating a collection."""
    check_collection_name(name)
    if not 1 <= dimension <= MAX_DIMENSION:
        raise InvalidArgument(f"dimension must be between 1 and {MAX_DIMENSION}, got {dimension}")


def collection_exists(name: str, dimension: int, exist_ok: bool) -> AlreadyExists:
    return AlreadyExists(
        f"collection {name!r} already exists with dimension {dimension}"
        + ("; use another name or delete it first" if exist_ok else "; pass exist_ok to reuse it")
    )


def no_such_collection(name: str, existing: Iterable[str]) -> NotFound:
    return NotFound(
        f"collection {name!r} does not exist; create it with CreateCollection or "
        f"ingest documents first (existing: {', '.join(existing) or 'none'})"
    )


def checked_upsert(
    passages: Sequence[PassageIn], documents: Sequence[DocumentIn], dimension: int, collection: str
) -> list[tuple[PassageIn, np.ndarray]]:
    """An upsert's passages with their checked float32 vectors; refuses a bad one or an id
    sent twice before anything is written (both stores)."""
    for d in documents:
        _check_id(d.document_id, "document_id")
    seen: set[str] = set()
    rows = []
    for p in passages:
        vec = _check_passage(p, dimension, collection)
        if p.id in seen:
            raise InvalidArgument(f"passage id {p.id!r} appears twice in one upsert")
        seen.add(p.id)
        rows.append((p, vec))
    return rows


def _match_sql(collection: str, conditions: Sequence[Condition]) -> tuple[str, list]:
    """SQL selecting the rowids whose metadata satisfies every condition, and its arguments."""
    parts, args = [], []
    for c in conditions:
        marks = ",".join("?" * len(c.values))
        parts.append(
            f"SELECT rowid FROM passage_fields WHERE collection=? AND key=? AND value IN ({marks})"
        )
        args += [collection, c.key, *c.values]
    return " INTERSECT ".join(parts), args


def _batches(items: Sequence, size: int = _BATCH) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _connect(path: Path) -> sqlite3.Connection:
    # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE for writes).
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
    conn.execute("PRAGMA synchronous=FULL")
    return conn


class PassageStore:
    shared = False  # one writer; read-only replicas on the same machine follow its file
    backend = "sqlite"

    def __init__(self, data_dir: Path, log_keep: int = 2_000_000) -> None:
        self.log_keep = log_keep  # change-log entries kept per collection
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / "ragline.sqlite3"
        self._conn = _connect(self.path)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._lock = threading.Lock()
        with self._lock, self._transaction():
            # Statement by statement: executescript would commit the open transaction.
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    self._conn.execute(statement)
            columns = {r[1] for r in self._conn.execute("PRAGMA table_info(collections)")}
            for name, decl in _COLUMNS.items():  # databases written by earlier versions
                if name not in columns:
                    self._conn.execute(f"ALTER TABLE collections ADD COLUMN {name} {decl}")
            if "log_floor" not in columns:
                # The change log starts now; older fields are indexed from the JSON once.
                self._conn.execute("UPDATE collections SET log_floor=version")
                self._conn.execute(
                    "INSERT OR IGNORE INTO passage_fields (collection, key, value, rowid)"
                    " SELECT p.collection, j.key, j.value, p.rowid"
                    " FROM passages p, json_each(p.metadata) j"
                )
            # Databases from before the full-text index get it built here, from their passages.
            for name in fulltext.migrate(self._conn):
                log.info("collection %s: full-text index built from its passages", name)
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._conn.close()
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()

    def release_thread(self) -> None:
        """Close this thread's reading connection (a background build's thread, when done)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            self._local.conn = None
            with self._readers_lock:
                if conn in self._readers:
                    self._readers.remove(conn)
            conn.close()

    def wait_for_change(self, timeout: float) -> bool:
        """SQLite has no notifications: followers poll (wait ``timeout``, report nothing)."""
        threading.Event().wait(timeout)
        return False

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path)
            conn.execute("PRAGMA query_only=ON")
            with self._readers_lock:
                self._readers.append(conn)
            self._local.conn = conn
        return conn

    # --- collections -------------------------------------------------------------------------
    def create_collection(
        self,
        name: str,
        dimension: int,
        exist_ok: bool,
        policy: dict | None = None,
        search_mode: str = "",
    ) -> CollectionInfo:
        check_new_collection(name, dimension)
        with self._lock, self._transaction():
            row = self._conn.execute(
                "SELECT dimension FROM collections WHERE name=?", (name,)
            ).fetchone()
            if row is not None:
                if exist_ok and row[0] == dimension:
                    return self._collection(self._conn, name)
                raise collection_exists(name, row[0], exist_ok)
            version = self._next_version()
            self._conn.execute(
                "INSERT INTO collections (name, dimension, metric, created_ms, version,"
                " index_policy, log_floor, search_mode) VALUES (?,?,?,?,?,?,?,?)",
                (name, dimension, METRIC, _now_ms(), version, json.dumps(policy or {}), version,
                 search_mode),
            )  # fmt: skip
            fulltext.create(self._conn, name)
            return self._collection(self._conn, name)

    def list_collections(self) -> list[CollectionInfo]:
        rows = self._reader().execute(f"SELECT {_INFO} FROM collections ORDER BY name")
        return [_info(r) for r in rows]

    def list_collection_stats(self) -> list[CollectionStats]:
        """Every collection with its passage and document counts, read from one snapshot."""
        conn = self._reader()
        conn.execute("BEGIN")
        try:
            infos = [
                _info(r) for r in conn.execute(f"SELECT {_INFO} FROM collections ORDER BY name")
            ]
            counts = dict(
                conn.execute("SELECT collection, COUNT(*) FROM passages GROUP BY collection")
            )
            docs = dict(
                conn.execute("SELECT collection, COUNT(*) FROM documents GROUP BY collection")
            )
        finally:
            conn.execute("COMMIT")
        return [CollectionStats(i, counts.get(i.name, 0), docs.get(i.name, 0)) for i in infos]

    def collection(self, name: str) -> CollectionInfo:
        """Name, dimension and version (a primary-key lookup: cheap enough for every search)."""
        return self._collection(self._reader(), name)

    def stats(self, name: str) -> CollectionStats:
        """``collection`` plus passage and document counts, read from one snapshot."""
        conn = self._reader()
        conn.execute("BEGIN")
        try:
            info = self._collection(conn, name)
            count, docs = self._counts(conn, name)
        finally:
            conn.execute("COMMIT")
        return CollectionStats(info, count, docs)

    @staticmethod
    def _collection(conn: sqlite3.Connection, name: str) -> CollectionInfo:
        row = conn.execute(f"SELECT {_INFO} FROM collections WHERE name=?", (name,)).fetchone()
        if row is None:
            names = [r[0] for r in conn.execute("SELECT name FROM collections ORDER BY name")]
            raise no_such_collection(name, names)
        return _info(row)

    @staticmethod
    def _counts(conn: sqlite3.Connection, name: str) -> tuple[int, int]:
        count = conn.execute(
            "SELECT COUNT(*) FROM passages WHERE collection=?", (name,)
        ).fetchone()[0]
        docs = conn.execute(
            "SELECT COUNT(*) FROM documents WHERE collection=?", (name,)
        ).fetchone()[0]
        return count, docs

    def delete_collection(self, name: str) -> bool:
        with self._lock, self._transaction():
            fulltext.drop(self._conn, name)  # first: its triggers need not see each row go
            for table in ("passages", "documents", "passage_fields", "changes"):
                self._conn.execute(f"DELETE FROM {table} WHERE collection=?", (name,))
            cur = self._conn.execute("DELETE FROM collections WHERE name=?", (name,))
            return cur.rowcount > 0

    # --- writes -------------------------------------------------------------------------------
    def upsert(
        self, collection: str, passages: Sequence[PassageIn], documents: Sequence[DocumentIn]
    ) -> WriteResult:
        """Insert or replace ``passages`` by id; each named document keeps exactly the passages
        of this request and gets its content hash recorded. All or nothing."""
        result = WriteResult()
        with self._lock, self._transaction():
            info = self._collection(self._conn, collection)
            rows = checked_upsert(passages, documents, info.dimension, collection)
            seen = {p.id for p, _ in rows}
            for doc_id in {d.document_id for d in documents}:
                existing = self._conn.execute(
                    "SELECT rowid, id FROM passages WHERE collection=? AND document_id=?",
                    (collection, doc_id),
                ).fetchall()
                self._delete_rowids([r for r, pid in existing if pid not in seen], result)
            for p, vec in rows:
                values = (
                    p.document_id,
                    p.chunk,
                    p.text,
                    json.dumps(p.metadata, ensure_ascii=False),
                    vec.tobytes(),
                )
                old = self._conn.execute(
                    "SELECT rowid, metadata FROM passages WHERE collection=? AND id=?",
                    (collection, p.id),
                ).fetchone()
                if old is None:
                    rowid = self._conn.execute(
                        "INSERT INTO passages (document_id, chunk, text, metadata, vector,"
                        " collection, id) VALUES (?,?,?,?,?,?,?)",
                        (*values, collection, p.id),
                    ).lastrowid
                else:
                    self._drop_fields(collection, old[0], old[1])
                    # A replacement keeps its rowid, so a follower whose index still holds the
                    # old vector finds the new text instead of nothing. Its old vector leaves
                    # the index before the new one goes in; it is not counted as removed.
                    rowid = old[0]
                    self._conn.execute(
                        "UPDATE passages SET document_id=?, chunk=?, text=?, metadata=?, vector=?"
                        " WHERE rowid=?",
                        (*values, rowid),
                    )
                    result.removed_rowids.append(rowid)
                self._conn.executemany(
                    "INSERT OR IGNORE INTO passage_fields (collection, key, value, rowid)"
                    " VALUES (?,?,?,?)",
                    [(collection, k, v, rowid) for k, v in p.metadata.items()],
                )
                result.added_rowids.append(rowid)
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
            result.version = self._touch(collection, now)
            self._log(collection, result)
            result.count = self._counts(self._conn, collection)[0]
        return result

    def delete(
        self, collection: str, ids: Iterable[str], document_ids: Iterable[str]
    ) -> WriteResult:
        """Delete passages by id and every passage (and the record) of ``document_ids``."""
        ids, document_ids = list(ids), list(document_ids)
        result = WriteResult()
        with self._lock, self._transaction():
            result.version = self._collection(self._conn, collection).version
            for pid in ids:
                row = self._conn.execute(
                    "SELECT rowid FROM passages WHERE collection=? AND id=?", (collection, pid)
                ).fetchone()
                if row is not None:
                    self._delete_rowids([row[0]], result)
            forgotten = 0
            for doc_id in document_ids:
                rows = self._conn.execute(
                    "SELECT rowid FROM passages WHERE collection=? AND document_id=?",
                    (collection, doc_id),
                ).fetchall()
                self._delete_rowids([r[0] for r in rows], result)
                forgotten += self._conn.execute(
                    "DELETE FROM documents WHERE collection=? AND document_id=?",
                    (collection, doc_id),
                ).rowcount
            if result.removed or forgotten:
                result.version = self._touch(collection, _now_ms())
                self._log(collection, result)
            result.count = self._counts(self._conn, collection)[0]
        return result

    def _delete_rowids(self, rowids: list[int], result: WriteResult) -> None:
        for rowid in rowids:
            row = self._conn.execute(
                "DELETE FROM passages WHERE rowid=? RETURNING collection, metadata", (rowid,)
            ).fetchone()
            if row is not None:
                self._drop_fields(row[0], rowid, row[1])
            result.removed_rowids.append(rowid)
            result.removed += 1

    def _drop_fields(self, collection: str, rowid: int, metadata: str) -> None:
        self._conn.executemany(
            "DELETE FROM passage_fields WHERE collection=? AND key=? AND value=? AND rowid=?",
            [(collection, k, v, rowid) for k, v in json.loads(metadata).items()],
        )

    def _log(self, collection: str, result: WriteResult) -> None:
        """Record the rowids a write touched under its version; trim the log past its bound."""
        touched = set(result.removed_rowids) | set(result.added_rowids)
        self._conn.executemany(
            "INSERT OR IGNORE INTO changes (collection, version, rowid) VALUES (?,?,?)",
            [(collection, result.version, r) for r in touched],
        )
        size = self._conn.execute(
            "UPDATE collections SET log_size=log_size+? WHERE name=? RETURNING log_size",
            (len(touched), collection),
        ).fetchone()[0]
        if size > self.log_keep:
            # Keep the newest half: followers further behind than that rebuild instead.
            cut = self._conn.execute(
                "SELECT version FROM changes WHERE collection=? ORDER BY version DESC"
                " LIMIT 1 OFFSET ?",
                (collection, self.log_keep // 2),
            ).fetchone()
            if cut is not None:
                self._conn.execute(
                    "DELETE FROM changes WHERE collection=? AND version<=?", (collection, cut[0])
                )
                left = self._conn.execute(
                    "SELECT COUNT(*) FROM changes WHERE collection=?", (collection,)
                ).fetchone()[0]
                self._conn.execute(
                    "UPDATE collections SET log_floor=MAX(log_floor, ?), log_size=? WHERE name=?",
                    (cut[0], left, collection),
                )

    def _next_version(self) -> int:
        self._conn.execute("UPDATE counters SET value=value+1 WHERE name='writes'")
        return self._conn.execute("SELECT value FROM counters WHERE name='writes'").fetchone()[0]

    def _touch(self, collection: str, now: int) -> int:
        version = self._next_version()
        # Strictly increasing, even for two writes in one millisecond or a clock stepped back:
        # the API edge keys its answer cache on it (Stats.last_write_unix_ms).
        self._conn.execute(
            "UPDATE collections SET last_write_ms=MAX(?, last_write_ms + 1), version=?"
            " WHERE name=?",
            (now, version, collection),
        )
        return version

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction; the caller holds ``_lock``. Committed (and fsynced) on exit."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        try:
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:  # e.g. disk full: leave the connection usable
                self._conn.execute("ROLLBACK")
            raise

    # --- reads --------------------------------------------------------------------------------
    def snapshot(self, collection: str) -> tuple[CollectionInfo, np.ndarray, np.ndarray]:
        """The collection's info with all its rowids and vectors, read from one snapshot (so the
        version describes exactly these vectors, whatever a writer does meanwhile)."""
        conn = self._reader()
        conn.execute("BEGIN")
        try:
            info = self._collection(conn, collection)
            rows = conn.execute(
                "SELECT rowid, vector FROM passages WHERE collection=? ORDER BY rowid",
                (collection,),
            ).fetchall()
        finally:
            conn.execute("COMMIT")
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4")
        return info, ids, vecs.reshape(-1, info.dimension).astype(np.float32)

    def load_vectors(
        self, collection: str, dimension: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(rowids int64[n], vectors float32[n, dimension])`` of every passage."""
        info, ids, vecs = self.snapshot(collection)
        if dimension is not None and dimension != info.dimension:
            raise InvalidArgument(
                f"collection {collection!r} has dimension {info.dimension}, not {dimension}"
            )
        return ids, vecs

    def get_passages(self, rowids: Sequence[int]) -> dict[int, StoredPassage]:
        """Passages by rowid; rowids deleted since they were looked up are simply absent."""
        conn = self._reader()
        out: dict[int, StoredPassage] = {}
        for batch in _batches(list(rowids)):
            marks = ",".join("?" * len(batch))
            rows = conn.execute(
                "SELECT rowid, id, document_id, chunk, text, metadata FROM passages"
                f" WHERE rowid IN ({marks})",
                list(batch),
            )
            for r in rows:
                out[r[0]] = StoredPassage(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]))
        return out

    def get_documents(self, collection: str, document_ids: Sequence[str]) -> list[DocumentIn]:
        """The recorded versions of those of ``document_ids`` that exist."""
        conn = self._reader()
        self._collection(conn, collection)
        out: list[DocumentIn] = []
        for batch in _batches(list(dict.fromkeys(document_ids))):
            marks = ",".join("?" * len(batch))
            rows = conn.execute(
                "SELECT document_id, content_hash, chunks FROM documents"
                f" WHERE collection=? AND document_id IN ({marks})",
                [collection, *batch],
            )
            out.extend(DocumentIn(*r) for r in rows)
        return out

    def list_documents(
        self, collection: str, limit: int = 0, after: str = ""
    ) -> tuple[list[StoredDocument], str]:
        """Up to ``limit`` documents (0: a default page) in ``document_id`` order after
        ``after``, and the ``after`` of the next page ("" on the last one)."""
        if not 0 <= limit <= MAX_PAGE:
            raise InvalidArgument(f"limit must be between 1 and {MAX_PAGE}, got {limit}")
        limit = limit or DEFAULT_PAGE
        conn = self._reader()
        conn.execute("BEGIN")
        try:
            self._collection(conn, collection)
            rows = conn.execute(
                f"{_DOCUMENTS} WHERE d.collection=? AND d.document_id>? ORDER BY d.document_id"
                " LIMIT ?",
                (collection, after, limit + 1),
            ).fetchall()
        finally:
            conn.execute("COMMIT")
        page = [_document(r) for r in rows[:limit]]
        return page, page[-1].document_id if len(rows) > limit else ""

    def describe_documents(
        self, collection: str, document_ids: Sequence[str]
    ) -> list[StoredDocument]:
        """Those of ``document_ids`` that exist, as ``list_documents`` describes them."""
        conn = self._reader()
        self._collection(conn, collection)
        out: list[StoredDocument] = []
        for batch in _batches(list(dict.fromkeys(document_ids))):
            marks = ",".join("?" * len(batch))
            rows = conn.execute(
                f"{_DOCUMENTS} WHERE d.collection=? AND d.document_id IN ({marks})",
                [collection, *batch],
            )
            out.extend(_document(r) for r in rows)
        return out

    def match(self, collection: str, conditions: Sequence[Condition]) -> np.ndarray:
        """Sorted rowids of the passages whose metadata satisfies every condition."""
        rows = self._reader().execute(*_match_sql(collection, conditions)).fetchall()
        return np.sort(np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)))

    def bm25(
        self, collection: str, text: str, limit: int, conditions: Sequence[Condition] = ()
    ) -> tuple[int, list[tuple[int, float]]]:
        """The collection's version and the ``limit`` passages that best match ``text`` by BM25
        as ``(rowid, score)``, best first, among those satisfying every condition; read from
        one snapshot. Any text is safe: it is never parsed as FTS5 syntax."""
        expression = fulltext.match_expression(text)
        conn = self._reader()
        conn.execute("BEGIN")
        try:
            info = self._collection(conn, collection)
            if expression is None:
                return info.version, []
            allowed = _match_sql(collection, conditions) if conditions else None
            return info.version, fulltext.search(conn, collection, expression, limit, allowed)
        finally:
            conn.execute("COMMIT")

    def check_fulltext(self, collection: str) -> None:
        """FTS5's integrity check of the collection's text index against its passages (tests,
        operators); ``sqlite3.DatabaseError`` when they disagree."""
        with self._lock:
            self._collection(self._conn, collection)
            fulltext.check(self._conn, collection)

    def vectors(self, rowids: Sequence[int], dimension: int) -> tuple[np.ndarray, np.ndarray]:
        """``(rowids, vectors)`` of those of ``rowids`` that exist."""
        conn = self._reader()
        ids: list[int] = []
        blobs: list[bytes] = []
        for batch in _batches(list(rowids)):
            marks = ",".join("?" * len(batch))
            for r in conn.execute(
                f"SELECT rowid, vector FROM passages WHERE rowid IN ({marks})", list(batch)
            ):
                ids.append(r[0])
                blobs.append(r[1])
        vecs = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(-1, dimension)
        return np.asarray(ids, dtype=np.int64), vecs.astype(np.float32)

    def changes_since(self, collection: str, version: int) -> Changes | None:
        """What changed after ``version``, read from one snapshot; None when the change log no
        longer reaches back that far (the caller rebuilds from ``snapshot`` instead)."""
        conn = self._reader()
        conn.execute("BEGIN")
        try:
            info = self._collection(conn, collection)
            if version < info.log_floor or version > info.version:
                return None
            rows = conn.execute(
                "SELECT DISTINCT rowid FROM changes WHERE collection=? AND version>?",
                (collection, version),
            ).fetchall()
            touched = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            ids, vecs = self.vectors(touched.tolist(), info.dimension)
        finally:
            conn.execute("COMMIT")
        return Changes(info, touched, ids, vecs)
