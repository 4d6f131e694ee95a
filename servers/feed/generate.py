"""Synthetic social graphs for demos and benchmarks (`sysdesign feed generate`).

Real follower counts follow a power law: most people have a handful of
followers, a few have millions. The generator draws it the usual way:

- user ``i`` (0-based rank) gets popularity ``1 / (i + 1) ** alpha`` (Zipf);
  the first ``celebrities`` ranks are additionally followed by
  ``celebrity_share`` of everyone;
- a graph too small for those ranks to reach the celebrity threshold in
  force (10,000 users cannot give anyone 10,000 followers) tops them up with
  follower-only ids (:func:`load_followers`: edges from fresh Snowflake ids
  that have no account), so ``celebrities=N`` always yields N authors whose
  posts are pulled at read time;
- each user follows ``k`` others, ``k`` drawn from a Pareto distribution
  scaled to a mean of ``avg_following`` (capped by the following limit), the
  followees picked by popularity (no self-follows, no duplicates).

Loading is the fast path: rows are written straight through the table port
by the domain layer (:meth:`GraphCore.bulk_follow`, thousands of concurrent
puts, which the SQLite adapter commits in groups of 256 and Cassandra runs
in parallel), not one FollowUser RPC per edge. Cached counts and following
sets of the touched users are invalidated and rebuilt from the tables on the
next read, and authors past the threshold become celebrities. Posts go
through ``PostCore.create`` (the same code as CreatePost), so the running
stack's fan-out worker delivers them.

Users are registered with an unusable password hash: they log in with minted
tokens (``sysdesign token <name>``).
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from servers.feed.feed import FeedCore
from servers.identity.tables import USERNAMES, USERS

NO_PASSWORD = "!"  # not an argon2 hash: every password check fails

Progress = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass(frozen=True)
class GraphSpec:
    users: int = 1000
    avg_following: float = 20.0
    alpha: float = 1.0
    celebrities: int = 3
    celebrity_share: float = 0.3
    posts_per_user: float = 2.0
    prefix: str = "user"
    seed: int = 1


def username(prefix: str, i: int) -> str:
    return f"{prefix}{i:07d}"


def draw_edges(spec: GraphSpec, following_limit: int) -> list[tuple[int, int]]:
    """(follower rank, followee rank) pairs."""
    rnd = random.Random(spec.seed)
    n = spec.users
    if n < 2:
        return []
    weights = [1.0 / (i + 1) ** spec.alpha for i in range(n)]
    cum = list(itertools.accumulate(weights))
    total = cum[-1]
    # Pareto with shape 2 has mean 2 * x_m: scale x_m for the requested mean.
    shape = 2.0
    xm = spec.avg_following * (shape - 1) / shape
    cap = min(n - 1, following_limit)
    celebs = range(min(spec.celebrities, n))
    edges: list[tuple[int, int]] = []
    for u in range(n):
        k = min(cap, max(1, int(xm * rnd.paretovariate(shape))))
        chosen: set[int] = set()
        for c in celebs:
            if c != u and rnd.random() < spec.celebrity_share and len(chosen) < cap:
                chosen.add(c)
        tries = 0
        while len(chosen) < k and tries < 20 * k:
            tries += 1
            v = bisect.bisect_left(cum, rnd.random() * total)
            if v != u and v < n:
                chosen.add(v)
        edges += [(u, v) for v in chosen]
    return edges


async def register_users(core: FeedCore, names: list[str], progress: Progress | None = None,
                         batch: int = 2000) -> list[int]:
    """User ids for ``names``, registering the missing ones (idempotent across runs)."""
    tables = core.tables
    ids: list[int] = []
    for start in range(0, len(names), batch):
        chunk = names[start:start + batch]
        now = int(time.time() * 1000)
        fresh = [core.rt.snowflake.next_id() for _ in chunk]
        won = await asyncio.gather(*(tables.put(USERNAMES, {
            "username": name, "user_id": uid, "password_hash": NO_PASSWORD, "create_ms": now},
            if_not_exists=True) for name, uid in zip(chunk, fresh, strict=True)))
        rows = await asyncio.gather(*(tables.get(USERNAMES, {"username": name})
                                      for name, w in zip(chunk, won, strict=True) if not w))
        existing = iter(rows)
        chunk_ids = []
        for uid, w in zip(fresh, won, strict=True):
            chunk_ids.append(uid if w else int(next(existing)["user_id"]))  # type: ignore[index]
        await asyncio.gather(*(tables.put(USERS, {"user_id": uid, "username": name,
                                                  "create_ms": now})
                               for name, uid, w in zip(chunk, chunk_ids, won, strict=True) if w))
        ids += chunk_ids
        if progress:
            progress("users", len(ids), len(names))
    return ids


async def load_edges(core: FeedCore, edges: list[tuple[int, int]], progress: Progress | None = None,
                     batch: int = 4096) -> None:
    """Write follow edges (user ids) that do not exist yet, then fix caches and celebrities."""
    for start in range(0, len(edges), batch):
        await core.graph.bulk_follow(edges[start:start + batch])
        if progress:
            progress("follows", min(len(edges), start + batch), len(edges))
    followers: dict[int, int] = {}
    touched: set[int] = set()
    for a, b in edges:
        followers[b] = followers.get(b, 0) + 1
        touched.update((a, b))
    await core.graph.finish_bulk(sorted(touched), followers)


async def load_followers(core: FeedCore, author: int, count: int,
                         progress: Progress | None = None, batch: int = 4096) -> list[int]:
    """``count`` synthetic followers of ``author`` (fresh Snowflake ids, no user rows).

    The followers are new ids, so none of them has cached state to invalidate:
    only the author's counts are dropped (recounted on the next read).
    """
    followers = [core.rt.snowflake.next_id() for _ in range(count)]
    for start in range(0, count, batch):
        await core.graph.bulk_follow([(f, author) for f in followers[start:start + batch]])
        if progress:
            progress("followers", min(count, start + batch), count)
    await core.graph.finish_bulk([author], {author: count})
    return followers


async def top_up_celebrities(core: FeedCore, authors: list[int],
                             progress: Progress | None = None) -> tuple[dict[int, int], int]:
    """Give each of ``authors`` at least the celebrity threshold of followers.

    Returns ({author: follower count}, follower-only edges added). Counts come
    from the tables, so a re-run adds nothing to an author already past the
    threshold, and the authors are promoted by :func:`load_followers`.
    """
    threshold = core.settings.celebrity_threshold
    counts: dict[int, int] = {}
    added = 0
    for author in authors:
        have = (await core.graph.counts(author))["followers"]
        if have < threshold:
            await load_followers(core, author, threshold - have, progress)
            added += threshold - have
            have = threshold
        await core.graph.maybe_promote(author, have)
        counts[author] = have
    return counts, added


async def create_posts(core: FeedCore, authors: list[tuple[int, str]], spec: GraphSpec,
                       progress: Progress | None = None, concurrency: int = 32) -> int:
    """About ``posts_per_user`` posts per author, through the CreatePost code path."""
    rnd = random.Random(spec.seed + 1)
    jobs: list[tuple[int, str, str]] = []
    for uid, name in authors:
        n = int(spec.posts_per_user) + (1 if rnd.random() < spec.posts_per_user % 1 else 0)
        for j in range(n):
            mention = authors[rnd.randrange(len(authors))][1]
            jobs.append((uid, name, f"post {j + 1} from @{name}: hello @{mention}! #{rnd.randrange(10**6)}"))
    rnd.shuffle(jobs)
    done = 0
    sem = asyncio.Semaphore(concurrency)

    async def one(uid: int, name: str, text: str) -> None:
        nonlocal done
        async with sem:
            await core.posts.create(uid, name, text)
        done += 1
        if progress and (done % 50 == 0 or done == len(jobs)):
            progress("posts", done, len(jobs))

    await asyncio.gather(*(one(*j) for j in jobs))
    return len(jobs)


async def generate(core: FeedCore, spec: GraphSpec, progress: Progress | None = None) -> dict[str, Any]:
    names = [username(spec.prefix, i) for i in range(spec.users)]
    ids = await register_users(core, names, progress)
    ranked = draw_edges(spec, core.settings.following_limit)
    edges = [(ids[a], ids[b]) for a, b in ranked]
    # Idempotent: a re-run rewrites the same rows, and counts are recounted from the tables.
    await load_edges(core, edges, progress)
    celebs, padded = await top_up_celebrities(core, ids[:min(spec.celebrities, len(ids))], progress)
    posts = await create_posts(core, list(zip(ids, names, strict=True)), spec, progress) \
        if spec.posts_per_user > 0 else 0
    followers: dict[int, int] = {}
    for _, b in ranked:
        followers[b] = followers.get(b, 0) + 1
    for rank, uid in enumerate(ids[:len(celebs)]):
        followers[rank] = max(followers.get(rank, 0), celebs[uid])
    top = sorted(followers.items(), key=lambda kv: -kv[1])[:5]
    return {
        "users": len(ids),
        "edges": len(edges),
        "posts": posts,
        "top": [(names[r], n) for r, n in top],
        "celebrities": sum(1 for n in followers.values() if n >= core.settings.celebrity_threshold),
        "threshold": core.settings.celebrity_threshold,
        "padded": padded,
    }
