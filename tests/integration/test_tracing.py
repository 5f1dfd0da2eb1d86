"""One /chat through four real processes is one trace, parented across every hop."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest

from loadtest.tracereport import attribute, read_files
from ragline.clients import wait_for_serving
from tests.conftest import ServiceProcess, free_port

pytestmark = pytest.mark.slow


def spans_in(paths: list[Path]) -> list:
    return read_files([p for p in paths if p.exists()])


def test_one_chat_is_one_trace_across_four_processes(base_env, tmp_path) -> None:
    ports = {name: free_port() for name in ("embed", "retrieve", "generate", "api")}
    env = {
        **base_env,
        "RAGLINE_DATA_DIR": str(tmp_path / "data"),
        "RAGLINE_TRACE_FILE": str(tmp_path / "spans-{service}.jsonl"),
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    procs = [
        ServiceProcess(n, ["--port", str(ports[n])], tmp_path, env)
        for n in ("embed", "retrieve", "generate")
    ]
    procs.append(
        ServiceProcess(
            "api",
            ["--port", str(ports["api"]), "--max-tokens", "8"]
            + [f"--{s}-address=127.0.0.1:{ports[s]}" for s in ("embed", "retrieve", "generate")],
            tmp_path,
            env,
        )
    )
    try:

        async def ready() -> None:
            await asyncio.gather(
                *(wait_for_serving(f"127.0.0.1:{ports[s]}", "", 60)
                  for s in ("embed", "retrieve", "generate"))
            )  # fmt: skip

        asyncio.run(ready())
        base = f"http://127.0.0.1:{ports['api']}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.1)
        doc = {"document_id": "leave.md", "text": "# Leave\n\nYou get 27 days of annual leave."}
        assert httpx.post(f"{base}/documents", json=doc, timeout=60).status_code == 200
        r = httpx.post(f"{base}/chat", json={"query": "How much leave do I get?"}, timeout=60)
        assert r.status_code == 200
        trace_id = r.headers["x-trace-id"]
        assert len(trace_id) == 32

        files = [
            tmp_path / f"spans-ragline-{s}.jsonl" for s in ("api", "embed", "retrieve", "generate")
        ]  # noqa: E501
        deadline = time.monotonic() + 10
        while True:
            trace = [s for s in spans_in(files) if s.trace_id == trace_id]
            names = {s.name for s in trace}
            if {"generate.decode", "POST /chat"} <= names or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            p.stop()

    by_id = {s.span_id: s for s in trace}
    assert {s.service for s in trace} == {
        "ragline-api", "ragline-embed", "ragline-retrieve", "ragline-generate",
    }  # fmt: skip
    root = next(s for s in trace if s.name == "POST /chat" and s.kind == "SERVER")
    assert root.parent_id is None
    for service, rpc in (("embed", "Embed"), ("retrieve", "Retrieve"), ("generate", "Generate")):
        server = next(s for s in trace if s.service == f"ragline-{service}" and s.kind == "SERVER")
        client = by_id[server.parent_id]  # parented across the process boundary
        assert client.kind == "CLIENT" and client.service == "ragline-api"
        assert client.attributes["rpc.service"] == f"ragline.v1.{rpc}"
        assert client.start_ns <= server.start_ns and server.end_ns <= client.end_ns
    for name in ("embed.queue_wait", "embed.inference", "retrieve.search",
                 "generate.queue_wait", "generate.prefill", "generate.decode"):  # fmt: skip
        inner = next(s for s in trace if s.name == name)
        assert by_id[inner.parent_id].kind == "SERVER", name
    decode = next(s for s in trace if s.name == "generate.decode")
    assert decode.attributes["ragline.completion_tokens"] > 0

    report = attribute(trace)
    assert report.requests == 1 and report.dominant == "generate"

    log_lines = [json.loads(line) for line in procs[-1].log().splitlines() if line.startswith("{")]
    assert any(entry.get("trace_id") == trace_id for entry in log_lines), "logs carry the trace id"
