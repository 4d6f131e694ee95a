"""`sysdesign media upload|watch|get` against a real stack, including a killed upload resumed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sysdesign.media.v1 import media_pb2 as pb
from sysdesign.media.v1 import media_pb2_grpc as pbg

from servers.media import samples
from tests.integration.helpers import grpc_metadata
from tests.integration.test_media import http
from tests.stack import ROOT, StackProcess

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def cstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProcess]:
    s = StackProcess(tmp_path_factory.mktemp("media-cli") / "data", extra_env={
        "SYSDESIGN_MEDIA_PART_BYTES": str(256 * 1024), "SYSDESIGN_MEDIA_PRESET": "ultrafast"}).start()
    yield s
    assert s.stop() == 0, s.logs()


def cli(stack: StackProcess, cache: Path, *args: str) -> subprocess.Popen[str]:
    env = {**stack.env(), "XDG_CACHE_HOME": str(cache)}
    return subprocess.Popen([sys.executable, "-m", "clients.cli", "media", *args], env=env, cwd=str(ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def padded_video(path: Path, size: int) -> Path:
    clip = samples.make_video(path.with_suffix(".clip.mp4"), seconds=2, width=320, height=240).read_bytes()
    pad = size - len(clip) - 8
    path.write_bytes(clip + (pad + 8).to_bytes(4, "big") + b"free" + os.urandom(pad))
    return path


def test_upload_watch_and_get(cstack: StackProcess, tmp_path: Path) -> None:
    token = cstack.token("cli")
    clip = samples.make_video(tmp_path / "clip.mp4", seconds=3, width=320, height=240)
    p = cli(cstack, tmp_path / "cache", "upload", str(clip), "--token", token)
    out, err = p.communicate(timeout=180)
    assert p.returncode == 0, err
    media_id, url = out.split()
    assert url.endswith("/master.m3u8") and http(url)[0] == 200
    assert "READY" in err
    g = cli(cstack, tmp_path / "cache", "get", media_id, "--token", token)
    out, err = g.communicate(timeout=60)
    assert g.returncode == 0 and out.strip() == url and "240p" in err
    assert not list((tmp_path / "cache").rglob("*.json")), "the resume record is removed when done"


def test_killed_upload_resumes_where_it_stopped(cstack: StackProcess, tmp_path: Path) -> None:
    token = cstack.token("cli2")
    stub = pbg.MediaServiceStub(cstack.channel())
    md = grpc_metadata(token)
    big = padded_video(tmp_path / "big.mp4", 48 * MiB)
    cache = tmp_path / "cache"
    first = cli(cstack, cache, "upload", str(big), "--token", token, "--no-watch", "--chunk-size", "65536",
                "--limit-rate", str(4 * MiB))
    deadline = time.monotonic() + 120
    committed = 0
    while committed == 0:
        assert first.poll() is None, "the upload finished before it could be interrupted"
        assert time.monotonic() < deadline
        items = stub.ListMedia(pb.ListMediaRequest(), metadata=md).media
        if items:
            committed = stub.GetUpload(pb.GetUploadRequest(upload_id=items[0].media_id),
                                       metadata=md).upload.committed_bytes
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    assert list(cache.rglob("*.json")), "a resume record is kept while the upload is unfinished"
    media_id = items[0].media_id

    second = cli(cstack, cache, "upload", str(big), "--token", token, "--no-watch")
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err
    assert f"resuming upload {media_id} at " in err
    resumed_at = int(err.split(f"resuming upload {media_id} at ")[1].split()[0].replace(",", ""))
    assert resumed_at >= committed > 0
    assert out.strip() == media_id
    m = stub.GetMedia(pb.GetMediaRequest(media_id=media_id), metadata=md).media
    assert m.size_bytes == 48 * MiB and m.state in (pb.MEDIA_STATE_PROCESSING, pb.MEDIA_STATE_READY)
    assert len(stub.ListMedia(pb.ListMediaRequest(), metadata=md).media) == 1
