"""`ragline run` (what `make run` calls): up, answering from the handbook, Ctrl-C stops all."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO_ROOT, free_port

pytestmark = pytest.mark.slow
CORPUS = REPO_ROOT / "corpus" / "handbook"


def start(data_dir: Path, ports: dict[str, int], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable, "-m", "ragline", "run", "--data-dir", str(data_dir),
            "--corpus", str(CORPUS), "--api-port", str(ports["api"]),
            "--embed-port", str(ports["embed"]), "--retrieve-port", str(ports["retrieve"]),
            "--generate-port", str(ports["generate"]),
        ],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def read_until_ready(proc: subprocess.Popen, timeout: float = 300) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip())
        if "Ctrl-C stops every service" in line:
            return lines
    proc.kill()
    pytest.fail("ragline run never became ready:\n" + "\n".join(lines))


def test_run_answers_from_the_handbook_and_stops_cleanly(base_env, tmp_path) -> None:
    ports = {name: free_port() for name in ("api", "embed", "retrieve", "generate")}
    proc = start(tmp_path, ports, base_env)
    try:
        lines = read_until_ready(proc)
        out = "\n".join(lines)
        assert "ingested" in out
        curl = next(line for line in lines if line.strip().startswith("curl "))
        assert f"http://127.0.0.1:{ports['api']}/chat" in curl
        r = httpx.post(
            f"http://127.0.0.1:{ports['api']}/chat",
            json={"query": "How many days do I have to submit an expense claim?"},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        assert r.json()["sources"][0]["metadata"]["source"] == "expenses-and-reimbursement.md"
        assert r.json()["answer"].strip()
    finally:
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, rest
    assert "all services stopped" in rest
    for port in ports.values():  # every child released its port
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/", timeout=2)

    # second start: nothing re-ingested
    proc = start(tmp_path, ports, base_env)
    try:
        out = "\n".join(read_until_ready(proc))
        pages = len(list(CORPUS.glob("*.md")))
        assert f"0 ingested, {pages} unchanged" in out
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert proc.returncode == 0


def test_a_busy_port_is_reported_before_anything_starts(base_env, tmp_path) -> None:
    import socket

    ports = {name: free_port() for name in ("api", "embed", "retrieve", "generate")}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", ports["embed"]))
        busy.listen()
        proc = start(tmp_path, ports, base_env)
        out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 1
    assert f"port(s) {ports['embed']} already in use" in out
    assert not (tmp_path / "logs").exists(), "no service was started"
