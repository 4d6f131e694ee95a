"""A graceful shutdown ends the chat streams at once, so devices reconnect elsewhere.

Streams never finish on their own: without a drain they would hold the
server's shutdown open for the whole grace period and then be cancelled. The
server here has a grace period of 120 s; on SIGTERM every connected device
must get UNAVAILABLE with reason STREAM_ENDED ("reconnect"), and the process
must exit cleanly, well inside StackProcess.stop's 30 s before it kills.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc
from sysdesign.chat.v1 import chat_pb2 as pb
from sysdesign.chat.v1 import chat_pb2_grpc as pbg

from tests.integration.helpers import error_reason, grpc_metadata
from tests.integration.test_chat_support import Device
from tests.stack import StackProcess


async def test_sigterm_ends_every_stream_with_a_reconnect_status(tmp_path: Path) -> None:
    s = StackProcess(tmp_path / "data", extra_env={"SYSDESIGN_SHUTDOWN_GRACE_SECONDS": "120"})
    s.start(["serve", "--services", "identity,chat"])
    devices: list[Device] = []
    try:
        tokens = {n: s.token(n) for n in ("ada", "bob")}
        # contacts of each other, so every connect and disconnect fans presence out
        pbg.ChatServiceStub(s.channel()).CreateConversation(pb.CreateConversationRequest(
            type=pb.CONVERSATION_TYPE_DIRECT, member_usernames=["bob"]),
            metadata=grpc_metadata(tokens["ada"]), timeout=30)
        devices = [Device(s.grpc_addr, tokens[n], f"{n}-{i}") for n in tokens for i in range(2)]
        for d in devices:
            await d.connect()
        for d in devices:
            await asyncio.wait_for(d.synced.wait(), 30)

        code = await asyncio.to_thread(s.stop, signal.SIGTERM, 30)
        for d in devices:
            await asyncio.wait_for(d.ended.wait(), 10)
        assert code == 0, s.logs()
        for d in devices:
            assert d.error is not None, f"{d.device_id}: the stream ended without a status"
            assert d.error.code() == grpc.StatusCode.UNAVAILABLE, d.error
            assert error_reason(d.error) == "STREAM_ENDED", d.error
            assert "shutting down" in (d.error.details() or "")
        assert "was never awaited" not in s.logs(), s.logs()
    finally:
        for d in devices:
            await d.close()
        if s.proc is not None and s.proc.poll() is None:
            s.stop(signal.SIGKILL)
