"""`sysdesign sim <provider>`: stand-ins for external providers, real servers on loopback."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clients.common import err


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    del bench_app
    sim_app = typer.Typer(help="Provider stand-ins (card processor, ...) on loopback, with fault switches.",
                          no_args_is_help=True)
    app.add_typer(sim_app, name="sim")

    @sim_app.command("psp")
    def sim_psp(
        port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 12111,
        host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
        data_dir: Annotated[Path, typer.Option(help="Where the charges, keys and events are kept "
                                                    "(SQLite).")] = Path("data/sim-psp"),
        secret_key: Annotated[str, typer.Option(envvar="SYSDESIGN_PSP_SECRET_KEY",
                                                help="The API key callers send as Bearer.")] = "sk_test_sim",
        webhook_url: Annotated[str, typer.Option(help="Where events are POSTed (none: only recorded, "
                                                      "readable at GET /v1/events).")] = "",
        webhook_secret: Annotated[str, typer.Option(envvar="SYSDESIGN_PSP_WEBHOOK_SECRET",
                                                    help="Signs the webhooks (Stripe-Signature).")] = "whsec_sim",
        seed: Annotated[int, typer.Option(help="Seeds the fault rates' dice.")] = 0,
        webhook_retry_base_ms: Annotated[int, typer.Option(min=1, help="First webhook retry delay; "
                                                                       "doubles per attempt.")] = 1000,
        webhook_max_attempts: Annotated[int, typer.Option(min=1, help="Attempts before a webhook is "
                                                                      "given up.")] = 12,
        latency_ms: Annotated[int, typer.Option(min=0, help="Fault: delay before every /v1 answer.")] = 0,
        timeout_after_charge: Annotated[bool, typer.Option(help="Fault: money-moving POSTs commit, then "
                                                                "never answer.")] = False,
        timeout_hold_ms: Annotated[int, typer.Option(min=0, help="Fault: how long such a connection is "
                                                                 "held before it is closed.")] = 30000,
        error_5xx_rate: Annotated[float, typer.Option(min=0, max=1, help="Fault: share of /v1 requests "
                                                                          "answered 500 (nothing done).")] = 0.0,
        rate_limit_rate: Annotated[float, typer.Option(min=0, max=1, help="Fault: share answered 429 "
                                                                           "with Retry-After.")] = 0.0,
        duplicate_webhooks: Annotated[float, typer.Option(min=0, max=1, help="Fault: share of events "
                                                                              "delivered twice.")] = 0.0,
        out_of_order_webhooks: Annotated[bool, typer.Option(help="Fault: events delivered newest first "
                                                                 "in batches.")] = False,
        drop_webhooks: Annotated[float, typer.Option(min=0, max=1, help="Fault: share of events never "
                                                                         "delivered.")] = 0.0,
        listen_fd: Annotated[int | None, typer.Option(hidden=True, help="Serve on this inherited listening "
                                                                         "socket (sysdesign up).")] = None,
    ) -> None:
        """A card processor (Stripe's PaymentIntents API, simplified) on loopback: docs/sim.md."""
        from servers.sim.psp import Faults, PspConfig, run

        if webhook_url and not webhook_url.startswith(("http://", "https://")):
            raise typer.BadParameter(f"{webhook_url!r}: expected an http(s) URL", param_hint="--webhook-url")
        faults = Faults(latency_ms=latency_ms, timeout_after_charge=timeout_after_charge,
                        timeout_hold_ms=timeout_hold_ms, error_5xx_rate=error_5xx_rate,
                        rate_limit_rate=rate_limit_rate, duplicate_webhooks=duplicate_webhooks,
                        out_of_order_webhooks=out_of_order_webhooks, drop_webhooks=drop_webhooks)
        config = PspConfig(data_dir=data_dir, host=host, port=port, secret_key=secret_key,
                           webhook_url=webhook_url, webhook_secret=webhook_secret, seed=seed,
                           webhook_retry_base_ms=webhook_retry_base_ms,
                           webhook_max_attempts=webhook_max_attempts, faults=faults, listen_fd=listen_fd)

        def ready(url: str) -> None:
            err.print(f"psp simulator listening on {url} (data {data_dir})", highlight=False, soft_wrap=True)

        run(config, ready)
