"""`ragline run` (what `make run` calls): up, answering, taking `ragline ingest`; Ctrl-C stops."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest

from cli.launcher import REPLICA_PORT_STEP
from tests.conftest import REPO_ROOT, free_port


async def write_to(address: str) -> grpc.aio.AioRpcError:
    """An upsert sent straight to a retrieve replica, and the error it answered."""
    import numpy as np

    from ragline import vectors
    from ragline.clients import RetrieveClient
    from ragline.v1 import retrieve_pb2

    client = RetrieveClient(address)
    try:
        await client.upsert(
            "default",
            [retrieve_pb2.Passage(id="x#0", document_id="x", text="x",
                                  vector=vectors.pack(np.full(384, 384**-0.5, np.float32)))],
            timeout=10,
        )  # fmt: skip
    except grpc.aio.AioRpcError as exc:
        return exc
    finally:
        await client.close()
    raise AssertionError(f"{address} accepted a write")


def up_ports(replicas: int = 3) -> dict[str, int]:
    """Base ports for `ragline up` whose replica ports (base + 100 i, the edge's base + i) are
    free as well: a free base port alone says nothing about base + 100."""

    def free(port: int) -> bool:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
        return True

    for _ in range(50):
        ports = {name: free_port() for name in ("api", "embed", "retrieve", "generate")}
        wanted = [base + i * (1 if name == "api" else REPLICA_PORT_STEP)
                  for name, base in ports.items() for i in range(replicas)]  # fmt: skip
        if len(set(wanted)) == len(wanted) and all(p < 65536 and free(p) for p in wanted):
            return ports
    raise AssertionError("no free port layout for ragline up")


pytestmark = pytest.mark.slow
CORPUS = REPO_ROOT / "corpus" / "handbook"
NO_STORE = {"Cache-Control": "no-store"}


def start(
    data_dir: Path, ports: dict[str, int], env: dict[str, str], *extra: str, command: str = "run"
) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable, "-m", "cli", command, *extra, "--data-dir", str(data_dir),
            "--corpus", str(CORPUS), "--api-port", str(ports["api"]),
            "--embed-port", str(ports["embed"]), "--retrieve-port", str(ports["retrieve"]),
            "--generate-port", str(ports["generate"]),
        ],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def ingest(env: dict[str, str], ports: dict[str, int], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli", "ingest", *args,
         "--embed", f"127.0.0.1:{ports['embed']}", "--retrieve", f"127.0.0.1:{ports['retrieve']}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
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
    # make run's own defaults (the other tests' edges generate)
    defaults = {k: v for k, v in base_env.items() if not k.startswith("RAGLINE_API_")}
    proc = start(tmp_path, ports, defaults)
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
        # the README's example question, answered right, quoted and cited
        assert re.search(r"\b30 days\b", r.json()["answer"]), r.json()["answer"]
        assert r.json()["citations"][0]["id"].startswith("expenses-and-reimbursement.md#")
        off_topic = httpx.post(
            f"http://127.0.0.1:{ports['api']}/chat",
            json={"query": "What is the capital of Mongolia?"},
            timeout=120,
        ).json()
        assert off_topic["not_found"] is True and off_topic["closest"], off_topic

        # `ragline ingest` against the running stages: once, unchanged the second time, and a
        # stage's refusal is one line and exit 2
        docs = tmp_path / "my-documents"
        docs.mkdir()
        (docs / "parking.md").write_text("# Parking\n\nStaff park in the north garage.\n")
        done = ingest(base_env, ports, str(docs))
        assert done.returncode == 0, done.stderr
        assert "1 ingested (1 chunks), 0 unchanged" in done.stdout
        again = ingest(base_env, ports, str(docs))
        assert "0 ingested (0 chunks), 1 unchanged" in again.stdout, again.stdout + again.stderr
        bad = ingest(base_env, ports, str(docs), "--collection", "no/such")
        assert bad.returncode == 2
        assert bad.stderr.strip().splitlines() == [
            "ragline ingest: retrieve: collection name 'no/such' is invalid: "
            "use 1-64 letters, digits, '_' or '-'"
        ], bad.stderr
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


def test_up_runs_the_replicated_topology_and_spreads_load(base_env, tmp_path) -> None:
    import json

    ports = up_ports()
    env = {**base_env, "RAGLINE_TRACE_FILE": str(tmp_path / "spans-{service}.jsonl"),
           "OTEL_BSP_SCHEDULE_DELAY": "50"}  # fmt: skip
    proc = start(tmp_path, ports, env, "--replicas", "embed=2,retrieve=2,api=2", command="up")
    try:
        out = "\n".join(read_until_ready(proc))
        for name in ("embed-0", "embed-1", "retrieve-0", "retrieve-1", "api-0", "api-1"):
            assert f"  {name} " in out, name
        for api_port in (ports["api"], ports["api"] + 1):
            for question in ("How many days do I have to submit an expense claim?",
                             "What is the expense claim deadline?"):  # fmt: skip
                r = httpx.post(
                    f"http://127.0.0.1:{api_port}/chat", json={"query": question}, timeout=120
                )
                assert r.status_code == 200, r.text
                assert (
                    r.json()["sources"][0]["metadata"]["source"] == "expenses-and-reimbursement.md"
                )
        # writes go to the writer; a reader refuses them
        doc = {"document_id": "new.md", "text": "# New\n\nThe new policy starts in May."}
        r = httpx.post(f"http://127.0.0.1:{ports['api'] + 1}/documents", json=doc, timeout=60)
        assert r.status_code == 200 and r.json()["status"] == "ingested"
        reader = f"127.0.0.1:{ports['retrieve'] + REPLICA_PORT_STEP}"  # retrieve-1
        refused = asyncio.run(write_to(reader))
        assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION, refused
        assert "read-only" in refused.details(), refused.details()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert proc.returncode == 0
    instances: dict[str, set] = {}
    for path in tmp_path.glob("spans-*.jsonl"):
        for line in path.read_text().splitlines():
            span = json.loads(line)
            res = span["resource"]["attributes"]
            if span["kind"] == "SpanKind.SERVER":
                instances.setdefault(res["service.name"], set()).add(res["service.instance.id"])
    assert len(instances["ragline-embed"]) == 2, "both embed replicas served requests"
    assert len(instances["ragline-retrieve"]) == 2, "both retrieve replicas served requests"


def test_up_restarts_a_killed_replica_while_the_others_serve(base_env, tmp_path) -> None:
    import os
    import threading

    ports = up_ports()
    proc = start(tmp_path, ports, base_env, "--replicas", "generate=2", command="up")
    rest: list[str] = []
    try:
        lines = read_until_ready(proc)

        # everything it prints from now on, read off the pipe so the launcher never blocks on it
        def drain() -> None:
            for line in proc.stdout:
                rest.append(line)

        threading.Thread(target=drain, daemon=True).start()
        victim = f"127.0.0.1:{ports['generate'] + 100}"  # generate-1
        pid = int(re.search(r"generate-1 +ready on \S+ \(.*pid (\d+)\)", "\n".join(lines))[1])
        os.kill(pid, signal.SIGKILL)
        edge = f"http://127.0.0.1:{ports['api']}"

        def victim_status() -> str:
            return httpx.get(f"{edge}/readyz", timeout=5).json()["stages"]["generate"][victim]

        deadline = time.monotonic() + 30
        while victim_status() == "SERVING":  # the edge's health check sees it go
            assert time.monotonic() < deadline, "the edge never saw generate-1 die"
            time.sleep(0.1)
        for question in ("How many days do I have to submit an expense claim?",
                         "What is the expense claim deadline?",
                         "When must expense claims be submitted?"):  # fmt: skip
            body = {"query": question, "answerer": "generate", "max_tokens": 8}
            r = httpx.post(f"{edge}/chat", json=body, headers=NO_STORE, timeout=120)
            assert r.status_code == 200, r.text  # generate-0 answers while generate-1 is down
        assert proc.poll() is None, "one dead replica must not stop the stack"
        # back within the first backoff (1 s) plus a generate start-up, on the same port
        deadline = time.monotonic() + 180
        while not (victim_status() == "SERVING" and any("restarted" in x for x in rest)):
            if time.monotonic() > deadline:
                pytest.fail("generate-1 not SERVING again:\n" + "".join(rest))
            time.sleep(0.5)
        log = "".join(rest)
        assert "generate-1 exited with code -9 (SIGKILL)" in log, log
        assert "restarting it in 1s (restart 1 in a row" in log, log
        new_pid = int(re.search(r"generate-1 restarted \(pid (\d+)\)", log)[1])
        assert new_pid != pid and proc.poll() is None
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    assert proc.returncode == 0
    for port in ports.values():  # the restarted replica was stopped too
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://{victim}/", timeout=2)
