"""The `flowsr` loggers: timestamps and levels on stderr, for every job and on the Ray workers."""
from __future__ import annotations

import logging
import sys

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (so `quiet_console` sees the records)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """The `flowsr` loggers (every job, the trainer on Ray Train workers) with timestamps and
    levels on stderr; idempotent. Other libraries' loggers are left as they are."""
    logger = logging.getLogger("flowsr")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)
    return logger


