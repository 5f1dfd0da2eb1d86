"""The pipeline with mutual TLS between the edge and every stage, and HTTPS at the edge.

Certificates are made here (a CA, a server certificate for 127.0.0.1/localhost, a client
certificate, and a client certificate from a different CA). Every stage requires a client
certificate signed by the CA; the edge presents one. A client without a certificate, with one
from another CA, or speaking plaintext is refused before any RPC runs.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import ssl
import time
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ragline import tls
from ragline.clients import wait_for_serving
from ragline.v1 import embed_pb2, embed_pb2_grpc
from tests.conftest import ServiceProcess, free_port

pytestmark = pytest.mark.slow
x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _cert(subject: str, key, issuer_name, issuer_key, *, ca: bool, server: bool = False):
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        b = b.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return b.sign(issuer_key, hashes.SHA256())


def make_pki(d: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for ca_name in ("ca", "other-ca"):
        ca_key = _key()
        ca_cert = _cert(f"ragline test {ca_name}", ca_key, None, ca_key, ca=True)
        (d / f"{ca_name}.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        out[ca_name] = d / f"{ca_name}.pem"
        leaves = [("server", True), ("client", False)] if ca_name == "ca" else [("rogue", False)]
        for leaf, server in leaves:
            key = _key()
            cert = _cert(leaf, key, ca_cert.subject, ca_key, ca=False, server=server)
            (d / f"{leaf}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            _write_key(key, d / f"{leaf}.key")
            out[leaf], out[leaf + "-key"] = d / f"{leaf}.pem", d / f"{leaf}.key"
    return out


@pytest.fixture(scope="module")
def mtls_stack(base_env, tmp_path_factory):
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    logs = tmp_path_factory.mktemp("mtls-logs")
    env = {**base_env, "RAGLINE_DATA_DIR": str(tmp_path_factory.mktemp("mtls-data"))}
    # the stages' own probes (and wait_for_serving below) present the client certificate
    client_env = {
        "RAGLINE_GRPC_TLS_CA": str(pki["ca"]),
        "RAGLINE_GRPC_TLS_CERT": str(pki["client"]),
        "RAGLINE_GRPC_TLS_KEY": str(pki["client-key"]),
    }
    server_args = ["--tls-cert", str(pki["server"]), "--tls-key", str(pki["server-key"]),
                   "--tls-client-ca", str(pki["ca"])]  # fmt: skip
    ports = {n: free_port() for n in ("embed", "retrieve", "generate", "api")}
    procs = [
        ServiceProcess(n, ["--port", str(ports[n]), *server_args], logs, env)
        for n in ("embed", "retrieve", "generate")
    ]
    edge_args = [
        "--port", str(ports["api"]),
        "--embed-address", f"127.0.0.1:{ports['embed']}",
        "--retrieve-address", f"127.0.0.1:{ports['retrieve']}",
        "--generate-address", f"127.0.0.1:{ports['generate']}",
        "--grpc-tls-ca", str(pki["ca"]),
        "--grpc-tls-cert", str(pki["client"]),
        "--grpc-tls-key", str(pki["client-key"]),
        "--tls-cert", str(pki["server"]),
        "--tls-key", str(pki["server-key"]),
        "--health-interval-s", "0.3",
    ]  # fmt: skip
    try:
        tls.configure_client(tls.ClientTLS(**{"ca": str(pki["ca"]), "cert": str(pki["client"]),
                                              "key": str(pki["client-key"])}))  # fmt: skip

        async def ready() -> None:
            await asyncio.gather(
                *(
                    wait_for_serving(f"127.0.0.1:{ports[n]}", f"ragline.v1.{n.title()}", 90)
                    for n in ("embed", "retrieve", "generate")
                )
            )

        try:
            asyncio.run(ready())
        except TimeoutError:
            pytest.fail("stages did not start:\n" + "\n".join(p.log()[-2000:] for p in procs))
        edge = ServiceProcess("api", edge_args, logs, env | client_env, label="api-mtls")
        procs.append(edge)
        base = f"https://127.0.0.1:{ports['api']}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(
                    f"{base}/readyz", verify=ssl.create_default_context(cafile=pki["ca"]), timeout=2
                ).is_success:
                    break
            except httpx.HTTPError:
                pass
            assert edge.proc.poll() is None and time.monotonic() < deadline, edge.log()[-3000:]
            time.sleep(0.2)
        yield base, ports, pki
    finally:
        tls.configure_client(None)
        for p in procs:
            p.stop()


def test_chat_answers_over_mutual_tls(mtls_stack) -> None:
    base, _, pki = mtls_stack
    r = httpx.post(
        f"{base}/documents",
        json={"text": "# Parking\n\nStaff park in garage B, level 2.", "document_id": "p.md"},
        verify=ssl.create_default_context(cafile=pki["ca"]),
        timeout=60,
    )
    assert r.status_code == 200, r.text
    r = httpx.post(
        f"{base}/chat",
        json={"query": "Where do staff park?", "max_tokens": 12},
        verify=ssl.create_default_context(cafile=pki["ca"]),
        timeout=120,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["answer"] and body["sources"][0]["id"] == "p.md#0"


async def _health(port: int, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    target = f"127.0.0.1:{port}"
    channel = (
        grpc.aio.secure_channel(target, credentials)
        if credentials is not None
        else grpc.aio.insecure_channel(target)
    )
    async with channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            return exc.code()


@pytest.mark.parametrize("stage", ["embed", "retrieve", "generate"])
async def test_clients_without_the_right_certificate_are_refused(mtls_stack, stage) -> None:
    _, ports, pki = mtls_stack
    ca = pki["ca"].read_bytes()
    good = grpc.ssl_channel_credentials(
        ca, pki["client-key"].read_bytes(), pki["client"].read_bytes()
    )
    no_cert = grpc.ssl_channel_credentials(ca)
    rogue = grpc.ssl_channel_credentials(
        ca, pki["rogue-key"].read_bytes(), pki["rogue"].read_bytes()
    )
    assert await _health(ports[stage], good) == grpc.StatusCode.OK
    assert await _health(ports[stage], no_cert) == grpc.StatusCode.UNAVAILABLE
    assert await _health(ports[stage], rogue) == grpc.StatusCode.UNAVAILABLE
    assert await _health(ports[stage], None) == grpc.StatusCode.UNAVAILABLE


async def test_a_data_rpc_without_a_certificate_never_runs(mtls_stack) -> None:
    _, ports, pki = mtls_stack
    creds = grpc.ssl_channel_credentials(pki["ca"].read_bytes())
    async with grpc.aio.secure_channel(f"127.0.0.1:{ports['embed']}", creds) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await embed_pb2_grpc.EmbedStub(channel).Embed(
                embed_pb2.EmbedRequest(texts=["hello"]), timeout=5
            )
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_stage_with_an_unreadable_certificate_exits_with_a_clear_message(
    base_env, tmp_path
) -> None:
    proc = ServiceProcess(
        "embed",
        ["--port", str(free_port()), "--tls-cert", str(tmp_path / "nope.pem"),
         "--tls-key", str(tmp_path / "nope.key")],
        tmp_path, base_env,
    )  # fmt: skip
    assert proc.proc.wait(timeout=60) == 2
    log = proc.log()
    assert "cannot read the server" in log and "Traceback" not in log
