"""Drive on the S3 adapter: blocks stored once under their hash in the bucket, read back, and
collected from the bucket once nothing holds them. Runs on a moto server and on a real MinIO
server (built from the Go module proxy, ``scripts/minio.py``)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator

import pytest
from botocore.exceptions import ClientError
from sysdesign.drive.v1 import drive_pb2 as pb
from sysdesign.drive.v1 import drive_pb2_grpc as pbg

from tests.contract.conftest import minio, moto_endpoint  # noqa: F401  (the session's S3 servers)
from tests.integration.helpers import grpc_metadata
from tests.integration.test_drive import BLOCK, data_of, get, put
from tests.integration.test_media_s3 import S3Engine, _s3, s3engine  # noqa: F401

BUCKET = "drive-it"


@pytest.fixture(scope="module")
def s3stack(tmp_path_factory: pytest.TempPathFactory, s3engine: S3Engine) -> Iterator[tuple[object, S3Engine]]:  # noqa: F811
    from tests.stack import StackProcess

    s = StackProcess(tmp_path_factory.mktemp(f"drive-{s3engine.name}") / "data", extra_env={
        **s3engine.env, "SYSDESIGN_S3_BUCKET": BUCKET,
        "SYSDESIGN_DRIVE_BLOCK_BYTES": str(BLOCK), "SYSDESIGN_DRIVE_GRACE_SECONDS": "2",
        "SYSDESIGN_DRIVE_GC_BUCKET_SECONDS": "1", "SYSDESIGN_DRIVE_SWEEP_SECONDS": "1",
    }).start()
    yield s, s3engine
    assert s.stop() == 0, s.logs()


def _exists(s3: object, digest: str) -> bool:
    try:
        s3.head_object(Bucket=BUCKET, Key=f"cas/sha256/{digest[:2]}/{digest[2:4]}/{digest}")  # type: ignore[attr-defined]
        return True
    except ClientError:
        return False


def test_blocks_live_once_in_the_bucket_and_are_collected(s3stack: tuple[object, S3Engine]) -> None:
    stack, engine = s3stack
    stub = pbg.DriveServiceStub(stack.channel())  # type: ignore[attr-defined]
    alice, bob = stack.token("s3alice"), stack.token("s3bob")  # type: ignore[attr-defined]
    data = data_of(4 * BLOCK + 10, 30)
    put(stub, alice, "/big.bin", data)
    put(stub, bob, "/same.bin", data)  # bob uploads it himself; the bucket keeps one copy
    s3 = _s3(engine)
    digests = sorted({hashlib.sha256(data[i:i + BLOCK]).hexdigest() for i in range(0, len(data), BLOCK)})
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="cas/").get("Contents", [])]
    assert sorted(k.rsplit("/", 1)[1] for k in keys) == digests
    assert get(stub, alice, "/big.bin") == data

    # alice deletes hers for good: bob still holds every block
    node = stub.GetNode(pb.GetNodeRequest(path="/big.bin"), metadata=grpc_metadata(alice)).node
    stub.DeleteNode(pb.DeleteNodeRequest(path="/big.bin"), metadata=grpc_metadata(alice))
    stub.DeleteNode(pb.DeleteNodeRequest(path=f"id:{node.node_id}", permanent=True), metadata=grpc_metadata(alice))
    time.sleep(4)
    assert all(_exists(s3, d) for d in digests)
    # then bob: gone from the bucket after the grace period
    node = stub.GetNode(pb.GetNodeRequest(path="/same.bin"), metadata=grpc_metadata(bob)).node
    stub.DeleteNode(pb.DeleteNodeRequest(path="/same.bin"), metadata=grpc_metadata(bob))
    stub.DeleteNode(pb.DeleteNodeRequest(path=f"id:{node.node_id}", permanent=True), metadata=grpc_metadata(bob))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_exists(s3, d) for d in digests):
        time.sleep(0.5)
    assert not any(_exists(s3, d) for d in digests)
