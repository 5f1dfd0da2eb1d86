"""TLS and mutual TLS for the gRPC hops (certificates by path).

Servers: a stage given ``--tls-cert`` and ``--tls-key`` serves TLS only; adding
``--tls-client-ca`` makes it mutual: a client must present a certificate signed by that CA or
the handshake fails (the client sees ``UNAVAILABLE``), before any RPC runs.

Clients (the edge, the CLI, health probes): ``RAGLINE_GRPC_TLS_CA`` (the CA that signed the
stages' certificates), and for mutual TLS ``RAGLINE_GRPC_TLS_CERT`` / ``RAGLINE_GRPC_TLS_KEY``
(this client's certificate). The edge takes the same three as settings
(``--grpc-tls-ca`` ...), which win over the environment. ``RAGLINE_GRPC_TLS_SERVER_NAME``
overrides the name checked against the server certificate (when addresses are IPs that the
certificate does not list).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} at {path}: {exc.strerror}") from None


@dataclass(frozen=True)
class ClientTLS:
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.ca or self.cert)

    def credentials(self) -> grpc.ChannelCredentials:
        if bool(self.cert) != bool(self.key):
            raise ValueError("a client certificate needs both a certificate and a key path")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "CA bundle") if self.ca else None,
            private_key=_read(self.key, "client key") if self.key else None,
            certificate_chain=_read(self.cert, "client certificate") if self.cert else None,
        )

    def options(self) -> list[tuple[str, str]]:
        if self.server_name:
            return [("grpc.ssl_target_name_override", self.server_name)]
        return []


_configured: ClientTLS | None = None


def configure_client(tls: ClientTLS | None) -> None:
    """Set this process's client TLS (the edge does, from its settings)."""
    global _configured
    _configured = tls


def client_tls() -> ClientTLS:
    """What this process's gRPC channels use: configured, else the environment."""
    if _configured is not None:
        return _configured
    return ClientTLS(
        ca=os.environ.get("RAGLINE_GRPC_TLS_CA") or None,
        cert=os.environ.get("RAGLINE_GRPC_TLS_CERT") or None,
        key=os.environ.get("RAGLINE_GRPC_TLS_KEY") or None,
        server_name=os.environ.get("RAGLINE_GRPC_TLS_SERVER_NAME") or None,
    )


def channel(target: str, options: list | None = None, interceptors=None) -> grpc.aio.Channel:
    """An aio channel, secure when client TLS is configured."""
    tls = client_tls()
    opts = [*(options or []), *tls.options()]
    if tls.enabled:
        return grpc.aio.secure_channel(
            target, tls.credentials(), options=opts, interceptors=interceptors
        )
    return grpc.aio.insecure_channel(target, options=opts, interceptors=interceptors)


def server_credentials(
    cert: str | Path | None, key: str | Path | None, client_ca: str | Path | None
) -> grpc.ServerCredentials | None:
    """Server credentials from paths, or None for plaintext. ``client_ca`` makes it mutual."""
    if not cert and not key and not client_ca:
        return None
    if not cert or not key:
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    return grpc.ssl_server_credentials(
        [(_read(key, "server key"), _read(cert, "server certificate"))],
        root_certificates=_read(client_ca, "client CA bundle") if client_ca else None,
        require_client_auth=bool(client_ca),
    )
