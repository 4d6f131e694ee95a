"""Chat over the real stack: streams, replay, receipts, presence, groups, attachments, bad input."""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.error
import urllib.request
import uuid

import grpc
import pytest
from google.rpc import code_pb2
from sysdesign.chat.v1 import chat_pb2 as pb
from sysdesign.chat.v1 import chat_pb2_grpc as pbg

from tests.integration.helpers import error_reason, expect_error, grpc_metadata, violations
from tests.integration.test_chat_support import Device
from tests.stack import StackProcess

pytestmark = [pytest.mark.tables, pytest.mark.redis_cluster]


def _user(stack: StackProcess, prefix: str) -> tuple[str, str, str]:
    """(username, token, user id) of a fresh user."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    token = stack.token(name)
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    return name, token, claims["sub"]


def _stub(stack: StackProcess) -> pbg.ChatServiceStub:
    return pbg.ChatServiceStub(stack.channel())


def _direct(stack: StackProcess, token: str, other_name: str) -> pb.CreateConversationResponse:
    return _stub(stack).CreateConversation(pb.CreateConversationRequest(
        type=pb.CONVERSATION_TYPE_DIRECT, member_usernames=[other_name]),
        metadata=grpc_metadata(token), timeout=30)


def _history_ids(stack: StackProcess, token: str, cid: str) -> list[int]:
    out: list[int] = []
    tok = ""
    while True:
        r = _stub(stack).GetHistory(pb.GetHistoryRequest(conversation_id=cid, page_size=200,
                                                         page_token=tok),
                                    metadata=grpc_metadata(token), timeout=30)
        out.extend(int(m.message_id) for m in r.messages)
        tok = r.next_page_token
        if not tok:
            return out


async def test_two_devices_talk_live_with_receipts(stack: StackProcess) -> None:
    a_name, a_tok, a_id = _user(stack, "ann")
    b_name, b_tok, b_id = _user(stack, "ben")
    conv = _direct(stack, a_tok, b_name)
    assert conv.created and conv.conversation.type == pb.CONVERSATION_TYPE_DIRECT
    assert {m.user_id for m in conv.conversation.members} == {a_id, b_id}
    again = _direct(stack, b_tok, a_name)  # one conversation per pair, from either side
    assert not again.created
    assert again.conversation.conversation_id == conv.conversation.conversation_id
    cid = conv.conversation.conversation_id

    a = await Device(stack.grpc_addr, a_tok, "ann-phone").connect()
    b = await Device(stack.grpc_addr, b_tok, "ben-phone").connect(hello=True)
    try:
        await a.synced.wait()
        await b.synced.wait()
        ack = await a.send(cid, "hi ben")
        assert ack.WhichOneof("event") == "send_ack", ack
        msg = ack.send_ack.message
        assert msg.sender_id == a_id and msg.text == "hi ben" and int(msg.message_id) > 0
        await b.wait_for(lambda: msg.message_id in b.seen.get(cid, {}), what="the message")
        assert b.seen[cid][msg.message_id].sender_username == a_name
        # b's device acknowledged it: a sees DELIVERED, then READ after b marks it read.
        await a.wait_for(lambda: any(r.status == pb.RECEIPT_STATUS_DELIVERED and
                                     r.user_id == b_id and r.up_to_message_id == msg.message_id
                                     for r in a.of_kind("receipt")), what="DELIVERED")
        # ben's second device got the message too, and sees the read state of the first
        b2 = await Device(stack.grpc_addr, b_tok, "ben-laptop").connect()
        await b2.synced.wait()
        assert msg.message_id in b2.seen[cid]
        b.put(pb.ClientEvent(mark_read=pb.MarkReadEvent(conversation_id=cid,
                                                        up_to_message_id=msg.message_id)))
        await a.wait_for(lambda: any(r.status == pb.RECEIPT_STATUS_READ and r.user_id == b_id
                                     for r in a.of_kind("receipt")), what="READ")
        await b2.wait_for(lambda: any(r.status == pb.RECEIPT_STATUS_READ and r.user_id == b_id
                                      and r.up_to_message_id == msg.message_id
                                      for r in b2.of_kind("receipt")), what="read sync")
        await b2.close()
        rec = _stub(stack).GetReceipts(pb.GetReceiptsRequest(conversation_id=cid),
                                       metadata=grpc_metadata(a_tok), timeout=30)
        by_user = {r.user_id: r for r in rec.receipts}
        assert by_user[b_id].read_up_to_message_id == msg.message_id
        assert by_user[b_id].delivered_up_to_message_id == msg.message_id
        # typing goes to the other member only
        a.put(pb.ClientEvent(typing=pb.TypingEvent(conversation_id=cid, typing=True)))
        await b.wait_for(lambda: any(t.user_id == a_id and t.typing for t in b.of_kind("typing")),
                         what="typing")
        assert not a.of_kind("typing")
    finally:
        await a.close()
        await b.close()


async def test_offline_recipient_gets_everything_on_connect_then_nothing_twice(
        stack: StackProcess) -> None:
    _a_name, a_tok, _ = _user(stack, "cat")
    b_name, b_tok, _ = _user(stack, "dan")
    cid = _direct(stack, a_tok, b_name).conversation.conversation_id
    stub = _stub(stack)
    sent = [stub.SendMessage(pb.SendMessageRequest(client_message_id=f"m{i}", conversation_id=cid,
                                                   text=f"message {i}"),
                             metadata=grpc_metadata(a_tok), timeout=30).message.message_id
            for i in range(30)]
    assert [int(x) for x in sent] == sorted(int(x) for x in sent)
    b = await Device(stack.grpc_addr, b_tok, "dan-laptop").connect()
    try:
        await b.synced.wait()
        synced = b.of_kind("synced")[0]
        assert synced.replayed == 30 and synced.heartbeat_interval_seconds > 0
        assert b.arrivals[cid] == [int(x) for x in sent]  # in order, each once
    finally:
        await b.close()
    # the device acknowledged everything: a reconnect replays nothing (after the cursor flush)
    for _ in range(40):
        b = await Device(stack.grpc_addr, b_tok, "dan-laptop").connect()
        await b.synced.wait()
        n = b.of_kind("synced")[0].replayed
        await b.close()
        if n == 0:
            break
        await asyncio.sleep(0.5)
    assert n == 0
    # a second device of the same user gets everything too (multi-device)
    b2 = await Device(stack.grpc_addr, b_tok, "dan-tablet").connect()
    try:
        await b2.synced.wait()
        assert b2.arrivals[cid] == [int(x) for x in sent]
    finally:
        await b2.close()


async def test_resend_is_stored_once(stack: StackProcess) -> None:
    _a_name, a_tok, _ = _user(stack, "eve")
    b_name, b_tok, _ = _user(stack, "fay")
    cid = _direct(stack, a_tok, b_name).conversation.conversation_id
    a = await Device(stack.grpc_addr, a_tok, "eve-1").connect()
    try:
        await a.synced.wait()
        first = await a.send(cid, "only once", client_message_id="same-id")
        second = await a.send(cid, "only once", client_message_id="same-id")
        assert first.send_ack.message.message_id == second.send_ack.message.message_id
        assert not first.send_ack.duplicate and second.send_ack.duplicate
    finally:
        await a.close()
    unary = _stub(stack).SendMessage(pb.SendMessageRequest(
        client_message_id="same-id", conversation_id=cid, text="only once"),
        metadata=grpc_metadata(a_tok), timeout=30)
    assert unary.duplicate and unary.message.message_id == first.send_ack.message.message_id
    assert _history_ids(stack, b_tok, cid) == [int(first.send_ack.message.message_id)]


async def test_bad_events_get_per_event_errors_and_the_stream_survives(
        stack: StackProcess) -> None:
    _a_name, a_tok, _ = _user(stack, "gus")
    b_name, _b_tok, _ = _user(stack, "hal")
    _, c_tok, _ = _user(stack, "ivy")
    cid = _direct(stack, a_tok, b_name).conversation.conversation_id
    a = await Device(stack.grpc_addr, a_tok, "gus-1").connect()
    try:
        await a.synced.wait()
        empty = await a.send(cid, "   ")
        assert empty.error.code == code_pb2.INVALID_ARGUMENT
        assert [v.field for v in empty.error.field_violations] == ["text"]
        huge = await a.send(cid, "x" * 5000)
        assert huge.error.code == code_pb2.INVALID_ARGUMENT and "4096" in \
            huge.error.field_violations[0].description
        unknown = await a.send("123456789", "hello?")
        assert unknown.error.code == code_pb2.NOT_FOUND
        assert unknown.error.reason == "CONVERSATION_NOT_FOUND"
        bad_id = await a.send("not-a-number", "hello?")
        assert bad_id.error.code == code_pb2.INVALID_ARGUMENT
        assert bad_id.error.field_violations[0].field == "conversation_id"
        a.put(pb.ClientEvent(event_id="nothing"))
        a.put(pb.ClientEvent(event_id="again", hello=pb.Hello(device_id="x")))
        await a.wait_for(lambda: {e.event_id for e in a.of_kind("error")} >= {"nothing", "again"},
                         what="errors for empty and repeated hello")
        ok = await a.send(cid, "still here")
        assert ok.WhichOneof("event") == "send_ack"
    finally:
        await a.close()
    assert _history_ids(stack, a_tok, cid) == [int(ok.send_ack.message.message_id)]
    # a non-member cannot send, read or see presence
    c = await Device(stack.grpc_addr, c_tok, "ivy-1").connect()
    try:
        await c.synced.wait()
        denied = await c.send(cid, "let me in")
        assert denied.error.code == code_pb2.PERMISSION_DENIED
        assert denied.error.reason == "NOT_A_MEMBER"
    finally:
        await c.close()
    stub = _stub(stack)
    err = expect_error(grpc.StatusCode.PERMISSION_DENIED, stub.GetHistory,
                       pb.GetHistoryRequest(conversation_id=cid), metadata=grpc_metadata(c_tok))
    assert error_reason(err) == "NOT_A_MEMBER"
    conv = stub.GetConversation(pb.GetConversationRequest(conversation_id=cid),
                                metadata=grpc_metadata(a_tok), timeout=30).conversation
    b_id = next(m.user_id for m in conv.members if m.username == b_name)
    expect_error(grpc.StatusCode.PERMISSION_DENIED, stub.GetPresence,
                 pb.GetPresenceRequest(user_ids=[b_id]), metadata=grpc_metadata(c_tok))
    assert _history_ids(stack, a_tok, cid) == [int(ok.send_ack.message.message_id)]


def test_malformed_stream_bytes_are_an_event_error(stack: StackProcess) -> None:
    """Raw bytes that are not a ClientEvent: an error event, not a dead stream."""
    _, tok, _ = _user(stack, "jon")
    ch = stack.channel()
    call = ch.stream_stream("/sysdesign.chat.v1.ChatService/Connect",
                            request_serializer=lambda b: b,
                            response_deserializer=pb.ServerEvent.FromString)
    hb = pb.ClientEvent(event_id="hb", heartbeat=pb.HeartbeatEvent()).SerializeToString()
    events = []
    for ev in call(iter([b"\xff\xff\xff", hb]), metadata=grpc_metadata(tok, ("x-device-id", "raw")),
                   timeout=30):
        events.append(ev)
        if ev.WhichOneof("event") == "heartbeat_ack":
            break
    errors = [e.error for e in events if e.WhichOneof("event") == "error"]
    assert errors and errors[0].code == code_pb2.INVALID_ARGUMENT
    assert errors[0].field_violations[0].field == "event"


def test_stream_without_device_id_is_refused(stack: StackProcess) -> None:
    _, tok, _ = _user(stack, "kim")
    stub = _stub(stack)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Connect(iter([pb.ClientEvent(heartbeat=pb.HeartbeatEvent())]),
                          metadata=grpc_metadata(tok), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hello" in violations(info.value)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Connect(iter([pb.ClientEvent(hello=pb.Hello(device_id="bad device!"))]),
                          metadata=grpc_metadata(tok), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hello.device_id" in violations(info.value)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Connect(iter([]), metadata=grpc_metadata(None, ("x-device-id", "d")), timeout=30))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_groups_membership_and_limits(stack: StackProcess) -> None:
    stub = _stub(stack)
    _owner, o_tok, o_id = _user(stack, "own")
    m1, m1_tok, m1_id = _user(stack, "mem")
    _m2, m2_tok, m2_id = _user(stack, "mem")
    g = stub.CreateConversation(pb.CreateConversationRequest(
        type=pb.CONVERSATION_TYPE_GROUP, title="team", member_usernames=[m1]),
        metadata=grpc_metadata(o_tok), timeout=30).conversation
    roles = {m.user_id: m.role for m in g.members}
    assert roles == {o_id: pb.MEMBER_ROLE_ADMIN, m1_id: pb.MEMBER_ROLE_MEMBER}
    # only admins add; the group grows; members leave
    expect_error(grpc.StatusCode.PERMISSION_DENIED, stub.AddConversationMembers,
                 pb.AddConversationMembersRequest(conversation_id=g.conversation_id,
                                                  member_ids=[m2_id]),
                 metadata=grpc_metadata(m1_tok))
    g2 = stub.AddConversationMembers(pb.AddConversationMembersRequest(
        conversation_id=g.conversation_id, member_ids=[m2_id]), metadata=grpc_metadata(o_tok),
        timeout=30).conversation
    assert len(g2.members) == 3
    sent = stub.SendMessage(pb.SendMessageRequest(client_message_id="g1",
                                                  conversation_id=g.conversation_id, text="hey"),
                            metadata=grpc_metadata(m2_tok), timeout=30).message
    stub.LeaveConversation(pb.LeaveConversationRequest(conversation_id=g.conversation_id),
                           metadata=grpc_metadata(m2_tok), timeout=30)
    expect_error(grpc.StatusCode.PERMISSION_DENIED, stub.SendMessage,
                 pb.SendMessageRequest(client_message_id="g2", conversation_id=g.conversation_id,
                                       text="back?"), metadata=grpc_metadata(m2_tok))
    stub.RemoveConversationMember(pb.RemoveConversationMemberRequest(
        conversation_id=g.conversation_id, user_id=m1_id), metadata=grpc_metadata(o_tok),
        timeout=30)
    expect_error(grpc.StatusCode.PERMISSION_DENIED, stub.GetHistory,
                 pb.GetHistoryRequest(conversation_id=g.conversation_id),
                 metadata=grpc_metadata(m1_tok))
    assert _history_ids(stack, o_tok, g.conversation_id) == [int(sent.message_id)]
    # over 500 members: refused before anything is stored
    before = stub.ListConversations(pb.ListConversationsRequest(page_size=100),
                                    metadata=grpc_metadata(o_tok), timeout=30)
    err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, stub.CreateConversation,
                       pb.CreateConversationRequest(type=pb.CONVERSATION_TYPE_GROUP, title="big",
                                                    member_ids=[str(10**12 + i)
                                                                for i in range(500)]),
                       metadata=grpc_metadata(o_tok))
    assert "500" in violations(err)["member_ids"]
    err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, stub.CreateConversation,
                       pb.CreateConversationRequest(type=pb.CONVERSATION_TYPE_GROUP,
                                                    member_usernames=["nobody_like_this"]),
                       metadata=grpc_metadata(o_tok))
    assert "title" in violations(err)
    err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, stub.CreateConversation,
                       pb.CreateConversationRequest(type=pb.CONVERSATION_TYPE_DIRECT,
                                                    member_usernames=["nobody_like_this"]),
                       metadata=grpc_metadata(o_tok))
    assert "member_usernames[0]" in violations(err)
    after = stub.ListConversations(pb.ListConversationsRequest(page_size=100),
                                   metadata=grpc_metadata(o_tok), timeout=30)
    assert len(after.conversations) == len(before.conversations)


def test_history_pages_backwards_and_list_counts_unread(stack: StackProcess) -> None:
    stub = _stub(stack)
    _a_name, a_tok, _ = _user(stack, "lee")
    b_name, b_tok, _ = _user(stack, "mia")
    cid = _direct(stack, a_tok, b_name).conversation.conversation_id
    ids = [int(stub.SendMessage(pb.SendMessageRequest(client_message_id=f"h{i}",
                                                      conversation_id=cid, text=f"#{i}"),
                                metadata=grpc_metadata(a_tok), timeout=30).message.message_id)
           for i in range(25)]
    page1 = stub.GetHistory(pb.GetHistoryRequest(conversation_id=cid, page_size=10),
                            metadata=grpc_metadata(b_tok), timeout=30)
    assert [int(m.message_id) for m in page1.messages] == ids[::-1][:10]
    page2 = stub.GetHistory(pb.GetHistoryRequest(conversation_id=cid, page_size=10,
                                                 page_token=page1.next_page_token),
                            metadata=grpc_metadata(b_tok), timeout=30)
    assert [int(m.message_id) for m in page2.messages] == ids[::-1][10:20]
    mid = stub.GetHistory(pb.GetHistoryRequest(conversation_id=cid, page_size=3,
                                               before_message_id=str(ids[5])),
                          metadata=grpc_metadata(b_tok), timeout=30)
    assert [int(m.message_id) for m in mid.messages] == [ids[4], ids[3], ids[2]]
    assert _history_ids(stack, b_tok, cid) == ids[::-1]
    summary = next(c for c in stub.ListConversations(pb.ListConversationsRequest(),
                                                     metadata=grpc_metadata(b_tok),
                                                     timeout=30).conversations
                   if c.conversation.conversation_id == cid)
    assert summary.unread_count == 25 and int(summary.last_message.message_id) == ids[-1]
    stub.MarkRead(pb.MarkReadRequest(conversation_id=cid, up_to_message_id=str(ids[19])),
                  metadata=grpc_metadata(b_tok), timeout=30)
    summary = next(c for c in stub.ListConversations(pb.ListConversationsRequest(),
                                                     metadata=grpc_metadata(b_tok),
                                                     timeout=30).conversations
                   if c.conversation.conversation_id == cid)
    assert summary.unread_count == 5 and summary.read_up_to_message_id == str(ids[19])
    err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, stub.GetHistory,
                       pb.GetHistoryRequest(conversation_id=cid, page_token="garbage!"),
                       metadata=grpc_metadata(b_tok))
    assert "page_token" in violations(err)


async def test_presence_for_contacts(stack: StackProcess) -> None:
    _a_name, a_tok, a_id = _user(stack, "nia")
    b_name, b_tok, b_id = _user(stack, "oli")
    _direct(stack, a_tok, b_name)
    stub = _stub(stack)
    p = stub.GetPresence(pb.GetPresenceRequest(user_ids=[b_id]), metadata=grpc_metadata(a_tok),
                         timeout=30).presences[0]
    assert not p.online
    a = await Device(stack.grpc_addr, a_tok, "nia-1").connect()
    await a.synced.wait()
    b = await Device(stack.grpc_addr, b_tok, "oli-1").connect()
    try:
        await b.synced.wait()
        await a.wait_for(lambda: any(x.user_id == b_id and x.online for x in a.of_kind("presence")),
                         what="b online")
        # b came second: nothing changed for a, yet b is told a is online
        await b.wait_for(lambda: any(x.user_id == a_id and x.online
                                     for x in b.of_kind("presence")), what="a online, seen by b")
        p = stub.GetPresence(pb.GetPresenceRequest(user_ids=[b_id]),
                             metadata=grpc_metadata(a_tok), timeout=30).presences[0]
        assert p.online and p.last_seen_time.seconds > 0
        b.put(pb.ClientEvent(heartbeat=pb.HeartbeatEvent()))
        await b.wait_for(lambda: bool(b.of_kind("heartbeat_ack")), what="heartbeat ack")
        await b.close()
        await a.wait_for(lambda: any(x.user_id == b_id and not x.online
                                     for x in a.of_kind("presence")), what="b offline")
        p = stub.GetPresence(pb.GetPresenceRequest(user_ids=[b_id]),
                             metadata=grpc_metadata(a_tok), timeout=30).presences[0]
        assert not p.online and p.last_seen_time.seconds > 0
    finally:
        await a.close()
        await b.close()


def test_attachments_upload_and_signed_urls(stack: StackProcess) -> None:
    stub = _stub(stack)
    _a_name, a_tok, _ = _user(stack, "pam")
    b_name, b_tok, _ = _user(stack, "quin")
    _, c_tok, _ = _user(stack, "ray")
    cid = _direct(stack, a_tok, b_name).conversation.conversation_id
    data = bytes(range(256)) * 5000  # 1.28 MB: two chunks

    def parts(size: int, payload: bytes, conv: str = cid):
        yield pb.UploadAttachmentRequest(metadata=pb.AttachmentMetadata(
            conversation_id=conv, filename="photo.png", content_type="image/png",
            size_bytes=size))
        for i in range(0, len(payload), 1 << 20):
            yield pb.UploadAttachmentRequest(chunk=payload[i:i + (1 << 20)])

    up = stub.UploadAttachment(parts(len(data), data), metadata=grpc_metadata(a_tok), timeout=60)
    assert up.attachment.size_bytes == len(data)
    msg = stub.SendMessage(pb.SendMessageRequest(
        client_message_id="att", conversation_id=cid, attachment_id=up.attachment.attachment_id),
        metadata=grpc_metadata(a_tok), timeout=30).message
    assert msg.attachment.filename == "photo.png" and msg.text == ""
    url = stub.GetAttachmentUrl(pb.GetAttachmentUrlRequest(
        conversation_id=cid, attachment_id=msg.attachment.attachment_id),
        metadata=grpc_metadata(b_tok), timeout=30)
    assert url.url.startswith(stack.http_base + "/chat/attachments/")
    with urllib.request.urlopen(url.url, timeout=30) as resp:
        assert resp.read() == data
        assert resp.headers["Content-Type"] == "image/png"
    tampered = url.url.replace("sig=", "sig=0")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(tampered, timeout=30)
    assert info.value.code == 403
    # non-members cannot get a URL or upload; sizes are enforced; nothing stored for bad input
    expect_error(grpc.StatusCode.PERMISSION_DENIED, stub.GetAttachmentUrl,
                 pb.GetAttachmentUrlRequest(conversation_id=cid,
                                            attachment_id=msg.attachment.attachment_id),
                 metadata=grpc_metadata(c_tok))
    expect_error(grpc.StatusCode.PERMISSION_DENIED, stub.UploadAttachment, parts(3, b"abc"),
                 metadata=grpc_metadata(c_tok))
    err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, stub.UploadAttachment,
                       parts(11 * 1024 * 1024, b"x"), metadata=grpc_metadata(a_tok))
    assert "metadata.size_bytes" in violations(err)
    err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, stub.UploadAttachment,
                       parts(10, b"more than ten bytes"), metadata=grpc_metadata(a_tok))
    assert "chunk" in violations(err)
    err = expect_error(grpc.StatusCode.NOT_FOUND, stub.SendMessage,
                       pb.SendMessageRequest(client_message_id="att2", conversation_id=cid,
                                             attachment_id="99999"),
                       metadata=grpc_metadata(a_tok))
    assert error_reason(err) == "ATTACHMENT_NOT_FOUND"
    assert _history_ids(stack, a_tok, cid) == [int(msg.message_id)]


def test_cli_send_history_and_conversations(stack: StackProcess) -> None:
    import subprocess
    import sys

    from tests.stack import ROOT

    a_name, _, _ = _user(stack, "cli")
    b_name, b_tok, _ = _user(stack, "cli")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "clients.cli", "chat", *args],
                              env=stack.env(), cwd=str(ROOT), capture_output=True, text=True,
                              timeout=60)

    sent = cli("send", "--user", a_name, "--to", b_name, "hello from the CLI")
    assert sent.returncode == 0, sent.stderr
    mid = sent.stdout.strip()
    assert mid.isdigit()
    again = cli("send", "--user", a_name, "--to", b_name, "--client-message-id", "fixed", "once")
    dup = cli("send", "--user", a_name, "--to", b_name, "--client-message-id", "fixed", "once")
    assert dup.stdout.strip() == again.stdout.strip() and "duplicate" in dup.stderr
    hist = cli("history", "--user", b_name, "--to", a_name)
    assert hist.returncode == 0 and "hello from the CLI" in hist.stdout and mid in hist.stdout
    assert hist.stdout.count("once") == 1
    convs = cli("conversations", "--user", b_name)
    assert convs.returncode == 0 and a_name in convs.stdout
    bad = cli("send", "--user", a_name, "--to", b_name, "")
    assert bad.returncode == 1 and "text" in bad.stderr
    assert _history_ids(stack, b_tok, _direct(stack, b_tok, a_name).conversation.conversation_id)


async def test_same_device_connecting_again_ends_the_old_stream(stack: StackProcess) -> None:
    _, tok, _ = _user(stack, "dup")
    first = await Device(stack.grpc_addr, tok, "one-phone").connect()
    await first.synced.wait()
    second = await Device(stack.grpc_addr, tok, "one-phone").connect()
    try:
        await second.synced.wait()
        await first.wait_for(lambda: first.ended.is_set(), what="the old stream to end")
        assert first.error is not None and first.error.code() == grpc.StatusCode.UNAVAILABLE
        assert error_reason(first.error) == "STREAM_ENDED"
        assert not second.ended.is_set()
    finally:
        await first.close()
        await second.close()
