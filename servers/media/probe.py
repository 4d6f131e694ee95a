"""What is this file? ffprobe's job, done with ffmpeg (the wheel ships no ffprobe).

``ffmpeg -i SRC -map 0:v:0 -frames:v 1 -f null -`` prints the container, the
duration and every stream on stderr, then decodes one video frame: if that
works the file is a video or image we can decode. A video is also decoded at
its end (input seek to just before the duration), which catches files cut
short whose header survived.

Safety: the demuxers ffmpeg may pick are limited to an allowlist
(``-format_whitelist``): no playlist or concat demuxer that would open other
files or URLs named inside an upload (the classic ffmpeg SSRF / local-file
read), no raw or text formats. Protocols are limited the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from servers.media import ffmpeg

# Demuxer (short name, as printed by ffmpeg) -> kind. ffmpeg prints the mov
# family as one name with commas.
VIDEO_DEMUXERS = {
    "mov,mp4,m4a,3gp,3g2,mj2": "mp4",
    "matroska,webm": "webm",
    "avi": "avi",
    "mpegts": "mpegts",
    "flv": "flv",
    "ogg": "ogg",
    "mpeg": "mpeg",
}
IMAGE_DEMUXERS = {
    "jpeg_pipe": "jpeg",
    "png_pipe": "png",
    "webp_pipe": "webp",
    "gif": "gif",
    "bmp_pipe": "bmp",
    "tiff_pipe": "tiff",
}
# image2 is what ffmpeg picks for a single image file by its extension: the
# family then comes from the codec.
IMAGE2_CODECS = {"mjpeg": "jpeg", "png": "png", "webp": "webp", "bmp": "bmp", "tiff": "tiff", "gif": "gif"}
FORMAT_WHITELIST = ",".join(
    [part for name in (*VIDEO_DEMUXERS, *IMAGE_DEMUXERS) for part in name.split(",")] + ["image2"]
)

# Declared content type -> the families (values above) that satisfy it.
CONTENT_TYPES: dict[str, tuple[str, frozenset[str]]] = {
    "video/mp4": ("video", frozenset({"mp4"})),
    "video/quicktime": ("video", frozenset({"mp4"})),
    "video/x-m4v": ("video", frozenset({"mp4"})),
    "video/3gpp": ("video", frozenset({"mp4"})),
    "video/webm": ("video", frozenset({"webm"})),
    "video/x-matroska": ("video", frozenset({"webm"})),
    "video/x-msvideo": ("video", frozenset({"avi"})),
    "video/mp2t": ("video", frozenset({"mpegts"})),
    "video/x-flv": ("video", frozenset({"flv"})),
    "video/ogg": ("video", frozenset({"ogg"})),
    "video/mpeg": ("video", frozenset({"mpeg"})),
    "image/jpeg": ("image", frozenset({"jpeg"})),
    "image/png": ("image", frozenset({"png"})),
    "image/webp": ("image", frozenset({"webp"})),
    "image/gif": ("image", frozenset({"gif"})),
    "image/bmp": ("image", frozenset({"bmp"})),
    "image/tiff": ("image", frozenset({"tiff"})),
}

PROBE_TIMEOUT_SECONDS = 120.0


class ProbeError(Exception):
    """The file is not a video or image we can decode.

    The message is the project's own (it goes to the client); ``tool_output``
    is what ffmpeg printed, for the server log only: it names server paths
    (the staged file, presigned URLs) and is not written for users.
    """

    def __init__(self, message: str, *, tool_output: str = "") -> None:
        super().__init__(message)
        self.tool_output = tool_output


@dataclass(frozen=True)
class ProbeResult:
    demuxer: str
    family: str  # "mp4", "webm", "jpeg", ...
    kind: str  # "video" | "image"
    width: int
    height: int
    video_codec: str
    duration_s: float | None
    fps: float | None
    has_audio: bool


_INPUT_RE = re.compile(r"^Input #0, (.+?), from '", re.M)
_DURATION_RE = re.compile(r"Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)")
_VIDEO_RE = re.compile(r"Stream #0:\d+[^:]*: Video: (\w+)(.*)$", re.M)
_AUDIO_RE = re.compile(r"Stream #0:\d+[^:]*: Audio: ", re.M)
_SIZE_RE = re.compile(r"[ ,](\d{1,5})x(\d{1,5})(?=[ ,\]]|$)")
_FPS_RE = re.compile(r"([\d.]+) fps")
_FRAME_RE = re.compile(r"frame=\s*(\d+)")


def parse_input_info(stderr: str) -> ProbeResult:
    """The first input's container and streams from ``ffmpeg -i`` stderr."""
    head = stderr.split("Stream mapping:", 1)[0].split("Output #0", 1)[0]
    m = _INPUT_RE.search(head)
    if not m:
        raise ProbeError("not a video or image format we recognise")
    demuxer = m.group(1)
    if demuxer in VIDEO_DEMUXERS:
        family, kind = VIDEO_DEMUXERS[demuxer], "video"
    elif demuxer in IMAGE_DEMUXERS:
        family, kind = IMAGE_DEMUXERS[demuxer], "image"
    elif demuxer == "image2":
        family, kind = "", "image"
    else:
        raise ProbeError(f"container {demuxer!r} is not accepted")
    v = _VIDEO_RE.search(head)
    if not v:
        raise ProbeError("the file has no video stream")
    codec, rest = v.group(1), v.group(2)
    if demuxer == "image2":
        if codec not in IMAGE2_CODECS:
            raise ProbeError(f"image codec {codec!r} is not accepted")
        family = IMAGE2_CODECS[codec]
    size = _SIZE_RE.search(rest)
    if not size:
        raise ProbeError("the video stream has no dimensions")
    width, height = int(size.group(1)), int(size.group(2))
    if width < 2 or height < 2:
        raise ProbeError(f"the picture is too small ({width}x{height})")
    fps_m = _FPS_RE.search(rest)
    d = _DURATION_RE.search(head)
    duration = int(d.group(1)) * 3600 + int(d.group(2)) * 60 + float(d.group(3)) if d else None
    if kind == "video" and codec in ("mjpeg", "png", "webp", "gif", "bmp") and not duration:
        kind = "image"
    if kind == "video" and not duration:
        raise ProbeError("the video has no duration")
    return ProbeResult(
        demuxer=demuxer, family=family, kind=kind, width=width, height=height, video_codec=codec,
        duration_s=duration, fps=float(fps_m.group(1)) if fps_m else None,
        has_audio=bool(_AUDIO_RE.search(head)),
    )


def frames_decoded(stderr: str) -> int:
    found = _FRAME_RE.findall(stderr)
    return int(found[-1]) if found else 0


def input_args(source: str) -> list[str]:
    """Input options that keep ffmpeg to the demuxers and protocols we accept."""
    protocols = "file" if "://" not in source or source.startswith("file:") else "file,http,https,tcp,tls"
    return ["-format_whitelist", FORMAT_WHITELIST, "-protocol_whitelist", protocols]


async def probe(source: str, *, limit_seconds: float = PROBE_TIMEOUT_SECONDS) -> ProbeResult:
    """Identify ``source`` (a path or URL) and prove it decodes; ProbeError otherwise."""
    base = ["-hide_banner", "-nostdin", *input_args(source)]
    r = await ffmpeg.run([*base, "-i", source, "-map", "0:v:0?", "-frames:v", "1", "-f", "null", "-"],
                         limit_seconds=limit_seconds)
    try:
        info = parse_input_info(r.stderr)
    except ProbeError as exc:
        raise ProbeError(str(exc), tool_output=ffmpeg.error_summary(r.stderr, 2000)) from None
    if r.returncode != 0 or frames_decoded(r.stderr) < 1:
        raise ProbeError("the first frame does not decode",
                         tool_output=ffmpeg.error_summary(r.stderr, 2000))
    if info.kind == "video" and info.duration_s and info.duration_s > 1.0:
        at = f"{max(info.duration_s - 0.5, 0):.3f}"
        r2 = await ffmpeg.run([*base, "-ss", at, "-i", source, "-map", "0:v:0", "-frames:v", "1",
                               "-f", "null", "-"], limit_seconds=limit_seconds)
        if r2.returncode != 0 or frames_decoded(r2.stderr) < 1:
            raise ProbeError("the end of the video does not decode (truncated?)",
                             tool_output=ffmpeg.error_summary(r2.stderr, 2000))
    return info


def check_declared(content_type: str, info: ProbeResult) -> str | None:
    """Why ``info`` does not match the declared type, or None when it does."""
    kind, families = CONTENT_TYPES[content_type]
    if info.kind != kind or info.family not in families:
        return f"declared {content_type} but the file is {info.kind} ({info.family}, {info.video_codec})"
    return None
