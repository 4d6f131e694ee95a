"""`sysdesign chat`: an interactive terminal chat client and one-shot commands.

    sysdesign chat --user alice --to bob          # interactive, 1:1 with bob
    sysdesign chat --user bob --to alice          # ...in a second terminal
    sysdesign chat send --user alice --to bob "hello"
    sysdesign chat history --user bob --to alice
    sysdesign chat conversations --user alice
    sysdesign chat group --user alice --title team bob carol
    sysdesign chat attach --user alice --to bob ./photo.png
    sysdesign bench chat --quick
"""

from __future__ import annotations

import asyncio
import contextlib
import mimetypes
import socket
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from rich.markup import escape
from rich.table import Table as RichTable

from clients.common import TokenOpt, UserOpt, _rpc, _token, console, err, fail, id_column, rpc_fail

chat_app = typer.Typer(help="Chat: an interactive client (two terminals can talk) and one-shot "
                            "commands.", invoke_without_command=True)

ToOpt = Annotated[str, typer.Option("--to", help="Talk 1:1 with this username.")]
ConvOpt = Annotated[str, typer.Option("--conversation", "-c", help="A conversation id.")]
DeviceOpt = Annotated[str, typer.Option(help="This device's id (its delivery cursors are kept "
                                             "per device; default cli-<host>).")]


def _md(token: str, device: str = "") -> tuple[tuple[str, str], ...]:
    out = [("authorization", f"Bearer {token}")]
    if device:
        out.append(("x-device-id", device))
    return tuple(out)


def _default_device() -> str:
    host = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())
    return f"cli-{host}"[:64]


def _conversation_id(stub: Any, token: str, to: str, conversation: str) -> str:
    from sysdesign.chat.v1 import chat_pb2 as pb

    if conversation:
        return conversation
    if not to:
        err.print("[red]name a peer with --to <username> or a conversation with --conversation")
        raise typer.Exit(2)
    resp = _rpc(stub.CreateConversation, pb.CreateConversationRequest(
        type=pb.CONVERSATION_TYPE_DIRECT, member_usernames=[to]), metadata=_md(token))
    return str(resp.conversation.conversation_id)


def _when(msg: Any) -> str:
    return datetime.fromtimestamp(msg.create_time.seconds).strftime("%H:%M")


def _line(msg: Any, me: str) -> str:
    who = "you" if msg.sender_id == me else msg.sender_username or msg.sender_id
    body = escape(msg.text)
    if msg.HasField("attachment"):
        a = msg.attachment
        body = (body + " " if body else "") + \
            f"[magenta]📎 {escape(a.filename)} ({a.size_bytes:,} bytes, {a.content_type})[/]"
    color = "cyan" if who == "you" else "green"
    return f"[dim]{_when(msg)}[/] [bold {color}]{escape(who)}[/]: {body}"


@chat_app.callback()
def interactive(
    ctx: typer.Context,
    to: ToOpt = "",
    conversation: ConvOpt = "",
    device: DeviceOpt = "",
    token: TokenOpt = None,
    user: UserOpt = None,
) -> None:
    """Open an interactive chat (without a subcommand). Type a line to send it; /help lists
    the commands."""
    if ctx.invoked_subcommand is not None:
        return
    tok = _token(token, user)
    try:
        asyncio.run(_interactive(tok, to, conversation, device or _default_device()))
    except KeyboardInterrupt:
        pass


def _uid(token: str) -> str:
    import base64
    import json

    payload = token.split(".")[1]
    return str(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["sub"])


async def _interactive(token: str, to: str, conversation: str, device: str) -> None:
    from sysdesign.chat.v1 import chat_pb2 as pb
    from sysdesign.chat.v1 import chat_pb2_grpc as pbg

    from clients.sdk import aio_channel, channel

    me = _uid(token)
    with channel() as ch:
        cid = _conversation_id(pbg.ChatServiceStub(ch), token, to, conversation)
    shown: set[str] = set()
    names: dict[str, str] = {}
    async with aio_channel(reconnect_quickly=True) as ach:
        stub = pbg.ChatServiceStub(ach)
        conv = (await stub.GetConversation(pb.GetConversationRequest(conversation_id=cid),
                                           metadata=_md(token), timeout=10)).conversation
        names.update({m.user_id: m.username for m in conv.members})
        others = ", ".join(m.username for m in conv.members if m.user_id != me)
        title = conv.title or others
        console.rule(f"[bold]{escape(title)}[/] [dim](conversation {cid}, device {device})")
        hist = await stub.GetHistory(pb.GetHistoryRequest(conversation_id=cid, page_size=20),
                                     metadata=_md(token), timeout=10)
        for m in reversed(hist.messages):
            console.print(_line(m, me))
            shown.add(m.message_id)
        session = _Session(pb, stub, token, me, cid, device, names, shown,
                           max((int(m.message_id) for m in hist.messages), default=0))
        await session.run()


# Reconnect backoff: the first retry after about half a second, doubling to 10 s, each wait
# drawn from [half, full] of the step ("equal jitter") so clients that lost the same server
# do not all come back in the same millisecond.
RECONNECT_FIRST_S = 0.5
RECONNECT_MAX_S = 10.0
# Errors a reconnect cannot cure: the session ends with them.
_FATAL = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
          grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
          grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED}


def reconnect_delay(attempt: int, rnd: Any = None) -> float:
    import random

    step = min(RECONNECT_MAX_S, RECONNECT_FIRST_S * 2 ** attempt)
    return step / 2 + (rnd or random).uniform(0, step / 2)


class _Session:
    """The interactive client's stream, kept alive across server restarts.

    Typed sends stay in ``pending`` (by client message id) until their
    ``send_ack``; a reconnect resends them all, and the server's de-duplication
    by client message id stores each once. The server replays what this
    device has not acknowledged (its delivery cursor), so messages that arrived
    while the stream was down are shown after the reconnect; ``shown`` hides
    the ones already on screen.
    """

    def __init__(self, pb: Any, stub: Any, token: str, me: str, cid: str, device: str,
                 names: dict[str, str], shown: set[str], last_seen: int) -> None:
        self.pb, self.stub, self.token, self.me, self.cid, self.device = pb, stub, token, me, cid, device
        self.names, self.shown, self.last_seen = names, shown, last_seen
        self.pending: dict[str, Any] = {}
        self.out: asyncio.Queue[Any] | None = None
        self.lines: asyncio.Queue[str | None] = asyncio.Queue()
        self.counter = iter(range(1, 1 << 62))
        self.synced = False
        self.connections = 0

    # -- input ------------------------------------------------------------------

    def _start_stdin(self) -> None:
        """A daemon thread reads stdin: a blocked read never holds up the exit."""
        import threading

        loop = asyncio.get_running_loop()

        def pump() -> None:
            while True:
                line = sys.stdin.readline()
                loop.call_soon_threadsafe(self.lines.put_nowait, line or None)
                if not line or line.strip() in ("/quit", "/exit"):
                    return

        threading.Thread(target=pump, name="chat-stdin", daemon=True).start()

    def _send(self, ev: Any) -> None:
        if self.out is not None:
            self.out.put_nowait(ev)

    async def _handle(self, line: str | None) -> bool:
        """One typed line; True when the user is leaving."""
        pb = self.pb
        if line is None:
            return True
        text = line.rstrip("\n")
        if not text.strip():
            return False
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            if cmd in ("/quit", "/exit"):
                return True
            try:
                await self._command(cmd, arg)
            except grpc.RpcError as e:
                console.print(f"[red]  ✘ {escape(e.code().name)}: {escape(e.details() or '')}[/]")
            return False
        cmid = uuid.uuid4().hex
        self.pending[cmid] = pb.SendEvent(client_message_id=cmid, conversation_id=self.cid, text=text)
        if self.out is None:
            console.print("[dim]  · not connected: sent when the connection is back[/]")
        self._send(self._send_event(cmid))
        return False

    def _send_event(self, cmid: str) -> Any:
        return self.pb.ClientEvent(event_id=f"e{next(self.counter)}", send=self.pending[cmid])

    async def _command(self, cmd: str, arg: str) -> None:
        pb = self.pb
        if cmd == "/help":
            console.print("[dim]/typing  tell the others you are typing\n"
                          "/who     presence of the members\n"
                          "/attach <path>  send a file\n/quit[/]")
        elif cmd == "/typing":
            self._send(pb.ClientEvent(typing=pb.TypingEvent(conversation_id=self.cid, typing=True)))
        elif cmd == "/who":
            ids = [u for u in self.names if u != self.me]
            pres = await self.stub.GetPresence(pb.GetPresenceRequest(user_ids=ids),
                                               metadata=_md(self.token), timeout=10)
            for p in pres.presences:
                seen = datetime.fromtimestamp(p.last_seen_time.seconds) \
                    .strftime("%Y-%m-%d %H:%M") if p.last_seen_time.seconds else "never"
                state = "online" if p.online else f"offline, last seen {seen}"
                console.print(f"[dim]  {escape(self.names.get(p.user_id, p.user_id))}: {state}[/]")
        elif cmd == "/attach":
            try:
                att = await _upload(self.stub, self.token, self.cid, Path(arg.strip()))
            except (OSError, ValueError) as e:
                console.print(f"[red]  ✘ {escape(str(e))}")
                return
            cmid = uuid.uuid4().hex
            self.pending[cmid] = pb.SendEvent(client_message_id=cmid, conversation_id=self.cid,
                                              attachment_id=att.attachment_id)
            self._send(self._send_event(cmid))
        else:
            console.print("[red]  unknown command; /help")

    # -- the stream ----------------------------------------------------------------

    async def _receive(self, call: Any) -> None:
        pb, me, cid = self.pb, self.me, self.cid
        other_new: dict[str, int] = {}
        async for ev in call:
            kind = ev.WhichOneof("event")
            if kind == "message":
                m = ev.message
                self._send(pb.ClientEvent(ack_delivered=pb.AckDeliveredEvent(
                    conversation_id=m.conversation_id, up_to_message_id=m.message_id)))
                if m.conversation_id != cid:
                    other_new[m.conversation_id] = other_new.get(m.conversation_id, 0) + 1
                    if self.synced:
                        console.print(f"[dim]· new message from {escape(m.sender_username)} in "
                                      f"conversation {m.conversation_id}[/]")
                    continue
                if m.message_id in self.shown:
                    continue
                self.shown.add(m.message_id)
                console.print(_line(m, me))
                if m.sender_id != me and int(m.message_id) > self.last_seen:
                    self.last_seen = int(m.message_id)
                    self._send(pb.ClientEvent(mark_read=pb.MarkReadEvent(
                        conversation_id=cid, up_to_message_id=m.message_id)))
            elif kind == "send_ack":
                self.pending.pop(ev.send_ack.client_message_id, None)
                m = ev.send_ack.message
                if m.message_id in self.shown:
                    continue
                self.shown.add(m.message_id)
                console.print(_line(m, me) + " [dim]✓[/]")
            elif kind == "receipt":
                r = ev.receipt
                if r.conversation_id == cid and r.user_id != me:
                    mark = "✓✓ read" if r.status == pb.RECEIPT_STATUS_READ else "✓✓ delivered"
                    console.print(f"[dim]  {mark} by {escape(self.names.get(r.user_id, r.user_id))}[/]")
            elif kind == "typing":
                t = ev.typing
                if t.conversation_id == cid and t.typing:
                    console.print(f"[dim]  {escape(self.names.get(t.user_id, t.user_id))} is typing…[/]")
            elif kind == "presence":
                p = ev.presence
                if p.user_id in self.names and p.user_id != me:
                    state = "[green]online[/]" if p.online else "[dim]offline[/]"
                    console.print(f"[dim]  {escape(self.names[p.user_id])} is[/] {state}")
            elif kind == "error":
                e = ev.error
                self.pending.pop(e.client_message_id, None)  # refused: retyping is the fix
                detail = "; ".join(f"{v.field}: {v.description}" for v in e.field_violations)
                console.print(f"[red]  ✘ {escape(e.message)}[/] {escape(detail)}")
            elif kind == "synced":
                self.synced = True
                if other_new:
                    n = sum(other_new.values())
                    console.print(f"[dim]· {n} new message(s) in {len(other_new)} other "
                                  f"conversation(s) (sysdesign chat conversations)[/]")
                    other_new.clear()
                if self.connections == 1:
                    console.print("[dim]· connected — type a message and press Enter; /help[/]")
                else:
                    console.print("[green]· reconnected[/]"
                                  + (f" [dim]({len(self.pending)} unacknowledged message(s) resent)[/]"
                                     if self.pending else ""))

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(15)
            self._send(self.pb.ClientEvent(heartbeat=self.pb.HeartbeatEvent()))

    async def _connected(self) -> tuple[bool, BaseException | None]:
        """One stream until it ends: (the user left, the error that ended it)."""
        pb = self.pb
        out: asyncio.Queue[Any] = asyncio.Queue()
        self.out, self.synced = out, False
        self.connections += 1
        for cmid in list(self.pending):  # in the order they were typed
            out.put_nowait(self._send_event(cmid))
        if self.last_seen:
            out.put_nowait(pb.ClientEvent(mark_read=pb.MarkReadEvent(
                conversation_id=self.cid, up_to_message_id=str(self.last_seen))))

        async def requests() -> Any:
            while True:
                ev = await out.get()
                if ev is None:
                    return
                yield ev

        call = self.stub.Connect(requests(), metadata=_md(self.token, self.device))
        recv = asyncio.create_task(self._receive(call))
        beat = asyncio.create_task(self._heartbeats())
        leaving = False
        try:
            while not leaving:
                get = asyncio.create_task(self.lines.get())
                done, _ = await asyncio.wait({get, recv}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    break
                leaving = await self._handle(get.result())
        finally:
            self.out = None
            out.put_nowait(None)
            beat.cancel()
            if leaving:
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(asyncio.shield(recv), timeout=2)
            call.cancel()
            recv.cancel()
            with contextlib.suppress(BaseException):
                await recv
        if leaving:
            return True, None
        exc = recv.exception() if not recv.cancelled() else None
        return False, exc

    async def _wait(self, seconds: float) -> bool:
        """Sleep before reconnecting, still taking typed lines; True when the user left."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = await asyncio.wait_for(self.lines.get(), timeout=left)
            except TimeoutError:
                return False
            if await self._handle(line):
                return True
        return False

    async def run(self) -> None:
        self._start_stdin()
        attempt = 0
        while True:
            left, exc = await self._connected()
            if left:
                return
            if isinstance(exc, grpc.RpcError) and exc.code() in _FATAL:
                rpc_fail(exc)
            if self.synced:  # that connection worked: start the backoff again
                attempt = 0
            delay = reconnect_delay(attempt)
            waiting = f" [dim]({len(self.pending)} message(s) waiting)[/]" if self.pending else ""
            if attempt == 0:
                why = (f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError)
                       else "the stream ended" if exc is None else f"{type(exc).__name__}: {exc}")
                console.print(f"[yellow]· disconnected ({escape(why)}); reconnecting in "
                              f"{delay:.1f} s[/]{waiting}")
            else:
                console.print(f"[dim]· server unreachable; retrying in {delay:.1f} s[/]{waiting}")
            attempt += 1
            if await self._wait(delay):
                return



async def _upload(stub: Any, token: str, cid: str, path: Path) -> Any:
    from sysdesign.chat.v1 import chat_pb2 as pb

    data = await asyncio.to_thread(path.read_bytes)
    ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"

    async def parts() -> Any:
        yield pb.UploadAttachmentRequest(metadata=pb.AttachmentMetadata(
            conversation_id=cid, filename=path.name, content_type=ctype, size_bytes=len(data)))
        for i in range(0, len(data), 1 << 20):
            yield pb.UploadAttachmentRequest(chunk=data[i:i + (1 << 20)])

    resp = await stub.UploadAttachment(parts(), metadata=_md(token), timeout=120)
    return resp.attachment


@chat_app.command("send")
def send(
    text: Annotated[str, typer.Argument(help="The message.")],
    to: ToOpt = "",
    conversation: ConvOpt = "",
    client_message_id: Annotated[str, typer.Option(help="Idempotency key (default: random); "
                                                        "resending with it stores nothing "
                                                        "new.")] = "",
    token: TokenOpt = None,
    user: UserOpt = None,
) -> None:
    """Send one message (unary SendMessage) and print its id."""
    from sysdesign.chat.v1 import chat_pb2 as pb
    from sysdesign.chat.v1 import chat_pb2_grpc as pbg

    from clients.sdk import channel

    tok = _token(token, user)
    with channel() as ch:
        stub = pbg.ChatServiceStub(ch)
        cid = _conversation_id(stub, tok, to, conversation)
        resp = _rpc(stub.SendMessage, pb.SendMessageRequest(
            client_message_id=client_message_id or uuid.uuid4().hex, conversation_id=cid,
            text=text), metadata=_md(tok))
    err.print(f"conversation {cid}" + (" (duplicate: already stored)" if resp.duplicate else ""))
    print(resp.message.message_id)


@chat_app.command("history")
def history(
    to: ToOpt = "",
    conversation: ConvOpt = "",
    limit: Annotated[int, typer.Option(help="How many messages, newest last.")] = 30,
    before: Annotated[str, typer.Option(help="Only messages before this message id.")] = "",
    token: TokenOpt = None,
    user: UserOpt = None,
) -> None:
    """Print the latest messages of a conversation (GetHistory, paged backwards)."""
    from sysdesign.chat.v1 import chat_pb2 as pb
    from sysdesign.chat.v1 import chat_pb2_grpc as pbg

    from clients.sdk import channel

    tok = _token(token, user)
    me = _uid(tok)
    msgs: list[Any] = []
    with channel() as ch:
        stub = pbg.ChatServiceStub(ch)
        cid = _conversation_id(stub, tok, to, conversation)
        page_token = ""
        while len(msgs) < limit:
            resp = _rpc(stub.GetHistory, pb.GetHistoryRequest(
                conversation_id=cid, before_message_id=before,
                page_size=min(200, limit - len(msgs)), page_token=page_token), metadata=_md(tok))
            msgs.extend(resp.messages)
            page_token = resp.next_page_token
            if not page_token:
                break
    for m in reversed(msgs):
        console.print(_line(m, me) + f" [dim]#{m.message_id}[/]")


@chat_app.command("conversations")
def conversations(token: TokenOpt = None, user: UserOpt = None) -> None:
    """Your conversations with their last message and unread count."""
    from sysdesign.chat.v1 import chat_pb2 as pb
    from sysdesign.chat.v1 import chat_pb2_grpc as pbg

    from clients.sdk import channel

    tok = _token(token, user)
    me = _uid(tok)
    rows: list[Any] = []
    with channel() as ch:
        stub = pbg.ChatServiceStub(ch)
        page_token = ""
        while True:
            resp = _rpc(stub.ListConversations, pb.ListConversationsRequest(
                page_size=100, page_token=page_token), metadata=_md(tok))
            rows.extend(resp.conversations)
            page_token = resp.next_page_token
            if not page_token:
                break
        peers: dict[str, str] = {}
        for s in rows:
            c = s.conversation
            if c.type == pb.CONVERSATION_TYPE_DIRECT:
                full = _rpc(stub.GetConversation, pb.GetConversationRequest(
                    conversation_id=c.conversation_id), metadata=_md(tok)).conversation
                peers[c.conversation_id] = next(
                    (m.username for m in full.members if m.user_id != me), "")
    rows.sort(key=lambda s: -int(s.last_message.message_id or 0))
    t = RichTable(id_column("conversation"), id_column("with", min_width=3), "unread",
                  id_column("last message", min_width=5))
    for s in rows:
        c = s.conversation
        name = c.title + f" ({c.member_count})" if c.type == pb.CONVERSATION_TYPE_GROUP \
            else peers.get(c.conversation_id, "")
        last = _line(s.last_message, me) if s.HasField("last_message") else "[dim]—[/]"
        t.add_row(c.conversation_id, escape(name),
                  f"[bold]{s.unread_count}[/]" if s.unread_count else "0", last)
    console.print(t)


@chat_app.command("group")
def group(
    members: Annotated[list[str], typer.Argument(help="Usernames to add (at most 499).")],
    title: Annotated[str, typer.Option(help="The group's title.")],
    token: TokenOpt = None,
    user: UserOpt = None,
) -> None:
    """Create a group with you as its admin; prints its conversation id."""
    from sysdesign.chat.v1 import chat_pb2 as pb
    from sysdesign.chat.v1 import chat_pb2_grpc as pbg

    from clients.sdk import channel

    tok = _token(token, user)
    with channel() as ch:
        resp = _rpc(pbg.ChatServiceStub(ch).CreateConversation, pb.CreateConversationRequest(
            type=pb.CONVERSATION_TYPE_GROUP, title=title, member_usernames=members),
            metadata=_md(tok))
    err.print(f"group {title!r} with {len(resp.conversation.members)} members")
    print(resp.conversation.conversation_id)


@chat_app.command("attach")
def attach(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True,
                                         help="The file to send (at most 10 MiB).")],
    to: ToOpt = "",
    conversation: ConvOpt = "",
    text: Annotated[str, typer.Option(help="A caption.")] = "",
    token: TokenOpt = None,
    user: UserOpt = None,
) -> None:
    """Upload a file, send it as a message and print a short-lived download URL."""
    from sysdesign.chat.v1 import chat_pb2 as pb
    from sysdesign.chat.v1 import chat_pb2_grpc as pbg

    from clients.sdk import aio_channel, channel

    tok = _token(token, user)
    with channel() as ch:
        stub = pbg.ChatServiceStub(ch)
        cid = _conversation_id(stub, tok, to, conversation)

    async def go() -> Any:
        async with aio_channel() as ach:
            return await _upload(pbg.ChatServiceStub(ach), tok, cid, file)

    try:
        att = asyncio.run(go())
    except grpc.RpcError as e:
        rpc_fail(e)
    except OSError as e:
        fail(f"{file}: cannot read it ({e.strerror or e})")
    with channel() as ch:
        stub = pbg.ChatServiceStub(ch)
        msg = _rpc(stub.SendMessage, pb.SendMessageRequest(
            client_message_id=uuid.uuid4().hex, conversation_id=cid, text=text,
            attachment_id=att.attachment_id), metadata=_md(tok)).message
        url = _rpc(stub.GetAttachmentUrl, pb.GetAttachmentUrlRequest(
            conversation_id=cid, attachment_id=att.attachment_id), metadata=_md(tok))
    err.print(f"sent {att.filename} ({att.size_bytes:,} bytes) as message {msg.message_id}; "
              f"link valid for {max(0, url.expire_time.seconds - int(time.time()))} s")
    print(url.url)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    app.add_typer(chat_app, name="chat")

    @bench_app.command("chat")
    def bench_chat(
        quick: Annotated[bool, typer.Option(help="Fewer clients and shorter runs (about a "
                                                 "minute).")] = False,
        clients: Annotated[int | None, typer.Option(help="Connected clients (default 1,000; "
                                                         "quick 200).")] = None,
        rate: Annotated[float | None, typer.Option(help="Aggregate messages/s for the latency "
                                                        "comparison.")] = None,
        out: Annotated[Path, typer.Option(help="Where the JSON, Markdown and PNG results "
                                               "go.")] = Path("bench-results"),
        workers: Annotated[int | None, typer.Option(help="Client processes (default 4).")] = None,
        keep_data: Annotated[bool, typer.Option(help="Keep the stack's data dir and log.")] = False,
    ) -> None:
        """Chat: end-to-end delivery latency with 1,000 connected clients, RSS per idle stream
        and messages/s, each beside a bare grpc.aio bidirectional echo."""
        from clients.bench.chat import ChatBenchOptions, main

        raise typer.Exit(main(ChatBenchOptions(quick=quick, clients=clients, rate=rate,
                                               out_dir=out, workers=workers,
                                               keep_data=keep_data)))
