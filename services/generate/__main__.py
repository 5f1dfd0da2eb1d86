"""python -m services.generate: the generation stage."""

from __future__ import annotations

import asyncio
import os
import sys

from ragline.config import load_settings
from ragline.grpc_server import serve_forever
from ragline.logging_setup import setup_logging
from ragline.telemetry import setup_tracing
from services.generate.settings import GenerateSettings


def main(argv: list[str] | None = None) -> int:
    settings = load_settings(GenerateSettings, argv, prog="python -m services.generate")
    setup_logging(settings.log_level, "generate")
    if settings.gpu is not None:
        # Must happen before anything initialises CUDA: the process then sees only this GPU,
        # as device 0, so instances pinned to different GPUs never share memory.
        os.environ["CUDA_VISIBLE_DEVICES"] = str(settings.gpu)
    setup_tracing("ragline-generate")
    from services.generate.server import build

    asyncio.run(serve_forever(*build(settings)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
