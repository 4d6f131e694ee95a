"""The chat domain: conversations, sends (persisted before they are acknowledged),
history, delivery cursors, read state and receipts.

Ordering and the delivery cursor
--------------------------------
A message id is a Snowflake id, but ids minted by different server processes
are only k-sorted: a process with a clock a few milliseconds behind could mint
an id *below* one another process already committed, and a device whose
cursor passed the higher id would never replay the lower one. So the id of a
message is allocated per conversation by one Lua script on keys that share
the conversation's hash tag (``{c:<id>}``):

- ``{c:<id>}:seq`` holds the last id allocated in the conversation; the new
  id is ``max(snowflake, last + 1)``: allocation order is id order, across
  every process (ids stay Snowflake-shaped, their time bits within a
  millisecond or so of the truth, and unique within their conversation);
- ``{c:<id>}:inflight`` records the id as *in flight* until the message is
  committed to the table and published, plus a short grace period
  (``RELEASE_DELAY_S``) for the publish to reach every live stream.

Concurrent senders can still commit out of id order (A allocated, B
allocated, B committed first). A device's delivery cursor is therefore
clamped to the conversation's *watermark*, just below the smallest id still
in flight: a cursor never passes a message that might not be in the table
(or on its way to the device) yet, so replay after the cursor can lose
nothing. The price is that a device may see a message twice across a
reconnect (at-least-once); clients de-duplicate by message id.

The members of a conversation are mirrored in a Redis set on the same tag,
so the same script also checks that the sender is a member and returns the
members to route to: one Redis round trip per send before the table write.
When Redis lost the keys (a flush, a failover), the set is rebuilt from the
table and the last id from the newest message row.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

from servers.chat import validation as val
from servers.chat.tables import (
    ATTACHMENTS,
    BUCKET_MS,
    CLIENT_MESSAGES,
    CONVERSATIONS,
    DEVICE_CURSORS,
    DIRECT_PAIRS,
    MEMBERS,
    MESSAGES,
    RECEIPTS,
    USER_CONVERSATIONS,
)
from servers.identity.tables import USERNAMES, USERS
from servers.platform.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
    Violations,
)
from servers.platform.ids import EPOCH_MS, bucket_of
from servers.platform.runtime import Runtime
from servers.storage.redis_conn import key
from servers.storage.table import ClusteringRange

DIRECT = 1
GROUP = 2
ROLE_MEMBER = 1
ROLE_ADMIN = 2

_LO_BITS = 22  # worker + sequence bits of a Snowflake id
_LO_MASK = (1 << _LO_BITS) - 1
# An in-flight entry older than this is dropped (its sender died); a send
# never takes this long (the stream bounds one send to SEND_TIMEOUT_S).
INFLIGHT_STALE_MS = 60_000
SEND_TIMEOUT_S = 10.0
# How long an id stays "in flight" after its publish: the time for the
# publish to reach a live stream, so that an ack of a later message cannot
# move a cursor past it first.
RELEASE_DELAY_S = 2.0
_LOADED = b"0"  # sentinel member: the set was loaded (a group may have no members left)

# KEYS: members set, seq, inflight zset. ARGV: sender, candidate hi, candidate lo,
# prune-before hi, floor hi ('' none), floor lo, inflight ttl ms.
# Ids are split in (ms, low 22 bits): Lua numbers are doubles, exact only to 2**53.
_SEND_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return {-2} end
local hi = tonumber(ARGV[2])
local lo = tonumber(ARGV[3])
local last = redis.call('GET', KEYS[2])
local lhi, llo
if last then
  local sep = string.find(last, ':', 1, true)
  lhi = tonumber(string.sub(last, 1, sep - 1))
  llo = tonumber(string.sub(last, sep + 1))
elseif ARGV[5] ~= '' then
  lhi = tonumber(ARGV[5])
  llo = tonumber(ARGV[6])
else
  return {-3}
end
if hi < lhi or (hi == lhi and lo <= llo) then
  hi = lhi
  lo = llo + 1
  if lo > 4194303 then
    hi = hi + 1
    lo = 0
  end
end
local member = string.format('%d:%d', hi, lo)
redis.call('SET', KEYS[2], member)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[4])
redis.call('ZADD', KEYS[3], hi, member)
redis.call('PEXPIRE', KEYS[3], ARGV[7])
local out = {1, hi, lo}
for _, m in ipairs(redis.call('SMEMBERS', KEYS[1])) do out[#out + 1] = m end
return out
"""

# Rebuild the member set only if nobody did meanwhile (KEYS: members; ARGV: ids).
_LOAD_MEMBERS_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SADD', KEYS[1], unpack(ARGV))
return 1
"""

# KEYS: inflight; ARGV: prune-before hi. The smallest hi still in flight, or -1.
_WATERMARK_LUA = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1])
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if first[2] then return tonumber(first[2]) end
return -1
"""


def members_key(cid: int) -> str:
    return key(f"c:{cid}", "members")


def seq_key(cid: int) -> str:
    return key(f"c:{cid}", "seq")


def inflight_key(cid: int) -> str:
    return key(f"c:{cid}", "inflight")


def split_id(mid: int) -> tuple[int, int]:
    return mid >> _LO_BITS, mid & _LO_MASK


def join_id(hi: int, lo: int) -> int:
    return (hi << _LO_BITS) | lo


def _now_ms() -> int:
    return int(time.time() * 1000)


def _prune_before_hi() -> int:
    return max(0, _now_ms() - INFLIGHT_STALE_MS - EPOCH_MS)


def _b(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def encode_token(value: int) -> str:
    return base64.urlsafe_b64encode(str(value).encode()).decode().rstrip("=")


def decode_token(token: str, field: str = "page_token") -> int:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        value = int(raw)
        if value <= 0:
            raise ValueError
        return value
    except Exception as exc:
        raise InvalidArgument([(field, "is not a token from a previous response")]) from exc


def members_field(ids: list[str], usernames: list[str]) -> str:
    """The request field a violation about the member list names: the one the caller set."""
    return "member_usernames" if usernames and not ids else "member_ids"


class ChatCore:
    """Domain logic shared by the servicer, the session hub and the edge route."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.redis = rt.redis
        self.tables = rt.tables
        self._send = rt.redis.register_script(_SEND_LUA)
        self._load = rt.redis.register_script(_LOAD_MEMBERS_LUA)
        self._conversations: dict[int, dict[str, Any]] = {}
        # (cid, member) in flight, released RELEASE_DELAY_S after their publish.
        self._releases: list[tuple[float, int, str]] = []
        self._delivered: dict[tuple[int, int], int] = {}
        self._members_cache: dict[int, tuple[float, set[int]]] = {}

    @classmethod
    def for_runtime(cls, rt: Runtime) -> ChatCore:
        return rt.singleton("chat.core", lambda: cls(rt))

    # ------------------------------------------------------------------ members

    async def conversation(self, cid: int) -> dict[str, Any]:
        row = self._conversations.get(cid)
        if row is None:
            row = await self.tables.get(CONVERSATIONS, {"conversation_id": cid})
            if row is None:
                raise NotFound(f"no conversation {cid}", reason="CONVERSATION_NOT_FOUND",
                               metadata={"conversation_id": str(cid)})
            if len(self._conversations) > 50_000:
                self._conversations.clear()
            self._conversations[cid] = row
        return row

    async def _load_members(self, cid: int) -> None:
        await self.conversation(cid)  # NotFound for an unknown conversation
        page = await self.tables.slice(MEMBERS, {"conversation_id": cid}, limit=1000)
        await self._load(keys=[members_key(cid)],
                         args=[_LOADED, *[str(r["user_id"]) for r in page.rows]])

    async def members(self, cid: int) -> set[int]:
        raw = await self.redis.smembers(members_key(cid))
        if not raw:
            await self._load_members(cid)
            raw = await self.redis.smembers(members_key(cid))
        return {int(m) for m in raw if m != _LOADED}

    async def members_cached(self, cid: int, max_age_s: float = 2.0) -> set[int]:
        """The members, up to ``max_age_s`` old: for receipts and typing, where a
        member who just left getting one more event is harmless."""
        hit = self._members_cache.get(cid)
        now = time.monotonic()
        if hit is not None and now - hit[0] < max_age_s:
            return hit[1]
        members = await self.members(cid)
        if len(self._members_cache) > 50_000:
            self._members_cache.clear()
        self._members_cache[cid] = (now, members)
        return members

    async def require_member(self, cid: int, user_id: int) -> set[int]:
        members = await self.members(cid)
        if user_id not in members:
            raise PermissionDenied("you are not a member of this conversation",
                                   reason="NOT_A_MEMBER", metadata={"conversation_id": str(cid)})
        return members

    async def member_rows(self, cid: int) -> list[dict[str, Any]]:
        return (await self.tables.slice(MEMBERS, {"conversation_id": cid}, limit=1000)).rows

    async def contacts(self, user_id: int, limit_conversations: int = 1000) -> set[int]:
        """Users sharing at least one conversation with ``user_id``."""
        page = await self.tables.slice(USER_CONVERSATIONS, {"user_id": user_id},
                                       limit=limit_conversations)
        out: set[int] = set()
        for r in page.rows:
            try:
                out |= await self.members(r["conversation_id"])
            except NotFound:
                continue
        out.discard(user_id)
        return out

    # ------------------------------------------------------------ conversations

    async def resolve_users(self, ids: Iterable[str], usernames: Iterable[str],
                            v: Violations) -> dict[int, str]:
        """User id -> username for the given ids and usernames; violations for unknown ones."""
        out: dict[int, str] = {}
        ids, usernames = list(ids), list(usernames)
        if len(ids) + len(usernames) > 1000:
            v.add(members_field(ids, usernames), "at most 1000 users per call")
            return out
        for i, raw in enumerate(ids):
            if len(v.items) >= 20:  # enough to fix the request; keeps the status small
                return out
            uid = val.parse_id(raw, v, f"member_ids[{i}]")
            if not uid:
                continue
            row = await self.tables.get(USERS, {"user_id": uid})
            if row is None:
                v.add(f"member_ids[{i}]", f"no user {raw}")
            else:
                out[uid] = row["username"]
        for i, name in enumerate(usernames):
            if len(v.items) >= 20:
                return out
            row = await self.tables.get(USERNAMES, {"username": name}) if name else None
            if row is None:
                v.add(f"member_usernames[{i}]", f"no user {name!r}")
            else:
                out[row["user_id"]] = name
        return out

    async def _add_member_rows(self, cid: int, members: dict[int, str], roles: dict[int, int],
                               now: int) -> None:
        await asyncio.gather(*(
            self.tables.put(MEMBERS, {"conversation_id": cid, "user_id": uid, "username": name,
                                      "role": roles.get(uid, ROLE_MEMBER), "join_ms": now})
            for uid, name in members.items()))
        await asyncio.gather(*(
            self.tables.put(USER_CONVERSATIONS, {"user_id": uid, "conversation_id": cid,
                                                 "join_ms": now})
            for uid in members))
        # Write-through to the Redis mirror (when it is loaded; else the next reader loads it).
        if await self.redis.exists(members_key(cid)):
            await self.redis.sadd(members_key(cid), *[str(u) for u in members])

    async def create(self, caller_id: int, caller_name: str, kind: int, member_ids: list[str],
                     member_usernames: list[str], title: str) -> tuple[dict[str, Any], bool]:
        v = Violations()
        if kind not in (DIRECT, GROUP):
            v.add("type", "must be CONVERSATION_TYPE_DIRECT or CONVERSATION_TYPE_GROUP")
        n_given = len(member_ids) + len(member_usernames)
        field = members_field(member_ids, member_usernames)
        if kind == DIRECT:
            if n_given != 1:
                v.add(field, "a direct conversation takes exactly one other user")
            if title:
                v.add("title", "only groups have a title")
        elif kind == GROUP:
            val.check_title(title, v)
            if n_given + 1 > val.MAX_GROUP_MEMBERS:
                v.add(field, f"a group holds at most {val.MAX_GROUP_MEMBERS} members, "
                                    f"you included (got {n_given} others)")
        v.raise_if_any()
        others = await self.resolve_users(member_ids, member_usernames, v)
        others.pop(caller_id, None)
        if kind == DIRECT and not v and not others:
            v.add(field, "must name another user than yourself")
        if kind == GROUP and len(others) + 1 > val.MAX_GROUP_MEMBERS:
            v.add(field, f"a group holds at most {val.MAX_GROUP_MEMBERS} members "
                                f"(got {len(others) + 1} with you)")
        v.raise_if_any()
        now = _now_ms()
        members = {caller_id: caller_name, **others}
        if kind == DIRECT:
            other = next(iter(others))
            lo, hi = sorted((caller_id, other))
            cid = self.rt.snowflake.next_id()
            created = await self.tables.put(
                DIRECT_PAIRS, {"user_lo": lo, "user_hi": hi, "conversation_id": cid,
                               "create_ms": now}, if_not_exists=True)
            if not created:
                pair = await self.tables.get(DIRECT_PAIRS, {"user_lo": lo, "user_hi": hi})
                assert pair is not None
                cid, now = pair["conversation_id"], pair["create_ms"]
            # Written by the winner and again by every later create (same values): a
            # winner that died between the pair row and these rows is completed here.
            row = {"conversation_id": cid, "kind": DIRECT, "title": "", "creator_id": lo,
                   "create_ms": now}
            await self.tables.put(CONVERSATIONS, row, if_not_exists=True)
            await self._add_member_rows(cid, members, {}, now)
            if created:
                await self._init_keys(cid, members)
            return await self.conversation(cid), created
        cid = self.rt.snowflake.next_id()
        row = {"conversation_id": cid, "kind": GROUP, "title": title.strip(),
               "creator_id": caller_id, "create_ms": now}
        await self.tables.put(CONVERSATIONS, row)
        await self._add_member_rows(cid, members, {caller_id: ROLE_ADMIN}, now)
        await self._init_keys(cid, members)
        return row, True

    async def _init_keys(self, cid: int, members: dict[int, str]) -> None:
        """A new conversation's Redis mirror: its members, and an empty sequence (no
        message can exist yet), so its first send needs no table read."""
        await self._load(keys=[members_key(cid)], args=[_LOADED, *[str(u) for u in members]])
        await self.redis.set(seq_key(cid), "0:0", nx=True)

    async def _require_admin(self, cid: int, caller_id: int) -> dict[str, Any]:
        conv = await self.conversation(cid)
        await self.require_member(cid, caller_id)
        if conv["kind"] != GROUP:
            raise FailedPrecondition("direct conversations have fixed members",
                                     reason="NOT_A_GROUP", subject=f"conversations/{cid}")
        me = await self.tables.get(MEMBERS, {"conversation_id": cid, "user_id": caller_id})
        if me is None or me["role"] != ROLE_ADMIN:
            raise PermissionDenied("only a group admin can change its members", reason="NOT_ADMIN")
        return conv

    async def add_members(self, caller_id: int, cid: int, member_ids: list[str],
                          member_usernames: list[str]) -> None:
        await self._require_admin(cid, caller_id)
        v = Violations()
        if not member_ids and not member_usernames:
            v.add("member_ids", "name at least one user (member_ids or member_usernames)")
        v.raise_if_any()
        new = await self.resolve_users(member_ids, member_usernames, v)
        v.raise_if_any()
        current = await self.members(cid)
        new = {u: n for u, n in new.items() if u not in current}
        if len(current) + len(new) > val.MAX_GROUP_MEMBERS:
            raise InvalidArgument([(members_field(member_ids, member_usernames),
                                    f"a group holds at most {val.MAX_GROUP_MEMBERS} members "
                                    f"({len(current)} now, {len(new)} new)")])
        if new:
            await self._add_member_rows(cid, new, {}, _now_ms())

    async def _remove(self, cid: int, user_id: int) -> None:
        await self.tables.delete(MEMBERS, {"conversation_id": cid, "user_id": user_id})
        await self.tables.delete(USER_CONVERSATIONS, {"user_id": user_id, "conversation_id": cid})
        await self.redis.srem(members_key(cid), str(user_id))

    async def remove_member(self, caller_id: int, cid: int, user: str) -> None:
        v = Violations()
        uid = val.parse_id(user, v, "user_id")
        v.raise_if_any()
        await self._require_admin(cid, caller_id)
        if uid not in await self.members(cid):
            raise NotFound(f"user {uid} is not a member", reason="MEMBER_NOT_FOUND")
        if uid == caller_id:
            raise FailedPrecondition("admins leave with LeaveConversation", reason="USE_LEAVE",
                                     subject=f"conversations/{cid}")
        await self._remove(cid, uid)

    async def leave(self, caller_id: int, cid: int) -> None:
        conv = await self.conversation(cid)
        await self.require_member(cid, caller_id)
        if conv["kind"] != GROUP:
            raise FailedPrecondition("a direct conversation cannot be left", reason="NOT_A_GROUP",
                                     subject=f"conversations/{cid}")
        await self._remove(cid, caller_id)

    # ------------------------------------------------------------------- sends

    async def send(self, sender_id: int, sender_name: str, client_message_id: str,
                   conversation: str, text: str, attachment: str,
                   ) -> tuple[dict[str, Any], bool, set[int]]:
        """Persist one message: (row, duplicate, members to deliver to).

        The caller publishes the row and then calls :meth:`released`.
        """
        v = Violations()
        val.check_token(client_message_id, v, "client_message_id")
        cid = val.parse_id(conversation, v, "conversation_id")
        aid = val.parse_id(attachment, v, "attachment_id", required=False)
        val.check_text(text, v, "text", allow_empty=bool(attachment))
        v.raise_if_any()
        conv = await self.conversation(cid)
        floor: tuple[str, str] = ("", "")
        for _ in range(3):
            hi, lo = split_id(self.rt.snowflake.next_id())
            res = await self._send(
                keys=[members_key(cid), seq_key(cid), inflight_key(cid)],
                args=[str(sender_id), hi, lo, _prune_before_hi(), floor[0], floor[1],
                      INFLIGHT_STALE_MS * 2])
            if res[0] == -1:
                await self._load_members(cid)
            elif res[0] == -2:
                raise PermissionDenied("you are not a member of this conversation",
                                       reason="NOT_A_MEMBER",
                                       metadata={"conversation_id": str(cid)})
            elif res[0] == -3:
                last = await self.last_message_id(cid, conv, from_table=True)
                floor = tuple(str(x) for x in split_id(last)) if last else ("0", "0")  # type: ignore[assignment]
            else:
                break
        else:
            raise Unavailable("could not allocate a message id, retry", reason="ID_ALLOCATION")
        hi, lo = int(res[1]), int(res[2])
        members = {int(m) for m in res[3:] if m != _LOADED}
        mid = join_id(hi, lo)
        try:
            att_row = None
            if aid:
                att_row = await self.tables.get(ATTACHMENTS, {"conversation_id": cid,
                                                              "attachment_id": aid})
                if att_row is None:
                    raise NotFound(f"no attachment {aid} in conversation {cid}",
                                   reason="ATTACHMENT_NOT_FOUND")
            now = _now_ms()
            won = await self.tables.put(
                CLIENT_MESSAGES, {"sender_id": sender_id, "client_message_id": client_message_id,
                                  "conversation_id": cid, "message_id": mid, "create_ms": now},
                if_not_exists=True)
            if not won:
                await self.redis.zrem(inflight_key(cid), f"{hi}:{lo}")
                return await self._resend(sender_id, sender_name, client_message_id, cid, text,
                                          att_row, members)
            row = self._row(cid, mid, sender_id, sender_name, client_message_id, text, att_row,
                            now)
            await self.tables.put(MESSAGES, row)
        except BaseException:
            await self.redis.zrem(inflight_key(cid), f"{hi}:{lo}")
            raise
        return row, False, members

    def _row(self, cid: int, mid: int, sender_id: int, sender_name: str, cmid: str, text: str,
             att: dict[str, Any] | None, now: int) -> dict[str, Any]:
        return {
            "conversation_id": cid, "bucket": bucket_of(mid, BUCKET_MS), "message_id": mid,
            "sender_id": sender_id, "sender_name": sender_name, "client_message_id": cmid,
            "body": text, "attachment_id": att["attachment_id"] if att else 0,
            "attachment_name": att["filename"] if att else "",
            "attachment_type": att["content_type"] if att else "",
            "attachment_size": att["size_bytes"] if att else 0, "create_ms": now,
        }

    async def _resend(self, sender_id: int, sender_name: str, cmid: str, cid: int, text: str,
                      att: dict[str, Any] | None, members: set[int],
                      ) -> tuple[dict[str, Any], bool, set[int]]:
        """A client_message_id seen before: the original message, stored once."""
        orig = await self.tables.get(CLIENT_MESSAGES, {"sender_id": sender_id,
                                                       "client_message_id": cmid})
        assert orig is not None
        if orig["conversation_id"] != cid:
            raise AlreadyExists("this client_message_id was used for another conversation",
                                reason="CLIENT_MESSAGE_ID_REUSED",
                                metadata={"client_message_id": cmid})
        mid = orig["message_id"]
        mkey = {"conversation_id": cid, "bucket": bucket_of(mid, BUCKET_MS), "message_id": mid}
        deadline = time.monotonic() + 3.0
        while True:
            row = await self.tables.get(MESSAGES, mkey)
            if row is not None:
                return row, True, members
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.1)  # the first attempt may still be writing its row
        # The first attempt died between its two writes. Its id is still protected by
        # its in-flight entry while that is fresh: finish the write under the same id.
        hi, lo = split_id(mid)
        if (_now_ms() - EPOCH_MS) - hi > INFLIGHT_STALE_MS // 2:
            raise FailedPrecondition(
                "the first send of this client_message_id failed too long ago; "
                "send again with a new client_message_id",
                reason="CLIENT_MESSAGE_ID_EXPIRED", subject=cmid)
        await self.redis.zadd(inflight_key(cid), {f"{hi}:{lo}": hi})
        try:
            row = self._row(cid, mid, sender_id, sender_name, cmid, text, att, orig["create_ms"])
            await self.tables.put(MESSAGES, row)
        except BaseException:
            await self.redis.zrem(inflight_key(cid), f"{hi}:{lo}")
            raise
        return row, False, members

    def released(self, cid: int, mid: int) -> None:
        """The message is committed and published: release its id after the grace period."""
        hi, lo = split_id(mid)
        self._releases.append((time.monotonic() + RELEASE_DELAY_S, cid, f"{hi}:{lo}"))

    async def flush_releases(self) -> None:
        now = time.monotonic()
        due = [r for r in self._releases if r[0] <= now]
        if not due:
            return
        self._releases = [r for r in self._releases if r[0] > now]
        pipe = self.redis.pipeline(transaction=False)
        for _, cid, member in due:
            pipe.zrem(inflight_key(cid), member)
        await pipe.execute()

    async def watermarks(self, cids: Iterable[int]) -> dict[int, int]:
        """Per conversation, the highest id a delivery cursor may take now."""
        cids = list(cids)
        if not cids:
            return {}
        prune = _prune_before_hi()
        pipe = self.redis.pipeline(transaction=False)
        for c in cids:
            # EVAL with the source, not the registered script: redis-py queues a
            # script on a pipeline as EVALSHA, which its cluster pipeline refuses;
            # the server caches the compiled script by its hash either way.
            pipe.eval(_WATERMARK_LUA, 1, inflight_key(c), prune)
        results = await pipe.execute()
        return {c: (join_id(int(h), 0) - 1 if int(h) >= 0 else (1 << 63) - 1)
                for c, h in zip(cids, results, strict=True)}

    # ----------------------------------------------------------------- reading

    async def last_message_id(self, cid: int, conv: dict[str, Any] | None = None, *,
                              from_table: bool = False) -> int:
        """The newest message id of the conversation (0: none)."""
        if not from_table:
            raw = await self.redis.get(seq_key(cid))
            if raw:
                h, _, lo = _b(raw).partition(":")
                last = join_id(int(h), int(lo))
                row = await self.newest_at_or_before(cid, last, conv)
                return row["message_id"] if row else 0
        row = await self.newest_at_or_before(cid, None, conv)
        return row["message_id"] if row else 0

    async def newest_at_or_before(self, cid: int, upto: int | None,
                                  conv: dict[str, Any] | None = None) -> dict[str, Any] | None:
        conv = conv or await self.conversation(cid)
        first = conv["create_ms"] // BUCKET_MS
        b = bucket_of(upto, BUCKET_MS) if upto else _now_ms() // BUCKET_MS
        while b >= first:
            page = await self.tables.slice(
                MESSAGES, {"conversation_id": cid, "bucket": b}, limit=1, reverse=True,
                bounds=ClusteringRange(le=(upto,)) if upto else None)
            if page.rows:
                return page.rows[0]
            b -= 1
        return None

    async def replay(self, cid: int, after: int, *, limit: int = 500,
                     ) -> AsyncIterator[dict[str, Any]]:
        """Messages with id > ``after``, oldest first, across buckets up to now."""
        conv = await self.conversation(cid)
        b = max(bucket_of(after, BUCKET_MS) if after else 0, conv["create_ms"] // BUCKET_MS)
        last_b = _now_ms() // BUCKET_MS
        while b <= last_b:
            token = ""
            while True:
                page = await self.tables.slice(
                    MESSAGES, {"conversation_id": cid, "bucket": b}, limit=limit,
                    page_token=token, bounds=ClusteringRange(gt=(after,)) if after else None)
                for row in page.rows:
                    yield row
                token = page.next_page_token
                if not token:
                    break
            b += 1

    async def history(self, caller_id: int, conversation: str, before: str, page_size: int,
                      page_token: str) -> tuple[list[dict[str, Any]], str]:
        v = Violations()
        cid = val.parse_id(conversation, v, "conversation_id")
        before_id = val.parse_id(before, v, "before_message_id", required=False)
        if page_size < 0 or page_size > 200:
            v.add("page_size", "must be between 0 and 200")
        v.raise_if_any()
        if page_token:
            before_id = decode_token(page_token)
        conv = await self.conversation(cid)
        await self.require_member(cid, caller_id)
        size = page_size or 50
        first = conv["create_ms"] // BUCKET_MS
        b = bucket_of(before_id, BUCKET_MS) if before_id else _now_ms() // BUCKET_MS
        out: list[dict[str, Any]] = []
        while b >= first and len(out) < size:
            page = await self.tables.slice(
                MESSAGES, {"conversation_id": cid, "bucket": b}, limit=size - len(out) + 1,
                reverse=True, bounds=ClusteringRange(lt=(before_id,)) if before_id else None)
            out.extend(page.rows)
            b -= 1
        more = len(out) > size
        out = out[:size]
        if not more and out and b >= first:
            more = await self.newest_at_or_before(cid, out[-1]["message_id"] - 1, conv) is not None
        return out, encode_token(out[-1]["message_id"]) if more and out else ""

    # ------------------------------------------------------- cursors and reads

    async def device_cursors(self, user_id: int, device_id: str) -> dict[int, int]:
        out: dict[int, int] = {}
        token = ""
        while True:
            page = await self.tables.slice(DEVICE_CURSORS, {"user_id": user_id,
                                                            "device_id": device_id},
                                           limit=1000, page_token=token)
            for r in page.rows:
                out[r["conversation_id"]] = r["delivered_upto"]
            token = page.next_page_token
            if not token:
                return out

    async def save_cursors(self, user_id: int, device_id: str, cursors: dict[int, int]) -> None:
        await asyncio.gather(*(
            self.tables.put(DEVICE_CURSORS, {"user_id": user_id, "device_id": device_id,
                                             "conversation_id": cid, "delivered_upto": upto})
            for cid, upto in cursors.items()))

    async def delivered_moved(self, positions: dict[tuple[int, int], int],
                              ) -> dict[tuple[int, int], int]:
        """Members' delivered positions ({(user, conversation): id}) that moved forward.

        The last position seen by this process is remembered, so a busy
        conversation costs no read per flush; the rows are written by
        :meth:`persist_delivered`.
        """
        async def one(uid: int, cid: int, upto: int) -> bool:
            known = self._delivered.get((uid, cid))
            if known is None:
                row = await self.tables.get(RECEIPTS, {"conversation_id": cid, "user_id": uid})
                known = (row or {}).get("delivered_upto") or 0
            if known >= upto:
                self._delivered[(uid, cid)] = known
                return False
            if len(self._delivered) > 200_000:
                self._delivered.clear()
            self._delivered[(uid, cid)] = upto
            return True

        items = list(positions.items())
        done = await asyncio.gather(*(one(uid, cid, upto) for (uid, cid), upto in items))
        return {k: upto for (k, upto), moved in zip(items, done, strict=True) if moved}

    async def persist_delivered(self, user_id: int, positions: dict[int, int]) -> None:
        """Write the member's delivered positions (a lagging row only under-reports)."""
        await asyncio.gather(*(
            self.tables.put(RECEIPTS, {"conversation_id": cid, "user_id": user_id,
                                       "delivered_upto": max(upto, self._delivered.get(
                                           (user_id, cid), 0))})
            for cid, upto in positions.items()))

    async def mark_read(self, user_id: int, conversation: str, upto: str) -> tuple[int, int, bool]:
        """(conversation id, read position, moved): read state is per user, for all devices."""
        v = Violations()
        cid = val.parse_id(conversation, v, "conversation_id")
        mid = val.parse_id(upto, v, "up_to_message_id")
        v.raise_if_any()
        conv = await self.conversation(cid)
        await self.require_member(cid, user_id)
        last = await self.last_message_id(cid, conv)
        mid = min(mid, last)
        row = await self.tables.get(RECEIPTS, {"conversation_id": cid, "user_id": user_id})
        current = (row or {}).get("read_upto") or 0
        if mid <= current:
            return cid, current, False
        cols: dict[str, Any] = {"conversation_id": cid, "user_id": user_id, "read_upto": mid}
        if row is None or (row["delivered_upto"] or 0) < mid:
            cols["delivered_upto"] = mid  # read implies delivered
        await self.tables.put(RECEIPTS, cols)
        if "delivered_upto" in cols:
            self._delivered[(user_id, cid)] = mid
        return cid, mid, True

    async def receipts(self, caller_id: int, conversation: str) -> list[dict[str, Any]]:
        v = Violations()
        cid = val.parse_id(conversation, v, "conversation_id")
        v.raise_if_any()
        await self.conversation(cid)
        members = await self.require_member(cid, caller_id)
        rows = {r["user_id"]: r for r in (await self.tables.slice(
            RECEIPTS, {"conversation_id": cid}, limit=1000)).rows}
        return [{"user_id": u, "delivered_upto": (rows.get(u) or {}).get("delivered_upto") or 0,
                 "read_upto": (rows.get(u) or {}).get("read_upto") or 0} for u in sorted(members)]

    async def summary(self, user_id: int, cid: int) -> dict[str, Any]:
        conv = await self.conversation(cid)
        last = await self.last_message_id(cid, conv)
        last_row = await self.newest_at_or_before(cid, last, conv) if last else None
        rec = await self.tables.get(RECEIPTS, {"conversation_id": cid, "user_id": user_id})
        read = (rec or {}).get("read_upto") or 0
        unread = 0
        if last and last > read:
            async for row in self.replay(cid, read, limit=101):
                if row["sender_id"] != user_id:
                    unread += 1
                if unread >= 100:
                    break
        count = await self.redis.scard(members_key(cid))
        return {"conversation": conv, "last": last_row, "unread": unread, "read_upto": read,
                "member_count": max(0, count - 1)}

    async def list_conversations(self, user_id: int, page_size: int, page_token: str,
                                 ) -> tuple[list[dict[str, Any]], str]:
        v = Violations()
        if page_size < 0 or page_size > 100:
            v.add("page_size", "must be between 0 and 100")
        v.raise_if_any()
        try:
            page = await self.tables.slice(USER_CONVERSATIONS, {"user_id": user_id},
                                           limit=page_size or 20, page_token=page_token)
        except ValueError as exc:
            raise InvalidArgument([("page_token", "is not a token from a previous response")]) \
                from exc
        out = []
        for r in page.rows:
            try:
                await self.members(r["conversation_id"])
                out.append(await self.summary(user_id, r["conversation_id"]))
            except NotFound:
                continue
        return out, page.next_page_token

    async def user_conversations(self, user_id: int) -> list[int]:
        out: list[int] = []
        token = ""
        while True:
            page = await self.tables.slice(USER_CONVERSATIONS, {"user_id": user_id}, limit=1000,
                                           page_token=token)
            out.extend(r["conversation_id"] for r in page.rows)
            token = page.next_page_token
            if not token:
                return out

    async def last_ids(self, cids: list[int]) -> dict[int, int | None]:
        """The last allocated id of each conversation from Redis (0: no message yet,
        None: unknown, Redis lost the key)."""
        if not cids:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for c in cids:
            pipe.get(seq_key(c))
        raws = await pipe.execute()
        out: dict[int, int | None] = {}
        for c, raw in zip(cids, raws, strict=True):
            if raw:
                h, _, lo = _b(raw).partition(":")
                out[c] = join_id(int(h), int(lo))
            else:
                out[c] = None
        return out
