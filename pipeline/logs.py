"""The `flowsr` loggers: timestamps and levels on stderr, for every job and on the Ray workers."""
from __future__ import annotations

import logging
import sys
import time
from typing import Optional

from flowsr.metrics_log import progress_text

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




PROGRESS_EVERY_S = 10.0  # seconds between two progress lines of a job


class Progress:
    """A job's progress lines on the `flowsr` logger: `update(done)` logs `label done/total (pct),
    rate, ETA` (`flowsr.metrics_log.progress_text`) at most every `every_s` seconds, and always
    when `done` reaches `total`. `extra(done)` may add text (e.g. an error count)."""

    def __init__(self, label: str, total: int, unit: str = "img", every_s: float = PROGRESS_EVERY_S,
                 logger: Optional[logging.Logger] = None):
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.logger = logger or logging.getLogger("flowsr")
        self.start = self.last = time.perf_counter()

    def update(self, done: int, extra: str = "") -> None:
        now = time.perf_counter()
        if now - self.last < self.every_s and done < self.total:
            return
        self.last = now
        self.logger.info("%s %s%s", self.label, progress_text(done, self.total, now - self.start, self.unit),
                         f" | {extra}" if extra else "")
