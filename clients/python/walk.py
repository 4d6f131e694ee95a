"""The client walk in Python: the reference the Go, Java, TypeScript and Rust programs follow.

Every step a user takes, through the generated stubs only (no SDK helper):
register and log in, shorten and resolve a link, follow a user and read the
home timeline page by page, exchange chat messages over the `Connect` stream
(with receipts), upload a file through the `Upload` stream and resume it once,
and read the `google.rpc.BadRequest` details of a refused request. The
summary goes to stdout as one JSON line; progress goes to stderr.

    SYSDESIGN_WALK_USERNAME=ada SYSDESIGN_WALK_PASSWORD=correct-horse \\
    SYSDESIGN_WALK_PEER=bob SYSDESIGN_WALK_FILE=photo.png python clients/python/walk.py
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from sysdesign.chat.v1 import chat_pb2 as chat
from sysdesign.chat.v1 import chat_pb2_grpc as chat_grpc
from sysdesign.feed.v1 import feed_pb2 as feed
from sysdesign.feed.v1 import feed_pb2_grpc as feed_grpc
from sysdesign.identity.v1 import identity_pb2 as identity
from sysdesign.identity.v1 import identity_pb2_grpc as identity_grpc
from sysdesign.media.v1 import media_pb2 as media
from sysdesign.media.v1 import media_pb2_grpc as media_grpc
from sysdesign.shortener.v1 import shortener_pb2 as shortener
from sysdesign.shortener.v1 import shortener_pb2_grpc as shortener_grpc


def say(msg: str) -> None:
    print(f"· {msg}", file=sys.stderr, flush=True)


def open_channel() -> grpc.Channel:
    addr = os.environ.get("SYSDESIGN_GRPC_ADDR", "127.0.0.1:50051")
    options: list[tuple[str, Any]] = []
    config = os.environ.get("SYSDESIGN_SERVICE_CONFIG")
    if config:  # the shared retry policy (clients/service_config.json)
        options += [("grpc.service_config", Path(config).read_text()), ("grpc.enable_retries", 1)]
    return grpc.insecure_channel(addr, options=options)


def main() -> int:
    username = os.environ["SYSDESIGN_WALK_USERNAME"]
    password = os.environ["SYSDESIGN_WALK_PASSWORD"]
    peer_name = os.environ["SYSDESIGN_WALK_PEER"]
    upload_path = Path(os.environ["SYSDESIGN_WALK_FILE"])
    out: dict[str, Any] = {"username": username}
    ch = open_channel()

    # 1. Register, then log in for a bearer token.
    ids = identity_grpc.IdentityServiceStub(ch)
    user = ids.RegisterUser(identity.RegisterUserRequest(username=username, password=password)).user
    login = ids.Login(identity.LoginRequest(username=username, password=password))
    md = (("authorization", f"Bearer {login.access_token}"),)
    out["user_id"] = user.user_id
    say(f"registered {username} ({user.user_id})")

    # 2. Shorten a link and resolve it.
    links = shortener_grpc.ShortenerServiceStub(ch)
    long_url = f"https://example.com/walk/{username}"
    short = links.CreateShortUrl(shortener.CreateShortUrlRequest(long_url=long_url), metadata=md).short_url
    resolved = links.ResolveShortUrl(shortener.ResolveShortUrlRequest(code=short.code), metadata=md)
    out.update(short_code=short.code, long_url=long_url, resolved_url=resolved.long_url)
    say(f"{short.short_url} -> {resolved.long_url}")

    # 3. Follow the peer, post, and read the home timeline two posts a page.
    graph = feed_grpc.GraphServiceStub(ch)
    graph.FollowUser(feed.FollowUserRequest(user=feed.UserRef(username=peer_name)), metadata=md)
    posts = feed_grpc.PostServiceStub(ch)
    out["post_id"] = posts.CreatePost(feed.CreatePostRequest(text=f"hello from {username}"),
                                      metadata=md).post.post_id
    timeline = feed_grpc.TimelineServiceStub(ch)
    seen: list[feed.Post] = []
    token, pages = "", 0
    while True:
        page = timeline.GetHomeTimeline(feed.GetHomeTimelineRequest(page_size=2, page_token=token), metadata=md)
        seen += page.posts
        pages += 1
        token = page.next_page_token
        if not token:
            break
    out.update(timeline_post_ids=[p.post_id for p in seen], timeline_pages=pages,
               peer_post_ids=[p.post_id for p in seen if p.author_username == peer_name])
    say(f"home timeline: {len(seen)} posts in {pages} pages")

    # 4. Chat: a direct conversation, one message over Connect, the echo and the read receipt.
    chats = chat_grpc.ChatServiceStub(ch)
    conv = chats.CreateConversation(chat.CreateConversationRequest(
        type=chat.CONVERSATION_TYPE_DIRECT, member_usernames=[peer_name]), metadata=md).conversation
    outbox: queue.Queue[chat.ClientEvent | None] = queue.Queue()

    def events() -> Iterator[chat.ClientEvent]:
        yield chat.ClientEvent(hello=chat.Hello(device_id="walk-python"))
        while (ev := outbox.get()) is not None:
            yield ev

    stream = chats.Connect(events(), metadata=md)
    text = f"hello from {username}"
    sent_id = echo = read_up_to = ""
    deadline = time.monotonic() + 60
    for ev in stream:
        kind = ev.WhichOneof("event")
        if kind == "synced":
            outbox.put(chat.ClientEvent(send=chat.SendEvent(
                client_message_id="walk-1", conversation_id=conv.conversation_id, text=text)))
        elif kind == "send_ack":
            sent_id = ev.send_ack.message.message_id
        elif kind == "message" and ev.message.sender_username == peer_name:
            echo = ev.message.text
            outbox.put(chat.ClientEvent(mark_read=chat.MarkReadEvent(
                conversation_id=conv.conversation_id, up_to_message_id=ev.message.message_id)))
        elif (kind == "receipt" and ev.receipt.user_id != user.user_id
              and ev.receipt.status == chat.RECEIPT_STATUS_READ):
            read_up_to = ev.receipt.up_to_message_id
        if (sent_id and echo and read_up_to >= sent_id) or time.monotonic() > deadline:
            break
    outbox.put(None)
    stream.cancel()
    out.update(conversation_id=conv.conversation_id, sent_text=text, sent_message_id=sent_id,
               echo_text=echo, read_up_to=read_up_to)
    say(f"chat: sent {sent_id}, got {echo!r}, read up to {read_up_to}")

    # 5. Upload in two streams: the first stops halfway, the second resumes at the committed offset.
    data = upload_path.read_bytes()
    files = media_grpc.MediaServiceStub(ch)
    up = files.CreateUpload(media.CreateUploadRequest(
        filename=upload_path.name, content_type="image/png", size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest()), metadata=md).upload
    chunk = up.chunk_size_hint or (1 << 20)

    def chunks(start: int, stop: int) -> Iterator[media.UploadRequest]:
        for off in range(start, stop, chunk):
            yield media.UploadRequest(upload_id=up.upload_id, offset=off, data=data[off:min(off + chunk, stop)])

    files.Upload(chunks(0, len(data) // 2), metadata=md)  # the stream ends early, as a dropped connection would
    committed = files.GetUpload(media.GetUploadRequest(upload_id=up.upload_id), metadata=md).upload.committed_bytes
    done = files.Upload(chunks(committed, len(data)), metadata=md).upload
    out.update(upload_id=up.upload_id, resumed_from=committed, committed_bytes=done.committed_bytes)
    say(f"upload: resumed at {committed}, {done.committed_bytes}/{len(data)} bytes stored")

    # 6. A refused request: INVALID_ARGUMENT with google.rpc.BadRequest field violations.
    try:
        links.CreateShortUrl(shortener.CreateShortUrlRequest(long_url="not a url"), metadata=md)
        raise SystemExit("a bad long_url was accepted")
    except grpc.RpcError as err:
        fields = []
        for key, value in err.trailing_metadata() or ():
            if key == "grpc-status-details-bin":
                status = status_pb2.Status.FromString(value)
                for detail in status.details:
                    if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                        bad = error_details_pb2.BadRequest()
                        detail.Unpack(bad)
                        fields += [v.field for v in bad.field_violations]
        out.update(bad_request_code=err.code().name, bad_request_fields=fields)
        say(f"bad request: {err.code().name} {fields}")

    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
