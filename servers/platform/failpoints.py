"""Failpoints: named places in the code where a test can make the process die.

Crash-recovery tests need the process to die at an exact step (after the
processor charged, before the row that records it), not wherever a timer
happens to fire. ``failpoint("payments.confirm.after_processor")`` does
nothing unless ``SYSDESIGN_FAILPOINTS`` names it::

    SYSDESIGN_FAILPOINTS=payments.confirm.after_processor=kill

``kill`` sends the process SIGKILL: nothing is flushed, no handler runs,
exactly as when the kernel or an orchestrator kills it. Several failpoints
are separated by commas. The variable is read once, at the first call.
"""

from __future__ import annotations

import os
import signal

import structlog

log = structlog.get_logger("sysdesign.failpoints")

ENV = "SYSDESIGN_FAILPOINTS"
_armed: dict[str, str] | None = None


def _load() -> dict[str, str]:
    out: dict[str, str] = {}
    for item in os.environ.get(ENV, "").split(","):
        name, _, action = item.strip().partition("=")
        if name:
            out[name] = action or "kill"
    return out


def failpoint(name: str) -> None:
    """Dies here if SYSDESIGN_FAILPOINTS arms this name (a no-op otherwise)."""
    global _armed
    if _armed is None:
        _armed = _load()
    action = _armed.get(name)
    if action == "kill":
        log.warning("failpoint_kill", failpoint=name)
        os.kill(os.getpid(), signal.SIGKILL)


def armed() -> dict[str, str]:
    """The failpoints armed in this process (for the startup log)."""
    return dict(_load())
