"""servers/storage/cas.py on real backends: blocks on the filesystem, moto and MinIO,
references on SQLite and Cassandra (every combination a deployment can have is
covered by one of the pairs below)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from servers.storage.blob import BlobStore
from servers.storage.cas import (
    CAS_DELETING,
    TABLES,
    BlockMismatch,
    BlockTooLarge,
    ContentStore,
    InvalidDigest,
    MissingBlocks,
    digest_of,
)
from servers.storage.table import TableStore

PAIRS = [("filesystem", "sqlite"), ("moto", "cassandra"), ("minio", "sqlite"), ("filesystem", "cassandra")]


async def _blob_store(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if kind == "filesystem":
        from servers.storage.fs_blob import FilesystemBlobStore

        return FilesystemBlobStore(tmp_path / "blobs")
    from servers.storage.s3_blob import S3BlobStore

    if kind == "moto":
        endpoint, access, secret = request.getfixturevalue("moto_endpoint"), "test", "test"
    else:
        server = request.getfixturevalue("minio")
        env = server.env()
        endpoint, access, secret = server.endpoint, env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    store = S3BlobStore("cas-" + secrets.token_hex(6), endpoint_url=endpoint, access_key=access,
                        secret_key=secret)
    await store.ensure_bucket()
    return store


def _table_store(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> TableStore:
    if kind == "sqlite":
        from servers.storage.sqlite_table import SqliteTableStore

        return SqliteTableStore(tmp_path / "tables.sqlite3")
    from servers.storage.cassandra_table import CassandraTableStore

    keyspace = request.getfixturevalue("cassandra_keyspace")
    hosts = [h for h in os.environ["SYSDESIGN_TEST_CASSANDRA_HOSTS"].split(",") if h]
    return CassandraTableStore(hosts, int(os.environ.get("SYSDESIGN_TEST_CASSANDRA_PORT", "9042")), keyspace,
                               local_dc=os.environ.get("SYSDESIGN_TEST_CASSANDRA_LOCAL_DC") or None)


@pytest.fixture(params=PAIRS, ids=["+".join(p) for p in PAIRS])
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[BlobStore, TableStore]]:
    blob_kind, table_kind = request.param
    tables = _table_store(table_kind, request, tmp_path)
    blobs = await _blob_store(blob_kind, request, tmp_path)
    await tables.create_tables(TABLES)
    yield blobs, tables
    await blobs.close()
    await tables.close()


def cas_of(stores: tuple[BlobStore, TableStore], **kw: int) -> ContentStore:
    # a prefix per test: the Cassandra keyspace is shared by the session
    return ContentStore(*stores, prefix="t" + secrets.token_hex(4), **kw)


def block(n: int = 1000) -> bytes:
    return secrets.token_bytes(n)


async def test_a_block_is_stored_once_under_its_hash_and_read_back(stores: tuple[BlobStore, TableStore]) -> None:
    cas = cas_of(stores)
    data = block(300_000)
    d = await cas.put(data, owner="drive/alice/lease/1")
    assert d == hashlib.sha256(data).hexdigest()
    assert cas.key(d) == f"{cas.prefix}/sha256/{d[:2]}/{d[2:4]}/{d}"
    assert await cas.get(d) == data
    # a second writer of the same bytes: still one object
    assert await cas.put(data, owner="drive/bob/lease/9", expected=d) == d
    keys = [k async for k in stores[0].iter_keys(cas.prefix + "/")]
    assert keys == [cas.key(d)]


async def test_bytes_that_do_not_match_the_claimed_hash_store_nothing(stores: tuple[BlobStore, TableStore]) -> None:
    cas = cas_of(stores)
    good, bad = block(), block()
    with pytest.raises(BlockMismatch) as err:
        await cas.put(bad, owner="drive/alice/lease/1", expected=digest_of(good))
    assert err.value.actual == digest_of(bad)
    assert not await cas.exists(digest_of(good)) and not await cas.exists(digest_of(bad))
    assert await cas.referenced([digest_of(good), digest_of(bad)], prefix="drive/alice/") == set()
    with pytest.raises(InvalidDigest):
        await cas.put(good, owner="drive/alice/lease/1", expected="ABC")
    with pytest.raises(BlockTooLarge):
        await cas_of(stores, max_block_bytes=100).put(block(101), owner="drive/alice/lease/1")


async def test_a_namespace_learns_only_what_it_holds(stores: tuple[BlobStore, TableStore]) -> None:
    """No existence oracle: Bob is not told that Alice stored a block."""
    cas = cas_of(stores)
    a, b = block(), block()
    da = await cas.put(a, owner="drive/alice/lease/1")
    await cas.add_refs([da], owner="drive/alice/f1@1")
    db = await cas.put(b, owner="drive/alice/lease/1")  # leased, not yet committed
    assert await cas.referenced([da, db], prefix="drive/alice/") == {da, db}
    assert await cas.referenced([da, db], prefix="drive/bob/") == set()
    assert await cas.referenced([da], prefix="drive/ali") == {da}  # a prefix is a string prefix
    with pytest.raises(ValueError):
        await cas.referenced([da], prefix="")


async def test_a_commit_naming_a_block_never_uploaded_is_refused_whole(stores: tuple[BlobStore, TableStore]) -> None:
    cas = cas_of(stores)
    have = await cas.put(block(), owner="drive/alice/lease/1")
    never = digest_of(block())
    with pytest.raises(MissingBlocks) as err:
        await cas.add_refs([have, never], owner="drive/alice/f1@1")
    assert err.value.digests == [never]
    # nothing written: the lease is still all Alice holds of `have`
    await cas.remove_refs([have], owner="drive/alice/lease/1")
    assert await cas.referenced([have, never], prefix="drive/alice/") == set()


async def test_unheld_blocks_are_collected_after_the_grace_period_and_held_ones_never(
        stores: tuple[BlobStore, TableStore]) -> None:
    cas = cas_of(stores, grace_s=1, bucket_s=1)
    kept, released, orphan = block(), block(), block()
    dk = await cas.put(kept, owner="drive/alice/lease/1")
    dr = await cas.put(released, owner="drive/alice/lease/1")
    do = await cas.put(orphan, owner="drive/alice/lease/2")  # an upload whose commit never came
    await cas.add_refs([dk, dr], owner="drive/alice/f1@1")
    await cas.remove_refs([dr], owner="drive/alice/f1@1")
    # within the grace period nothing goes, not even the orphan (its commit may still come)
    first = await cas.collect()
    assert first.deleted == 0
    assert all([await cas.exists(d) for d in (dk, dr, do)])
    await asyncio.sleep(3.2)  # the leases' TTL and the candidates' buckets pass
    stats = await cas.collect()
    assert stats.deleted == 2 and stats.kept >= 1
    assert await cas.exists(dk) and await cas.get(dk) == kept
    assert not await cas.exists(dr) and not await cas.exists(do)
    # a second sweep has nothing left to do
    assert (await cas.collect()).deleted == 0


async def test_a_commit_racing_the_sweep_is_told_to_upload_again(stores: tuple[BlobStore, TableStore]) -> None:
    cas = cas_of(stores)
    d = await cas.put(block(), owner="drive/alice/lease/1")
    # a sweep has marked the block and is about to delete it
    assert await stores[1].put(CAS_DELETING, {"digest": d, "since": 0}, if_not_exists=True)
    with pytest.raises(MissingBlocks):
        await cas.add_refs([d], owner="drive/alice/f1@1")
    # the upload again writes the bytes whatever the sweep did, then the commit goes through
    await stores[0].delete(cas.key(d))
    data = b"x" * 10
    d2 = await cas.put(data, owner="drive/alice/lease/1")
    await stores[1].delete(CAS_DELETING, {"digest": d})
    await cas.add_refs([d2], owner="drive/alice/f1@1")
    assert await cas.get(d2) == data
