"""ChatCore against a real Valkey and a real SQLite file: id sequencing, watermarks,
idempotent sends, history paging, signed attachment URLs, input rules."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from servers.chat import validation as val
from servers.chat.attachments import Attachments
from servers.chat.core import (
    DIRECT,
    GROUP,
    ChatCore,
    inflight_key,
    join_id,
    members_key,
    seq_key,
    split_id,
)
from servers.chat.tables import TABLES
from servers.identity.tables import TABLES as IDENTITY_TABLES
from servers.identity.tables import USERNAMES, USERS
from servers.platform.config import Config
from servers.platform.errors import InvalidArgument, NotFound, PermissionDenied, Violations
from servers.platform.ids import EPOCH_MS, Snowflake
from servers.storage import redis_conn
from servers.storage.sqlite_table import SqliteTableStore


@pytest.fixture
async def core(tmp_path: Path, valkey_url: str) -> AsyncIterator[ChatCore]:
    redis = redis_conn.connect(valkey_url)
    tables = SqliteTableStore(tmp_path / "t.sqlite3")
    await tables.create_tables([*TABLES, *IDENTITY_TABLES])
    config = Config(data_dir=tmp_path, token_secret="s" * 32)
    rt: Any = SimpleNamespace(redis=redis, tables=tables, snowflake=Snowflake(7), config=config,
                              blobs=None)
    yield ChatCore(rt)
    await tables.close()
    await redis.aclose()


async def _user(core: ChatCore, name: str) -> int:
    uid = core.rt.snowflake.next_id()
    await core.tables.put(USERS, {"user_id": uid, "username": name, "create_ms": 1})
    await core.tables.put(USERNAMES, {"username": name, "user_id": uid, "password_hash": "!",
                                      "create_ms": 1})
    return uid


def test_id_split_round_trips() -> None:
    sf = Snowflake(1023)
    for _ in range(100):
        i = sf.next_id()
        hi, lo = split_id(i)
        assert join_id(hi, lo) == i and 0 <= lo < (1 << 22)


def test_input_rules() -> None:
    v = Violations()
    assert val.parse_id("12", v, "a") == 12
    assert val.parse_id("", v, "b") == 0
    assert val.parse_id("-3", v, "c") == 0
    assert val.parse_id("9" * 25, v, "d") == 0
    assert val.parse_id("0", v, "e") == 0
    assert val.parse_id("", v, "f", required=False) == 0
    val.check_text("", v, "g", allow_empty=True)
    val.check_text("", v, "h", allow_empty=False)
    val.check_text("x" * 4097, v, "i", allow_empty=False)
    val.check_text("bell\x07", v, "j", allow_empty=False)
    val.check_text("tab\tand\nnewline ✓", v, "k", allow_empty=False)
    val.check_token("phone-1.a_b", v, "l")
    val.check_token("no spaces", v, "m")
    val.check_filename("../etc/passwd", v, "n")
    assert [f for f, _ in v.items] == ["b", "c", "d", "e", "h", "i", "j", "m", "n"]


async def test_ids_follow_allocation_order_across_skewed_clocks(core: ChatCore) -> None:
    a = await _user(core, "seq_a")
    b = await _user(core, "seq_b")
    row, _ = await core.create(a, "seq_a", DIRECT, [str(b)], [], "")
    cid = row["conversation_id"]
    now = int(time.time() * 1000)
    # a second server process whose clock is 5 s behind
    behind = Snowflake(9, clock=lambda: now - 5000)
    ids = []
    for i in range(20):
        if i % 2:
            core.rt.snowflake, saved = behind, core.rt.snowflake
            r, dup, members = await core.send(b, "seq_b", f"c{i}", str(cid), f"m{i}", "")
            core.rt.snowflake = saved
        else:
            r, dup, members = await core.send(a, "seq_a", f"c{i}", str(cid), f"m{i}", "")
        assert not dup and members == {a, b}
        ids.append(r["message_id"])
    assert ids == sorted(ids) and len(set(ids)) == 20
    history, _ = await core.history(a, str(cid), "", 50, "")
    assert [r["message_id"] for r in history] == ids[::-1]


async def test_watermark_holds_cursors_below_messages_in_flight(core: ChatCore) -> None:
    a = await _user(core, "wm_a")
    b = await _user(core, "wm_b")
    row, _ = await core.create(a, "wm_a", DIRECT, [], ["wm_b"], "")
    cid = row["conversation_id"]
    first, _, _ = await core.send(a, "wm_a", "w1", str(cid), "first", "")
    # committed and published, not yet released: a cursor may not pass it yet
    assert (await core.watermarks([cid]))[cid] < first["message_id"]
    hi, lo = split_id(first["message_id"])
    await core.redis.zrem(inflight_key(cid), f"{hi}:{lo}")
    assert (await core.watermarks([cid]))[cid] >= first["message_id"]
    # a send that allocated its id but has not committed: the watermark stays below it
    res = await core._send(keys=[members_key(cid), seq_key(cid), inflight_key(cid)],
                           args=[str(b), *split_id(core.rt.snowflake.next_id()), 0, "", "", 120000])
    pending = join_id(int(res[1]), int(res[2]))
    second, _, _ = await core.send(a, "wm_a", "w2", str(cid), "second", "")
    assert second["message_id"] > pending > first["message_id"]
    mark = (await core.watermarks([cid]))[cid]
    assert first["message_id"] <= mark < pending
    # entries of a dead sender are dropped once stale
    old_hi = split_id(pending)[0] - 10 * 60_000
    await core.redis.zadd(inflight_key(cid), {f"{old_hi}:1": old_hi})
    await core.redis.zrem(inflight_key(cid), f"{split_id(pending)[0]}:{split_id(pending)[1]}")
    hi2, lo2 = split_id(second["message_id"])
    await core.redis.zrem(inflight_key(cid), f"{hi2}:{lo2}")
    assert (await core.watermarks([cid]))[cid] >= second["message_id"]
    assert (time.time() * 1000 - EPOCH_MS) > old_hi


async def test_sends_are_idempotent_and_checked(core: ChatCore) -> None:
    a = await _user(core, "idem_a")
    b = await _user(core, "idem_b")
    c = await _user(core, "idem_c")
    row, created = await core.create(a, "idem_a", DIRECT, [str(b)], [], "")
    again, created2 = await core.create(b, "idem_b", DIRECT, [str(a)], [], "")
    assert created and not created2 and again["conversation_id"] == row["conversation_id"]
    cid = str(row["conversation_id"])
    m1, dup1, _ = await core.send(a, "idem_a", "same", cid, "hello", "")
    m2, dup2, _ = await core.send(a, "idem_a", "same", cid, "hello", "")
    assert not dup1 and dup2 and m1["message_id"] == m2["message_id"]
    with pytest.raises(PermissionDenied):
        await core.send(c, "idem_c", "x", cid, "let me in", "")
    with pytest.raises(NotFound):
        await core.send(a, "idem_a", "y", "424242", "nobody here", "")
    with pytest.raises(InvalidArgument) as info:
        await core.send(a, "idem_a", "", "abc", "", "")
    assert {v.field for v in info.value.violations} == {"client_message_id", "conversation_id",
                                                        "text"}
    # Redis lost everything: the members and the sequence come back from the table
    await core.redis.delete(members_key(row["conversation_id"]), seq_key(row["conversation_id"]))
    m3, _, members = await core.send(b, "idem_b", "after-flush", cid, "still ordered", "")
    assert members == {a, b} and m3["message_id"] > m1["message_id"]
    history, _ = await core.history(b, cid, "", 10, "")
    assert [r["client_message_id"] for r in history] == ["after-flush", "same"]


async def test_groups_limit_and_admins(core: ChatCore) -> None:
    owner = await _user(core, "grp_owner")
    others = [await _user(core, f"grp_m{i}") for i in range(3)]
    row, _ = await core.create(owner, "grp_owner", GROUP, [str(o) for o in others[:2]], [],
                               "friends")
    cid = row["conversation_id"]
    assert await core.members(cid) == {owner, *others[:2]}
    with pytest.raises(PermissionDenied):
        await core.add_members(others[0], cid, [str(others[2])], [])
    await core.add_members(owner, cid, [str(others[2])], [])
    assert others[2] in await core.members(cid)
    with pytest.raises(InvalidArgument) as info:
        await core.create(owner, "grp_owner", GROUP, [str(10**12 + i) for i in range(500)], [],
                          "too big")
    assert "500" in info.value.violations[0].description


async def test_signed_attachment_urls(core: ChatCore) -> None:
    atts = Attachments(core.rt, core)
    exp = int(time.time()) + 60
    sig = atts._sig(1, 2, exp)
    assert atts.verify(1, 2, exp, sig)
    assert not atts.verify(1, 3, exp, sig)          # another attachment
    assert not atts.verify(1, 2, exp + 1, sig)      # a longer lifetime
    assert not atts.verify(1, 2, exp, ("1" if sig[0] == "0" else "0") + sig[1:])
    past = int(time.time()) - 1
    assert not atts.verify(1, 2, past, atts._sig(1, 2, past))  # expired
