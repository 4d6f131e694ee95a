"""The per-process session hub: who is connected where, and how events get there.

Session registry
    ``{u:<user>}:sessions`` is a Redis hash ``device -> "<instance>|<expiry ms>"``.
    A stream writes its entry when it connects (before replay starts, see
    ``session.py``) and removes it when it ends; every instance rewrites the
    entries of its open streams every ``REFRESH_S`` seconds with a fresh
    expiry, so the entries of a killed instance go stale after
    ``SESSION_TTL_S`` and are ignored (and the key itself expires).

Routing between instances
    Each instance subscribes to one channel of its own,
    ``chat:{i:<instance>}``. To deliver an event to users, the sender looks up
    their registry hashes (one pipeline), groups the target users by instance
    and publishes once per instance (plus a direct hand-off for streams in its
    own process). A channel per instance rather than per user keeps the
    number of subscriptions constant (one per process, not one per online
    user) and turns a 500-member group message into one publish per instance
    hosting any member. The channel name carries a hash tag, so with Redis
    Cluster's sharded pub/sub (SPUBLISH/SSUBSCRIBE) each instance's traffic
    stays on one shard. Pub/sub is fire-and-forget: an event lost on the way
    (or for a stream that just moved) costs nothing durable, because the
    message is in the table and the device's cursor replays it on reconnect.
    If the subscription itself breaks, the hub ends every local stream so its
    clients reconnect and replay.

Presence
    ``{u:<user>}:presence`` holds ``device -> expiry ms`` (refreshed by the
    device's heartbeats, ``PRESENCE_TTL_S``) and ``seen -> last-seen ms``. A
    user is online while any device entry is fresh. Coming online (the first
    device) and going offline (the last device disconnects) are sent to the
    user's contacts as PresenceChange events.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import structlog
from sysdesign.chat.v1 import chat_pb2 as pb

from servers.chat.core import ChatCore
from servers.platform.runtime import Runtime
from servers.storage.redis_conn import Subscription, key, queue_publish

if TYPE_CHECKING:
    from servers.chat.session import Session

log = structlog.get_logger("sysdesign.chat")

SESSION_TTL_S = 30
REFRESH_S = 10
PRESENCE_TTL_S = 45
HEARTBEAT_INTERVAL_S = 15
FLUSH_S = 0.1
PERSIST_S = 5.0
# Receipts are pushed to every member of conversations up to this size; larger
# groups read them with GetReceipts (a push per ack to hundreds of members is
# more traffic than the messages themselves).
RECEIPT_PUSH_MAX_MEMBERS = 100
LAST_SEEN_KEEP_S = 30 * 86_400
MAX_CONCURRENT_HANDSHAKES = 32
MAX_CONCURRENT_BACKGROUND = 32
MAX_CONCURRENT_SENDS = 128

# Remove our registry entry only if it is still ours (the device may have
# reconnected to another instance meanwhile).
_UNREGISTER_LUA = """
local v = redis.call('HGET', KEYS[1], ARGV[1])
if v and string.sub(v, 1, string.len(ARGV[2]) + 1) == ARGV[2] .. '|' then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""


def sessions_key(user_id: int) -> str:
    return key(f"u:{user_id}", "sessions")


def presence_key(user_id: int) -> str:
    return key(f"u:{user_id}", "presence")


def channel_of(instance: str) -> str:
    return "chat:{i:" + instance + "}"


def _ms() -> int:
    return int(time.time() * 1000)


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def presence_of(raw: dict[Any, Any], now_ms: int) -> tuple[bool, int]:
    """(online, last seen ms) from a presence hash."""
    online = False
    seen = 0
    for k, v in raw.items():
        name, value = _s(k), int(_s(v))
        if name == "seen":
            seen = max(seen, value)
        elif value > now_ms:
            online = True
    return online, seen


class Hub:
    def __init__(self, rt: Runtime, core: ChatCore) -> None:
        self.rt = rt
        self.core = core
        self.redis = rt.redis
        self.instance = secrets.token_hex(6)
        self.channel = channel_of(self.instance)
        self.sessions: dict[int, dict[str, Session]] = {}
        self._unregister = rt.redis.register_script(_UNREGISTER_LUA)
        self._tasks: list[asyncio.Task[Any]] = []
        self._started = False
        self._start_lock = asyncio.Lock()
        self._stopping = False
        self._subscribed = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()
        # Admission control: a reconnect storm (an instance died, thousands of
        # devices come back at once) or a burst of presence fan-outs must not
        # open more Redis connections than the pool holds.
        self.handshakes = asyncio.Semaphore(MAX_CONCURRENT_HANDSHAKES)
        self._spawned = asyncio.Semaphore(MAX_CONCURRENT_BACKGROUND)
        # Sends in progress at once in this process: more wait their turn (backpressure
        # on the streams) instead of failing when the Redis connection pool runs dry.
        self.send_slots = asyncio.Semaphore(MAX_CONCURRENT_SENDS)

    @classmethod
    def for_runtime(cls, rt: Runtime) -> Hub:
        def make() -> Hub:
            hub = cls(rt, ChatCore.for_runtime(rt))
            rt.drainers.append(hub.drain)
            rt.closers.append(hub.close)
            return hub
        return rt.singleton("chat.hub", make)

    # ------------------------------------------------------------- lifecycle

    async def ensure_started(self) -> None:
        if self._started:
            return
        async with self._start_lock:
            if self._started:
                return
            self._tasks.append(asyncio.create_task(self._listen(), name="chat-pubsub"))
            self._tasks.append(asyncio.create_task(self._sweep(), name="chat-sweep"))
            self._started = True
        await asyncio.wait_for(self._subscribed.wait(), timeout=10)

    async def drain(self) -> None:
        """Shutdown began: end every stream with UNAVAILABLE so its device reconnects to
        another instance now, rather than when the grace period runs out. Acknowledged
        positions are flushed first, so a reconnect replays as little as possible."""
        with contextlib.suppress(Exception):
            await self.flush(force=True)
        for by_device in list(self.sessions.values()):
            for s in list(by_device.values()):
                s.close("the server is shutting down; reconnect")

    async def close(self) -> None:
        self._stopping = True
        for by_device in list(self.sessions.values()):
            for s in list(by_device.values()):
                s.close("the server is shutting down")
        with contextlib.suppress(Exception):
            await self.flush(force=True)
            await self.core.flush_releases()
        for t in [*self._tasks, *self._background]:
            t.cancel()
        for t in [*self._tasks, *self._background]:
            with contextlib.suppress(BaseException):
                await t

    def spawn(self, coro: Any) -> None:
        """Fire-and-forget work (presence fan-out) that must not block a stream."""
        async def bounded() -> None:
            try:
                async with self._spawned:
                    await coro
            finally:
                # Cancelled at shutdown while still waiting for a slot: close the
                # coroutine that never ran (no "was never awaited" warning).
                coro.close()

        t = asyncio.create_task(bounded())
        self._background.add(t)
        t.add_done_callback(self._background.discard)

    async def _listen(self) -> None:
        """Deliver what other instances publish to our channel; resubscribe on errors."""
        while not self._stopping:
            # SSUBSCRIBE on a cluster: the channel's hash tag is the instance,
            # so each instance's traffic stays on one shard.
            sub = Subscription(self.redis, self.channel)
            try:
                await sub.start()
                self._subscribed.set()
                while not self._stopping:
                    data = await sub.get(1.0)
                    if data is not None:
                        self._on_publish(data)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("chat_pubsub_lost", error=repr(exc))
                # Events may have been lost: every local stream reconnects and replays.
                for by_device in list(self.sessions.values()):
                    for s in list(by_device.values()):
                        s.close("the server lost its event subscription; reconnect")
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    await sub.aclose()

    async def _sweep(self) -> None:
        """Flush cursors and receipts, release in-flight ids, refresh the registry.

        The registry is refreshed a slice per tick, so that every entry is
        rewritten within REFRESH_S without one large pipeline stalling the loop.
        """
        todo: list[int] = []
        per_tick = 1
        while not self._stopping:
            await asyncio.sleep(FLUSH_S)
            try:
                await self.core.flush_releases()
                await self.flush()
                if not todo:
                    todo = list(self.sessions)
                    per_tick = max(1, int(len(todo) * FLUSH_S / REFRESH_S) + 1)
                batch, todo = todo[:per_tick], todo[per_tick:]
                await self._refresh_registry(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("chat_sweep_failed", error=repr(exc))

    # -------------------------------------------------------------- registry

    def _entry(self) -> str:
        return f"{self.instance}|{_ms() + SESSION_TTL_S * 1000}"

    async def _refresh_registry(self, users: list[int]) -> None:
        if not users:
            return
        pipe = self.redis.pipeline(transaction=False)
        entry = self._entry()
        for uid in users:
            by_device = self.sessions.get(uid)
            if by_device:
                pipe.hset(sessions_key(uid), mapping={d: entry for d in by_device})
                pipe.expire(sessions_key(uid), SESSION_TTL_S * 2)
        await pipe.execute()

    async def attach(self, session: Session) -> None:
        """Register a stream locally and in Redis (before its replay starts)."""
        await self.ensure_started()
        by_device = self.sessions.setdefault(session.user_id, {})
        old = by_device.get(session.device_id)
        if old is not None and old is not session:
            old.close("this device connected again")
        by_device[session.device_id] = session
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(sessions_key(session.user_id), session.device_id, self._entry())
        pipe.expire(sessions_key(session.user_id), SESSION_TTL_S * 2)
        pipe.hgetall(presence_key(session.user_id))
        now = _ms()
        pipe.hset(presence_key(session.user_id),
                  mapping={session.device_id: now + PRESENCE_TTL_S * 1000, "seen": now})
        pipe.expire(presence_key(session.user_id), LAST_SEEN_KEEP_S)
        res = await pipe.execute()
        was_online, _ = presence_of(res[2], now)
        if not was_online:
            self.spawn(self._announce(session.user_id, True, now))

    async def detach(self, session: Session) -> None:
        by_device = self.sessions.get(session.user_id)
        if by_device is not None and by_device.get(session.device_id) is session:
            del by_device[session.device_id]
            if not by_device:
                del self.sessions[session.user_id]
        with contextlib.suppress(Exception):
            await self.flush_session(session)
        if self.sessions.get(session.user_id, {}).get(session.device_id) is not None:
            return  # replaced by a newer stream of the same device here
        now = _ms()
        try:
            await self._unregister(keys=[sessions_key(session.user_id)],
                                   args=[session.device_id, self.instance])
            pipe = self.redis.pipeline(transaction=False)
            pipe.hdel(presence_key(session.user_id), session.device_id)
            pipe.hset(presence_key(session.user_id), "seen", now)
            pipe.hgetall(presence_key(session.user_id))
            res = await pipe.execute()
        except Exception as exc:
            log.warning("chat_detach_failed", error=repr(exc))
            return
        online, _ = presence_of(res[2], now)
        if not online and not self._stopping:
            self.spawn(self._announce(session.user_id, False, now))

    async def heartbeat(self, session: Session) -> None:
        now = _ms()
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(presence_key(session.user_id),
                  mapping={session.device_id: now + PRESENCE_TTL_S * 1000, "seen": now})
        pipe.expire(presence_key(session.user_id), LAST_SEEN_KEEP_S)
        pipe.hset(sessions_key(session.user_id), session.device_id, self._entry())
        await pipe.execute()

    async def presence(self, user_ids: list[int]) -> dict[int, tuple[bool, int]]:
        pipe = self.redis.pipeline(transaction=False)
        for u in user_ids:
            pipe.hgetall(presence_key(u))
        now = _ms()
        return {u: presence_of(raw, now) for u, raw in zip(user_ids, await pipe.execute(),
                                                             strict=True)}

    async def _announce(self, user_id: int, online: bool, now: int) -> None:
        try:
            contacts = await self.core.contacts(user_id)
            if not contacts:
                return
            ev = pb.ServerEvent(presence=pb.PresenceChange(user_id=str(user_id), online=online))
            ev.presence.last_seen_time.FromMilliseconds(now)
            await self.route(contacts, ev)
        except Exception as exc:
            log.warning("chat_presence_fanout_failed", user_id=user_id, error=repr(exc))

    # --------------------------------------------------------------- routing

    async def route(self, user_ids: Iterable[int], event: pb.ServerEvent, *,
                    skip: tuple[int, str] | None = None) -> None:
        """Deliver an event to every connected device of the users (except ``skip``)."""
        users = list(user_ids)
        if not users:
            return
        pipe = self.redis.pipeline(transaction=False)
        for u in users:
            pipe.hgetall(sessions_key(u))
        now = _ms()
        targets: dict[str, list[int]] = {}
        for u, raw in zip(users, await pipe.execute(), strict=True):
            for inst in {v.rsplit("|", 1)[0] for v in map(_s, raw.values())
                         if int(v.rsplit("|", 1)[1]) > now}:
                targets.setdefault(inst, []).append(u)
        if not targets:
            return
        skip_s = f"{skip[0]}/{skip[1]}" if skip else ""
        local = targets.pop(self.instance, None)
        if targets:
            data = event.SerializeToString()
            pipe = self.redis.pipeline(transaction=False)
            for inst, us in targets.items():
                head = ",".join(map(str, us)) + "|" + skip_s + "\n"
                queue_publish(pipe, channel_of(inst), head.encode() + data)
            await pipe.execute()
        if local:
            self.deliver(local, event, skip)

    def _on_publish(self, data: bytes) -> None:
        head, _, body = data.partition(b"\n")
        users_s, _, skip_s = head.decode().partition("|")
        skip = None
        if skip_s:
            u, _, d = skip_s.partition("/")
            skip = (int(u), d)
        event = pb.ServerEvent.FromString(body)
        self.deliver([int(u) for u in users_s.split(",") if u], event, skip)

    def deliver(self, users: Iterable[int], event: pb.ServerEvent,
                skip: tuple[int, str] | None) -> None:
        for u in users:
            for device, s in list(self.sessions.get(u, {}).items()):
                if skip is not None and skip == (u, device):
                    continue
                s.push(event)

    # ------------------------------------------------- cursors and receipts

    async def flush(self, *, force: bool = False) -> None:
        """Advance and persist every local stream's acknowledged positions, in one batch."""
        dirty = [s for by_device in list(self.sessions.values()) for s in by_device.values()
                 if s.wanted or s.unsaved]
        if dirty:
            await self._flush(dirty, force=force)

    async def flush_session(self, s: Session) -> None:
        if s.wanted or s.unsaved:
            await self._flush([s], force=True)

    async def _flush(self, sessions: list[Session], *, force: bool) -> None:
        """Advance each device's cursor to what it acknowledged, clamped to the watermarks.

        Receipts move at once (a DELIVERED event every FLUSH_S at most); the
        cursors and the receipt rows are written to the table at most every
        PERSIST_S per stream, and when the stream ends. A cursor that lags in
        the table costs duplicates on a crash (de-duplicated by id), never a
        lost message, and it halves the table writes per delivered message.
        """
        wanted = [(s, dict(s.wanted)) for s in sessions if s.wanted]
        marks = await self.core.watermarks({cid for _, w in wanted for cid in w})
        delivered: dict[tuple[int, int], int] = {}
        for s, w in wanted:
            for cid, upto in w.items():
                pos = min(upto, marks[cid])
                if pos > s.cursors.get(cid, 0):
                    s.cursors[cid] = pos
                    s.unsaved = True
                    k = (s.user_id, cid)
                    delivered[k] = max(delivered.get(k, 0), pos)
                if pos >= upto and s.wanted.get(cid) == upto:
                    del s.wanted[cid]
        if delivered:
            moved = await self.core.delivered_moved(delivered)
            for (uid, cid), upto in moved.items():
                self.spawn(self._receipt(uid, cid, upto))
        now = time.monotonic()
        saves = []
        for s in sessions:
            if s.unsaved and (force or now - s.saved_at >= PERSIST_S):
                diff = {c: p for c, p in s.cursors.items() if p > s.saved.get(c, 0)}
                s.unsaved = False
                s.saved_at = now
                if diff:
                    s.saved.update(diff)
                    saves.append(self.core.save_cursors(s.user_id, s.device_id, diff))
                    saves.append(self.core.persist_delivered(s.user_id, diff))
        if saves:
            await asyncio.gather(*saves)

    async def _receipt(self, uid: int, cid: int, upto: int) -> None:
        members = await self.core.members_cached(cid)
        if len(members) > RECEIPT_PUSH_MAX_MEMBERS:
            return
        await self.route(members - {uid}, pb.ServerEvent(receipt=pb.ReceiptChange(
            conversation_id=str(cid), user_id=str(uid),
            status=pb.RECEIPT_STATUS_DELIVERED, up_to_message_id=str(upto))))
