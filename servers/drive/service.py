"""sysdesign.drive.v1: the DriveService servicer, and the block collector worker.

Thin adapters: the caller comes from the token, messages become calls on
DriveCore (servers/drive/core.py) and rows become messages again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog
from google.protobuf.timestamp_pb2 import Timestamp
from sysdesign.drive.v1 import drive_pb2 as pb
from sysdesign.drive.v1 import drive_pb2_grpc as pb_grpc

from servers.drive import core as c
from servers.drive.core import BlockRef, DriveCore, NodeView
from servers.drive.tables import TABLES as DRIVE_TABLES
from servers.platform.auth import require_caller
from servers.platform.errors import InvalidArgument
from servers.platform.metrics import DRIVE_BLOCK_BYTES, DRIVE_COLLECTED, DRIVE_COMMITS
from servers.platform.runtime import Runtime
from servers.storage import cas

log = structlog.get_logger("sysdesign.drive")

SERVICE = pb.DESCRIPTOR.services_by_name["DriveService"].full_name
PUBLIC_METHODS: set[str] = set()
# A block upload on a slow link may outlast the 30 s default: it runs as long as its deadline asks.
LONG_CALLS = {f"/{SERVICE}/UploadBlocks"}
TABLES = [*DRIVE_TABLES, *cas.TABLES]


def _ts(ms: int | None) -> Timestamp | None:
    if not ms:
        return None
    t = Timestamp()
    t.FromMilliseconds(int(ms))
    return t


def revision_message(r: dict[str, Any]) -> pb.Revision:
    return pb.Revision(
        revision=int(r["rev"]), size_bytes=int(r["size"] or 0),
        blocks=[pb.Block(sha256=b.sha256, size_bytes=b.size) for b in c.decode_blocks(r["blocks"])],
        chunking=int(r["chunking"] or 0),  # type: ignore[arg-type]
        device=r["device"] or "", author_id=str(r["author"] or ""), create_time=_ts(r["create_ms"]),
        content_hash=r["content_hash"] or "",
    )


def node_message(v: NodeView) -> pb.Node:
    row = v.row
    return pb.Node(
        node_id=str(row["node_id"]), namespace_id=str(v.ns), parent_id=str(row["parent_id"]),
        name=row["name"] or "", path=v.path, kind=int(row["kind"]),  # type: ignore[arg-type]
        head=revision_message(v.head) if v.head is not None else None, trashed=v.trashed,
        create_time=_ts(row["create_ms"]), modify_time=_ts(row["modify_ms"]),
    )


def change_message(r: dict[str, Any]) -> pb.Change:
    from servers.platform.ids import id_timestamp_ms

    cid = int(r["change_id"])
    return pb.Change(
        change_id=str(cid), kind=int(r["kind"]), node_id=str(r["node_id"]),  # type: ignore[arg-type]
        node_kind=int(r["node_kind"] or 0), path=r["path"] or "",  # type: ignore[arg-type]
        from_path=r["from_path"] or "", revision=int(r["rev"] or 0), device=r["device"] or "",
        conflict_with=r["conflict_with"] or "", time=_ts(id_timestamp_ms(cid)),
    )


def share_message(r: dict[str, Any]) -> pb.Share:
    return pb.Share(namespace_id=str(r["ns"]), folder_id=str(r["folder_id"]), path=r.get("path", ""),
                    owner_id=str(r["ns"]), grantee_id=str(r["grantee"]), role=int(r["role"]),  # type: ignore[arg-type]
                    create_time=_ts(r["create_ms"]))


class DriveServicer(pb_grpc.DriveServiceServicer):
    def __init__(self, rt: Runtime, core: DriveCore) -> None:
        self.rt = rt
        self.core = core

    def _settings_message(self, row: dict[str, Any]) -> pb.Settings:
        return pb.Settings(chunking=int(row["chunking"] or c.FIXED),  # type: ignore[arg-type]
                           keep_revisions=self.core.settings.keep_revisions,
                           block_size_bytes=self.core.settings.block_bytes,
                           cdc_min_bytes=c.CDC_MIN, cdc_avg_bytes=c.CDC_AVG, cdc_max_bytes=c.CDC_MAX)

    async def _access(self, namespace_id: str) -> c.Access:
        return await self.core.access(require_caller().user_id, namespace_id)

    async def CreateFolder(self, request: pb.CreateFolderRequest,
                           context: grpc.aio.ServicerContext) -> pb.CreateFolderResponse:
        acc = await self._access(request.namespace_id)
        return pb.CreateFolderResponse(folder=node_message(await self.core.create_folder(acc, request.path)))

    async def GetNode(self, request: pb.GetNodeRequest, context: grpc.aio.ServicerContext) -> pb.GetNodeResponse:
        acc = await self._access(request.namespace_id)
        loc = await self.core.locate(acc, request.path)
        return pb.GetNodeResponse(node=node_message(await self.core.view(acc.ns, loc)))

    async def ListFolder(self, request: pb.ListFolderRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListFolderResponse:
        acc = await self._access(request.namespace_id)
        views, token = await self.core.list_folder(acc, request.path, request.page_size, request.page_token)
        return pb.ListFolderResponse(children=[node_message(v) for v in views], next_page_token=token)

    async def MoveNode(self, request: pb.MoveNodeRequest, context: grpc.aio.ServicerContext) -> pb.MoveNodeResponse:
        acc = await self._access(request.namespace_id)
        return pb.MoveNodeResponse(node=node_message(await self.core.move(acc, request.from_path, request.to_path)))

    async def DeleteNode(self, request: pb.DeleteNodeRequest,
                         context: grpc.aio.ServicerContext) -> pb.DeleteNodeResponse:
        acc = await self._access(request.namespace_id)
        v = await self.core.delete(acc, request.path, permanent=request.permanent, if_revision=request.if_revision)
        return pb.DeleteNodeResponse(node=node_message(v))

    async def RestoreNode(self, request: pb.RestoreNodeRequest,
                          context: grpc.aio.ServicerContext) -> pb.RestoreNodeResponse:
        acc = await self._access(request.namespace_id)
        return pb.RestoreNodeResponse(node=node_message(await self.core.restore(acc, request.path, request.new_name)))

    async def ListTrash(self, request: pb.ListTrashRequest, context: grpc.aio.ServicerContext) -> pb.ListTrashResponse:
        acc = await self._access(request.namespace_id)
        views, token = await self.core.list_trash(acc, request.page_size, request.page_token)
        return pb.ListTrashResponse(nodes=[node_message(v) for v in views], next_page_token=token)

    async def CommitFile(self, request: pb.CommitFileRequest,
                         context: grpc.aio.ServicerContext) -> pb.CommitFileResponse:
        acc = await self._access(request.namespace_id)
        blocks = [BlockRef(b.sha256, b.size_bytes) for b in request.blocks]
        res = await self.core.commit(acc, request.path, request.base_revision, blocks, int(request.chunking),
                                     request.device, expect_uploaded=request.expect_uploaded)
        DRIVE_COMMITS.labels("missing_blocks" if res.missing else "conflicted" if res.conflicted
                             else "unchanged" if res.unchanged else "committed").inc()
        return pb.CommitFileResponse(
            missing_blocks=res.missing,
            node=node_message(res.node) if res.node else None,
            conflicted=res.conflicted,
            conflict_with=node_message(res.conflict_with) if res.conflict_with else None,
        )

    async def UploadBlocks(self, request_iterator: AsyncIterator[pb.UploadBlocksRequest],
                           context: grpc.aio.ServicerContext) -> pb.UploadBlocksResponse:
        """Blocks in, each stored once its last message arrives.

        A block is stored while the next one arrives (one store in flight per
        stream, so a stream holds about two blocks). A store that fails ends
        the call with its error; a stream that breaks off still waits for the
        block already complete, so what was stored is what was acknowledged.
        """
        caller = require_caller().user_id
        acc: c.Access | None = None
        current = ""
        parts: list[bytes] = []
        size = 0
        stored: list[str] = []
        received = 0
        storing: asyncio.Task[None] | None = None

        async def store(a: c.Access, digest: str, block: bytes) -> None:
            await self.core.store_block(a, digest, block)
            DRIVE_BLOCK_BYTES.labels("up").inc(len(block))
            stored.append(digest)

        try:
            async for m in request_iterator:
                if storing is not None and storing.done():
                    done, storing = storing, None
                    done.result()  # a failed store ends the call now
                if acc is None:
                    acc = await self.core.access(caller, m.namespace_id)
                    await self.core.upload_access(acc)
                elif m.namespace_id and int(m.namespace_id) != acc.ns:
                    raise InvalidArgument([("namespace_id", "one stream uploads to one namespace")])
                if current and m.sha256 != current:
                    raise InvalidArgument([("sha256", f"block {current} ended without a message with last set")])
                current = m.sha256
                data, last = m.data, m.last  # each read of a bytes field is a fresh copy: read it once
                del m  # and let the message's own copy go before the next one arrives
                received += len(data)
                size += len(data)
                if size > c.MAX_BLOCK:
                    raise InvalidArgument([("data", f"a block is at most {c.MAX_BLOCK} bytes")])
                if data:
                    parts.append(data)
                if last:
                    if storing is not None:
                        # the block before goes first: at most that one and this one are held here
                        prev, storing = storing, None
                        await prev
                    block = parts[0] if len(parts) == 1 else b"".join(parts)
                    parts, size = [], 0
                    storing = asyncio.create_task(store(acc, current, block))
                    current = ""
                    del block
                del data
            if storing is not None:
                prev, storing = storing, None
                await prev
        except BaseException:
            if storing is not None:
                # the block in flight is stored (or refused) before the call ends; its error comes first
                await storing
            raise
        if current:
            raise InvalidArgument([("last", f"the stream ended inside block {current}")])
        return pb.UploadBlocksResponse(stored=stored, bytes_received=received)

    async def DownloadBlocks(self, request: pb.DownloadBlocksRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.DownloadBlocksResponse]:
        acc = await self._access(request.namespace_id)
        loc = await self.core.locate(acc, request.path)
        rev = await self.core.revision(acc, loc, request.revision)
        blocks = c.decode_blocks(rev["blocks"])
        if request.sha256:
            sizes = {b.sha256: b.size for b in blocks}
            bad = [(f"sha256[{i}]", f"is not a block of revision {rev['rev']}")
                   for i, d in enumerate(request.sha256) if d not in sizes]
            if bad:
                raise InvalidArgument(bad[:20])
            blocks = [BlockRef(d, sizes[d]) for d in request.sha256]
        for b in blocks:
            data = await self.core.read_block(b.sha256)
            DRIVE_BLOCK_BYTES.labels("down").inc(len(data))
            view = memoryview(data)
            first = True
            for off in range(0, max(len(data), 1), c.PIECE):
                piece = view[off:off + c.PIECE]
                last = off + c.PIECE >= len(data)
                yield pb.DownloadBlocksResponse(
                    sha256=b.sha256 if first else "", size_bytes=len(data) if first else 0,
                    revision=int(rev["rev"]) if first else 0, data=bytes(piece), last=last)
                first = False

    async def ListRevisions(self, request: pb.ListRevisionsRequest,
                            context: grpc.aio.ServicerContext) -> pb.ListRevisionsResponse:
        acc = await self._access(request.namespace_id)
        rows, token = await self.core.list_revisions(acc, request.path, request.page_size, request.page_token)
        return pb.ListRevisionsResponse(revisions=[revision_message(r) for r in rows], next_page_token=token)

    async def RestoreRevision(self, request: pb.RestoreRevisionRequest,
                              context: grpc.aio.ServicerContext) -> pb.RestoreRevisionResponse:
        acc = await self._access(request.namespace_id)
        v = await self.core.restore_revision(acc, request.path, request.revision, request.device)
        return pb.RestoreRevisionResponse(node=node_message(v))

    async def ShareFolder(self, request: pb.ShareFolderRequest,
                          context: grpc.aio.ServicerContext) -> pb.ShareFolderResponse:
        row = await self.core.share(require_caller().user_id, request.path, int(request.grantee_id),
                                    int(request.role))
        return pb.ShareFolderResponse(share=share_message(row))

    async def UnshareFolder(self, request: pb.UnshareFolderRequest,
                            context: grpc.aio.ServicerContext) -> pb.UnshareFolderResponse:
        await self.core.unshare(require_caller().user_id, request.path, int(request.grantee_id))
        return pb.UnshareFolderResponse()

    async def ListShares(self, request: pb.ListSharesRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListSharesResponse:
        inbound, outbound = await self.core.list_shares(require_caller().user_id)
        return pb.ListSharesResponse(shared_with_me=[share_message(r) for r in inbound],
                                     shared_by_me=[share_message(r) for r in outbound])

    async def ListChanges(self, request: pb.ListChangesRequest,
                          context: grpc.aio.ServicerContext) -> pb.ListChangesResponse:
        acc = await self._access(request.namespace_id)
        rows, cursor, more = await self.core.list_changes(acc, request.cursor, request.limit)
        return pb.ListChangesResponse(changes=[change_message(r) for r in rows], cursor=cursor, has_more=more)

    async def WatchChanges(self, request: pb.WatchChangesRequest,
                           context: grpc.aio.ServicerContext) -> AsyncIterator[pb.WatchChangesResponse]:
        acc = await self._access(request.namespace_id)
        async for rows, cursor in self.core.watch(acc, request.cursor):
            yield pb.WatchChangesResponse(changes=[change_message(r) for r in rows], cursor=cursor)

    async def GetSettings(self, request: pb.GetSettingsRequest,
                          context: grpc.aio.ServicerContext) -> pb.GetSettingsResponse:
        acc = await self._access(request.namespace_id)
        return pb.GetSettingsResponse(settings=self._settings_message(await self.core.settings_of(acc.ns)))

    async def UpdateSettings(self, request: pb.UpdateSettingsRequest,
                             context: grpc.aio.ServicerContext) -> pb.UpdateSettingsResponse:
        row = await self.core.update_settings(require_caller().user_id, int(request.chunking))
        return pb.UpdateSettingsResponse(settings=self._settings_message(row))


def register(server: grpc.aio.Server, rt: Runtime) -> list[str]:
    core = DriveCore.for_runtime(rt)

    async def end_watches() -> None:
        core.closing.set()

    rt.drainers.append(end_watches)
    pb_grpc.add_DriveServiceServicer_to_server(DriveServicer(rt, core), server)
    return [SERVICE]


async def sweep(rt: Runtime) -> float:
    """One pass of the block collector (worker ``drivegc``): returns the seconds until the next."""
    core = DriveCore.for_runtime(rt)
    stats = await core.sweep()
    for outcome in ("deleted", "kept", "busy", "gone"):
        if stats[outcome]:
            DRIVE_COLLECTED.labels(outcome).inc(stats[outcome])
    if stats["deleted"] or stats["intents_undone"]:
        log.info("drive_sweep", **stats)
    return core.settings.sweep_every_s


__all__ = ["LONG_CALLS", "PUBLIC_METHODS", "TABLES", "register", "sweep"]
