"""sysdesign.feed.v1: GraphService, PostService and TimelineService servicers.

Thin adapters over :class:`servers.feed.feed.FeedCore`: the caller comes from
the bearer token (no request carries an author or a follower id), ids are
parsed and checked here, and rows become messages.
"""

from __future__ import annotations

from typing import Any

import grpc
import structlog
from google.protobuf.timestamp_pb2 import Timestamp
from sysdesign.feed.v1 import feed_pb2 as pb
from sysdesign.feed.v1 import feed_pb2_grpc as pb_grpc

from servers.feed.feed import FeedCore, check_page_size, fanout_queue
from servers.feed.posts import length_delimited, parse_post_id
from servers.feed.tables import TABLES
from servers.identity.service import validate_username
from servers.platform.auth import require_caller
from servers.platform.errors import Violations
from servers.platform.runtime import Runtime
from servers.storage.queue import Job

log = structlog.get_logger("sysdesign.feed")

GRAPH_SERVICE = pb.DESCRIPTOR.services_by_name["GraphService"].full_name
POST_SERVICE = pb.DESCRIPTOR.services_by_name["PostService"].full_name
TIMELINE_SERVICE = pb.DESCRIPTOR.services_by_name["TimelineService"].full_name
# Every feed call needs a token.
PUBLIC_METHODS: set[str] = set()


def _ts(ms: int) -> Timestamp:
    t = Timestamp()
    t.FromMilliseconds(ms)
    return t


async def resolve_user(core: FeedCore, ref: pb.UserRef, field: str = "user",
                       *, default: int | None = None) -> int:
    """The user id a UserRef names (registered users only); ``default`` when unset."""
    which = ref.WhichOneof("user")
    v = Violations()
    if which is None:
        if default is not None:
            return default
        v.add(field, "set user_id or username")
        v.raise_if_any()
    if which == "user_id":
        raw = ref.user_id
        if not (raw.isascii() and raw.isdigit() and 0 < int(raw) < 1 << 63):
            v.add(f"{field}.user_id", "must be a positive decimal integer")
            v.raise_if_any()
        if default is not None and int(raw) == default:
            return default
        uid, _ = await core.graph.lookup(user_id=int(raw), field=field)
        return uid
    name = ref.username.lower()
    validate_username(name, v, field=f"{field}.username")
    v.raise_if_any()
    uid, _ = await core.graph.lookup(username=name, field=field)
    return uid


class GraphServicer(pb_grpc.GraphServiceServicer):
    def __init__(self, core: FeedCore) -> None:
        self.core = core

    async def FollowUser(self, request: pb.FollowUserRequest,
                         context: grpc.aio.ServicerContext) -> pb.FollowUserResponse:
        caller = require_caller()
        target = await resolve_user(self.core, request.user)
        changed = await self.core.follow(caller.user_id, target)
        return pb.FollowUserResponse(user_id=str(target), changed=changed)

    async def UnfollowUser(self, request: pb.UnfollowUserRequest,
                           context: grpc.aio.ServicerContext) -> pb.UnfollowUserResponse:
        caller = require_caller()
        target = await resolve_user(self.core, request.user)
        changed = await self.core.unfollow(caller.user_id, target)
        return pb.UnfollowUserResponse(user_id=str(target), changed=changed)

    async def _list(self, which: str, request: Any) -> tuple[list[pb.FollowEdge], str]:
        caller = require_caller()
        v = Violations()
        size = check_page_size(request.page_size, v, default=100, maximum=1000)
        v.raise_if_any()
        uid = await resolve_user(self.core, request.user, default=caller.user_id)
        rows, token = await self.core.graph.page(which, uid, size, request.page_token)
        return [pb.FollowEdge(user_id=str(r["user_id"]), username=r["username"],
                              follow_time=_ts(r["create_ms"])) for r in rows], token

    async def ListFollowers(self, request: pb.ListFollowersRequest,
                            context: grpc.aio.ServicerContext) -> pb.ListFollowersResponse:
        edges, token = await self._list("followers", request)
        return pb.ListFollowersResponse(followers=edges, next_page_token=token)

    async def ListFollowing(self, request: pb.ListFollowingRequest,
                            context: grpc.aio.ServicerContext) -> pb.ListFollowingResponse:
        edges, token = await self._list("following", request)
        return pb.ListFollowingResponse(following=edges, next_page_token=token)

    async def GetFollowCounts(self, request: pb.GetFollowCountsRequest,
                              context: grpc.aio.ServicerContext) -> pb.GetFollowCountsResponse:
        caller = require_caller()
        uid = await resolve_user(self.core, request.user, default=caller.user_id)
        counts = await self.core.graph.counts(uid)
        return pb.GetFollowCountsResponse(
            user_id=str(uid), follower_count=counts["followers"],
            following_count=counts["following"], celebrity=await self.core.graph.is_celebrity(uid))


class PostServicer(pb_grpc.PostServiceServicer):
    def __init__(self, core: FeedCore) -> None:
        self.core = core

    @staticmethod
    def _post_id(raw: str) -> int:
        v = Violations()
        pid = parse_post_id(raw, "post_id", v)
        v.raise_if_any()
        assert pid is not None
        return pid

    async def CreatePost(self, request: pb.CreatePostRequest,
                         context: grpc.aio.ServicerContext) -> pb.CreatePostResponse:
        caller = require_caller()
        post = await self.core.posts.create(
            caller.user_id, caller.username, request.text,
            reply_to=request.reply_to_post_id, repost_of=request.repost_of_post_id,
            media=[(m.media_id, int(m.type)) for m in request.media],
        )
        return pb.CreatePostResponse(post=post)

    async def GetPost(self, request: pb.GetPostRequest,
                      context: grpc.aio.ServicerContext) -> pb.GetPostResponse:
        require_caller()
        return pb.GetPostResponse(post=await self.core.posts.get(self._post_id(request.post_id)))

    async def BatchGetPosts(self, request: pb.BatchGetPostsRequest,
                            context: grpc.aio.ServicerContext) -> pb.BatchGetPostsResponse:
        require_caller()
        v = Violations()  # 1-100 ids: feed.proto
        ids = [parse_post_id(raw, f"post_ids[{i}]", v) for i, raw in enumerate(request.post_ids)]
        v.raise_if_any()
        found = await self.core.posts.hydrate([i for i in ids if i is not None])
        return pb.BatchGetPostsResponse(posts=[found[i] for i in ids if i in found])

    async def DeletePost(self, request: pb.DeletePostRequest,
                         context: grpc.aio.ServicerContext) -> pb.DeletePostResponse:
        caller = require_caller()
        await self.core.posts.delete(self._post_id(request.post_id), caller.user_id)
        return pb.DeletePostResponse()

    async def LikePost(self, request: pb.LikePostRequest,
                       context: grpc.aio.ServicerContext) -> pb.LikePostResponse:
        caller = require_caller()
        changed, n = await self.core.posts.like(self._post_id(request.post_id), caller.user_id, True)
        return pb.LikePostResponse(changed=changed, like_count=n)

    async def UnlikePost(self, request: pb.UnlikePostRequest,
                         context: grpc.aio.ServicerContext) -> pb.UnlikePostResponse:
        caller = require_caller()
        changed, n = await self.core.posts.like(self._post_id(request.post_id), caller.user_id,
                                                False)
        return pb.UnlikePostResponse(changed=changed, like_count=n)


def _page_bytes(posts: list[bytes], token: str) -> bytes:
    """A timeline response assembled from cached post bytes (posts = 1, next_page_token = 2)."""
    return b"".join(length_delimited(1, p) for p in posts) + (
        length_delimited(2, token.encode()) if token else b"")


class TimelineServicer(pb_grpc.TimelineServiceServicer):
    def __init__(self, core: FeedCore) -> None:
        self.core = core

    async def GetHomeTimeline(self, request: pb.GetHomeTimelineRequest,
                              context: grpc.aio.ServicerContext) -> pb.GetHomeTimelineResponse:
        caller = require_caller()
        posts, token = await self.core.home(caller.user_id, request.page_size, request.page_token)
        return pb.GetHomeTimelineResponse.FromString(_page_bytes(posts, token))

    async def GetUserTimeline(self, request: pb.GetUserTimelineRequest,
                              context: grpc.aio.ServicerContext) -> pb.GetUserTimelineResponse:
        caller = require_caller()
        uid = await resolve_user(self.core, request.user, default=caller.user_id)
        posts, token = await self.core.user_timeline(uid, request.page_size, request.page_token)
        return pb.GetUserTimelineResponse.FromString(_page_bytes(posts, token))


def register(server: grpc.aio.Server, rt: Runtime) -> list[str]:
    core = FeedCore.for_runtime(rt)
    pb_grpc.add_GraphServiceServicer_to_server(GraphServicer(core), server)
    pb_grpc.add_PostServiceServicer_to_server(PostServicer(core), server)
    pb_grpc.add_TimelineServiceServicer_to_server(TimelineServicer(core), server)
    return [GRAPH_SERVICE, POST_SERVICE, TIMELINE_SERVICE]


async def handle_fanout(rt: Runtime, job: Job) -> None:
    """The `fanout` worker's handler: at-least-once, idempotent, resumable."""
    fields = job.fields
    post_id = int(fields["post_id"])  # type: ignore[arg-type]
    author_id = int(fields["author_id"])  # type: ignore[arg-type]
    await FeedCore.for_runtime(rt).fanout(post_id, author_id)


async def sweep_outbox(rt: Runtime) -> float:
    """The `fanout` worker's sweep: queue again what the outbox still holds; seconds to the next."""
    core = FeedCore.for_runtime(rt)
    n = await core.sweep_outbox()
    if n:
        log.info("fanout_outbox_requeued", posts=n)
    return float(core.settings.outbox_sweep_s)


__all__ = ["PUBLIC_METHODS", "TABLES", "fanout_queue", "handle_fanout", "register", "sweep_outbox"]
