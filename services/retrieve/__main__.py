"""python -m services.retrieve: the retrieval stage."""

from __future__ import annotations

import sys

from ragline.config import load_settings
from ragline.grpc_server import serve_main
from services.retrieve.settings import RetrieveSettings


def main(argv: list[str] | None = None) -> int:
    settings = load_settings(RetrieveSettings, argv, prog="python -m services.retrieve")
    from services.retrieve.server import build  # after settings: heavy imports, CUDA

    return serve_main(settings, "retrieve", build)


if __name__ == "__main__":
    sys.exit(main())
