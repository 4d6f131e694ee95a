"""The media pipeline end to end on a real stack: upload, transcode, play through the edge."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from sysdesign.media.v1 import media_pb2 as pb
from sysdesign.media.v1 import media_pb2_grpc as pbg

from clients.commands.media import chunks, send_file
from servers.media import samples
from servers.media.ffmpeg import ffmpeg_exe
from tests.integration.helpers import (
    details_of,
    error_reason,
    expect_error,
    grpc_metadata,
    violations,
)
from tests.stack import StackProcess

pytestmark = [pytest.mark.tables, pytest.mark.redis_cluster]

PART = 64 * 1024  # small staging parts, so small files span several


@pytest.fixture(scope="module")
def mstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProcess]:
    s = StackProcess(tmp_path_factory.mktemp("media") / "data", extra_env={
        "SYSDESIGN_MEDIA_PART_BYTES": str(PART),
        "SYSDESIGN_MEDIA_PRESET": "ultrafast",
        "SYSDESIGN_MEDIA_QUOTA_BYTES": str(40 * 1024 * 1024),
    }).start()
    yield s
    assert s.stop() == 0, s.logs()


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("samples")
    samples.make_video(d / "clip.mp4", seconds=4, width=640, height=360)
    samples.make_video(d / "silent.mp4", seconds=3, width=320, height=240, audio=False)
    jpeg = samples.make_image(d / "plain.jpg", width=800, height=600).read_bytes()
    (d / "exif.jpg").write_bytes(samples.add_exif(jpeg))
    return d


@pytest.fixture(scope="module")
def stub(mstack: StackProcess) -> pbg.MediaServiceStub:
    return pbg.MediaServiceStub(mstack.channel())


@pytest.fixture(scope="module")
def alice_md(mstack: StackProcess) -> Any:
    return grpc_metadata(mstack.token("alice"))


@pytest.fixture(scope="module")
def bob_md(mstack: StackProcess) -> Any:
    return grpc_metadata(mstack.token("bob"))


def create(stub: Any, md: Any, path: Path, content_type: str = "video/mp4", *,
           sha256: str | None = None, size: int | None = None) -> Any:
    data = path.read_bytes()
    return stub.CreateUpload(pb.CreateUploadRequest(
        filename=path.name, content_type=content_type, size_bytes=len(data) if size is None else size,
        sha256=sha256 or hashlib.sha256(data).hexdigest()), metadata=md, timeout=30).upload


def upload(stub: Any, md: Any, path: Path, content_type: str = "video/mp4") -> Any:
    return send_file(stub, md, path, create(stub, md, path, content_type), chunk_size=16 * 1024)


def wait_ready(stub: Any, md: Any, media_id: str, timeout: float = 180) -> Any:
    seen: list[tuple[int, int]] = []
    deadline = time.monotonic() + timeout
    for resp in stub.WatchMedia(pb.WatchMediaRequest(media_id=media_id), metadata=md, timeout=timeout):
        seen.append((resp.media.state, resp.media.progress_percent))
        if resp.media.state in (pb.MEDIA_STATE_READY, pb.MEDIA_STATE_FAILED):
            break
        assert time.monotonic() < deadline
    m = stub.GetMedia(pb.GetMediaRequest(media_id=media_id), metadata=md, timeout=30).media
    assert m.state == pb.MEDIA_STATE_READY, f"{m.failure_reason} (states seen {seen})"
    return m


def staging_files(stack: StackProcess, media_id: str | None = None) -> list[Path]:
    """Staged bytes left on the filesystem backend: of one media item, or of any."""
    blobs = stack.data_dir / "blobs"
    found = [p for p in (blobs / "objects" / "media-staging~").glob("*")
             if media_id is None or p.name == media_id]
    for key in (blobs / "uploads").glob("*/key"):
        if media_id is None or key.read_text() == f"media-staging/{media_id}":
            found.append(key.parent)
    return found


def staged_bytes(stack: StackProcess, media_id: str) -> int:
    """Bytes in the staging file of one upload in progress (filesystem backend)."""
    for key in (stack.data_dir / "blobs" / "uploads").glob("*/key"):
        if key.read_text() == f"media-staging/{media_id}":
            return (key.parent / "data").stat().st_size
    raise AssertionError(f"no staging upload for {media_id}")


def http(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def decode_through_edge(url: str) -> str:
    """ffmpeg plays the master playlist over HTTP: every rung, every segment, decoded."""
    r = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-i", url,
                        "-map", "0", "-f", "null", "-"], capture_output=True, timeout=180, text=True)
    assert r.returncode == 0, r.stderr
    return r.stderr


# -- the happy path ---------------------------------------------------------------------


def test_video_upload_becomes_an_hls_ladder_played_through_the_edge(
        stub: Any, alice_md: Any, media_dir: Path, mstack: StackProcess) -> None:
    up = upload(stub, alice_md, media_dir / "clip.mp4")
    assert up.committed_bytes == up.size_bytes
    assert up.state in (pb.MEDIA_STATE_PROCESSING, pb.MEDIA_STATE_READY)
    m = wait_ready(stub, alice_md, up.media_id)
    assert (m.width, m.height, m.has_audio, m.kind) == (640, 360, True, pb.MEDIA_KIND_VIDEO)
    assert 3900 <= m.duration.ToMilliseconds() <= 4100
    assert [v.name for v in m.variants] == ["240p", "360p"]  # never above the source
    assert [(v.width, v.height) for v in m.variants] == [(426, 240), (640, 360)]
    assert m.playback.hls_url.startswith(mstack.http_base + f"/media/{m.media_id}/")
    assert m.processing_duration.ToMilliseconds() > 0
    assert not staging_files(mstack, m.media_id), "staging is removed after success"

    status, headers, body = http(m.playback.hls_url)
    assert status == 200 and headers["Content-Type"] == "application/vnd.apple.mpegurl"
    assert "immutable" not in headers["Cache-Control"] and "max-age=" in headers["Cache-Control"]
    master = body.decode()
    inf = re.findall(r"#EXT-X-STREAM-INF:(.*)\n(.*)", master)
    assert [u for _, u in inf] == ["240p/index.m3u8", "360p/index.m3u8"]
    for attrs, _ in inf:
        assert re.search(r"BANDWIDTH=\d+", attrs) and re.search(r"RESOLUTION=\d+x\d+", attrs)
    assert "RESOLUTION=640x360" in master
    rung = http(m.variants[0].url)[2].decode()
    assert "#EXT-X-PLAYLIST-TYPE:VOD" in rung and "#EXT-X-ENDLIST" in rung
    assert int(re.search(r"#EXT-X-TARGETDURATION:(\d+)", rung).group(1)) <= 6  # type: ignore[union-attr]

    log = decode_through_edge(m.playback.hls_url)
    assert "error" not in log.lower()

    poster = http(m.playback.poster_url)
    assert poster[0] == 200 and poster[1]["Content-Type"] == "image/jpeg" and poster[2][:2] == b"\xff\xd8"


def test_segments_start_with_a_keyframe_every_two_seconds(
        stub: Any, alice_md: Any, media_dir: Path, tmp_path: Path) -> None:
    m = wait_ready(stub, alice_md, upload(stub, alice_md, media_dir / "clip.mp4").media_id)
    seg_url = m.variants[1].url.replace("index.m3u8", "seg_00000.ts")
    (tmp_path / "seg.ts").write_bytes(http(seg_url)[2])
    r = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(tmp_path / "seg.ts"), "-map", "0:v",
                        "-vf", "select='eq(pict_type\\,I)',showinfo", "-f", "null", "-"],
                       capture_output=True, text=True, timeout=60)
    times = [float(t) for t in re.findall(r"pts_time:([\d.]+)", r.stderr)]
    assert len(times) >= 2, r.stderr[-2000:]
    gaps = {round(b - a, 1) for a, b in itertools.pairwise(times)}
    assert gaps == {2.0}, times


def test_video_without_audio_gets_video_only_rungs(stub: Any, alice_md: Any, media_dir: Path) -> None:
    m = wait_ready(stub, alice_md, upload(stub, alice_md, media_dir / "silent.mp4").media_id)
    assert not m.has_audio
    assert [v.name for v in m.variants] == ["240p"]
    master = http(m.playback.hls_url)[2].decode()
    assert "mp4a" not in master
    decode_through_edge(m.playback.hls_url)


def test_image_becomes_webp_variants_without_exif(stub: Any, alice_md: Any, media_dir: Path) -> None:
    assert b"sysdesign-secret-gps" in (media_dir / "exif.jpg").read_bytes()
    m = wait_ready(stub, alice_md, upload(stub, alice_md, media_dir / "exif.jpg", "image/jpeg").media_id)
    assert m.kind == pb.MEDIA_KIND_IMAGE and (m.width, m.height) == (800, 600)
    assert [(v.name, v.width, v.height) for v in m.variants] == [("w320", 320, 240), ("w640", 640, 480)]
    for v in m.variants:
        status, headers, body = http(v.url)
        assert status == 200 and headers["Content-Type"] == "image/webp"
        assert body[:4] == b"RIFF" and body[8:12] == b"WEBP"
        assert b"EXIF" not in body and b"sysdesign-secret-gps" not in body
    assert m.playback.poster_url == m.variants[-1].url


# -- the edge ------------------------------------------------------------------------


def test_edge_serves_ranges_etags_and_marks_cache_hits(stub: Any, alice_md: Any, media_dir: Path) -> None:
    m = wait_ready(stub, alice_md, upload(stub, alice_md, media_dir / "silent.mp4").media_id)
    seg = m.variants[0].url.replace("index.m3u8", "seg_00000.ts")
    s1, h1, full = http(seg)
    assert s1 == 200 and h1["Content-Type"] == "video/mp2t" and h1["X-Cache"] == "MISS"
    assert h1["Cache-Control"] == "public, max-age=31536000, immutable"
    _s2, h2, _ = http(seg)
    assert h2["X-Cache"] == "HIT" and h2["ETag"] == h1["ETag"]
    s3, h3, part = http(seg, {"Range": "bytes=188-375"})
    assert s3 == 206 and part == full[188:376] and h3["Content-Range"] == f"bytes 188-375/{len(full)}"
    s4, _, tail = http(seg, {"Range": "bytes=-100"})
    assert s4 == 206 and tail == full[-100:]
    s5, h5, _ = http(seg, {"Range": f"bytes={len(full)}-"})
    assert s5 == 416 and h5["Content-Range"] == f"bytes */{len(full)}"
    s6, _, body6 = http(seg, {"If-None-Match": h1["ETag"]})
    assert s6 == 304 and body6 == b""
    # The signature is the capability: change one character and nothing is there.
    mid_sig = seg.split("/media/")[1].split("/")
    bad = seg.replace(mid_sig[1], ("0" if mid_sig[1][0] != "0" else "1") + mid_sig[1][1:])
    assert http(bad)[0] == 404


# -- resumable uploads ------------------------------------------------------------------


def test_interrupted_upload_resumes_from_the_committed_offset(
        stub: Any, alice_md: Any, media_dir: Path) -> None:
    path = media_dir / "clip.mp4"
    data = path.read_bytes()
    up = create(stub, alice_md, path)
    assert up.committed_bytes == 0 and up.state == pb.MEDIA_STATE_UPLOADING
    chunk = 10_000
    stop_at = random.Random(7).randrange(3, len(data) // chunk - 2) * chunk
    # The connection breaks after stop_at bytes: the client stalls, then cancels mid-stream.
    stalled = threading.Event()
    release = threading.Event()

    def stalling() -> Iterator[Any]:
        yield from chunks(path, up.upload_id, 0, chunk, stop_after=stop_at)
        stalled.set()
        release.wait(60)

    sent = stub.Upload.future(stalling(), metadata=alice_md)
    assert stalled.wait(60)
    time.sleep(1.0)  # the server reads what was sent
    sent.cancel()
    release.set()
    with pytest.raises(grpc.FutureCancelledError):
        sent.result()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the cancelled stream records its parts as it ends
        got = stub.GetUpload(pb.GetUploadRequest(upload_id=up.upload_id), metadata=alice_md).upload
        if got.committed_bytes > 0:
            break
        time.sleep(0.05)
    assert got.state == pb.MEDIA_STATE_UPLOADING
    # Whole parts only: the bytes of the part being filled when the stream broke were dropped.
    assert 0 < got.committed_bytes <= stop_at and got.committed_bytes % PART == 0 and stop_at % PART
    # A clean end of stream stores the tail too (the filesystem takes parts of any size).
    # The cancelled stream records its parts before it lets go of the upload's lock
    # (a few Redis calls later): until then a resume is ABORTED "retry shortly", as
    # a client would, it retries.
    deadline = time.monotonic() + 30
    while True:
        try:
            r = stub.Upload(chunks(path, up.upload_id, got.committed_bytes, chunk,
                                   stop_after=stop_at + 5000 - got.committed_bytes),
                            metadata=alice_md).upload
            break
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.ABORTED or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    assert r.committed_bytes == stop_at + 5000
    done = send_file(stub, alice_md, path, r)
    assert done.committed_bytes == len(data) and done.state != pb.MEDIA_STATE_UPLOADING
    m = wait_ready(stub, alice_md, up.media_id)
    assert m.sha256 == hashlib.sha256(data).hexdigest()


def test_offset_that_skips_bytes_is_refused_with_the_committed_offset(
        stub: Any, alice_md: Any, media_dir: Path, mstack: StackProcess) -> None:
    path = media_dir / "clip.mp4"
    up = create(stub, alice_md, path)
    err = expect_error(grpc.StatusCode.FAILED_PRECONDITION, stub.Upload,
                       iter([pb.UploadRequest(upload_id=up.upload_id, offset=100, data=b"x" * 10)]),
                       metadata=alice_md)
    assert error_reason(err) == "UPLOAD_OFFSET_MISMATCH"
    info = details_of(err, error_details_pb2.ErrorInfo)[0]
    assert info.metadata["committed_offset"] == "0"
    assert staged_bytes(mstack, up.media_id) == 0
    # After two parts, an overlapping offset: nothing past the committed offset is stored.
    data = path.read_bytes()
    msgs = [pb.UploadRequest(upload_id=up.upload_id, offset=0, data=data[:2 * PART]),
            pb.UploadRequest(upload_id=up.upload_id, offset=2 * PART, data=data[2 * PART:2 * PART + 1000]),
            pb.UploadRequest(upload_id=up.upload_id, offset=2 * PART - 10, data=data[2 * PART - 10:2 * PART])]
    err = expect_error(grpc.StatusCode.FAILED_PRECONDITION, stub.Upload, iter(msgs), metadata=alice_md)
    meta = details_of(err, error_details_pb2.ErrorInfo)[0].metadata
    assert meta["committed_offset"] == str(2 * PART) and meta["expected_offset"] == str(2 * PART + 1000)
    got = stub.GetUpload(pb.GetUploadRequest(upload_id=up.upload_id), metadata=alice_md).upload
    assert got.committed_bytes == 2 * PART
    assert staged_bytes(mstack, up.media_id) == 2 * PART  # the 1000 buffered bytes were dropped
    stub.DeleteMedia(pb.DeleteMediaRequest(media_id=up.media_id), metadata=alice_md)


# -- refused files ---------------------------------------------------------------------


def _refused(stub: Any, md: Any, path: Path, content_type: str, stack: StackProcess, *,
             sha256: str | None = None) -> grpc.RpcError:
    """Upload a file that must be refused; assert nothing of it is left anywhere."""
    up = create(stub, md, path, content_type, sha256=sha256)
    assert staging_files(stack, up.media_id)  # the staging upload exists while bytes arrive
    err = expect_error(grpc.StatusCode.INVALID_ARGUMENT,
                       lambda *a, timeout: send_file(stub, md, path, up), None)
    expect_error(grpc.StatusCode.NOT_FOUND, stub.GetUpload, pb.GetUploadRequest(upload_id=up.upload_id),
                 metadata=md)
    assert not staging_files(stack, up.media_id), "nothing is left in staging"
    listed = stub.ListMedia(pb.ListMediaRequest(page_size=100), metadata=md).media
    assert up.media_id not in [m.media_id for m in listed]
    return err


def test_truncated_video_is_refused_and_removed(stub: Any, alice_md: Any, media_dir: Path,
                                                mstack: StackProcess, tmp_path: Path) -> None:
    cut = tmp_path / "cut.mp4"
    cut.write_bytes((media_dir / "clip.mp4").read_bytes()[:40_000])
    err = _refused(stub, alice_md, cut, "video/mp4", mstack)
    assert "data" in violations(err)


def test_wrong_sha256_is_refused_and_removed(stub: Any, alice_md: Any, media_dir: Path,
                                             mstack: StackProcess) -> None:
    err = _refused(stub, alice_md, media_dir / "silent.mp4", "video/mp4", mstack, sha256="ab" * 32)
    assert "does not match" in violations(err)["sha256"]


def test_text_file_named_mp4_is_refused(stub: Any, alice_md: Any, mstack: StackProcess, tmp_path: Path) -> None:
    fake = tmp_path / "notes.mp4"
    fake.write_text("these are not the frames you are looking for\n" * 200)
    err = _refused(stub, alice_md, fake, "video/mp4", mstack)
    desc = violations(err)["data"]
    assert "is not a video or image" in desc
    # ffmpeg's text (server paths, "error opening input file …") never reaches the client...
    for leak in (str(mstack.data_dir), "media-staging", "error opening", "|", "Invalid data"):
        assert leak not in (err.details() or "") and leak not in desc, (leak, err.details())
    # ...it is in the server log, under the request id the client was given.
    rid = dict(err.trailing_metadata() or ())["x-request-id"]
    logged = [json.loads(line) for line in mstack.log_path.read_text().splitlines()
              if "media_probe_failed" in line and rid in line]
    assert logged and logged[0]["request_id"] == rid and logged[0]["ffmpeg_output"], mstack.logs()


def test_content_that_does_not_match_the_declared_type_is_refused(
        stub: Any, alice_md: Any, media_dir: Path, mstack: StackProcess) -> None:
    err = _refused(stub, alice_md, media_dir / "plain.jpg", "video/mp4", mstack)
    assert "declared video/mp4" in violations(err)["content_type"]


def test_bad_declarations_are_refused_before_anything_is_stored(
        stub: Any, alice_md: Any, mstack: StackProcess) -> None:
    before = stub.ListMedia(pb.ListMediaRequest(page_size=100), metadata=alice_md).media
    err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, stub.CreateUpload, pb.CreateUploadRequest(
        filename="empty.mp4", content_type="video/mp4", size_bytes=0, sha256=hashlib.sha256(b"").hexdigest()),
        metadata=alice_md)
    assert "size_bytes" in violations(err)
    err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, stub.CreateUpload, pb.CreateUploadRequest(
        filename="../x.mp4", content_type="application/x-sh", size_bytes=10, sha256="nope"), metadata=alice_md)
    assert set(violations(err)) == {"filename", "content_type", "sha256"}
    after = stub.ListMedia(pb.ListMediaRequest(page_size=100), metadata=alice_md).media
    assert len(after) == len(before)


def test_quota_is_enforced_per_user(stub: Any, bob_md: Any, media_dir: Path) -> None:
    big = 30 * 1024 * 1024
    first = stub.CreateUpload(pb.CreateUploadRequest(filename="a.mp4", content_type="video/mp4",
                                                     size_bytes=big, sha256="0" * 64), metadata=bob_md).upload
    err = expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, stub.CreateUpload, pb.CreateUploadRequest(
        filename="b.mp4", content_type="video/mp4", size_bytes=big, sha256="0" * 64), metadata=bob_md)
    assert error_reason(err) == "MEDIA_QUOTA_EXCEEDED"
    assert details_of(err, error_details_pb2.QuotaFailure)
    stub.DeleteMedia(pb.DeleteMediaRequest(media_id=first.media_id), metadata=bob_md)
    again = stub.CreateUpload(pb.CreateUploadRequest(filename="b.mp4", content_type="video/mp4",
                                                     size_bytes=big, sha256="0" * 64), metadata=bob_md).upload
    stub.DeleteMedia(pb.DeleteMediaRequest(media_id=again.media_id), metadata=bob_md)


# -- ownership ----------------------------------------------------------------------------


def test_another_users_media_can_be_neither_read_nor_deleted(
        stub: Any, alice_md: Any, bob_md: Any, media_dir: Path) -> None:
    m = wait_ready(stub, alice_md, upload(stub, alice_md, media_dir / "silent.mp4").media_id)
    for call, req in ((stub.GetMedia, pb.GetMediaRequest(media_id=m.media_id)),
                      (stub.GetUpload, pb.GetUploadRequest(upload_id=m.media_id)),
                      (stub.DeleteMedia, pb.DeleteMediaRequest(media_id=m.media_id))):
        err = expect_error(grpc.StatusCode.NOT_FOUND, call, req, metadata=bob_md)
        assert error_reason(err) == "MEDIA_NOT_FOUND"
    err = expect_error(grpc.StatusCode.NOT_FOUND, lambda r, **kw: list(stub.WatchMedia(r, **kw)),
                       pb.WatchMediaRequest(media_id=m.media_id), metadata=bob_md)
    bob_list = stub.ListMedia(pb.ListMediaRequest(), metadata=bob_md).media
    assert m.media_id not in [x.media_id for x in bob_list]
    up = create(stub, alice_md, media_dir / "silent.mp4")
    expect_error(grpc.StatusCode.NOT_FOUND, stub.Upload,
                 iter([pb.UploadRequest(upload_id=up.upload_id, offset=0, data=b"x")]), metadata=bob_md)
    # Still alice's, still playable.
    assert stub.GetMedia(pb.GetMediaRequest(media_id=m.media_id), metadata=alice_md).media.state == pb.MEDIA_STATE_READY
    assert http(m.playback.hls_url)[0] == 200
    stub.DeleteMedia(pb.DeleteMediaRequest(media_id=up.media_id), metadata=alice_md)


def test_delete_removes_renditions_from_the_edge(stub: Any, alice_md: Any, media_dir: Path,
                                                 mstack: StackProcess) -> None:
    m = wait_ready(stub, alice_md, upload(stub, alice_md, media_dir / "silent.mp4").media_id)
    assert http(m.playback.hls_url)[0] == 200
    stub.DeleteMedia(pb.DeleteMediaRequest(media_id=m.media_id), metadata=alice_md)
    assert http(m.playback.hls_url)[0] == 404
    assert not list((mstack.data_dir / "blobs" / "objects" / "media~").glob(f"{m.media_id}~/**/*"))
    expect_error(grpc.StatusCode.NOT_FOUND, stub.GetMedia, pb.GetMediaRequest(media_id=m.media_id),
                 metadata=alice_md)


def test_list_pages_newest_first(stub: Any, mstack: StackProcess, media_dir: Path) -> None:
    md = grpc_metadata(mstack.token("carol"))
    ids = [create(stub, md, media_dir / "silent.mp4").media_id for _ in range(3)]
    first = stub.ListMedia(pb.ListMediaRequest(page_size=2), metadata=md)
    second = stub.ListMedia(pb.ListMediaRequest(page_size=2, page_token=first.next_page_token), metadata=md)
    assert [m.media_id for m in [*first.media, *second.media]] == ids[::-1]
    assert second.next_page_token == ""
    assert all(m.state == pb.MEDIA_STATE_UPLOADING for m in first.media)
