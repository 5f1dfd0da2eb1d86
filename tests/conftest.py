"""Shared test helpers: free loopback ports and real service processes."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    """One service started as `python -m services.<name>` with its log in a file."""

    def __init__(
        self,
        name: str,
        args: list[str],
        log_dir: Path,
        env: dict[str, str],
        label: str | None = None,
    ) -> None:
        self.name = label or name
        self.log_path = log_dir / f"{self.name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"services.{name}", *args],
            cwd=REPO_ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def base_env(tmp_path_factory) -> dict[str, str]:
    data = tmp_path_factory.mktemp("ragline-data")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAGLINE_")}
    env["RAGLINE_DATA_DIR"] = str(data)
    env["PYTHONUNBUFFERED"] = "1"
    # The edge's defaults answer extractively above a relevance floor (decision 0008); most
    # tests exercise the LLM path, so their edges generate (checked) and use every passage.
    # Tests of the defaults clear these two.
    env["RAGLINE_API_ANSWERER"] = "auto"
    env["RAGLINE_API_SCORE_THRESHOLD"] = "0"
    return env


class Pipeline:
    """embed, retrieve, generate and an edge as four real processes on loopback."""

    def __init__(self, env: dict[str, str], log_dir: Path, *api_args: str) -> None:
        import asyncio
        import time

        import httpx

        from ragline.clients import wait_for_serving

        self.ports = {name: free_port() for name in ("embed", "retrieve", "generate", "api")}
        stages = ("embed", "retrieve", "generate")
        self.procs = [
            ServiceProcess(n, ["--port", str(self.ports[n])], log_dir, env) for n in stages
        ]
        addresses = [f"--{s}-address=127.0.0.1:{self.ports[s]}" for s in stages]
        api = ["--port", str(self.ports["api"]), *addresses, *api_args]
        self.procs.append(ServiceProcess("api", api, log_dir, env))
        self.url = f"http://127.0.0.1:{self.ports['api']}"
        try:

            async def ready() -> None:
                await asyncio.gather(
                    *(wait_for_serving(f"127.0.0.1:{self.ports[s]}", "", 90) for s in stages)
                )

            asyncio.run(ready())
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or any(
                    p.proc.poll() is not None for p in self.procs
                ):
                    raise RuntimeError("pipeline did not start:\n" + self.logs())
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    def ingest(self, docs: dict[str, str]) -> None:
        import httpx

        for name, text in docs.items():
            r = httpx.post(
                f"{self.url}/documents", json={"text": text, "document_id": name}, timeout=60
            )
            assert r.status_code == 200, r.text

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.log()[-2000:]}" for p in self.procs)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


@pytest.fixture(scope="session")
def postgres():
    """One throwaway PostgreSQL server for the session, on loopback; tests make their own
    databases in it (``pg_dsn``)."""
    from services.retrieve.local_postgres import LocalPostgres, binaries

    if binaries() is None:
        pytest.fail("PostgreSQL is not installed: `make install-test` installs Debian's package")
    server = LocalPostgres(free_port()).start()
    yield server
    server.remove()


@pytest.fixture
def pg_dsn(postgres, request) -> str:
    """A new, empty database of the session's PostgreSQL, for this test alone."""
    return postgres.create_database("t_" + hashlib.sha1(request.node.nodeid.encode()).hexdigest())
