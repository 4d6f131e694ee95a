"""`sysdesign feed ...`: explore the news feed by hand, and load synthetic graphs.

    sysdesign feed follow bob --user alice
    sysdesign feed post "hello @bob, see https://example.com" --user alice
    sysdesign feed home --user bob
    sysdesign feed user alice
    sysdesign feed generate --users 10000 --celebrities 3
    sysdesign bench feed --quick
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table as RichTable

from clients.common import (
    TokenOpt,
    UserOpt,
    _config,
    _rpc,
    _split,
    _token,
    caller_name,
    console,
    err,
    fail,
    id_column,
    parse_env,
)

feed_app = typer.Typer(help="News feed: follow people, post, read timelines, generate graphs.",
                       no_args_is_help=True)


def _stubs() -> tuple[Any, Any, Any, Any]:
    from sysdesign.feed.v1 import feed_pb2 as pb
    from sysdesign.feed.v1 import feed_pb2_grpc as pbg

    from clients.sdk import channel

    ch = channel()
    return pb, pbg.GraphServiceStub(ch), pbg.PostServiceStub(ch), pbg.TimelineServiceStub(ch)


def _ref(pb: Any, who: str) -> Any:
    if not who:
        return pb.UserRef()
    return pb.UserRef(user_id=who) if who.isdigit() else pb.UserRef(username=who.lstrip("@"))


def _show(posts: Any, next_token: str, title: str) -> None:
    t = RichTable(title=title, title_justify="left", show_lines=False)
    # Ids, names and URLs fold rather than end in "…": a cut id cannot be copied.
    t.add_column("post id", style="dim", overflow="fold", min_width=19)
    t.add_column("author", overflow="fold")
    t.add_column("when", style="dim")
    t.add_column("text", overflow="fold")
    t.add_column("♥ ↩ ⟳", justify="right")
    for p in posts:
        text = p.text
        for u in p.urls:
            text += f"\n  [dim]{u.url} → {u.short_url}[/]"
        if p.reply_to_post_id:
            text = f"[dim]↩ {p.reply_to_post_id}[/] " + text
        if p.repost_of_post_id:
            text = f"[dim]⟳ {p.repost_of_post_id}[/] " + text
        when = p.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
        t.add_row(p.post_id, "@" + p.author_username, when, text,
                  f"{p.like_count} {p.reply_count} {p.repost_count}")
    console.print(t)
    if next_token:
        err.print(f"next page: --page-token {next_token}")


@feed_app.command("post")
def post(
    text: str,
    reply_to: Annotated[str, typer.Option(help="Post id this one replies to.")] = "",
    repost_of: Annotated[str, typer.Option(help="Post id this one reposts.")] = "",
    token: TokenOpt = None,
    user: UserOpt = None,
) -> None:
    """Publish a post (at most 280 characters); prints its id."""
    pb, _, posts, _ = _stubs()
    resp = _rpc(posts.CreatePost, pb.CreatePostRequest(text=text, reply_to_post_id=reply_to,
                                                       repost_of_post_id=repost_of),
                metadata=_md(token, user))
    for m in resp.post.mentions:
        err.print(f"mention @{m.username} → user {m.user_id}")
    for u in resp.post.urls:
        err.print(f"{u.url} → {u.short_url}")
    print(resp.post.post_id)


def _md(token: str | None, user: str | None) -> Any:
    from clients.sdk import bearer

    return bearer(_token(token, user))


def _me(md: Any) -> str:
    """The caller as the server names them (not --user: $SYSDESIGN_TOKEN or --token may differ)."""
    return caller_name(md[0][1].removeprefix("Bearer "))


@feed_app.command("follow")
def follow(who: Annotated[str, typer.Argument(help="Username or user id.")],
           token: TokenOpt = None, user: UserOpt = None) -> None:
    """Follow a user (their recent posts are copied into your home timeline)."""
    pb, graph, _, _ = _stubs()
    resp = _rpc(graph.FollowUser, pb.FollowUserRequest(user=_ref(pb, who)), metadata=_md(token, user))
    err.print(f"{'now following' if resp.changed else 'already following'} {who} ({resp.user_id})")


@feed_app.command("unfollow")
def unfollow(who: Annotated[str, typer.Argument(help="Username or user id.")], token: TokenOpt = None, user: UserOpt = None) -> None:
    """Unfollow a user (their posts leave your home timeline)."""
    pb, graph, _, _ = _stubs()
    resp = _rpc(graph.UnfollowUser, pb.UnfollowUserRequest(user=_ref(pb, who)),
                metadata=_md(token, user))
    err.print(f"{'unfollowed' if resp.changed else 'was not following'} {who} ({resp.user_id})")


@feed_app.command("home")
def home(page_size: int = 20, page_token: str = "", token: TokenOpt = None,
         user: UserOpt = None) -> None:
    """Your home timeline, newest first."""
    pb, _, _, tl = _stubs()
    md = _md(token, user)
    resp = _rpc(tl.GetHomeTimeline, pb.GetHomeTimelineRequest(page_size=page_size,
                                                              page_token=page_token),
                metadata=md)
    _show(resp.posts, resp.next_page_token, f"home timeline of {_me(md)}")


@feed_app.command("user")
def user_timeline(who: Annotated[str, typer.Argument(help="Username or id (default: you).")] = "",
                  page_size: int = 20, page_token: str = "", token: TokenOpt = None,
                  user: UserOpt = None) -> None:
    """One user's posts, newest first."""
    pb, _, _, tl = _stubs()
    md = _md(token, user)
    resp = _rpc(tl.GetUserTimeline, pb.GetUserTimelineRequest(user=_ref(pb, who), page_size=page_size,
                                                              page_token=page_token),
                metadata=md)
    name = resp.posts[0].author_username if resp.posts else (who.lstrip("@") if who else _me(md))
    _show(resp.posts, resp.next_page_token, f"posts of {name}")


@feed_app.command("like")
def like(post_id: str, undo: Annotated[bool, typer.Option("--undo", help="Unlike.")] = False,
         token: TokenOpt = None, user: UserOpt = None) -> None:
    """Like (or with --undo, unlike) a post."""
    pb, _, posts, _ = _stubs()
    if undo:
        resp = _rpc(posts.UnlikePost, pb.UnlikePostRequest(post_id=post_id), metadata=_md(token, user))
    else:
        resp = _rpc(posts.LikePost, pb.LikePostRequest(post_id=post_id), metadata=_md(token, user))
    err.print(f"{'changed' if resp.changed else 'unchanged'}: {resp.like_count} likes")


@feed_app.command("delete")
def delete(post_id: str, token: TokenOpt = None, user: UserOpt = None) -> None:
    """Delete one of your posts."""
    pb, _, posts, _ = _stubs()
    _rpc(posts.DeletePost, pb.DeletePostRequest(post_id=post_id), metadata=_md(token, user))
    err.print(f"deleted {post_id}")


@feed_app.command("followers")
def followers(who: Annotated[str, typer.Argument(help="Username or id (default: you).")] = "",
              page_size: int = 100, page_token: str = "",
              following: Annotated[bool, typer.Option(help="List whom they follow instead.")] = False,
              token: TokenOpt = None, user: UserOpt = None) -> None:
    """A user's followers (or, with --following, whom they follow) and counts."""
    pb, graph, _, _ = _stubs()
    md = _md(token, user)
    counts = _rpc(graph.GetFollowCounts, pb.GetFollowCountsRequest(user=_ref(pb, who)), metadata=md)
    if following:
        resp = _rpc(graph.ListFollowing, pb.ListFollowingRequest(
            user=_ref(pb, who), page_size=page_size, page_token=page_token), metadata=md)
        edges = resp.following
    else:
        resp = _rpc(graph.ListFollowers, pb.ListFollowersRequest(
            user=_ref(pb, who), page_size=page_size, page_token=page_token), metadata=md)
        edges = resp.followers
    console.print(f"[bold]{who or _me(md)}[/]: {counts.follower_count} followers, "
                  f"{counts.following_count} following"
                  + (" [yellow](celebrity: posts pulled at read time)[/]" if counts.celebrity else ""))
    t = RichTable(id_column("user id"), id_column("username", min_width=3), "since")
    for e in edges:
        t.add_row(e.user_id, e.username, e.follow_time.ToDatetime().isoformat(timespec="seconds"))
    console.print(t)
    if resp.next_page_token:
        err.print(f"next page: --page-token {resp.next_page_token}")


@feed_app.command("generate")
def generate(
    users: Annotated[int, typer.Option(min=1, help="How many users.")] = 1000,
    avg_following: Annotated[float, typer.Option(min=0, help="Mean follows per user (Pareto).")] = 20.0,
    alpha: Annotated[float, typer.Option(min=0, help="Zipf exponent of popularity.")] = 1.0,
    celebrities: Annotated[int, typer.Option(
        min=0, help="Top users followed by --celebrity-share of everyone, topped up with follower-only ids "
             "to $SYSDESIGN_FEED_CELEBRITY_THRESHOLD when the graph is too small to reach it.")] = 3,
    celebrity_share: Annotated[float, typer.Option(
        min=0, max=1, help="Share of users following each top user.")] = 0.3,
    posts_per_user: Annotated[float, typer.Option(
        min=0, help="Mean posts per user (through CreatePost's code).")] = 2.0,
    prefix: Annotated[str, typer.Option(help="Usernames are <prefix><7 digits>.")] = "user",
    seed: int = 1,
) -> None:
    """Load a synthetic power-law social graph into the running stack's backends."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from servers.feed.generate import GraphSpec
    from servers.feed.generate import generate as run

    spec = GraphSpec(users=users, avg_following=avg_following, alpha=alpha, celebrities=celebrities,
                     celebrity_share=celebrity_share, posts_per_user=posts_per_user, prefix=prefix,
                     seed=seed)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err) as progress:
        tasks: dict[str, Any] = {}

        def report(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = progress.add_task(phase, total=total)
            progress.update(tasks[phase], completed=done, total=total)

        try:
            summary = asyncio.run(_with_core(lambda core: run(core, spec, report)))
        except RuntimeError as e:  # no Redis to reach: the stack is not running here
            progress.stop()
            fail(str(e))
    console.print(f"[green]loaded[/] {summary['users']:,} users, {summary['edges']:,} follows, "
                  f"{summary['posts']:,} posts; {summary['celebrities']} celebrities "
                  f"(threshold {summary['threshold']:,} followers)")
    if summary["padded"]:
        console.print(f"[dim]{summary['padded']:,} follower-only ids (no account) added so the top "
                      f"{celebrities} reach the threshold[/]")
    t = RichTable("most followed", "followers")
    for name, n in summary["top"]:
        t.add_row(name, f"{n:,}")
    console.print(t)
    console.print(f"try: sysdesign feed home --user {prefix}{0:07d}")


async def _with_core(fn: Any) -> Any:
    """Run ``fn(FeedCore)`` against the configured backends (the running stack's)."""
    from servers.feed.feed import FeedCore
    from servers.platform.runtime import Runtime
    from servers.systems import all_tables

    rt = await Runtime.open(_config(), tables=all_tables(), start_embedded=False)
    try:
        return await fn(FeedCore.for_runtime(rt))
    finally:
        await rt.close()


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    app.add_typer(feed_app, name="feed")

    @bench_app.command("feed")
    def bench_feed(
        quick: Annotated[bool, typer.Option(help="Small counts and short steps (a few minutes).")] = False,
        scenarios: Annotated[str, typer.Option(help="Subset of home,fanout,cost.")] = "home,fanout,cost",
        out: Annotated[Path, typer.Option(help="Where the JSON, Markdown and PNG results go.")] = Path("bench-results"),
        workers: Annotated[int | None, typer.Option(help="Load-generator processes (default 2).")] = None,
        max_followers: Annotated[int | None, typer.Option(help="Largest follower count of the cost curve (default 1,000,000).")] = None,
        keep_data: Annotated[bool, typer.Option(help="Keep the stack's data dir and log.")] = False,
        env: Annotated[list[str] | None, typer.Option("--env", help="KEY=VALUE for the stack, repeatable.")] = None,
    ) -> None:
        """News feed: home timeline vs echo, fan-out vs raw ZADD, CreatePost cost vs followers."""
        from clients.bench.feed import FeedBenchOptions, main

        extra = parse_env(env)
        raise typer.Exit(main(FeedBenchOptions(
            quick=quick, scenarios=tuple(_split(scenarios)), out_dir=out, workers=workers,
            max_followers=max_followers, keep_data=keep_data, extra_env=extra)))
