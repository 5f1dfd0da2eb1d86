"""Settings: one pydantic-settings object per service.

Precedence: command-line flags > ``RAGLINE_<SERVICE>_<NAME>`` environment variables > defaults.
Defaults run the embedded setup (everything local, CPU, loopback ports).
"""

from __future__ import annotations

import argparse
import os
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

# Variables every process reads besides its own RAGLINE_<SERVICE>_* settings.
GLOBAL_ENV = {
    "RAGLINE_DATA_DIR": "default data directory (models, index, logs)",
    "RAGLINE_TRACE_FILE": "write spans as JSON lines ({service} is replaced)",
    "RAGLINE_LOG_FORMAT": "json (default) or text",
    "RAGLINE_INSTANCE_ID": "service.instance.id of the process (default: random)",
    "RAGLINE_GRPC_TLS_CA": "gRPC clients: CA bundle that verifies the stages (turns TLS on)",
    "RAGLINE_GRPC_TLS_CERT": "gRPC clients: this client's certificate (mutual TLS)",
    "RAGLINE_GRPC_TLS_KEY": "gRPC clients: this client's private key (mutual TLS)",
    "RAGLINE_GRPC_TLS_SERVER_NAME": "gRPC clients: name to verify in the server certificate",
}


def default_data_dir() -> Path:
    """Where indexes and assembled model directories live unless configured otherwise."""
    env = os.environ.get("RAGLINE_DATA_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "ragline"


class GrpcServiceSettings(BaseSettings):
    """Fields every gRPC stage shares."""

    model_config = SettingsConfigDict(extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(0, ge=0, le=65535, description="port to bind (0 picks a free one)")
    max_message_mb: int = Field(
        16, ge=1, le=1024, description="largest gRPC message accepted or sent, in MiB"
    )
    grace_s: float = Field(5.0, ge=0, description="seconds in-flight RPCs get on shutdown")
    log_level: str = Field("INFO", description="logging level")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="serve Prometheus /metrics on this port (off if unset)"
    )
    tls_cert: Path | None = Field(None, description="serve TLS with this certificate (PEM path)")
    tls_key: Path | None = Field(None, description="private key of --tls-cert (PEM path)")
    tls_client_ca: Path | None = Field(
        None, description="mutual TLS: clients need a certificate signed by this CA (PEM path)"
    )


S = TypeVar("S", bound=BaseSettings)


def _flag_type(annotation: object) -> object:
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is typing.Union and len(args) == 1:
        return args[0]
    return annotation


def build_parser(cls: type[BaseSettings], prog: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one ``--kebab-name`` flag per settings field."""
    parser = argparse.ArgumentParser(prog=prog, description=(cls.__doc__ or "").strip())
    prefix = cls.model_config.get("env_prefix", "")
    for name, field in cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"{prefix}{name}".upper()
        default = field.default if field.default_factory is None else "(computed)"
        help_text = f"{field.description or ''} [env {env}; default {default}]"
        if _flag_type(field.annotation) is bool:
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            parser.add_argument(flag, default=argparse.SUPPRESS, help=help_text, metavar="VALUE")
    return parser


def load_settings(cls: type[S], argv: Sequence[str] | None = None, prog: str | None = None) -> S:
    """Parse flags over env over defaults; exit with a clear message on a bad value."""
    parser = build_parser(cls, prog)
    ns = parser.parse_args(argv)
    try:
        return cls(**vars(ns))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
            for err in exc.errors()
        )
        parser.error(f"invalid configuration: {problems}")
        raise  # unreachable: parser.error exits


def markdown_table(cls: type[BaseSettings]) -> str:
    """The settings of ``cls`` as a Markdown table (flag, env var, default, meaning)."""
    prefix = cls.model_config.get("env_prefix", "")
    rows = ["| flag | environment variable | default | meaning |", "|---|---|---|---|"]
    for name, field in cls.model_fields.items():
        if field.default_factory is not None:
            default = "see meaning"
        else:
            default = "unset" if field.default is None else f"`{field.default}`"
        rows.append(
            f"| `--{name.replace('_', '-')}` | `{prefix}{name.upper()}` | {default} "
            f"| {field.description or ''} |"
        )
    return "\n".join(rows)
