"""The renditions of an upload and the one ffmpeg command that makes them.

Video: an HLS ladder of H.264 + AAC rungs (240p … 1080p by the short side,
never above the source), an IDR frame every 2 s (``-force_key_frames`` +
``-forced-idr``, no scene-cut keyframes) so every 6 s segment starts with
one, a VOD playlist per rung, a master playlist with BANDWIDTH and
RESOLUTION, and a JPEG poster. One decode feeds every rung (``split``): the
source is read once, which is what makes transcoding cost about one bare
ffmpeg run and no more. Sources without audio get video-only rungs.

Image: WebP variants 320 … 1920 px wide (never above the source), metadata
(EXIF, XMP, ICC comments) dropped with ``-map_metadata -1``; the WebP muxer
writes no EXIF chunk of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from servers.media.probe import ProbeResult, input_args

# (short side, video bits/s); audio adds AUDIO_BPS to each.
RUNGS: tuple[tuple[int, int], ...] = (
    (240, 400_000), (360, 800_000), (480, 1_400_000), (720, 2_800_000), (1080, 5_000_000),
)
AUDIO_BPS = 96_000
KEYFRAME_SECONDS = 2
SEGMENT_SECONDS = 6
IMAGE_WIDTHS = (320, 640, 1280, 1920)
MASTER = "master.m3u8"
POSTER = "poster.jpg"


@dataclass(frozen=True)
class Rendition:
    name: str
    width: int
    height: int
    bandwidth_bps: int
    path: str  # relative to the media's output prefix
    content_type: str


def _even(x: float) -> int:
    return max(2, round(x / 2) * 2)


def video_ladder(width: int, height: int) -> list[Rendition]:
    """The rungs whose short side does not exceed the source's (at least one)."""
    short = min(width, height)
    chosen = [(s, bps) for s, bps in RUNGS if s <= short] or [(_even(short), RUNGS[0][1])]
    out = []
    for s, bps in chosen:
        if width >= height:
            w, h = _even(width * s / height), s
        else:
            w, h = s, _even(height * s / width)
        name = f"{s}p"
        out.append(Rendition(name, w, h, bps, f"{name}/index.m3u8", "application/vnd.apple.mpegurl"))
    return out


def image_variants(width: int, height: int) -> list[Rendition]:
    widths = [w for w in IMAGE_WIDTHS if w <= width] or [width]
    return [Rendition(f"w{w}", w, max(1, round(height * w / width)), 0, f"w{w}.webp", "image/webp")
            for w in widths]


def poster_time(duration_s: float | None) -> float:
    return round(min(1.0, (duration_s or 0) / 3), 3)


def video_command(source: str, out_dir: str, info: ProbeResult, preset: str) -> tuple[list[str], list[Rendition]]:
    """ffmpeg arguments writing ``out_dir/{master.m3u8, <rung>/index.m3u8, <rung>/seg_*.ts, poster.jpg}``."""
    rungs = video_ladder(info.width, info.height)
    n = len(rungs)
    top = rungs[-1]
    labels = "".join(f"[s{i}]" for i in range(n)) + "[sp]"
    graph = [f"[0:v:0]split={n + 1}{labels}"]
    for i, r in enumerate(rungs):
        graph.append(f"[s{i}]scale={r.width}:{r.height}:flags=bicubic,setsar=1,format=yuv420p[v{i}]")
    graph.append(f"[sp]scale={top.width}:{top.height},setsar=1[poster]")
    args = ["-hide_banner", "-nostdin", "-y", *input_args(source), "-i", source,
            "-filter_complex", ";".join(graph)]
    for i in range(n):
        args += ["-map", f"[v{i}]"]
        if info.has_audio:
            args += ["-map", "0:a:0"]
    gop = str(round((info.fps or 25) * KEYFRAME_SECONDS))
    args += ["-c:v", "libx264", "-preset", preset, "-profile:v", "main",
             "-g", gop, "-keyint_min", gop, "-sc_threshold", "0",
             "-force_key_frames", f"expr:gte(t,n_forced*{KEYFRAME_SECONDS})", "-forced-idr", "1"]
    for i, r in enumerate(rungs):
        args += [f"-b:v:{i}", str(r.bandwidth_bps), f"-maxrate:v:{i}", str(r.bandwidth_bps),
                 f"-bufsize:v:{i}", str(2 * r.bandwidth_bps)]
    if info.has_audio:
        args += ["-c:a", "aac", "-b:a", str(AUDIO_BPS), "-ac", "2", "-ar", "48000"]
    stream_map = " ".join(
        f"v:{i},a:{i},name:{r.name}" if info.has_audio else f"v:{i},name:{r.name}"
        for i, r in enumerate(rungs)
    )
    args += ["-f", "hls", "-hls_time", str(SEGMENT_SECONDS), "-hls_playlist_type", "vod",
             "-hls_flags", "independent_segments", "-hls_segment_type", "mpegts",
             "-hls_segment_filename", f"{out_dir}/%v/seg_%05d.ts", "-master_pl_name", MASTER,
             "-var_stream_map", stream_map, f"{out_dir}/%v/index.m3u8"]
    args += ["-map", "[poster]", "-ss", str(poster_time(info.duration_s)), "-frames:v", "1",
             "-q:v", "3", "-map_metadata", "-1", f"{out_dir}/{POSTER}"]
    if info.has_audio:
        rungs = [Rendition(r.name, r.width, r.height, r.bandwidth_bps + AUDIO_BPS, r.path, r.content_type)
                 for r in rungs]
    return args, rungs


def image_command(source: str, out_dir: str, info: ProbeResult) -> tuple[list[str], list[Rendition]]:
    variants = image_variants(info.width, info.height)
    n = len(variants)
    graph = [f"[0:v:0]split={n}" + "".join(f"[s{i}]" for i in range(n))]
    for i, v in enumerate(variants):
        graph.append(f"[s{i}]scale={v.width}:{v.height}:flags=lanczos[o{i}]")
    args = ["-hide_banner", "-nostdin", "-y", *input_args(source), "-i", source,
            "-filter_complex", ";".join(graph)]
    for i, v in enumerate(variants):
        args += ["-map", f"[o{i}]", "-frames:v", "1", "-map_metadata", "-1", "-c:v", "libwebp",
                 "-quality", "80", f"{out_dir}/{v.path}"]
    return args, variants
