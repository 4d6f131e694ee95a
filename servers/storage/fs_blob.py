"""The embedded blob adapter: objects as plain files under a root directory.

Layout under ``root``::

    objects/  the data, one file per object
    meta/     a small JSON sidecar per object (size, etag, content type)
    tmp/      files being written (never listed)

A key ``a/b/c`` is stored at ``objects/a~/b~/c``: directories get a ``~``
suffix, a character that keys cannot hold, so the keys ``a`` and ``a/b`` can
both exist (as on S3) and no key can name a path outside the tree.

A put writes a temp file, fsyncs it, renames it over the object
(``os.replace``, atomic: readers see the old or the whole new object) and
fsyncs the directory. The sidecar records the inode, size and mtime of the
data file it describes; when they no longer match (a crash or a concurrent
put between the two renames), the etag is computed again from the data and
the sidecar rewritten, so the sidecar is a cache that can never lie.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from servers.storage.blob import (
    BlobAttributes,
    BlobError,
    BlobNotFound,
    BlobStore,
    InvalidBlobKey,
    check_key,
)

_DIR_SUFFIX = "~"
# Longest path segment a key may hold here (filesystems limit a name to 255 bytes;
# the sidecar adds ".json").
MAX_SEGMENT_LEN = 240
_CHUNK = 1 << 20
_STALE_TMP_SECONDS = 3600.0


class FilesystemBlobStore(BlobStore):
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._objects = self.root / "objects"
        self._meta = self.root / "meta"
        self._tmp = self.root / "tmp"
        self._ready = False

    # -- paths ----------------------------------------------------------------

    def _rel(self, key: str) -> Path:
        check_key(key)
        parts = key.split("/")
        if any(len(p.encode()) > MAX_SEGMENT_LEN for p in parts):
            raise InvalidBlobKey(
                f"invalid blob key {key!r}: a path segment is longer than {MAX_SEGMENT_LEN} bytes"
            )
        return Path(*(p + _DIR_SUFFIX for p in parts[:-1]), parts[-1])

    def _data_path(self, key: str) -> Path:
        return self._objects / self._rel(key)

    def _meta_path(self, key: str) -> Path:
        rel = self._rel(key)
        return self._meta / rel.parent / (rel.name + ".json")

    def _setup(self) -> None:
        if self._ready:
            return
        for d in (self._objects, self._meta, self._tmp):
            d.mkdir(parents=True, exist_ok=True)
        # Temp files of writers that died long ago.
        cutoff = time.time() - _STALE_TMP_SECONDS
        with contextlib.suppress(OSError):
            for e in os.scandir(self._tmp):
                with contextlib.suppress(OSError):
                    if e.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.unlink(e.path)
        self._ready = True

    # -- blocking parts (run in threads) ----------------------------------------

    def _write_file(self, final: Path, data: bytes, *, durable: bool) -> os.stat_result:
        """Write ``data`` to ``final`` atomically; the stat of the new file."""
        self._setup()
        tmp = self._tmp / f"{secrets.token_hex(8)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if durable:
                os.fsync(fd)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        try:
            for attempt in range(5):
                final.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.replace(tmp, final)
                    break
                except FileNotFoundError:
                    # A concurrent delete removed the (then empty) directory: again.
                    if attempt == 4:
                        raise
            if durable:
                _fsync_dir(final.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return st

    def _write_meta(self, key: str, st: os.stat_result, etag: str, content_type: str) -> None:
        meta = {
            "ino": st.st_ino,
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "etag": etag,
            "content_type": content_type,
        }
        # Not fsynced: a lost or stale sidecar is detected and rebuilt.
        self._write_file(self._meta_path(key), json.dumps(meta).encode(), durable=False)

    def _put(self, key: str, data: bytes, content_type: str) -> BlobAttributes:
        path = self._data_path(key)
        etag = hashlib.md5(data, usedforsecurity=False).hexdigest()
        st = self._write_file(path, data, durable=True)
        self._write_meta(key, st, etag, content_type)
        # The mtime of the file is set when its data is written, before the rename.
        return BlobAttributes(size=st.st_size, etag=etag, last_modified=st.st_mtime)

    def _get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._data_path(key)
        try:
            with open(path, "rb") as f:
                if offset:
                    f.seek(offset)
                return f.read() if length is None else f.read(length)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise BlobNotFound(key) from exc

    def _attributes(self, key: str) -> BlobAttributes:
        path = self._data_path(key)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise BlobNotFound(key) from exc
        meta: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            meta = json.loads(self._meta_path(key).read_bytes())
        fresh = (
            isinstance(meta, dict)
            and meta.get("ino") == st.st_ino
            and meta.get("size") == st.st_size
            and meta.get("mtime_ns") == st.st_mtime_ns
            and isinstance(meta.get("etag"), str)
        )
        if fresh:
            etag = meta["etag"]
        else:
            try:
                with open(path, "rb") as f:
                    st = os.fstat(f.fileno())
                    h = hashlib.md5(usedforsecurity=False)
                    while chunk := f.read(_CHUNK):
                        h.update(chunk)
            except FileNotFoundError as exc:
                raise BlobNotFound(key) from exc
            etag = h.hexdigest()
            content_type = meta.get("content_type") if isinstance(meta, dict) else None
            with contextlib.suppress(OSError):
                self._write_meta(key, st, etag, content_type or "application/octet-stream")
        return BlobAttributes(size=st.st_size, etag=etag, last_modified=st.st_mtime)

    def _delete(self, key: str) -> None:
        path = self._data_path(key)
        for p in (path, self._meta_path(key)):
            try:
                p.unlink()
            except (FileNotFoundError, NotADirectoryError):
                pass
        # Remove directories left empty (a concurrent put retries its rename).
        for base, leaf in ((self._objects, path), (self._meta, self._meta_path(key))):
            d = leaf.parent
            while d != base:
                try:
                    d.rmdir()
                except OSError:
                    break
                d = d.parent

    def _list(self, prefix: str) -> list[str]:
        """Every key starting with ``prefix``, sorted."""
        head, _, last = prefix.rpartition("/")
        start = self._objects
        key_prefix = ""
        if head:
            segs = head.split("/")
            start = start.joinpath(*(s + _DIR_SUFFIX for s in segs))
            key_prefix = head + "/"
        out: list[str] = []

        def walk(d: Path, kp: str, name_filter: str) -> None:
            # Keys under a directory entry "seg~" all start with "seg/", and those
            # form one interval in lexicographic order: sort the entries by "seg"
            # (file) or "seg/" (directory) and descend in that order.
            try:
                entries = list(os.scandir(d))
            except (FileNotFoundError, NotADirectoryError, ValueError):
                return
            items: list[tuple[str, str | None]] = []
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    if e.name.endswith(_DIR_SUFFIX):
                        items.append((e.name[: -len(_DIR_SUFFIX)] + "/", e.path))
                elif not e.name.endswith(_DIR_SUFFIX):
                    items.append((e.name, None))
            items.sort(key=lambda x: x[0])
            for name, sub in items:
                # name_filter holds no "/": it matches a directory's "seg/" or not at all.
                if not name.startswith(name_filter):
                    continue
                if sub is None:
                    out.append(kp + name)
                else:
                    walk(Path(sub), kp + name, "")

        walk(start, key_prefix, last)
        return out

    # -- the port ---------------------------------------------------------------

    async def put(
        self, key: str, data: bytes, *, content_type: str = "application/octet-stream"
    ) -> BlobAttributes:
        self._rel(key)
        data = bytes(data)
        return await _io(self._put, key, data, content_type)

    async def get(self, key: str) -> bytes:
        self._rel(key)
        return await _io(self._get, key)

    async def get_range(self, key: str, offset: int, length: int | None = None) -> bytes:
        self._rel(key)
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("offset and length must not be negative")
        return await _io(self._get, key, offset, length)

    async def attributes(self, key: str) -> BlobAttributes:
        self._rel(key)
        return await _io(self._attributes, key)

    async def delete(self, key: str) -> None:
        self._rel(key)
        await _io(self._delete, key)

    async def iter_keys(self, prefix: str = "") -> AsyncIterator[str]:
        for key in await _io(self._list, prefix):
            yield key

    async def ping(self) -> None:
        def check() -> None:
            self._setup()
            if not os.access(self._tmp, os.W_OK):
                raise PermissionError(errno.EACCES, "not writable", str(self._tmp))

        await _io(check)

    async def close(self) -> None:
        return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def _io(fn: Any, *args: Any) -> Any:
    try:
        return await asyncio.to_thread(fn, *args)
    except BlobError:
        raise
    except OSError as exc:
        raise BlobError(f"filesystem blob store: {exc}") from exc
