"""The news feed end to end against a real `sysdesign up` (celebrity threshold 3, 10-entry caches).

Small thresholds make every path reachable with a handful of users: authors
with 3+ followers are celebrities (fan-out on read), and timelines longer than
10 entries continue in the table port past the Redis cache.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from sysdesign.feed.v1 import feed_pb2 as pb
from sysdesign.feed.v1 import feed_pb2_grpc as pbg

from tests.integration.helpers import error_reason, expect_error, grpc_metadata, violations
from tests.stack import StackProcess, sync_redis

pytestmark = [pytest.mark.tables, pytest.mark.redis_cluster]

FEED_ENV = {
    "SYSDESIGN_FEED_CELEBRITY_THRESHOLD": "3",
    "SYSDESIGN_FEED_TIMELINE_CACHE_SIZE": "10",
    "SYSDESIGN_FEED_BACKFILL": "50",
}


class Client:
    """One user's stubs and metadata."""

    def __init__(self, stack: StackProcess, name: str) -> None:
        self.name = name
        self.token = stack.token(name)
        self.md = grpc_metadata(self.token)
        ch = stack.channel()
        self.graph = pbg.GraphServiceStub(ch)
        self.posts = pbg.PostServiceStub(ch)
        self.tl = pbg.TimelineServiceStub(ch)
        self.user_id = self.counts().user_id

    def counts(self, who: str = "") -> pb.GetFollowCountsResponse:
        ref = pb.UserRef(username=who) if who else pb.UserRef()
        return self.graph.GetFollowCounts(pb.GetFollowCountsRequest(user=ref), metadata=self.md,
                                          timeout=30)

    def follow(self, who: str) -> pb.FollowUserResponse:
        return self.graph.FollowUser(pb.FollowUserRequest(user=pb.UserRef(username=who)),
                                     metadata=self.md, timeout=30)

    def unfollow(self, who: str) -> pb.UnfollowUserResponse:
        return self.graph.UnfollowUser(pb.UnfollowUserRequest(user=pb.UserRef(username=who)),
                                       metadata=self.md, timeout=30)

    def post(self, text: str, **kw: Any) -> pb.Post:
        return self.posts.CreatePost(pb.CreatePostRequest(text=text, **kw), metadata=self.md,
                                     timeout=30).post

    def home(self, page_size: int = 20, page_token: str = "") -> pb.GetHomeTimelineResponse:
        return self.tl.GetHomeTimeline(pb.GetHomeTimelineRequest(page_size=page_size,
                                                                 page_token=page_token),
                                       metadata=self.md, timeout=30)

    def home_ids(self, page_size: int = 100) -> list[str]:
        return [p.post_id for p in self.home(page_size).posts]

    def all_home(self, page_size: int) -> list[str]:
        ids: list[str] = []
        token = ""
        while True:
            resp = self.home(page_size, token)
            ids += [p.post_id for p in resp.posts]
            token = resp.next_page_token
            if not token:
                return ids

    def user_posts(self, who: str = "", page_size: int = 100, page_token: str = "") -> pb.GetUserTimelineResponse:
        ref = pb.UserRef(username=who) if who else pb.UserRef()
        return self.tl.GetUserTimeline(pb.GetUserTimelineRequest(user=ref, page_size=page_size,
                                                                 page_token=page_token),
                                       metadata=self.md, timeout=30)


def wait_until(cond: Callable[[], bool], deadline_s: float = 60.0) -> None:
    """Poll (a deadline against hangs, not a timing assertion)."""
    end = time.monotonic() + deadline_s
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not met before the deadline")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def feed_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProcess]:
    s = StackProcess(tmp_path_factory.mktemp("feed") / "data", extra_env=FEED_ENV).start()
    yield s
    code = s.stop()
    assert code == 0, f"stack exited with {code} on SIGTERM:\n{s.logs()}"


@pytest.fixture(scope="module")
def users(feed_stack: StackProcess) -> dict[str, Client]:
    names = ["alice", "bob", "carol", "dave", "erin", "frank", "grace"]
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        clients = list(ex.map(lambda n: Client(feed_stack, n), names))
    return {c.name: c for c in clients}


@pytest.fixture(scope="module")
def r(feed_stack: StackProcess) -> Iterator[redis.Redis]:
    client = sync_redis(feed_stack.redis_url)
    yield client
    client.close()


def test_post_reaches_followers_with_mentions_and_short_links(users: dict[str, Client],
                                                             feed_stack: StackProcess) -> None:
    alice, bob = users["alice"], users["bob"]
    assert bob.follow("alice").changed
    text = "Cafe\u0301 with @Bob and @nosuchuser, read https://example.com/menu?x=1."
    post = alice.post(text)
    assert post.author_id == alice.user_id and post.author_username == "alice"
    assert post.text == "Café with @Bob and @nosuchuser, read https://example.com/menu?x=1."  # NFC
    assert [(m.username, m.user_id) for m in post.mentions] == [("bob", bob.user_id)]
    m = post.mentions[0]
    assert post.text[m.start:m.end] == "@Bob"
    [u] = post.urls
    assert u.url == "https://example.com/menu?x=1"
    assert post.text[u.start:u.end] == u.url
    assert u.short_url.startswith(feed_stack.http_base + "/")
    # the short link really resolves through the shortener
    from sysdesign.shortener.v1 import shortener_pb2 as spb
    from sysdesign.shortener.v1 import shortener_pb2_grpc as spbg

    code = u.short_url.rsplit("/", 1)[1]
    resolved = spbg.ShortenerServiceStub(feed_stack.channel()).ResolveShortUrl(
        spb.ResolveShortUrlRequest(code=code), timeout=30)
    assert resolved.long_url == u.url

    wait_until(lambda: post.post_id in bob.home_ids())
    assert post.post_id in alice.home_ids()  # authors see their own posts
    got = alice.posts.GetPost(pb.GetPostRequest(post_id=post.post_id), metadata=alice.md).post
    assert got.text == post.text and list(got.mentions) == list(post.mentions)


def test_celebrity_posts_are_pulled_not_pushed(users: dict[str, Client], r: redis.Redis) -> None:
    carol = users["carol"]
    for name in ("dave", "erin", "frank"):
        users[name].follow("carol")
    counts = carol.counts()
    assert counts.follower_count == 3 and counts.celebrity
    post = carol.post("a celebrity speaks")
    member = f"{int(post.post_id):019d}:{carol.user_id}".encode()
    for name in ("dave", "erin", "frank"):
        # visible at once: merged at read time from carol's own timeline
        wait_until(lambda n=name: post.post_id in users[n].home_ids(), 10)
        assert r.zscore(f"{{h:{users[name].user_id}}}:tl", member) is None  # never pushed
    assert post.post_id not in users["bob"].home_ids()  # bob does not follow carol


def test_delete_hides_everywhere_and_only_the_author_may(users: dict[str, Client]) -> None:
    alice, bob = users["alice"], users["bob"]
    post = alice.post("soon gone")
    wait_until(lambda: post.post_id in bob.home_ids())
    err = expect_error(grpc.StatusCode.PERMISSION_DENIED, bob.posts.DeletePost,
                       pb.DeletePostRequest(post_id=post.post_id), metadata=bob.md)
    assert error_reason(err) == "NOT_AUTHOR"
    assert post.post_id in bob.home_ids()
    alice.posts.DeletePost(pb.DeletePostRequest(post_id=post.post_id), metadata=alice.md, timeout=30)
    assert post.post_id not in bob.home_ids()
    assert post.post_id not in alice.home_ids()
    assert post.post_id not in [p.post_id for p in alice.user_posts().posts]
    expect_error(grpc.StatusCode.NOT_FOUND, bob.posts.GetPost,
                 pb.GetPostRequest(post_id=post.post_id), metadata=bob.md)
    batch = bob.posts.BatchGetPosts(pb.BatchGetPostsRequest(post_ids=[post.post_id]), metadata=bob.md)
    assert list(batch.posts) == []
    expect_error(grpc.StatusCode.NOT_FOUND, alice.posts.DeletePost,
                 pb.DeletePostRequest(post_id=post.post_id), metadata=alice.md)


def test_unfollow_removes_and_follow_backfills(users: dict[str, Client]) -> None:
    alice, grace = users["alice"], users["grace"]
    posts = [alice.post(f"backfill me {i}").post_id for i in range(3)]
    assert grace.follow("alice").changed
    assert not grace.follow("alice").changed  # idempotent
    home = grace.home_ids()
    assert all(p in home for p in posts)  # backfilled at once, no fan-out needed
    assert grace.unfollow("alice").changed
    assert not grace.unfollow("alice").changed
    assert not any(p in grace.home_ids() for p in posts)
    assert grace.follow("alice").changed
    assert all(p in grace.home_ids() for p in posts)


def test_likes_replies_reposts_are_counted_once(users: dict[str, Client]) -> None:
    alice, bob, dave = users["alice"], users["bob"], users["dave"]
    post = alice.post("count me")
    pid = post.post_id
    like = pb.LikePostRequest(post_id=pid)
    assert bob.posts.LikePost(like, metadata=bob.md).changed
    second = bob.posts.LikePost(like, metadata=bob.md)
    assert not second.changed and second.like_count == 1
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda _: dave.posts.LikePost(like, metadata=dave.md, timeout=30), range(8)))
    reply = bob.post("a reply", reply_to_post_id=pid)
    repost = dave.post("", repost_of_post_id=pid)
    got = alice.posts.GetPost(pb.GetPostRequest(post_id=pid), metadata=alice.md).post
    assert (got.like_count, got.reply_count, got.repost_count) == (2, 1, 1)
    assert reply.reply_to_post_id == pid and repost.repost_of_post_id == pid
    un = bob.posts.UnlikePost(pb.UnlikePostRequest(post_id=pid), metadata=bob.md)
    assert un.changed and un.like_count == 1
    assert not bob.posts.UnlikePost(pb.UnlikePostRequest(post_id=pid), metadata=bob.md).changed
    dave.posts.DeletePost(pb.DeletePostRequest(post_id=repost.post_id), metadata=dave.md)
    got = alice.posts.GetPost(pb.GetPostRequest(post_id=pid), metadata=alice.md).post
    assert (got.like_count, got.reply_count, got.repost_count) == (1, 1, 0)


def test_concurrent_follow_unfollow_keeps_counts_exact(users: dict[str, Client]) -> None:
    erin, bob = users["erin"], users["bob"]
    before = bob.counts("bob").follower_count

    def flip(i: int) -> None:
        if i % 2:
            erin.follow("bob")
        else:
            erin.unfollow("bob")

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        list(ex.map(flip, range(40)))
    erin.follow("bob")
    listed = bob.graph.ListFollowers(pb.ListFollowersRequest(page_size=1000), metadata=bob.md)
    names = [e.username for e in listed.followers]
    assert names.count("erin") == 1
    assert bob.counts().follower_count == len(names)
    assert len(names) in (before, before + 1)  # erin may have followed bob before
    following = erin.graph.ListFollowing(pb.ListFollowingRequest(page_size=1000), metadata=erin.md)
    assert erin.counts().following_count == len(following.following)


def test_pages_are_stable_while_posts_arrive_and_run_past_the_cache(users: dict[str, Client]) -> None:
    alice, frank = users["alice"], users["frank"]
    frank.follow("alice")
    first = [alice.post(f"page test {i}").post_id for i in range(25)]
    wait_until(lambda: first[-1] in frank.home_ids(5))
    expected = frank.all_home(100)
    assert len(expected) >= 25 and len(set(expected)) == len(expected)
    assert expected == sorted(expected, key=int, reverse=True)
    # page through 7 at a time while alice keeps posting: later pages never shift
    seen: list[str] = []
    token = ""
    while True:
        resp = frank.home(7, token)
        seen += [p.post_id for p in resp.posts]
        alice.post("arriving meanwhile")
        token = resp.next_page_token
        if not token:
            break
    assert seen == expected  # 25+ entries with a 10-entry cache: the tail came from the table


def test_bad_input_is_refused_and_nothing_is_stored(users: dict[str, Client]) -> None:
    bob = users["bob"]
    before = [p.post_id for p in bob.user_posts().posts]
    cases: list[tuple[pb.CreatePostRequest, str]] = [
        (pb.CreatePostRequest(text=""), "text"),
        (pb.CreatePostRequest(text="   \n"), "text"),
        (pb.CreatePostRequest(text="x" * 281), "text"),
        (pb.CreatePostRequest(text="bell\x07"), "text"),
        (pb.CreatePostRequest(text="hi", reply_to_post_id="123456789"), "reply_to_post_id"),
        (pb.CreatePostRequest(text="hi", reply_to_post_id="abc"), "reply_to_post_id"),
        (pb.CreatePostRequest(text="", repost_of_post_id="99999999999"), "repost_of_post_id"),
        (pb.CreatePostRequest(text="hi", media=[pb.MediaRef(media_id="bad id!", type=1)]),
         "media[0].media_id"),
        (pb.CreatePostRequest(text="hi", media=[pb.MediaRef(media_id="ok")]), "media[0].type"),
    ]
    for req, field in cases:
        err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, bob.posts.CreatePost, req,
                           metadata=bob.md)
        assert field in violations(err), (req, violations(err))
    # 280 code points is fine, whatever their UTF-8 size; NFC counts "e + accent" as one
    assert len(bob.post("é" * 280).text) == 280
    assert len(bob.post("e\u0301" * 280).text) == 280
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, bob.posts.CreatePost,
                 pb.CreatePostRequest(text="😀" * 281), metadata=bob.md)
    after = [p.post_id for p in bob.user_posts().posts]
    assert len(after) == len(before) + 2  # only the two valid posts

    follows_before = bob.counts().following_count
    err = expect_error(grpc.StatusCode.NOT_FOUND, bob.graph.FollowUser,
                       pb.FollowUserRequest(user=pb.UserRef(username="nobody_here")), metadata=bob.md)
    assert error_reason(err) == "USER_NOT_FOUND"
    err = expect_error(grpc.StatusCode.NOT_FOUND, bob.graph.FollowUser,
                       pb.FollowUserRequest(user=pb.UserRef(user_id="4242")), metadata=bob.md)
    err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, bob.graph.FollowUser,
                       pb.FollowUserRequest(user=pb.UserRef(username="bob")), metadata=bob.md)
    assert "user" in violations(err)
    err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, bob.graph.FollowUser,
                       pb.FollowUserRequest(), metadata=bob.md)
    assert "user" in violations(err)
    err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, bob.graph.FollowUser,
                       pb.FollowUserRequest(user=pb.UserRef(username="Not Valid")), metadata=bob.md)
    assert "user.username" in violations(err)
    assert bob.counts().following_count == follows_before

    for token in ("garbage", "aDotMQ", "dTox", "!!", "aDoxMjM0NTY3ODkwMTIzNDU2Nzg5MDEyMzQ1"):
        err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, bob.tl.GetHomeTimeline,
                           pb.GetHomeTimelineRequest(page_token=token), metadata=bob.md)
        assert "page_token" in violations(err)
    err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, bob.tl.GetUserTimeline,
                       pb.GetUserTimelineRequest(page_token=bob.home(1).next_page_token or "x"),
                       metadata=bob.md)
    assert "page_token" in violations(err)  # a home token is not a user-timeline token
    err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, bob.graph.ListFollowers,
                       pb.ListFollowersRequest(page_token="nope"), metadata=bob.md)
    assert "page_token" in violations(err)
    err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, bob.tl.GetHomeTimeline,
                       pb.GetHomeTimelineRequest(page_size=101), metadata=bob.md)
    assert "page_size" in violations(err)
    err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, bob.posts.BatchGetPosts,
                       pb.BatchGetPostsRequest(post_ids=["1", "x"]), metadata=bob.md)
    assert "post_ids[1]" in violations(err)


def test_identity_comes_from_the_token_only(users: dict[str, Client],
                                            feed_stack: StackProcess) -> None:
    # No request message of the feed carries an author or acting-user field.
    for name in ("CreatePostRequest", "DeletePostRequest", "LikePostRequest", "FollowUserRequest",
                 "GetHomeTimelineRequest"):
        fields = {f.name for f in pb.DESCRIPTOR.message_types_by_name[name].fields}
        assert not fields & {"author_id", "author", "user_id", "follower_id", "caller_id"}, name
    # Unknown fields smuggled into the body are ignored: the post is the token's user's.
    alice, bob = users["alice"], users["bob"]
    raw = pb.CreatePostRequest(text="who am i").SerializeToString()
    # fields 100 and 101 (strings): what an "author_id"/"author" field of a client's own
    # .proto would put on the wire
    smuggled = raw + _string_field(100, alice.user_id) + _string_field(101, "alice")
    call = feed_stack.channel().unary_unary("/sysdesign.feed.v1.PostService/CreatePost")
    resp = pb.CreatePostResponse.FromString(call(smuggled, metadata=bob.md, timeout=30))
    assert resp.post.author_id == bob.user_id and resp.post.author_username == "bob"
    expect_error(grpc.StatusCode.UNAUTHENTICATED, bob.posts.CreatePost,
                 pb.CreatePostRequest(text="anonymous"))
    expect_error(grpc.StatusCode.UNAUTHENTICATED, bob.tl.GetHomeTimeline,
                 pb.GetHomeTimelineRequest())


def _string_field(number: int, value: str) -> bytes:
    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            b, n = n & 0x7F, n >> 7
            out.append(b | (0x80 if n else 0))
            if not n:
                return bytes(out)

    data = value.encode()
    return varint(number << 3 | 2) + varint(len(data)) + data


def test_feed_cli_round_trip(feed_stack: StackProcess, users: dict[str, Client],
                             tmp_path: Path) -> None:
    import subprocess
    import sys

    env = feed_stack.env()
    cli = [sys.executable, "-m", "clients.cli", "feed"]
    out = subprocess.run([*cli, "post", "from the CLI", "--token", users["grace"].token],
                         env=env, capture_output=True, text=True, timeout=60, check=True)
    pid = out.stdout.strip()
    assert pid.isdigit()
    out = subprocess.run([*cli, "user", "grace", "--token", users["grace"].token, "--page-size", "5"],
                         env=env, capture_output=True, text=True, timeout=60, check=True)
    assert pid in out.stdout and "from the CLI" in out.stdout
