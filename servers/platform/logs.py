"""structlog JSON logs, one line per event, with the request id bound per RPC."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

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


def access_log(fields: dict[str, Any]) -> None:
    """One JSON line per RPC, in the same shape as structlog's lines.

    Written directly rather than through structlog's processor chain: it runs
    on every call, and the chain costs several times the write.
    """
    now = time.time()
    fields["event"] = "rpc"
    fields["level"] = "info"
    fields["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
    sys.stderr.write(json.dumps(fields, separators=(", ", ": ")) + "\n")
