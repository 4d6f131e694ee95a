"""Attachments: bytes in the blob port, metadata in the table, signed URLs on the edge.

Upload (client-streaming ``UploadAttachment``): a metadata message (conversation,
file name, content type, exact size ≤ 10 MiB), then chunks of ≤ 1 MiB. The
uploader must be a member. The bytes go to the blob store under
``chat/<conversation>/<attachment>`` first and the metadata row second, so a
row never points at missing bytes. A message then carries the attachment's
id; the message row holds only the id, name, type and size, never the bytes.

Download: ``GetAttachmentUrl`` checks membership and returns
``<edge>/chat/attachments/<conversation>/<attachment>?exp=<unix s>&sig=<hex>``
where ``sig`` is an HMAC-SHA256 over the path and expiry with a key derived
from the deployment's token secret. The edge checks the signature and the
expiry, then streams the blob: no token needed (an ``<img src>`` works), the
URL stops working after ``URL_TTL_S``, and only a member could mint it.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

from aiohttp import web

from servers.chat import validation as val
from servers.chat.core import ChatCore
from servers.chat.tables import ATTACHMENTS
from servers.platform.errors import InvalidArgument, Violations
from servers.platform.runtime import Runtime
from servers.storage.blob import BlobNotFound

URL_TTL_S = 300
ROUTE_PREFIX = "/chat/attachments"
_INLINE_TYPES = ("image/", "video/", "audio/")


class Attachments:
    def __init__(self, rt: Runtime, core: ChatCore) -> None:
        self.rt = rt
        self.core = core
        self._key = hmac.new(rt.config.secret(), b"sysdesign chat attachment urls",
                             hashlib.sha256).digest()

    @classmethod
    def for_runtime(cls, rt: Runtime) -> Attachments:
        return rt.singleton("chat.attachments", lambda: cls(rt, ChatCore.for_runtime(rt)))

    # ------------------------------------------------------------------ upload

    async def upload(self, uploader_id: int, parts: AsyncIterator[Any]) -> dict[str, Any]:
        it = parts.__aiter__()
        try:
            first = await it.__anext__()
        except StopAsyncIteration:
            raise InvalidArgument([("metadata", "the first message must carry the metadata")]) \
                from None
        if not hasattr(first, "WhichOneof") or first.WhichOneof("part") != "metadata":
            raise InvalidArgument([("metadata", "the first message must carry the metadata")])
        md = first.metadata
        v = Violations()
        cid = val.parse_id(md.conversation_id, v, "metadata.conversation_id")
        val.check_filename(md.filename, v, "metadata.filename")
        ctype = md.content_type or "application/octet-stream"
        if not val.CONTENT_TYPE_RE.match(ctype):
            v.add("metadata.content_type", "must be a MIME type such as image/png")
        if md.size_bytes <= 0 or md.size_bytes > val.MAX_ATTACHMENT_BYTES:
            v.add("metadata.size_bytes", f"must be between 1 and {val.MAX_ATTACHMENT_BYTES} bytes")
        v.raise_if_any()
        await self.core.conversation(cid)
        await self.core.require_member(cid, uploader_id)
        chunks: list[bytes] = []
        size = 0
        async for part in it:
            if not hasattr(part, "WhichOneof") or part.WhichOneof("part") != "chunk":
                raise InvalidArgument([("chunk", "every message after the first must be a chunk")])
            if len(part.chunk) > val.MAX_CHUNK_BYTES:
                raise InvalidArgument([("chunk", f"must be at most {val.MAX_CHUNK_BYTES} bytes")])
            size += len(part.chunk)
            if size > md.size_bytes:
                raise InvalidArgument([("chunk", f"more bytes than metadata.size_bytes "
                                                 f"({md.size_bytes})")])
            chunks.append(part.chunk)
        if size != md.size_bytes:
            raise InvalidArgument([("chunk", f"received {size} bytes, metadata.size_bytes says "
                                             f"{md.size_bytes}")])
        aid = self.rt.snowflake.next_id()
        blob_key = f"chat/{cid}/{aid}"
        attrs = await self.rt.blobs.put(blob_key, b"".join(chunks), content_type=ctype)
        row = {"conversation_id": cid, "attachment_id": aid, "uploader_id": uploader_id,
               "filename": md.filename, "content_type": ctype, "size_bytes": size,
               "blob_key": blob_key, "etag": attrs.etag, "create_ms": int(time.time() * 1000)}
        try:
            await self.rt.tables.put(ATTACHMENTS, row)
        except BaseException:
            await self.rt.blobs.delete(blob_key)
            raise
        return row

    # ------------------------------------------------------------- signed URLs

    def _sig(self, cid: int, aid: int, exp: int) -> str:
        return hmac.new(self._key, f"{cid}/{aid}/{exp}".encode(), hashlib.sha256).hexdigest()

    async def url(self, caller_id: int, conversation: str, attachment: str) -> tuple[str, int]:
        v = Violations()
        cid = val.parse_id(conversation, v, "conversation_id")
        aid = val.parse_id(attachment, v, "attachment_id")
        v.raise_if_any()
        await self.core.conversation(cid)
        await self.core.require_member(cid, caller_id)
        row = await self.rt.tables.get(ATTACHMENTS, {"conversation_id": cid, "attachment_id": aid})
        if row is None:
            from servers.platform.errors import NotFound

            raise NotFound(f"no attachment {aid} in conversation {cid}",
                           reason="ATTACHMENT_NOT_FOUND")
        exp = int(time.time()) + URL_TTL_S
        base = self.rt.config.edge_base_url
        return f"{base}{ROUTE_PREFIX}/{cid}/{aid}?exp={exp}&sig={self._sig(cid, aid, exp)}", exp

    def verify(self, cid: int, aid: int, exp: int, sig: str) -> bool:
        return exp >= time.time() and hmac.compare_digest(self._sig(cid, aid, exp), sig)


def edge_routes(app: web.Application, rt: Runtime) -> None:
    """GET /chat/attachments/{conversation}/{attachment}?exp=&sig= on the HTTP edge."""
    atts = Attachments.for_runtime(rt)

    def refuse(status: int, text: str) -> web.Response:
        return web.Response(status=status, text=text + "\n",
                            headers={"Cache-Control": "no-store"})

    async def download(request: web.Request) -> web.StreamResponse:
        try:
            cid = int(request.match_info["cid"])
            aid = int(request.match_info["aid"])
            exp = int(request.query.get("exp", ""))
        except ValueError:
            return refuse(404, "not found")
        if not atts.verify(cid, aid, exp, request.query.get("sig", "")):
            return refuse(403, "this link is invalid or has expired; ask the app for a new one")
        row = await rt.tables.get(ATTACHMENTS, {"conversation_id": cid, "attachment_id": aid})
        if row is None:
            return refuse(404, "not found")
        try:
            body = b"" if request.method == "HEAD" else await rt.blobs.get(row["blob_key"])
        except BlobNotFound:
            return refuse(404, "not found")
        ctype = row["content_type"]
        disposition = "inline" if ctype.startswith(_INLINE_TYPES) else "attachment"
        headers = {
            "Content-Disposition": f"{disposition}; filename*=UTF-8''{quote(row['filename'])}",
            "Cache-Control": f"private, max-age={max(0, exp - int(time.time()))}",
            "ETag": f'"{row["etag"]}"',
            "X-Content-Type-Options": "nosniff",
        }
        resp = web.Response(status=200, body=body, headers=headers, content_type=ctype)
        if request.method == "HEAD":
            resp.headers["Content-Length"] = str(row["size_bytes"])
        return resp

    app.router.add_get(ROUTE_PREFIX + "/{cid}/{aid}", download)
