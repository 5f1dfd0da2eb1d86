"""One logging format for every process."""

from __future__ import annotations

import logging


def setup_logging(level: str = "INFO", service: str = "ragline") -> None:
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s",
    )
