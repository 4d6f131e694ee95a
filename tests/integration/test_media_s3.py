"""The media pipeline on the S3 adapter: multipart staging with 5 MiB parts, ffmpeg reading the
source through a presigned URL, the edge reading renditions from S3.

It runs twice: on a moto server with an 11 MiB upload, and on a real MinIO
server (built from the Go module proxy, ``scripts/minio.py``) with a 65 MiB
upload, each interrupted once and resumed from the committed offset."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from sysdesign.media.v1 import media_pb2 as pb
from sysdesign.media.v1 import media_pb2_grpc as pbg

from clients.commands.media import chunks, send_file
from servers.media import samples
from tests.contract.conftest import minio, moto_endpoint  # noqa: F401  (the session's S3 servers)
from tests.integration.helpers import grpc_metadata
from tests.integration.test_media import create, decode_through_edge, http, wait_ready
from tests.stack import StackProcess

MiB = 1024 * 1024
BUCKET = "media-it"


@dataclass(frozen=True)
class S3Engine:
    name: str
    endpoint: str
    env: dict[str, str]
    upload_mib: int  # the size of the upload the test interrupts and resumes


@pytest.fixture(scope="module", params=["moto", "minio"])
def s3engine(request: pytest.FixtureRequest) -> S3Engine:
    if request.param == "moto":
        endpoint = request.getfixturevalue("moto_endpoint")
        return S3Engine("moto", endpoint, {"SYSDESIGN_S3_ENDPOINT": endpoint, "AWS_ACCESS_KEY_ID": "test",
                                           "AWS_SECRET_ACCESS_KEY": "test"}, 11)
    server = request.getfixturevalue("minio")
    return S3Engine("minio", server.endpoint, server.env(), 65)


@pytest.fixture(scope="module")
def s3stack(tmp_path_factory: pytest.TempPathFactory, s3engine: S3Engine) -> Iterator[StackProcess]:
    s = StackProcess(tmp_path_factory.mktemp(f"media-{s3engine.name}") / "data", extra_env={
        **s3engine.env, "SYSDESIGN_S3_BUCKET": BUCKET,
        "SYSDESIGN_MEDIA_PART_BYTES": str(5 * MiB), "SYSDESIGN_MEDIA_PRESET": "ultrafast",
    }).start()
    yield s
    assert s.stop() == 0, s.logs()


def _s3(engine: S3Engine):  # type: ignore[no-untyped-def]
    return boto3.client("s3", endpoint_url=engine.endpoint, aws_access_key_id=engine.env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=engine.env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")


def test_multipart_staging_resume_and_playback_on_s3(
        s3stack: StackProcess, s3engine: S3Engine, tmp_path: Path) -> None:
    # Several 5 MiB parts: a high-bitrate clip (ultrafast, noise-like pattern), padded to the
    # engine's upload size with a free-space atom, which demuxers skip.
    size = s3engine.upload_mib * MiB
    path = samples.make_video(tmp_path / "big.mp4", seconds=6, width=1280, height=720)
    if path.stat().st_size < size:
        pad = size - path.stat().st_size
        with open(path, "ab") as f:
            f.write((pad + 8).to_bytes(4, "big") + b"free" + b"\0" * pad)
    data = path.read_bytes()
    stub = pbg.MediaServiceStub(s3stack.channel())
    md = grpc_metadata(s3stack.token("sam"))
    up = create(stub, md, path)
    s3 = _s3(s3engine)
    uploads = s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
    assert [u["Key"] for u in uploads] == [f"media-staging/{up.media_id}"]

    # Past half the file, two MiB beyond a part boundary, then a clean end: only whole 5 MiB
    # parts are committed (S3 refuses smaller non-final parts); the rest is sent again on resume.
    whole_parts = len(data) // 2 // (5 * MiB)
    r = stub.Upload(chunks(path, up.upload_id, 0, MiB, stop_after=whole_parts * 5 * MiB + 2 * MiB),
                    metadata=md).upload
    assert r.committed_bytes == whole_parts * 5 * MiB
    parts = s3.list_parts(Bucket=BUCKET, Key=f"media-staging/{up.media_id}",
                          UploadId=uploads[0]["UploadId"])["Parts"]
    assert [p["Size"] for p in parts] == [5 * MiB] * whole_parts
    done = send_file(stub, md, path, r, chunk_size=MiB)
    assert done.committed_bytes == len(data)

    m = wait_ready(stub, md, up.media_id)
    assert m.sha256 == hashlib.sha256(data).hexdigest()
    assert [v.name for v in m.variants] == ["240p", "360p", "480p", "720p"]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"media/{m.media_id}/")["Contents"]]
    assert f"media/{m.media_id}/master.m3u8" in keys and f"media/{m.media_id}/720p/seg_00000.ts" in keys
    assert not s3.list_objects_v2(Bucket=BUCKET, Prefix="media-staging/").get("Contents")
    assert not s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads")

    # Playback: the edge reads from S3; the poster also has a presigned URL straight to S3.
    assert m.playback.hls_url.startswith(s3stack.http_base)
    decode_through_edge(m.playback.hls_url)
    assert m.playback.presigned_poster_url.startswith(s3engine.endpoint)
    status, _, body = http(m.playback.presigned_poster_url)
    assert status == 200 and body[:2] == b"\xff\xd8"

    stub.DeleteMedia(pb.DeleteMediaRequest(media_id=m.media_id), metadata=md)
    deadline = time.monotonic() + 10
    while s3.list_objects_v2(Bucket=BUCKET, Prefix=f"media/{m.media_id}/").get("Contents"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
