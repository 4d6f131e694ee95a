"""A content-addressed store: blocks named by their SHA-256, stored once on the blob port.

Every system that keeps blocks (file sync, the version-control cache,
attachments) keeps them here, so the same bytes are stored once whoever
wrote them::

    cas = ContentStore(blobs, tables)
    d = await cas.put(block, owner="drive/ns42/lease/u1")      # verified, leased
    await cas.add_refs([d], owner="drive/ns42/f7@3")           # a file revision holds it
    await cas.referenced([d], prefix="drive/ns42/")             # {d}: this namespace has it
    await cas.remove_refs([d], owner="drive/ns42/f7@3")        # collected after the grace period

Where things are:

- **Blocks** on the blob port under ``<prefix>/sha256/ab/cd/abcd…`` (the
  digest's first two bytes fan the keys out). A block is written only after
  its bytes were hashed and matched the digest the caller claimed
  (``BlockMismatch`` otherwise: nothing stored).
- **References** in the table port, ``cas_refs``: a partition per digest, a
  row per owner. An owner is a path its system chooses (``drive/<namespace>/
  <file>@<revision>``), so "does this namespace hold the block" is one slice
  of the digest's partition bounded by the namespace's prefix. A ``put``
  leaves a *lease*, a reference that expires after ``grace_s`` (a table-port
  TTL), so a block uploaded for a commit still in flight is never collected;
  the commit turns it into a reference that lasts (``add_refs``).
- **No existence oracle.** ``referenced`` answers only for the owners under
  a prefix: a system asks whether *this namespace* holds a block, never
  whether anyone does. A client that could learn "the server already has
  this hash" would learn whether anyone stored a given file (a leaked
  document, a password list); so a block the caller does not already hold is
  uploaded by the caller, and the store then keeps one copy.

Collection (``collect``), mark-and-sweep by candidates instead of scanning
every block:

- Every lease and every removed reference files the digest as a candidate
  in ``cas_gc``, in the time bucket when its grace period is over
  (partitioned by bucket, so the sweep reads only the buckets that are due).
- The sweep takes each due candidate: a digest that still has a live
  reference or lease is kept. Otherwise it marks the digest as being deleted
  (``cas_deleting``, ``IF NOT EXISTS``, so two sweepers never both proceed),
  looks for references once more, deletes the blob, and clears the mark.
- ``add_refs`` refuses a digest whose blob is missing or marked
  (``MissingBlocks``): a commit that raced the sweep is told to upload again,
  never left pointing at bytes that are about to go. A ``put`` leases before
  it writes, so a sweep that has not yet looked again sees the lease.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from servers.storage.blob import BlobNotFound, BlobStore, BytesLike
from servers.storage.table import ClusteringRange, Table, TableStore

DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
_OWNER_MAX = 512

CAS_REFS = Table(
    "cas_refs",
    partition_key=("digest",),
    clustering=("owner",),
    columns={"digest": "text", "owner": "text", "at": "bigint"},
    comment="who holds each content-addressed block: a row per owner (leases expire by TTL)",
)
CAS_GC = Table(
    "cas_gc",
    partition_key=("bucket",),
    clustering=("digest",),
    columns={"bucket": "bigint", "digest": "text"},
    comment="blocks to look at once their grace period is over, by time bucket",
)
CAS_DELETING = Table(
    "cas_deleting",
    partition_key=("digest",),
    columns={"digest": "text", "since": "bigint"},
    comment="blocks a sweep is deleting: commits naming them are refused",
)
CAS_GC_CURSOR = Table(
    "cas_gc_cursor",
    partition_key=("name",),
    columns={"name": "text", "bucket": "bigint"},
    comment="the first time bucket the sweep has not finished",
)
TABLES = [CAS_REFS, CAS_GC, CAS_DELETING, CAS_GC_CURSOR]

T = TypeVar("T")


class InvalidDigest(ValueError):
    """Not a lowercase hex SHA-256."""


class BlockMismatch(ValueError):
    """The bytes do not hash to the digest the caller named."""

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"block bytes hash to {actual}, not {expected}")
        self.expected = expected
        self.actual = actual


class BlockTooLarge(ValueError):
    pass


class MissingBlocks(Exception):
    """Blocks that must be uploaded (again) before they can be referenced."""

    def __init__(self, digests: Sequence[str]) -> None:
        super().__init__(f"{len(digests)} block(s) missing: {', '.join(digests[:3])}"
                         + ("…" if len(digests) > 3 else ""))
        self.digests = list(digests)


def digest_of(data: BytesLike) -> str:
    return hashlib.sha256(data).hexdigest()


def check_digest(d: str) -> str:
    if not isinstance(d, str) or not DIGEST_RE.match(d):
        raise InvalidDigest(f"not a lowercase hex SHA-256: {d!r}")
    return d


def _check_owner(owner: str) -> str:
    if not owner or len(owner) > _OWNER_MAX or "\x00" in owner:
        raise ValueError(f"an owner is 1..{_OWNER_MAX} characters without NUL")
    return owner


@dataclass
class CollectStats:
    candidates: int = 0
    deleted: int = 0
    kept: int = 0
    busy: int = 0  # another sweep was deleting it
    gone: int = 0  # already deleted (a digest can be a candidate in several buckets)


class ContentStore:
    """Blocks on ``blobs``, references on ``tables`` (``TABLES`` must exist there)."""

    def __init__(self, blobs: BlobStore, tables: TableStore, *, prefix: str = "cas",
                 grace_s: int = 24 * 3600, bucket_s: int = 600, max_block_bytes: int = 16 << 20,
                 concurrency: int = 32, clock: Callable[[], float] = time.time) -> None:
        if grace_s < 1 or bucket_s < 1:
            raise ValueError("grace_s and bucket_s are whole seconds, at least 1")
        self.blobs = blobs
        self.tables = tables
        self.prefix = prefix.strip("/")
        self.grace_s = grace_s
        self.bucket_s = bucket_s
        self.max_block_bytes = max_block_bytes
        self.clock = clock
        self._sem = asyncio.Semaphore(concurrency)

    def key(self, digest: str) -> str:
        d = check_digest(digest)
        return f"{self.prefix}/sha256/{d[:2]}/{d[2:4]}/{d}"

    async def _bounded(self, work: Iterable[Awaitable[T]]) -> list[T]:
        async def one(w: Awaitable[T]) -> T:
            async with self._sem:
                return await w
        return list(await asyncio.gather(*(one(w) for w in work)))

    def _bucket(self, at: float) -> int:
        return int(at // self.bucket_s)

    async def _file_candidates(self, digests: Iterable[str], due_at: float) -> None:
        # the bucket after the one the grace ends in: due only once that bucket has fully passed
        bucket = self._bucket(due_at) + 1
        rows = [{"bucket": bucket, "digest": d} for d in sorted(set(digests))]
        if rows:
            await self.tables.put_many(CAS_GC, rows)

    # -- writing -------------------------------------------------------------

    async def put(self, data: BytesLike, *, owner: str, expected: str | None = None) -> str:
        """Store a block; returns its digest. ``owner`` holds it as a lease for ``grace_s``.

        ``expected``: the digest the caller claims; ``BlockMismatch`` when
        the bytes hash otherwise (nothing stored). Storing a block that is
        already there writes nothing but the lease.
        """
        if len(data) > self.max_block_bytes:
            raise BlockTooLarge(f"a block is at most {self.max_block_bytes} bytes, not {len(data)}")
        # hashlib lets go of the GIL: a big block hashes on another core while the loop goes on
        actual = await asyncio.to_thread(digest_of, data) if len(data) >= 1 << 16 else digest_of(data)
        if expected is not None and check_digest(expected) != actual:
            raise BlockMismatch(expected, actual)
        _check_owner(owner)
        now = self.clock()
        # lease first: a sweep that looks again after this sees it
        await self.tables.put(CAS_REFS, {"digest": actual, "owner": owner, "at": int(now)},
                              ttl_seconds=self.grace_s)
        key = self.key(actual)
        _, deleting, present = await asyncio.gather(
            self._file_candidates([actual], now + self.grace_s),
            self.tables.get(CAS_DELETING, {"digest": actual}),
            self.blobs.exists(key))
        if deleting is not None or not present:
            # named by its hash, a block needs no etag: the blob port may skip computing one
            await self.blobs.put_without_etag(key, data if isinstance(data, bytes) else bytes(data))
        return actual

    async def add_refs(self, digests: Sequence[str], *, owner: str) -> None:
        """``owner`` holds every block of ``digests`` until ``remove_refs``.

        ``MissingBlocks`` (nothing written) when a block is not stored or is
        being collected: upload those and try again.
        """
        _check_owner(owner)
        ds = sorted({check_digest(d) for d in digests})

        async def absent(d: str) -> bool:
            if await self.tables.get(CAS_DELETING, {"digest": d}) is not None:
                return True
            return not await self.blobs.exists(self.key(d))

        gone = [d for d, a in zip(ds, await self._bounded(absent(d) for d in ds), strict=True) if a]
        if gone:
            raise MissingBlocks(gone)
        now = int(self.clock())
        await self.tables.put_many(CAS_REFS, [{"digest": d, "owner": owner, "at": now} for d in ds])

    async def remove_refs(self, digests: Sequence[str], *, owner: str) -> None:
        """``owner`` no longer holds these blocks; unheld ones go after the grace period."""
        _check_owner(owner)
        ds = sorted({check_digest(d) for d in digests})
        await self._file_candidates(ds, self.clock() + self.grace_s)
        await self._bounded(self.tables.delete(CAS_REFS, {"digest": d, "owner": owner}) for d in ds)

    # -- reading -------------------------------------------------------------

    async def _held(self, digest: str, prefix: str = "") -> bool:
        bounds = ClusteringRange(ge=(prefix,), lt=(prefix + "\U0010ffff",)) if prefix else None
        page = await self.tables.slice(CAS_REFS, {"digest": digest}, limit=1, bounds=bounds)
        return bool(page.rows)

    async def referenced(self, digests: Sequence[str], *, prefix: str) -> set[str]:
        """The digests that some owner under ``prefix`` holds (a reference or a live lease).

        Only within ``prefix``: see "No existence oracle" above.
        """
        if not prefix:
            raise ValueError("referenced() answers within an owner prefix, never store-wide")
        ds = sorted({check_digest(d) for d in digests})
        held = await self._bounded(self._held(d, prefix) for d in ds)
        return {d for d, h in zip(ds, held, strict=True) if h}

    async def get(self, digest: str) -> bytes:
        """The block's bytes; BlobNotFound when it is not stored."""
        return await self.blobs.get(self.key(digest))

    async def exists(self, digest: str) -> bool:
        return await self.blobs.exists(self.key(digest))

    # -- collection ----------------------------------------------------------

    async def collect(self, *, name: str = "default", max_buckets: int = 10_000) -> CollectStats:
        """Delete every due candidate that nothing holds; returns what it did.

        Safe to run from several replicas at once, and to interrupt: a
        bucket is marked done only after all its candidates were handled.
        """
        stats = CollectStats()
        now = self.clock()
        last_due = self._bucket(now) - 1  # buckets that have fully passed
        cursor = await self.tables.get(CAS_GC_CURSOR, {"name": name})
        first = int(cursor["bucket"]) if cursor else last_due - self._lookback_buckets()
        bucket = first
        while bucket <= last_due and bucket < first + max_buckets:
            token = ""
            while True:
                page = await self.tables.slice(CAS_GC, {"bucket": bucket}, limit=500, page_token=token)
                outcomes = await self._bounded(self._sweep(r["digest"]) for r in page.rows)
                for o in outcomes:
                    stats.candidates += 1
                    setattr(stats, o, getattr(stats, o) + 1)
                token = page.next_page_token
                if not token:
                    break
            await self.tables.delete(CAS_GC, {"bucket": bucket})
            bucket += 1
            await self.tables.put(CAS_GC_CURSOR, {"name": name, "bucket": bucket})
        return stats

    def _lookback_buckets(self) -> int:
        # a first sweep looks back over two grace periods of buckets
        return 2 * (self.grace_s // self.bucket_s + 2)

    async def _sweep(self, digest: str) -> str:
        if await self._held(digest):
            return "kept"
        if not await self.blobs.exists(self.key(digest)):
            return "gone"
        marked = await self.tables.put(CAS_DELETING, {"digest": digest, "since": int(self.clock())},
                                       if_not_exists=True, ttl_seconds=max(600, self.bucket_s))
        if not marked:
            return "busy"
        try:
            if await self._held(digest):  # a lease written since the first look
                return "kept"
            try:
                await self.blobs.delete(self.key(digest))
            except BlobNotFound:
                pass
            return "deleted"
        finally:
            await self.tables.delete(CAS_DELETING, {"digest": digest})
