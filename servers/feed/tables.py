"""News-feed tables (the table port; CQL emitted by `sysdesign migrate`).

Everything here is one partition per read, as on Cassandra:

- a post is stored once, by id (``feed_posts``); timelines hold pointers;
- timelines are partitioned by ``(owner, bucket)`` where the bucket is the
  Snowflake time bucket of the post id (``servers.platform.ids.bucket_of``), so
  no partition grows without bound: a user timeline is one partition per 30
  days of one author's posts, a home timeline one partition per 7 days of what
  one reader received;
- the graph is stored in both directions (``feed_followers`` answers "who
  follows X", ``feed_following`` answers "whom does X follow"), each a
  partition per user clustered by the other user's id;
- likes, replies and reposts are edge tables too: their counts are derived
  from them (Redis holds the counters, rebuilt from these partitions).
"""

from servers.storage.table import Table

DAY_MS = 86_400_000
# One user's posts: a prolific author writes a few hundred a month.
USER_POSTS_BUCKET_MS = 30 * DAY_MS
# One reader's home timeline receives far more (every followee's posts).
HOME_BUCKET_MS = 7 * DAY_MS

POSTS = Table(
    name="feed_posts",
    partition_key=("post_id",),
    columns={
        "post_id": "bigint",
        "author_id": "bigint",
        "author_username": "text",
        "text": "text",
        "reply_to": "bigint",
        "repost_of": "bigint",
        # JSON: [{"media_id": ..., "type": n}, ...]
        "media": "text",
        # JSON: {"mentions": [[user_id, username, start, end], ...], "urls": [[url, short, start, end], ...]}
        "entities": "text",
        "create_ms": "bigint",
        # A deleted post keeps its row as a tombstone (GetPost answers NOT_FOUND).
        "deleted": "boolean",
    },
    comment="posts by id, stored once",
)

USER_POSTS = Table(
    name="feed_user_posts",
    partition_key=("author_id", "bucket"),
    clustering=("post_id",),
    descending=True,
    columns={"author_id": "bigint", "bucket": "bigint", "post_id": "bigint"},
    comment="user timelines: one author's post ids, newest first, by 30-day bucket",
)

HOME_TIMELINE = Table(
    name="feed_home_timeline",
    partition_key=("user_id", "bucket"),
    clustering=("post_id",),
    descending=True,
    columns={"user_id": "bigint", "bucket": "bigint", "post_id": "bigint", "author_id": "bigint"},
    comment="home timelines written by fan-out on write, newest first, by 7-day bucket",
)

FOLLOWERS = Table(
    name="feed_followers",
    partition_key=("user_id",),
    clustering=("follower_id",),
    descending=True,
    columns={"user_id": "bigint", "follower_id": "bigint", "create_ms": "bigint"},
    comment="who follows user_id",
)

FOLLOWING = Table(
    name="feed_following",
    partition_key=("user_id",),
    clustering=("followee_id",),
    descending=True,
    columns={"user_id": "bigint", "followee_id": "bigint", "create_ms": "bigint"},
    comment="whom user_id follows",
)

LIKES = Table(
    name="feed_likes",
    partition_key=("post_id",),
    clustering=("user_id",),
    columns={"post_id": "bigint", "user_id": "bigint", "create_ms": "bigint"},
    comment="who liked a post",
)

REPLIES = Table(
    name="feed_replies",
    partition_key=("post_id",),
    clustering=("reply_id",),
    descending=True,
    columns={"post_id": "bigint", "reply_id": "bigint"},
    comment="replies to a post, newest first",
)

REPOSTS = Table(
    name="feed_reposts",
    partition_key=("post_id",),
    clustering=("repost_id",),
    descending=True,
    columns={"post_id": "bigint", "repost_id": "bigint"},
    comment="reposts of a post, newest first",
)

# Authors whose posts are pulled at read time instead of pushed. One small
# partition (a few thousand rows at most); an author enters it when their
# follower count reaches the celebrity threshold and never leaves (see
# servers/feed/graph.py for why membership is sticky).
CELEBRITIES = Table(
    name="feed_celebrities",
    partition_key=("shard",),
    clustering=("user_id",),
    columns={"shard": "int", "user_id": "bigint", "since_ms": "bigint"},
    comment="authors served by fan-out on read",
)

# The fan-out outbox: a row per post whose fan-out on write has not finished,
# written before its job is queued and deleted when the job is done. Redis
# streams survive restarts (AOF) but not a FLUSHALL or a lost replica; the
# worker's sweeper re-queues what is left here (servers/feed/feed.py). One
# partition per hour of post ids: the sweeper reads only recent partitions.
FANOUT_PENDING_BUCKET_MS = 60 * 60 * 1000
FANOUT_PENDING = Table(
    name="feed_fanout_pending",
    partition_key=("bucket",),
    clustering=("post_id",),
    columns={"bucket": "bigint", "post_id": "bigint", "author_id": "bigint"},
    comment="posts whose fan-out on write is not finished yet (the outbox)",
)

TABLES = [POSTS, USER_POSTS, HOME_TIMELINE, FOLLOWERS, FOLLOWING, LIKES, REPLIES, REPOSTS,
          CELEBRITIES, FANOUT_PENDING]
