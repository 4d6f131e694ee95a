"""Loopback helpers for the processes the project starts (engines, stacks, benchmarks)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port the kernel considers free on 127.0.0.1 now (bound once, released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
