"""News-feed reliability: a fan-out worker killed mid-job, and Redis losing everything.

- The fan-out worker runs as its own process (`sysdesign worker fanout`) next
  to `sysdesign serve`, both on one Valkey started here; it is SIGKILLed in the
  middle of a fan-out and a new one takes over: every acknowledged post must
  reach every follower's home timeline, each exactly once.
- FLUSHALL on the stack's Redis: every home timeline, user timeline and count
  reads exactly as before, rebuilt from the table port.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from sysdesign.feed.v1 import feed_pb2 as pb
from sysdesign.feed.v1 import feed_pb2_grpc as pbg

from tests.integration.helpers import grpc_metadata
from tests.stack import StackProcess, flushall, keys, own_redis, sync_redis

pytestmark = [pytest.mark.tables, pytest.mark.redis_cluster]

STREAM = "{q:fanout}"


def wait_until(cond: Callable[[], bool], deadline_s: float = 120.0, every: float = 0.05) -> None:
    end = time.monotonic() + deadline_s
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not met before the deadline")
        time.sleep(every)


def fanout_idle(r: redis.Redis) -> bool:
    if not r.exists(STREAM):
        return True
    groups = r.xinfo_groups(STREAM)
    pending = sum(int(g["pending"]) for g in groups)
    return int(r.xlen(STREAM)) == 0 and pending == 0


def home_pages(tl: pbg.TimelineServiceStub, md: Any, page_size: int) -> list[bytes]:
    pages: list[bytes] = []
    token = ""
    while True:
        resp = tl.GetHomeTimeline(pb.GetHomeTimelineRequest(page_size=page_size, page_token=token),
                                  metadata=md, timeout=60)
        pages.append(resp.SerializeToString(deterministic=True))
        token = resp.next_page_token
        if not token:
            return pages


# --------------------------------------------------------------------------- worker SIGKILL


async def _load_followers(stack: StackProcess, author: int, n: int) -> list[int]:
    from servers.feed.feed import FeedCore
    from servers.feed.generate import load_followers
    from servers.platform.runtime import Runtime
    from servers.systems import all_tables

    config = stack.config()
    rt = await Runtime.open(config, tables=all_tables(), start_embedded=False)
    try:
        return await load_followers(FeedCore.for_runtime(rt), author, n)
    finally:
        await rt.close()


def test_killed_fanout_worker_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    from servers.platform.auth import TokenSigner
    from servers.platform.config import Config

    valkey = own_redis(tmp_path / "valkey")
    url = valkey.start()
    data = tmp_path / "data"
    env = {
        "SYSDESIGN_REDIS_URL": url,
        "SYSDESIGN_FEED_FANOUT_PAGE_SIZE": "50",
        "SYSDESIGN_FEED_FANOUT_CLAIM_IDLE_MS": "1500",
    }
    server = StackProcess(data, extra_env=env)
    workers: list[StackProcess] = []
    r = sync_redis(url)
    try:
        server.start(["serve", "--services", "identity,shortener,feed"])
        author_token = server.token("author")
        md = grpc_metadata(author_token)
        ch = server.channel()
        posts_stub = pbg.PostServiceStub(ch)
        graph = pbg.GraphServiceStub(ch)
        author_id = int(graph.GetFollowCounts(pb.GetFollowCountsRequest(), metadata=md).user_id)
        followers = asyncio.run(_load_followers(server, author_id, 3000))
        assert graph.GetFollowCounts(pb.GetFollowCountsRequest(), metadata=md).follower_count == 3000

        posts = [posts_stub.CreatePost(pb.CreatePostRequest(text=f"post {i}"), metadata=md,
                                       timeout=30).post.post_id for i in range(10)]
        assert int(r.xlen(STREAM)) == 10  # nobody consumes yet: all acknowledged, all queued

        first = StackProcess(data, extra_env=env).start(["worker", "fanout"])
        workers.append(first)
        # Mid-way through some post's fan-out: its resume checkpoint is in Redis.
        wait_until(lambda: bool(keys(url, "{q:fanout}:at:*")), every=0.002)
        first.stop(signal.SIGKILL)
        # Killed with fan-outs left: at least the jobs not started yet (and most likely
        # one half done, its progress checkpoint in Redis).
        assert int(r.xlen(STREAM)) > 0, "the worker finished before it was killed"

        second = StackProcess(data, extra_env=env).start(["worker", "fanout"])
        workers.append(second)
        wait_until(lambda: fanout_idle(r))
        assert int(r.xlen(STREAM + ":dead")) == 0

        signer = TokenSigner(Config(data_dir=data).secret())
        tl = pbg.TimelineServiceStub(ch)
        want = sorted(posts, key=int, reverse=True)
        for i, f in enumerate(followers):
            tok, _ = signer.mint(f, f"follower{i}")
            got = [p.post_id for p in tl.GetHomeTimeline(pb.GetHomeTimelineRequest(page_size=20),
                                                          metadata=grpc_metadata(tok),
                                                          timeout=30).posts]
            assert got == want, f"follower {i}: {len(got)} posts, want {len(want)}"
    finally:
        for w in workers:
            w.stop()
        if server.proc is not None:
            server.stop()
        r.close()
        valkey.stop()


# --------------------------------------------------------------------------- FLUSHALL


def test_flushall_then_every_timeline_reads_the_same(tmp_path: Path) -> None:
    # A Redis of its own (a cluster under --redis=cluster): the FLUSHALL must not
    # reach the other stacks of this test process.
    valkey = own_redis(tmp_path / "valkey")
    url = valkey.start()
    s = StackProcess(tmp_path / "data", extra_env={
        "SYSDESIGN_REDIS_URL": url,
        "SYSDESIGN_FEED_CELEBRITY_THRESHOLD": "3",
        "SYSDESIGN_FEED_TIMELINE_CACHE_SIZE": "8",
    })
    try:
        s.start()
        names = ["ann", "ben", "cat", "dan", "eve"]
        tokens = {n: s.token(n) for n in names}
        md = {n: grpc_metadata(t) for n, t in tokens.items()}
        ch = s.channel()
        graph, posts, tl = (pbg.GraphServiceStub(ch), pbg.PostServiceStub(ch),
                            pbg.TimelineServiceStub(ch))

        def follow(a: str, b: str) -> None:
            graph.FollowUser(pb.FollowUserRequest(user=pb.UserRef(username=b)), metadata=md[a])

        for a, b in [("ben", "ann"), ("cat", "ann"), ("dan", "ann"),  # ann: celebrity
                     ("ann", "ben"), ("cat", "ben"), ("eve", "ben"), ("eve", "cat"),
                     ("dan", "eve"), ("ben", "dan")]:
            follow(a, b)
        ids: dict[str, list[str]] = {n: [] for n in names}
        for i in range(12):
            for n in names:
                p = posts.CreatePost(pb.CreatePostRequest(text=f"{n} #{i} @ann"), metadata=md[n])
                ids[n].append(p.post.post_id)
        posts.LikePost(pb.LikePostRequest(post_id=ids["ann"][0]), metadata=md["ben"])
        posts.LikePost(pb.LikePostRequest(post_id=ids["ann"][0]), metadata=md["cat"])
        posts.CreatePost(pb.CreatePostRequest(text="re", reply_to_post_id=ids["ben"][3]),
                         metadata=md["eve"])
        posts.DeletePost(pb.DeletePostRequest(post_id=ids["cat"][5]), metadata=md["cat"])
        graph.UnfollowUser(pb.UnfollowUserRequest(user=pb.UserRef(username="ben")),
                           metadata=md["cat"])
        r = sync_redis(url)
        wait_until(lambda: fanout_idle(r))

        def snapshot() -> dict[str, Any]:
            out: dict[str, Any] = {}
            for n in names:
                out[f"home/{n}"] = home_pages(tl, md[n], 7)
                out[f"user/{n}"] = tl.GetUserTimeline(
                    pb.GetUserTimelineRequest(page_size=100), metadata=md[n]).SerializeToString()
                out[f"counts/{n}"] = graph.GetFollowCounts(
                    pb.GetFollowCountsRequest(), metadata=md[n]).SerializeToString()
            return out

        before = snapshot()
        assert len(before["home/eve"]) > 2  # several pages, past the 8-entry cache
        # On every master; and SCRIPT FLUSH as after a Redis restart: fan-out's
        # EVALSHA must reload its script.
        flushall(url)
        after = snapshot()
        for k in before:
            assert after[k] == before[k], k
        # and the feed keeps working: a new post of ben's still fans out
        new = posts.CreatePost(pb.CreatePostRequest(text="after the flush"), metadata=md["ben"])
        wait_until(lambda: new.post.post_id in [
            p.post_id for p in tl.GetHomeTimeline(pb.GetHomeTimelineRequest(), metadata=md["eve"]).posts])
        r.close()
    except grpc.RpcError as e:
        raise AssertionError(f"{e}\n{s.logs()}") from e
    finally:
        try:
            if s.proc is not None:
                assert s.stop() == 0, s.logs()
        finally:
            valkey.stop()


# --------------------------------------------------------------------------- two replicas


def test_a_change_on_one_replica_reaches_the_other_replicas_near_cache(tmp_path: Path) -> None:
    """Deletes, likes and unfollows made through replica A show on replica B at once.

    The near caches keep entries for 10 minutes here, so only the pub/sub
    invalidation can make B see the changes before the deadlines.
    """
    valkey = own_redis(tmp_path / "valkey")
    url = valkey.start()
    data = tmp_path / "data"
    env = {"SYSDESIGN_REDIS_URL": url, "SYSDESIGN_FEED_NEAR_CACHE_MS": "600000"}
    a = StackProcess(data, extra_env=env)
    b = StackProcess(data, extra_env=env)
    try:
        a.start(["serve", "--services", "identity,shortener,feed", "--workers", "fanout"])
        b.start(["serve", "--services", "identity,shortener,feed"])
        alice, bob = grpc_metadata(a.token("alice")), grpc_metadata(a.token("bob"))
        ga, pa = pbg.GraphServiceStub(a.channel()), pbg.PostServiceStub(a.channel())
        pb_b, tb = pbg.PostServiceStub(b.channel()), pbg.TimelineServiceStub(b.channel())
        ga.FollowUser(pb.FollowUserRequest(user=pb.UserRef(username="alice")), metadata=bob)
        keep = pa.CreatePost(pb.CreatePostRequest(text="stays"), metadata=alice).post.post_id
        gone = pa.CreatePost(pb.CreatePostRequest(text="goes"), metadata=alice).post.post_id

        def home_b() -> list[str]:
            return [p.post_id for p in tb.GetHomeTimeline(pb.GetHomeTimelineRequest(),
                                                           metadata=bob, timeout=30).posts]

        wait_until(lambda: {keep, gone} <= set(home_b()))  # B has cached both posts now
        pa.LikePost(pb.LikePostRequest(post_id=keep), metadata=bob)
        wait_until(lambda: pb_b.GetPost(pb.GetPostRequest(post_id=keep), metadata=bob,
                                        timeout=30).post.like_count == 1, 10)
        pa.DeletePost(pb.DeletePostRequest(post_id=gone), metadata=alice)
        wait_until(lambda: gone not in home_b(), 10)
        ga.UnfollowUser(pb.UnfollowUserRequest(user=pb.UserRef(username="alice")), metadata=bob)
        wait_until(lambda: keep not in home_b(), 10)
    finally:
        for s in (a, b):
            if s.proc is not None:
                s.stop()
        valkey.stop()


# --------------------------------------------------------------------------- outbox


def test_fanout_jobs_lost_by_redis_are_requeued_from_the_outbox(tmp_path: Path) -> None:
    """Posts acknowledged while no worker ran, then FLUSHALL: the queued jobs are gone,
    but the outbox rows are not, and the worker's sweep queues them again."""
    valkey = own_redis(tmp_path / "valkey")
    url = valkey.start()
    data = tmp_path / "data"
    env = {"SYSDESIGN_REDIS_URL": url, "SYSDESIGN_FEED_OUTBOX_SWEEP_S": "1",
           "SYSDESIGN_FEED_OUTBOX_MIN_AGE_S": "0"}
    server = StackProcess(data, extra_env=env)
    worker: StackProcess | None = None
    r = sync_redis(url)
    try:
        server.start(["serve", "--services", "identity,shortener,feed"])
        ch = server.channel()
        graph, posts_stub, tl = (pbg.GraphServiceStub(ch), pbg.PostServiceStub(ch),
                                 pbg.TimelineServiceStub(ch))
        author = grpc_metadata(server.token("outboxauthor"))
        readers = [grpc_metadata(server.token(f"outboxreader{i}")) for i in range(3)]
        for md in readers:
            graph.FollowUser(pb.FollowUserRequest(user=pb.UserRef(username="outboxauthor")),
                             metadata=md, timeout=30)
        ids = [posts_stub.CreatePost(pb.CreatePostRequest(text=f"before the flush {i}"),
                                     metadata=author, timeout=30).post.post_id for i in range(5)]
        assert int(r.xlen(STREAM)) == 5  # acknowledged and queued; nobody consumes yet
        flushall(url)
        assert not r.exists(STREAM)

        worker = StackProcess(data, extra_env=env).start(["worker", "fanout"])
        want = sorted(ids, key=int, reverse=True)

        def delivered() -> bool:
            return all([p.post_id for p in tl.GetHomeTimeline(
                pb.GetHomeTimelineRequest(page_size=20), metadata=md, timeout=30).posts] == want
                for md in readers)

        wait_until(delivered, deadline_s=120, every=0.2)
        wait_until(lambda: fanout_idle(r), deadline_s=60)
    except grpc.RpcError as e:
        raise AssertionError(f"{e}\n{server.logs()}") from e
    finally:
        if worker is not None:
            worker.stop()
        if server.proc is not None:
            server.stop()
        r.close()
        valkey.stop()
