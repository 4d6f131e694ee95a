"""sysdesign.chat.v1.ChatService: a thin adapter from messages to ChatCore, the hub and
the per-stream Connection."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from sysdesign.chat.v1 import chat_pb2 as pb
from sysdesign.chat.v1 import chat_pb2_grpc as pb_grpc

from servers.chat import validation as val
from servers.chat.attachments import Attachments
from servers.chat.core import ChatCore
from servers.chat.hub import Hub
from servers.chat.session import Connection, _ts, message_pb
from servers.chat.tables import TABLES
from servers.platform.auth import require_caller
from servers.platform.errors import InvalidArgument, PermissionDenied, Violations
from servers.platform.runtime import Runtime

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ChatService"].full_name
PUBLIC_METHODS: set[str] = set()
# Connect answers a bad event with an error event and keeps the stream open
# (the session checks each event's declared rules itself).
CONNECT_METHOD = "/sysdesign.chat.v1.ChatService/Connect"


def conversation_pb(row: dict[str, Any], *, member_count: int = 0,
                    members: list[dict[str, Any]] | None = None) -> pb.Conversation:
    c = pb.Conversation(conversation_id=str(row["conversation_id"]), type=row["kind"],
                        title=row["title"] or "", creator_id=str(row["creator_id"]),
                        member_count=member_count or len(members or ()),
                        create_time=_ts(row["create_ms"]))
    for m in members or ():
        c.members.append(pb.Member(user_id=str(m["user_id"]), username=m["username"] or "",
                                   role=m["role"], join_time=_ts(m["join_ms"])))
    return c


class ChatServicer(pb_grpc.ChatServiceServicer):
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.core = ChatCore.for_runtime(rt)
        self.hub = Hub.for_runtime(rt)
        self.conn = Connection(self.hub, self.core)
        self.attachments = Attachments.for_runtime(rt)

    def Connect(self, request_iterator: AsyncIterator[pb.ClientEvent],  # type: ignore[override]
                context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ServerEvent]:
        # The Connection's generator itself (the platform middleware iterates it):
        # no extra generator frame per open stream.
        return self.conn.run(request_iterator, context)

    async def SendMessage(self, request: pb.SendMessageRequest,
                          context: grpc.aio.ServicerContext) -> pb.SendMessageResponse:
        caller = require_caller()
        await self.hub.ensure_started()
        row, duplicate = await self.conn.send(caller.user_id, caller.username, "",
                                              request.client_message_id, request.conversation_id,
                                              request.text, request.attachment_id)
        return pb.SendMessageResponse(message=message_pb(row), duplicate=duplicate)

    async def _conversation(self, cid: int) -> pb.Conversation:
        row = await self.core.conversation(cid)
        return conversation_pb(row, members=await self.core.member_rows(cid))

    async def CreateConversation(self, request: pb.CreateConversationRequest,
                                 context: grpc.aio.ServicerContext,
                                 ) -> pb.CreateConversationResponse:
        caller = require_caller()
        row, created = await self.core.create(caller.user_id, caller.username, request.type,
                                              list(request.member_ids),
                                              list(request.member_usernames), request.title)
        return pb.CreateConversationResponse(
            conversation=await self._conversation(row["conversation_id"]), created=created)

    def _cid(self, value: str) -> int:
        v = Violations()
        cid = val.parse_id(value, v, "conversation_id")
        v.raise_if_any()
        return cid

    async def GetConversation(self, request: pb.GetConversationRequest,
                              context: grpc.aio.ServicerContext) -> pb.GetConversationResponse:
        caller = require_caller()
        cid = self._cid(request.conversation_id)
        await self.core.conversation(cid)
        await self.core.require_member(cid, caller.user_id)
        return pb.GetConversationResponse(conversation=await self._conversation(cid))

    async def ListConversations(self, request: pb.ListConversationsRequest,
                                context: grpc.aio.ServicerContext,
                                ) -> pb.ListConversationsResponse:
        caller = require_caller()
        items, token = await self.core.list_conversations(caller.user_id, request.page_size,
                                                          request.page_token)
        out = []
        for s in items:
            summary = pb.ConversationSummary(
                conversation=conversation_pb(s["conversation"], member_count=s["member_count"]),
                unread_count=s["unread"],
                read_up_to_message_id=str(s["read_upto"]) if s["read_upto"] else "")
            if s["last"] is not None:
                summary.last_message.CopyFrom(message_pb(s["last"]))
            out.append(summary)
        return pb.ListConversationsResponse(conversations=out, next_page_token=token)

    async def AddConversationMembers(self, request: pb.AddConversationMembersRequest,
                                     context: grpc.aio.ServicerContext,
                                     ) -> pb.AddConversationMembersResponse:
        caller = require_caller()
        cid = self._cid(request.conversation_id)
        await self.core.add_members(caller.user_id, cid, list(request.member_ids),
                                    list(request.member_usernames))
        return pb.AddConversationMembersResponse(conversation=await self._conversation(cid))

    async def RemoveConversationMember(self, request: pb.RemoveConversationMemberRequest,
                                       context: grpc.aio.ServicerContext,
                                       ) -> pb.RemoveConversationMemberResponse:
        caller = require_caller()
        await self.core.remove_member(caller.user_id, self._cid(request.conversation_id),
                                      request.user_id)
        return pb.RemoveConversationMemberResponse()

    async def LeaveConversation(self, request: pb.LeaveConversationRequest,
                                context: grpc.aio.ServicerContext) -> pb.LeaveConversationResponse:
        caller = require_caller()
        await self.core.leave(caller.user_id, self._cid(request.conversation_id))
        return pb.LeaveConversationResponse()

    async def GetHistory(self, request: pb.GetHistoryRequest,
                         context: grpc.aio.ServicerContext) -> pb.GetHistoryResponse:
        caller = require_caller()
        rows, token = await self.core.history(caller.user_id, request.conversation_id,
                                              request.before_message_id, request.page_size,
                                              request.page_token)
        return pb.GetHistoryResponse(messages=[message_pb(r) for r in rows], next_page_token=token)

    async def MarkRead(self, request: pb.MarkReadRequest,
                       context: grpc.aio.ServicerContext) -> pb.MarkReadResponse:
        caller = require_caller()
        await self.hub.ensure_started()
        pos = await self.conn.mark_read(caller.user_id, request.conversation_id,
                                        request.up_to_message_id)
        return pb.MarkReadResponse(read_up_to_message_id=str(pos) if pos else "")

    async def GetReceipts(self, request: pb.GetReceiptsRequest,
                          context: grpc.aio.ServicerContext) -> pb.GetReceiptsResponse:
        caller = require_caller()
        rows = await self.core.receipts(caller.user_id, request.conversation_id)
        return pb.GetReceiptsResponse(receipts=[pb.MemberReceipt(
            user_id=str(r["user_id"]),
            delivered_up_to_message_id=str(r["delivered_upto"]) if r["delivered_upto"] else "",
            read_up_to_message_id=str(r["read_upto"]) if r["read_upto"] else "") for r in rows])

    async def GetPresence(self, request: pb.GetPresenceRequest,
                          context: grpc.aio.ServicerContext) -> pb.GetPresenceResponse:
        caller = require_caller()
        v = Violations()
        if not request.user_ids:
            v.add("user_ids", "name at least one user")
        if len(request.user_ids) > 100:
            v.add("user_ids", "at most 100 users per call")
        ids = [val.parse_id(u, v, f"user_ids[{i}]") for i, u in enumerate(request.user_ids)]
        v.raise_if_any()
        contacts = await self.core.contacts(caller.user_id) | {caller.user_id}
        strangers = [u for u in ids if u not in contacts]
        if strangers:
            raise PermissionDenied("presence is visible only to contacts (users sharing a "
                                   "conversation with you)", reason="NOT_A_CONTACT",
                                   metadata={"user_ids": ",".join(map(str, strangers))})
        states = await self.hub.presence(ids)
        out = []
        for u in ids:
            online, seen = states[u]
            p = pb.Presence(user_id=str(u), online=online)
            if seen:
                p.last_seen_time.CopyFrom(_ts(seen))
            out.append(p)
        return pb.GetPresenceResponse(presences=out)

    async def UploadAttachment(self, request_iterator: AsyncIterator[pb.UploadAttachmentRequest],
                               context: grpc.aio.ServicerContext) -> pb.UploadAttachmentResponse:
        caller = require_caller()
        row = await self.attachments.upload(caller.user_id, request_iterator)
        return pb.UploadAttachmentResponse(
            conversation_id=str(row["conversation_id"]),
            attachment=pb.Attachment(attachment_id=str(row["attachment_id"]),
                                     filename=row["filename"], content_type=row["content_type"],
                                     size_bytes=row["size_bytes"]))

    async def GetAttachmentUrl(self, request: pb.GetAttachmentUrlRequest,
                               context: grpc.aio.ServicerContext) -> pb.GetAttachmentUrlResponse:
        caller = require_caller()
        url, exp = await self.attachments.url(caller.user_id, request.conversation_id,
                                              request.attachment_id)
        return pb.GetAttachmentUrlResponse(url=url, expire_time=_ts(exp * 1000))


def register(server: grpc.aio.Server, rt: Runtime) -> list[str]:
    pb_grpc.add_ChatServiceServicer_to_server(ChatServicer(rt), server)
    return [SERVICE_NAME]


def edge_routes(app: Any, rt: Runtime) -> None:
    from servers.chat.attachments import edge_routes as routes

    routes(app, rt)


__all__ = ["PUBLIC_METHODS", "TABLES", "InvalidArgument", "edge_routes", "register"]
