"""`loadtest grpc`: a gRPC load generator with ghz's flags and reports, for machines without ghz.

    loadtest grpc --call ragline.v1.Embed/Embed \\
        -d '{"texts": ["hello {{.RequestNumber}}"]}' -c 8 -n 400 127.0.0.1:50051

Messages are built from JSON against the method's descriptors, found by server reflection
(every ragline server serves it) or from `--proto` (compiled at run time with grpcio-tools) or
`--protoset` (a FileDescriptorSet). Unary and server-streaming methods; a stream's latency runs
until it ends. `-c` workers share `--connections` channels round-robin; `-n` calls in all, or
`-z` a duration; `--rps` paces the whole run; `-x` caps it; `-t` bounds every call. As in ghz,
the connection is plaintext (ragline's loopback default; ghz's is TLS) unless TLS files are
given (`--cacert`, `--cert`/`--key`). The report (`-O summary|json|pretty|csv`) is ghz's: see
`loadtest/grpcreport.py`. Python callers: ``report = await run(Options(...))`` and
``report.to_ghz()`` (the JSON document) or ``render(report, fmt)``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

from loadtest.grpcreport import GO_CODE_NAMES, Call, Report, error_text, render


class UsageError(Exception):
    """A flag, the data or the target is wrong: one line that says what to fix."""


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Go's duration syntax (``500ms``, ``20s``, ``1m30s``) or plain seconds; returns seconds."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise UsageError(f"bad duration {text!r}: use e.g. 500ms, 20s, 1m30s")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def parse_call(call: str) -> tuple[str, str]:
    """``pkg.Service/Method`` or ``pkg.Service.Method`` -> (service, method)."""
    if "/" in call:
        service, _, method = call.rpartition("/")
    else:
        service, _, method = call.rpartition(".")
    if not service or not method:
        raise UsageError(f"--call {call!r}: expected package.Service/Method")
    return service, method


# --- descriptors ----------------------------------------------------------------------------


def pool_from_protoset(path: Path) -> descriptor_pool.DescriptorPool:
    fds = descriptor_pb2.FileDescriptorSet()
    try:
        fds.ParseFromString(path.read_bytes())
    except OSError as exc:
        raise UsageError(f"--protoset {path}: {exc.strerror}") from None
    except Exception:
        raise UsageError(f"--protoset {path}: not a FileDescriptorSet") from None
    pool = descriptor_pool.DescriptorPool()
    pending = list(fds.file)
    while pending:  # add files after their dependencies, whatever order the set has
        added = [f for f in pending if all(_has_file(pool, d) for d in f.dependency)]
        if not added:
            missing = sorted({d for f in pending for d in f.dependency if not _has_file(pool, d)})
            raise UsageError(f"--protoset {path}: missing imports {missing} (--include_imports)")
        for f in added:
            pool.Add(f)
            pending.remove(f)
    return pool


def _has_file(pool: descriptor_pool.DescriptorPool, name: str) -> bool:
    try:
        pool.FindFileByName(name)
        return True
    except KeyError:
        return False


def pool_from_proto(proto: Path, import_paths: Sequence[str]) -> descriptor_pool.DescriptorPool:
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError:
        raise UsageError(
            "--proto needs grpcio-tools (pip install grpcio-tools); or use --protoset, or "
            "leave both out to use server reflection"
        ) from None
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        includes = [f"-I{p}" for p in (*import_paths, str(proto.parent), str(well_known))]
        args = ["protoc", *includes, "--include_imports", f"--descriptor_set_out={out}"]
        if protoc.main([*args, str(proto)]) != 0 or not out.exists():
            raise UsageError(f"--proto {proto}: protoc could not compile it (see above)")
        return pool_from_protoset(out)


def pool_from_reflection(
    host: str,
    creds: grpc.ChannelCredentials | None,
    timeout: float,
    hint: str = "",
    channel_options: Sequence[tuple[str, str]] = (),
) -> descriptor_pool.DescriptorPool:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    channel = (
        grpc.secure_channel(host, creds, channel_options) if creds else grpc.insecure_channel(host)
    )
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        channel.close()
        raise UsageError(f"cannot connect to {host} within {timeout:g}s{hint}") from None
    # The channel stays open for the pool's lazy lookups; the process ends soon after.
    db = ProtoReflectionDescriptorDatabase(channel)
    pool = descriptor_pool.DescriptorPool(db)
    _SERVICES[id(pool)] = db.get_services
    return pool


_SERVICES: dict[int, object] = {}  # pool -> how to list the server's services (reflection)


@dataclass
class Method:
    path: str  # /pkg.Service/Method
    service: str
    name: str
    request: type
    response: type
    server_streaming: bool


def resolve(pool: descriptor_pool.DescriptorPool, service: str, method: str) -> Method:
    try:
        svc = pool.FindServiceByName(service)
    except (KeyError, grpc.RpcError, Exception):  # reflection raises when the name is unknown
        raise UsageError(f"service {service!r} not found{_known_services(pool)}") from None
    m = svc.methods_by_name.get(method)
    if m is None:
        known = ", ".join(sorted(svc.methods_by_name))
        raise UsageError(f"{service} has no method {method!r}; it has: {known}")
    if m.client_streaming:
        raise UsageError(f"{service}/{method} is client-streaming: only unary and server streaming")
    return Method(
        f"/{service}/{method}",
        service,
        method,
        message_factory.GetMessageClass(m.input_type),
        message_factory.GetMessageClass(m.output_type),
        m.server_streaming,
    )


def _known_services(pool) -> str:
    names = _SERVICES.get(id(pool))
    try:
        found = sorted(names()) if names else []
    except grpc.RpcError:
        found = []
    return f"; the server has: {', '.join(found)}" if found else ""


# --- data -----------------------------------------------------------------------------------

_TEMPLATE = re.compile(r"\{\{\s*\.(\w+)\s*\}\}")


@dataclass
class DataSource:
    """The request data: one message or an array sent round-robin; ghz's template variables.

    Without template variables every payload is serialized once, before the run, so the load
    generator spends its CPU on calls rather than on JSON (it shares the machine with servers).
    """

    text: str
    method: Method
    templated: bool = field(init=False)
    parsed: list = field(init=False)
    _payloads: list[bytes] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.templated = bool(_TEMPLATE.search(self.text))
        sample = self._render(0, 0) if self.templated else self.text
        try:
            data = json.loads(sample)
        except json.JSONDecodeError as exc:
            raise UsageError(f"data is not JSON: {exc}") from None
        self.parsed = data if isinstance(data, list) else [data]
        if not self.parsed:
            raise UsageError("data is an empty array")
        # Fail before the run, not 200 times during it.
        self._payloads = [self._message(item).SerializeToString() for item in self.parsed]

    def _render(self, request_number: int, worker: int) -> str:
        now = time.time_ns()
        values = {
            "RequestNumber": request_number,
            "WorkerID": f"g{worker}",
            "UUID": uuid.uuid4(),
            "TimestampUnix": now // 10**9,
            "TimestampUnixMilli": now // 10**6,
            "TimestampUnixNano": now,
            "FullyQualifiedName": f"{self.method.service}.{self.method.name}",
            "MethodName": self.method.name,
            "ServiceName": self.method.service,
            "InputName": self.method.request.DESCRIPTOR.full_name,
            "OutputName": self.method.response.DESCRIPTOR.full_name,
        }

        def sub(m: re.Match) -> str:
            if m.group(1) not in values:
                raise UsageError(f"unknown template variable {{{{.{m.group(1)}}}}}")
            return str(values[m.group(1)])

        return _TEMPLATE.sub(sub, self.text)

    def _message(self, item):
        if not isinstance(item, dict):
            raise UsageError(f"data items must be JSON objects, got {type(item).__name__}")
        try:
            return json_format.ParseDict(item, self.method.request())
        except json_format.ParseError as exc:
            raise UsageError(
                f"data does not match {self.method.request.DESCRIPTOR.full_name}: {exc}"
            ) from None

    def message(self, request_number: int, worker: int):
        """The request for call `request_number` (0-based) made by `worker`."""
        if self.templated:
            data = json.loads(self._render(request_number, worker))
            items = data if isinstance(data, list) else [data]
            return self._message(items[request_number % len(items)])
        return self._message(self.parsed[request_number % len(self.parsed)])

    def payload(self, request_number: int, worker: int) -> bytes:
        if self.templated:
            return self.message(request_number, worker).SerializeToString()
        return self._payloads[request_number % len(self._payloads)]


def split_count_prefixed(blob: bytes) -> list[bytes] | None:
    """Varint-length-prefixed messages (protobuf's delimited format), or None if `blob` is not."""
    out, i = [], 0
    while i < len(blob):
        size = shift = 0
        while True:
            if i >= len(blob) or shift > 63:
                return None
            byte = blob[i]
            i += 1
            size |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        if i + size > len(blob):
            return None
        out.append(blob[i : i + size])
        i += size
    return out or None


@dataclass
class BinaryData:
    """ghz's -b/-B: one serialized message, or several count-prefixed ones sent round-robin."""

    blob: bytes
    method: Method
    _payloads: list[bytes] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        # As ghz: the count-prefixed reading wins when every piece parses as the request type.
        pieces = split_count_prefixed(self.blob)
        if pieces and all(self._parses(p) for p in pieces):
            self._payloads = pieces
        elif self._parses(self.blob):
            self._payloads = [self.blob]
        else:
            name = self.method.request.DESCRIPTOR.full_name
            raise UsageError(f"binary data is not a serialized {name} (nor count-prefixed ones)")

    def _parses(self, data: bytes) -> bool:
        try:
            self.method.request.FromString(data)
            return True
        except Exception:  # DecodeError, or a nested message that does not decode
            return False

    def message(self, request_number: int, worker: int):
        return self.method.request.FromString(self.payload(request_number, worker))

    def payload(self, request_number: int, worker: int) -> bytes:
        return self._payloads[request_number % len(self._payloads)]


# --- the run --------------------------------------------------------------------------------


@dataclass
class Options:
    """One run's settings, named as ghz's flags; `parse_args` builds it from a command line."""

    host: str
    call: str
    data: str = "{}"
    binary: bytes | None = None  # -b/-B: serialized request(s) instead of JSON data
    metadata: dict[str, str] = field(default_factory=dict)
    concurrency: int = 50
    total: int = 200
    duration_s: float = 0.0  # -z: overrides -n
    max_duration_s: float = 0.0  # -x
    duration_stop: str = "close"  # what -z/-x do to calls in flight: close | wait | ignore
    rps: float = 0.0
    timeout_s: float = 20.0  # 0: no deadline, as ghz's -t 0
    connect_timeout_s: float = 10.0
    connections: int = 1
    skip_first: int = 0
    count_errors: bool = False
    insecure: bool = True  # plaintext; False when TLS files are given
    cacert: str = ""
    cert: str = ""
    key: str = ""
    cname: str = ""
    proto: str = ""
    protoset: str = ""
    import_paths: list[str] = field(default_factory=list)
    name: str = ""
    tags: dict[str, str] = field(default_factory=dict)

    def credentials(self) -> grpc.ChannelCredentials | None:
        if self.insecure:
            return None
        if bool(self.cert) != bool(self.key):
            raise UsageError("--cert and --key go together (the client certificate and its key)")
        read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
        try:
            return grpc.ssl_channel_credentials(read(self.cacert), read(self.key), read(self.cert))
        except OSError as exc:
            raise UsageError(f"TLS file {exc.filename}: {exc.strerror}") from None

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.cname)] if self.cname else []

    def connect_hint(self) -> str:
        return (
            " (a TLS server? give --cacert)"
            if self.insecure
            else " (a plaintext server? leave out the TLS files or add --insecure)"
        )

    def ghz_options(self) -> dict:
        try:
            data = json.loads(self.data) if self.binary is None and self.data.strip() else None
        except json.JSONDecodeError:
            data = self.data
        return {
            "call": self.call,
            "proto": self.proto,
            "protoset": self.protoset,
            "importPaths": self.import_paths,
            "host": self.host,
            "n": self.total,
            "c": self.concurrency,
            "z": int(self.duration_s * 1e9),
            "x": int(self.max_duration_s * 1e9),
            "rps": self.rps,
            "timeout": int(self.timeout_s * 1e9),
            "dialTimeout": int(self.connect_timeout_s * 1e9),
            "connections": self.connections,
            "data": data,
            "metadata": self.metadata,
            "binary": self.binary is not None,
            "insecure": self.insecure,
            "skipFirst": self.skip_first,
            "CPUs": os.cpu_count(),
            "name": self.name,
            "tags": self.tags,
        }


def load_method(opts: Options) -> Method:
    """The method's descriptors from --protoset, --proto or the server's reflection service."""
    service, method = parse_call(opts.call)
    if opts.protoset:
        pool = pool_from_protoset(Path(opts.protoset))
    elif opts.proto:
        pool = pool_from_proto(Path(opts.proto), opts.import_paths)
    else:
        pool = pool_from_reflection(
            opts.host,
            opts.credentials(),
            opts.connect_timeout_s,
            opts.connect_hint(),
            opts.channel_options(),
        )
    return resolve(pool, service, method)


async def run(opts: Options, method: Method | None = None, progress: bool = False) -> Report:
    """Run the load; returns ghz's report. Raises UsageError for what the user must fix."""
    if opts.concurrency < 1 or opts.connections < 1:
        raise UsageError("-c and --connections must be at least 1")
    if opts.duration_s <= 0 and opts.total < 1:
        raise UsageError("-n must be at least 1 (or give -z)")
    if opts.duration_stop not in ("close", "wait", "ignore"):
        raise UsageError(f"--duration-stop {opts.duration_stop!r}: use close, wait or ignore")
    method = method or await asyncio.to_thread(load_method, opts)
    data = BinaryData(opts.binary, method) if opts.binary is not None else None
    data = data or DataSource(opts.data, method)
    creds = opts.credentials()
    channel_options = opts.channel_options()
    channels = [
        grpc.aio.secure_channel(opts.host, creds, channel_options)
        if creds
        else grpc.aio.insecure_channel(opts.host)
        for _ in range(min(opts.connections, opts.concurrency))
    ]
    try:
        try:
            await asyncio.wait_for(
                asyncio.gather(*(ch.channel_ready() for ch in channels)), opts.connect_timeout_s
            )
        except TimeoutError:
            raise UsageError(
                f"cannot connect to {opts.host} within {opts.connect_timeout_s:g}s"
                + opts.connect_hint()
            ) from None
        return await _load(opts, method, data, channels, progress)
    finally:
        await asyncio.gather(*(ch.close() for ch in channels))


_CLOSED = error_text(grpc.StatusCode.CANCELLED, "grpc: the client connection is closing")


async def _load(opts: Options, method: Method, data, channels, progress: bool) -> Report:
    # Payloads are serialized before the call (cached when there are no templates), so the
    # stubs pass bytes through.
    stubs = [
        (ch.unary_stream if method.server_streaming else ch.unary_unary)(
            method.path, request_serializer=None, response_deserializer=method.response.FromString
        )
        for ch in channels
    ]
    metadata = tuple(opts.metadata.items()) or None
    timeout = opts.timeout_s if opts.timeout_s > 0 else None
    calls: list[Call] = []
    next_number = 0
    end_reason = "normal"
    stopping = False  # -z or -x reached: no new calls
    start_ns = time.time_ns()
    t0 = time.perf_counter()

    def take() -> int | None:
        nonlocal next_number
        if stopping or (not opts.duration_s and next_number >= opts.total):
            return None
        n = next_number
        next_number += 1
        return n

    async def one(worker: int, n: int) -> None:
        stub = stubs[worker % len(stubs)]
        request = data.payload(n, worker)
        started_ns = time.time_ns()
        t = time.perf_counter()
        status, error = "OK", ""
        try:
            if method.server_streaming:
                async for _ in stub(request, timeout=timeout, metadata=metadata):
                    pass
            else:
                await stub(request, timeout=timeout, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            status = GO_CODE_NAMES.get(exc.code(), str(exc.code()))
            error = error_text(exc.code(), exc.details())
        except asyncio.CancelledError:
            # ghz's --duration-stop close: calls cut off by -z/-x are reported as failed.
            if stopping and end_reason == "timeout" and opts.duration_stop == "close":
                latency = int((time.perf_counter() - t) * 1e9)
                calls.append(Call(started_ns, latency, "Canceled", _CLOSED))
            raise
        calls.append(Call(started_ns, int((time.perf_counter() - t) * 1e9), status, error))

    async def worker(w: int) -> None:
        while (n := take()) is not None:
            if opts.rps > 0:  # global pacing: call n starts no earlier than n / rps
                delay = t0 + n / opts.rps - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                    if stopping:
                        return
            await one(w, n)

    async def report_progress() -> None:
        target = f"{opts.duration_s:g}s" if opts.duration_s else str(opts.total)
        while True:
            await asyncio.sleep(1.0)
            elapsed = time.perf_counter() - t0
            errors = sum(c.status != "OK" for c in calls)
            print(
                f"[{elapsed:5.0f}s] {len(calls)} done (of {target})  "
                f"{len(calls) / elapsed:.1f} rps  {errors} errors",
                file=sys.stderr,
                flush=True,
            )

    reporter = asyncio.create_task(report_progress()) if progress else None
    workers = [asyncio.create_task(worker(w)) for w in range(opts.concurrency)]
    loop = asyncio.get_running_loop()

    def stop(reason: str) -> None:
        nonlocal end_reason, stopping
        if stopping:
            return
        stopping, end_reason = True, reason
        # -z/-x with --duration-stop wait let calls in flight finish (each bounded by -t).
        if reason == "cancel" or opts.duration_stop != "wait":
            for task in workers:
                task.cancel()

    # As ghz: -z ends the run with endReason "timeout", and so does -x cutting -n short.
    limit = opts.duration_s or opts.max_duration_s
    timer = loop.call_later(limit, stop, "timeout") if limit > 0 else None
    try:
        loop.add_signal_handler(signal.SIGINT, stop, "cancel")  # Ctrl-C still reports
    except (NotImplementedError, RuntimeError):  # not the main thread
        pass
    try:
        await asyncio.gather(*workers, return_exceptions=True)
    finally:
        try:
            loop.remove_signal_handler(signal.SIGINT)
        except (NotImplementedError, RuntimeError):
            pass
        if timer:
            timer.cancel()
        if reporter:
            reporter.cancel()
    total_ns = int((time.perf_counter() - t0) * 1e9)
    calls.sort(key=lambda c: c.timestamp_ns)
    return Report(
        calls=calls[opts.skip_first :],
        total_ns=total_ns,
        options=opts.ghz_options(),
        date_ns=start_ns,
        end_reason=end_reason,
        count_errors=opts.count_errors,
        name=opts.name,
        tags=opts.tags,
    )


# --- command line ---------------------------------------------------------------------------


def _json_object(text: str, what: str) -> dict[str, str]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{what} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{what} must be a JSON object")
    return {str(k): str(v) for k, v in value.items()}


# ghz config keys -> our argparse destinations. ghz's config file names options after the long
# flags ("total", "concurrency", "duration", "max-duration"); the one-letter names are read too.
_CONFIG_KEYS = {
    "call": "call", "proto": "proto", "protoset": "protoset", "import-paths": "import_paths",
    "host": "host", "insecure": "insecure", "data": "data", "data-file": "data_file",
    "binary-file": "binary_file", "metadata": "metadata", "metadata-file": "metadata_file",
    "total": "total", "n": "total", "concurrency": "concurrency", "c": "concurrency",
    "rps": "rps", "duration": "duration", "z": "duration", "max-duration": "max_duration",
    "x": "max_duration", "duration-stop": "duration_stop", "timeout": "timeout",
    "connect-timeout": "connect_timeout", "connections": "connections",
    "skipFirst": "skipFirst", "count-errors": "count_errors", "cacert": "cacert", "cert": "cert",
    "key": "key", "cname": "cname", "name": "name", "tags": "tags", "format": "format",
    "output": "output",
}  # fmt: skip
_CONFIG_PATHS = {"proto", "protoset", "data_file", "binary_file", "metadata_file", "cacert",
                 "cert", "key"}  # fmt: skip


def _config_defaults(path: Path) -> dict:
    """A ghz config file as argparse defaults; its paths are relative to the file."""
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise UsageError(f"--config {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"--config {path}: not JSON: {exc}") from None
    unknown = sorted(set(raw) - set(_CONFIG_KEYS))
    if unknown:
        raise UsageError(f"--config {path}: unsupported keys {unknown}")
    out = {}
    for key, value in raw.items():
        dest = _CONFIG_KEYS[key]
        if dest in _CONFIG_PATHS and value:
            value = str((path.parent / value).resolve())
        elif dest in ("total", "concurrency", "connections", "skipFirst"):
            value = int(value)
        elif dest == "import_paths":
            items = value if isinstance(value, list) else str(value).split(",")
            value = ",".join(str((path.parent / v).resolve()) for v in items)
        elif dest in ("data", "metadata", "tags") and not isinstance(value, str):
            value = json.dumps(value)
        elif dest in ("duration", "max_duration", "timeout", "connect_timeout"):
            value = str(value)
        out[dest] = value
    return out


def parse_args(argv: Sequence[str]) -> tuple[Options, argparse.Namespace]:
    p = argparse.ArgumentParser(
        prog="loadtest grpc",
        description="gRPC load with ghz's flags and report (https://ghz.sh/docs/options).",
    )
    p.add_argument("host", nargs="?", default="", help="address, e.g. 127.0.0.1:50051")
    p.add_argument("--config", default="", help="a ghz JSON config file (flags override it)")
    p.add_argument("--call", default="", help="package.Service/Method")
    p.add_argument("--proto", default="", help=".proto file (else --protoset or reflection)")
    p.add_argument("--protoset", default="", help="compiled FileDescriptorSet")
    p.add_argument("-i", "--import-paths", default="", help="comma-separated proto import paths")
    p.add_argument("-d", "--data", default=None, help="JSON request data (an array: round-robin)")
    p.add_argument("-D", "--data-file", default=None, help="file with the JSON data (- = stdin)")
    p.add_argument(
        "-b",
        "--binary",
        action="store_true",
        help="data is serialized message(s), from -B or stdin",
    )
    p.add_argument("-B", "--binary-file", default=None, help="file with serialized message(s)")
    p.add_argument("-m", "--metadata", default=None, help="JSON object of request metadata")
    p.add_argument("-M", "--metadata-file", default=None, help="file with the metadata JSON")
    p.add_argument("-c", "--concurrency", type=int, default=50, help="workers (default 50)")
    p.add_argument("-n", "--total", type=int, default=200, help="calls in all (default 200)")
    p.add_argument("-r", "--rps", type=float, default=0, help="calls per second (0: no limit)")
    p.add_argument("-z", "--duration", default="0", help="run for this long (overrides -n)")
    p.add_argument("-x", "--max-duration", default="0", help="stop after this long at most")
    p.add_argument(
        "--duration-stop",
        default="close",
        help="calls in flight when -z/-x ends: close (reported failed), wait, ignore",
    )
    p.add_argument("-t", "--timeout", default="20s", help="per call (default 20s)")
    p.add_argument("--connect-timeout", default="10s", help="to connect (default 10s)")
    p.add_argument("--connections", type=int, default=1, help="channels shared by the workers")
    p.add_argument("--skipFirst", type=int, default=0, help="leave the first N calls out")
    p.add_argument("--count-errors", action="store_true", help="errors count in latency stats")
    p.add_argument(
        "--insecure", action="store_true", help="plaintext (the default unless TLS files given)"
    )
    p.add_argument("--cacert", default="", help="CA certificate (PEM)")
    p.add_argument("--cert", default="", help="client certificate (PEM)")
    p.add_argument("--key", default="", help="client key (PEM)")
    p.add_argument("--cname", default="", help="server name to verify in its certificate")
    p.add_argument("--name", default="", help="a name for the report")
    p.add_argument("--tags", default=None, help="JSON object of tags for the report")
    p.add_argument("-O", "--format", default="summary", help="summary | json | pretty | csv")
    p.add_argument("-o", "--output", default="", help="write the report here (default stdout)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.add_argument(
        "--progress", action="store_true", help="progress on stderr even when it is not a TTY"
    )
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default="")
    config_path = pre.parse_known_args(argv)[0].config
    config = _config_defaults(Path(config_path)) if config_path else {}
    p.set_defaults(**config)
    ns = p.parse_args(argv)
    if not ns.call or not ns.host:
        raise UsageError(
            "give --call package.Service/Method and the host (or a --config with both)"
        )
    if ns.format not in ("summary", "json", "pretty", "csv"):
        raise UsageError(f"-O {ns.format!r}: use summary, json, pretty or csv")
    given = [f for f, v in (("-d", ns.data), ("-D", ns.data_file), ("-B", ns.binary_file)) if v]
    if len(given) > 1:
        raise UsageError(f"give one of -d, -D and -B, not {' and '.join(given)}")
    data = ns.data if ns.data is not None else "{}"
    if data == "@":  # old ghz: -d @ reads the JSON from stdin
        data = sys.stdin.read()
    if ns.data_file is not None:
        data = _read(ns.data_file, "-D")
    binary = None
    if ns.binary_file is not None or ns.binary:
        binary = _read(ns.binary_file or "-", "-B", binary=True)
    metadata = {}
    if ns.metadata is not None:
        metadata = _json_object(ns.metadata, "-m")
    elif ns.metadata_file is not None:
        metadata = _json_object(_read(ns.metadata_file, "-M"), "-M")
    tls_files = ns.cacert or ns.cert or ns.key or ns.cname
    # Plaintext unless TLS files are given (ragline's servers listen in plaintext on loopback);
    # --insecure, which ghz needs for plaintext, is accepted and changes nothing.
    if tls_files and "--insecure" in argv:
        raise UsageError("--insecure is plaintext: leave out --cacert/--cert/--key/--cname")
    opts = Options(
        host=ns.host,
        call=ns.call,
        data=data,
        binary=binary,
        metadata=metadata,
        concurrency=ns.concurrency,
        total=ns.total,
        duration_s=parse_duration(ns.duration),
        max_duration_s=parse_duration(ns.max_duration),
        duration_stop=ns.duration_stop,
        rps=ns.rps,
        timeout_s=parse_duration(ns.timeout),
        connect_timeout_s=parse_duration(ns.connect_timeout),
        connections=ns.connections,
        skip_first=ns.skipFirst,
        count_errors=ns.count_errors,
        insecure=not tls_files,
        cacert=ns.cacert,
        cert=ns.cert,
        key=ns.key,
        cname=ns.cname,
        proto=ns.proto,
        protoset=ns.protoset,
        import_paths=[p for p in ns.import_paths.split(",") if p],
        name=ns.name,
        tags=_json_object(ns.tags, "--tags") if ns.tags else {},
    )
    return opts, ns


def _read(path: str, flag: str, binary: bool = False):
    try:
        if path == "-":
            return sys.stdin.buffer.read() if binary else sys.stdin.read()
        return Path(path).read_bytes() if binary else Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"{flag} {path}: {exc.strerror}") from None


def main(argv: list[str] | None = None) -> int:
    try:
        opts, ns = parse_args(list(sys.argv[1:] if argv is None else argv))
        # Progress goes to stderr, never into the report; kept quiet when the report goes to
        # stdout and stderr is not a terminal (a script capturing both would get it mixed in).
        progress = not ns.quiet and (ns.progress or bool(ns.output) or sys.stderr.isatty())
        report = asyncio.run(run(opts, progress=progress))
    except UsageError as exc:
        # One line, whatever protobuf's messages carry (ParseError lists the fields below).
        print("loadtest grpc: " + " ".join(str(exc).split()), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("loadtest grpc: interrupted", file=sys.stderr)
        return 130
    text = render(report, ns.format)
    if ns.output:
        Path(ns.output).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
