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
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sysdesign.feed.v1 import feed_pb2 as feed
from sysdesign.feed.v1 import feed_pb2_grpc as feed_grpc
from sysdesign.media.v1 import media_pb2 as media
from sysdesign.media.v1 import media_pb2_grpc as media_grpc
from sysdesign.shortener.v1 import shortener_pb2 as shortener
from sysdesign.shortener.v1 import shortener_pb2_grpc as shortener_grpc

from clients.walk import LANGUAGES, ChatPeer, Language, build, noise_png, walk_env
from tests.conftest import skip_or_fail
from tests.stack import StackProcess

PEER_POSTS = 5


def require_toolchain(language: str, *binaries: str) -> None:
    """Skip with one line when a toolchain is missing; under CI=true that is a failure."""
    missing = [b for b in binaries if shutil.which(b) is None]
    if missing:
        skip_or_fail(f"the {language} client", f"{', '.join(missing)} not on PATH")


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
    p = ChatPeer(walk_stack.grpc_addr, name, walk_stack.token(name))
    p.post(PEER_POSTS)
    p.start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def upload_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real PNG of noise, about 3 MiB: several of the server's upload chunks, so a resume means something."""
    return noise_png(tmp_path_factory.mktemp("upload") / "noise.png")


def run_walk(stack: StackProcess, peer: ChatPeer, upload: Path, argv: list[str], cwd: Path, *,
             language: str, timeout: float = 300, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a client's walk; returns its JSON summary (the last stdout line)."""
    username = f"{language}_" + uuid.uuid4().hex[:8]
    env = {**walk_env(stack.grpc_addr, peer, upload, username), **(env or {})}
    out = subprocess.run(argv, cwd=str(cwd), env=env, capture_output=True, timeout=timeout)
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


def walk_language(name: str, stack: StackProcess, peer: ChatPeer, upload: Path) -> dict[str, Any]:
    """Build a language's client (clients/walk.py's table), run its walk, prove every step."""
    lang: Language = LANGUAGES[name]
    require_toolchain(lang.title, *lang.tools)
    build(lang)
    summary = run_walk(stack, peer, upload, lang.argv(), lang.dir, language=name)
    check_walk(stack, peer, upload, summary)
    return summary
