"""A small asyncio chat client for the chat tests (a device with one Connect stream).

It records every server event, de-duplicates messages by id per conversation
(as a real client must: delivery is at-least-once across reconnects), and can
acknowledge what it received like the CLI does.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from sysdesign.chat.v1 import chat_pb2 as pb
from sysdesign.chat.v1 import chat_pb2_grpc as pbg

_ids = itertools.count(1)


def md(token: str, device: str | None = None) -> tuple[tuple[str, str], ...]:
    out = [("authorization", f"Bearer {token}")]
    if device:
        out.append(("x-device-id", device))
    return tuple(out)


class Device:
    def __init__(self, addr: str, token: str, device_id: str, *, auto_ack: bool = True) -> None:
        self.addr = addr
        self.token = token
        self.device_id = device_id
        self.auto_ack = auto_ack
        self.channel = grpc.aio.insecure_channel(addr)
        self.stub = pbg.ChatServiceStub(self.channel)
        self.events: list[pb.ServerEvent] = []
        self.seen: dict[str, dict[str, pb.Message]] = {}  # conversation -> id -> message
        self.order: dict[str, list[int]] = {}              # arrival order after de-duplication
        self.arrivals: dict[str, list[int]] = {}           # arrival order, duplicates included
        self.synced = asyncio.Event()
        self.ended = asyncio.Event()
        self.error: grpc.aio.AioRpcError | None = None
        self._out: asyncio.Queue[pb.ClientEvent | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._call: Any = None

    async def connect(self, *, hello: bool = False, addr: str | None = None) -> Device:
        if addr is not None and addr != self.addr:
            await self.channel.close()
            self.addr = addr
            self.channel = grpc.aio.insecure_channel(addr)
            self.stub = pbg.ChatServiceStub(self.channel)
        self.synced.clear()
        self.ended.clear()
        self.error = None
        self._out = asyncio.Queue()
        if hello:
            self._out.put_nowait(pb.ClientEvent(hello=pb.Hello(device_id=self.device_id)))
            metadata = md(self.token)
        else:
            metadata = md(self.token, self.device_id)
        self._call = self.stub.Connect(self._requests(self._out), metadata=metadata)
        self._task = asyncio.create_task(self._read(self._call))
        return self

    async def _requests(self, q: asyncio.Queue[pb.ClientEvent | None]) -> AsyncIterator[pb.ClientEvent]:
        while True:
            ev = await q.get()
            if ev is None:
                return
            yield ev

    async def _read(self, call: Any) -> None:
        try:
            async for ev in call:
                self.events.append(ev)
                kind = ev.WhichOneof("event")
                if kind == "message":
                    m = ev.message
                    self.arrivals.setdefault(m.conversation_id, []).append(int(m.message_id))
                    conv = self.seen.setdefault(m.conversation_id, {})
                    if m.message_id not in conv:
                        conv[m.message_id] = m
                        self.order.setdefault(m.conversation_id, []).append(int(m.message_id))
                    if self.auto_ack:
                        self.put(pb.ClientEvent(ack_delivered=pb.AckDeliveredEvent(
                            conversation_id=m.conversation_id, up_to_message_id=m.message_id)))
                elif kind == "synced":
                    self.synced.set()
                self._changed.set()
        except grpc.aio.AioRpcError as e:
            self.error = e
        except asyncio.CancelledError:
            pass
        finally:
            self.ended.set()
            self._changed.set()

    def put(self, ev: pb.ClientEvent) -> None:
        self._out.put_nowait(ev)

    async def wait_for(self, predicate: Callable[[], bool], within: float = 30.0,
                       what: str = "condition") -> None:
        deadline = time.monotonic() + within
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{self.device_id}: timed out waiting for {what}")
            self._changed.clear()
            if predicate():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=min(remaining, 0.5))

    def of_kind(self, kind: str) -> list[Any]:
        return [getattr(e, kind) for e in self.events if e.WhichOneof("event") == kind]

    async def send(self, conversation_id: str, text: str, *, client_message_id: str | None = None,
                   attachment_id: str = "", within: float = 30.0) -> pb.ServerEvent:
        """Send one message and wait for its ack or its error event."""
        cmid = client_message_id or f"{self.device_id}-{next(_ids)}"
        event_id = f"e{next(_ids)}"
        self.put(pb.ClientEvent(event_id=event_id, send=pb.SendEvent(
            client_message_id=cmid, conversation_id=conversation_id, text=text,
            attachment_id=attachment_id)))
        found: list[pb.ServerEvent] = []

        def done() -> bool:
            for e in self.events:
                k = e.WhichOneof("event")
                if (k == "send_ack" and e.send_ack.event_id == event_id) or \
                        (k == "error" and e.error.event_id == event_id):
                    found.append(e)
                    return True
            return self.ended.is_set()

        await self.wait_for(done, within, f"the answer to {event_id}")
        if not found:
            raise AssertionError(f"stream ended before the answer: {self.error}")
        return found[0]

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self._out.put_nowait(None)
        if self._task is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._task), timeout=5)
            if not self._task.done():
                self._call.cancel()
                with contextlib.suppress(BaseException):
                    await self._task
        await self.channel.close()
