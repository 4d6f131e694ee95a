"""A small DriveService client: upload a file as blocks, download one atomically.

Uploading is the contract's commit → upload what is missing → commit dance::

    client = DriveClient(channel, token, device="laptop")
    result = client.upload_file(Path("big.iso"), "/isos/big.iso", base_revision=0)
    result.node.head.revision, result.uploaded_blocks, result.conflicted

The first CommitFile names every block; the server answers with the ones
this namespace lacks, and only those are streamed (several UploadBlocks
streams at once, each block split into messages of at most 4 MiB). A broken
upload is resumed by committing again: the answer lists what is still
missing, so nothing stored is sent twice (across runs too).

Downloading writes a temporary file next to the target (``.sysdesign-tmp-…``,
a name the sync client ignores), checks every block against its hash, fsyncs
and renames it over the target: a reader sees the old file or the new one,
never half of one. Blocks the caller already has locally (the previous
version of the file) are copied instead of downloaded.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from sysdesign.drive.v1 import drive_pb2 as pb
from sysdesign.drive.v1 import drive_pb2_grpc as pbg

from clients.drive.blocks import BlockRef, Chunker, cut_file, read_block, recut_file

MiB = 1 << 20
# Data per UploadBlocks message (the server's message limit is 8 MiB).
PIECE = 4 * MiB
# Bytes sent in one UploadBlocks stream at most: small files' blocks share a stream.
BATCH_BYTES = 64 * MiB
# How long one UploadBlocks stream runs at most (the server's deadline for it is 30 s).
STREAM_SECONDS = 20.0
TEMP_PREFIX = ".sysdesign-tmp-"
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.ABORTED, grpc.StatusCode.RESOURCE_EXHAUSTED})


def code_of(e: BaseException) -> grpc.StatusCode | None:
    return e.code() if isinstance(e, grpc.RpcError) else None  # type: ignore[attr-defined, no-any-return]


def retryable(e: BaseException) -> bool:
    return code_of(e) in RETRYABLE


class Transfer:
    """Where an upload or download reports its bytes (a progress bar; nothing by default)."""

    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def finish(self) -> None:
        pass


class RateLimit:
    """At most ``rate`` bytes per second over every thread that takes from it (0: no limit)."""

    def __init__(self, rate: int = 0) -> None:
        self.rate = rate
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + n / self.rate
        if start > now:
            time.sleep(start - now)


def hash_file(path: Path, chunker: Chunker, progress: Transfer | None = None, description: str = "") -> list[BlockRef]:
    """``cut_file``, reporting the bytes read to ``progress`` (started with the file's size, then finished)."""
    if progress is None:
        return cut_file(path, chunker)
    progress.start(description or f"# {path.name}", os.path.getsize(path))
    try:
        return cut_file(path, chunker, progress.advance)
    finally:
        progress.finish()


def rehash_file(path: Path, chunker: Chunker, known: Sequence[BlockRef], known_quick: Sequence[str],
                progress: Transfer | None = None, description: str = "") -> tuple[list[BlockRef], list[str]]:
    """``blocks.recut_file`` (SHA-256 only where the quick digests changed), with progress."""
    if progress is None:
        return recut_file(path, chunker, known, known_quick)
    progress.start(description or f"# {path.name}", os.path.getsize(path))
    try:
        return recut_file(path, chunker, known, known_quick, progress.advance)
    finally:
        progress.finish()


@dataclass
class UploadResult:
    node: Any
    conflicted: bool = False
    conflict_with: Any = None
    blocks: list[BlockRef] = field(default_factory=list)
    uploaded_blocks: int = 0
    uploaded_bytes: int = 0


@dataclass
class DownloadResult:
    node: Any
    revision: Any
    downloaded_blocks: int = 0
    downloaded_bytes: int = 0
    reused_blocks: int = 0


class DownloadAborted(Exception):
    """The caller's last check (``before_replace``) said not to replace the target."""


class DriveClient:
    """DriveService calls for one caller (its bearer token) and one namespace."""

    def __init__(self, channel: grpc.Channel, token: str, *, namespace_id: str = "", device: str = "",
                 workers: int = 4, limit_rate: int = 0, attempts: int = 8) -> None:
        self.stub = pbg.DriveServiceStub(channel)
        self.md = (("authorization", f"Bearer {token}"),)
        self.namespace_id = namespace_id
        self.device = device[:64]
        self.workers = max(1, workers)
        self.limit = RateLimit(limit_rate)
        self.attempts = attempts
        self._settings: Any = None

    # -- plumbing --------------------------------------------------------------

    def call(self, method: str, request: Any, *, timeout: float = 30) -> Any:
        """A unary call, retried on UNAVAILABLE (and friends) with backoff."""
        fn = getattr(self.stub, method)
        for attempt in range(self.attempts):
            try:
                return fn(request, metadata=self.md, timeout=timeout)
            except grpc.RpcError as e:
                if not retryable(e) or attempt == self.attempts - 1:
                    raise
                time.sleep(min(0.2 * 2 ** attempt, 5.0))
        raise AssertionError("unreachable")

    def settings(self) -> Any:
        if self._settings is None:
            self._settings = self.call("GetSettings", pb.GetSettingsRequest(
                namespace_id=self.namespace_id)).settings
        return self._settings

    def chunker(self) -> Chunker:
        return Chunker.from_settings(self.settings())

    def get_node(self, path: str) -> Any | None:
        """The node at ``path`` (or ``id:<node_id>``); None when there is none."""
        try:
            return self.call("GetNode", pb.GetNodeRequest(path=path, namespace_id=self.namespace_id)).node
        except grpc.RpcError as e:
            if code_of(e) == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    def list_folder(self, path: str) -> Iterator[Any]:
        token = ""
        while True:
            resp = self.call("ListFolder", pb.ListFolderRequest(path=path, namespace_id=self.namespace_id,
                                                                page_size=1000, page_token=token))
            yield from resp.children
            token = resp.next_page_token
            if not token:
                return

    def revisions(self, path: str) -> Iterator[Any]:
        token = ""
        while True:
            resp = self.call("ListRevisions", pb.ListRevisionsRequest(
                path=path, namespace_id=self.namespace_id, page_size=1000, page_token=token))
            yield from resp.revisions
            token = resp.next_page_token
            if not token:
                return

    # -- upload ----------------------------------------------------------------

    def upload_file(self, local: Path, remote: str, base_revision: int = 0, *, device: str | None = None,
                    progress: Transfer | None = None, blocks: Sequence[BlockRef] | None = None,
                    chunker: Chunker | None = None, hashing: Transfer | None = None) -> UploadResult:
        """Commit ``local`` as ``remote`` against ``base_revision``, sending only the blocks it lacks.

        ``blocks`` are the file's blocks when the caller already cut it (the
        sync client does, to compare hashes first); else ``hashing`` is shown
        the bytes read while the file is cut. Raises ``FileChanged``
        when the file is written to meanwhile: try again once it settles.
        """
        progress = progress or Transfer()
        chunker = chunker or self.chunker()
        refs = list(blocks) if blocks is not None else hash_file(local, chunker, hashing, f"# {remote}")
        req = pb.CommitFileRequest(
            path=remote, namespace_id=self.namespace_id, base_revision=base_revision,
            blocks=[pb.Block(sha256=b.sha256, size_bytes=b.size) for b in refs],
            chunking=chunker.proto, device=(self.device if device is None else device)[:64])  # type: ignore[arg-type]
        result = UploadResult(node=None, blocks=refs)
        by_hash = {b.sha256: b for b in refs}
        started = False
        failures = 0
        expect = False
        while True:
            req.expect_uploaded = expect
            try:
                resp = self.call("CommitFile", req, timeout=60)
            except grpc.RpcError as e:
                if code_of(e) != grpc.StatusCode.FAILED_PRECONDITION or not expect:
                    raise
                # A block went missing between the upload and the commit (collected,
                # or never stored): ask again which ones, and send them.
                failures += 1
                if failures > 3:
                    raise
                expect = False
                continue
            if not resp.missing_blocks:
                result.node = resp.node
                result.conflicted = resp.conflicted
                result.conflict_with = resp.conflict_with if resp.HasField("conflict_with") else None
                progress.finish()
                return result
            missing = [by_hash[h] for h in dict.fromkeys(resp.missing_blocks) if h in by_hash]
            if len(missing) != len(set(resp.missing_blocks)):
                raise RuntimeError("the server asked for blocks the file does not have")
            if not started:
                progress.start(f"↑ {remote}", sum(b.size for b in missing))
                started = True
            before = result.uploaded_blocks
            try:
                self._send_blocks(local, missing, progress, result)
                expect = True
            except grpc.RpcError as e:
                failures = 1 if result.uploaded_blocks > before else failures + 1
                if not retryable(e) or failures > self.attempts:
                    raise
                time.sleep(min(0.2 * 2 ** failures, 5.0))
                expect = False  # commit again: it says what is still missing

    def _send_blocks(self, local: Path, missing: list[BlockRef], progress: Transfer,
                     result: UploadResult) -> None:
        """Stream ``missing`` over up to ``workers`` streams at once, each ended in time for its deadline.

        The server holds a block-upload stream for 30 s at most, so a stream
        takes blocks from the shared queue only while the next one should
        still fit (at the rate this stream has managed so far), and another
        stream carries on. A block is stored when its last message arrives:
        a stream cut short loses only the block in flight.
        """
        queue = deque(missing)
        lock = threading.Lock()

        def stream() -> None:
            while queue:
                resp = self.stub.UploadBlocks(self._messages(local, queue, progress), metadata=self.md,
                                              timeout=STREAM_SECONDS + 30)
                sizes = {b.sha256: b.size for b in missing}
                with lock:
                    result.uploaded_blocks += len(resp.stored)
                    result.uploaded_bytes += sum(sizes.get(h, 0) for h in resp.stored)

        n = min(self.workers, len(missing))
        if n <= 1:
            stream()
            return
        with ThreadPoolExecutor(max_workers=n) as pool:
            for fut in [pool.submit(stream) for _ in range(n)]:
                fut.result()

    def _messages(self, local: Path, queue: deque[BlockRef], progress: Transfer) -> Iterator[Any]:
        started = time.monotonic()
        nbytes = 0
        with open(local, "rb") as f:
            while True:
                elapsed = time.monotonic() - started
                if nbytes >= BATCH_BYTES or elapsed >= STREAM_SECONDS:
                    return
                try:
                    block = queue.popleft()
                except IndexError:
                    return
                if nbytes and elapsed + block.size * elapsed / nbytes > STREAM_SECONDS:
                    queue.appendleft(block)  # would not fit in this stream: the next one takes it
                    return
                data = read_block(f, block)
                view = memoryview(data)
                for start in range(0, len(data), PIECE):
                    piece = view[start:start + PIECE]
                    self.limit.take(len(piece))
                    yield pb.UploadBlocksRequest(namespace_id=self.namespace_id, sha256=block.sha256,
                                                 data=bytes(piece), last=start + PIECE >= len(data))
                    progress.advance(len(piece))
                nbytes += block.size

    # -- download --------------------------------------------------------------

    def download_file(self, remote: str, local: Path, *, revision: int = 0, node: Any = None,
                      progress: Transfer | None = None,
                      have: dict[str, tuple[Path, int]] | None = None,
                      before_replace: Callable[[], bool] | None = None) -> DownloadResult:
        """Write ``remote`` (its head, or ``revision``) to ``local`` atomically, every block verified.

        ``have`` maps block hashes to (file, offset) where the caller already
        holds those bytes; they are copied (and checked) instead of
        downloaded. ``before_replace`` is asked last: False keeps ``local`` as
        it is (``DownloadAborted``).
        """
        progress = progress or Transfer()
        if node is None:
            node = self.call("GetNode", pb.GetNodeRequest(path=remote, namespace_id=self.namespace_id)).node
        if node.kind != pb.NODE_KIND_FILE:
            raise IsADirectoryError(f"{node.path or remote} is a folder")
        rev = node.head
        if revision and revision != rev.revision:
            rev = next((r for r in self.revisions(f"id:{node.node_id}") if r.revision == revision), None)
            if rev is None:
                raise FileNotFoundError(f"{node.path}: no revision {revision} (see `drive revisions`)")
        result = DownloadResult(node=node, revision=rev)
        offsets: dict[str, list[int]] = {}
        sizes: dict[str, int] = {}
        pos = 0
        for b in rev.blocks:
            offsets.setdefault(b.sha256, []).append(pos)
            sizes[b.sha256] = b.size_bytes
            pos += b.size_bytes
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.parent / f"{TEMP_PREFIX}{secrets.token_hex(6)}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.ftruncate(fd, pos)
            pending = set(offsets)
            if have:
                for h in list(pending):
                    if h in have and self._copy_block(fd, have[h], h, sizes[h], offsets[h]):
                        pending.discard(h)
                        result.reused_blocks += len(offsets[h])
            progress.start(f"↓ {node.path or remote}", sum(sizes[h] for h in pending))
            failures = 0
            while pending:
                before = len(pending)
                try:
                    self._receive(node, rev.revision, fd, pending, offsets, sizes, progress, result)
                except grpc.RpcError as e:
                    failures = 1 if len(pending) < before else failures + 1
                    if not retryable(e) or failures > self.attempts:
                        raise
                    time.sleep(min(0.2 * 2 ** failures, 5.0))
            os.fsync(fd)
            os.close(fd)
            fd = -1
            if before_replace is not None and not before_replace():
                raise DownloadAborted(str(local))
            os.replace(tmp, local)
            _fsync_dir(local.parent)
        finally:
            if fd >= 0:
                os.close(fd)
            tmp.unlink(missing_ok=True)
            progress.finish()
        return result

    def _copy_block(self, fd: int, src: tuple[Path, int], sha: str, size: int, at: list[int]) -> bool:
        path, offset = src
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(size)
        except OSError:
            return False
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha:
            return False
        for o in at:
            os.pwrite(fd, data, o)
        return True

    def _receive(self, node: Any, revision: int, fd: int, pending: set[str], offsets: dict[str, list[int]],
                 sizes: dict[str, int], progress: Transfer, result: DownloadResult) -> None:
        everything = len(pending) == len(offsets)
        req = pb.DownloadBlocksRequest(path=f"id:{node.node_id}", namespace_id=self.namespace_id,
                                       revision=revision, sha256=[] if everything else sorted(pending))
        current = ""
        h: Any = None
        written = 0
        for msg in self.stub.DownloadBlocks(req, metadata=self.md, timeout=3600):
            if msg.sha256 and msg.sha256 != current:
                if current:
                    raise RuntimeError(f"block {current} ended without its last message")
                current, h, written = msg.sha256, hashlib.sha256(), 0
                if msg.revision and msg.revision != revision:
                    raise RuntimeError(f"asked for revision {revision}, got {msg.revision}")
                if current not in offsets:
                    raise RuntimeError(f"the server sent block {current}, not one of the file's")
            if not current:
                raise RuntimeError("block data before the block's hash")
            fresh = current in pending
            if msg.data:
                h.update(msg.data)
                if fresh:
                    os.pwrite(fd, msg.data, offsets[current][0] + written)
                    progress.advance(len(msg.data))
                written += len(msg.data)
            if msg.last:
                if written != sizes[current] or h.hexdigest() != current:
                    raise RuntimeError(f"block {current} does not match its hash ({written} bytes)")
                if fresh:
                    first = offsets[current][0]
                    for o in offsets[current][1:]:
                        os.pwrite(fd, os.pread(fd, written, first), o)
                    pending.discard(current)
                    result.downloaded_blocks += 1
                    result.downloaded_bytes += written
                current = ""
        if pending:
            raise RuntimeError(f"the download ended with {len(pending)} block(s) not sent")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
