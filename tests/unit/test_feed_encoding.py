"""Timeline members, page tokens, cached-post bytes and the synthetic graph generator."""

from __future__ import annotations

from collections import Counter

import pytest
from sysdesign.feed.v1 import feed_pb2 as pb

from servers.feed.feed import decode_token, encode_token
from servers.feed.generate import GraphSpec, draw_edges
from servers.feed.posts import length_delimited, with_counts
from servers.feed.timelines import member, parse_member
from servers.platform.errors import InvalidArgument
from servers.platform.ids import MAX_ID, Snowflake


def test_members_sort_like_ids_even_when_scores_collide() -> None:
    sf = Snowflake(5)
    ids = sorted({sf.next_id() for _ in range(2000)} | {1, 2, 10, MAX_ID})
    members = [member(i, 42) for i in ids]
    # equal double scores fall back to byte order, which must be id order
    assert sorted(members) == members
    assert len({float(i) for i in ids}) < len(ids)  # the collisions are real
    assert [parse_member(m.encode()) for m in members] == [(i, 42) for i in ids]


def test_page_tokens_round_trip_and_reject_garbage() -> None:
    pid = Snowflake(3).next_id()
    token = encode_token("h", pid)
    assert decode_token("h", token) == pid
    assert decode_token("h", "") is None
    for bad in ("garbage!", "aDo", "aDotMQ", encode_token("u", pid), "%%%%", "aDoxMjNh"):
        with pytest.raises(InvalidArgument) as e:
            decode_token("h", bad)
        assert e.value.violations[0].field == "page_token"


def test_cached_post_bytes_with_counts_and_page_assembly() -> None:
    base = pb.Post(post_id="7", author_id="9", text="hi", like_count=0)
    raw = with_counts(base.SerializeToString(), (3, 0, 2**40))
    p = pb.Post.FromString(raw)
    assert (p.text, p.like_count, p.reply_count, p.repost_count) == ("hi", 3, 0, 2**40)
    # a later field overrides an earlier one (a stale count in the cached bytes loses)
    stale = with_counts(pb.Post(like_count=99).SerializeToString(), (1, 1, 1))
    assert pb.Post.FromString(stale).like_count == 1
    page = length_delimited(1, raw) + length_delimited(1, raw) + length_delimited(2, b"tok")
    resp = pb.GetHomeTimelineResponse.FromString(page)
    assert [x.like_count for x in resp.posts] == [3, 3] and resp.next_page_token == "tok"


def test_generated_graph_is_power_law_and_clean() -> None:
    spec = GraphSpec(users=3000, avg_following=15, celebrities=2, celebrity_share=0.3, seed=7)
    edges = draw_edges(spec, following_limit=200)
    assert edges == draw_edges(spec, following_limit=200)  # deterministic per seed
    assert all(a != b for a, b in edges)
    assert len(set(edges)) == len(edges)
    out = Counter(a for a, _ in edges)
    assert max(out.values()) <= 200
    assert 10 <= len(edges) / spec.users <= 25  # mean following near the requested 15
    followers = Counter(b for _, b in edges)
    top = [n for _, n in followers.most_common()]
    # heavy tail: the two forced celebrities lead, most users have few followers
    assert {u for u, _ in followers.most_common(2)} == {0, 1}
    assert top[0] > 0.25 * spec.users
    median = sorted(followers.get(u, 0) for u in range(spec.users))[spec.users // 2]
    assert median < 10
    # popularity falls with rank (Zipf): the top tenth outdraws the bottom half
    assert sum(followers.get(u, 0) for u in range(300)) > \
        sum(followers.get(u, 0) for u in range(1500, 3000))
