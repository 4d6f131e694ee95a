"""`sysdesign bench ratelimit` (the rate limit service is called by Envoy, not by hand)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clients.common import _split, parse_env


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @bench_app.command("ratelimit")
    def bench_ratelimit(
        quick: Annotated[bool, typer.Option(help="accuracy: 200 clients, 10 s per algorithm; "
                                                 "throughput: 1-s steps.")] = False,
        scenarios: Annotated[str, typer.Option(help="Subset of accuracy,throughput.")] = "accuracy,throughput",
        clients: Annotated[int | None, typer.Option(help="accuracy: concurrent clients "
                                                         "(default 1,000).")] = None,
        duration: Annotated[float | None, typer.Option(help="accuracy: seconds per algorithm "
                                                            "(default 60).")] = None,
        limit: Annotated[int, typer.Option(help="accuracy: the limit, requests per second.")] = 100,
        rate: Annotated[float | None, typer.Option(help="accuracy: calls/s the clients offer together, "
                                                        "open-loop (default 10x the limit).")] = None,
        workers: Annotated[int | None, typer.Option(help="accuracy: client processes (default 4).")] = None,
        local_cache: Annotated[bool, typer.Option(help="accuracy: the replicas' over-limit cache "
                                                       "(off: every call goes to Redis).")] = True,
        failure_mode: Annotated[str, typer.Option(help="accuracy: the replicas' answer when Redis is "
                                                       "late: deny (default here) or allow (a "
                                                       "deployment's default).")] = "deny",
        redis_timeout_ms: Annotated[int, typer.Option(help="accuracy: the replicas' Redis "
                                                           "timeout.")] = 5000,
        load_workers: Annotated[int | None, typer.Option(help="throughput: load-generator processes "
                                                              "(default 2).")] = None,
        step_seconds: Annotated[float | None, typer.Option(help="throughput: one open-loop step "
                                                                "(default 10; quick 1).")] = None,
        users: Annotated[int, typer.Option(help="throughput: distinct users in the "
                                                "requests.")] = 1000,
        p99_limit_ms: Annotated[float, typer.Option(help="throughput: a step over this p99 has not "
                                                         "sustained its rate.")] = 100.0,
        envoy_env: Annotated[list[str] | None, typer.Option(
            "--envoy-env", help="throughput: KEY=VALUE for envoyproxy/ratelimit, repeatable "
                                "(e.g. REDIS_PIPELINE_WINDOW=150us).")] = None,
        out: Annotated[Path, typer.Option(help="Where the JSON, Markdown and PNG results "
                                               "go.")] = Path("bench-results"),
    ) -> None:
        """Rate limiting: how exactly fixed window, sliding window and token bucket hold a
        limit when 1,000 clients flood two replicas sharing one Redis with ten times the limit (accuracy), and
        ShouldRateLimit calls/s against the gRPC echo floor and envoyproxy/ratelimit itself,
        same config, same Redis, same load (throughput)."""
        from clients.bench.ratelimit import RateLimitBenchOptions, main

        raise typer.Exit(main(RateLimitBenchOptions(
            quick=quick, scenarios=tuple(_split(scenarios)), clients=clients, duration=duration,
            limit=limit, rate=rate, workers=workers, out_dir=out, local_cache=local_cache,
            failure_mode=failure_mode, redis_timeout_ms=redis_timeout_ms,
            load_workers=load_workers, step_seconds=step_seconds, users=users,
            p99_limit_ms=p99_limit_ms, envoy_env=parse_env(envoy_env, "--envoy-env"))))
