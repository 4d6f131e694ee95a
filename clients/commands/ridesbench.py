"""`sysdesign bench rides`: location ingest, nearby queries from 10k to 1M drivers, dispatch under contention."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clients.common import _split, parse_env


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    del app

    @bench_app.command("rides")
    def bench_rides(
        quick: Annotated[bool, typer.Option(help="Small sizes: 200 streaming drivers for 4 s, 100 to "
                                                 "10,000 loaded drivers, 40 riders and 12 drivers.")] = False,
        scenarios: Annotated[str, typer.Option(help="Subset of ingest,nearby,dispatch.")] = (
            "ingest,nearby,dispatch"),
        drivers: Annotated[int | None, typer.Option(min=1, help="ingest: drivers streaming pings "
                                                                "(default 10,000).")] = None,
        duration: Annotated[float | None, typer.Option(min=1.0, help="ingest: seconds of pings "
                                                                     "(default 20).")] = None,
        workers: Annotated[int, typer.Option(min=1, max=16, help="ingest: client processes.")] = 2,
        drivers_max: Annotated[int | None, typer.Option(min=100, help="nearby: the largest size; the "
                                                                      "others are a tenth and a "
                                                                      "hundredth (default 1,000,000).")] = None,
        quote_rate: Annotated[float | None, typer.Option(min=1.0, help="nearby: GetQuote calls/s, open "
                                                                       "loop (default 100).")] = None,
        quote_seconds: Annotated[float | None, typer.Option(min=0.5, help="nearby: seconds of GetQuote "
                                                                          "per size (default 10).")] = None,
        riders: Annotated[int | None, typer.Option(min=2, help="dispatch: riders requesting at once "
                                                               "(default 1,000).")] = None,
        dispatch_drivers: Annotated[int | None, typer.Option(min=1, help="dispatch: auto-accepting "
                                                                         "drivers (default 300).")] = None,
        out: Annotated[Path, typer.Option(help="Where rides.json, rides.md and rides.png go.")] = Path(
            "bench-results"),
        keep_data: Annotated[bool, typer.Option(help="Keep the stack's data dir and log.")] = False,
        env: Annotated[list[str] | None, typer.Option("--env", help="KEY=VALUE for the stack, "
                                                                    "repeatable.")] = None,
    ) -> None:
        """Ride matching: location ingest over UpdateLocation streams against a pipelined GEOADD loop,
        GetQuote / nearby() p99 from 10k to 1M online drivers, 1,000 riders at once for 300 drivers."""
        from clients.bench.rides import RidesBenchOptions, main

        o = RidesBenchOptions(quick=quick, scenarios=tuple(_split(scenarios)), drivers=drivers,
                              duration=duration, workers=workers, drivers_max=drivers_max,
                              quote_rate=quote_rate, quote_seconds=quote_seconds, riders=riders,
                              dispatch_drivers=dispatch_drivers, out_dir=out, keep_data=keep_data,
                              extra_env=parse_env(env))
        try:
            o.resolved()
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        raise typer.Exit(main(o))
