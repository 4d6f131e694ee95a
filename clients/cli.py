"""The `sysdesign` command: run the stack, mint tokens, call the services, benchmark."""

from __future__ import annotations

import asyncio
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.markup import escape
from rich.table import Table as RichTable

from clients.common import (
    TokenOpt,
    UserOpt,
    _config,
    _rpc,
    _split,
    _token,
    console,
    err,
    fail,
    id_from,
    parse_env,
    store_token,
)

ENV_HELP = """\b
Variables the CLI reads (options override them):
  SYSDESIGN_GRPC_ADDR     gRPC server (--addr), default 127.0.0.1:50051
  SYSDESIGN_PUBLIC_URL    HTTP edge base URL (--edge)
  SYSDESIGN_HTTP_ADDR     edge address, default 127.0.0.1:8080
  SYSDESIGN_TOKEN         bearer token for every command
  SYSDESIGN_DATA_DIR      data dir `token`/--user mint with, default ./data
  SYSDESIGN_TOKEN_SECRET  signing secret instead of the data dir's
  XDG_CONFIG_HOME         `login` token: $XDG_CONFIG_HOME/sysdesign/token
  XDG_CACHE_HOME          `media upload` resume records
  SYSDESIGN_CLI_DEBUG     1: tracebacks instead of one-line errors
Token order: --token, $SYSDESIGN_TOKEN, --user (minted), login, demo.
Servers (up, serve) read the other SYSDESIGN_* variables (README)."""

app = typer.Typer(help="sysdesign: system-design case studies as runnable gRPC services.",
                  epilog=ENV_HELP, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)


@app.callback()
def global_options(
    addr: Annotated[str | None, typer.Option(
        "--addr", envvar="SYSDESIGN_GRPC_ADDR", show_envvar=True, metavar="HOST:PORT",
        help="The gRPC server to call (and, for up/serve, to listen on).")] = None,
    edge: Annotated[str | None, typer.Option(
        "--edge", envvar="SYSDESIGN_PUBLIC_URL", show_envvar=True, metavar="URL",
        help="The HTTP edge's base URL (short links, pastes).")] = None,
) -> None:
    """sysdesign: system-design case studies as runnable gRPC services."""
    import os

    # One source of truth for every command and library below: the environment.
    if addr:
        if ":" not in addr or not addr.rsplit(":", 1)[1].isdigit():
            fail(f"--addr {addr!r}: expected HOST:PORT, e.g. 127.0.0.1:50051", code=2)
        os.environ["SYSDESIGN_GRPC_ADDR"] = addr
    if edge:
        if not edge.startswith(("http://", "https://")):
            fail(f"--edge {edge!r}: expected an http(s) URL, e.g. http://127.0.0.1:8080", code=2)
        os.environ["SYSDESIGN_PUBLIC_URL"] = edge.rstrip("/")
paste_app = typer.Typer(help="Create and read pastes.", no_args_is_help=True)
app.add_typer(paste_app, name="paste")


def _run_stack(services: list[str], *, edge: bool, workers: list[str], grpc_enabled: bool = True,
               banner: bool = False, extra_rows: tuple[tuple[str, str], ...] = ()) -> None:
    from servers.platform.logs import setup_logging
    from servers.platform.server import Stack, run_stack

    config = _config()
    setup_logging(config.log_level)

    def ready(stack: Stack) -> None:
        if not banner:
            return
        t = RichTable(title="sysdesign is up", show_header=False, title_justify="left")
        t.add_row("gRPC", f"{config.grpc_host_port[0]}:{stack.grpc_port}  "
                          f"({', '.join(stack.service_names)})")
        t.add_row("HTTP edge", config.edge_base_url)
        if config.metrics_addr:
            t.add_row("metrics", f"http://{config.metrics_addr}/metrics")
        t.add_row("data", str(config.data_dir))
        t.add_row("redis", config.redis_url or f"embedded Valkey ({config.valkey_dir})")
        t.add_row("tables", ",".join(config.cassandra_hosts) or f"SQLite ({config.sqlite_path})")
        t.add_row("blobs", config.s3_endpoint or f"filesystem ({config.blob_root})")
        for row in extra_rows:
            t.add_row(*row)
        t.add_row("try", "sysdesign token alice   then grpcurl (see README)")
        err.print(t)

    stack = Stack(config, services=services, edge=edge, workers=workers, grpc_enabled=grpc_enabled)
    try:
        asyncio.run(run_stack(stack, ready))
    except KeyboardInterrupt:
        pass


@app.command()
def up(
    cassandra: Annotated[bool, typer.Option(
        "--cassandra",
        help="Keep the tables on a real Apache Cassandra node started under DATA_DIR/cassandra "
             "(needs Java 17 and, the first time, Maven) instead of SQLite.")] = False,
    sim: Annotated[bool, typer.Option(
        "--sim/--no-sim",
        help="Start the card processor's stand-in (`sysdesign sim psp`) beside the stack for payments, "
             "unless SYSDESIGN_PSP_URL names a processor already.")] = True,
) -> None:
    """Run every service, every worker and the HTTP edge in one process on embedded backends."""
    from clients import psp_sim
    from servers.systems import SYSTEMS, WORKERS

    config = _config()
    node_dir = config.cassandra_node_dir
    with psp_sim.beside_the_stack(config, enabled=sim) as rows:
        if not (cassandra or (not config.cassandra_hosts_from_env and config.cassandra_hosts)):
            _run_stack(list(SYSTEMS), edge=True, workers=list(WORKERS), banner=True, extra_rows=rows)
            return
        _up_on_cassandra(node_dir, rows)


def _up_on_cassandra(node_dir: Path, rows: tuple[tuple[str, str], ...]) -> None:
    from servers.systems import SYSTEMS, WORKERS

    config = _config()
    if config.cassandra_hosts_from_env:
        err.print("[red]--cassandra starts a local node: unset SYSDESIGN_CASSANDRA_HOSTS first[/]")
        raise typer.Exit(2)
    from clients import cassandra_node

    why = cassandra_node.missing_tools()
    if why:
        err.print(f"[red]cannot start Apache Cassandra[/]: {why}")
        raise typer.Exit(2)
    started = cassandra_node.read_state(node_dir.resolve()) is None
    cassandra_node.start(node_dir)
    try:
        config = _config()  # now names the node
        _apply_schema(config)
        _run_stack(list(SYSTEMS), edge=True, workers=list(WORKERS), banner=True, extra_rows=rows)
    finally:
        if started:
            cassandra_node.stop(node_dir)


def _apply_schema(config: Any) -> None:
    from servers.storage.backends import open_table_store
    from servers.systems import all_tables

    async def create() -> None:
        store = open_table_store(config)
        try:
            await store.create_tables(all_tables())
        finally:
            await store.close()

    asyncio.run(create())


@app.command()
def serve(
    services: Annotated[str, typer.Option(help="Comma-separated systems to host.")] = "identity,shortener",
    edge: Annotated[bool, typer.Option(help="Also serve the HTTP edge.")] = False,
    workers: Annotated[str, typer.Option(help="Comma-separated workers to run in-process.")] = "",
) -> None:
    """Host a subset of the gRPC services (one Deployment per service on Kubernetes)."""
    _run_stack(_split(services), edge=edge, workers=_split(workers))


@app.command()
def worker(name: Annotated[str, typer.Argument(help="Worker to run, e.g. blobgc.")]) -> None:
    """Run one background worker (with a gRPC health endpoint for probes)."""
    from servers.systems import WORKERS

    if name not in WORKERS:
        fail(f"unknown worker {name!r}; choose from {', '.join(sorted(WORKERS))}", code=2)
    _run_stack([], edge=False, workers=[name])


@app.command()
def edge() -> None:
    """Run only the HTTP edge (redirects, raw pastes)."""
    _run_stack([], edge=True, workers=[], grpc_enabled=False)


@app.command()
def migrate(
    apply: Annotated[bool, typer.Option("--apply", help="Create the keyspace and tables (and the S3 bucket).")] = False,
    replication: Annotated[str, typer.Option(
        envvar="SYSDESIGN_CASSANDRA_REPLICATION",
        help="Keyspace replication, e.g. 'NetworkTopologyStrategy:dc1=3' or 'SimpleStrategy:3'.")] = "",
    wait: Annotated[float, typer.Option(
        help="With --apply: keep retrying for this many seconds while a backend is not up yet "
             "(the Kubernetes schema Job starts alongside Cassandra and MinIO).")] = 0,
) -> None:
    """Print (or apply) the CQL schema generated from the table definitions.

    With --apply and SYSDESIGN_S3_ENDPOINT set, the blob bucket is created too,
    so one Job prepares every backend before the services report SERVING.
    """
    from servers.storage.cassandra_table import cql_schema
    from servers.systems import all_tables

    config = _config()
    try:
        repl = _parse_replication(replication)
    except ValueError:
        fail(f"--replication {replication!r}: expected 'SimpleStrategy:N' or "
             "'NetworkTopologyStrategy:dc1=N,dc2=M'", code=2)
    if not apply:
        sys.stdout.write(cql_schema(all_tables(), config.cassandra_keyspace, repl) + "\n")
        return
    from rich.markup import escape

    from servers.storage.backends import open_blob_store, open_table_store

    async def tables() -> None:
        store = open_table_store(config)
        if repl and hasattr(store, "replication"):
            store.replication = repl
        try:
            await store.create_tables(all_tables())
        finally:
            await store.close()

    async def bucket() -> None:
        from servers.storage.s3_blob import S3BlobStore

        blobs = open_blob_store(config)
        try:
            if isinstance(blobs, S3BlobStore):
                await blobs.ensure_bucket()
        finally:
            await blobs.close()

    async def retrying(what: str, step: Any) -> None:
        deadline = time.monotonic() + wait
        while True:
            try:
                await step()
                return
            except Exception as exc:
                if time.monotonic() >= deadline:
                    err.print(f"[red]{what} unavailable[/]: {escape(str(exc))}")
                    raise typer.Exit(1) from exc
                err.print(f"[yellow]{what} not ready[/] ({escape(str(exc))}); retrying in 2 s")
                await asyncio.sleep(2)

    asyncio.run(retrying("tables", tables))
    target = ",".join(config.cassandra_hosts) or str(config.sqlite_path)
    err.print(f"[green]schema applied[/] to {target}: {len(all_tables())} tables")
    if config.s3_endpoint:
        asyncio.run(retrying("s3", bucket))
        err.print(f"[green]bucket ready[/]: {config.s3_bucket} at {config.s3_endpoint}")


def _parse_replication(spec: str) -> dict[str, Any] | None:
    if not spec:
        return None
    cls, _, rest = spec.partition(":")
    if cls == "SimpleStrategy":
        return {"class": cls, "replication_factor": int(rest or 1)}
    out: dict[str, Any] = {"class": cls}
    for part in _split(rest):
        dc, _, n = part.partition("=")
        out[dc] = int(n)
    return out


@app.command()
def token(
    username: Annotated[str, typer.Argument(help="The user; registered first if missing.")],
    ttl: Annotated[int, typer.Option(min=1, help="Lifetime in seconds (at least 1).")] = 3600,
    no_create: Annotated[bool, typer.Option("--no-create", help="Fail if the user does not exist.")] = False,
) -> None:
    """Mint a bearer token with the local data dir's secret (a developer shortcut for grpcurl:
    -H 'authorization: Bearer …'; `sysdesign login` is the normal way)."""
    from clients.localauth import mint_token
    from servers.platform.errors import InvalidArgument

    try:
        tok, exp, uid, created = asyncio.run(mint_token(_config(), username, create=not no_create,
                                                        ttl_seconds=ttl))
    except LookupError as e:
        fail(str(e))
    except InvalidArgument as e:
        fail(e.message)
    if created:
        err.print(f"registered user {username} (id {uid})")
    err.print(f"token for {username} (id {uid}), valid until "
              f"{datetime.fromtimestamp(exp, UTC).isoformat(timespec='seconds')}")
    print(tok)


# -- client commands ---------------------------------------------------------

def _expire_time(expire_in: int | None) -> Any:
    """The request's expire_time for --expire-in N seconds (None: never expires)."""
    if expire_in is None or expire_in == 0:
        return None
    if expire_in < 0:
        fail(f"--expire-in {expire_in}: must be a positive number of seconds "
             "(it sets the request's expire_time to now + N)", code=2)
    from google.protobuf.timestamp_pb2 import Timestamp

    ts = Timestamp()
    ts.FromMilliseconds(int((time.time() + expire_in) * 1000))
    return ts


ExpireOpt = Annotated[int | None, typer.Option(
    help="Expire after this many seconds (sets the request's expire_time; default: never).")]


@app.command()
def shorten(
    long_url: str,
    alias: Annotated[str, typer.Option(help="Custom alias (4-32 Base62 characters; sets custom_alias).")] = "",
    expire_in: ExpireOpt = None,
    max_visits: Annotated[int, typer.Option(help="Stop redirecting after this many visits.")] = 0,
    permanent: Annotated[bool, typer.Option(help="301 instead of 302.")] = False,
    token: TokenOpt = None,
    user: UserOpt = None,
) -> None:
    """Create a short link."""
    from sysdesign.shortener.v1 import shortener_pb2 as pb
    from sysdesign.shortener.v1 import shortener_pb2_grpc as pbg

    from clients.sdk import bearer, channel

    req = pb.CreateShortUrlRequest(long_url=long_url, custom_alias=alias, max_visits=max_visits,
                                   redirect_type=pb.REDIRECT_TYPE_PERMANENT if permanent
                                   else pb.REDIRECT_TYPE_FOUND)
    expire = _expire_time(expire_in)
    if expire is not None:
        req.expire_time.CopyFrom(expire)
    with channel() as ch:
        resp = _rpc(pbg.ShortenerServiceStub(ch).CreateShortUrl, req, metadata=bearer(_token(token, user)),
                    flags={"expire_time": "--expire-in", "custom_alias": "--alias",
                           "max_visits": "--max-visits", "redirect_type": "--permanent"})
    print(resp.short_url.short_url)


CodeArg = Annotated[str, typer.Argument(help="The code, or the short URL `shorten` printed.")]


@app.command()
def resolve(code: CodeArg) -> None:
    """Resolve a code to its long URL (counts a click)."""
    from sysdesign.shortener.v1 import shortener_pb2 as pb
    from sysdesign.shortener.v1 import shortener_pb2_grpc as pbg

    from clients.sdk import channel

    with channel() as ch:
        resp = _rpc(pbg.ShortenerServiceStub(ch).ResolveShortUrl,
                    pb.ResolveShortUrlRequest(code=id_from(code)))
    print(resp.long_url)
    err.print(f"{pb.RedirectType.Name(resp.redirect_type)}, visit {resp.visit_count}")


@app.command()
def stats(code: CodeArg, days: int = 7, token: TokenOpt = None, user: UserOpt = None) -> None:
    """Click analytics of one of your links."""
    from sysdesign.shortener.v1 import shortener_pb2 as pb
    from sysdesign.shortener.v1 import shortener_pb2_grpc as pbg

    from clients.sdk import bearer, channel

    code = id_from(code)
    with channel() as ch:
        s = _rpc(pbg.ShortenerServiceStub(ch).GetShortUrlStats,
                 pb.GetShortUrlStatsRequest(code=code, days=days), metadata=bearer(_token(token, user)),
                 flags={"days": "--days"})
    console.print(f"[bold]{code}[/]: {s.total_clicks} clicks, ~{s.unique_visitors} unique visitors")
    t = RichTable("day", "clicks", "")
    peak = max([d.clicks for d in s.daily_clicks] + [1])
    for d in s.daily_clicks:
        t.add_row(d.day, str(d.clicks), "█" * round(30 * d.clicks / peak))
    console.print(t)
    r = RichTable("referrer", "clicks")
    for ref in s.top_referrers:
        r.add_row(ref.referrer, str(ref.clicks))
    console.print(r)


def _read_text(file: Path) -> str:
    """The file's text, or one line saying why it cannot be a paste."""
    if str(file) == "-":
        data = sys.stdin.buffer.read()
        name = "standard input"
    else:
        name = str(file)
        try:
            data = file.read_bytes()
        except FileNotFoundError:
            fail(f"{name}: no such file", code=2)
        except IsADirectoryError:
            fail(f"{name}: is a directory, not a file", code=2)
        except OSError as e:
            fail(f"{name}: cannot read it ({e.strerror or e})", code=2)
    if b"\x00" in data:
        fail(f"{name}: is a binary file (it contains NUL bytes); a paste holds UTF-8 text", code=2)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        fail(f"{name}: is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
             "a paste holds UTF-8 text", code=2)


@paste_app.command("create")
def paste_create(
    file: Annotated[Path, typer.Argument(help="A UTF-8 text file, or - for standard input.")],
    title: str = "",
    language: str = "",
    expire_in: ExpireOpt = None,
    token: TokenOpt = None,
    user: UserOpt = None,
) -> None:
    """Store a paste and print its raw URL."""
    from sysdesign.shortener.v1 import shortener_pb2 as pb
    from sysdesign.shortener.v1 import shortener_pb2_grpc as pbg

    from clients.sdk import bearer, channel

    text = _read_text(file)
    req = pb.CreatePasteRequest(content=text, title=title or (file.name if str(file) != "-" else ""),
                                language=language)
    expire = _expire_time(expire_in)
    if expire is not None:
        req.expire_time.CopyFrom(expire)
    with channel() as ch:
        resp = _rpc(pbg.PasteServiceStub(ch).CreatePaste, req, metadata=bearer(_token(token, user)),
                    flags={"expire_time": "--expire-in", "title": "--title", "language": "--language",
                           "content": "FILE"})
    err.print(f"paste {resp.paste.paste_id}, {resp.paste.size_bytes} bytes")
    print(resp.paste.raw_url)


@paste_app.command("get")
def paste_get(paste_id: Annotated[str, typer.Argument(
        help="The paste id, or the raw URL `paste create` printed.")]) -> None:
    """Print a paste's text."""
    from sysdesign.shortener.v1 import shortener_pb2 as pb
    from sysdesign.shortener.v1 import shortener_pb2_grpc as pbg

    from clients.sdk import channel

    with channel() as ch:
        resp = _rpc(pbg.PasteServiceStub(ch).GetPaste,
                    pb.GetPasteRequest(paste_id=id_from(paste_id, prefix="p", what="paste id")))
    sys.stdout.write(resp.paste.content)


@app.command()
def login(
    username: Annotated[str, typer.Argument(help="Your username.")],
    password_stdin: Annotated[bool, typer.Option(
        "--password-stdin", help="Read the password from standard input instead of prompting.")] = False,
    register: Annotated[bool, typer.Option(
        "--register", help="Create the user first (RegisterUser), then log in.")] = False,
) -> None:
    """Log in with IdentityService and keep the token for the other commands.

    The token goes to $XDG_CONFIG_HOME/sysdesign/token (default ~/.config),
    readable by you only; commands use it when neither --token, $SYSDESIGN_TOKEN
    nor --user is given.
    """
    from sysdesign.identity.v1 import identity_pb2 as ipb
    from sysdesign.identity.v1 import identity_pb2_grpc as ipbg

    from clients.sdk import channel, grpc_target

    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        import getpass

        try:
            password = getpass.getpass(f"password for {username} at {grpc_target()}: ")
        except EOFError:
            fail("no password given (use --password-stdin to pipe one)", code=2)
    with channel() as ch:
        stub = ipbg.IdentityServiceStub(ch)
        if register:
            _rpc(stub.RegisterUser, ipb.RegisterUserRequest(username=username, password=password))
            err.print(f"registered {username}")
        resp = _rpc(stub.Login, ipb.LoginRequest(username=username, password=password))
    path = store_token(resp.access_token)
    err.print(f"logged in as {resp.user.username} (id {resp.user.user_id}) at {grpc_target()}, "
              f"until {resp.expire_time.ToDatetime(tzinfo=UTC).isoformat(timespec='seconds')}; "
              f"token stored in {path}")


bench_app = typer.Typer(help="Open-loop benchmarks against floors measured in the same run.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("shortener")
def bench_shortener(
    quick: Annotated[bool, typer.Option(help="Small counts and short steps (about 2 minutes).")] = False,
    links: Annotated[int | None, typer.Option(help="Links stored for the scale scenario (default 1,000,000).")] = None,
    scenarios: Annotated[str, typer.Option(help="Subset of resolve,redirect,create,scale.")] = "resolve,redirect,create,scale",
    out: Annotated[Path, typer.Option(help="Where the JSON, Markdown and PNG results go.")] = Path("bench-results"),
    workers: Annotated[int | None, typer.Option(help="Load-generator processes (default 2).")] = None,
    keep_data: Annotated[bool, typer.Option(help="Keep the stack's data dir and log.")] = False,
    env: Annotated[list[str] | None, typer.Option("--env", help="KEY=VALUE for the stack, repeatable.")] = None,
) -> None:
    """URL shortener: resolve, edge redirects, create and 1M-link scale against floors run alongside."""
    from clients.bench.shortener import ShortenerBenchOptions, main

    extra = parse_env(env)
    raise typer.Exit(main(ShortenerBenchOptions(
        quick=quick, links=links, out_dir=out, workers=workers, keep_data=keep_data,
        scenarios=tuple(_split(scenarios)), extra_env=extra)))


def _load_command_modules() -> None:
    """Each system's commands live in `clients/commands/<system>.py` with a `register(app, bench_app)`."""
    import importlib
    import pkgutil

    import clients.commands as pkg

    for mod in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        importlib.import_module(f"{pkg.__name__}.{mod.name}").register(app, bench_app)


_load_command_modules()


def _one_line(message: str, code: int) -> NoReturn:
    err.print(f"[red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    """The `sysdesign` entry point: usage errors and failures in one line, never a traceback."""
    import grpc

    from clients.common import rpc_error_lines
    from servers.platform.limits import LimitsConfigError

    try:
        rv = app(args=argv, prog_name="sysdesign", standalone_mode=False)
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted")
        raise SystemExit(130) from None
    except grpc.RpcError as e:  # one that a command did not catch itself
        line, extra = rpc_error_lines(e)
        err.print(f"[red]error:[/] {escape(line)}", soft_wrap=True, highlight=False)
        for x in extra:
            err.print(f"  {escape(x)}", soft_wrap=True, highlight=False)
        raise SystemExit(1) from None
    except (OSError, UnicodeError) as e:
        _one_line(f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.filename else str(e), 1)
    except LimitsConfigError as e:
        _one_line(f"API limits: {e}", 2)
    except Exception as e:
        # click's (or typer's vendored click's) usage errors: same attributes either way.
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):
            if type(e).__name__ == "NoArgsIsHelpError":  # `sysdesign`, `sysdesign feed`: the help
                e.show()  # type: ignore[attr-defined]
                raise SystemExit(0) from None
            ctx = getattr(e, "ctx", None)
            if ctx is not None:
                where = ctx.command_path
                _one_line(f"{where}: {e.format_message()} (see {where} --help)", int(e.exit_code))
            _one_line(e.format_message(), int(e.exit_code))
        import os

        if os.environ.get("SYSDESIGN_CLI_DEBUG"):
            raise
        _one_line(f"unexpected {type(e).__name__}: {e} (a bug: SYSDESIGN_CLI_DEBUG=1 shows the "
                  "traceback)", 1)
    raise SystemExit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
