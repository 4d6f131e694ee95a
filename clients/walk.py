"""Run a language's client walk (clients/README.md) against a running stack: `make walk-<language>`.

    python -m clients.walk go|java|typescript|rust|python

Builds the program with its ecosystem's tools, starts a Python peer (a user
with a few posts, connected to chat, echoing and reading every message it
gets), runs the walk, and prints its steps as a table. The stack is the one
`make run` started (``SYSDESIGN_GRPC_ADDR``, the data dir's token secret for
the peer); the tests (tests/clients) use the same table of languages and the
same peer.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = ROOT / "clients"


@dataclass(frozen=True)
class Language:
    name: str
    title: str
    dir: Path
    tools: tuple[str, ...]  # binaries the build needs on PATH
    build: tuple[tuple[str, ...], ...]  # commands run in dir
    run: tuple[str, ...]  # the walk program, run in dir

    def argv(self) -> list[str]:
        target = os.environ.get("CARGO_TARGET_DIR")
        if self.name == "rust" and target:
            return [str(Path(target) / "release" / "walk")]
        return list(self.run)


LANGUAGES = {lang.name: lang for lang in [
    Language("python", "Python", CLIENTS / "python", (), (), (sys.executable, "walk.py")),
    Language("go", "Go", CLIENTS / "go", ("go",),
             (("go", "generate", "./..."), ("go", "build", "-o", "bin/walk", "./cmd/walk")), ("./bin/walk",)),
    Language("java", "Java", CLIENTS / "java", ("java", "mvn"), (("mvn", "-q", "-B", "package"),),
             ("java", "-jar", "target/sysdesign-walk.jar")),
    # npm ci, then buf generate (protos/ + google.rpc) with ts-proto, then tsc
    Language("typescript", "TypeScript", CLIENTS / "typescript", ("node", "npm"),
             (("npm", "ci", "--no-audit", "--no-fund"), ("npm", "run", "build")), ("node", "dist/walk.js")),
    # build.rs runs protoc from protoc-bin-vendored
    Language("rust", "Rust", CLIENTS / "rust", ("cargo",), (("cargo", "build", "--release", "--locked"),),
             ("./target/release/walk",)),
]}


def missing_tools(lang: Language) -> list[str]:
    return [t for t in lang.tools if shutil.which(t) is None]


def build(lang: Language, *, timeout: float = 1200, quiet: bool = True) -> None:
    """Run the language's build; its output is shown only when it fails (or always, quiet=False)."""
    for argv in lang.build:
        out = subprocess.run(list(argv), cwd=str(lang.dir), capture_output=quiet, timeout=timeout)
        if out.returncode != 0:
            shown = (out.stdout or b"").decode()[-4000:] + (out.stderr or b"").decode()[-6000:]
            raise RuntimeError(f"{' '.join(argv)} failed ({out.returncode}) in {lang.dir}:\n{shown}")


@dataclass
class ChatPeer:
    """A Python user on the other end: echoes every message it gets and marks it read."""

    target: str
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

    def post(self, count: int) -> None:
        from sysdesign.feed.v1 import feed_pb2 as feed
        from sysdesign.feed.v1 import feed_pb2_grpc as feed_grpc

        with grpc.insecure_channel(self.target) as ch:
            posts = feed_grpc.PostServiceStub(ch)
            for i in range(count):
                r = posts.CreatePost(feed.CreatePostRequest(text=f"post {i} by {self.username}"), metadata=self.md)
                self.user_id = r.post.author_id

    def start(self, timeout: float = 60) -> ChatPeer:
        from sysdesign.chat.v1 import chat_pb2 as chat
        from sysdesign.chat.v1 import chat_pb2_grpc as chat_grpc

        stub = chat_grpc.ChatServiceStub(grpc.insecure_channel(self.target))

        def events() -> Iterator[Any]:
            yield chat.ClientEvent(hello=chat.Hello(device_id="python-peer"))
            while (ev := self._outbox.get()) is not None:
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
        if not self._synced.wait(timeout):
            raise RuntimeError("the peer's chat stream never synced")
        return self

    def stop(self) -> None:
        self._outbox.put(None)
        if self._call is not None:
            self._call.cancel()
        if self._thread is not None:
            self._thread.join(10)


def noise_png(path: Path) -> Path:
    """A real PNG of noise, about 3 MiB: several of the server's upload chunks, so a resume means something."""
    from servers.media.ffmpeg import ffmpeg_exe

    r = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                        "nullsrc=s=1024x1024,geq=random(1)*255:random(2)*255:random(3)*255",
                        "-frames:v", "1", str(path)], capture_output=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.decode())
    return path


def walk_env(target: str, peer: ChatPeer, upload: Path, username: str) -> dict[str, str]:
    return {
        **os.environ,
        "SYSDESIGN_GRPC_ADDR": target,
        "SYSDESIGN_WALK_USERNAME": username,
        "SYSDESIGN_WALK_PASSWORD": "walk-" + uuid.uuid4().hex,
        "SYSDESIGN_WALK_PEER": peer.username,
        "SYSDESIGN_WALK_FILE": str(upload),
        "SYSDESIGN_SERVICE_CONFIG": str(CLIENTS / "service_config.json"),
    }


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    from clients.sdk import grpc_target

    args = sys.argv[1:] if argv is None else argv
    console = Console(stderr=True)
    if len(args) != 1 or args[0] not in LANGUAGES:
        console.print(f"usage: python -m clients.walk {{{'|'.join(LANGUAGES)}}}")
        return 2
    lang = LANGUAGES[args[0]]
    missing = missing_tools(lang)
    if missing:
        console.print(f"[red]the {lang.title} walk needs {', '.join(missing)} on PATH[/]")
        return 2
    target = grpc_target()
    with console.status(f"building the {lang.title} client ({' && '.join(' '.join(b) for b in lang.build)})"):
        build(lang)
    peer_name = "peer_" + uuid.uuid4().hex[:6]
    token = subprocess.run([sys.executable, "-m", "clients.cli", "token", peer_name], capture_output=True,
                           text=True, cwd=str(ROOT) if not os.environ.get("SYSDESIGN_DATA_DIR") else None)
    if token.returncode != 0:
        console.print(f"[red]could not mint the peer's token:[/] {token.stderr.strip()}")
        return 1
    peer = ChatPeer(target, peer_name, token.stdout.strip())
    peer.post(3)
    peer.start()
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"sysdesign-walk-{uuid.uuid4().hex[:6]}.png"
    try:
        noise_png(tmp)
        username = f"{lang.name}_" + uuid.uuid4().hex[:6]
        r = subprocess.run(lang.argv(), cwd=str(lang.dir), env=walk_env(target, peer, tmp, username),
                           stdout=subprocess.PIPE, timeout=600)
    finally:
        peer.stop()
        tmp.unlink(missing_ok=True)
    if r.returncode != 0:
        console.print(f"[red]the {lang.title} walk exited {r.returncode}[/]")
        return 1
    s = json.loads(r.stdout.decode().strip().splitlines()[-1])
    table = Table(title=f"{lang.title} client walk against {target}")
    table.add_column("step")
    table.add_column("result")
    table.add_row("register + login", f"{s['username']} ({s['user_id']})")
    table.add_row("short link", f"{s['short_code']} → {s['resolved_url']}")
    table.add_row("home timeline", f"{len(s['timeline_post_ids'])} posts in {s['timeline_pages']} pages, "
                                   f"{len(s['peer_post_ids'])} by {peer_name}")
    table.add_row("chat", f"sent {s['sent_message_id']}, got {s['echo_text']!r}, read up to {s['read_up_to']}")
    table.add_row("upload", f"resumed at {s['resumed_from']:,}, {s['committed_bytes']:,} bytes stored")
    table.add_row("rich error", f"{s['bad_request_code']} {', '.join(s['bad_request_fields'])}")
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
