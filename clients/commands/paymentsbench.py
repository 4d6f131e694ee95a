"""`sysdesign bench payments`: confirms and ledger transfers against raw table writes, a soak under faults."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clients.common import _split, parse_env


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    del app

    @bench_app.command("payments")
    def bench_payments(
        quick: Annotated[bool, typer.Option(help="Small sizes: 2 s steps, at most 3 per search, a 300-intent "
                                                 "soak from 40 clients.")] = False,
        scenarios: Annotated[str, typer.Option(help="Subset of confirm,ledger,soak.")] = "confirm,ledger,soak",
        step_seconds: Annotated[float | None, typer.Option(min=0.5, help="confirm, ledger: seconds per "
                                                                         "open-loop step (default 5).")] = None,
        max_steps: Annotated[int | None, typer.Option(min=1, help="confirm, ledger: open-loop steps per search "
                                                                  "(default 6).")] = None,
        workers: Annotated[int, typer.Option(min=1, max=16, help="confirm, ledger: load processes.")] = 2,
        p99_limit_ms: Annotated[float, typer.Option(min=1.0, help="confirm, ledger: a step passes with p99 "
                                                                  "at most this.")] = 250.0,
        customers: Annotated[int | None, typer.Option(min=1, help="confirm, soak: customers the intents "
                                                                  "belong to (default 500).")] = None,
        accounts: Annotated[int | None, typer.Option(min=2, help="ledger: accounts the transfers move "
                                                                 "between (default 200).")] = None,
        intents: Annotated[int | None, typer.Option(min=1, help="soak: intents (default 10,000).")] = None,
        clients: Annotated[int | None, typer.Option(min=1, help="soak: concurrent clients "
                                                                "(default 200).")] = None,
        timeout_share: Annotated[float, typer.Option(min=0.0, max=1.0, help="soak: share of the time the "
                                                                            "processor's timeout_after_charge "
                                                                            "is on.")] = 0.2,
        settle_timeout: Annotated[float | None, typer.Option(min=1.0, help="soak: seconds the reconciler is "
                                                                           "given to settle (default 300).")] = None,
        out: Annotated[Path, typer.Option(help="Where payments.json, payments.md and payments.png go.")] = Path(
            "bench-results"),
        keep_data: Annotated[bool, typer.Option(help="Keep the stack's and the processor's data dirs.")] = False,
        env: Annotated[list[str] | None, typer.Option("--env", help="KEY=VALUE for the stack, "
                                                                    "repeatable.")] = None,
    ) -> None:
        """Payments: ConfirmPaymentIntent and CreateTransfer against their own table writes done raw, and a
        10,000-intent soak with every fault of the processor's stand-in on, ending in a clean audit."""
        from clients.bench.payments import PaymentsBenchOptions, main

        o = PaymentsBenchOptions(quick=quick, scenarios=tuple(_split(scenarios)), step_seconds=step_seconds,
                                 max_steps=max_steps, workers=workers, p99_limit_ms=p99_limit_ms,
                                 customers=customers, accounts=accounts, intents=intents, clients=clients,
                                 timeout_share=timeout_share, settle_timeout=settle_timeout, out_dir=out,
                                 keep_data=keep_data, extra_env=parse_env(env))
        try:
            o.resolved()
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        raise typer.Exit(main(o))
