"""Index snapshots: a built HNSW/IVF index saved beside SQLite so a restart need not rebuild it.

One file per collection, ``<data_dir>/snapshots/<collection>.faiss``: a magic line, a JSON
header (collection, dimension, kind, the collection version the index was built from), the
FAISS index, and an end marker. It is written to a temporary file in the same directory,
fsynced, and renamed over the old one (then the directory is fsynced), so a reader sees either
the old snapshot or the new one, never half of one. A snapshot is only a cache: SQLite stays the
truth, and a loader brings a snapshot up to date from the change log (docs/decisions/0003).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import faiss

from services.retrieve.index import KINDS

MAGIC = b"RAGLINE-SNAPSHOT-1\n"
END = b"RAGLINE-SNAPSHOT-END\n"
_LEN = struct.Struct("<Q")


@dataclass(frozen=True)
class SnapshotHeader:
    collection: str
    dimension: int
    kind: str  # an IndexKind's name
    built_version: int
    size: int  # vectors in the index
    written_unix_ms: int = 0


class SnapshotError(Exception):
    """A snapshot file that cannot be used (truncated, foreign, for another collection)."""


def path_for(directory: Path, collection: str) -> Path:
    return directory / f"{collection}.faiss"


def write(directory: Path, header: SnapshotHeader, index: faiss.Index) -> Path:
    """Atomically replace the collection's snapshot with ``index``."""
    directory.mkdir(parents=True, exist_ok=True)
    final = path_for(directory, header.collection)
    tmp = directory / f".{header.collection}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    meta = json.dumps({**header.__dict__, "written_unix_ms": int(time.time() * 1000)}).encode()
    try:
        with tmp.open("wb") as f:
            f.write(MAGIC + _LEN.pack(len(meta)) + meta)
            writer = faiss.PyCallbackIOWriter(f.write)
            faiss.write_index(index, writer)
            del writer  # flushes its buffer into f
            f.write(END)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(directory)
    return final


def read_header(path: Path) -> SnapshotHeader:
    with path.open("rb") as f:
        return _header(f)


def read(path: Path) -> tuple[SnapshotHeader, faiss.Index]:
    """The header and the index; ``SnapshotError`` if the file is not a whole snapshot."""
    with path.open("rb") as f:
        header = _header(f)
        try:
            index = faiss.read_index(faiss.PyCallbackIOReader(f.read))
        except RuntimeError as exc:
            raise SnapshotError(f"{path}: unreadable index ({exc})") from None
        if f.read(len(END)) != END:
            raise SnapshotError(f"{path}: no end marker (truncated?)")
    if index.ntotal != header.size or index.d != header.dimension:
        raise SnapshotError(f"{path}: index does not match its header")
    return header, index


def remove(directory: Path, collection: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        path_for(directory, collection).unlink()


def remove_partial(directory: Path) -> None:
    """Delete temporary files of writes that never finished (the writer was killed)."""
    for tmp in directory.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()


def _header(f) -> SnapshotHeader:
    if f.read(len(MAGIC)) != MAGIC:
        raise SnapshotError(f"{f.name}: not a ragline snapshot")
    raw = f.read(_LEN.size)
    if len(raw) != _LEN.size:
        raise SnapshotError(f"{f.name}: truncated header")
    (length,) = _LEN.unpack(raw)
    try:
        header = SnapshotHeader(**json.loads(f.read(length)))
    except (ValueError, TypeError) as exc:
        raise SnapshotError(f"{f.name}: bad header ({exc})") from None
    kind = KINDS.get(header.kind) if isinstance(header.kind, str) else None
    if kind is None or not kind.concrete:
        raise SnapshotError(f"{f.name}: no index kind {header.kind!r} to serve it as")
    return header


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
