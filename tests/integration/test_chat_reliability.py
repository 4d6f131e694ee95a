"""Chat across two server processes on one Valkey and one table store, and a SIGKILL mid-run.

The processes are two `sysdesign serve --services identity,chat` replicas
sharing the session's Valkey server and one SQLite file, as two pods behind a
load balancer share Redis and Cassandra. Clients fail over to the other
replica when their stream breaks, and resend unacknowledged messages with the
same client_message_id.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from collections.abc import Iterator

import pytest
from sysdesign.chat.v1 import chat_pb2 as pb
from sysdesign.chat.v1 import chat_pb2_grpc as pbg

from tests.integration.helpers import grpc_metadata
from tests.integration.test_chat_support import Device
from tests.stack import StackProcess

pytestmark = [pytest.mark.tables, pytest.mark.redis_cluster]

_names = itertools.count(1)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory,
             valkey_url: str) -> Iterator[tuple[StackProcess, StackProcess]]:
    base = tmp_path_factory.mktemp("chatpair")
    env = {"SYSDESIGN_REDIS_URL": valkey_url, "SYSDESIGN_ACCESS_LOG": "0"}
    a = StackProcess(base / "data", extra_env=env).start(["serve", "--services", "identity,chat"])
    b = StackProcess(base / "b", extra_env={**env, "SYSDESIGN_DATA_DIR": str(base / "data")})
    b.start(["serve", "--services", "identity,chat"])
    yield a, b
    for s in (a, b):
        if s.proc is not None and s.proc.poll() is None:
            assert s.stop() == 0, s.logs()


async def _users(stack: StackProcess, prefix: str, n: int) -> list[tuple[str, str, str]]:
    """(username, token, user id) for n new users, minted in-process against the shared store."""
    from clients.localauth import mint_token
    config = stack.config(token_secret="")
    out = []
    for _ in range(n):
        name = f"{prefix}{next(_names)}_{int(time.time() * 1000) % 100000}"
        token, _, uid, _ = await mint_token(config, name)
        out.append((name, token, str(uid)))
    return out


def _direct(stack: StackProcess, token: str, other: str) -> str:
    stub = pbg.ChatServiceStub(stack.channel())
    return stub.CreateConversation(pb.CreateConversationRequest(
        type=pb.CONVERSATION_TYPE_DIRECT, member_usernames=[other]),
        metadata=grpc_metadata(token), timeout=30).conversation.conversation_id


async def test_sender_on_one_replica_recipient_on_the_other(
        replicas: tuple[StackProcess, StackProcess]) -> None:
    a, b = replicas
    (_s_name, s_tok, _), (r_name, r_tok, _) = await _users(a, "xs", 2)
    cid = _direct(a, s_tok, r_name)
    sender = await Device(a.grpc_addr, s_tok, "s-phone").connect()
    recipient = await Device(b.grpc_addr, r_tok, "r-phone").connect()
    try:
        await sender.synced.wait()
        await recipient.synced.wait()
        acks = [await sender.send(cid, f"across replicas {i}") for i in range(20)]
        ids = [int(x.send_ack.message.message_id) for x in acks]
        await recipient.wait_for(lambda: recipient.order.get(cid) == ids, within=30,
                                 what="20 messages from the other replica")
        # and back: replies travel b -> a
        reply = await recipient.send(cid, "got them")
        await sender.wait_for(lambda: reply.send_ack.message.message_id in
                              sender.seen.get(cid, {}), what="the reply")
    finally:
        await sender.close()
        await recipient.close()


class _Sender:
    """One user's device sending a script of messages, failing over and resending on a break."""

    def __init__(self, token: str, name: str, addrs: list[str], script: list[tuple[str, str]]):
        self.dev = Device(addrs[0], token, f"{name}-phone", auto_ack=False)
        self.addrs = addrs
        self.script = script          # (conversation id, client message id), in send order
        self.acked: dict[str, tuple[str, int]] = {}  # client message id -> (conversation, id)
        self.reconnects = 0

    async def run(self, window: int = 16) -> None:
        await self.dev.connect()
        sent_upto = 0
        while True:
            await self._collect()
            if len(self.acked) == len(self.script):
                break
            if self.dev.ended.is_set():
                # fail over and resend everything not acknowledged, in order, same ids
                self.reconnects += 1
                addr = self.addrs[self.reconnects % len(self.addrs)]
                await asyncio.sleep(0.2)
                await self.dev.connect(addr=addr)
                sent_upto = 0
                continue
            inflight = sum(1 for c, m in self.script[:sent_upto] if m not in self.acked)
            while sent_upto < len(self.script) and inflight < window:
                cid, cmid = self.script[sent_upto]
                sent_upto += 1
                if cmid in self.acked:
                    continue
                self.dev.put(pb.ClientEvent(send=pb.SendEvent(
                    client_message_id=cmid, conversation_id=cid, text=f"payload {cmid}")))
                inflight += 1
            await self.dev.wait_for(
                lambda: self._new_acks() or self.dev.ended.is_set(), within=60,
                what=f"acks ({len(self.acked)} of {len(self.script)} acknowledged, "
                     f"{self.reconnects} reconnects, on {self.dev.addr})")
        await self.dev.close()

    def _new_acks(self) -> bool:
        return any(e.WhichOneof("event") in ("send_ack", "error") for e in self.dev.events)

    async def _collect(self) -> None:
        for e in self.dev.events:
            kind = e.WhichOneof("event")
            if kind == "send_ack":
                m = e.send_ack.message
                self.acked[e.send_ack.client_message_id] = (m.conversation_id, int(m.message_id))
            elif kind == "error":
                raise AssertionError(f"send failed: {e.error}")
        self.dev.events.clear()


async def _keep_connected(dev: Device, addrs: list[str], stop: asyncio.Event) -> int:
    """Reconnect (to the next replica) whenever the stream ends, until stopped."""
    reconnects = 0
    while not stop.is_set():
        ended = asyncio.create_task(dev.ended.wait())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({ended, stopping}, return_when=asyncio.FIRST_COMPLETED)
        ended.cancel()
        stopping.cancel()
        if stop.is_set():
            break
        reconnects += 1
        await asyncio.sleep(0.2)
        await dev.connect(addr=addrs[reconnects % len(addrs)])
    return reconnects


async def test_sigkill_mid_run_loses_nothing_acknowledged(
        replicas: tuple[StackProcess, StackProcess]) -> None:
    a, b = replicas
    n_senders, n_recipients, total = 10, 10, 10_000
    senders = await _users(a, "ks", n_senders)
    recipients = await _users(a, "kr", n_recipients)
    convs: dict[tuple[int, int], str] = {}
    for i, (_, s_tok, _) in enumerate(senders):
        for j, (r_name, _, _) in enumerate(recipients):
            convs[(i, j)] = _direct(a, s_tok, r_name)
    per_sender = total // n_senders
    scripts = [[(convs[(i, k % n_recipients)], f"s{i}-m{k}") for k in range(per_sender)]
               for i in range(n_senders)]
    # half of each side starts on the replica that will be killed
    addrs_a, addrs_b = [a.grpc_addr, b.grpc_addr], [b.grpc_addr, a.grpc_addr]
    send = [_Sender(tok, name, addrs_a if i % 2 == 0 else addrs_b, scripts[i])
            for i, (name, tok, _) in enumerate(senders)]
    recv = [Device((addrs_a if j % 2 == 0 else addrs_b)[0], tok, f"{name}-phone")
            for j, (name, tok, _) in enumerate(recipients)]
    stop = asyncio.Event()
    for d in recv:
        await d.connect()
    await asyncio.gather(*(d.synced.wait() for d in recv))
    keepers = [asyncio.create_task(_keep_connected(d, addrs_a if j % 2 == 0 else addrs_b, stop))
               for j, d in enumerate(recv)]

    async def killer() -> None:
        while sum(len(s.acked) for s in send) < total * 0.4:  # noqa: ASYNC110 (polls a count)
            await asyncio.sleep(0.05)
        a.stop(signal.SIGKILL)

    kill = asyncio.create_task(killer())
    try:
        await asyncio.wait_for(asyncio.gather(*(s.run() for s in send)), timeout=240)
        await kill
        assert a.proc is not None and a.proc.returncode == -signal.SIGKILL
        assert sum(s.reconnects for s in send) >= n_senders // 2  # the killed half failed over
        expected: dict[str, list[int]] = {}
        for s in send:
            for cmid in [m for _, m in s.script]:
                cid, mid = s.acked[cmid]
                expected.setdefault(cid, []).append(mid)
        for ids in expected.values():
            assert ids == sorted(ids), "a sender's messages got ids out of send order"
        by_recipient: dict[int, list[str]] = {j: [convs[(i, j)] for i in range(n_senders)]
                                              for j in range(n_recipients)}

        def complete(j: int) -> bool:
            return all(set(expected[c]) <= set(recv[j].order.get(c, ())) for c in by_recipient[j])

        for j, d in enumerate(recv):
            await d.wait_for(lambda j=j: complete(j), within=60,  # type: ignore[misc]
                             what="every acknowledged message")
        for j, d in enumerate(recv):
            for c in by_recipient[j]:
                got = d.order[c]
                assert got == sorted(got), "delivered out of order (after de-duplication)"
                assert got == expected[c], "a message nobody acknowledged, or one missing"
        duplicates = sum(len(v) for d in recv for v in d.arrivals.values()) - total
        # stored exactly once: the history holds one row per client message id
        stub = pbg.ChatServiceStub(b.channel())
        r_tok = recipients[0][1]
        for c in by_recipient[0]:
            rows: list[pb.Message] = []
            tok = ""
            while True:
                page = stub.GetHistory(pb.GetHistoryRequest(conversation_id=c, page_size=200,
                                                            page_token=tok),
                                       metadata=grpc_metadata(r_tok), timeout=30)
                rows.extend(page.messages)
                tok = page.next_page_token
                if not tok:
                    break
            cmids = [m.client_message_id for m in rows]
            assert len(cmids) == len(set(cmids)) == len(expected[c])
    finally:
        stop.set()
        kill.cancel()
        for k in keepers:
            k.cancel()
        for d in recv:
            await d.close()
    # a device of each recipient that was offline for the whole run gets everything on connect
    for j, (name, tok, _) in enumerate(recipients[:4]):
        late = await Device(b.grpc_addr, tok, f"{name}-tablet").connect()
        try:
            await late.synced.wait()
            for c in by_recipient[j]:
                assert late.order.get(c) == expected[c]
                assert late.arrivals.get(c) == expected[c]  # a fresh cursor: each exactly once
        finally:
            await late.close()
    print(f"\n{total} messages, {duplicates} duplicate deliveries across the kill "
          f"(dropped by id), reconnects: senders {sum(s.reconnects for s in send)}")
