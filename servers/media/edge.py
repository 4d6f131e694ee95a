"""Media bytes on the HTTP edge: the CDN edge of the case study.

    GET|HEAD /media/{media_id}/{signature}/{path}

serves ``media/<id>/<path>`` from the blob port: ``master.m3u8``,
``<rung>/index.m3u8``, ``<rung>/seg_NNNNN.ts``, ``poster.jpg``, ``wNNN.webp``.

- **Capability URLs.** ``signature`` is an HMAC of the id under the
  deployment's secret (``MediaCore.url_signature``): a player needs no token
  (browsers, ffplay, VLC and CDNs send none), and an id alone reaches nothing.
  Playlists name their segments relatively, so the signature carries over.
- **HTTP caching.** Right MIME types; a strong ``ETag`` (the blob's) with
  ``304`` on ``If-None-Match``; single ``Range`` requests answered ``206``
  (``416`` when unsatisfiable); segments, posters and images are immutable
  (``Cache-Control: public, max-age=31536000, immutable``: a rerun of a job
  writes the same names with equivalent bytes), playlists get a short
  ``max-age`` so a CDN revalidates them.
- **In-process LRU.** Objects up to 8 MiB are kept whole in a byte-bounded LRU
  (``SYSDESIGN_MEDIA_EDGE_CACHE_BYTES``), so a popular segment costs one blob
  read per edge process; ``X-Cache: HIT|MISS`` says which. Entries expire (a
  minute for playlists, an hour for the rest) so a deleted item stops being
  served everywhere soon after; the deleting process drops its entries at once.
  Bigger objects are streamed from the blob port in 1 MiB chunks.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

from aiohttp import web

from servers.media.core import MediaCore
from servers.media.worker import content_type_of
from servers.platform.metrics import CACHE_LOOKUPS, HTTP_REQUESTS
from servers.platform.runtime import Runtime
from servers.storage.blob import BlobNotFound, InvalidBlobKey, check_key

MAX_ENTRY_BYTES = 8 * 1024 * 1024
IMMUTABLE = "public, max-age=31536000, immutable"
PLAYLIST_CACHE = "public, max-age=10"
PLAYLIST_TTL_SECONDS = 60.0
OBJECT_TTL_SECONDS = 3600.0
_ID_RE = re.compile(r"^[0-9]{1,19}$")
_PATH_RE = re.compile(r"^[A-Za-z0-9_]+(/[A-Za-z0-9_]+)?\.(m3u8|ts|m4s|mp4|jpg|webp)$")
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass
class Entry:
    body: bytes
    etag: str
    last_modified: float
    expires: float


class ByteLRU:
    """An LRU bounded by the bytes it holds."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.size = 0
        self._items: OrderedDict[str, Entry] = OrderedDict()

    def get(self, key: str) -> Entry | None:
        e = self._items.get(key)
        if e is None:
            return None
        if e.expires < time.monotonic():
            self.pop(key)
            return None
        self._items.move_to_end(key)
        return e

    def put(self, key: str, entry: Entry) -> None:
        if len(entry.body) > self.capacity:
            return
        self.pop(key)
        self._items[key] = entry
        self.size += len(entry.body)
        while self.size > self.capacity:
            _, old = self._items.popitem(last=False)
            self.size -= len(old.body)

    def pop(self, key: str) -> None:
        e = self._items.pop(key, None)
        if e is not None:
            self.size -= len(e.body)

    def drop_prefix(self, prefix: str) -> None:
        for k in [k for k in self._items if k.startswith(prefix)]:
            self.pop(k)


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """[start, end] (inclusive) of a single-range header; None when unsatisfiable.

    Raises ValueError for a header that is not a single byte range (then the
    whole object is served, as RFC 9110 allows).
    """
    m = _RANGE_RE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        raise ValueError(header)
    if not m.group(1):  # suffix: the last n bytes
        n = int(m.group(2))
        if n == 0:
            return None
        return max(0, size - n), size - 1
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) else size - 1
    if start >= size or end < start:
        return None
    return start, min(end, size - 1)


def edge_cache(rt: Runtime) -> ByteLRU:
    return rt.singleton("media.edge_cache", lambda: ByteLRU(MediaCore.for_runtime(rt).settings.edge_cache_bytes))


def add_routes(app: web.Application, rt: Runtime) -> None:
    core = MediaCore.for_runtime(rt)
    cache = edge_cache(rt)

    def not_found() -> web.Response:
        HTTP_REQUESTS.labels("media", "404").inc()
        return web.Response(status=404, text="not found\n", headers={"Cache-Control": "no-store"})

    async def serve(request: web.Request) -> web.StreamResponse:
        mid, sig, path = (request.match_info[k] for k in ("media_id", "signature", "path"))
        if not _ID_RE.match(mid) or not _PATH_RE.match(path) or not core.check_signature(int(mid), sig):
            return not_found()
        key = f"media/{mid}/{path}"
        try:
            check_key(key)
        except InvalidBlobKey:
            return not_found()
        playlist = path.endswith(".m3u8")
        entry = cache.get(key)
        hit = entry is not None
        size: int
        if entry is None:
            try:
                attrs = await rt.blobs.attributes(key)
            except BlobNotFound:
                return not_found()
            size, etag, modified = attrs.size, attrs.etag, attrs.last_modified
            if size <= MAX_ENTRY_BYTES and request.method != "HEAD":
                try:
                    body = await rt.blobs.get(key)
                except BlobNotFound:
                    return not_found()
                ttl = PLAYLIST_TTL_SECONDS if playlist else OBJECT_TTL_SECONDS
                entry = Entry(body, etag, modified, time.monotonic() + ttl)
                cache.put(key, entry)
        else:
            size, etag, modified = len(entry.body), entry.etag, entry.last_modified
        CACHE_LOOKUPS.labels("media_edge", "hit" if hit else "miss").inc()
        headers = {
            "ETag": f'"{etag}"',
            "Last-Modified": formatdate(modified, usegmt=True),
            "Cache-Control": PLAYLIST_CACHE if playlist else IMMUTABLE,
            "Accept-Ranges": "bytes",
            "X-Cache": "HIT" if hit else "MISS",
            "Access-Control-Allow-Origin": "*",
            "X-Content-Type-Options": "nosniff",
        }
        ctype = content_type_of(path)
        inm = request.headers.get("If-None-Match", "")
        if inm and (inm.strip() == "*" or headers["ETag"] in [t.strip() for t in inm.split(",")]):
            HTTP_REQUESTS.labels("media", "304").inc()
            return web.Response(status=304, headers=headers)
        start, end, status = 0, size - 1, 200
        rng = request.headers.get("Range")
        if rng and size > 0:
            try:
                r = parse_range(rng, size)
            except ValueError:
                r = (0, size - 1)
            if r is None:
                HTTP_REQUESTS.labels("media", "416").inc()
                return web.Response(status=416, headers={**headers, "Content-Range": f"bytes */{size}"})
            start, end = r
            if (start, end) != (0, size - 1):
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        HTTP_REQUESTS.labels("media", str(status)).inc()
        length = end - start + 1 if size else 0
        if request.method == "HEAD":
            resp = web.Response(status=status, headers=headers, content_type=ctype)
            resp.headers["Content-Length"] = str(length)
            return resp
        if entry is not None:
            return web.Response(status=status, body=entry.body[start:end + 1], headers=headers,
                                content_type=ctype)
        stream = web.StreamResponse(status=status, headers=headers)
        stream.content_type = ctype
        stream.content_length = length
        await stream.prepare(request)
        async for chunk in rt.blobs.iter_range(key, start, length):
            await stream.write(chunk)
        await stream.write_eof()
        return stream

    app.router.add_get("/media/{media_id}/{signature}/{path:.+}", serve)  # and HEAD


def forget(rt: Runtime, media_id: int) -> None:
    """Drop a deleted item's entries from this process's cache."""
    edge_cache(rt).drop_prefix(f"media/{media_id}/")


def routes(app: Any, rt: Runtime) -> None:
    """The `System.edge_routes` hook."""
    add_routes(app, rt)
