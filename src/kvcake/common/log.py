"""Logging set-up: one format for every kvcake process."""

from __future__ import annotations

import logging

from kvcake.common.config import env_value
from kvcake.common.errors import InvalidParamsError

_FORMAT = "%(asctime)s %(levelname)-7s %(process)d %(name)s: %(message)s"


def setup_logging(level: str | None = None) -> None:
    """Configure the root logger once; ``KVCAKE_LOG_LEVEL`` applies when ``level`` is None."""
    chosen = (level or env_value("LOG_LEVEL", "WARNING")).upper()
    if not isinstance(logging.getLevelName(chosen), int):
        raise InvalidParamsError(f"log level {chosen!r} is not one of DEBUG, INFO, WARNING, "
                                 "ERROR, CRITICAL")
    logging.basicConfig(level=chosen, format=_FORMAT)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)
