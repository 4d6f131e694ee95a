"""sysdesign.shortener.v1: ShortenerService and PasteService servicers.

Thin adapters: they read the caller from the token, turn messages into calls
on ShortenerCore / PasteCore and rows back into messages.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from sysdesign.shortener.v1 import shortener_pb2 as pb
from sysdesign.shortener.v1 import shortener_pb2_grpc as pb_grpc

from servers.platform.auth import require_caller
from servers.platform.errors import InvalidArgument
from servers.platform.runtime import Runtime
from servers.shortener.core import ShortenerCore
from servers.shortener.paste import PasteCore
from servers.shortener.tables import TABLES

SHORTENER_SERVICE = pb.DESCRIPTOR.services_by_name["ShortenerService"].full_name
PASTE_SERVICE = pb.DESCRIPTOR.services_by_name["PasteService"].full_name
PUBLIC_METHODS = {
    f"/{SHORTENER_SERVICE}/ResolveShortUrl",
    f"/{PASTE_SERVICE}/GetPaste",
}


def _ts(ms: int) -> Timestamp | None:
    if not ms:
        return None
    t = Timestamp()
    t.FromMilliseconds(ms)
    return t


_MIN_SECONDS, _MAX_SECONDS = -62135596800, 253402300799  # 0001-01-01 .. 9999-12-31


def _ms(request: Any, field: str) -> int | None:
    if not request.HasField(field):
        return None
    ts = getattr(request, field)
    if not (_MIN_SECONDS <= ts.seconds <= _MAX_SECONDS and 0 <= ts.nanos < 1_000_000_000):
        raise InvalidArgument([(field, "is not a valid timestamp")])
    return int(ts.ToMilliseconds())


class ShortenerServicer(pb_grpc.ShortenerServiceServicer):
    def __init__(self, rt: Runtime, core: ShortenerCore) -> None:
        self.rt = rt
        self.core = core

    def _message(self, row: dict[str, Any]) -> pb.ShortUrl:
        return pb.ShortUrl(
            code=row["code"],
            long_url=row["long_url"],
            short_url=f"{self.core.edge_base}/{row['code']}",
            owner_id=str(row["owner_id"]),
            create_time=_ts(row["create_ms"]),
            expire_time=_ts(row["expire_ms"] or 0),
            max_visits=row["max_visits"] or 0,
            redirect_type=row["redirect_type"] or 0,  # type: ignore[arg-type]
            custom_alias=bool(row["custom_alias"]),
        )

    async def CreateShortUrl(self, request: pb.CreateShortUrlRequest,
                             context: grpc.aio.ServicerContext) -> pb.CreateShortUrlResponse:
        caller = require_caller()
        row = await self.core.create(
            caller.user_id, request.long_url, alias=request.custom_alias,
            expire_ms=_ms(request, "expire_time"), max_visits=request.max_visits,
            redirect_type=request.redirect_type,
        )
        return pb.CreateShortUrlResponse(short_url=self._message(row))

    async def ResolveShortUrl(self, request: pb.ResolveShortUrlRequest,
                              context: grpc.aio.ServicerContext) -> pb.ResolveShortUrlResponse:
        client_ip = request.client_ip or context.peer().rsplit(":", 1)[0]
        r = await self.core.resolve(request.code, referrer=request.referrer,
                                    user_agent=request.user_agent, client_ip=client_ip)
        return pb.ResolveShortUrlResponse(long_url=r.long_url, redirect_type=r.redirect_type,  # type: ignore[arg-type]
                                          visit_count=r.visit_count)

    async def GetShortUrl(self, request: pb.GetShortUrlRequest,
                          context: grpc.aio.ServicerContext) -> pb.GetShortUrlResponse:
        caller = require_caller()
        row = await self.core.get_owned(request.code, caller.user_id)
        return pb.GetShortUrlResponse(short_url=self._message(row))

    async def GetShortUrlStats(self, request: pb.GetShortUrlStatsRequest,
                               context: grpc.aio.ServicerContext) -> pb.GetShortUrlStatsResponse:
        caller = require_caller()
        s = await self.core.stats(request.code, caller.user_id, days=request.days,
                                  top=request.top_referrers)
        return pb.GetShortUrlStatsResponse(
            code=s["code"],
            total_clicks=s["total_clicks"],
            unique_visitors=s["unique_visitors"],
            daily_clicks=[pb.DailyClicks(day=d, clicks=n) for d, n in s["daily"]],
            top_referrers=[pb.ReferrerCount(referrer=r, clicks=n) for r, n in s["referrers"]],
        )

    async def ListShortUrls(self, request: pb.ListShortUrlsRequest,
                            context: grpc.aio.ServicerContext) -> pb.ListShortUrlsResponse:
        caller = require_caller()
        rows, token = await self.core.list(caller.user_id, request.page_size, request.page_token)
        return pb.ListShortUrlsResponse(
            short_urls=[self._message({**r, "owner_id": caller.user_id}) for r in rows],
            next_page_token=token,
        )

    async def DeleteShortUrl(self, request: pb.DeleteShortUrlRequest,
                             context: grpc.aio.ServicerContext) -> pb.DeleteShortUrlResponse:
        caller = require_caller()
        await self.core.delete(request.code, caller.user_id)
        return pb.DeleteShortUrlResponse()


class PasteServicer(pb_grpc.PasteServiceServicer):
    def __init__(self, rt: Runtime, core: PasteCore) -> None:
        self.rt = rt
        self.core = core

    def _message(self, row: dict[str, Any], content: str = "") -> pb.Paste:
        return pb.Paste(
            paste_id=row["paste_id"],
            owner_id=str(row["owner_id"]),
            title=row["title"] or "",
            language=row["language"] or "",
            content=content,
            size_bytes=row["size_bytes"],
            create_time=_ts(row["create_ms"]),
            expire_time=_ts(row["expire_ms"] or 0),
            raw_url=f"{self.rt.config.edge_base_url}/p/{row['paste_id']}",
        )

    async def CreatePaste(self, request: pb.CreatePasteRequest,
                          context: grpc.aio.ServicerContext) -> pb.CreatePasteResponse:
        caller = require_caller()
        row = await self.core.create(caller.user_id, request.content, title=request.title,
                                     language=request.language, expire_ms=_ms(request, "expire_time"))
        return pb.CreatePasteResponse(paste=self._message(row))

    async def GetPaste(self, request: pb.GetPasteRequest,
                       context: grpc.aio.ServicerContext) -> pb.GetPasteResponse:
        row, content = await self.core.get(request.paste_id)
        return pb.GetPasteResponse(paste=self._message(row, content))

    async def DeletePaste(self, request: pb.DeletePasteRequest,
                          context: grpc.aio.ServicerContext) -> pb.DeletePasteResponse:
        caller = require_caller()
        await self.core.delete(request.paste_id, caller.user_id)
        return pb.DeletePasteResponse()


def register(server: grpc.aio.Server, rt: Runtime) -> list[str]:
    pb_grpc.add_ShortenerServiceServicer_to_server(ShortenerServicer(rt, ShortenerCore.for_runtime(rt)), server)
    pb_grpc.add_PasteServiceServicer_to_server(PasteServicer(rt, PasteCore(rt)), server)
    return [SHORTENER_SERVICE, PASTE_SERVICE]


__all__ = ["PUBLIC_METHODS", "TABLES", "register"]
