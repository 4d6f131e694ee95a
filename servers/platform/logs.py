"""structlog JSON logs, one line per event, with the request id bound per RPC."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import TextIO

import structlog


def setup_logging(level: str = "info") -> None:
    lvl = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(level=lvl, stream=sys.stderr, format="%(message)s")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


class AccessLog:
    """One JSON line per RPC, in the same shape as structlog's lines, written in batches.

    It runs on every call, so it skips structlog's processor chain and does not
    make a write() system call per line: lines are buffered and written every
    ``interval`` seconds (or at ``max_lines``), and at shutdown.
    """

    def __init__(self, stream: TextIO | None = None, *, interval: float = 0.1, max_lines: int = 512):
        self._stream = stream
        self._lines: list[str] = []
        self._interval = interval
        self._max_lines = max_lines
        self._timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._stamp = ""

    def __call__(self, method: str, code: str, elapsed_s: float, request_id: str,
                 user_id: int | None) -> None:
        # Every value is known to need no JSON escaping: method and code names,
        # numbers, and a request id restricted to [A-Za-z0-9._:-] on intake.
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        user = f', "user_id": "{user_id}"' if user_id is not None else ""
        self._lines.append(
            f'{{"method": "{method}", "code": "{code}", "ms": {elapsed_s * 1000:.3f}, '
            f'"request_id": "{request_id}"{user}, "event": "rpc", "level": "info", '
            f'"timestamp": "{self._stamp}.{int((now - second) * 1e6):06d}Z"}}')
        if len(self._lines) >= self._max_lines:
            self.flush()
        elif self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(self._interval, self.flush)
            except RuntimeError:  # no loop: write at once
                self.flush()

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._lines:
            lines, self._lines = self._lines, []
            stream = self._stream or sys.stderr
            stream.write("\n".join(lines) + "\n")
            stream.flush()


access_log = AccessLog()
