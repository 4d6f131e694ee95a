"""Probing with the wheel's ffmpeg (no ffprobe) on files made by lavfi sources, and the ladder."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from servers.media import ffmpeg, ladder, probe, samples
from servers.media.edge import ByteLRU, Entry, parse_range


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("probe")
    out = {
        "mp4": samples.make_video(d / "a.mp4", seconds=2, width=320, height=240),
        "silent": samples.make_video(d / "b.mp4", seconds=2, width=240, height=320, audio=False),
        "mkv": samples.make_video(d / "c.mkv", seconds=2, width=320, height=240),
        "png": samples.make_image(d / "i.png", width=64, height=48),
        "jpeg": samples.make_image(d / "i.jpg", width=64, height=48),
        "webp": samples.make_image(d / "i.webp", width=64, height=48, codec="libwebp"),
    }
    # Files keep no extension in staging: the demuxer must come from the content.
    for name in ("png", "jpeg"):
        bare = d / f"{name}-noext"
        bare.write_bytes(out[name].read_bytes())
        out[f"{name}-noext"] = bare
    (d / "text.mp4").write_text("hello\n" * 100)
    out["text"] = d / "text.mp4"
    data = out["mp4"].read_bytes()
    (d / "cut.mp4").write_bytes(data[: len(data) // 2])  # moov atom at the end: gone
    out["cut"] = d / "cut.mp4"
    (d / "playlist.m3u8").write_text(f"#EXTM3U\n#EXTINF:2,\nfile://{out['mp4']}\n#EXT-X-ENDLIST\n")
    out["playlist"] = d / "playlist.m3u8"
    return out


def _probe(path: Path) -> probe.ProbeResult:
    return asyncio.run(probe.probe(str(path)))


def test_video_with_audio(files: dict[str, Path]) -> None:
    r = _probe(files["mp4"])
    assert (r.kind, r.family, r.width, r.height, r.video_codec, r.has_audio) == (
        "video", "mp4", 320, 240, "h264", True)
    assert r.duration_s == pytest.approx(2.0, abs=0.1) and r.fps == 25
    assert probe.check_declared("video/mp4", r) is None
    assert probe.check_declared("video/webm", r) is not None
    assert probe.check_declared("image/jpeg", r) is not None


def test_portrait_video_without_audio_and_matroska(files: dict[str, Path]) -> None:
    r = _probe(files["silent"])
    assert (r.width, r.height, r.has_audio) == (240, 320, False)
    m = _probe(files["mkv"])
    assert m.family == "webm" and probe.check_declared("video/x-matroska", m) is None


@pytest.mark.parametrize("name,family", [("png", "png"), ("jpeg", "jpeg"), ("webp", "webp"),
                                         ("png-noext", "png"), ("jpeg-noext", "jpeg")])
def test_images(files: dict[str, Path], name: str, family: str) -> None:
    r = _probe(files[name])
    assert (r.kind, r.family, r.width, r.height) == ("image", family, 64, 48)
    assert probe.check_declared(f"image/{family}", r) is None
    assert probe.check_declared("video/mp4", r) is not None


@pytest.mark.parametrize("name", ["text", "cut", "playlist"])
def test_refused(files: dict[str, Path], name: str) -> None:
    with pytest.raises(probe.ProbeError):
        _probe(files[name])


def test_parse_input_info_reads_ffmpeg_stderr() -> None:
    stderr = """Input #0, mov,mp4,m4a,3gp,3g2,mj2, from 'x':
  Duration: 00:01:02.50, start: 0.000000, bitrate: 278 kb/s
  Stream #0:0[0x1](und): Video: h264 (High) (avc1 / 0x31637661), yuv420p(progressive), 1920x1080 [SAR 1:1 DAR 16:9], 200 kb/s, 29.97 fps, 30 tbr
  Stream #0:1[0x2](und): Audio: aac (LC) (mp4a / 0x6134706D), 44100 Hz, mono, fltp, 69 kb/s (default)
Stream mapping:
  Stream #0:0 -> #0:0 (h264 (native) -> wrapped_avframe (native))
Output #0, null, to 'pipe:':
  Stream #0:0(und): Video: wrapped_avframe, yuv420p(progressive), 320x240
"""
    r = probe.parse_input_info(stderr)
    assert (r.width, r.height, r.duration_s, r.fps, r.has_audio) == (1920, 1080, 62.5, 29.97, True)
    assert probe.frames_decoded("frame=    0 fps\rframe=   12 fps=0.0") == 12


def test_ladder_never_exceeds_the_source() -> None:
    assert [r.name for r in ladder.video_ladder(1920, 1080)] == ["240p", "360p", "480p", "720p", "1080p"]
    assert [(r.width, r.height) for r in ladder.video_ladder(1280, 720)][-1] == (1280, 720)
    assert [r.name for r in ladder.video_ladder(640, 360)] == ["240p", "360p"]
    portrait = ladder.video_ladder(720, 1280)
    assert [(r.width, r.height) for r in portrait] == [(240, 426), (360, 640), (480, 854), (720, 1280)]
    tiny = ladder.video_ladder(160, 120)
    assert [(r.name, r.width, r.height) for r in tiny] == [("120p", 160, 120)]
    assert all(r.width % 2 == 0 and r.height % 2 == 0 for r in ladder.video_ladder(1000, 563))
    assert [v.name for v in ladder.image_variants(1000, 500)] == ["w320", "w640"]
    assert [(v.width, v.height) for v in ladder.image_variants(200, 100)] == [(200, 100)]


def test_video_command_keyframes_segments_and_audio() -> None:
    info = probe.ProbeResult("mov,mp4,m4a,3gp,3g2,mj2", "mp4", "video", 1280, 720, "h264", 10.0, 30.0, False)
    args, rends = ladder.video_command("/src", "/out", info, "ultrafast")
    joined = " ".join(args)
    assert "-hls_time 6" in joined and "-g 60" in joined and "-forced-idr 1" in joined
    assert "expr:gte(t,n_forced*2)" in joined and "-sc_threshold 0" in joined
    assert "0:a:0" not in joined and "aac" not in joined
    assert "v:0,name:240p" in joined and [r.name for r in rends][-1] == "720p"
    assert "-format_whitelist" in args  # the source is opened with the demuxer allowlist


def test_run_with_progress_reports_fractions(tmp_path: Path) -> None:
    seen: list[float] = []

    async def on(f: float) -> None:
        seen.append(f)

    args = samples.video_args(tmp_path / "p.mp4", seconds=3, width=160, height=120)[1:]
    r = asyncio.run(ffmpeg.run_with_progress(args, 3.0, on))
    assert r.returncode == 0 and (tmp_path / "p.mp4").stat().st_size > 0
    assert seen[-1] == 1.0 and seen == sorted(seen)


def test_range_parsing() -> None:
    assert parse_range("bytes=0-99", 1000) == (0, 99)
    assert parse_range("bytes=900-", 1000) == (900, 999)
    assert parse_range("bytes=-100", 1000) == (900, 999)
    assert parse_range("bytes=990-2000", 1000) == (990, 999)
    assert parse_range("bytes=1000-", 1000) is None
    assert parse_range("bytes=-0", 1000) is None
    for bad in ("bytes=0-1,5-6", "items=0-1", "bytes=-"):
        with pytest.raises(ValueError):
            parse_range(bad, 1000)


def test_byte_lru_evicts_least_recently_used_by_size() -> None:
    lru = ByteLRU(10)
    for k in "abc":
        lru.put(k, Entry(b"xxxx", "e", 0, float("inf")))
    assert lru.get("a") is None and lru.size == 8  # a went first
    lru.get("b")
    lru.put("d", Entry(b"yyyy", "e", 0, float("inf")))
    assert lru.get("c") is None and lru.get("b") is not None
    lru.put("big", Entry(b"z" * 11, "e", 0, float("inf")))
    assert lru.get("big") is None
    lru.put("old", Entry(b"", "e", 0, 0.0))  # already expired
    assert lru.get("old") is None
    lru.drop_prefix("b")
    assert lru.get("b") is None and lru.get("d") is not None


def test_zero_copy_upload_decoder_agrees_with_protobuf() -> None:
    import random

    from google.protobuf.message import DecodeError
    from sysdesign.media.v1 import media_pb2 as pb

    from servers.media.wire import parse_upload_request

    rnd = random.Random(5)
    for _ in range(300):
        msg = pb.UploadRequest(upload_id=rnd.choice(["", "123", "é" * 3]),
                               offset=rnd.choice([0, 1, 2**40, -5, 2**63 - 1]),
                               data=rnd.randbytes(rnd.choice([0, 1, 127, 128, 70000])))
        raw = msg.SerializeToString()
        if rnd.random() < 0.3:  # an unknown field of every wire type, and a repeated offset
            raw += b"\x20\x05" + b"\x29" + bytes(8) + b"\x35" + bytes(4) + b"\x3a\x02hi" + b"\x10\x07"
            msg.offset = 7
        got = parse_upload_request(raw)
        assert (got.upload_id, got.offset, bytes(got.data)) == (msg.upload_id, msg.offset, msg.data)
        assert isinstance(got.data, memoryview)
        cut = raw[: rnd.randrange(len(raw))] if raw else b""
        try:
            ref: object = pb.UploadRequest.FromString(cut)
        except DecodeError:
            ref = DecodeError
        try:
            mine: object = parse_upload_request(cut)
        except DecodeError:
            mine = DecodeError
        assert (ref is DecodeError) == (mine is DecodeError), cut
