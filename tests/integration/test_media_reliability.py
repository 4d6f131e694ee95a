"""Media pipeline under failure: workers killed mid-transcode, poison jobs, servers restarted mid-upload.

The gRPC server and edge run without workers (`sysdesign serve --services
identity,media --edge`); transcoding workers are separate `sysdesign worker
media` processes on the same Valkey, SQLite file and blob directory, so a test
can SIGKILL one while it transcodes.
"""

from __future__ import annotations

import hashlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from sysdesign.media.v1 import media_pb2 as pb
from sysdesign.media.v1 import media_pb2_grpc as pbg

from clients.commands.media import chunks, send_file
from servers.media import samples
from tests.integration.helpers import grpc_metadata, violations
from tests.integration.test_media import create, decode_through_edge, http, staging_files
from tests.stack import StackProcess

pytestmark = pytest.mark.tables

PART = 64 * 1024


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProcess]:
    s = StackProcess(tmp_path_factory.mktemp("mrel") / "data",
                     extra_env={"SYSDESIGN_MEDIA_PART_BYTES": str(PART),
                                "SYSDESIGN_MEDIA_UPLOAD_TTL_SECONDS": "3"})
    s.start(["serve", "--services", "identity,media", "--edge"])
    yield s
    assert s.stop() == 0, s.logs()


def worker(server: StackProcess, name: str, **env: str) -> StackProcess:
    url = (server.data_dir / "valkey" / "url").read_text().strip()
    w = StackProcess(server.data_dir.parent / name, extra_env={
        "SYSDESIGN_REDIS_URL": url, "SYSDESIGN_DATA_DIR": str(server.data_dir),
        "SYSDESIGN_METRICS_ADDR": "", **env})
    return w.start(["worker", "media"])


@pytest.fixture(scope="module")
def samples_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("relsamples")
    samples.make_video(d / "long.mp4", seconds=8, width=640, height=360)
    samples.make_video(d / "short.mp4", seconds=2, width=320, height=240)
    return d


def _wait(stub: Any, md: Any, media_id: str, states: set[int], timeout: float, min_percent: int = 0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        m = stub.GetMedia(pb.GetMediaRequest(media_id=media_id), metadata=md, timeout=30).media
        if m.state in states and (m.state != pb.MEDIA_STATE_PROCESSING or m.progress_percent >= min_percent):
            return m
        assert time.monotonic() < deadline, f"media {media_id} stuck in {m.state} {m.progress_percent}%"
        time.sleep(0.1)


def test_worker_killed_mid_transcode_the_job_is_reclaimed_and_every_segment_plays(
        server: StackProcess, samples_dir: Path) -> None:
    stub = pbg.MediaServiceStub(server.channel())
    md = grpc_metadata(server.token("dora"))
    # A slow preset keeps the first worker busy long enough to be killed mid-job.
    slow = worker(server, "w-slow", SYSDESIGN_MEDIA_PRESET="veryslow", SYSDESIGN_MEDIA_CLAIM_IDLE_MS="3000")
    try:
        up = send_file(stub, md, samples_dir / "long.mp4", create(stub, md, samples_dir / "long.mp4"))
        m = _wait(stub, md, up.media_id, {pb.MEDIA_STATE_PROCESSING}, 120, min_percent=1)
        assert m.progress_percent < 100
        assert slow.proc is not None
        ffmpegs = [c for c in _children(slow.proc.pid) if _alive(c)]
        assert ffmpegs, "the worker runs ffmpeg as a child"
        slow.stop(signal.SIGKILL)
    finally:
        if slow.proc is not None and slow.proc.poll() is None:
            slow.stop(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in ffmpegs):  # PR_SET_PDEATHSIG: ffmpeg dies with its worker
        assert time.monotonic() < deadline, "ffmpeg outlived its SIGKILLed worker"
        time.sleep(0.05)
    assert stub.GetMedia(pb.GetMediaRequest(media_id=up.media_id), metadata=md).media.state == pb.MEDIA_STATE_PROCESSING

    rescuer = worker(server, "w-rescue", SYSDESIGN_MEDIA_PRESET="ultrafast", SYSDESIGN_MEDIA_CLAIM_IDLE_MS="3000")
    try:
        m = _wait(stub, md, up.media_id, {pb.MEDIA_STATE_READY, pb.MEDIA_STATE_FAILED}, 180)
        assert m.state == pb.MEDIA_STATE_READY, m.failure_reason
        assert "queue_job_reclaimed" in rescuer.logs()
    finally:
        assert rescuer.stop() == 0, rescuer.logs()
    assert [v.name for v in m.variants] == ["240p", "360p"]
    assert not staging_files(server, up.media_id)
    # ffmpeg reads the master playlist through the edge and decodes every segment of every rung.
    decode_through_edge(m.playback.hls_url)
    for v in m.variants:
        playlist = http(v.url)[2].decode()
        segments = [ln for ln in playlist.splitlines() if ln and not ln.startswith("#")]
        assert len(segments) == 2  # 8 s in 6 s segments
        for seg in segments:
            status, _headers, body = http(v.url.replace("index.m3u8", seg))
            assert status == 200 and body[0] == 0x47 and len(body) % 188 == 0  # MPEG-TS packets


def test_a_job_that_keeps_failing_is_dead_lettered_and_the_media_fails(
        server: StackProcess, samples_dir: Path) -> None:
    stub = pbg.MediaServiceStub(server.channel())
    md = grpc_metadata(server.token("erin"))
    # An x264 preset that does not exist: ffmpeg fails on every attempt.
    bad = worker(server, "w-bad", SYSDESIGN_MEDIA_PRESET="no-such-preset",
                 SYSDESIGN_MEDIA_CLAIM_IDLE_MS="500", SYSDESIGN_MEDIA_MAX_ATTEMPTS="2")
    try:
        up = send_file(stub, md, samples_dir / "short.mp4", create(stub, md, samples_dir / "short.mp4"))
        m = _wait(stub, md, up.media_id, {pb.MEDIA_STATE_READY, pb.MEDIA_STATE_FAILED}, 120)
    finally:
        assert bad.stop() == 0, bad.logs()
    assert m.state == pb.MEDIA_STATE_FAILED
    assert m.failure_reason.startswith("gave up after 2 attempts: ffmpeg failed")
    assert not m.variants and not m.playback.hls_url
    url = (server.data_dir / "valkey" / "url").read_text().strip()
    r = redis.Redis.from_url(url)
    try:
        dead = r.xrange("{q:media}:dead")
    finally:
        r.close()
    assert any(f[b"media_id"] == up.media_id.encode() and int(f[b"attempts"]) == 3 for _, f in dead)


def test_upload_resumed_after_a_server_restart_is_verified_by_reading_it_back(
        tmp_path: Path, samples_dir: Path) -> None:
    """The SHA-256 state lives in the serving process: after a restart it is rebuilt from staging."""
    s = StackProcess(tmp_path / "data", extra_env={"SYSDESIGN_MEDIA_PART_BYTES": str(PART),
                                                   "SYSDESIGN_MEDIA_PRESET": "ultrafast"}).start()
    path = samples_dir / "long.mp4"
    data = path.read_bytes()
    try:
        stub = pbg.MediaServiceStub(s.channel())
        md = grpc_metadata(s.token("fay"))
        up = create(stub, md, path)
        half = len(data) // 2
        r = stub.Upload(chunks(path, up.upload_id, 0, 20_000, stop_after=half), metadata=md).upload
        assert r.committed_bytes == half
        assert s.stop(signal.SIGKILL) != 0
        s.start()
        stub = pbg.MediaServiceStub(s.channel())
        got = stub.GetUpload(pb.GetUploadRequest(upload_id=up.upload_id), metadata=md).upload
        assert got.committed_bytes == half  # acknowledged bytes survived the kill
        done = send_file(stub, md, path, got)
        assert done.committed_bytes == len(data)
        m = _wait(stub, md, up.media_id, {pb.MEDIA_STATE_READY, pb.MEDIA_STATE_FAILED}, 120)
        assert m.state == pb.MEDIA_STATE_READY and m.sha256 == hashlib.sha256(data).hexdigest()
        assert "upload_hash_state_lost" in s.logs()
        # The same resume with corrupted bytes after the restart is caught by the read-back.
        up2 = create(stub, md, path)
        stub.Upload(chunks(path, up2.upload_id, 0, 20_000, stop_after=half), metadata=md)
        assert s.stop(signal.SIGKILL) != 0
        s.start()
        stub = pbg.MediaServiceStub(s.channel())
        corrupt = tmp_path / "corrupt.mp4"
        corrupt.write_bytes(data[:half] + bytes(b ^ 0xFF for b in data[half:half + 10]) + data[half + 10:])
        got2 = stub.GetUpload(pb.GetUploadRequest(upload_id=up2.upload_id), metadata=md).upload
        with pytest.raises(grpc.RpcError) as refused:
            send_file(stub, md, corrupt, got2)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "sha256" in violations(refused.value)
        assert not staging_files(s, up2.media_id)
    finally:
        if s.proc is not None and s.proc.poll() is None:
            s.stop()


def test_an_abandoned_upload_expires_and_frees_staging_and_quota(
        server: StackProcess, samples_dir: Path) -> None:
    stub = pbg.MediaServiceStub(server.channel())
    md = grpc_metadata(server.token("gus"))
    path = samples_dir / "long.mp4"
    stale = create(stub, md, path)
    stub.Upload(chunks(path, stale.upload_id, 0, 20_000, stop_after=3 * PART), metadata=md)
    busy = create(stub, md, path)
    assert staging_files(server, stale.media_id)
    deadline = time.monotonic() + 60
    while True:  # the next CreateUpload after the TTL sweeps the abandoned one
        time.sleep(1.0)
        # Written to within the TTL: kept, with a new expiry.
        at = stub.GetUpload(pb.GetUploadRequest(upload_id=busy.upload_id), metadata=md).upload.committed_bytes
        stub.Upload(chunks(path, busy.upload_id, at, 1000, stop_after=1000), metadata=md)
        probe = create(stub, md, path)
        stub.DeleteMedia(pb.DeleteMediaRequest(media_id=probe.media_id), metadata=md)
        ids = [m.media_id for m in stub.ListMedia(pb.ListMediaRequest(), metadata=md).media]
        if stale.media_id not in ids:
            break
        assert time.monotonic() < deadline, "the abandoned upload was never swept"
    assert busy.media_id in ids
    assert not staging_files(server, stale.media_id)
    with pytest.raises(grpc.RpcError) as gone:
        stub.GetUpload(pb.GetUploadRequest(upload_id=stale.upload_id), metadata=md)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
