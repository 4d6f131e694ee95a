"""The media pipeline's domain logic: declare, stream, verify, probe, queue; read; delete.

Upload path (CreateUpload, then one or more Upload streams)::

    client ──chunks──► Upload ──parts of SYSDESIGN_MEDIA_PART_BYTES──► blob port multipart
                          │                                            (staging, S3: ≥ 5 MiB)
                          └─ about once a second and at the end: media row ← committed offset + parts

- **Never a whole file in memory.** A stream owns two part buffers (8 MiB
  each by default), allocated once: one is written (``upload_part``, durable
  when it returns) while the next fills. Messages are decoded without copying
  their bytes (``wire.py``) and copied once, into the part buffer. The
  committed offset counts acknowledged parts only, and the row that records
  it is written before the stream answers, so the offset a client resumes
  from is always on the backend.
- **Offsets.** Every message says where its bytes start; it must be exactly
  the next byte expected. Anything else (a gap, an overlap) ends the stream
  with FAILED_PRECONDITION whose details carry the committed offset; the
  bytes buffered after that offset are dropped, nothing past it is stored.
- **One writer.** A Redis lock per upload (``{mu:<id>}:lock``) keeps two
  streams from interleaving parts: a second stream gets ABORTED with a retry
  delay until the first one ends.
- **SHA-256 across resumes.** The hash is fed part by part (in a thread, while
  the part is written). Its state stays in this process's memory between
  streams, keyed by upload and committed offset, so a client that reconnects
  to the same server continues the hash. hashlib state cannot be serialised:
  when a resume lands on another process (a restart, another replica behind
  the load balancer) the hash is marked lost and the assembled object is read
  back once, streamed, at completion. Correct everywhere, incremental in the
  common case.
- **Bounded streams.** The platform bounds a call at 30 s; the server ends an
  Upload stream itself shortly before that with the committed offset, and the
  client simply opens the next stream from there (what it does after a lost
  connection anyway).
- **On the last byte**: the parts are assembled (``complete_multipart``), the
  size and SHA-256 checked, the file probed (ffmpeg, see ``probe.py``) and its
  content matched against the declared type. A refused file is removed from
  staging with its rows (nothing is stored) and the call answers
  INVALID_ARGUMENT. Otherwise the row goes to PROCESSING and a job goes onto
  the ``{q:media}`` stream; transcoding never runs on the upload path.

Identity: the caller is the token's user. Another user's media answers
NOT_FOUND, exactly like a missing id (not PERMISSION_DENIED): Snowflake ids
are guessable, and a different answer would confirm that an id exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import hashlib
import hmac
import json
import re
import secrets
import sys
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2

from servers.media import probe as probing
from servers.media.settings import MediaSettings
from servers.media.tables import MEDIA, MEDIA_BY_OWNER
from servers.platform.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ServiceError,
    Violations,
)
from servers.platform.interceptors import DEFAULT_DEADLINE_SECONDS, current_request_id
from servers.platform.runtime import Runtime
from servers.storage.blob import BlobNotFound, UploadNotFound, UploadPart
from servers.storage.queue import JobQueue
from servers.storage.redis_conn import Subscription, publish
from servers.storage.table import InvalidPageToken

log = structlog.get_logger("sysdesign.media")

UPLOADING, PROCESSING, READY, FAILED = 1, 2, 3, 4
TERMINAL = (READY, FAILED)

MEDIA_STREAM = "{q:media}"
# Uploads in progress by expiry time (one sorted set; touched by single commands only).
PENDING_UPLOADS = "{media}:uploads-pending"
SWEEP_BATCH = 20
MEDIA_GROUP = "media"
STAGING_PREFIX = "media-staging"
OUTPUT_PREFIX = "media"
MAX_CHUNK_BYTES = 4 * 1024 * 1024
_ID_RE = re.compile(r"^[0-9]{1,19}$")
# End an Upload stream this long before the platform's bound on a call.
STREAM_MARGIN_SECONDS = 5.0
LOCK_TTL_MS = 60_000
RECORD_EVERY_SECONDS = 1.0
PARTS_IN_FLIGHT = 1

# Compare-and-delete / compare-and-extend of a lock held by token.
_UNLOCK = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
_EXTEND = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
           "return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0")


def transcode_queue(redis: Any) -> JobQueue:
    """The transcoding stream: one job per media id.

    ``max_attempts`` is one more than the transcode attempts: the last
    delivery only records FAILED and dead-letters the job, so a media item
    whose worker died on every attempt still ends FAILED, not PROCESSING forever.
    """
    s = MediaSettings()
    return JobQueue(redis, MEDIA_STREAM, MEDIA_GROUP, max_attempts=s.max_attempts + 1,
                    claim_idle_ms=s.claim_idle_ms)


class OffsetMismatch(FailedPrecondition):
    """The message's offset is not the next byte the server expects."""

    def __init__(self, upload_id: int, offset: int, expected: int, committed: int) -> None:
        super().__init__(
            f"offset {offset} is not the next byte expected ({expected}); "
            f"{committed} bytes are committed: resume from there (GetUpload)",
            reason="UPLOAD_OFFSET_MISMATCH", subject=f"uploads/{upload_id}", kind="UPLOAD_OFFSET",
        )
        self.metadata = {"committed_offset": str(committed), "expected_offset": str(expected),
                         "offset": str(offset)}


class UploadBusy(ServiceError):
    """Another stream is writing this upload: retry shortly."""

    code = grpc.StatusCode.ABORTED

    def __init__(self, upload_id: int) -> None:
        super().__init__(f"another stream is writing upload {upload_id}; retry shortly",
                         reason="UPLOAD_IN_PROGRESS")

    def details(self) -> list[object]:
        return [error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1)),
                *super().details()]


class QuotaExceeded(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, owner_id: int, used: int, requested: int, limit: int) -> None:
        super().__init__(
            f"upload of {requested} bytes would exceed your media quota: "
            f"{used} of {limit} bytes used", reason="MEDIA_QUOTA_EXCEEDED",
            metadata={"used_bytes": str(used), "requested_bytes": str(requested),
                      "limit_bytes": str(limit)},
        )
        self.owner_id = owner_id

    def details(self) -> list[object]:
        return [error_details_pb2.QuotaFailure(violations=[error_details_pb2.QuotaFailure.Violation(
            subject=f"users/{self.owner_id}", description=self.message)]), *super().details()]


def parse_media_id(value: str, field: str = "media_id") -> int:
    if not _ID_RE.match(value or ""):
        raise InvalidArgument([(field, "must be a media id (decimal digits)" if value else "is required")])
    return int(value)


def output_key(media_id: int, rel: str = "") -> str:
    return f"{OUTPUT_PREFIX}/{media_id}/{rel}" if rel else f"{OUTPUT_PREFIX}/{media_id}/"


def _return_large_buffers_to_the_os() -> None:
    """Serve allocations of 4 MiB and more (the part buffers) with mmap, always.

    glibc raises its mmap threshold each time such a block is freed, after
    which part-sized buffers come from the heap, and the heap's free space is
    not returned to the OS: every upload would leave the process tens of MiB
    larger. Fixed at 4 MiB, the part buffers go back to the OS when a stream
    ends, while 1 MiB messages are still recycled in the heap (no page faults
    per message). Other allocators and platforms: nothing to do.
    """
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 4 * 1024 * 1024)  # M_MMAP_THRESHOLD
        # Keep up to 16 MiB free at the top of the heap: the 1 MiB messages of a
        # stream reuse it instead of faulting fresh pages in for every message.
        libc.mallopt(-1, 16 * 1024 * 1024)  # M_TRIM_THRESHOLD


class MediaCore:
    """One per process (``for_runtime``): shared by the servicer, the edge and the worker."""

    def __init__(self, rt: Runtime) -> None:
        _return_large_buffers_to_the_os()
        self.rt = rt
        self.settings = MediaSettings()
        self.queue = transcode_queue(rt.redis)
        self._url_key = hmac.new(rt.config.secret(), b"media-playback-urls", hashlib.sha256).digest()
        # upload id -> (committed offset, sha256 state at that offset): see the module docstring.
        self._hashers: OrderedDict[int, tuple[int, Any]] = OrderedDict()
        self._max_hashers = 10_000

    @classmethod
    def for_runtime(cls, rt: Runtime) -> MediaCore:
        return rt.singleton("media.core", lambda: cls(rt))

    # -- playback URLs ------------------------------------------------------------

    def url_signature(self, media_id: int) -> str:
        """The capability in a media's playback path: unguessable, stable, no lookup to check.

        Playback URLs are "unlisted links": whoever holds one may play the
        media (players and CDNs send no bearer token), and ids alone get nothing.
        """
        return hmac.new(self._url_key, str(media_id).encode(), hashlib.sha256).hexdigest()[:24]

    def check_signature(self, media_id: int, signature: str) -> bool:
        return hmac.compare_digest(self.url_signature(media_id), signature)

    def playback_base(self, media_id: int) -> str:
        base = self.settings.cdn_base_url or self.rt.config.edge_base_url
        return f"{base}/media/{media_id}/{self.url_signature(media_id)}"

    # -- rows -----------------------------------------------------------------------

    async def get_row(self, media_id: int) -> dict[str, Any] | None:
        return await self.rt.tables.get(MEDIA, {"media_id": media_id})

    async def get_owned(self, media_id: int, owner_id: int) -> dict[str, Any]:
        row = await self.get_row(media_id)
        if row is None or row["owner_id"] != owner_id:
            raise NotFound(f"no media {media_id}", reason="MEDIA_NOT_FOUND")
        return row

    async def update(self, media_id: int, **cols: Any) -> bool:
        """Upsert columns of an existing row; False (and nothing written) when it is gone.

        The read first keeps a late progress update from resurrecting a
        deleted item as a partial row.
        """
        if await self.get_row(media_id) is None:
            return False
        await self.rt.tables.put(MEDIA, {"media_id": media_id, "update_ms": _now_ms(), **cols})
        await self.publish(media_id)
        return True

    async def publish(self, media_id: int) -> None:
        with contextlib.suppress(Exception):
            await publish(self.rt.redis, _events_channel(media_id), b"1")

    # -- CreateUpload ---------------------------------------------------------------

    async def create_upload(self, owner_id: int, filename: str, content_type: str, size: int,
                            sha256: str) -> dict[str, Any]:
        # The contract (media.proto) has checked the shape of every field: a
        # name without separators, a supported type, a positive size, 64 hex
        # digits. What is left depends on this deployment's settings.
        v = Violations()
        if not filename.isprintable():
            v.add("filename", "must be printable characters")
        ct = content_type.strip().lower()
        if size > self.settings.max_bytes:
            v.add("size_bytes", f"must be at most {self.settings.max_bytes} bytes")
        elif size > self.settings.part_bytes * self.rt.blobs.max_parts:
            v.add("size_bytes", "is larger than the staging area can hold in one upload")
        sha = sha256.strip().lower()
        v.raise_if_any()

        media_id = self.rt.snowflake.next_id()
        async with self._user_lock(owner_id):
            used = await self.usage(owner_id)
            if used + size > self.settings.quota_bytes:
                raise QuotaExceeded(owner_id, used, size, self.settings.quota_bytes)
            staging_key = f"{STAGING_PREFIX}/{media_id}"
            upload_id = await self.rt.blobs.create_multipart(staging_key, content_type=ct)
            now = _now_ms()
            row = {
                "media_id": media_id, "owner_id": owner_id, "filename": filename, "content_type": ct,
                "kind": probing.CONTENT_TYPES[ct][0], "state": UPLOADING, "percent": 0,
                "failure_reason": "", "last_error": "", "size_bytes": size, "sha256": sha,
                "committed_bytes": 0, "staging_key": staging_key, "staging_upload_id": upload_id,
                "parts": "[]", "probe": "", "renditions": "", "attempts": 0, "create_ms": now,
                "update_ms": now, "processing_ms": 0,
            }
            try:
                await self.rt.tables.put(MEDIA, row, if_not_exists=True)
                await self.rt.tables.put(MEDIA_BY_OWNER, {"owner_id": owner_id, "media_id": media_id,
                                                          "size_bytes": size, "create_ms": now})
            except BaseException:
                with contextlib.suppress(Exception):
                    await self.rt.blobs.abort_multipart(staging_key, upload_id)
                await self.rt.tables.delete(MEDIA, {"media_id": media_id})
                raise
        await self.rt.redis.zadd(PENDING_UPLOADS, {str(media_id): now / 1000 + self.settings.upload_ttl_seconds})
        self._hashers[media_id] = (0, hashlib.sha256())
        self._trim_hashers()
        await self.sweep_expired_uploads()
        return row

    async def sweep_expired_uploads(self) -> int:
        """Discard uploads nobody wrote to for SYSDESIGN_MEDIA_UPLOAD_TTL_SECONDS.

        Abandoned uploads would hold staging bytes and quota forever (like the
        one-week limit of a resumable upload session on GCS or YouTube). Each
        CreateUpload sweeps a few expired entries of a sorted set ordered by
        expiry: no background scan, no cross-partition query. An upload that
        was written to since it was listed gets a new expiry instead.
        """
        now = time.time()
        ids = await self.rt.redis.zrangebyscore(PENDING_UPLOADS, "-inf", now, start=0, num=SWEEP_BATCH)
        swept = 0
        for raw in ids:
            media_id = int(raw)
            row = await self.get_row(media_id)
            if row is not None and row["state"] == UPLOADING:
                idle_until = (row["update_ms"] or 0) / 1000 + self.settings.upload_ttl_seconds
                if idle_until > now:
                    await self.rt.redis.zadd(PENDING_UPLOADS, {str(media_id): idle_until})
                    continue
                lock = f"{{mu:{media_id}}}:lock"
                if await self.rt.redis.set(lock, "sweep", nx=True, px=LOCK_TTL_MS):
                    try:
                        await self._discard(row)
                    finally:
                        await self.rt.redis.delete(lock)
                    swept += 1
                    log.info("media_upload_expired", media_id=media_id)
                    continue
            if row is None or row["state"] != UPLOADING:
                await self.rt.redis.zrem(PENDING_UPLOADS, str(media_id))
        return swept

    async def usage(self, owner_id: int) -> int:
        """Bytes the user holds: every item's declared size (uploads in progress included)."""
        total, token = 0, ""
        while True:
            page = await self.rt.tables.slice(MEDIA_BY_OWNER, {"owner_id": owner_id}, limit=1000,
                                              page_token=token)
            total += sum(int(r["size_bytes"] or 0) for r in page.rows)
            token = page.next_page_token
            if not token:
                return total

    @contextlib.asynccontextmanager
    async def _user_lock(self, owner_id: int) -> AsyncIterator[None]:
        """Serialises quota checks of one user (check-then-insert would race otherwise)."""
        key = f"{{mq:{owner_id}}}:lock"
        token = secrets.token_hex(8)
        deadline = time.monotonic() + 10
        while not await self.rt.redis.set(key, token, nx=True, px=10_000):
            if time.monotonic() > deadline:
                raise UploadBusy(owner_id)
            await asyncio.sleep(0.02)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                await self.rt.redis.eval(_UNLOCK, 1, key, token)

    # -- Upload -----------------------------------------------------------------------

    async def upload(self, owner_id: int, requests: AsyncIterator[Any],
                     time_remaining: float | None) -> dict[str, Any]:
        """Consume one Upload stream; returns the media row afterwards (see the module docstring)."""
        started = time.monotonic()
        budget = min(time_remaining if time_remaining is not None else DEFAULT_DEADLINE_SECONDS,
                     DEFAULT_DEADLINE_SECONDS) - STREAM_MARGIN_SECONDS
        budget = max(budget, 1.0)
        first = await _next(requests)
        if first is None:
            raise InvalidArgument([("upload_id", "the stream carried no message")])
        if not hasattr(first, "upload_id"):
            raise InvalidArgument([("upload_id", "the message could not be decoded")])
        media_id = parse_media_id(first.upload_id, "upload_id")
        row = await self.get_owned(media_id, owner_id)
        if row["state"] != UPLOADING:
            if first.offset == row["size_bytes"] and not first.data:
                return row  # a repeated final call: already complete
            raise FailedPrecondition(f"upload {media_id} is complete", reason="UPLOAD_COMPLETE",
                                     subject=f"uploads/{media_id}")
        lock_key = f"{{mu:{media_id}}}:lock"
        lock_token = secrets.token_hex(8)
        if not await self.rt.redis.set(lock_key, lock_token, nx=True, px=LOCK_TTL_MS):
            raise UploadBusy(media_id)
        try:
            row = await self.get_owned(media_id, owner_id)  # fresh, now that we hold the lock
            if row["state"] != UPLOADING:
                return row
            w = _Writer(self, row, lock_key, lock_token)
            try:
                msg = first
                while True:
                    await w.accept(msg)
                    if w.expected == w.size or time.monotonic() - started > budget:
                        break
                    msg = await _next(requests)
                    if msg is None:
                        break
                await w.end_of_stream()
            except BaseException:
                await asyncio.shield(w.abandon())
                raise
            if w.committed == w.size:
                # Once every byte is in, verification finishes even if the client goes away.
                return await asyncio.shield(self._finalize(w))
            return await self.get_owned(media_id, owner_id)
        finally:
            with contextlib.suppress(Exception):
                await self.rt.redis.eval(_UNLOCK, 1, lock_key, lock_token)

    def _take_hasher(self, media_id: int, committed: int) -> Any | None:
        entry = self._hashers.pop(media_id, None)
        if entry is not None and entry[0] == committed:
            return entry[1]
        return None

    def _keep_hasher(self, media_id: int, committed: int, hasher: Any | None) -> None:
        if hasher is not None:
            self._hashers[media_id] = (committed, hasher)
            self._hashers.move_to_end(media_id)
            self._trim_hashers()

    def _trim_hashers(self) -> None:
        while len(self._hashers) > self._max_hashers:
            self._hashers.popitem(last=False)

    async def _finalize(self, w: _Writer) -> dict[str, Any]:
        row = w.row
        media_id, key = row["media_id"], row["staging_key"]
        self._hashers.pop(media_id, None)
        if w.hasher is not None and w.hasher.hexdigest() != row["sha256"]:
            await self._refuse(row, "sha256", f"does not match the uploaded bytes "
                                              f"(they hash to {w.hasher.hexdigest()})")
        try:
            await self.rt.blobs.complete_multipart(key, row["staging_upload_id"], w.parts)
        except BlobNotFound:
            # Assembled by an earlier finalize that was interrupted; or deleted meanwhile.
            try:
                attrs = await self.rt.blobs.attributes(key)
            except BlobNotFound:
                raise NotFound(f"no media {media_id}", reason="MEDIA_NOT_FOUND") from None
            if attrs.size != row["size_bytes"]:
                await self._refuse(row, "size_bytes", f"the staged file holds {attrs.size} bytes")
            w.hasher = None
        if w.hasher is None:  # resumed in another process: read the staged bytes back once
            h = hashlib.sha256()
            async for chunk in self.rt.blobs.iter_range(key, chunk_size=4 << 20):
                await asyncio.to_thread(h.update, chunk)
            if h.hexdigest() != row["sha256"]:
                await self._refuse(row, "sha256", f"does not match the uploaded bytes "
                                                  f"(they hash to {h.hexdigest()})")
        source = await self.source_url(key)
        try:
            info = await probing.probe(source)
        except probing.ProbeError as exc:
            # ffmpeg's own words name server paths: they go to the log, the client gets ours.
            log.warning("media_probe_failed", media_id=media_id, request_id=current_request_id(),
                        reason=str(exc), ffmpeg_output=exc.tool_output)
            await self._refuse(row, "data", f"is not a video or image we can decode: {exc}")
        mismatch = probing.check_declared(row["content_type"], info)
        if mismatch:
            await self._refuse(row, "content_type", mismatch)
        probe_json = json.dumps({"demuxer": info.demuxer, "family": info.family, "kind": info.kind,
                                 "width": info.width, "height": info.height,
                                 "video_codec": info.video_codec, "duration_s": info.duration_s,
                                 "fps": info.fps, "has_audio": info.has_audio})
        if not await self.update(media_id, state=PROCESSING, percent=0, committed_bytes=row["size_bytes"],
                                 probe=probe_json, kind=info.kind, staging_upload_id=""):
            raise NotFound(f"no media {media_id}", reason="MEDIA_NOT_FOUND")
        await self.queue.enqueue({"media_id": str(media_id)})
        await self.rt.redis.zrem(PENDING_UPLOADS, str(media_id))
        log.info("media_uploaded", media_id=media_id, kind=info.kind, size=row["size_bytes"],
                 width=info.width, height=info.height, duration_s=info.duration_s)
        return await self.get_row(media_id) or row

    async def source_url(self, key: str) -> str:
        """What ffmpeg opens: the staged file in place, or a presigned URL to it."""
        path = self.rt.blobs.local_path(key)
        if path is not None:
            return str(path)
        url = await self.rt.blobs.presigned_get_url(key, expires_seconds=max(self.settings.presign_seconds, 3600))
        if url is None:
            raise RuntimeError("the blob backend can neither hand out a file nor a URL")
        return url

    async def _refuse(self, row: dict[str, Any], field: str, description: str) -> None:
        """Remove everything the upload stored, then answer INVALID_ARGUMENT."""
        await self._discard(row)
        log.info("media_refused", media_id=row["media_id"], field=field, reason=description)
        raise InvalidArgument([(field, description)])

    async def _discard(self, row: dict[str, Any]) -> None:
        media_id, key = row["media_id"], row["staging_key"]
        self._hashers.pop(media_id, None)
        if row.get("staging_upload_id"):
            await self.rt.blobs.abort_multipart(key, row["staging_upload_id"])
        await self.rt.blobs.delete(key)
        await self.rt.tables.delete(MEDIA, {"media_id": media_id})
        await self.rt.tables.delete(MEDIA_BY_OWNER, {"owner_id": row["owner_id"], "media_id": media_id})
        await self.rt.redis.zrem(PENDING_UPLOADS, str(media_id))
        await self.publish(media_id)

    # -- reads, delete ------------------------------------------------------------------

    async def list(self, owner_id: int, page_size: int, page_token: str) -> tuple[list[dict[str, Any]], str]:
        v = Violations()
        if page_size < 0 or page_size > 100:
            v.add("page_size", "must be between 0 and 100")
        v.raise_if_any()
        try:
            page = await self.rt.tables.slice(MEDIA_BY_OWNER, {"owner_id": owner_id},
                                              limit=page_size or 20, page_token=page_token)
        except InvalidPageToken:
            raise InvalidArgument([("page_token", "is not a token of this list")]) from None
        rows = await asyncio.gather(*(self.get_row(r["media_id"]) for r in page.rows))
        return [r for r in rows if r is not None], page.next_page_token

    async def delete(self, media_id: int, owner_id: int) -> None:
        row = await self.get_owned(media_id, owner_id)
        await self._discard(row)
        await self.rt.blobs.delete_prefix(output_key(media_id))
        edge_cache = self.rt.shared.get("media.edge_cache")
        if edge_cache is not None:
            edge_cache.drop_prefix(output_key(media_id))

    async def watch(self, media_id: int, owner_id: int) -> AsyncIterator[dict[str, Any]]:
        """The row now and after every change until READY or FAILED.

        Changes are announced on a Redis pub/sub channel; a poll every 2 s
        covers a missed message (pub/sub is fire-and-forget).
        """
        row = await self.get_owned(media_id, owner_id)
        sub = Subscription(self.rt.redis, _events_channel(media_id))
        await sub.start()
        try:
            last: tuple[Any, ...] | None = None
            while True:
                sig = (row["state"], row["percent"], row["failure_reason"], row["committed_bytes"])
                if sig != last:
                    last = sig
                    yield row
                if row["state"] in TERMINAL:
                    return
                with contextlib.suppress(TimeoutError):
                    await sub.get(2.0)
                fresh = await self.get_row(media_id)
                if fresh is None:
                    raise NotFound(f"media {media_id} was deleted", reason="MEDIA_NOT_FOUND")
                row = fresh
        finally:
            with contextlib.suppress(Exception):
                await sub.aclose()


class _Writer:
    """The state of one Upload stream: the part being filled and the parts being written.

    Writing overlaps with receiving: while one part buffer fills, up to
    ``PARTS_IN_FLIGHT`` earlier parts are being written (blob ``upload_part``
    in threads: a filesystem part is a ``pwrite`` + ``fdatasync``, an S3 part
    a PUT) and hashed (one SHA-256 chain, strictly in order, in a thread). The
    stream then runs at the speed of the slower of the network and the
    backend, not of their sum. Parts complete in order, so the committed
    offset always ends a prefix of the file; the part buffers (in-flight + 1)
    are allocated once per stream and reused.
    """

    def __init__(self, core: MediaCore, row: dict[str, Any], lock_key: str, lock_token: str) -> None:
        self.core = core
        self.row = row
        self.media_id = int(row["media_id"])
        self.size = int(row["size_bytes"])
        self.committed = int(row["committed_bytes"] or 0)
        self.expected = self.committed
        self.parts = [UploadPart(*p) for p in json.loads(row["parts"] or "[]")]
        self.part_bytes = core.settings.part_bytes
        self.buffers = [bytearray(self.part_bytes) for _ in range(PARTS_IN_FLIGHT + 1)]
        self.filling = 0
        self.buffered = 0
        self.next_number = len(self.parts) + 1
        self.next_offset = self.committed
        # (upload task, hash task of the same part) in part order.
        self.inflight: deque[tuple[asyncio.Task[UploadPart], asyncio.Task[None] | None]] = deque()
        self.last_hash: asyncio.Task[None] | None = None
        self.min_part = core.rt.blobs.min_part_size
        self.hasher = core._take_hasher(self.media_id, self.committed)
        self.lock_key, self.lock_token = lock_key, lock_token
        self.recorded = self.committed
        self.recorded_at = time.monotonic()
        if self.hasher is None:
            log.info("upload_hash_state_lost", media_id=self.media_id, committed=self.committed)

    async def accept(self, msg: Any) -> None:
        if not hasattr(msg, "data"):  # the platform's stand-in for an undecodable message
            raise InvalidArgument([("data", "the message could not be decoded")])
        if msg.upload_id and msg.upload_id != str(self.media_id):
            raise InvalidArgument([("upload_id", "must be the same in every message of a stream")])
        if msg.offset != self.expected:
            await self._drain()
            raise OffsetMismatch(self.media_id, msg.offset, self.expected, self.committed)
        data = memoryview(msg.data)  # slices below copy nothing
        n = len(data)
        if n > MAX_CHUNK_BYTES:
            raise InvalidArgument([("data", f"must be at most {MAX_CHUNK_BYTES} bytes per message")])
        if self.expected + n > self.size:
            raise InvalidArgument([("data", f"goes past the declared size of {self.size} bytes "
                                            f"(offset {msg.offset} + {n} bytes)")])
        pos = 0
        while pos < n:  # copy into the part buffer, starting a part each time one is full
            take = min(n - pos, self.part_bytes - self.buffered)
            self.buffers[self.filling][self.buffered:self.buffered + take] = data[pos:pos + take]
            self.buffered += take
            self.expected += take
            pos += take
            if self.buffered == self.part_bytes:
                await self._start_part()
        if self.expected == self.size and self.buffered:
            await self._start_part()

    async def end_of_stream(self) -> None:
        """Store what is buffered when the backend accepts a part that small; drop it otherwise."""
        if self.buffered and self.buffered >= self.min_part:
            await self._start_part()
        await self._drain()
        await self.record()
        self._drop_buffer()
        self.core._keep_hasher(self.media_id, self.committed, self.hasher)

    async def abandon(self) -> None:
        """The stream failed: finish the parts in flight, drop the rest, keep the hash if exact."""
        with contextlib.suppress(Exception):
            await self._drain()
        try:
            await self.record()
        except Exception:
            self.hasher = None  # the row may lag behind it: rebuild from staging later
        self._drop_buffer()
        self.core._keep_hasher(self.media_id, self.committed, self.hasher)

    def _drop_buffer(self) -> None:
        self.buffered = 0
        self.expected = self.committed

    async def _drain(self) -> None:
        while self.inflight:
            await self._complete_oldest()

    async def _start_part(self) -> None:
        """Hand the filled buffer to an upload task (and the hash chain); fill the next one."""
        while len(self.inflight) >= PARTS_IN_FLIGHT:
            await self._complete_oldest()  # frees the buffer filled next
        data = memoryview(self.buffers[self.filling])[: self.buffered]
        number, offset = self.next_number, self.next_offset
        self.next_number += 1
        self.next_offset += len(data)
        hashing = None
        if self.hasher is not None:
            hashing = self.last_hash = asyncio.create_task(self._hash(self.hasher, self.last_hash, data))
        self.inflight.append((asyncio.create_task(self._upload(number, offset, data)), hashing))
        self.filling = (self.filling + 1) % len(self.buffers)
        self.buffered = 0

    @staticmethod
    async def _hash(hasher: Any, previous: asyncio.Task[None] | None, data: memoryview) -> None:
        if previous is not None:
            await previous
        await asyncio.to_thread(hasher.update, data)

    async def _upload(self, number: int, offset: int, data: memoryview) -> UploadPart:
        try:
            return await self.core.rt.blobs.upload_part(
                self.row["staging_key"], self.row["staging_upload_id"], number, offset, data)
        except UploadNotFound:
            raise NotFound(f"no media {self.media_id} (deleted while uploading)",
                           reason="MEDIA_NOT_FOUND") from None

    async def _complete_oldest(self) -> None:
        upload, hashing = self.inflight.popleft()
        try:
            part = await upload
            if hashing is not None:
                await hashing
        except BaseException:
            # The hash may have consumed bytes that will not be committed; the parts
            # after this one cannot count either. Let them finish, then give up.
            self.hasher = None
            rest = [t for pair in self.inflight for t in pair if t is not None]
            self.inflight.clear()
            await asyncio.gather(*rest, return_exceptions=True)
            self.next_number, self.next_offset = len(self.parts) + 1, self.committed
            raise
        self.parts.append(part)
        self.committed += part.size
        if time.monotonic() - self.recorded_at >= RECORD_EVERY_SECONDS:
            await self.record()

    async def record(self) -> None:
        """Write the committed offset and the part list to the row (and tell watchers).

        Done about once a second while a stream runs and always before the
        stream answers, not after every part: a row that lags behind the parts
        on the backend after a crash only makes the client resend those parts
        (the same part numbers at the same offsets, which replaces them), and
        the per-part row write would cost a table commit every 8 MiB.
        """
        if self.recorded == self.committed:
            return
        await self.core.rt.tables.put(MEDIA, {
            "media_id": self.media_id, "committed_bytes": self.committed, "update_ms": _now_ms(),
            "parts": json.dumps([[p.part_number, p.offset, p.size, p.etag] for p in self.parts]),
        })
        self.recorded, self.recorded_at = self.committed, time.monotonic()
        await self.core.rt.redis.eval(_EXTEND, 1, self.lock_key, self.lock_token, LOCK_TTL_MS)
        await self.core.publish(self.media_id)


async def _next(requests: AsyncIterator[Any]) -> Any | None:
    try:
        return await requests.__anext__()
    except StopAsyncIteration:
        return None


def _events_channel(media_id: int) -> str:
    return f"{{m:{media_id}}}:events"


def _now_ms() -> int:
    return int(time.time() * 1000)
