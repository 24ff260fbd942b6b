"""Logging for drivers and Ray workers alike."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The library's top-level packages; a Ray worker shows their progress lines.
PACKAGES = ("core", "curation", "training", "pipeline")


def setup_logging(level: int = logging.INFO) -> None:
    """A job's driver: one format for every line, replacing whatever was configured before."""
    logging.basicConfig(level=level, format=FORMAT, force=True)


def worker_logging() -> None:
    """Ray workers start with logging unconfigured: make the library's progress lines visible there."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format=FORMAT)
    for name in PACKAGES:
        logging.getLogger(name).setLevel(logging.INFO)
