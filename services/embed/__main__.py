"""python -m services.embed: the embedding stage."""

from __future__ import annotations

import sys

from ragline.config import load_settings
from ragline.grpc_server import serve_main
from services.embed.settings import EmbedSettings


def main(argv: list[str] | None = None) -> int:
    settings = load_settings(EmbedSettings, argv, prog="python -m services.embed")
    from services.embed.server import build  # after settings: heavy imports, CUDA

    return serve_main(settings, "embed", build)


if __name__ == "__main__":
    sys.exit(main())
