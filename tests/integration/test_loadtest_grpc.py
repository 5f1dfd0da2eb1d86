"""`loadtest grpc` against real embed and generate servers: ghz's report, every way in."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from ragline.clients import wait_for_serving
from ragline.v1 import embed_pb2
from tests.conftest import REPO_ROOT, ServiceProcess, free_port

pytestmark = pytest.mark.slow

EMBED = "ragline.v1.Embed/Embed"
GHZ_FIELDS = {
    "date": str, "endReason": str, "options": dict, "count": int, "total": int, "average": int,
    "fastest": int, "slowest": int, "rps": float, "errorDistribution": dict,
    "statusCodeDistribution": dict, "latencyDistribution": list, "histogram": list,
    "details": list,
}  # fmt: skip


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


def ghz(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loadtest", "grpc", *args],
        cwd=REPO_ROOT, capture_output=True, input=stdin, timeout=120,
    )  # fmt: skip


def report(out: subprocess.CompletedProcess) -> dict:
    assert out.returncode == 0, out.stderr.decode()
    assert not out.stderr, "no progress in a captured run (stderr is not a TTY)"
    return json.loads(out.stdout)


def assert_ghz_report(doc: dict, n: int) -> None:
    for name, kind in GHZ_FIELDS.items():
        assert isinstance(doc[name], kind), name
    assert doc["count"] == n and doc["statusCodeDistribution"] == {"OK": n}
    assert doc["endReason"] == "normal" and doc["errorDistribution"] == {}
    assert 0 < doc["fastest"] <= doc["average"] <= doc["slowest"] < doc["total"]
    assert doc["rps"] == pytest.approx(n / (doc["total"] / 1e9))
    assert len(doc["details"]) == n and all(d["status"] == "OK" for d in doc["details"])
    assert [d["percentage"] for d in doc["latencyDistribution"]] == [10, 25, 50, 75, 90, 95, 99]
    assert sum(b["count"] for b in doc["histogram"]) == n


def test_reflection_run_writes_ghz_json(servers) -> None:
    doc = report(ghz(
        "--call", EMBED, "-d", '{"texts": ["hello {{.UUID}}"]}', "-c", "4", "-n", "20",
        "--connections", "2", "-O", "json", servers["embed"],
    ))  # fmt: skip
    assert_ghz_report(doc, 20)
    assert doc["options"]["call"] == EMBED and doc["options"]["c"] == 4
    assert doc["options"]["insecure"] is True and doc["options"]["host"] == servers["embed"]


def test_proto_file_run_writes_ghz_json(servers) -> None:
    doc = report(ghz(
        "--insecure", "--proto", "protos/ragline/v1/embed.proto", "-i", "protos",
        "--call", "ragline.v1.Embed.Embed", "-d", '{"texts": ["a question?"]}',
        "-c", "2", "-n", "8", "-O", "json", servers["embed"],
    ))  # fmt: skip
    assert_ghz_report(doc, 8)
    assert doc["options"]["proto"] == "protos/ragline/v1/embed.proto"


def test_round_robin_data_and_errors_by_status(servers) -> None:
    # One worker makes the order of calls the order of the array: OK, error, OK, error...
    data = json.dumps([{"texts": ["a question?"], "kind": "INPUT_KIND_QUERY"}, {"texts": []}])
    doc = report(ghz("--call", EMBED, "-d", data, "-c", "1", "-n", "6", "-O", "json",
                     servers["embed"]))  # fmt: skip
    assert doc["count"] == 6
    assert doc["statusCodeDistribution"] == {"OK": 3, "InvalidArgument": 3}
    assert [d["status"] for d in doc["details"]] == ["OK", "InvalidArgument"] * 3
    [(message, count)] = doc["errorDistribution"].items()
    assert count == 3 and message.startswith("rpc error: code = InvalidArgument desc = texts")
    # Errors are left out of the latency statistics unless --count-errors.
    ok = sorted(d["latency"] for d in doc["details"] if d["status"] == "OK")
    assert (doc["fastest"], doc["slowest"]) == (ok[0], ok[-1])


def test_binary_data_from_stdin(servers) -> None:
    blob = embed_pb2.EmbedRequest(texts=["from bytes"]).SerializeToString()
    out = ghz("--call", EMBED, "-b", "-c", "1", "-n", "2", "-O", "json", servers["embed"],
              stdin=blob)  # fmt: skip
    doc = report(out)
    assert doc["statusCodeDistribution"] == {"OK": 2} and doc["options"]["binary"] is True


def test_shipped_config_runs_with_the_host_overridden(servers, tmp_path) -> None:
    out_file = tmp_path / "embed.csv"
    out = ghz(
        "--config", "loadtest/ghz/embed.json", "-n", "6", "-c", "2", "-O", "csv",
        "-o", str(out_file), servers["embed"],
    )  # fmt: skip
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == b"", "the report goes to -o"
    rows = out_file.read_text().splitlines()
    assert rows[0] == "duration (ms),status,error" and len(rows) == 7
    assert all(r.endswith(",OK,") for r in rows[1:])


def test_server_streaming_call_lasts_until_the_stream_ends(servers) -> None:
    data = {"messages": [{"role": "user", "content": "Count to ten."}], "params": {"max_tokens": 4}}
    doc = report(ghz(
        "--call", "ragline.v1.Generate/GenerateStream", "-d", json.dumps(data),
        "-c", "1", "-n", "2", "-O", "json", servers["generate"],
    ))  # fmt: skip
    assert doc["statusCodeDistribution"] == {"OK": 2} and doc["count"] == 2
    assert doc["fastest"] > 1_000_000, "a 4-token stream takes milliseconds, not microseconds"


def test_duration_mode_ends_on_timeout(servers) -> None:
    args = ("--call", EMBED, "-d", '{"texts": ["x"]}', "-c", "2", "-O", "json", servers["embed"])
    doc = report(ghz(*args, "-z", "1s", "--duration-stop", "wait"))
    assert doc["endReason"] == "timeout" and doc["count"] > 4
    assert doc["statusCodeDistribution"] == {"OK": doc["count"]}
    assert 1.0 <= doc["total"] / 1e9 < 5.0
    # -x cuts a long -n short; --rps paces it: ~4 calls in a second, not 1000.
    doc = report(ghz(*args, "-n", "1000", "-x", "1s", "--rps", "4", "--duration-stop", "ignore"))
    assert doc["endReason"] == "timeout" and 3 <= doc["count"] <= 6


def test_ctrl_c_ends_early_and_still_reports(servers) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadtest", "grpc", "--progress", "--call", EMBED,
         "-d", '{"texts": ["x"]}', "-c", "1", "-n", "1000", "--rps", "5", "-O", "json",
         servers["embed"]],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        first = proc.stderr.readline()  # a progress line: the run is under way
        assert "done (of 1000)" in first
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    doc = json.loads(stdout)
    assert doc["endReason"] == "cancel" and 1 <= doc["count"] < 50


def test_mistakes_get_one_clear_line_and_exit_1(servers) -> None:
    def fails(*args: str) -> str:
        out = ghz(*args)
        err = out.stderr.decode()
        assert out.returncode == 1 and "Traceback" not in err, err
        assert err.startswith("loadtest grpc: ") and len(err.strip().splitlines()) == 1, err
        return err

    assert "has no method 'Embedd'; it has: Embed, Info" in fails(
        "--call", "ragline.v1.Embed/Embedd", servers["embed"]
    )
    err = fails("--call", "ragline.v1.Nope/X", servers["embed"])
    assert "the server has: " in err and "ragline.v1.Embed" in err
    err = fails("--call", EMBED, "-d", '{"text": "x"}', servers["embed"])
    assert 'no field named "text"' in err and "ragline.v1.EmbedRequest" in err
    err = fails("--call", EMBED, "-d", '{"texts": "x"}', servers["embed"])
    assert "texts" in err
    # Nothing listens on a fresh port: the connect timeout, not a hang.
    err = fails("--call", EMBED, "--connect-timeout", "500ms", f"127.0.0.1:{free_port()}")
    assert "cannot connect" in err and "0.5s" in err
    err = fails("--call", EMBED, "-c", "0", servers["embed"])
    assert "-c" in err
