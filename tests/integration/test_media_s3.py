"""The media pipeline on the S3 adapter (a moto server): multipart staging with 5 MiB parts,
ffmpeg reading the source through a presigned URL, the edge reading renditions from S3."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from sysdesign.media.v1 import media_pb2 as pb
from sysdesign.media.v1 import media_pb2_grpc as pbg

from clients.commands.media import chunks, send_file
from servers.media import samples
from tests.contract.conftest import moto_endpoint  # noqa: F401  (the session's moto server)
from tests.integration.helpers import grpc_metadata
from tests.integration.test_media import create, decode_through_edge, http, wait_ready
from tests.stack import StackProcess

MiB = 1024 * 1024
BUCKET = "media-it"


@pytest.fixture(scope="module")
def s3stack(tmp_path_factory: pytest.TempPathFactory, moto_endpoint: str) -> Iterator[StackProcess]:  # noqa: F811
    s = StackProcess(tmp_path_factory.mktemp("media-s3") / "data", extra_env={
        "SYSDESIGN_S3_ENDPOINT": moto_endpoint, "SYSDESIGN_S3_BUCKET": BUCKET,
        "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
        "SYSDESIGN_MEDIA_PART_BYTES": str(5 * MiB), "SYSDESIGN_MEDIA_PRESET": "ultrafast",
    }).start()
    yield s
    assert s.stop() == 0, s.logs()


def _s3(endpoint: str):  # type: ignore[no-untyped-def]
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test",
                        aws_secret_access_key="test", region_name="us-east-1")


def test_multipart_staging_resume_and_playback_on_s3(
        s3stack: StackProcess, moto_endpoint: str, tmp_path: Path) -> None:  # noqa: F811
    # Big enough for three 5 MiB parts: a high-bitrate clip (ultrafast, noise-like pattern).
    path = samples.make_video(tmp_path / "big.mp4", seconds=6, width=1280, height=720)
    if path.stat().st_size < 11 * MiB:  # pad with a free-space atom, which demuxers skip
        pad = 11 * MiB - path.stat().st_size
        with open(path, "ab") as f:
            f.write((pad + 8).to_bytes(4, "big") + b"free" + b"\0" * pad)
    data = path.read_bytes()
    stub = pbg.MediaServiceStub(s3stack.channel())
    md = grpc_metadata(s3stack.token("sam"))
    up = create(stub, md, path)
    s3 = _s3(moto_endpoint)
    uploads = s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
    assert [u["Key"] for u in uploads] == [f"media-staging/{up.media_id}"]

    # 7 MiB sent then a clean end: only the whole 5 MiB part is committed (S3 refuses
    # smaller non-final parts), the rest is sent again on resume.
    r = stub.Upload(chunks(path, up.upload_id, 0, MiB, stop_after=7 * MiB), metadata=md).upload
    assert r.committed_bytes == 5 * MiB
    parts = s3.list_parts(Bucket=BUCKET, Key=f"media-staging/{up.media_id}",
                          UploadId=uploads[0]["UploadId"])["Parts"]
    assert [p["Size"] for p in parts] == [5 * MiB]
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
    assert m.playback.presigned_poster_url.startswith(moto_endpoint)
    status, _, body = http(m.playback.presigned_poster_url)
    assert status == 200 and body[:2] == b"\xff\xd8"

    stub.DeleteMedia(pb.DeleteMediaRequest(media_id=m.media_id), metadata=md)
    deadline = time.monotonic() + 10
    while s3.list_objects_v2(Bucket=BUCKET, Prefix=f"media/{m.media_id}/").get("Contents"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
