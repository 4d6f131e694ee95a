"""The blob port: a small object-store interface in the spirit of thanos objstore.

Keys are slash-separated paths ("pastes/abc123"). Adapters: FilesystemBlobStore
(embedded) and S3BlobStore (boto3; MinIO, AWS). Both run through one contract
suite (tests/contract/test_blob_contract.py).

Large objects are written as **multipart uploads** (S3's model): create one,
upload numbered parts, complete it with the list of parts, or abort it. Parts
are contiguous in byte order (part n starts where part n-1 ended) and every
part but the last holds at least ``min_part_size`` bytes (5 MiB on S3). A
part is durable once ``upload_part`` returns, so a writer that crashes can
resume after its last acknowledged part; nothing is visible under the key
before ``complete_multipart``. Large objects are read back with
``iter_range`` (streamed, never whole in memory). Multipart, ``iter_range``,
``presigned_get_url``, ``local_path`` and ``delete_prefix`` run through
tests/contract/test_blob_multipart_contract.py.
"""

from __future__ import annotations

import abc
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

_KEY_RE = re.compile(r"^(?!/)(?!.*//)(?!.*(^|/)\.\.?(/|$))[A-Za-z0-9!\-_.*'()/=+@]+(?<!/)$")
MAX_KEY_LEN = 1024


class BlobError(Exception):
    """A backend failure (unreachable, timed out)."""


class BlobNotFound(BlobError, KeyError):
    """No object at that key."""


class InvalidBlobKey(ValueError):
    pass


def check_key(key: str) -> str:
    if not key or len(key) > MAX_KEY_LEN or not _KEY_RE.match(key):
        raise InvalidBlobKey(f"invalid blob key {key!r}")
    return key


def prefix_can_match(prefix: str) -> bool:
    """Whether any valid key starts with ``prefix`` ("p//" and "../" never do).

    MinIO refuses to list such a prefix (XMinioInvalidObjectName) where S3
    answers an empty page, so the adapters answer it without asking.
    """
    return not prefix or bool(_KEY_RE.match(prefix + "a"))


@dataclass(frozen=True)
class BlobAttributes:
    size: int
    # Quoted-free strong validator of the content (hex MD5 on both adapters for single puts).
    etag: str
    last_modified: float  # unix seconds


# What a part may be given as: a reused buffer (bytearray, memoryview) is read in place.
BytesLike = bytes | bytearray | memoryview


class UploadNotFound(BlobNotFound):
    """No multipart upload with that id (completed, aborted or never created)."""


@dataclass(frozen=True)
class UploadPart:
    """An acknowledged part of a multipart upload (keep it to complete the upload)."""

    part_number: int  # 1-based
    offset: int  # of its first byte in the object
    size: int
    etag: str


def check_parts(parts: Sequence[UploadPart]) -> tuple[list[UploadPart], int]:
    """The parts in order and the object's size: numbered 1..n and contiguous, or ValueError.

    An upload needs at least one part (S3 refuses to complete one without);
    an empty object is a plain put.
    """
    if not parts:
        raise ValueError("a multipart upload needs at least one part")
    ordered = sorted(parts, key=lambda p: p.part_number)
    expected = 0
    for i, p in enumerate(ordered, start=1):
        if p.part_number != i or p.offset != expected:
            raise ValueError(f"parts must be numbered 1..n and contiguous (part {p.part_number})")
        expected += p.size
    return ordered, expected


class BlobStore(abc.ABC):
    # Every part of a multipart upload but the last must hold at least this many bytes.
    min_part_size: int = 1
    max_parts: int = 10_000

    @abc.abstractmethod
    async def put(self, key: str, data: bytes, *, content_type: str = "application/octet-stream") -> BlobAttributes:
        """Write an object atomically: readers see the old object or the whole new one."""

    async def put_without_etag(self, key: str, data: bytes) -> None:
        """``put``, for a writer that does not want the attributes back (a content-addressed store
        names its objects by their hash and never asks for an etag).

        Readers see exactly what ``put`` leaves; ``attributes`` still gives the
        MD5 etag, which an adapter that must compute it may do when first asked
        instead of on every write.
        """
        await self.put(key, data)

    @abc.abstractmethod
    async def get(self, key: str) -> bytes:
        """The whole object; BlobNotFound when absent."""

    @abc.abstractmethod
    async def get_range(self, key: str, offset: int, length: int | None = None) -> bytes:
        """Bytes [offset, offset+length) (to the end when length is None)."""

    @abc.abstractmethod
    async def attributes(self, key: str) -> BlobAttributes:
        """Size, etag and modification time; BlobNotFound when absent."""

    async def exists(self, key: str) -> bool:
        try:
            await self.attributes(key)
            return True
        except BlobNotFound:
            return False

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Delete an object; deleting an absent key is not an error."""

    @abc.abstractmethod
    def iter_keys(self, prefix: str = "") -> AsyncIterator[str]:
        """Every key that starts with prefix, in lexicographic order."""

    # -- multipart uploads, streamed reads, URLs -------------------------------

    async def create_multipart(
        self, key: str, *, content_type: str = "application/octet-stream"
    ) -> str:
        """Start a multipart upload to ``key``; returns its upload id."""
        raise NotImplementedError

    async def upload_part(
        self, key: str, upload_id: str, part_number: int, offset: int, data: BytesLike
    ) -> UploadPart:
        """Store part ``part_number`` (1-based) holding bytes [offset, offset+len(data)).

        Durable when it returns. Uploading a part number again replaces that
        part. UploadNotFound when the upload is gone. ``data`` may be any
        bytes-like object (a reused buffer): adapters read it without copying
        where they can, so it must not change until the call returns.
        """
        raise NotImplementedError

    async def complete_multipart(
        self, key: str, upload_id: str, parts: Sequence[UploadPart]
    ) -> BlobAttributes:
        """Assemble the parts (contiguous, numbered 1..n) into the object at ``key``."""
        raise NotImplementedError

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        """Drop an upload and its parts; aborting an absent upload is not an error."""
        raise NotImplementedError

    async def iter_range(
        self, key: str, offset: int = 0, length: int | None = None, *, chunk_size: int = 1 << 20
    ) -> AsyncIterator[bytes]:
        """Bytes [offset, offset+length) in chunks of at most ``chunk_size``."""
        end = None if length is None else offset + length
        pos = offset
        while end is None or pos < end:
            want = chunk_size if end is None else min(chunk_size, end - pos)
            chunk = await self.get_range(key, pos, want)
            if not chunk:
                return
            yield chunk
            pos += len(chunk)
            if len(chunk) < want:
                return

    async def presigned_get_url(self, key: str, *, expires_seconds: int = 3600) -> str | None:
        """A time-limited URL anyone may GET the object from; None when the backend has none."""
        return None

    def local_path(self, key: str) -> Path | None:
        """A file holding the object, readable in place (filesystem adapter); else None.

        Objects are replaced by rename, so an open file keeps its content.
        """
        return None

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every key starting with ``prefix``; returns how many were deleted."""
        if not prefix:
            raise ValueError("refusing to delete every key: give a prefix")
        keys = [k async for k in self.iter_keys(prefix)]
        for k in keys:
            await self.delete(k)
        return len(keys)

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise BlobError when the backend is unreachable."""

    @abc.abstractmethod
    async def close(self) -> None: ...
