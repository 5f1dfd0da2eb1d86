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
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        log_config=None,  # keep ragline's JSON logging (with trace ids) for uvicorn's loggers
        timeout_graceful_shutdown=5,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
