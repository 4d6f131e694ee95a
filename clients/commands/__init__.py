"""Per-system `sysdesign` subcommands: each module defines `register(app, bench_app)`."""
