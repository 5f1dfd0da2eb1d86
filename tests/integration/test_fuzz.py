"""Bad input, generated: every HTTP endpoint and every gRPC method against real processes.

Hypothesis builds the inputs: arbitrary JSON (wrong types, NaN/inf, huge and negative numbers,
deep nesting, invalid UTF-8 bytes), random protobuf messages built from each method's own
descriptor (every field type, extreme values, NaN/inf float32 vectors, odd unicode) and raw
random bytes as a request. The properties: no 5xx at the edge and every error is a JSON body
with a message; no ``UNKNOWN`` or ``INTERNAL`` from a stage and every error carries a message;
no call outlives its deadline; every process is still alive at the end.
"""

from __future__ import annotations

import asyncio
import json
import math
import struct
import time
from collections.abc import Iterator

import grpc
import httpx
import pytest
from google.protobuf import descriptor as pd
from google.protobuf import message_factory

from ragline.clients import wait_for_serving
from ragline.v1 import embed_pb2, generate_pb2, retrieve_pb2
from tests.conftest import ServiceProcess, free_port

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = pytest.mark.slow

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same inputs every run: a failure reproduces
    database=None,
)
GOOD_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
}
RPC_TIMEOUT = 30.0
SERVICES = {
    "embed": embed_pb2.DESCRIPTOR.services_by_name["Embed"],
    "retrieve": retrieve_pb2.DESCRIPTOR.services_by_name["Retrieve"],
    "generate": generate_pb2.DESCRIPTOR.services_by_name["Generate"],
}
METHODS = [(stage, m) for stage, svc in SERVICES.items() for m in svc.methods]


class Stack:
    def __init__(self, procs: dict[str, ServiceProcess], ports: dict[str, int]) -> None:
        self.procs = procs
        self.ports = ports
        self.base = f"http://127.0.0.1:{ports['api']}"

    def alive(self) -> None:
        for name, p in self.procs.items():
            assert p.proc.poll() is None, f"{name} died:\n{p.log()[-3000:]}"


@pytest.fixture(scope="module")
def stack(base_env, tmp_path_factory) -> Iterator[Stack]:
    logs = tmp_path_factory.mktemp("fuzz-logs")
    env = {**base_env, "RAGLINE_DATA_DIR": str(tmp_path_factory.mktemp("fuzz-data"))}
    ports = {n: free_port() for n in ("embed", "retrieve", "generate", "api")}
    procs = {
        "embed": ServiceProcess("embed", ["--port", str(ports["embed"])], logs, env),
        "retrieve": ServiceProcess("retrieve", ["--port", str(ports["retrieve"])], logs, env),
        # short answers keep generated requests cheap; the limit itself is under test
        "generate": ServiceProcess(
            "generate",
            [
                "--port",
                str(ports["generate"]),
                "--max-tokens-limit",
                "8",
                "--default-max-tokens",
                "4",
            ],
            logs,
            env,
        ),  # fmt: skip
    }

    async def ready() -> None:
        await asyncio.gather(
            *(
                wait_for_serving(f"127.0.0.1:{ports[n]}", f"ragline.v1.{n.title()}", 90)
                for n in SERVICES
            )
        )

    try:
        asyncio.run(ready())
        procs["api"] = ServiceProcess(
            "api",
            ["--port", str(ports["api"]),
             "--embed-address", f"127.0.0.1:{ports['embed']}",
             "--retrieve-address", f"127.0.0.1:{ports['retrieve']}",
             "--generate-address", f"127.0.0.1:{ports['generate']}",
             "--max-tokens", "4", "--cache-ttl-s", "0", "--max-body-bytes", "65536"],
            logs, env,
        )  # fmt: skip
        s = Stack(procs, ports)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{s.base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, procs["api"].log()[-3000:]
            time.sleep(0.2)
        r = httpx.post(
            f"{s.base}/documents",
            json={"text": "# Parking\n\nStaff park in garage B.", "document_id": "parking.md"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        yield s
        s.alive()
    finally:
        for p in procs.values():
            p.stop()


# --- HTTP ---------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=50)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
numbers = st.sampled_from([0, -1, 1, 2**31, 2**63, 10**30, 1.5, -0.0]) | st.integers()
odd_text = st.sampled_from(["", " ", "\x00", "\ud7ff" * 3, "🦜" * 10, "a" * 70_000, "\n\t"])


def chat_bodies() -> st.SearchStrategy:
    field = {
        "query": st.text(max_size=80) | odd_text | json_values,
        "top_k": numbers | json_values,
        "max_tokens": numbers | json_values,
        "stream": st.booleans() | json_values,
    }
    return st.fixed_dictionaries({}, optional=field) | json_values


def openai_bodies() -> st.SearchStrategy:
    message = st.fixed_dictionaries(
        {},
        optional={
            "role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "x"])
            | json_values,
            "content": st.text(max_size=60)
            | odd_text
            | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text()}))
            | json_values,
        },
    )
    field = {
        "model": st.text(max_size=10) | json_values,
        "messages": st.lists(message, max_size=3) | json_values,
        "max_tokens": numbers | json_values,
        "temperature": numbers | json_values,
        "top_p": numbers | json_values,
        "stream": st.booleans(),
        "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=5) | json_values,
        "seed": numbers,
    }
    return st.fixed_dictionaries({}, optional=field) | json_values


def document_bodies() -> st.SearchStrategy:
    field = {
        "text": st.text(max_size=200) | odd_text | json_values,
        "document_id": st.text(max_size=40)
        | st.sampled_from(["../../etc/passwd", "/abs/path", "a/../../b", "..", "\x00"])
        | json_values,
        "metadata": st.dictionaries(st.text(max_size=8), st.text(max_size=8)) | json_values,
    }
    return st.fixed_dictionaries({}, optional=field) | json_values


def check_http(r: httpx.Response) -> None:
    assert r.status_code < 500, f"{r.status_code}: {r.text[:500]}"
    if r.status_code >= 400:
        body = r.json()
        assert body["error"]["message"], body
    assert "Traceback" not in r.text


@pytest.mark.parametrize(
    "path,bodies",
    [("/chat", chat_bodies()), ("/v1/chat/completions", openai_bodies()),
     ("/documents", document_bodies())],
)  # fmt: skip
def test_http_json_bodies(stack: Stack, path: str, bodies: st.SearchStrategy) -> None:
    @FUZZ
    @given(body=bodies)
    def run(body) -> None:
        check_http(httpx.post(stack.base + path, json=body, timeout=RPC_TIMEOUT))

    run()
    stack.alive()


@pytest.mark.parametrize("path", ["/chat", "/v1/chat/completions", "/documents"])
def test_http_raw_bodies(stack: Stack, path: str) -> None:
    specials = [
        b"\xff\xfe\xfd not utf-8",
        b'{"query": "\xc3\x28"}',
        b'{"query": NaN, "top_k": Infinity}',
        b'{"query": "x", "top_k": 1e999}',
        b"[" * 5000 + b"]" * 5000,
        b'{"a":' * 3000 + b"1" + b"}" * 3000,
        b"",
        b"null",
        b'"just a string"',
        b"x" * 70_000,  # over --max-body-bytes: 413
    ]

    @FUZZ
    @given(body=st.binary(max_size=300) | st.sampled_from(specials))
    def run(body: bytes) -> None:
        r = httpx.post(
            stack.base + path,
            content=body,
            headers={"content-type": "application/json"},
            timeout=RPC_TIMEOUT,
        )
        check_http(r)
        assert r.status_code != 200 or body in (b"null",) or json.loads(body) is not None

    run()
    stack.alive()


def test_malformed_uploads_and_path_traversal(stack: Stack) -> None:
    cases = [
        ("report.pdf", b"this is not a pdf at all"),
        ("report.pdf", b"%PDF-1.7\n" + b"\x00" * 200),
        ("../../../etc/passwd.md", b"# evil\n\nTrying to escape."),
        ("..\\..\\win.txt", b"backslashes"),
        ("notes.md", b"\xff\xfe not utf-8 \xc3\x28"),
        ("", b"no name"),
        ("payload.exe", b"MZ\x90\x00"),
        ("big.txt", b"a " * 40_000),  # over the body limit
        ("x" * 5000 + ".md", b"# Long name\n\nfine."),
        ("nul\x00.md", b"# nul\n\nbyte in the name"),
    ]
    for name, content in cases:
        r = httpx.post(
            f"{stack.base}/documents", files={"file": (name, content)}, timeout=RPC_TIMEOUT
        )
        check_http(r)
        if r.status_code == 200:
            doc_id = r.json()["document_id"]
            assert "/" not in doc_id and "\\" not in doc_id and ".." not in doc_id, doc_id
    # a multipart body without the file field, and a broken multipart body
    r = httpx.post(f"{stack.base}/documents", data={"document_id": "x"}, timeout=RPC_TIMEOUT)
    check_http(r)
    assert r.status_code == 400
    r = httpx.post(
        f"{stack.base}/documents",
        content=b'--b\r\nContent-Disposition: form-data; name="file"\r\n\r\nunterminated',
        headers={"content-type": "multipart/form-data; boundary=b"},
        timeout=RPC_TIMEOUT,
    )
    check_http(r)
    stack.alive()


# --- gRPC ---------------------------------------------------------------------------------

FD = pd.FieldDescriptor
INT_RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}


def float32_vectors() -> st.SearchStrategy:
    special = [math.nan, math.inf, -math.inf, 0.0, 1e38, -1e-45]
    dims = st.sampled_from([0, 1, 3, 383, 384, 385])
    return dims.flatmap(
        lambda d: st.lists(
            st.sampled_from(special) | st.floats(width=32, allow_nan=False), min_size=d,
            max_size=d,
        ).map(lambda xs: struct.pack(f"<{len(xs)}f", *xs))
    )  # fmt: skip


def field_values(field: pd.FieldDescriptor, depth: int) -> st.SearchStrategy:
    t = field.type
    if t == FD.TYPE_STRING:
        return st.text(max_size=40) | st.sampled_from(["", "default", "a" * 20_000, "\u0000"])
    if t == FD.TYPE_BYTES:
        return st.binary(max_size=64) | float32_vectors()
    if t == FD.TYPE_BOOL:
        return st.booleans()
    if t in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        return st.floats(width=32 if t == FD.TYPE_FLOAT else 64)
    if t == FD.TYPE_ENUM:
        return st.integers(min_value=-(2**31), max_value=2**31 - 1) | st.sampled_from(
            [v.number for v in field.enum_type.values]
        )
    if t in INT_RANGES:
        lo, hi = INT_RANGES[t]
        return st.integers(min_value=lo, max_value=hi) | st.sampled_from([lo, hi, 0, 1, 5])
    if t == FD.TYPE_MESSAGE:
        return messages(field.message_type, depth + 1)
    raise AssertionError(f"no strategy for field type {t} of {field.full_name}")


def _is_map(field: pd.FieldDescriptor) -> bool:
    return field.type == FD.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


def messages(desc: pd.Descriptor, depth: int = 0) -> st.SearchStrategy:
    cls = message_factory.GetMessageClass(desc)
    if depth > 3:
        return st.just(cls())
    fields = {}
    for f in desc.fields:
        if _is_map(f):
            k, v = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
            fields[f.name] = st.dictionaries(field_values(k, depth), field_values(v, depth),
                                             max_size=4)  # fmt: skip
        elif f.is_repeated:
            fields[f.name] = st.lists(field_values(f, depth), max_size=5)
        else:
            fields[f.name] = field_values(f, depth)

    def build(values: dict) -> object:
        m = cls()
        for name, value in values.items():
            f = desc.fields_by_name[name]
            if _is_map(f):
                target = getattr(m, name)
                for k, v in value.items():
                    if f.message_type.fields_by_name["value"].type == FD.TYPE_MESSAGE:
                        target[k].CopyFrom(v)
                    else:
                        target[k] = v
            elif f.is_repeated:
                if f.type == FD.TYPE_MESSAGE:
                    getattr(m, name).extend(value)
                else:
                    getattr(m, name).extend(value)
            elif f.type == FD.TYPE_MESSAGE:
                getattr(m, name).CopyFrom(value)
            else:
                setattr(m, name, value)
        return m

    return st.fixed_dictionaries({}, optional=fields).map(build)


def call_raw(channel: grpc.Channel, method: pd.MethodDescriptor, payload: bytes) -> None:
    path = f"/{method.containing_service.full_name}/{method.name}"
    try:
        if method.server_streaming:
            stream = channel.unary_stream(path)(payload, timeout=RPC_TIMEOUT)
            for _ in stream:
                pass
        else:
            channel.unary_unary(path)(payload, timeout=RPC_TIMEOUT)
    except grpc.RpcError as exc:
        code = exc.code()
        assert code in GOOD_CODES, f"{path} -> {code.name}: {exc.details()}"
        assert exc.details(), f"{path} -> {code.name} without a message"


@pytest.mark.parametrize("stage,method", METHODS, ids=[f"{s}.{m.name}" for s, m in METHODS])
def test_grpc_random_messages(stack: Stack, stage: str, method: pd.MethodDescriptor) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{stack.ports[stage]}") as channel:

        @FUZZ
        @given(request=messages(method.input_type))
        def run(request) -> None:
            call_raw(channel, method, request.SerializeToString())

        run()
    stack.alive()


@pytest.mark.parametrize("stage,method", METHODS, ids=[f"{s}.{m.name}" for s, m in METHODS])
def test_grpc_random_bytes(stack: Stack, stage: str, method: pd.MethodDescriptor) -> None:
    not_utf8 = b"\x0a\x03\xff\xfe\xfd"  # field 1 (a string in every request) holding bad UTF-8
    with grpc.insecure_channel(f"127.0.0.1:{stack.ports[stage]}") as channel:

        @FUZZ
        @given(payload=st.binary(max_size=200) | st.sampled_from([not_utf8, b"\xff" * 10]))
        def run(payload: bytes) -> None:
            call_raw(channel, method, payload)

        run()
    stack.alive()
