"""Shared test helpers: free loopback ports and real service processes."""

from __future__ import annotations

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
    return env
