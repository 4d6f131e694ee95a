"""The embedded blob adapter: objects as plain files under a root directory.

Layout under ``root``::

    objects/  the data, one file per object
    meta/     a small JSON sidecar per object (size, etag, content type)
    tmp/      files being written (never listed)
    uploads/  multipart uploads in progress: <upload id>/data (+ content-type)

A key ``a/b/c`` is stored at ``objects/a~/b~/c``: directories get a ``~``
suffix, a character that keys cannot hold, so the keys ``a`` and ``a/b`` can
both exist (as on S3) and no key can name a path outside the tree.

A put writes a temp file, fsyncs it, renames it over the object
(``os.replace``, atomic: readers see the old or the whole new object) and
fsyncs the directory (``put_without_etag`` writes no sidecar: the MD5 is
left for the first ``attributes``). The sidecar records the inode, size and mtime of the
data file it describes; when they no longer match (a crash or a concurrent
put between the two renames), the etag is computed again from the data and
the sidecar rewritten, so the sidecar is a cache that can never lie.

A multipart upload writes its parts in place into one file,
``uploads/<id>/data``, each at its offset (``pwrite`` + ``fdatasync``: a part
is durable when acknowledged); completing it truncates the file to the parts'
total and renames it over the object. The bytes are written once, with no
concatenation pass: the upload costs what a plain write of the file costs.
The object's etag is S3's multipart form, the MD5 of the parts' MD5s and
``-<parts>``, so completing never re-reads the data.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from servers.storage.blob import (
    BlobAttributes,
    BlobError,
    BlobNotFound,
    BlobStore,
    BytesLike,
    InvalidBlobKey,
    UploadNotFound,
    UploadPart,
    check_key,
    check_parts,
)

_UPLOAD_ID_RE = re.compile(r"^[0-9a-f]{32}$")

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
        self._uploads = self.root / "uploads"
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
        for d in (self._objects, self._meta, self._tmp, self._uploads):
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

    def _put_without_etag(self, key: str, data: bytes) -> None:
        # No sidecar: the first attributes() finds none (or a stale one) and builds it.
        self._write_file(self._data_path(key), data, durable=True)

    def _exists(self, key: str) -> bool:
        try:
            return os.path.isfile(self._data_path(key))
        except (NotADirectoryError, ValueError):
            return False

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

    # -- multipart (blocking parts) -----------------------------------------------

    def _upload_dir(self, key: str, upload_id: str) -> Path:
        if not _UPLOAD_ID_RE.match(upload_id):
            raise UploadNotFound(f"{key} (upload {upload_id!r})")
        d = self._uploads / upload_id
        try:
            owner = (d / "key").read_text()
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise UploadNotFound(f"{key} (upload {upload_id})") from exc
        if owner != key:
            raise UploadNotFound(f"{key} (upload {upload_id} belongs to another key)")
        return d

    def _create_multipart(self, key: str, content_type: str) -> str:
        self._setup()
        upload_id = secrets.token_hex(16)
        d = self._uploads / upload_id
        d.mkdir()
        (d / "content-type").write_text(content_type)
        fd = os.open(d / "data", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.close(fd)
        (d / "key").write_text(key)  # written last: its presence marks a usable upload
        _fsync_dir(d)
        _fsync_dir(self._uploads)
        return upload_id

    def _upload_part(self, key: str, upload_id: str, part_number: int, offset: int,
                     data: BytesLike) -> UploadPart:
        d = self._upload_dir(key, upload_id)
        fd = os.open(d / "data", os.O_WRONLY)
        try:
            view = memoryview(data)
            pos = offset
            while view:
                n = os.pwrite(fd, view, pos)
                view = view[n:]
                pos += n
            os.fdatasync(fd)
        finally:
            os.close(fd)
        etag = hashlib.md5(data, usedforsecurity=False).hexdigest()
        return UploadPart(part_number=part_number, offset=offset, size=len(data), etag=etag)

    def _complete_multipart(self, key: str, upload_id: str,
                            parts: Sequence[UploadPart]) -> BlobAttributes:
        d = self._upload_dir(key, upload_id)
        ordered, expected = check_parts(parts)
        data = d / "data"
        fd = os.open(data, os.O_WRONLY)
        try:
            os.ftruncate(fd, expected)  # bytes of a part written but never acknowledged
            os.fsync(fd)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        content_type = (d / "content-type").read_text() or "application/octet-stream"
        digest = hashlib.md5(usedforsecurity=False)
        for p in ordered:
            digest.update(bytes.fromhex(p.etag))
        etag = f"{digest.hexdigest()}-{len(ordered)}"
        final = self._data_path(key)
        for attempt in range(5):
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(data, final)
                break
            except FileNotFoundError:
                if attempt == 4:
                    raise
        _fsync_dir(final.parent)
        self._write_meta(key, st, etag, content_type)
        self._remove_upload_dir(d)
        return BlobAttributes(size=st.st_size, etag=etag, last_modified=st.st_mtime)

    def _abort_multipart(self, key: str, upload_id: str) -> None:
        try:
            d = self._upload_dir(key, upload_id)
        except UploadNotFound:
            return
        self._remove_upload_dir(d)

    @staticmethod
    def _remove_upload_dir(d: Path) -> None:
        for name in ("key", "data", "content-type"):  # "key" first: unusable from here on
            (d / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            d.rmdir()

    # -- the port ---------------------------------------------------------------

    async def create_multipart(
        self, key: str, *, content_type: str = "application/octet-stream"
    ) -> str:
        self._rel(key)
        return await _io(self._create_multipart, key, content_type)  # type: ignore[no-any-return]

    async def upload_part(
        self, key: str, upload_id: str, part_number: int, offset: int, data: BytesLike
    ) -> UploadPart:
        self._rel(key)
        if part_number < 1 or offset < 0:
            raise ValueError("part numbers start at 1 and offsets must not be negative")
        # No copy: the caller keeps the buffer unchanged until this returns (see the port).
        return await _io(self._upload_part, key, upload_id, part_number, offset, data)  # type: ignore[no-any-return]

    async def complete_multipart(
        self, key: str, upload_id: str, parts: Sequence[UploadPart]
    ) -> BlobAttributes:
        self._rel(key)
        return await _io(self._complete_multipart, key, upload_id, list(parts))  # type: ignore[no-any-return]

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        self._rel(key)
        await _io(self._abort_multipart, key, upload_id)

    def local_path(self, key: str) -> Path | None:
        return self._data_path(key)

    async def put(
        self, key: str, data: bytes, *, content_type: str = "application/octet-stream"
    ) -> BlobAttributes:
        self._rel(key)
        data = bytes(data)
        return await _io(self._put, key, data, content_type)

    async def put_without_etag(self, key: str, data: bytes) -> None:
        self._rel(key)
        await _io(self._put_without_etag, key, bytes(data))

    async def exists(self, key: str) -> bool:
        # The data file alone answers: no sidecar read, no etag rebuilt for an object just written.
        self._rel(key)
        return await _io(self._exists, key)  # type: ignore[no-any-return]

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
