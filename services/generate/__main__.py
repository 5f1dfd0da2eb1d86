"""python -m services.generate: the generation stage."""

from __future__ import annotations

import os
import sys

from ragline.config import load_settings
from ragline.grpc_server import serve_main
from services.generate.settings import GenerateSettings


def main(argv: list[str] | None = None) -> int:
    settings = load_settings(GenerateSettings, argv, prog="python -m services.generate")
    if settings.gpu is not None:
        # Before anything initialises CUDA: the process then sees only this GPU, as device 0,
        # so instances pinned to different GPUs never share memory.
        os.environ["CUDA_VISIBLE_DEVICES"] = str(settings.gpu)
    from services.generate.server import build  # after settings: heavy imports, CUDA

    return serve_main(settings, "generate", build)


if __name__ == "__main__":
    sys.exit(main())
