"""`loadtest grpc` against real embed and generate servers: ghz's report, every way in."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from ragline.clients import wait_for_serving
from tests.conftest import REPO_ROOT, ServiceProcess, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def servers(base_env, tmp_path_factory) -> Iterator[dict[str, str]]:
    logs = tmp_path_factory.mktemp("grpcload")
    ports = {"embed": free_port(), "generate": free_port()}
    procs = [ServiceProcess(n, ["--port", str(p)], logs, base_env) for n, p in ports.items()]
    try:

        async def ready() -> None:
            await asyncio.gather(
                *(wait_for_serving(f"127.0.0.1:{p}", "", 90) for p in ports.values())
            )

        asyncio.run(ready())
        yield {n: f"127.0.0.1:{p}" for n, p in ports.items()}
    finally:
        for p in procs:
            p.stop()


def ghz(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loadtest", "grpc", "-q", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def report(out: subprocess.CompletedProcess) -> dict:
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_reflection_run_writes_ghz_json(servers) -> None:
    doc = report(ghz(
        "--insecure", "--call", "ragline.v1.Embed/Embed", "-d", '{"texts": ["hello"]}',
        "-c", "4", "-n", "20", "--connections", "2", "-O", "json", servers["embed"],
    ))  # fmt: skip
    assert doc["count"] == 20 and doc["statusCodeDistribution"] == {"OK": 20}
    assert doc["endReason"] == "normal" and doc["errorDistribution"] == {}
    assert 0 < doc["fastest"] <= doc["average"] <= doc["slowest"] < doc["total"]
    assert doc["rps"] == pytest.approx(20 / (doc["total"] / 1e9))
    assert len(doc["details"]) == 20 and len(doc["latencyDistribution"]) == 7
    assert doc["options"]["call"] == "ragline.v1.Embed/Embed" and doc["options"]["c"] == 4


def test_proto_file_round_robin_data_and_errors_by_status(servers) -> None:
    data = json.dumps([{"texts": ["a question?"], "kind": "INPUT_KIND_QUERY"}, {"texts": []}])
    doc = report(ghz(
        "--insecure", "--proto", "protos/ragline/v1/embed.proto", "-i", "protos",
        "--call", "ragline.v1.Embed/Embed", "-d", data, "-c", "2", "-n", "10", "-O", "json",
        servers["embed"],
    ))  # fmt: skip
    assert doc["statusCodeDistribution"] == {"OK": 5, "InvalidArgument": 5}
    [(message, count)] = doc["errorDistribution"].items()
    assert count == 5 and message.startswith("rpc error: code = InvalidArgument desc = texts")


def test_shipped_config_runs_with_the_host_overridden(servers) -> None:
    out = ghz("--config", "loadtest/ghz/embed.json", "-n", "6", "-c", "2", servers["embed"])
    assert out.returncode == 0, out.stderr
    assert "Summary:" in out.stdout and "[OK]\t6 responses" in out.stdout


def test_server_streaming_call_lasts_until_the_stream_ends(servers) -> None:
    data = {"messages": [{"role": "user", "content": "Count to ten."}], "params": {"max_tokens": 4}}
    doc = report(ghz(
        "--insecure", "--call", "ragline.v1.Generate/GenerateStream", "-d", json.dumps(data),
        "-c", "1", "-n", "2", "-O", "json", servers["generate"],
    ))  # fmt: skip
    assert doc["statusCodeDistribution"] == {"OK": 2}
    assert doc["fastest"] > 1_000_000, "a 4-token stream takes milliseconds, not microseconds"


def test_duration_mode_and_csv(servers) -> None:
    out = ghz(
        "--insecure", "--call", "ragline.v1.Embed/Embed", "-d", '{"texts": ["x"]}',
        "-c", "2", "-z", "1s", "-O", "csv", servers["embed"],
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = out.stdout.strip().splitlines()
    assert rows[0] == "duration (ms),status,error" and len(rows) > 5
    assert all(r.endswith(",OK,") for r in rows[1:])


def test_mistakes_get_one_clear_line_and_exit_1(servers) -> None:
    out = ghz("--insecure", "--call", "ragline.v1.Embed/Embedd", servers["embed"])
    assert out.returncode == 1 and "has no method 'Embedd'; it has: Embed, Info" in out.stderr
    out = ghz("--insecure", "--call", "ragline.v1.Nope/X", servers["embed"])
    assert (
        out.returncode == 1
        and "the server has: " in out.stderr
        and "ragline.v1.Embed" in out.stderr
    )
    out = ghz(
        "--insecure", "--call", "ragline.v1.Embed/Embed", "-d", '{"text": "x"}', servers["embed"]
    )
    assert out.returncode == 1 and 'no field named "text"' in out.stderr
    out = ghz("--call", "ragline.v1.Embed/Embed", "--connect-timeout", "1s", servers["embed"])
    assert out.returncode == 1 and "add --insecure" in out.stderr
    assert "Traceback" not in out.stderr
