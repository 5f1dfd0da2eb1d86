"""python -m services.retrieve: the retrieval stage."""

from __future__ import annotations

import asyncio
import sys

from ragline.config import load_settings
from ragline.grpc_server import serve_forever
from ragline.logging_setup import setup_logging
from ragline.telemetry import setup_tracing
from services.retrieve.settings import RetrieveSettings


def main(argv: list[str] | None = None) -> int:
    settings = load_settings(RetrieveSettings, argv, prog="python -m services.retrieve")
    setup_logging(settings.log_level, "retrieve")
    setup_tracing("ragline-retrieve")
    from services.retrieve.server import build

    asyncio.run(serve_forever(*build(settings)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
