"""The BM25 side of the store: one SQLite FTS5 index per collection over its passages' text.

Each collection's FTS5 table is *external content* (it stores no text of its own: its content
is a view of the collection's rows in ``passages``), kept up to date by triggers on
``passages``. So the text lives in one place, and every write that changes a passage changes its
index entry in the same transaction: a crash cannot leave them disagreeing (docs/decisions/0003).
One table per collection, not one for all, so BM25's statistics (how rare a term is, the
average passage length) are the collection's own.

Queries never reach FTS5's syntax: every word of the user's text becomes a quoted string (a
phrase of the tokens the tokenizer finds in it), and the phrases are ORed.
"""

from __future__ import annotations

import sqlite3
import unicodedata

# The tokenizer of every collection's table. unicode61 folds case; remove_diacritics 2 folds
# accents (also those on letters with several). No extra tokenchars: `E-1042`,
# `smtpd_recipient_restrictions` or `-XV` in a query become the phrases "e 1042", "smtpd
# recipient restrictions", "xv", which match those codes exactly (BM25 weighs a phrase by how
# few passages contain the phrase), while a question that says "recipient restrictions" still
# finds the passage. Changing it means bumping LAYOUT: every index is rebuilt at the next open.
TOKENIZE = "unicode61 remove_diacritics 2"
LAYOUT = 1
# Distinct query words kept (the first ones): bounds a query's cost whatever text is sent.
MAX_TERMS = 64


def _names(collection: str) -> tuple[str, str]:
    """The collection's FTS table and content view (its triggers are named after the table).

    SQLite identifiers ignore case and collection names do not, so the name goes in as hex
    (letters and digits: the identifiers need no quoting).
    """
    tag = collection.encode().hex()
    return f"passages_fts_{tag}", f"passages_text_{tag}"


def create(conn: sqlite3.Connection, collection: str) -> None:
    """Create (or recreate) ``collection``'s index, built from its passages; the caller's
    transaction makes it atomic with whatever else it writes."""
    drop(conn, collection)
    table, view = _names(collection)
    literal = "'" + collection.replace("'", "''") + "'"  # names are [A-Za-z0-9_-]: belt and braces
    conn.execute(
        f"CREATE VIEW {view} AS SELECT rowid AS passage_rowid, text FROM passages"
        f" WHERE collection = {literal}"
    )
    conn.execute(
        f"CREATE VIRTUAL TABLE {table} USING fts5(text, content='{view}',"
        f" content_rowid='passage_rowid', tokenize='{TOKENIZE}')"
    )
    remove = f"INSERT INTO {table} ({table}, rowid, text) VALUES ('delete', old.rowid, old.text);"
    insert = f"INSERT INTO {table} (rowid, text) VALUES (new.rowid, new.text);"
    for event, row, body in (
        ("INSERT", "new", insert),
        ("DELETE", "old", remove),
        ("UPDATE OF text", "old", remove + " " + insert),
    ):
        name = f"{table}_{event.split()[0].lower()}"
        conn.execute(
            f"CREATE TRIGGER {name} AFTER {event} ON passages"
            f" WHEN {row}.collection = {literal} BEGIN {body} END"
        )
    conn.execute(f"INSERT INTO {table} ({table}) VALUES ('rebuild')")


def drop(conn: sqlite3.Connection, collection: str) -> None:
    table, view = _names(collection)
    for event in ("insert", "delete", "update"):
        conn.execute(f"DROP TRIGGER IF EXISTS {table}_{event}")
    conn.execute(f"DROP TABLE IF EXISTS {table}")
    conn.execute(f"DROP VIEW IF EXISTS {view}")


def migrate(conn: sqlite3.Connection) -> list[str]:
    """Build the index of every collection that lacks one (a database from before FTS) or has
    one of another layout; returns their names. The caller holds a write transaction."""
    row = conn.execute("SELECT value FROM counters WHERE name='fts_layout'").fetchone()
    current = row is not None and row[0] == LAYOUT
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    built = []
    for (name,) in conn.execute("SELECT name FROM collections ORDER BY name").fetchall():
        if not current or _names(name)[0] not in tables:
            create(conn, name)
            built.append(name)
    conn.execute(
        "INSERT INTO counters (name, value) VALUES ('fts_layout', ?)"
        " ON CONFLICT (name) DO UPDATE SET value=excluded.value",
        (LAYOUT,),
    )
    return built


def fold(text: str) -> str:
    """``text`` with case and accents folded (what the SQLite tokenizer does, done in Python for
    the postgres store, so no database locale or extension decides it)."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def query_words(text: str) -> list[str]:
    """The distinct words of ``text`` (case-folded duplicates dropped, the first ``MAX_TERMS``)
    that have a letter or digit in them: what a full-text query looks for."""
    # A lone surrogate cannot be bound as UTF-8; NUL would end the expression early.
    text = text.encode("utf-8", "replace").decode("utf-8").replace("\x00", " ")
    terms: dict[str, str] = {}
    for word in text.split():
        if any(ch.isalnum() for ch in word):
            terms.setdefault(word.casefold(), word)
            if len(terms) == MAX_TERMS:
                break
    return list(terms.values())


def match_expression(text: str) -> str | None:
    """A safe FTS5 MATCH expression for ``text``: its words, each quoted, ORed; ``None`` when no
    word has a letter or digit in it (nothing to look for)."""
    quoted = ['"' + word.replace('"', '""') + '"' for word in query_words(text)]
    return " OR ".join(quoted) or None


def search(
    conn: sqlite3.Connection,
    collection: str,
    expression: str,
    limit: int,
    allowed: tuple[str, list] | None = None,
) -> list[tuple[int, float]]:
    """``(rowid, bm25)`` of the best ``limit`` matches, best first, BM25 as a positive score
    (FTS5's ``bm25()`` is lower-is-better). ``allowed``: SQL selecting the rowids a filter
    lets through, and its arguments."""
    table = _names(collection)[0]
    sql = f"SELECT rowid, bm25({table}) AS s FROM {table} WHERE {table} MATCH ?"
    args: list = [expression]
    if allowed is not None:
        # Unary + keeps the filter out of FTS5's own planning: the subquery is evaluated once
        # into a set, and not turned into one full-text query per allowed rowid.
        sql += f" AND +rowid IN ({allowed[0]})"
        args += allowed[1]
    rows = conn.execute(sql + " ORDER BY s LIMIT ?", [*args, limit]).fetchall()
    return [(r[0], -r[1]) for r in rows]


def check(conn: sqlite3.Connection, collection: str) -> None:
    """FTS5's integrity check of the index against the passages; raises
    ``sqlite3.DatabaseError`` when they disagree."""
    table = _names(collection)[0]
    conn.execute(f"INSERT INTO {table} ({table}, rank) VALUES ('integrity-check', 1)")
