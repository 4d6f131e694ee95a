"""The transcoding worker (`sysdesign worker media`; also inside `sysdesign up`).

One job per media id on the ``{q:media}`` Redis Stream, consumed with the
platform's JobQueue: at-least-once, a dead worker's job reclaimed with
XAUTOCLAIM after ``SYSDESIGN_MEDIA_CLAIM_IDLE_MS``, a live worker's job kept
by heartbeats however long the transcode runs.

The handler is idempotent, so running a job twice (or half of it, then all
of it) is harmless:

1. READY or FAILED, or the row is gone: nothing to do (a deleted item's
   leftover outputs are removed).
2. ffmpeg runs into a fresh local work directory (``ladder.py`` builds the
   one command), reading the staged source in place (filesystem) or through
   a presigned URL (S3); ``-progress`` feeds PROCESSING percent into the row.
3. The outputs are written under ``media/<id>/`` in dependency order:
   segments and images first, rung playlists next, the master playlist last,
   so a master playlist that exists never names a missing file. A rerun
   overwrites the same keys with equivalent bytes.
4. The row becomes READY with its renditions, then the staged source is
   deleted. A crash between the two leaves a stray source a rerun deletes.

A failure records ``last_error`` and raises: the job is retried after the
claim timeout. The delivery after the last allowed attempt records FAILED with
that error and dead-letters the job, so every media item ends READY or FAILED
even when its worker keeps dying mid-job.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog

from servers.media import ffmpeg, ladder
from servers.media.core import FAILED, PROCESSING, READY, TERMINAL, MediaCore, output_key
from servers.media.probe import ProbeResult
from servers.platform.runtime import Runtime
from servers.storage.queue import Job

log = structlog.get_logger("sysdesign.media.worker")

TRANSCODE_TIMEOUT_SECONDS = 6 * 3600.0
_CONTENT_TYPES = {
    ".m3u8": "application/vnd.apple.mpegurl",
    ".ts": "video/mp2t",
    ".m4s": "video/iso.segment",
    ".mp4": "video/mp4",
    ".jpg": "image/jpeg",
    ".webp": "image/webp",
}


class GaveUp(Exception):
    """Raised on the delivery after the last attempt: the queue dead-letters the job."""


def content_type_of(path: str) -> str:
    return _CONTENT_TYPES.get(os.path.splitext(path)[1], "application/octet-stream")


def _upload_order(rel: str) -> int:
    if rel == ladder.MASTER:
        return 2
    return 1 if rel.endswith(".m3u8") else 0


async def handle_transcode(rt: Runtime, job: Job) -> None:
    await Transcoder(rt).run(job)


class Transcoder:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.core = MediaCore.for_runtime(rt)
        self.settings = self.core.settings

    async def run(self, job: Job) -> None:
        raw = job.fields.get("media_id", "")
        media_id = int(raw.decode() if isinstance(raw, bytes) else raw)
        row = await self.core.get_row(media_id)
        if row is None:
            await self.rt.blobs.delete_prefix(output_key(media_id))
            return
        if row["state"] in TERMINAL:
            return
        if job.attempts > self.settings.max_attempts:
            reason = f"gave up after {self.settings.max_attempts} attempts: {row['last_error'] or 'worker died'}"
            await self.core.update(media_id, state=FAILED, failure_reason=reason, percent=0)
            log.error("media_failed", media_id=media_id, reason=reason)
            raise GaveUp(reason)
        started = time.monotonic()
        await self.core.update(media_id, state=PROCESSING, percent=0, attempts=job.attempts)
        try:
            renditions = await self._transcode(row)
        except Exception as exc:
            text = exc.args[0] if isinstance(exc, ffmpeg.FfmpegError) else f"{type(exc).__name__}: {exc}"
            await self.core.update(media_id, last_error=str(text)[:1000], percent=0)
            raise
        if await self.core.get_row(media_id) is None:  # deleted while we worked
            await self.rt.blobs.delete_prefix(output_key(media_id))
            return
        elapsed_ms = int((time.monotonic() - started) * 1000)
        await self.core.update(media_id, state=READY, percent=100, renditions=json.dumps(renditions),
                               processing_ms=elapsed_ms, last_error="")
        await self.rt.blobs.delete(row["staging_key"])
        log.info("media_ready", media_id=media_id, processing_ms=elapsed_ms, attempt=job.attempts,
                 renditions=[r["name"] for r in renditions["variants"]])

    async def _transcode(self, row: dict[str, Any]) -> dict[str, Any]:
        media_id = int(row["media_id"])
        p = json.loads(row["probe"])
        info = ProbeResult(demuxer=p["demuxer"], family=p["family"], kind=p["kind"], width=p["width"],
                           height=p["height"], video_codec=p["video_codec"], duration_s=p["duration_s"],
                           fps=p["fps"], has_audio=p["has_audio"])
        if not await self.rt.blobs.exists(row["staging_key"]):
            raise ffmpeg.FfmpegError("the staged upload is gone", returncode=None)
        source = await self.core.source_url(row["staging_key"])
        work_root = self.rt.config.data_dir / "media-work"
        work_root.mkdir(parents=True, exist_ok=True)
        out = tempfile.mkdtemp(prefix=f"{media_id}-", dir=work_root)
        try:
            if info.kind == "video":
                args, rends = ladder.video_command(source, out, info, self.settings.preset)
            else:
                args, rends = ladder.image_command(source, out, info)
            last = {"pct": -1, "t": 0.0}

            async def progress(fraction: float) -> None:
                pct = min(99, int(fraction * 100))
                now = time.monotonic()
                if pct > last["pct"] and (now - last["t"] >= 0.5 or pct - last["pct"] >= 10):
                    last.update(pct=pct, t=now)
                    await self.core.update(media_id, percent=pct)

            result = await ffmpeg.run_with_progress(args, info.duration_s if info.kind == "video" else None,
                                                    progress, limit_seconds=TRANSCODE_TIMEOUT_SECONDS)
            if result.returncode != 0:
                # The reason reaches the owner (failure_reason): ffmpeg's text, which names
                # work paths, stays in the log.
                log.warning("media_transcode_failed", media_id=media_id, returncode=result.returncode,
                            ffmpeg_output=ffmpeg.error_summary(result.stderr, 2000))
                raise ffmpeg.FfmpegError(f"ffmpeg failed (exit code {result.returncode}; its output is in "
                                         "the worker's log)",
                                         returncode=result.returncode, stderr=result.stderr)
            files = await asyncio.to_thread(_outputs, out)
            if not files:
                raise ffmpeg.FfmpegError("ffmpeg wrote nothing", returncode=result.returncode)
            for rel in files:
                data = await _read(Path(out) / rel)
                await self.rt.blobs.put(output_key(media_id, rel), data, content_type=content_type_of(rel))
        finally:
            shutil.rmtree(out, ignore_errors=True)
        variants = [{"name": r.name, "width": r.width, "height": r.height,
                     "bandwidth_bps": r.bandwidth_bps, "path": r.path, "content_type": r.content_type}
                    for r in rends]
        if info.kind == "video":
            return {"master": ladder.MASTER, "poster": ladder.POSTER, "variants": variants}
        return {"master": "", "poster": rends[-1].path, "variants": variants}


def _outputs(out: str) -> list[str]:
    """Every file ffmpeg wrote, relative, in upload order (see the module docstring)."""
    return sorted((str(f.relative_to(out)) for f in Path(out).rglob("*") if f.is_file()),
                  key=lambda rel: (_upload_order(rel), rel))


async def _read(path: Path) -> bytes:
    return await asyncio.to_thread(path.read_bytes)
