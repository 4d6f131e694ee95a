"""`sysdesign bench drive`: file sync against the blob port, changed and shifted files, a real tree twice."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clients.common import parse_env


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @bench_app.command("drive")
    def bench_drive(
        size: Annotated[str, typer.Option(help="The big file's size (1GiB, 64MiB, bytes); at least 4MiB.")] = "1GiB",
        out: Annotated[Path, typer.Option(help="Where drive.json, drive.md and drive.png go.")] = Path("bench-results"),
        streams: Annotated[int, typer.Option(min=1, max=16, help="Concurrent UploadBlocks/DownloadBlocks streams.")] = 3,
        rounds: Annotated[int, typer.Option(min=1, max=9, help="First-upload rounds (new random bytes each).")] = 1,
        tree: Annotated[str, typer.Option(help="Two sdists for the tree scenario, comma-separated.")] = (
            "django==5.0.6,django==5.1.3"),
        local_tree: Annotated[bool, typer.Option(help="A generated tree instead of the package index.")] = False,
        keep_data: Annotated[bool, typer.Option(help="Keep the stack's data dir and log.")] = False,
        env: Annotated[list[str] | None, typer.Option("--env", help="KEY=VALUE for the stack, repeatable.")] = None,
    ) -> None:
        """Drive: upload/download vs the blob port, 1-byte edits and inserts (fixed vs FastCDC), tree dedup, RSS."""
        from clients.bench.drive import DriveBenchOptions, main, parse_size

        try:
            nbytes = parse_size(size)
            if nbytes < 4 << 20:
                raise ValueError("at least 4MiB (one block)")
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--size") from None
        specs = tuple(s.strip() for s in tree.split(",") if s.strip())
        if len(specs) != 2:
            raise typer.BadParameter("two specs, e.g. django==5.0.6,django==5.1.3", param_hint="--tree")
        raise typer.Exit(main(DriveBenchOptions(size=nbytes, out_dir=out, streams=streams, rounds=rounds,
                                                tree=specs, local_tree=local_tree, keep_data=keep_data,
                                                extra_env=parse_env(env))))
