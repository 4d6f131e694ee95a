"""Sample media from ffmpeg's lavfi sources: no downloads, for tests, benchmarks and demos.

``testsrc2`` (a moving colour pattern with a clock) and ``sine`` give a video
that compresses like real footage would not, but decodes, seeks and times
exactly; images are a single frame of the same pattern.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from servers.media.ffmpeg import ffmpeg_exe


def video_args(path: Path | str, *, seconds: float = 4, width: int = 640, height: int = 360,
               fps: int = 25, audio: bool = True, preset: str = "ultrafast") -> list[str]:
    args = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y",
            "-f", "lavfi", "-i", f"testsrc2=size={width}x{height}:rate={fps}:duration={seconds}"]
    if audio:
        args += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={seconds}"]
    args += ["-c:v", "libx264", "-preset", preset, "-pix_fmt", "yuv420p", "-g", str(fps)]
    if audio:
        args += ["-c:a", "aac", "-b:a", "64k", "-shortest"]
    return [*args, str(path)]


def make_video(path: Path | str, **kwargs: object) -> Path:
    """An H.264 (+AAC) file; the container follows the extension (.mp4, .mkv, .webm needs vp9)."""
    subprocess.run(video_args(path, **kwargs), check=True, timeout=300)  # type: ignore[arg-type]
    return Path(path)


def make_image(path: Path | str, *, width: int = 800, height: int = 600, codec: str = "") -> Path:
    """One frame as an image; the format follows the extension (.jpg, .png, .webp)."""
    args = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", "-f", "lavfi",
            "-i", f"testsrc2=size={width}x{height}:rate=1", "-frames:v", "1"]
    if codec:
        args += ["-c:v", codec]
    subprocess.run([*args, str(path)], check=True, timeout=120)
    return Path(path)


def add_exif(jpeg: bytes, marker: bytes = b"sysdesign-secret-gps") -> bytes:
    """The JPEG with an APP1 Exif segment (a TIFF header and an ImageDescription holding marker)."""
    if jpeg[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG")
    text = marker + b"\x00"
    # Little-endian TIFF: header, IFD0 with one entry (ImageDescription, ASCII), next-IFD 0, then the text.
    ifd_offset = 8
    value_offset = ifd_offset + 2 + 12 + 4
    tiff = (b"II*\x00" + ifd_offset.to_bytes(4, "little") + (1).to_bytes(2, "little")
            + (0x010E).to_bytes(2, "little") + (2).to_bytes(2, "little") + len(text).to_bytes(4, "little")
            + value_offset.to_bytes(4, "little") + (0).to_bytes(4, "little") + text)
    payload = b"Exif\x00\x00" + tiff
    segment = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    return jpeg[:2] + segment + jpeg[2:]
