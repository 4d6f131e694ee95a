"""The walk every generated client (Go, Java, TypeScript, Rust) takes against a live stack.

Each language's test module builds its program with that ecosystem's tools and
runs it with :func:`run_walk`; the program does what `clients/README.md`
describes and prints one JSON summary line, and :func:`check_walk` proves every
step against the server from Python: the link resolves, the timeline held the
peer's posts, the peer received the message and read it, the upload is whole,
the rich error named its field.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from sysdesign.chat.v1 import chat_pb2 as chat
from sysdesign.chat.v1 import chat_pb2_grpc as chat_grpc
from sysdesign.feed.v1 import feed_pb2 as feed
from sysdesign.feed.v1 import feed_pb2_grpc as feed_grpc
from sysdesign.media.v1 import media_pb2 as media
from sysdesign.media.v1 import media_pb2_grpc as media_grpc
from sysdesign.shortener.v1 import shortener_pb2 as shortener
from sysdesign.shortener.v1 import shortener_pb2_grpc as shortener_grpc

from tests.stack import ROOT, StackProcess

PEER_POSTS = 5


def require_toolchain(language: str, *binaries: str) -> None:
    """Skip with one line when a toolchain is missing; under CI=true that is a failure."""
    missing = [b for b in binaries if shutil.which(b) is None]
    if not missing:
        return
    why = f"{language} client skipped: {', '.join(missing)} not on PATH"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true: the {language} client may not be skipped ({why})")
    pytest.skip(why)


def build(argv: list[str], cwd: Path, *, timeout: float = 1200, env: dict[str, str] | None = None) -> None:
    """Run a build step; its output is shown only when it fails."""
    out = subprocess.run(argv, cwd=str(cwd), capture_output=True, timeout=timeout,
                         env={**os.environ, **(env or {})})
    assert out.returncode == 0, (f"{' '.join(argv)} failed ({out.returncode}) in {cwd}:\n"
                                 f"{out.stdout.decode()[-4000:]}\n{out.stderr.decode()[-6000:]}")


@dataclass
class ChatPeer:
    """A Python user on the other end: echoes every message it gets and marks it read."""

    stack: StackProcess
    username: str
    token: str
    user_id: str = ""
    received: list[Any] = field(default_factory=list)
    _outbox: queue.Queue[Any] = field(default_factory=queue.Queue)
    _thread: threading.Thread | None = None
    _call: Any = None
    _synced: threading.Event = field(default_factory=threading.Event)

    @property
    def md(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)

    def start(self) -> ChatPeer:
        channel = self.stack.channel()
        stub = chat_grpc.ChatServiceStub(channel)

        def events() -> Iterator[Any]:
            yield chat.ClientEvent(hello=chat.Hello(device_id="python-peer"))
            while True:
                ev = self._outbox.get()
                if ev is None:
                    return
                yield ev

        self._call = stub.Connect(events(), metadata=self.md)

        def run() -> None:
            try:
                for ev in self._call:
                    kind = ev.WhichOneof("event")
                    if kind == "synced":
                        self._synced.set()
                    elif kind == "message" and ev.message.sender_username != self.username:
                        m = ev.message
                        self.received.append(m)
                        self._outbox.put(chat.ClientEvent(ack_delivered=chat.AckDeliveredEvent(
                            conversation_id=m.conversation_id, up_to_message_id=m.message_id)))
                        self._outbox.put(chat.ClientEvent(mark_read=chat.MarkReadEvent(
                            conversation_id=m.conversation_id, up_to_message_id=m.message_id)))
                        self._outbox.put(chat.ClientEvent(send=chat.SendEvent(
                            client_message_id=f"echo-{m.message_id}", conversation_id=m.conversation_id,
                            text=f"echo: {m.text}")))
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.CANCELLED:
                    raise

        self._thread = threading.Thread(target=run, name="chat-peer", daemon=True)
        self._thread.start()
        assert self._synced.wait(60), "the peer's chat stream never synced:\n" + self.stack.logs()[-3000:]
        return self

    def stop(self) -> None:
        self._outbox.put(None)
        if self._call is not None:
            self._call.cancel()
        if self._thread is not None:
            self._thread.join(10)


@pytest.fixture(scope="module")
def walk_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProcess]:
    s = StackProcess(tmp_path_factory.mktemp("clients") / "data").start()
    yield s
    code = s.stop()
    assert code == 0, f"stack exited with {code} on SIGTERM:\n{s.logs()}"


@pytest.fixture(scope="module")
def peer(walk_stack: StackProcess) -> Iterator[ChatPeer]:
    """A user with posts to follow, connected to chat for the whole module."""
    name = "peer_" + uuid.uuid4().hex[:8]
    p = ChatPeer(walk_stack, name, walk_stack.token(name))
    with walk_stack.channel() as ch:
        posts = feed_grpc.PostServiceStub(ch)
        for i in range(PEER_POSTS):
            r = posts.CreatePost(feed.CreatePostRequest(text=f"post {i} by {name}"), metadata=p.md)
            p.user_id = r.post.author_id
    p.start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def upload_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real PNG of noise, about 3 MiB: several of the server's upload chunks, so a resume means something."""
    from servers.media.ffmpeg import ffmpeg_exe

    path = tmp_path_factory.mktemp("upload") / "noise.png"
    r = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-f", "lavfi", "-i",
                        "nullsrc=s=1024x1024,geq=random(1)*255:random(2)*255:random(3)*255",
                        "-frames:v", "1", str(path)], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    return path


def run_walk(stack: StackProcess, peer: ChatPeer, upload: Path, argv: list[str], cwd: Path, *,
             language: str, timeout: float = 300, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a client's walk; returns its JSON summary (the last stdout line)."""
    username = f"{language}_" + uuid.uuid4().hex[:8]
    walk_env = {
        **os.environ,
        "SYSDESIGN_GRPC_ADDR": stack.grpc_addr,
        "SYSDESIGN_EDGE_URL": stack.http_base,
        "SYSDESIGN_WALK_USERNAME": username,
        "SYSDESIGN_WALK_PASSWORD": "walk-" + uuid.uuid4().hex,
        "SYSDESIGN_WALK_PEER": peer.username,
        "SYSDESIGN_WALK_FILE": str(upload),
        "SYSDESIGN_SERVICE_CONFIG": str(ROOT / "clients" / "service_config.json"),
        **(env or {}),
    }
    out = subprocess.run(argv, cwd=str(cwd), env=walk_env, capture_output=True, timeout=timeout)
    stdout, stderr = out.stdout.decode(), out.stderr.decode()
    assert out.returncode == 0, (f"the {language} walk exited {out.returncode}:\n--- stdout\n{stdout[-4000:]}\n"
                                 f"--- stderr\n{stderr[-6000:]}\n--- stack\n{stack.logs()[-3000:]}")
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    assert lines, f"the {language} walk printed no summary:\n{stderr[-4000:]}"
    summary: dict[str, Any] = json.loads(lines[-1])
    summary["_username"] = username
    return summary


def check_walk(stack: StackProcess, peer: ChatPeer, upload: Path, s: dict[str, Any]) -> None:
    """Every step of the walk, proved from the server's side."""
    import hashlib

    username = s["_username"]
    assert s["username"] == username and s["user_id"], s
    token = stack.token(username)  # the same user, signed by the stack's key
    md = (("authorization", f"Bearer {token}"),)
    with stack.channel() as ch:
        # Short link: the program created it and resolved it; it resolves here too.
        got = shortener_grpc.ShortenerServiceStub(ch).GetShortUrl(
            shortener.GetShortUrlRequest(code=s["short_code"]), metadata=md)
        assert got.short_url.long_url == s["long_url"] == s["resolved_url"], (got, s)

        # Feed: the program follows the peer and read every one of its posts, newest first, in pages.
        following = feed_grpc.GraphServiceStub(ch).ListFollowing(
            feed.ListFollowingRequest(page_size=10), metadata=md)
        assert peer.user_id in [e.user_id for e in following.following], following
        peer_posts = [p for p in s["timeline_post_ids"] if p in set(s["peer_post_ids"])]
        assert len(s["peer_post_ids"]) == PEER_POSTS and peer_posts == s["peer_post_ids"], s
        assert s["timeline_pages"] >= 2, s
        assert sorted(s["peer_post_ids"], key=int, reverse=True) == s["peer_post_ids"], s
        post = feed_grpc.PostServiceStub(ch).GetPost(feed.GetPostRequest(post_id=s["post_id"]), metadata=md)
        assert post.post.author_id == s["user_id"], post

        # Chat: the peer received the program's message; the program got the echo and the read receipt.
        mine = [m for m in peer.received if m.sender_username == username]
        assert [m.text for m in mine] == [s["sent_text"]], peer.received
        assert mine[0].message_id == s["sent_message_id"], (mine, s)
        assert s["echo_text"] == "echo: " + s["sent_text"], s
        assert s["read_up_to"] == s["sent_message_id"], s

        # Media: two Upload streams, the second from the committed offset, and the server holds the whole file.
        data = upload.read_bytes()
        up = media_grpc.MediaServiceStub(ch).GetUpload(media.GetUploadRequest(upload_id=s["upload_id"]),
                                                       metadata=md)
        assert up.upload.committed_bytes == up.upload.size_bytes == len(data), up
        assert up.upload.sha256 == hashlib.sha256(data).hexdigest(), up
        assert 0 < s["resumed_from"] < len(data), s

        # Rich error: a bad request came back INVALID_ARGUMENT naming the field.
        assert s["bad_request_code"] == "INVALID_ARGUMENT", s
        assert "long_url" in s["bad_request_fields"], s
