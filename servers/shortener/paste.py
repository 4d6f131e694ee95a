"""The pastebin's domain logic: text in the blob store, metadata in the table store.

Create writes the blob first and the metadata row second, so a reader never
finds metadata without its text; a failed metadata write removes the blob.
Delete removes the metadata row (the paste is gone at once) and queues the
blob for removal by the blob-gc worker (at-least-once, idempotent).
"""

from __future__ import annotations

import time
from typing import Any

from servers.platform.errors import FailedPrecondition, NotFound, PermissionDenied, Violations
from servers.platform.runtime import Runtime
from servers.shortener import validation as val
from servers.shortener.codes import CodeAllocator
from servers.shortener.tables import PASTES
from servers.storage.blob import BlobNotFound
from servers.storage.queue import Job, JobQueue

BLOB_GC_STREAM = "{q:blobgc}"
BLOB_GC_GROUP = "blobgc"
PASTE_ID_LEN = 8


def blob_gc_queue(redis: Any) -> JobQueue:
    return JobQueue(redis, BLOB_GC_STREAM, BLOB_GC_GROUP, max_attempts=5, claim_idle_ms=30_000)


def check_paste_id(paste_id: str, v: Violations) -> None:
    val.check_code(paste_id, v, field="paste_id")


class PasteCore:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.ids = CodeAllocator(rt.redis, rt.tables, counter="paste", secret=rt.config.secret(),
                                 width=PASTE_ID_LEN)
        self.gc = blob_gc_queue(rt.redis)

    async def create(self, owner_id: int, content: str, *, title: str = "", language: str = "",
                     expire_ms: int | None = None) -> dict[str, Any]:
        v = Violations()
        data = content.encode("utf-8")
        if not data:
            v.add("content", "is required")
        elif len(data) > val.MAX_PASTE_BYTES:
            v.add("content", f"must be at most {val.MAX_PASTE_BYTES} bytes of UTF-8 (got {len(data)})")
        val.check_title(title, v)
        if language and not val.LANGUAGE_RE.match(language):
            v.add("language", "must be 1-32 characters of a-z, 0-9, '+', '#', '.', '-'")
        val.check_future(expire_ms, v, "expire_time")
        v.raise_if_any()
        paste_id = await self.ids.next_code()
        blob_key = f"pastes/{paste_id}"
        attrs = await self.rt.blobs.put(blob_key, data, content_type="text/plain; charset=utf-8")
        row = {
            "paste_id": paste_id,
            "owner_id": owner_id,
            "title": title,
            "language": language,
            "size_bytes": len(data),
            "create_ms": int(time.time() * 1000),
            "expire_ms": expire_ms or 0,
            "blob_key": blob_key,
            "etag": attrs.etag,
        }
        try:
            if not await self.rt.tables.put(PASTES, row, if_not_exists=True):
                raise RuntimeError(f"paste id {paste_id} already in use")
        except BaseException:
            await self.rt.blobs.delete(blob_key)
            raise
        return row

    async def get_meta(self, paste_id: str) -> dict[str, Any]:
        v = Violations()
        check_paste_id(paste_id, v)
        v.raise_if_any()
        row = await self.rt.tables.get(PASTES, {"paste_id": paste_id})
        if row is None:
            raise NotFound(f"no paste {paste_id!r}", reason="PASTE_NOT_FOUND")
        if row["expire_ms"] and row["expire_ms"] <= time.time() * 1000:
            raise FailedPrecondition(f"the paste {paste_id!r} has expired", reason="PASTE_EXPIRED",
                                     subject=f"pastes/{paste_id}")
        return row

    async def get(self, paste_id: str) -> tuple[dict[str, Any], str]:
        row = await self.get_meta(paste_id)
        return row, (await self.read_blob(row)).decode("utf-8")

    async def read_blob(self, row: dict[str, Any]) -> bytes:
        try:
            return await self.rt.blobs.get(row["blob_key"])
        except BlobNotFound as exc:  # deleted between the metadata read and this one
            raise NotFound(f"no paste {row['paste_id']!r}", reason="PASTE_NOT_FOUND") from exc

    async def delete(self, paste_id: str, owner_id: int) -> None:
        v = Violations()
        check_paste_id(paste_id, v)
        v.raise_if_any()
        row = await self.rt.tables.get(PASTES, {"paste_id": paste_id})
        if row is None:
            raise NotFound(f"no paste {paste_id!r}", reason="PASTE_NOT_FOUND")
        if row["owner_id"] != owner_id:
            raise PermissionDenied("this paste belongs to another user", reason="NOT_OWNER")
        await self.rt.tables.delete(PASTES, {"paste_id": paste_id})
        await self.gc.enqueue({"blob_key": row["blob_key"]})


async def handle_blob_gc(rt: Runtime, job: Job) -> None:
    """Idempotent: deleting an absent blob is not an error."""
    key = job.fields["blob_key"]
    await rt.blobs.delete(key.decode() if isinstance(key, bytes) else key)
