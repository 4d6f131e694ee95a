"""Contract of the blob port's multipart uploads, streamed reads and URLs, on every adapter.

Parts are 5 MiB (S3's minimum for every part but the last) so the S3 run
exercises what production does.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import urllib.request

import pytest

from servers.storage.blob import BlobError, BlobNotFound, BlobStore, UploadNotFound, UploadPart
from tests.contract.conftest import BlobBackend

MiB = 1024 * 1024
PART = 5 * MiB


def _gone(backend: BlobBackend) -> type[BlobError]:
    """What a part sent to an aborted or unknown upload raises.

    S3 (and MinIO) answer NoSuchUpload (UploadNotFound); moto answers 500
    instead, so against it only the failure itself is asserted.
    """
    return BlobError if backend.name == "moto" else UploadNotFound


def _data(n: int, seed: int = 1) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (n // 32) + os.urandom(n % 32)


async def _upload(store: BlobStore, key: str, data: bytes, part: int = PART) -> list:
    uid = await store.create_multipart(key, content_type="video/mp4")
    parts = []
    for i, off in enumerate(range(0, len(data), part), start=1):
        parts.append(await store.upload_part(key, uid, i, off, data[off:off + part]))
    await store.complete_multipart(key, uid, parts)
    return parts


async def test_multipart_assembles_parts_in_order(blob_store: BlobStore) -> None:
    data = _data(2 * PART + 12345)
    parts = await _upload(blob_store, "staging/a/source", data)
    assert [p.part_number for p in parts] == [1, 2, 3]
    assert [p.offset for p in parts] == [0, PART, 2 * PART]
    assert [p.size for p in parts] == [PART, PART, 12345]
    assert parts[0].etag == hashlib.md5(data[:PART]).hexdigest()
    assert await blob_store.get("staging/a/source") == data
    attrs = await blob_store.attributes("staging/a/source")
    assert attrs.size == len(data)
    assert attrs.etag.endswith("-3")


async def test_nothing_is_visible_before_complete(blob_store: BlobStore, blob_backend: BlobBackend) -> None:
    key = "staging/b/source"
    uid = await blob_store.create_multipart(key)
    await blob_store.upload_part(key, uid, 1, 0, _data(PART))
    assert not await blob_store.exists(key)
    assert [k async for k in blob_store.iter_keys("staging/")] == []
    await blob_store.abort_multipart(key, uid)
    assert not await blob_store.exists(key)
    with pytest.raises(_gone(blob_backend)):
        await blob_store.upload_part(key, uid, 2, PART, b"x")
    await blob_store.abort_multipart(key, uid)  # idempotent


async def test_a_part_uploaded_again_replaces_the_first_copy(blob_store: BlobStore) -> None:
    key = "staging/c/source"
    first, again, last = _data(PART, 1), _data(PART, 2), b"tail"
    uid = await blob_store.create_multipart(key)
    await blob_store.upload_part(key, uid, 1, 0, first)
    p1 = await blob_store.upload_part(key, uid, 1, 0, again)  # a resumed writer resends part 1
    p2 = await blob_store.upload_part(key, uid, 2, PART, last)
    await blob_store.complete_multipart(key, uid, [p2, p1])  # any order in, sorted by number
    assert await blob_store.get(key) == again + last


async def test_completing_needs_contiguous_parts(blob_store: BlobStore) -> None:
    key = "staging/d/source"
    uid = await blob_store.create_multipart(key)
    p1 = await blob_store.upload_part(key, uid, 1, 0, _data(PART))
    p3 = await blob_store.upload_part(key, uid, 3, 2 * PART, b"gap before me")
    with pytest.raises(ValueError):
        await blob_store.complete_multipart(key, uid, [p1, p3])
    with pytest.raises(ValueError):
        await blob_store.complete_multipart(key, uid, [])
    assert not await blob_store.exists(key)
    await blob_store.abort_multipart(key, uid)


async def test_unknown_upload_is_not_found(blob_store: BlobStore, blob_backend: BlobBackend) -> None:
    with pytest.raises(_gone(blob_backend)):
        await blob_store.upload_part("staging/e", "0" * 32, 1, 0, b"x")
    with pytest.raises(_gone(blob_backend)):
        await blob_store.complete_multipart("staging/e", "f" * 32, [UploadPart(1, 0, 1, "0" * 32)])
    assert issubclass(UploadNotFound, BlobNotFound)


async def test_iter_range_streams_the_requested_bytes(blob_store: BlobStore) -> None:
    data = _data(3 * MiB + 7)
    await blob_store.put("big/object", data)
    chunks = [c async for c in blob_store.iter_range("big/object", chunk_size=MiB)]
    assert b"".join(chunks) == data
    assert max(len(c) for c in chunks) <= MiB
    part = b"".join([c async for c in blob_store.iter_range("big/object", 1000, 2 * MiB, chunk_size=MiB)])
    assert part == data[1000:1000 + 2 * MiB]
    tail = b"".join([c async for c in blob_store.iter_range("big/object", len(data) - 5)])
    assert tail == data[-5:]
    assert [c async for c in blob_store.iter_range("big/object", len(data) + 10)] == []
    with pytest.raises(BlobNotFound):
        async for _ in blob_store.iter_range("big/missing"):
            pass


async def test_delete_prefix_removes_only_that_prefix(blob_store: BlobStore) -> None:
    for k in ("media/1/a.ts", "media/1/v0/b.ts", "media/10/a.ts", "media/2/a.ts"):
        await blob_store.put(k, b"x")
    assert await blob_store.delete_prefix("media/1/") == 2
    assert [k async for k in blob_store.iter_keys("media/")] == ["media/10/a.ts", "media/2/a.ts"]
    with pytest.raises(ValueError):
        await blob_store.delete_prefix("")


async def test_presigned_url_or_local_path_reads_the_object(blob_store: BlobStore) -> None:
    await blob_store.put("media/9/poster.jpg", b"jpeg bytes", content_type="image/jpeg")
    url = await blob_store.presigned_get_url("media/9/poster.jpg", expires_seconds=60)
    path = blob_store.local_path("media/9/poster.jpg")
    assert (url is None) != (path is None), "exactly one way to read an object in place"
    if url is not None:
        def fetch() -> bytes:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return bytes(resp.read())

        assert await asyncio.to_thread(fetch) == b"jpeg bytes"
    else:
        assert path is not None and path.read_bytes() == b"jpeg bytes"
