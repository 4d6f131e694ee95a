"""`sysdesign bench ratelimit` (the rate limit service is called by Envoy, not by hand)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @bench_app.command("ratelimit")
    def bench_ratelimit(
        quick: Annotated[bool, typer.Option(help="200 clients, 10 s per algorithm.")] = False,
        clients: Annotated[int | None, typer.Option(help="Concurrent clients (default 1,000).")] = None,
        duration: Annotated[float | None, typer.Option(help="Seconds per algorithm (default 60).")] = None,
        limit: Annotated[int, typer.Option(help="The limit, requests per second.")] = 100,
        rate: Annotated[float | None, typer.Option(help="Calls/s the clients offer together, "
                                                        "open-loop (default 10x the limit).")] = None,
        workers: Annotated[int | None, typer.Option(help="Client processes (default 4).")] = None,
        local_cache: Annotated[bool, typer.Option(help="The replicas' over-limit cache "
                                                       "(off: every call goes to Redis).")] = True,
        failure_mode: Annotated[str, typer.Option(help="The replicas' answer when Redis is late: "
                                                       "deny (default here) or allow (a deployment's "
                                                       "default).")] = "deny",
        redis_timeout_ms: Annotated[int, typer.Option(help="The replicas' Redis timeout.")] = 5000,
        out: Annotated[Path, typer.Option(help="Where the JSON, Markdown and PNG results "
                                               "go.")] = Path("bench-results"),
    ) -> None:
        """Rate limiting: how exactly fixed window, sliding window and token bucket hold a
        limit when 1,000 clients flood two replicas sharing one Redis with ten times the limit."""
        from clients.bench.ratelimit import RateLimitBenchOptions, main

        raise typer.Exit(main(RateLimitBenchOptions(quick=quick, clients=clients, duration=duration,
                                                    limit=limit, rate=rate, workers=workers, out_dir=out,
                                                    local_cache=local_cache, failure_mode=failure_mode,
                                                    redis_timeout_ms=redis_timeout_ms)))
