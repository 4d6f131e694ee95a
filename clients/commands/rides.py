"""`sysdesign rides …`: ride matching from the command line.

    sysdesign rides simulate                            # 50 drivers, 20 riders around San Francisco
    sysdesign rides simulate --drivers 8 --riders 4 --duration 60 --seed 7
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Annotated

import typer
from rich.live import Live
from rich.markup import escape
from rich.table import Table as RichTable
from rich.text import Text

from clients.common import console, err, fail

rides_app = typer.Typer(help="Ride matching: simulated drivers and riders on RiderService and "
                             "DriverService.", no_args_is_help=True)

DEFAULT_BOX = "37.7480,-122.4530,37.8020,-122.3850"


@rides_app.command("simulate")
def simulate(
    drivers: Annotated[int, typer.Option(min=0, max=5000, help="Simulated drivers.")] = 50,
    riders: Annotated[int, typer.Option(min=0, max=5000, help="Simulated riders.")] = 20,
    box: Annotated[str, typer.Option(
        metavar="LAT1,LNG1,LAT2,LNG2",
        help="Two opposite corners of the area everyone moves in (default: about 6 km by 6 km of "
             "San Francisco).")] = DEFAULT_BOX,
    duration: Annotated[float | None, typer.Option(
        min=0.1, help="Seconds to run (default: until Ctrl-C).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the random paths, choices and think times.")] = None,
    accept_rate: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Fraction of offers the drivers accept; the others are declined or "
                               "left to lapse.")] = 0.9,
    speed_kmh: Annotated[float, typer.Option(
        "--speed-kmh", help="The drivers' speed, km/h (below the server's 200 km/h).")] = 30.0,
    think: Annotated[float, typer.Option(
        "--think", min=0.0, help="Riders' mean wait between rides, seconds (exponential).")] = 5.0,
    mint_tokens: Annotated[bool, typer.Option(
        "--mint-tokens", help="Mint the simulated users' tokens with the data dir's secret (as "
                              "`sysdesign token` does) instead of RegisterUser + Login, which a "
                              "stack's API limits allow only a few times an hour.")] = False,
    addr: Annotated[str | None, typer.Option(
        "--addr", envvar="SYSDESIGN_GRPC_ADDR", metavar="HOST:PORT",
        help="The gRPC server (default 127.0.0.1:50051).")] = None,
) -> None:
    """Simulated drivers drive grid walks in a box, pinging once a second, and take offers;
    simulated riders request rides between random points; a live line shows the fleet and the
    rides, and a summary comes at the end (Ctrl-C stops)."""
    from clients.rides.sim import MAX_SPEED_KMH, Box, SimOptions, Simulation
    from clients.sdk import grpc_target

    try:
        area = Box.parse(box)
    except ValueError as e:
        fail(f"--box {box!r}: {e}", code=2)
    if not 0 < speed_kmh < MAX_SPEED_KMH:
        fail(f"--speed-kmh {speed_kmh:g}: must be above 0 and below {MAX_SPEED_KMH:.0f} "
             "(the server refuses faster pings)", code=2)
    if addr:
        if ":" not in addr or not addr.rsplit(":", 1)[1].isdigit():
            fail(f"--addr {addr!r}: expected HOST:PORT, e.g. 127.0.0.1:50051", code=2)
        os.environ["SYSDESIGN_GRPC_ADDR"] = addr
    o = SimOptions(drivers=drivers, riders=riders, box=area, duration=duration, seed=seed,
                   accept_rate=accept_rate, speed_kmh=speed_kmh, think_seconds=think, target=grpc_target())
    if mint_tokens:
        from clients.common import _config
        from clients.localauth import mint_token

        config = _config()
        # One minter at a time: each opens the table store and hashes a password.
        lock = asyncio.Lock()

        async def mint(name: str) -> tuple[str, str]:
            async with lock:
                token, _exp, user_id, _created = await mint_token(config, name)
            return str(token), str(user_id)

        o.mint = mint
    sim = Simulation(o)
    err.print(f"creating {drivers} drivers and {riders} riders (simdrv_{sim.run_id}_*, "
              f"simrdr_{sim.run_id}_*) on {o.target}…")
    import grpc

    live = Live(Text("starting…"), console=err, refresh_per_second=4, transient=False)
    try:
        stats = asyncio.run(sim.run(on_tick=lambda s: live.update(Text(s.line())),
                                    on_users=lambda _n: live.start()))
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            fail(f"creating the simulated users: {e.details()}",
                 "RegisterUser and Login are rate limited per address: --mint-tokens (on the stack's "
                 "machine), fewer --drivers/--riders, or a stack with SYSDESIGN_API_LIMITS=off")
        fail(f"creating the simulated users: {e.code().name}: {e.details()}")
    finally:
        live.stop()
    elapsed = max(0.0, time.monotonic() - stats.started)
    t = RichTable(title=f"rides simulate: {elapsed:.0f} s, {drivers} drivers, {riders} riders",
                  show_header=False, title_justify="left")
    t.add_row("rides requested", str(stats.requested))
    t.add_row("rides matched", str(stats.matched))
    t.add_row("rides completed", str(stats.completed))
    t.add_row("unmatched (no driver)", str(stats.unmatched))
    t.add_row("cancelled at exit", str(stats.cancelled_at_exit))
    t.add_row("dropped off at exit", str(stats.dropped_at_exit))
    t.add_row("offers seen", f"{stats.offers} ({stats.accepted} accepted, {stats.declined} declined, "
                             f"{stats.lapsed} left to lapse)")
    t.add_row("quotes", str(stats.quotes))
    t.add_row("surge max", f"{stats.surge_max_milli / 1000:.2f}x")
    t.add_row("pings sent", str(stats.pings_sent))
    t.add_row("pings accepted", str(stats.pings_accepted))
    t.add_row("pings refused", str(stats.pings_refused))
    t.add_row("errors", str(stats.errors) + (f" (last: {escape(stats.last_error)})" if stats.last_error else ""))
    console.print(t)
    for line in stats.refusals:
        err.print(f"refused: {escape(line)}", soft_wrap=True, highlight=False)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    del bench_app
    app.add_typer(rides_app, name="rides")
