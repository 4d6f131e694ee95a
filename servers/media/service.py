"""sysdesign.media.v1.MediaService: a thin adapter from messages to MediaCore and back."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from sysdesign.media.v1 import media_pb2 as pb
from sysdesign.media.v1 import media_pb2_grpc as pb_grpc

from servers.media.core import MediaCore, parse_media_id
from servers.media.tables import TABLES
from servers.media.wire import parse_upload_request
from servers.platform.auth import require_caller
from servers.platform.runtime import Runtime

MEDIA_SERVICE = pb.DESCRIPTOR.services_by_name["MediaService"].full_name
PUBLIC_METHODS: set[str] = set()
_KINDS = {"video": pb.MEDIA_KIND_VIDEO, "image": pb.MEDIA_KIND_IMAGE}


def _ts(ms: int | None) -> Timestamp | None:
    if not ms:
        return None
    t = Timestamp()
    t.FromMilliseconds(ms)
    return t


def _dur(seconds: float | None) -> Duration | None:
    if not seconds:
        return None
    d = Duration()
    d.FromMilliseconds(round(seconds * 1000))
    return d


class MediaServicer(pb_grpc.MediaServiceServicer):
    def __init__(self, rt: Runtime, core: MediaCore) -> None:
        self.rt = rt
        self.core = core

    def _upload(self, row: dict[str, Any]) -> pb.Upload:
        mid = str(row["media_id"])
        return pb.Upload(
            upload_id=mid, media_id=mid, filename=row["filename"], content_type=row["content_type"],
            size_bytes=row["size_bytes"], sha256=row["sha256"], committed_bytes=row["committed_bytes"] or 0,
            state=row["state"], chunk_size_hint=min(self.core.settings.part_bytes, 1 << 20),
            create_time=_ts(row["create_ms"]),
        )

    async def media_message(self, row: dict[str, Any]) -> pb.Media:
        probe = json.loads(row["probe"]) if row["probe"] else {}
        m = pb.Media(
            media_id=str(row["media_id"]), owner_id=str(row["owner_id"]), filename=row["filename"],
            content_type=row["content_type"], kind=_KINDS.get(row["kind"], pb.MEDIA_KIND_UNSPECIFIED),
            state=row["state"], progress_percent=row["percent"] or 0,
            failure_reason=row["failure_reason"] or "", size_bytes=row["size_bytes"], sha256=row["sha256"],
            duration=_dur(probe.get("duration_s") if probe.get("kind") == "video" else None),
            width=probe.get("width", 0), height=probe.get("height", 0),
            has_audio=bool(probe.get("has_audio")), create_time=_ts(row["create_ms"]),
            update_time=_ts(row["update_ms"]),
            processing_duration=_dur((row["processing_ms"] or 0) / 1000),
        )
        if row["state"] == 3 and row["renditions"]:
            r = json.loads(row["renditions"])
            mid = int(row["media_id"])
            base = self.core.playback_base(mid)
            presign = self.rt.blobs.presigned_get_url
            secs = self.core.settings.presign_seconds
            for v in r["variants"]:
                direct = ""
                if v["content_type"].startswith("image/"):
                    direct = await presign(f"media/{mid}/{v['path']}", expires_seconds=secs) or ""
                m.variants.append(pb.Variant(
                    name=v["name"], width=v["width"], height=v["height"], bandwidth_bps=v["bandwidth_bps"],
                    content_type=v["content_type"], url=f"{base}/{v['path']}", presigned_url=direct))
            m.playback.CopyFrom(pb.Playback(
                hls_url=f"{base}/{r['master']}" if r["master"] else "",
                poster_url=f"{base}/{r['poster']}",
                presigned_poster_url=await presign(f"media/{mid}/{r['poster']}", expires_seconds=secs) or "",
            ))
        return m

    async def CreateUpload(self, request: pb.CreateUploadRequest,
                           context: grpc.aio.ServicerContext) -> pb.CreateUploadResponse:
        caller = require_caller()
        row = await self.core.create_upload(caller.user_id, request.filename, request.content_type,
                                            request.size_bytes, request.sha256)
        return pb.CreateUploadResponse(upload=self._upload(row))

    async def Upload(self, request_iterator: AsyncIterator[pb.UploadRequest],
                     context: grpc.aio.ServicerContext) -> pb.UploadResponse:
        caller = require_caller()
        row = await self.core.upload(caller.user_id, request_iterator.__aiter__(), context.time_remaining())
        return pb.UploadResponse(upload=self._upload(row))

    async def GetUpload(self, request: pb.GetUploadRequest,
                        context: grpc.aio.ServicerContext) -> pb.GetUploadResponse:
        caller = require_caller()
        row = await self.core.get_owned(parse_media_id(request.upload_id, "upload_id"), caller.user_id)
        return pb.GetUploadResponse(upload=self._upload(row))

    async def GetMedia(self, request: pb.GetMediaRequest,
                       context: grpc.aio.ServicerContext) -> pb.GetMediaResponse:
        caller = require_caller()
        row = await self.core.get_owned(parse_media_id(request.media_id), caller.user_id)
        return pb.GetMediaResponse(media=await self.media_message(row))

    async def WatchMedia(self, request: pb.WatchMediaRequest,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[pb.WatchMediaResponse]:
        caller = require_caller()
        async for row in self.core.watch(parse_media_id(request.media_id), caller.user_id):
            yield pb.WatchMediaResponse(media=await self.media_message(row))

    async def ListMedia(self, request: pb.ListMediaRequest,
                        context: grpc.aio.ServicerContext) -> pb.ListMediaResponse:
        caller = require_caller()
        rows, token = await self.core.list(caller.user_id, request.page_size, request.page_token)
        return pb.ListMediaResponse(media=[await self.media_message(r) for r in rows], next_page_token=token)

    async def DeleteMedia(self, request: pb.DeleteMediaRequest,
                          context: grpc.aio.ServicerContext) -> pb.DeleteMediaResponse:
        caller = require_caller()
        await self.core.delete(parse_media_id(request.media_id), caller.user_id)
        return pb.DeleteMediaResponse()


class _FastUploadDecoder:
    """Passes the generated registration through, with UploadRequest decoded by ``wire.py``."""

    def __init__(self, server: Any) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the registered handlers below carry the same methods

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        up = handlers["Upload"]
        handlers = {**handlers, "Upload": grpc.stream_unary_rpc_method_handler(
            up.stream_unary, request_deserializer=parse_upload_request,
            response_serializer=up.response_serializer)}
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        self._server.add_registered_method_handlers(service, handlers)


def register(server: grpc.aio.Server, rt: Runtime) -> list[str]:
    servicer = MediaServicer(rt, MediaCore.for_runtime(rt))
    pb_grpc.add_MediaServiceServicer_to_server(servicer, _FastUploadDecoder(server))  # type: ignore[arg-type]
    return [MEDIA_SERVICE]


__all__ = ["PUBLIC_METHODS", "TABLES", "register"]
