"""One device's stream: replay → live handoff, client events, per-event errors.

The handoff, with no gap and no duplicate
    1. the stream registers (locally and in the Redis session registry)
       *before* reading anything: from then on every message published for
       the user reaches this stream and is buffered (``pending``);
    2. replay: for each of the user's conversations, the message table is
       sliced after the device's cursor and sent, oldest first;
    3. ``synced`` is sent, then the buffer is drained, skipping messages the
       replay already sent (by id), then the stream goes live.

    A message committed before step 2 read its partition is in the replay; one
    committed after it was published after the registration of step 1, so it
    is in the buffer. Both paths may hold it: the id check drops the second.

Client events are handled one at a time in a reader task, so one device's
sends are persisted in the order it sent them. A bad event is answered with
an ``error`` event carrying the status code, the field violations and the
client's ``event_id``; the stream stays open. Ending the stream: the client
half-closes, the server shuts down, or the device connects again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog
from google.protobuf.timestamp_pb2 import Timestamp
from sysdesign.chat.v1 import chat_pb2 as pb

from servers.chat import validation as val
from servers.chat.core import SEND_TIMEOUT_S, ChatCore
from servers.chat.hub import HEARTBEAT_INTERVAL_S, RECEIPT_PUSH_MAX_MEMBERS, Hub
from servers.platform import validation
from servers.platform.auth import require_caller
from servers.platform.errors import InvalidArgument, ServiceError, Unavailable, Violations
from servers.platform.interceptors import BACKEND_ERRORS

log = structlog.get_logger("sysdesign.chat")

_RETRYABLE: tuple[type[BaseException], ...] = (TimeoutError, *BACKEND_ERRORS)
# Events buffered for a stream whose client reads slower than it is sent to:
# past this, the stream is ended and the device catches up by replay.
MAX_QUEUED_EVENTS = 10_000


def _ts(ms: int) -> Timestamp:
    t = Timestamp()
    t.FromMilliseconds(ms)
    return t


def message_pb(row: dict[str, Any]) -> pb.Message:
    m = pb.Message(
        conversation_id=str(row["conversation_id"]), message_id=str(row["message_id"]),
        sender_id=str(row["sender_id"]), sender_username=row["sender_name"] or "",
        client_message_id=row["client_message_id"] or "", text=row["body"] or "",
        create_time=_ts(row["create_ms"]),
    )
    if row.get("attachment_id"):
        m.attachment.CopyFrom(pb.Attachment(
            attachment_id=str(row["attachment_id"]), filename=row["attachment_name"] or "",
            content_type=row["attachment_type"] or "", size_bytes=row["attachment_size"] or 0))
    return m


def error_event(exc: ServiceError, *, event_id: str = "", client_message_id: str = "",
                ) -> pb.ServerEvent:
    err = pb.EventError(event_id=event_id, client_message_id=client_message_id,
                        code=exc.code.value[0], message=exc.message, reason=exc.reason)
    if isinstance(exc, InvalidArgument):
        err.field_violations.extend(pb.FieldViolation(field=v.field, description=v.description)
                                    for v in exc.violations)
    return pb.ServerEvent(error=err)


class _Mailbox:
    """The events waiting for one stream: a deque and at most one waiter.

    Lighter than an asyncio.Queue (no getter/putter deques, no join event):
    with thousands of idle streams per process, every object per stream shows
    in the RSS.
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[pb.ServerEvent | None] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def qsize(self) -> int:
        return len(self._items)

    def put_nowait(self, item: pb.ServerEvent | None) -> None:
        self._items.append(item)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def get(self) -> pb.ServerEvent | None:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


class Session:
    """The server side of one device's stream."""

    __slots__ = ("cursors", "device_id", "ended", "known", "live", "pending", "queue",
                 "reason", "saved", "saved_at", "unsaved", "user_id", "username", "wanted")

    def __init__(self, user_id: int, username: str, device_id: str) -> None:
        self.user_id = user_id
        self.username = username
        self.device_id = device_id
        self.queue = _Mailbox()
        self.live = False
        self.pending: list[pb.ServerEvent] = []
        # Positions the device acknowledged (waiting to be persisted) and persisted.
        self.wanted: dict[int, int] = {}
        self.cursors: dict[int, int] = {}
        self.saved: dict[int, int] = {}  # what the table holds
        self.saved_at = 0.0
        self.unsaved = False
        self.known: set[int] = set()  # conversations this device is known to belong to
        self.ended = False
        self.reason = ""  # why the server ended the stream ('' : the client did)

    def push(self, event: pb.ServerEvent) -> None:
        if self.ended:
            return
        if not self.live:
            self.pending.append(event)
            if len(self.pending) > MAX_QUEUED_EVENTS:
                self.close("too many events queued while replaying; reconnect")
        elif self.queue.qsize() >= MAX_QUEUED_EVENTS:
            self.close("the client reads too slowly; reconnect to catch up")
        else:
            self.queue.put_nowait(event)

    def close(self, reason: str) -> None:
        if not self.ended:
            self.ended = True
            self.reason = reason
            self.queue.put_nowait(None)


def _device_from_metadata(context: grpc.aio.ServicerContext) -> str:
    for k, v in context.invocation_metadata() or ():
        if k == "x-device-id":
            return v.decode() if isinstance(v, bytes) else v
    return ""


SEND_SCOPE = "sysdesign.chat.v1.ChatService/SendMessage"


class Connection:
    """Runs Connect for one stream."""

    def __init__(self, hub: Hub, core: ChatCore) -> None:
        self.hub = hub
        self.core = core

    async def _online_contacts(self, user_id: int) -> list[pb.ServerEvent]:
        try:
            contacts = sorted(await self.core.contacts(user_id))
            states = await self.hub.presence(contacts) if contacts else {}
        except Exception as exc:  # presence is a courtesy: the stream goes on without it
            log.warning("chat_presence_snapshot_failed", user_id=user_id, error=repr(exc))
            return []
        out = []
        for uid, (online, seen) in states.items():
            if online:
                ev = pb.ServerEvent(presence=pb.PresenceChange(user_id=str(uid), online=True))
                ev.presence.last_seen_time.FromMilliseconds(seen)
                out.append(ev)
        return out

    async def run(self, request_iterator: AsyncIterator[Any],
                  context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ServerEvent]:
        caller = require_caller()
        device = _device_from_metadata(context)
        it = request_iterator.__aiter__()
        if not device:
            try:
                first = await it.__anext__()
            except StopAsyncIteration:
                return
            if not isinstance(first, pb.ClientEvent) or first.WhichOneof("event") != "hello":
                raise InvalidArgument([("hello", "the first event must be hello with a device_id "
                                                 "when the x-device-id metadata is absent")])
            device = first.hello.device_id
            field = "hello.device_id"
        else:
            field = "x-device-id"
        if field == "hello.device_id":
            validation.check(first)
        else:
            v = Violations()
            val.check_token(device, v, field)
            v.raise_if_any()

        session = Session(caller.user_id, caller.username, device)
        reader: asyncio.Task[None] | None = None
        try:
            async with self.hub.handshakes:
                session.cursors = await self.core.device_cursors(caller.user_id, device)
                session.saved = dict(session.cursors)
                await self.hub.attach(session)
            reader = asyncio.create_task(self._read(session, it))
            replayed: dict[int, set[int]] = {}
            count = 0
            async with self.hub.handshakes:
                convs = await self.core.user_conversations(caller.user_id)
                session.known.update(convs)
                lasts = await self.core.last_ids(convs)
            for cid in convs:
                cursor = session.cursors.get(cid, 0)
                last = lasts.get(cid)
                if last is not None and last <= cursor:
                    continue  # nothing new since the device's cursor
                ids = replayed.setdefault(cid, set())
                async for row in self.core.replay(cid, cursor):
                    ids.add(row["message_id"])
                    count += 1
                    yield pb.ServerEvent(message=message_pb(row))
                if session.ended:
                    break
            yield pb.ServerEvent(synced=pb.Synced(device_id=device, replayed=count,
                                                  heartbeat_interval_seconds=HEARTBEAT_INTERVAL_S))
            # Contacts already online changed nothing when this device came,
            # so no change event tells it: send their presence once, now.
            for ev in await self._online_contacts(caller.user_id):
                yield ev
            pending, session.pending = session.pending, []
            session.live = True
            for ev in pending:
                if ev.WhichOneof("event") == "message" and int(ev.message.message_id) in \
                        replayed.get(int(ev.message.conversation_id), ()):
                    continue
                yield ev
            del replayed, pending, convs, lasts
            while True:
                item = await session.queue.get()
                if item is None:
                    break
                yield item
            if session.reason:
                raise Unavailable(session.reason, reason="STREAM_ENDED")
        finally:
            session.ended = True
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(BaseException):
                    await reader
            await asyncio.shield(self.hub.detach(session))

    async def _read(self, session: Session, it: AsyncIterator[Any]) -> None:
        try:
            async for ev in it:
                if session.ended:
                    break
                await self._handle(session, ev)
        except asyncio.CancelledError:
            raise
        except Exception:  # the client went away mid-read
            pass
        if not session.ended:
            session.close("")

    async def _handle(self, s: Session, ev: Any) -> None:
        if not isinstance(ev, pb.ClientEvent):
            s.push(error_event(InvalidArgument([("event", "is not a valid ClientEvent "
                                                          "(undecodable bytes)")])))
            return
        kind = ev.WhichOneof("event")
        cmid = ev.send.client_message_id if kind == "send" else ""
        try:
            if kind is not None:
                # Paths relative to the event, as for the unary twin
                # (SendMessageRequest): "conversation_id", "text".
                validation.check(getattr(ev, kind))
            if kind == "send":
                await self._send(s, ev)
            elif kind == "ack_delivered":
                await self._ack(s, ev.ack_delivered)
            elif kind == "mark_read":
                await self.mark_read(s.user_id, ev.mark_read.conversation_id,
                                     ev.mark_read.up_to_message_id)
            elif kind == "typing":
                await self._typing(s, ev.typing)
            elif kind == "heartbeat":
                await self.hub.heartbeat(s)
                s.push(pb.ServerEvent(heartbeat_ack=pb.HeartbeatAck(
                    server_time=_ts(int(time.time() * 1000)))))
            elif kind == "hello":
                raise InvalidArgument([("hello", "is only valid as the first event of a stream")])
            else:
                raise InvalidArgument([("event", "exactly one event must be set")])
        except ServiceError as exc:
            s.push(error_event(exc, event_id=ev.event_id, client_message_id=cmid))
        except _RETRYABLE:
            s.push(error_event(Unavailable("a backend is unavailable, retry later",
                                           reason="BACKEND_UNAVAILABLE"),
                               event_id=ev.event_id, client_message_id=cmid))

    async def _send(self, s: Session, ev: pb.ClientEvent) -> None:
        e = ev.send
        # A message sent on the stream spends the same budget as SendMessage
        # (servers/platform/limits.py): refused, it is an error event and the
        # stream goes on.
        limiter = self.core.rt.api_limits
        if limiter is not None:
            verdict = await limiter.check(SEND_SCOPE, user_id=s.user_id, username=s.username, ip="")
            if not verdict.allowed:
                raise verdict.error()

        def acked(row: dict[str, Any], msg: pb.Message, duplicate: bool) -> None:
            # SENT once the row is written and published to the members' instances.
            s.known.add(row["conversation_id"])
            s.push(pb.ServerEvent(send_ack=pb.SendAck(
                event_id=ev.event_id, client_message_id=e.client_message_id, message=msg,
                duplicate=duplicate)))

        async with asyncio.timeout(SEND_TIMEOUT_S):
            await self.send(s.user_id, s.username, s.device_id, e.client_message_id,
                            e.conversation_id, e.text, e.attachment_id, on_persisted=acked)

    async def send(self, user_id: int, username: str, device_id: str, cmid: str,
                   conversation: str, text: str, attachment: str, *,
                   on_persisted: Any = None) -> tuple[dict[str, Any], bool]:
        """Persist, publish to every device of every member (but the sending one), then ack.

        The acknowledgement waits for the publish: were it sent first, a server
        dying between the two would leave a message the sender will never resend
        and a recipient whose live stream (on another instance) never hears of it.
        Unacknowledged, the sender resends the same client message id elsewhere;
        the duplicate is not stored again but is published again.
        """
        async with self.hub.send_slots:
            row, duplicate, members = await self.core.send(user_id, username, cmid,
                                                           conversation, text, attachment)
            msg = message_pb(row)
            try:
                await self.hub.route(members, pb.ServerEvent(message=msg),
                                     skip=(user_id, device_id) if device_id else None)
            except _RETRYABLE as exc:
                # Persisted: the members get it by replay when their streams reconnect
                # (a lost Redis subscription ends them).
                log.warning("chat_publish_failed", conversation_id=row["conversation_id"],
                            message_id=row["message_id"], error=repr(exc))
            finally:
                self.core.released(row["conversation_id"], row["message_id"])
            if on_persisted is not None:
                on_persisted(row, msg, duplicate)
        return row, duplicate

    async def _member(self, s: Session, cid: int) -> None:
        if cid not in s.known:
            await self.core.require_member(cid, s.user_id)
            s.known.add(cid)

    async def _ack(self, s: Session, e: pb.AckDeliveredEvent) -> None:
        v = Violations()
        cid = val.parse_id(e.conversation_id, v, "ack_delivered.conversation_id")
        upto = val.parse_id(e.up_to_message_id, v, "ack_delivered.up_to_message_id")
        v.raise_if_any()
        await self._member(s, cid)
        if upto > max(s.cursors.get(cid, 0), s.wanted.get(cid, 0)):
            s.wanted[cid] = upto

    async def mark_read(self, user_id: int, conversation: str, upto: str) -> int:
        cid, pos, moved = await self.core.mark_read(user_id, conversation, upto)
        if moved:
            members = await self.core.members(cid)
            targets = members if len(members) <= RECEIPT_PUSH_MAX_MEMBERS else {user_id}
            await self.hub.route(targets, pb.ServerEvent(receipt=pb.ReceiptChange(
                conversation_id=str(cid), user_id=str(user_id), status=pb.RECEIPT_STATUS_READ,
                up_to_message_id=str(pos))))
        return pos

    async def _typing(self, s: Session, e: pb.TypingEvent) -> None:
        v = Violations()
        cid = val.parse_id(e.conversation_id, v, "typing.conversation_id")
        v.raise_if_any()
        await self._member(s, cid)
        members = await self.core.members_cached(cid)
        await self.hub.route(members - {s.user_id}, pb.ServerEvent(typing=pb.Typing(
            conversation_id=str(cid), user_id=str(s.user_id), typing=e.typing)))
