"""The interactive `sysdesign chat` in a pseudo-terminal across a real server restart (issue 23).

The session must show the disconnect at once, reconnect by itself when the
server is back, and deliver what was typed while it was down (resent by
client message id, stored once).
"""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sysdesign.chat.v1 import chat_pb2 as pb
from sysdesign.chat.v1 import chat_pb2_grpc as pbg

from tests.integration.helpers import grpc_metadata
from tests.stack import ROOT, StackProcess

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


class Terminal:
    """A child process on a pty: type lines, wait for text on its screen."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     cwd=str(ROOT), close_fds=True, start_new_session=True)
        os.close(slave)
        self.screen = ""

    def _pump(self, timeout: float) -> None:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if ready:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # the child closed the pty
                data = b""
            self.screen += _ANSI.sub("", data.decode(errors="replace"))

    def expect(self, text: str, timeout: float, after: int = 0) -> int:
        """Wait until ``text`` is on the screen past offset ``after``; its end offset."""
        deadline = time.monotonic() + timeout
        while True:
            i = self.screen.find(text, after)
            if i >= 0:
                return i + len(text)
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not shown in {timeout} s; screen:\n{self.screen}")
            if self.proc.poll() is not None:
                self._pump(0.2)
                if text not in self.screen[after:]:
                    raise AssertionError(f"exited {self.proc.returncode} before {text!r}:\n{self.screen}")
            self._pump(0.2)

    def type(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self.master)


@pytest.mark.timeout(300)
def test_interactive_chat_survives_a_server_restart(tmp_path: Path) -> None:
    stack = StackProcess(tmp_path / "data").start()
    term: Terminal | None = None
    try:
        stack.token("rita")
        ron = stack.token("ron")
        env = {**stack.env(), "COLUMNS": "100", "NO_COLOR": "1"}
        term = Terminal([sys.executable, "-m", "clients.cli", "chat", "--user", "rita", "--to", "ron"],
                        env)
        at = term.expect("connected — type a message", 60)
        term.type("before the restart")
        at = term.expect("before the restart ✓", 30, at)

        assert stack.stop() == 0, stack.logs()
        at = term.expect("disconnected", 10, at)  # shown at once, not at the next typed line
        term.type("typed while the server was down")
        at = term.expect("not connected: sent when the connection is back", 10, at)

        stack.start()
        at = term.expect("reconnected", 60, at)
        at = term.expect("typed while the server was down ✓", 30, at)
        # the stream is live again: a message from ron reaches the terminal
        stub = pbg.ChatServiceStub(stack.channel())
        conv = stub.CreateConversation(pb.CreateConversationRequest(
            type=pb.CONVERSATION_TYPE_DIRECT, member_usernames=["rita"]),
            metadata=grpc_metadata(ron), timeout=30).conversation
        stub.SendMessage(pb.SendMessageRequest(client_message_id="after-1", conversation_id=conv.conversation_id,
                                               text="welcome back"), metadata=grpc_metadata(ron), timeout=30)
        term.expect("ron: welcome back", 30, at)
        history = stub.GetHistory(pb.GetHistoryRequest(conversation_id=conv.conversation_id, page_size=50),
                                  metadata=grpc_metadata(ron), timeout=30).messages
        texts = [m.text for m in history]
        assert texts.count("typed while the server was down") == 1, texts
        assert texts.count("before the restart") == 1, texts
        term.type("/quit")
        assert term.proc.wait(30) == 0, term.screen
        assert "Traceback" not in term.screen and "AioRpcError" not in term.screen, term.screen
    finally:
        if term is not None:
            term.close()
        stack.stop()
