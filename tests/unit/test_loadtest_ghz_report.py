"""ghz's report, data and flags in `loadtest grpc`, on recorded calls (no sockets)."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime

import grpc
import pytest

from loadtest import grpcload
from loadtest.grpcreport import Call, Report, render, summary
from ragline.v1 import embed_pb2, retrieve_pb2

MS = 1_000_000


def report(latencies_ms, statuses=None, count_errors=False) -> Report:
    statuses = statuses or ["OK"] * len(latencies_ms)
    calls = [
        Call(
            1_700_000_000_000_000_000 + i * MS,
            int(ms * MS),
            status,
            "" if status == "OK" else f"rpc error: code = {status} desc = x",
        )
        for i, (ms, status) in enumerate(zip(latencies_ms, statuses, strict=True))
    ]
    start = calls[0].timestamp_ns
    return Report(calls, 2_000 * MS, {"call": "a.B/C"}, start, count_errors=count_errors)


def test_ghz_json_has_every_documented_field_in_ghz_units() -> None:
    doc = json.loads(render(report([float(i) for i in range(1, 101)]), "json"))
    for key in ("date", "endReason", "options", "count", "total", "average", "fastest",
                "slowest", "rps", "errorDistribution", "statusCodeDistribution",
                "latencyDistribution", "histogram", "details"):  # fmt: skip
        assert key in doc, key
    assert doc["count"] == 100 and doc["total"] == 2_000 * MS
    assert doc["rps"] == pytest.approx(100 / 2.0), "count / total seconds"
    assert doc["fastest"] == 1 * MS and doc["slowest"] == 100 * MS
    assert doc["average"] == int(50.5 * MS)
    assert all(isinstance(doc[k], int) for k in ("total", "average", "fastest", "slowest"))
    assert [d["percentage"] for d in doc["latencyDistribution"]] == [10, 25, 50, 75, 90, 95, 99]
    assert {d["percentage"]: d["latency"] for d in doc["latencyDistribution"]}[95] == 95 * MS
    assert doc["statusCodeDistribution"] == {"OK": 100} and doc["errorDistribution"] == {}
    datetime.fromisoformat(doc["date"].replace("Z", "+00:00"))  # RFC 3339
    detail = doc["details"][0]
    assert set(detail) == {"timestamp", "latency", "error", "status"}
    assert detail["latency"] == 1 * MS and detail["status"] == "OK"
    hist = doc["histogram"]
    assert sum(b["count"] for b in hist) == 100
    assert hist[0]["mark"] == pytest.approx(0.001) and hist[-1]["mark"] == pytest.approx(0.1)
    assert sum(b["frequency"] for b in hist) == pytest.approx(1.0)


def test_errors_are_distributed_by_go_status_name_and_left_out_of_latency() -> None:
    r = report([1, 2, 300, 400], ["OK", "OK", "Unavailable", "InvalidArgument"])
    doc = r.to_ghz()
    assert doc["count"] == 4
    assert doc["statusCodeDistribution"] == {"OK": 2, "Unavailable": 1, "InvalidArgument": 1}
    assert doc["errorDistribution"] == {
        "rpc error: code = Unavailable desc = x": 1,
        "rpc error: code = InvalidArgument desc = x": 1,
    }
    assert doc["slowest"] == 2 * MS, "errors leave latency stats unless --count-errors"
    counted = report([1, 2, 300, 400], ["OK", "OK", "Unavailable", "InvalidArgument"], True)
    assert counted.to_ghz()["slowest"] == 400 * MS


def test_go_status_names_cover_every_grpc_code() -> None:
    from loadtest.grpcreport import GO_CODE_NAMES

    assert set(GO_CODE_NAMES) == set(grpc.StatusCode)
    assert GO_CODE_NAMES[grpc.StatusCode.CANCELLED] == "Canceled"  # Go's spelling


def test_summary_and_csv_read_like_ghz() -> None:
    r = report([10, 20, 30], ["OK", "OK", "Unavailable"])
    text = summary(r)
    expected = (
        "Summary:", "  Count:\t3", "Requests/sec:\t1.50", "Response time histogram:",
        "Latency distribution:", "  50 % in 10.00 ms", "Status code distribution:",
        "  [OK]\t2 responses", "  [Unavailable]\t1 responses", "Error distribution:",
    )  # fmt: skip
    for line in expected:
        assert line in text, line
    rows = list(csv.reader(io.StringIO(render(r, "csv"))))
    assert rows[0] == ["duration (ms)", "status", "error"]
    assert rows[1] == ["10.00", "OK", ""] and rows[3][1] == "Unavailable"
    with pytest.raises(ValueError, match="summary, json, pretty or csv"):
        render(r, "html")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("20s", 20), ("500ms", 0.5), ("1m30s", 90), ("1h", 3600), ("250us", 250e-6), ("3", 3)],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert grpcload.parse_duration(text) == pytest.approx(seconds)


def test_bad_duration_and_call_say_what_to_write() -> None:
    with pytest.raises(grpcload.UsageError, match="500ms"):
        grpcload.parse_duration("5 minutes")
    assert grpcload.parse_call("ragline.v1.Embed/Embed") == ("ragline.v1.Embed", "Embed")
    assert grpcload.parse_call("ragline.v1.Embed.Embed") == ("ragline.v1.Embed", "Embed")
    with pytest.raises(grpcload.UsageError, match="Service/Method"):
        grpcload.parse_call("Embed")


def method(module, service: str, name: str) -> grpcload.Method:
    from google.protobuf import descriptor_pool

    pool = descriptor_pool.Default()
    module.DESCRIPTOR  # noqa: B018 - the generated module registers its file in the pool
    return grpcload.resolve(pool, service, name)


def test_data_array_is_sent_round_robin_with_template_variables() -> None:
    m = method(embed_pb2, "ragline.v1.Embed", "Embed")
    data = grpcload.DataSource(
        '[{"texts": ["a {{.RequestNumber}} {{.WorkerID}}"]}, {"texts": ["b {{ .MethodName }}"],'
        ' "kind": "INPUT_KIND_QUERY"}]',
        m,
    )
    first, second, third = (data.message(n, worker=3) for n in range(3))
    assert list(first.texts) == ["a 0 g3"]
    assert list(second.texts) == ["b Embed"] and second.kind == embed_pb2.INPUT_KIND_QUERY
    assert list(third.texts) == ["a 2 g3"]
    plain = grpcload.DataSource('{"texts": ["x"]}', m)
    assert plain.message(0, 0) == plain.message(7, 1)


def test_data_that_does_not_fit_the_message_fails_before_the_run() -> None:
    m = method(retrieve_pb2, "ragline.v1.Retrieve", "Search")
    with pytest.raises(grpcload.UsageError, match='no field named "colection"'):
        grpcload.DataSource('{"colection": "default"}', m)
    with pytest.raises(grpcload.UsageError, match="not JSON"):
        grpcload.DataSource("{texts: 1}", m)
    with pytest.raises(grpcload.UsageError, match="unknown template variable"):
        grpcload.DataSource('{"collection": "{{.Nope}}"}', m)
    with pytest.raises(grpcload.UsageError, match="has no method 'Find'; it has: "):
        method(retrieve_pb2, "ragline.v1.Retrieve", "Find")


def test_flags_and_ghz_config_files(tmp_path) -> None:
    cfg = tmp_path / "cfg" / "embed.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps({
        "call": "ragline.v1.Embed/Embed", "host": "10.0.0.1:50051", "insecure": True,
        "proto": "../protos/embed.proto", "import-paths": ["../protos"],
        "data": {"texts": ["x"]}, "c": 4, "n": 40, "timeout": "2s",
    }))  # fmt: skip
    opts, _ = grpcload.parse_args(["--config", str(cfg), "-c", "8"])
    assert (opts.call, opts.host, opts.insecure) == (
        "ragline.v1.Embed/Embed",
        "10.0.0.1:50051",
        True,
    )
    assert opts.concurrency == 8, "flags override the file"
    assert opts.total == 40
    assert opts.proto == str((tmp_path / "protos" / "embed.proto").resolve())
    assert opts.import_paths == [str((tmp_path / "protos").resolve())]
    assert json.loads(opts.data) == {"texts": ["x"]} and opts.timeout_s == 2
    with pytest.raises(grpcload.UsageError, match="--call"):
        grpcload.parse_args(["127.0.0.1:1"])
    with pytest.raises(grpcload.UsageError, match="-O"):
        grpcload.parse_args(["--call", "a.B/C", "h:1", "-O", "html"])
    cfg.write_text('{"call": "a.B/C", "qps": 3}')
    with pytest.raises(grpcload.UsageError, match="unsupported keys"):
        grpcload.parse_args(["--config", str(cfg)])


def test_every_shipped_ghz_config_names_a_real_method_with_valid_data() -> None:
    from pathlib import Path

    from google.protobuf import descriptor_pool

    from ragline.v1 import generate_pb2

    for module in (embed_pb2, retrieve_pb2, generate_pb2):
        module.DESCRIPTOR  # noqa: B018
    root = Path(grpcload.__file__).parent / "ghz"
    configs = sorted(root.glob("*.json"))
    assert {p.stem for p in configs} == {"embed", "retrieve", "generate"}
    for path in configs:
        opts, _ = grpcload.parse_args(["--config", str(path)])
        assert Path(opts.proto).exists() and opts.insecure
        service, name = grpcload.parse_call(opts.call)
        m = grpcload.resolve(descriptor_pool.Default(), service, name)
        grpcload.DataSource(opts.data, m).message(0, 0)
    search = json.loads((root / "retrieve.json").read_text())["data"]
    msg = grpcload.DataSource(
        json.dumps(search), method(retrieve_pb2, "ragline.v1.Retrieve", "Search")
    )
    assert len(msg.message(0, 0).vector) == 384 * 4
