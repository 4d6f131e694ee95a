"""Running the ffmpeg of the imageio-ffmpeg wheel: one place for the binary,
the child-process hygiene and the ``-progress`` parser.

There is no ffprobe in the wheel, so probing (``probe.py``) parses what
``ffmpeg -i`` prints. Every child is started with ``PR_SET_PDEATHSIG`` on
Linux: when a worker is SIGKILLed mid-transcode its ffmpeg dies with it
instead of writing on for nobody while the job is reclaimed elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import shutil
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@functools.cache
def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return str(imageio_ffmpeg.get_ffmpeg_exe())


@functools.cache
def _launcher() -> list[str]:
    """``setpriv --pdeathsig KILL --`` where util-linux has it (Linux), else nothing.

    The death signal is set by a helper that then execs ffmpeg, not by a
    ``preexec_fn``: running Python between fork and exec in a multithreaded
    server (gRPC and blob I/O threads) can deadlock the child.
    """
    if sys.platform.startswith("linux"):
        setpriv = shutil.which("setpriv")
        if setpriv:
            return [setpriv, "--pdeathsig", "KILL", "--"]
    return []


def command(args: list[str]) -> list[str]:
    return [*_launcher(), ffmpeg_exe(), *args]


class FfmpegError(Exception):
    def __init__(self, message: str, *, returncode: int | None, stderr: str = "") -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr


def error_summary(stderr: str, limit: int = 300) -> str:
    """The last meaningful lines of ffmpeg's stderr, for a failure reason."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.startswith("frame=")]
    text = " | ".join(lines[-3:])
    return text if len(text) <= limit else "…" + text[-limit:]


@dataclass
class RunResult:
    returncode: int
    stdout: str
    stderr: str


async def run(args: list[str], *, limit_seconds: float | None = None) -> RunResult:
    """Run ffmpeg with ``args`` to completion; kill it on timeout or cancel."""
    proc = await asyncio.create_subprocess_exec(
        *command(args), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), limit_seconds)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(BaseException):
            await proc.wait()
        raise
    return RunResult(int(proc.returncode or 0), out.decode(errors="replace"), err.decode(errors="replace"))


async def run_with_progress(
    args: list[str],
    duration_s: float | None,
    on_progress: Callable[[float], Awaitable[None]],
    *,
    limit_seconds: float | None = None,
) -> RunResult:
    """Run ffmpeg with ``-progress pipe:1`` and report the fraction done (0..1).

    ffmpeg writes ``key=value`` blocks ending in ``progress=continue|end``;
    ``out_time_us`` over the source duration is the fraction. stderr is
    drained concurrently (a full pipe would stall ffmpeg) and kept for errors.
    """
    proc = await asyncio.create_subprocess_exec(
        *command(["-progress", "pipe:1", "-nostats", *args]),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    err_chunks: list[bytes] = []

    async def drain_stderr() -> None:
        assert proc.stderr is not None
        while chunk := await proc.stderr.read(65536):
            err_chunks.append(chunk)
            if len(err_chunks) > 64:  # keep the tail only
                del err_chunks[: len(err_chunks) - 64]

    async def read_progress() -> None:
        assert proc.stdout is not None
        out_us = 0
        while line := await proc.stdout.readline():
            key, _, value = line.decode(errors="replace").strip().partition("=")
            if key == "out_time_us" and value.lstrip("-").isdigit():
                out_us = max(0, int(value))
            elif key == "progress":
                if value == "end":
                    await on_progress(1.0)
                elif duration_s:
                    await on_progress(min(out_us / 1e6 / duration_s, 1.0))

    async def work() -> None:
        await asyncio.gather(drain_stderr(), read_progress())
        await proc.wait()

    try:
        await asyncio.wait_for(work(), limit_seconds)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(BaseException):
            await proc.wait()
        raise
    return RunResult(int(proc.returncode or 0), "", b"".join(err_chunks).decode(errors="replace"))
