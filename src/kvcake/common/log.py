"""Logging set-up: one format for every kvcake process."""

from __future__ import annotations

import logging

from kvcake.common.config import env_value
from kvcake.common.errors import InvalidParamsError

_FORMAT = "%(asctime)s %(levelname)-7s %(process)d %(name)s: %(message)s"


def setup_logging(level: str | None = None) -> None:
    """Configure the root logger once; ``KVCAKE_LOG_LEVEL`` applies when ``level`` is None."""
    logging.basicConfig(level=_level(level or env_value("LOG_LEVEL", "WARNING")),
                        format=_FORMAT)


def setup_package_logging(default: str = "INFO") -> None:
    """Inside another program (kvcake's connector in vLLM): give kvcake's own loggers a
    stderr handler at ``KVCAKE_LOG_LEVEL`` (else ``default``), leaving the root logger, and
    so the host's logging, alone. Does nothing when already done."""
    package = logging.getLogger("kvcake")
    if package.handlers:
        return
    chosen = _level(env_value("LOG_LEVEL", default))
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(_FORMAT))
    package.addHandler(handler)
    package.setLevel(chosen)
    package.propagate = False


def _level(name: str) -> str:
    chosen = name.upper()
    if not isinstance(logging.getLevelName(chosen), int):
        raise InvalidParamsError(f"log level {chosen!r} is not one of DEBUG, INFO, WARNING, "
                                 "ERROR, CRITICAL")
    return chosen


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)
