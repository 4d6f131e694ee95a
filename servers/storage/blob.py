"""The blob port: a small object-store interface in the spirit of thanos objstore.

Keys are slash-separated paths ("pastes/abc123"). Adapters: FilesystemBlobStore
(embedded) and S3BlobStore (boto3; MinIO, AWS). Both run through one contract
suite (tests/contract/test_blob_contract.py).
"""

from __future__ import annotations

import abc
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

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


@dataclass(frozen=True)
class BlobAttributes:
    size: int
    # Quoted-free strong validator of the content (hex MD5 on both adapters for single puts).
    etag: str
    last_modified: float  # unix seconds


class BlobStore(abc.ABC):
    @abc.abstractmethod
    async def put(self, key: str, data: bytes, *, content_type: str = "application/octet-stream") -> BlobAttributes:
        """Write an object atomically: readers see the old object or the whole new one."""

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

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise BlobError when the backend is unreachable."""

    @abc.abstractmethod
    async def close(self) -> None: ...
