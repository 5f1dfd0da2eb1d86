"""python -m services.api: the HTTP edge."""

from __future__ import annotations

import sys

import uvicorn

from ragline.config import load_settings
from ragline.logging_setup import setup_logging
from ragline.telemetry import setup_tracing
from services.api.app import create_app
from services.api.settings import ApiSettings


def main(argv: list[str] | None = None) -> int:
    settings = load_settings(ApiSettings, argv, prog="python -m services.api")
    setup_logging(settings.log_level, "api")
    setup_tracing("ragline-api")
    try:
        app = create_app(settings)
    except ValueError as exc:  # unreadable key file or certificates: say so, no traceback
        print(f"python -m services.api: {exc}", file=sys.stderr)
        return 2
    if bool(settings.tls_cert) != bool(settings.tls_key):
        print("python -m services.api: HTTPS needs both --tls-cert and --tls-key", file=sys.stderr)
        return 2
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        log_config=None,  # keep ragline's JSON logging (with trace ids) for uvicorn's loggers
        timeout_graceful_shutdown=5,
        ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
        ssl_keyfile=str(settings.tls_key) if settings.tls_key else None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
