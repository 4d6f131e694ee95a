"""The blob port's contract: every adapter passes the same tests."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from typing import Any

import pytest

from servers.storage.blob import BlobNotFound, BlobStore, InvalidBlobKey
from tests.contract.conftest import BlobBackend


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


async def keys(store: BlobStore, prefix: str = "") -> list[str]:
    return [k async for k in store.iter_keys(prefix)]


async def test_put_get_roundtrip(blob_store: BlobStore) -> None:
    attrs = await blob_store.put("pastes/abc123", b"hello world", content_type="text/plain")
    assert attrs.size == 11
    assert attrs.etag == md5(b"hello world")
    assert abs(attrs.last_modified - time.time()) < 600
    assert await blob_store.get("pastes/abc123") == b"hello world"


async def test_overwrite(blob_store: BlobStore) -> None:
    first = await blob_store.put("k", b"first version")
    second = await blob_store.put("k", b"second")
    assert await blob_store.get("k") == b"second"
    assert first.etag != second.etag
    attrs = await blob_store.attributes("k")
    assert attrs.size == 6
    assert attrs.etag == second.etag == md5(b"second")


async def test_put_without_etag(blob_store: BlobStore) -> None:
    """What put leaves, without the attributes back: the etag is still the MD5 when asked."""
    assert not await blob_store.exists("cas/x/obj")
    await blob_store.put_without_etag("cas/x/obj", b"block bytes")
    assert await blob_store.exists("cas/x/obj")
    assert not await blob_store.exists("cas/x")  # a prefix of a key is no object
    assert await blob_store.get("cas/x/obj") == b"block bytes"
    attrs = await blob_store.attributes("cas/x/obj")
    assert (attrs.size, attrs.etag) == (11, md5(b"block bytes"))
    # over an object put with attributes: the old etag never outlives its bytes
    await blob_store.put("cas/x/other", b"first")
    await blob_store.put_without_etag("cas/x/other", b"second!")
    attrs = await blob_store.attributes("cas/x/other")
    assert (attrs.size, attrs.etag) == (7, md5(b"second!"))
    assert await blob_store.get("cas/x/other") == b"second!"
    await blob_store.delete("cas/x/obj")
    assert not await blob_store.exists("cas/x/obj")
    with pytest.raises(InvalidBlobKey):
        await blob_store.put_without_etag("../escape", b"x")

async def test_get_range(blob_store: BlobStore) -> None:
    data = bytes(range(256)) * 4
    await blob_store.put("r/obj", data)
    assert await blob_store.get_range("r/obj", 0, 10) == data[:10]
    assert await blob_store.get_range("r/obj", 100, 50) == data[100:150]
    assert await blob_store.get_range("r/obj", 1000) == data[1000:]
    assert await blob_store.get_range("r/obj", 1000, 100) == data[1000:]  # clipped at the end
    assert await blob_store.get_range("r/obj", 0) == data
    assert await blob_store.get_range("r/obj", 5, 0) == b""
    assert await blob_store.get_range("r/obj", len(data)) == b""
    assert await blob_store.get_range("r/obj", len(data) + 10, 5) == b""
    with pytest.raises(BlobNotFound):
        await blob_store.get_range("r/absent", 0, 10)
    with pytest.raises(BlobNotFound):
        await blob_store.get_range("r/absent", 0, 0)
    with pytest.raises(ValueError):
        await blob_store.get_range("r/obj", -1, 10)


async def test_attributes(blob_store: BlobStore) -> None:
    before = time.time()
    put = await blob_store.put("a/b/c.bin", b"x" * 1234)
    attrs = await blob_store.attributes("a/b/c.bin")
    assert attrs.size == 1234
    assert attrs.etag == put.etag == md5(b"x" * 1234)
    assert '"' not in attrs.etag
    # Clocks of a remote store may be off a little, and S3 has second granularity.
    assert before - 120 < attrs.last_modified < time.time() + 120
    assert abs(attrs.last_modified - put.last_modified) < 5


async def test_empty_object(blob_store: BlobStore) -> None:
    attrs = await blob_store.put("empty", b"")
    assert attrs.size == 0 and attrs.etag == md5(b"")
    assert await blob_store.get("empty") == b""
    assert (await blob_store.attributes("empty")).size == 0
    assert await blob_store.get_range("empty", 0) == b""


async def test_exists_and_delete(blob_store: BlobStore) -> None:
    assert not await blob_store.exists("d/x")
    await blob_store.put("d/x", b"1")
    assert await blob_store.exists("d/x")
    await blob_store.delete("d/x")
    assert not await blob_store.exists("d/x")
    await blob_store.delete("d/x")  # idempotent
    await blob_store.delete("never/existed")
    with pytest.raises(BlobNotFound):
        await blob_store.get("d/x")


async def test_not_found(blob_store: BlobStore) -> None:
    with pytest.raises(BlobNotFound):
        await blob_store.get("nope")
    with pytest.raises(BlobNotFound):
        await blob_store.attributes("nope")
    with pytest.raises(KeyError):  # BlobNotFound is a KeyError too
        await blob_store.get("no/such/key")


# MinIO stores each object as a directory of its own on its drives, so it does
# not support a key that is a path prefix of another ("a" beside "a/b/c"): its
# listing hides the longer keys. S3, moto and the filesystem adapter do; the
# project's key layouts never need it (media/<id>/<file>, media-staging/<id>,
# pastes/<id>), and keys of new systems must not either.
PREFIX_OBJECTS_UNSUPPORTED = {"minio": "MinIO does not support an object whose key is a path prefix of another's"}


def _needs_prefix_objects(backend: BlobBackend) -> None:
    if backend.name in PREFIX_OBJECTS_UNSUPPORTED:
        pytest.skip(PREFIX_OBJECTS_UNSUPPORTED[backend.name])


async def test_keys_are_independent_of_prefixes(blob_store: BlobStore, blob_backend: BlobBackend) -> None:
    """As on S3, "a" and "a/b" are two keys that can both exist."""
    _needs_prefix_objects(blob_backend)
    await blob_store.put("a", b"file a")
    await blob_store.put("a/b", b"file a/b")
    await blob_store.put("a/b/c", b"file a/b/c")
    assert await blob_store.get("a") == b"file a"
    assert await blob_store.get("a/b") == b"file a/b"
    await blob_store.delete("a/b")
    assert await blob_store.get("a/b/c") == b"file a/b/c"
    with pytest.raises(BlobNotFound):
        await blob_store.get("a/b")
    assert await keys(blob_store) == ["a", "a/b/c"]


async def test_iter_keys_with_prefix_in_order(blob_store: BlobStore) -> None:
    names = [
        "p/b", "p/a/w", "p/a-1", "p/a.z", "p/aa", "p/A", "p/a/y/z", "p0", "q/1",
        "p/0", "p/_u", "p/(x)", "p/a/x/1", "p/a/x2",
    ]
    await asyncio.gather(*(blob_store.put(n, n.encode()) for n in names))
    assert await keys(blob_store) == sorted(names)
    assert await keys(blob_store, "p/") == sorted(n for n in names if n.startswith("p/"))
    assert await keys(blob_store, "p") == sorted(n for n in names if n.startswith("p"))
    assert await keys(blob_store, "p/a") == sorted(n for n in names if n.startswith("p/a"))
    assert await keys(blob_store, "p/a/") == ["p/a/w", "p/a/x/1", "p/a/x2", "p/a/y/z"]
    assert await keys(blob_store, "p/a/x") == ["p/a/x/1", "p/a/x2"]
    assert await keys(blob_store, "zzz") == []
    assert await keys(blob_store, "p//") == []
    assert await keys(blob_store, "../") == []


async def test_iter_keys_lists_keys_that_are_prefixes_of_others(blob_store: BlobStore,
                                                                blob_backend: BlobBackend) -> None:
    _needs_prefix_objects(blob_backend)
    names = [
        "p/b", "p/a", "p/a/x", "p/a-1", "p/a.z", "p/aa", "p/A", "p/a/y/z", "p0", "p", "q/1",
        "p/0", "p/_u", "p/(x)", "p/a/x/1",
    ]
    await asyncio.gather(*(blob_store.put(n, n.encode()) for n in names))
    assert await keys(blob_store) == sorted(names)
    assert await keys(blob_store, "p/") == sorted(n for n in names if n.startswith("p/"))
    assert await keys(blob_store, "p") == sorted(n for n in names if n.startswith("p"))
    assert await keys(blob_store, "p/a") == sorted(n for n in names if n.startswith("p/a"))
    assert await keys(blob_store, "p/a/") == ["p/a/x", "p/a/x/1", "p/a/y/z"]
    assert await keys(blob_store, "p/a/x") == ["p/a/x", "p/a/x/1"]
    assert await keys(blob_store, "zzz") == []
    assert await keys(blob_store, "p//") == []
    assert await keys(blob_store, "../") == []


async def test_iter_keys_many(blob_store: BlobStore) -> None:
    names = [f"many/{i:05d}" for i in range(1100)]  # more than one S3 listing page
    sem = asyncio.Semaphore(32)

    async def put(n: str) -> None:
        async with sem:
            await blob_store.put(n, b"")

    await asyncio.gather(*(put(n) for n in names))
    assert await keys(blob_store, "many/") == names


@pytest.mark.parametrize(
    "key",
    ["", "/abs", "trailing/", "a//b", "../x", "a/../b", "./a", "a/.", "a b", "a\\b", "ä",
     "a?b", "a#b", "a~b", "x" * 1025],
)
async def test_invalid_keys_refused(blob_store: BlobStore, key: str) -> None:
    with pytest.raises(InvalidBlobKey):
        await blob_store.put(key, b"x")
    with pytest.raises(InvalidBlobKey):
        await blob_store.get(key)
    with pytest.raises(InvalidBlobKey):
        await blob_store.get_range(key, 0, 1)
    with pytest.raises(InvalidBlobKey):
        await blob_store.attributes(key)
    with pytest.raises(InvalidBlobKey):
        await blob_store.delete(key)


async def test_unusual_valid_keys(blob_store: BlobStore) -> None:
    names = ["x=1+2@y", "(paren)'quote'*star!", "dots.../..a", ".hidden/.x", "UPPER/lower"]
    for n in names:
        await blob_store.put(n, n.encode())
    for n in names:
        assert await blob_store.get(n) == n.encode()
    assert await keys(blob_store) == sorted(names)


async def test_large_binary_payload(blob_store: BlobStore) -> None:
    data = os.urandom(1 << 20) + bytes(range(256)) + b"\x00\r\n\xff" * 100
    attrs = await blob_store.put("big/one", data)
    assert attrs.size == len(data)
    assert attrs.etag == md5(data)
    assert await blob_store.get("big/one") == data
    assert await blob_store.get_range("big/one", (1 << 20) - 3, 10) == data[(1 << 20) - 3 :][:10]
    assert (await blob_store.attributes("big/one")).etag == md5(data)


async def test_concurrent_overwrites_are_atomic(blob_store: BlobStore) -> None:
    versions = [bytes([i]) * (1000 * (i + 1)) for i in range(8)]
    reads: list[bytes] = []

    async def reader() -> None:
        for _ in range(10):
            try:
                reads.append(await blob_store.get("atomic"))
            except BlobNotFound:
                pass

    await asyncio.gather(*(blob_store.put("atomic", v) for v in versions), reader(), reader())
    assert all(r in versions for r in reads)
    final = await blob_store.get("atomic")
    assert final in versions
    assert (await blob_store.attributes("atomic")).etag == md5(final)


async def test_survives_reopen(blob_backend: Any) -> None:
    await blob_backend.setup()
    first = blob_backend.open()
    await first.put("keep/me", b"still here")
    await first.close()
    second = blob_backend.open()
    try:
        assert await second.get("keep/me") == b"still here"
        assert (await second.attributes("keep/me")).etag == md5(b"still here")
        assert await keys(second) == ["keep/me"]
    finally:
        await second.close()


async def test_ping(blob_store: BlobStore) -> None:
    await blob_store.ping()


# --- filesystem adapter specifics (not part of the port's contract) ---------------------


async def test_filesystem_sidecar_is_only_a_cache(tmp_path: Any) -> None:
    from servers.storage.fs_blob import FilesystemBlobStore

    store = FilesystemBlobStore(tmp_path)
    await store.put("s/obj", b"one")
    # Replace the data behind the store's back (as a crash between the data and
    # the sidecar renames would leave it): the etag follows the data.
    data_file = tmp_path / "objects" / "s~" / "obj"
    replacement = tmp_path / "replacement"
    replacement.write_bytes(b"two!")
    os.replace(replacement, data_file)
    attrs = await store.attributes("s/obj")
    assert (attrs.size, attrs.etag) == (4, md5(b"two!"))
    # A corrupt sidecar is rebuilt too.
    (tmp_path / "meta" / "s~" / "obj.json").write_bytes(b"{not json")
    assert (await store.attributes("s/obj")).etag == md5(b"two!")
    # Nothing is left in tmp/, and only keys are listed.
    assert list((tmp_path / "tmp").iterdir()) == []
    assert await keys(store) == ["s/obj"]
    # Deleting the last key of a directory removes the emptied directories.
    await store.delete("s/obj")
    assert list((tmp_path / "objects").iterdir()) == []
    assert list((tmp_path / "meta").iterdir()) == []
    await store.close()
