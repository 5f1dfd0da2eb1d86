"""PostgresStore: the passage store in PostgreSQL, shared by every retrieve replica.

The same contract as the SQLite ``PassageStore`` (collections, passages with their vectors,
document hashes, the metadata field index, the change log, full-text search), with one
difference that is the point of it: any number of retrieve replicas, on any node, share one
database, and every one of them may write. Each keeps its own FAISS index and follows the change
log (docs/decisions/0012).

- **Durable before acknowledged**: a write is one transaction, committed (PostgreSQL's default
  ``synchronous_commit=on``: the commit record is flushed to its WAL) before the RPC answers.
- **One write at a time, cluster-wide**: a write transaction first takes a transaction-scoped
  advisory lock, then the next value of the one ``counters.writes`` row. So versions commit in
  the order they were taken: a follower that sees version v has seen every version below it,
  and reading the change log after its index's version never skips a write.
- **Followers are woken**: every write sends ``NOTIFY ragline_changes`` (delivered at commit);
  ``wait_for_change`` listens, with the poll interval as the fallback.
- **Full-text search** is PostgreSQL's: a ``tsvector`` column (the ``simple`` configuration
  over the text with case and accents folded in Python, ``fulltext.fold``, as the SQLite
  index's tokenizer folds them, whatever the database's locale) under a GIN index, the
  query the user's words as phrases ORed, ranked by ``ts_rank_cd``. That rank is not BM25: its
  scale differs (hybrid search fuses ranks, so it is unaffected; a ``bm25_threshold`` tuned on
  SQLite is not portable).
- **Connections**: one writer under a lock, one reader per thread, one listener. A connection
  PostgreSQL dropped (restart, failover) is reopened at the next call; the call that found it
  broken answers UNAVAILABLE, so the edge retries it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import psycopg
from psycopg import sql

from ragline.errors import InvalidArgument, Unavailable
from services.retrieve import fulltext
from services.retrieve import store as sqlite_store
from services.retrieve.store import (
    _DOCUMENTS,
    _INFO,
    DEFAULT_PAGE,
    MAX_PAGE,
    METRIC,
    Changes,
    CollectionInfo,
    CollectionStats,
    Condition,
    DocumentIn,
    PassageIn,
    StoredDocument,
    StoredPassage,
    WriteResult,
    _document,
    _info,
    check_new_collection,
    checked_upsert,
    collection_exists,
    no_such_collection,
)

log = logging.getLogger(__name__)
CHANNEL = "ragline_changes"
_WRITE_LOCK = 0x7261676C  # "ragl": the advisory lock every write transaction takes first
_PASSWORD = re.compile(r"(password\s*=\s*)('[^']*'|\S+)")

SCHEMA = """
CREATE TABLE IF NOT EXISTS collections (
    name TEXT PRIMARY KEY,
    dimension INTEGER NOT NULL,
    metric TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    last_write_ms BIGINT NOT NULL DEFAULT 0,
    version BIGINT NOT NULL DEFAULT 0,
    index_policy TEXT NOT NULL DEFAULT '{}',
    log_floor BIGINT NOT NULL DEFAULT 0,
    log_size BIGINT NOT NULL DEFAULT 0,
    search_mode TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS passages (
    rowid BIGSERIAL PRIMARY KEY,
    collection TEXT NOT NULL,
    id TEXT NOT NULL,
    document_id TEXT NOT NULL,
    chunk INTEGER NOT NULL,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    vector BYTEA NOT NULL,
    id_hash BIGINT NOT NULL,
    tsv TSVECTOR NOT NULL,  -- of fulltext.fold(text): case and accents folded, as SQLite's
    UNIQUE (collection, id)
);
CREATE INDEX IF NOT EXISTS passages_by_document ON passages (collection, document_id);
CREATE INDEX IF NOT EXISTS passages_fulltext ON passages USING GIN (tsv);
CREATE TABLE IF NOT EXISTS documents (
    collection TEXT NOT NULL,
    document_id TEXT COLLATE "C" NOT NULL,
    content_hash TEXT NOT NULL,
    chunks INTEGER NOT NULL,
    updated_ms BIGINT NOT NULL,
    PRIMARY KEY (collection, document_id)
);
CREATE TABLE IF NOT EXISTS passage_fields (
    collection TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    rowid BIGINT NOT NULL,
    PRIMARY KEY (collection, key, value, rowid)
);
CREATE TABLE IF NOT EXISTS changes (
    collection TEXT NOT NULL,
    version BIGINT NOT NULL,
    rowid BIGINT NOT NULL,
    PRIMARY KEY (collection, version, rowid)
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO counters (name, value) VALUES ('writes', 0) ON CONFLICT (name) DO NOTHING
"""


def id_hash(passage_id: str) -> int:
    """The passage's shard key: 63 bits of BLAKE2b of its id (stable across processes)."""
    digest = hashlib.blake2b(passage_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def safe_dsn(dsn: str) -> str:
    """The DSN with any password blanked, for logs and errors (URL or key=value form)."""
    if "://" in dsn:
        url = urlsplit(dsn)
        if url.password is not None:
            host = url.netloc.rpartition("@")[2]
            url = url._replace(netloc=f"{url.username or ''}:***@{host}")
        dsn = urlunsplit(url)
    return _PASSWORD.sub(lambda m: m.group(1) + "***", dsn)


def _unavailable(dsn: str, exc: Exception) -> Unavailable:
    return Unavailable(
        f"PostgreSQL at {safe_dsn(dsn)} is unreachable ({_first_line(exc)}); retry shortly"
    )


# A replica cut off mid-write must not hold the cluster-wide write lock for TCP's two hours:
# keepalives and a user timeout find a dead peer in about a minute, and PostgreSQL ends a
# transaction left idle (its lock with it); no wait for the lock lasts forever either.
_LIVENESS = {
    "keepalives": 1, "keepalives_idle": 20, "keepalives_interval": 5, "keepalives_count": 4,
    "tcp_user_timeout": 60_000,
    "options": "-c idle_in_transaction_session_timeout=60000 -c lock_timeout=60000",
}  # fmt: skip


@contextmanager
def _errors(dsn: str, conn: psycopg.Connection, rollback: bool = True) -> Iterator[None]:
    """PostgreSQL's failures as ragline's: a lost connection is UNAVAILABLE (retry), a value
    PostgreSQL cannot hold is INVALID_ARGUMENT; any failure rolls the transaction back."""
    try:
        yield
    except BaseException as exc:
        if rollback and not (conn.closed or conn.broken):
            try:
                conn.execute("ROLLBACK")
            except psycopg.Error:
                pass
        if isinstance(exc, psycopg.errors.ProgramLimitExceeded):
            raise InvalidArgument(
                f"a value is too large for the postgres store ({_first_line(exc)}): keep "
                "metadata values under 2,000 bytes and passages under 1 MB"
            ) from None
        if isinstance(exc, psycopg.DataError):
            raise InvalidArgument(
                f"PostgreSQL cannot store this value: {_first_line(exc)}"
            ) from None
        if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
            raise _unavailable(dsn, exc) from None
        raise


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _match_sql(collection: str, conditions: Sequence[Condition]) -> tuple[str, list]:
    """SQL selecting the rowids whose metadata satisfies every condition, and its arguments."""
    parts, args = [], []
    for c in conditions:
        parts.append(
            "SELECT rowid FROM passage_fields WHERE collection=%s AND key=%s AND value = ANY(%s)"
        )
        args += [collection, c.key, list(c.values)]
    return " INTERSECT ".join(parts), args


class PostgresStore:
    """``PassageStore``'s contract on PostgreSQL (see the module docstring)."""

    shared = True  # every replica writes and follows the change log
    backend = "postgres"

    def __init__(
        self,
        dsn: str,
        log_keep: int = 2_000_000,
        connect_timeout_s: int = 10,
        start_wait_s: float = 60,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        """``shard``: (i, n): this replica's index holds only the passages whose ``id_hash``
        is i modulo n (searches, vector reads and the change log it applies), while writes,
        documents and counts are the whole collection's."""
        self.dsn = dsn
        self.shard, self.shards = shard
        # An SQL condition on passages (alias-free) and its arguments; empty when unsharded.
        self._in_shard = "" if self.shards == 1 else " AND mod(id_hash, %s) = %s"
        self._shard_args = [] if self.shards == 1 else [self.shards, self.shard]
        self.path = safe_dsn(dsn)  # what logs name as "where the store is"
        self.log_keep = log_keep
        self.connect_timeout_s = connect_timeout_s
        self._lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[psycopg.Connection] = []
        self._readers_lock = threading.Lock()
        self._listener: psycopg.Connection | None = None
        self._closed = False
        # A replica may start before its database (compose, Kubernetes): wait a while for it.
        deadline = time.monotonic() + start_wait_s
        while True:
            try:
                self._conn = self._connect()
                break
            except Unavailable as exc:
                if time.monotonic() >= deadline:
                    raise
                log.warning("%s; waiting", exc)
                time.sleep(1)
        with self._lock, self._transaction() as conn:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)

    def _connect(self) -> psycopg.Connection:
        if self._closed:
            raise Unavailable("the retrieve store is closed (the replica is shutting down)")
        try:
            return psycopg.connect(
                self.dsn, autocommit=True, connect_timeout=self.connect_timeout_s,
                application_name="ragline-retrieve", **_LIVENESS,
            )  # fmt: skip
        except psycopg.OperationalError as exc:
            raise _unavailable(self.dsn, exc) from None

    def close(self) -> None:
        self._closed = True
        with self._lock:
            self._conn.close()
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
            listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()

    def release_thread(self) -> None:
        """Close this thread's reading connection (a background build's thread, when done)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            self._local.conn = None
            with self._readers_lock:
                if conn in self._readers:
                    self._readers.remove(conn)
            conn.close()

    # --- connections ---------------------------------------------------------------------------
    def _writer(self, fresh: bool = False) -> psycopg.Connection:
        """The writing connection (caller holds ``_lock``), reopened if PostgreSQL dropped it."""
        if fresh or self._conn.closed or self._conn.broken:
            self._conn.close()
            self._conn = self._connect()
        return self._conn

    def _reader(self, fresh: bool = False) -> psycopg.Connection:
        conn = getattr(self._local, "conn", None)
        if fresh or conn is None or conn.closed or conn.broken:
            self.release_thread()
            conn = self._connect()
            with self._readers_lock:
                self._readers.append(conn)
            self._local.conn = conn
        return conn

    def _start(self, connection, begin: str, *args) -> psycopg.Connection:
        """``begin`` on a connection, retried once on a new one when the connection turns out
        dead (PostgreSQL restarted since it was last used): nothing had run on it yet."""
        conn = connection()
        for attempt in (0, 1):
            try:
                conn.execute(begin)
                for statement, values in args:
                    conn.execute(statement, values)
                return conn
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                if attempt or not (conn.closed or conn.broken):
                    raise _unavailable(self.dsn, exc) from None
                conn = connection(fresh=True)
        raise AssertionError("unreachable")

    @contextmanager
    def _read(self) -> Iterator[psycopg.Connection]:
        """A read transaction on this thread's connection (one snapshot: a version and the rows
        it describes agree)."""
        conn = self._start(self._reader, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        with _errors(self.dsn, conn):
            yield conn
        with _errors(self.dsn, conn):
            conn.execute("COMMIT")

    def _fetch(self, query: str, args: Sequence = (), binary: bool = False) -> list[tuple]:
        """One statement's rows, outside an explicit transaction (a statement is its own
        snapshot): one round trip instead of three, for the reads on every search's path.
        Retried once on a new connection when this one was dead (a read has no effects)."""
        for attempt in (0, 1):
            conn = self._reader(fresh=attempt == 1)
            try:
                with _errors(self.dsn, conn, rollback=False):
                    return conn.cursor(binary=binary).execute(query, args).fetchall()
            except Unavailable:
                if attempt or not (conn.closed or conn.broken):
                    raise
        raise AssertionError("unreachable")

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection]:
        """One write transaction, after every other replica's (the caller holds ``_lock``);
        committed, and flushed by PostgreSQL, on exit."""
        conn = self._start(self._writer, "BEGIN",
                           ("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK,)))  # fmt: skip
        with _errors(self.dsn, conn):
            yield conn
        with _errors(self.dsn, conn):
            conn.execute("COMMIT")

    def wait_for_change(self, timeout: float) -> bool:
        """Block until a write commits anywhere (True) or ``timeout`` passes (False). A broken
        listener is reopened at the next call; until then this just waits."""
        listener = self._listener
        try:
            if listener is None or listener.closed or listener.broken:
                if listener is not None:
                    listener.close()
                listener = self._connect()
                listener.execute(f"LISTEN {CHANNEL}")
                with self._readers_lock:
                    self._listener = listener
            woke = False
            for _ in listener.notifies(timeout=timeout, stop_after=1):
                woke = True
            return woke
        except Exception as exc:  # noqa: BLE001 (following must go on; the poll is the fallback)
            if not self._closed:
                log.warning("listening for changes failed (%s); polling", exc)
            with self._readers_lock:
                self._listener = None
            if listener is not None:
                listener.close()
            threading.Event().wait(timeout)
            return False

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
        with self._lock, self._transaction() as conn:
            row = conn.execute(
                "SELECT dimension FROM collections WHERE name=%s", (name,)
            ).fetchone()
            if row is not None:
                if exist_ok and row[0] == dimension:
                    return self._collection(conn, name)
                raise collection_exists(name, row[0], exist_ok)
            version = self._next_version(conn)
            conn.execute(
                "INSERT INTO collections (name, dimension, metric, created_ms, version,"
                " index_policy, log_floor, search_mode) VALUES (%s,%s,%s,%s,%s,%s,%s,%s)",
                (name, dimension, METRIC, sqlite_store._now_ms(), version,
                 json.dumps(policy or {}), version, search_mode),
            )  # fmt: skip
            self._notify(conn, name)
            return self._collection(conn, name)

    def list_collections(self) -> list[CollectionInfo]:
        with self._read() as conn:
            rows = conn.execute(f"SELECT {_INFO} FROM collections ORDER BY name").fetchall()
        return [_info(r) for r in rows]

    def list_collection_stats(self) -> list[CollectionStats]:
        with self._read() as conn:
            infos = [
                _info(r)
                for r in conn.execute(f"SELECT {_INFO} FROM collections ORDER BY name").fetchall()
            ]
            counts = dict(
                conn.execute(
                    "SELECT collection, COUNT(*) FROM passages GROUP BY collection"
                ).fetchall()
            )
            docs = dict(
                conn.execute(
                    "SELECT collection, COUNT(*) FROM documents GROUP BY collection"
                ).fetchall()
            )
        return [CollectionStats(i, counts.get(i.name, 0), docs.get(i.name, 0)) for i in infos]

    def collection(self, name: str) -> CollectionInfo:
        rows = self._fetch(f"SELECT {_INFO} FROM collections WHERE name=%s", (name,))
        if rows:
            return _info(rows[0])
        with self._read() as conn:
            return self._collection(conn, name)  # NotFound, naming the existing ones

    def stats(self, name: str) -> CollectionStats:
        with self._read() as conn:
            info = self._collection(conn, name)
            count, docs = self._counts(conn, name)
        return CollectionStats(info, count, docs)

    @staticmethod
    def _collection(conn: psycopg.Connection, name: str) -> CollectionInfo:
        row = conn.execute(f"SELECT {_INFO} FROM collections WHERE name=%s", (name,)).fetchone()
        if row is None:
            names = [r[0] for r in conn.execute("SELECT name FROM collections ORDER BY name")]
            raise no_such_collection(name, names)
        return _info(row)

    @staticmethod
    def _counts(conn: psycopg.Connection, name: str) -> tuple[int, int]:
        count = conn.execute(
            "SELECT COUNT(*) FROM passages WHERE collection=%s", (name,)
        ).fetchone()[0]
        docs = conn.execute(
            "SELECT COUNT(*) FROM documents WHERE collection=%s", (name,)
        ).fetchone()[0]
        return count, docs

    def delete_collection(self, name: str) -> bool:
        with self._lock, self._transaction() as conn:
            for table in ("passages", "documents", "passage_fields", "changes"):
                conn.execute(
                    sql.SQL("DELETE FROM {} WHERE collection=%s").format(sql.Identifier(table)),
                    (name,),
                )
            deleted = conn.execute("DELETE FROM collections WHERE name=%s", (name,)).rowcount > 0
            self._notify(conn, name)
            return deleted

    # --- writes -------------------------------------------------------------------------------
    def upsert(
        self, collection: str, passages: Sequence[PassageIn], documents: Sequence[DocumentIn]
    ) -> WriteResult:
        """Insert or replace ``passages`` by id; each named document keeps exactly the passages
        of this request and gets its content hash recorded. All or nothing."""
        result = WriteResult()
        with self._lock, self._transaction() as conn:
            info = self._collection(conn, collection)
            rows = checked_upsert(passages, documents, info.dimension, collection)
            seen = {p.id for p, _ in rows}
            _no_nul(*(x for p, _ in rows for x in (p.id, p.document_id, p.text, *p.metadata,
                                                   *p.metadata.values())),
                    *(x for d in documents for x in (d.document_id, d.content_hash)))  # fmt: skip
            for doc_id in {d.document_id for d in documents}:
                existing = conn.execute(
                    "SELECT rowid, id FROM passages WHERE collection=%s AND document_id=%s",
                    (collection, doc_id),
                ).fetchall()
                self._delete_rowids(conn, [r for r, pid in existing if pid not in seen], result)
            # Statements go in batches (psycopg's executemany pipelines them): a few round
            # trips per upsert, not a few per passage.
            ids = [p.id for p, _ in rows]
            old = {r[0]: (r[1], r[2]) for r in conn.execute(
                "SELECT id, rowid, metadata FROM passages WHERE collection=%s AND id = ANY(%s)",
                (collection, ids),
            ).fetchall()}  # fmt: skip

            def values(p: PassageIn, vec: np.ndarray) -> tuple:
                return (p.document_id, p.chunk, p.text, json.dumps(p.metadata, ensure_ascii=False),
                        vec.tobytes(), fulltext.fold(p.text))  # fmt: skip

            cur = conn.cursor()
            rowids = {pid: row[0] for pid, row in old.items()}
            replaced = [(p, vec) for p, vec in rows if p.id in old]
            if replaced:
                # A replacement keeps its rowid (as in the SQLite store): a follower whose
                # index still holds the old vector finds the new text instead of nothing.
                stale = [
                    (collection, k, v, old[p.id][0])
                    for p, _ in replaced
                    for k, v in json.loads(old[p.id][1]).items()
                ]
                if stale:
                    cur.executemany(
                        "DELETE FROM passage_fields WHERE collection=%s AND key=%s AND value=%s"
                        " AND rowid=%s",
                        stale,
                    )
                cur.executemany(
                    "UPDATE passages SET document_id=%s, chunk=%s, text=%s, metadata=%s,"
                    " vector=%s, tsv=to_tsvector('simple', %s) WHERE rowid=%s",
                    [(*values(p, vec), old[p.id][0]) for p, vec in replaced],
                )
            added = [(p, vec) for p, vec in rows if p.id not in old]
            if added:
                cur.executemany(
                    "INSERT INTO passages (document_id, chunk, text, metadata, vector, tsv,"
                    " collection, id, id_hash) VALUES (%s,%s,%s,%s,%s,"
                    " to_tsvector('simple', %s),%s,%s,%s) RETURNING rowid",
                    [(*values(p, vec), collection, p.id, id_hash(p.id)) for p, vec in added],
                    returning=True,
                )
                for p, _ in added:  # one result set per row, in order
                    rowids[p.id] = cur.fetchone()[0]
                    cur.nextset()
            fields = [
                (collection, k, v, rowids[p.id]) for p, _ in rows for k, v in p.metadata.items()
            ]
            if fields:
                cur.executemany(
                    "INSERT INTO passage_fields (collection, key, value, rowid)"
                    " VALUES (%s,%s,%s,%s) ON CONFLICT DO NOTHING",
                    fields,
                )
            for p, vec in rows:
                if p.id in old:
                    result.removed_rowids.append(rowids[p.id])
                result.added_rowids.append(rowids[p.id])
                result.added_vectors.append(vec)
                result.upserted += 1
            now = sqlite_store._now_ms()
            for d in documents:
                conn.execute(
                    "INSERT INTO documents (collection, document_id, content_hash, chunks,"
                    " updated_ms) VALUES (%s,%s,%s,%s,%s) ON CONFLICT (collection, document_id)"
                    " DO UPDATE SET content_hash=excluded.content_hash, chunks=excluded.chunks,"
                    " updated_ms=excluded.updated_ms",
                    (collection, d.document_id, d.content_hash, d.chunks, now),
                )
            result.version = self._touch(conn, collection, now)
            self._log(conn, collection, result)
            result.count = self._counts(conn, collection)[0]
            self._notify(conn, collection)
        return result

    def delete(
        self, collection: str, ids: Iterable[str], document_ids: Iterable[str]
    ) -> WriteResult:
        """Delete passages by id and every passage (and the record) of ``document_ids``."""
        ids, document_ids = list(ids), list(document_ids)
        result = WriteResult()
        with self._lock, self._transaction() as conn:
            result.version = self._collection(conn, collection).version
            if ids:
                rows = conn.execute(
                    "SELECT rowid FROM passages WHERE collection=%s AND id = ANY(%s)",
                    (collection, ids),
                ).fetchall()
                self._delete_rowids(conn, [r[0] for r in rows], result)
            forgotten = 0
            for doc_id in document_ids:
                rows = conn.execute(
                    "SELECT rowid FROM passages WHERE collection=%s AND document_id=%s",
                    (collection, doc_id),
                ).fetchall()
                self._delete_rowids(conn, [r[0] for r in rows], result)
                forgotten += conn.execute(
                    "DELETE FROM documents WHERE collection=%s AND document_id=%s",
                    (collection, doc_id),
                ).rowcount
            if result.removed or forgotten:
                result.version = self._touch(conn, collection, sqlite_store._now_ms())
                self._log(conn, collection, result)
                self._notify(conn, collection)
            result.count = self._counts(conn, collection)[0]
        return result

    def _delete_rowids(self, conn: psycopg.Connection, rowids: list[int], result: WriteResult):
        if not rowids:
            return
        rows = conn.execute(
            "DELETE FROM passages WHERE rowid = ANY(%s) RETURNING rowid, collection, metadata",
            ([int(r) for r in rowids],),
        ).fetchall()
        fields = [(c, k, v, r) for r, c, m in rows for k, v in json.loads(m).items()]
        if fields:
            conn.cursor().executemany(
                "DELETE FROM passage_fields WHERE collection=%s AND key=%s AND value=%s"
                " AND rowid=%s",
                fields,
            )
        result.removed_rowids.extend(rowids)
        result.removed += len(rowids)

    def _log(self, conn: psycopg.Connection, collection: str, result: WriteResult) -> None:
        """Record the rowids a write touched under its version; trim the log past its bound."""
        touched = sorted(set(result.removed_rowids) | set(result.added_rowids))
        if touched:
            conn.execute(
                "INSERT INTO changes (collection, version, rowid)"
                " SELECT %s, %s, unnest(%s::bigint[]) ON CONFLICT DO NOTHING",
                (collection, result.version, touched),
            )
        size = conn.execute(
            "UPDATE collections SET log_size=log_size+%s WHERE name=%s RETURNING log_size",
            (len(touched), collection),
        ).fetchone()[0]
        if size > self.log_keep:
            # Keep the newest half: followers further behind than that reload instead.
            cut = conn.execute(
                "SELECT version FROM changes WHERE collection=%s ORDER BY version DESC"
                " LIMIT 1 OFFSET %s",
                (collection, self.log_keep // 2),
            ).fetchone()
            if cut is not None:
                conn.execute(
                    "DELETE FROM changes WHERE collection=%s AND version<=%s", (collection, cut[0])
                )
                left = conn.execute(
                    "SELECT COUNT(*) FROM changes WHERE collection=%s", (collection,)
                ).fetchone()[0]
                conn.execute(
                    "UPDATE collections SET log_floor=GREATEST(log_floor, %s), log_size=%s"
                    " WHERE name=%s",
                    (cut[0], left, collection),
                )

    @staticmethod
    def _next_version(conn: psycopg.Connection) -> int:
        return conn.execute(
            "UPDATE counters SET value=value+1 WHERE name='writes' RETURNING value"
        ).fetchone()[0]

    def _touch(self, conn: psycopg.Connection, collection: str, now: int) -> int:
        version = self._next_version(conn)
        conn.execute(
            "UPDATE collections SET last_write_ms=GREATEST(%s, last_write_ms + 1), version=%s"
            " WHERE name=%s",
            (now, version, collection),
        )
        return version

    @staticmethod
    def _notify(conn: psycopg.Connection, collection: str) -> None:
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, collection))

    # --- reads --------------------------------------------------------------------------------
    def snapshot(self, collection: str) -> tuple[CollectionInfo, np.ndarray, np.ndarray]:
        with self._read() as conn:
            info = self._collection(conn, collection)
            rows = (
                conn.cursor(binary=True)  # vectors as raw bytes, not hex text
                .execute(
                    "SELECT rowid, vector FROM passages WHERE collection=%s"
                    f"{self._in_shard} ORDER BY rowid",
                    (collection, *self._shard_args),
                )
                .fetchall()
            )
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        vecs = np.frombuffer(b"".join(bytes(r[1]) for r in rows), dtype="<f4")
        return info, ids, vecs.reshape(-1, info.dimension).astype(np.float32)

    def load_vectors(
        self, collection: str, dimension: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        info, ids, vecs = self.snapshot(collection)
        if dimension is not None and dimension != info.dimension:
            raise InvalidArgument(
                f"collection {collection!r} has dimension {info.dimension}, not {dimension}"
            )
        return ids, vecs

    def get_passages(self, rowids: Sequence[int]) -> dict[int, StoredPassage]:
        if not len(rowids):
            return {}
        rows = self._fetch(
            "SELECT rowid, id, document_id, chunk, text, metadata FROM passages"
            " WHERE rowid = ANY(%s)",
            ([int(r) for r in rowids],),
        )
        return {r[0]: StoredPassage(r[0], r[1], r[2], r[3], r[4], json.loads(r[5])) for r in rows}

    def get_documents(self, collection: str, document_ids: Sequence[str]) -> list[DocumentIn]:
        with self._read() as conn:
            self._collection(conn, collection)
            rows = conn.execute(
                "SELECT document_id, content_hash, chunks FROM documents"
                " WHERE collection=%s AND document_id = ANY(%s)",
                (collection, list(dict.fromkeys(document_ids))),
            ).fetchall()
        return [DocumentIn(*r) for r in rows]

    def list_documents(
        self, collection: str, limit: int = 0, after: str = ""
    ) -> tuple[list[StoredDocument], str]:
        if not 0 <= limit <= MAX_PAGE:
            raise InvalidArgument(f"limit must be between 1 and {MAX_PAGE}, got {limit}")
        limit = limit or DEFAULT_PAGE
        with self._read() as conn:
            self._collection(conn, collection)
            # document_id is COLLATE "C": byte order, as SQLite compares, by the primary key.
            rows = conn.execute(
                f"{_DOCUMENTS} WHERE d.collection=%s AND d.document_id > %s"
                " ORDER BY d.document_id LIMIT %s",
                (collection, after, limit + 1),
            ).fetchall()
        page = [_document(r) for r in rows[:limit]]
        return page, page[-1].document_id if len(rows) > limit else ""

    def describe_documents(
        self, collection: str, document_ids: Sequence[str]
    ) -> list[StoredDocument]:
        with self._read() as conn:
            self._collection(conn, collection)
            rows = conn.execute(
                f"{_DOCUMENTS} WHERE d.collection=%s AND d.document_id = ANY(%s)",
                (collection, list(dict.fromkeys(document_ids))),
            ).fetchall()
        return [_document(r) for r in rows]

    def match(self, collection: str, conditions: Sequence[Condition]) -> np.ndarray:
        matching, args = _match_sql(collection, conditions)
        if self._in_shard:
            matching = f"SELECT rowid FROM passages WHERE rowid IN ({matching}){self._in_shard}"
            args = [*args, *self._shard_args]
        rows = self._fetch(matching, args)
        return np.sort(np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)))

    def bm25(
        self, collection: str, text: str, limit: int, conditions: Sequence[Condition] = ()
    ) -> tuple[int, list[tuple[int, float]]]:
        """The collection's version and its ``limit`` best full-text matches of ``text`` as
        ``(rowid, rank)``, best first (PostgreSQL's ``ts_rank_cd``; the name is the store
        contract's). The text is never parsed as query syntax: each word goes through
        ``phraseto_tsquery``."""
        words = [fulltext.fold(w) for w in fulltext.query_words(text)]
        with self._read() as conn:
            info = self._collection(conn, collection)
            if not words:
                return info.version, []
            query = " || ".join(["phraseto_tsquery('simple', %s)"] * len(words))
            statement = (
                f"SELECT rowid, ts_rank_cd(tsv, q) AS s FROM passages, (SELECT {query}) AS t(q)"
                f" WHERE collection=%s AND tsv @@ q{self._in_shard}"
            )
            args: list = [*words, collection, *self._shard_args]
            if conditions:
                allowed, allowed_args = _match_sql(collection, conditions)
                statement += f" AND rowid IN ({allowed})"
                args += allowed_args
            rows = conn.execute(
                statement + " ORDER BY s DESC, rowid LIMIT %s", [*args, limit]
            ).fetchall()
        return info.version, [(r[0], float(r[1])) for r in rows]

    def check_fulltext(self, collection: str) -> None:
        """The text index is a generated column: it cannot disagree with the text."""
        self.collection(collection)

    def vectors(self, rowids: Sequence[int], dimension: int) -> tuple[np.ndarray, np.ndarray]:
        conn = self._reader()
        with _errors(self.dsn, conn, rollback=False):
            return self._vectors(conn, rowids, dimension)

    @staticmethod
    def _vectors(
        conn: psycopg.Connection,
        rowids: Sequence[int],
        dimension: int,
        condition: str = "",
        args: Sequence = (),
    ) -> tuple[np.ndarray, np.ndarray]:
        if not len(rowids):
            return np.zeros(0, np.int64), np.zeros((0, dimension), np.float32)
        rows = (
            conn.cursor(binary=True)
            .execute(
                f"SELECT rowid, vector FROM passages WHERE rowid = ANY(%s){condition}",
                ([int(r) for r in rowids], *args),
            )
            .fetchall()
        )
        ids = np.asarray([r[0] for r in rows], dtype=np.int64)
        vecs = np.frombuffer(b"".join(bytes(r[1]) for r in rows), dtype="<f4")
        return ids, vecs.reshape(-1, dimension).astype(np.float32)

    def changes_since(self, collection: str, version: int) -> Changes | None:
        with self._read() as conn:
            info = self._collection(conn, collection)
            if version < info.log_floor or version > info.version:
                return None
            rows = conn.execute(
                "SELECT DISTINCT rowid FROM changes WHERE collection=%s AND version>%s",
                (collection, version),
            ).fetchall()
            touched = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            ids, vecs = self._vectors(conn, touched.tolist(), info.dimension, self._in_shard,
                                      self._shard_args)  # fmt: skip
        return Changes(info, touched, ids, vecs)


def _no_nul(*texts: str) -> None:
    # PostgreSQL's text type cannot hold NUL (SQLite's can): refuse it, saying where.
    for text in texts:
        if "\x00" in text:
            raise InvalidArgument(
                f"{text[:40]!r} contains a NUL character, which PostgreSQL cannot store: remove it"
            )
