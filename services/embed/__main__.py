"""python -m services.embed: the embedding stage."""

from __future__ import annotations

import asyncio
import sys

from ragline.config import load_settings
from ragline.grpc_server import serve_forever
from ragline.logging_setup import setup_logging
from ragline.telemetry import setup_tracing
from services.embed.settings import EmbedSettings


def main(argv: list[str] | None = None) -> int:
    settings = load_settings(EmbedSettings, argv, prog="python -m services.embed")
    setup_logging(settings.log_level, "embed")
    setup_tracing("ragline-embed")
    from services.embed.server import build

    asyncio.run(serve_forever(*build(settings)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
