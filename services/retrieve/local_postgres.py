"""A throwaway PostgreSQL server in a directory, on loopback: what the tests and benchmarks of
the postgres store run against (Debian's ``postgresql`` package; ``make install-test`` installs
it). Not a way to run PostgreSQL in production: deploy/ names a StatefulSet for that.

PostgreSQL refuses to run as root, so under root the server runs as ``nobody`` (every file of
its directory is handed to that user); otherwise as the current user. Authentication is
``trust`` for the loopback address only, and the server listens on nothing else.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

USER = "ragline"  # the cluster's superuser


def binaries() -> Path | None:
    """The directory of ``initdb``/``postgres``: on PATH, else Debian's versioned location."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(versions[-1]).parent if versions else None


class LocalPostgres:
    def __init__(self, port: int, root: Path | None = None) -> None:
        bindir = binaries()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
        self.bin = bindir
        self.port = port
        # Its own directory under /tmp: the unprivileged user must be able to reach it.
        self.root = Path(tempfile.mkdtemp(prefix="ragline-pg-", dir=root))
        self.data = self.root / "data"
        self.log_path = self.root / "postgres.log"
        self.proc: subprocess.Popen | None = None
        self._as = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
        if self._as:
            os.chmod(self.root, 0o755)
            shutil.chown(self.root, "nobody", "nogroup")
        subprocess.run(
            [*self._as, str(self.bin / "initdb"), "-D", str(self.data), "-U", USER,
             "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"],
            check=True, capture_output=True, text=True,
        )  # fmt: skip

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def start(self, timeout: float = 30) -> LocalPostgres:
        log = open(self.log_path, "ab")  # noqa: SIM115 (the server keeps writing to it)
        if self._as:
            shutil.chown(self.log_path, "nobody", "nogroup")
        self.proc = subprocess.Popen(
            [*self._as, str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.root}",
             "-c", "max_connections=200", "-c", "fsync=on", "-c", "synchronous_commit=on"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.dsn(), connect_timeout=2).close()
                return self
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"PostgreSQL did not start:\n{self.log()[-2000:]}") from None
                time.sleep(0.1)

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def kill(self) -> None:
        """SIGKILL the postmaster and every backend at once (no shutdown, no checkpoint: what
        a crash or the OOM killer does), wait until all are gone, and clear the lock files
        they leave, so the next ``start`` recovers from the WAL."""
        assert self.proc is not None
        for pid in _server_pids(self.data):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # runuser, if it is still there
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _server_pids(self.data) and time.monotonic() < deadline:
            time.sleep(0.05)
        (self.data / "postmaster.pid").unlink(missing_ok=True)
        for lock in self.root.glob(".s.PGSQL.*.lock"):
            lock.unlink(missing_ok=True)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _server_pids(data: Path) -> list[int]:
    """The live processes (not zombies) working in the data directory: the server's."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if Path(os.readlink(entry / "cwd")) == data:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids
