"""What every `sysdesign` subcommand shares: configuration, tokens, error printing.

Errors are printed once, on stderr, as one line (``error: ...``), followed
by the request's field violations when the server sent some; the command
then exits non-zero. Nothing a user can cause ends in a traceback.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Annotated, Any, NoReturn
from urllib.parse import urlsplit

import grpc
import typer
from rich.console import Console
from rich.markup import escape

console = Console()
err = Console(stderr=True)

TokenOpt = Annotated[str | None, typer.Option(
    help="Bearer token (default: $SYSDESIGN_TOKEN, then the one `sysdesign login` stored, "
         "else one minted for --user).")]
UserOpt = Annotated[str | None, typer.Option(
    help="Mint a token for this user with the local data dir's secret (a developer shortcut; "
         "default: your `sysdesign login`, else demo).")]

# How the last token was obtained, for the hint when the server refuses it.
_token_source = ""


def _config() -> Any:
    from servers.platform.config import Config

    return Config()


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def id_column(header: str, *, min_width: int = 19, **kw: Any) -> Any:
    """A table column for ids and URLs: never cut with an ellipsis, folded when it must shrink."""
    from rich.table import Column

    return Column(header, overflow="fold", min_width=min_width, **kw)


def fail(message: str, *lines: str, code: int = 1) -> NoReturn:
    """Print ``error: message`` (one line, never wrapped) and exit with ``code``."""
    err.print(f"[red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)
    for line in lines:
        err.print(f"  {escape(line)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


def parse_env(pairs: list[str] | None, option: str = "--env") -> dict[str, str]:
    """KEY=VALUE options as a dict; one line naming the bad one otherwise."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"{option} {pair!r}: expected KEY=VALUE", code=2)
        out[key] = value
    return out


# -- tokens ------------------------------------------------------------------


def config_dir() -> Path:
    """``$XDG_CONFIG_HOME/sysdesign`` (default ``~/.config/sysdesign``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "sysdesign"


def token_path() -> Path:
    return config_dir() / "token"


def stored_token() -> str:
    try:
        return token_path().read_text().strip()
    except OSError:
        return ""


def store_token(token: str) -> Path:
    path = token_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    tmp.replace(path)
    return path


def _token(token: str | None, user: str | None) -> str:
    """--token, else $SYSDESIGN_TOKEN, else (without --user) the stored login, else minted."""
    global _token_source
    if token:
        _token_source = "--token"
        return token
    if os.environ.get("SYSDESIGN_TOKEN"):
        _token_source = "$SYSDESIGN_TOKEN"
        return os.environ["SYSDESIGN_TOKEN"]
    if user is None:
        saved = stored_token()
        if saved:
            _token_source = f"the login stored in {token_path()}"
            return saved
    from clients.localauth import mint_token
    from servers.platform.errors import InvalidArgument

    config = _config()
    name = user or "demo"
    try:
        minted = asyncio.run(mint_token(config, name))[0]
    except InvalidArgument as e:
        fail(f"--user {name!r}: {e.message}")
    _token_source = f"minted for {name} with the secret of the data dir {config.data_dir}"
    return str(minted)


def caller_name(token: str) -> str:
    """Whom the server says the token's bearer is (IdentityService.GetUser on the token's id)."""
    import base64
    import json

    from sysdesign.identity.v1 import identity_pb2 as ipb
    from sysdesign.identity.v1 import identity_pb2_grpc as ipbg

    from clients.sdk import bearer, channel

    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        uid = str(claims["sub"])
    except (IndexError, ValueError, KeyError, TypeError):
        fail("the token is not a sysdesign token (expected header.payload.signature)")
    with channel() as ch:
        resp = _rpc(ipbg.IdentityServiceStub(ch).GetUser, ipb.GetUserRequest(user_id=uid),
                    metadata=bearer(token))
    return str(resp.user.username)


# -- ids and URLs ------------------------------------------------------------


def id_from(value: str, *, prefix: str = "", what: str = "code") -> str:
    """The id in ``value``: itself, or the last path segment of a URL the CLI printed.

    ``prefix`` is the route before the id on the edge (``p`` for pastes).
    """
    if "://" not in value:
        return value
    try:
        parts = urlsplit(value)
    except ValueError:
        fail(f"{value!r} is not a URL")
    segs = [s for s in parts.path.split("/") if s]
    want = [prefix] if prefix else []
    if len(segs) != len(want) + 1 or segs[:-1] != want:
        shape = f"/{prefix}/<{what}>" if prefix else f"/<{what}>"
        fail(f"{value} is not a {what} URL of the edge (expected {edge_url()}{shape})")
    return segs[-1]


def edge_url() -> str:
    """The HTTP edge's base URL: --edge, else $SYSDESIGN_PUBLIC_URL, else http://$SYSDESIGN_HTTP_ADDR."""
    return str(_config().edge_base_url)


# -- RPC errors --------------------------------------------------------------

_DETAILS_KEY = "grpc-status-details-bin"


def _status_details(e: Any) -> tuple[list[tuple[str, str]], str]:
    """(field violations, ErrorInfo reason) of a sync or asyncio RPC error."""
    from google.rpc import error_details_pb2, status_pb2

    violations: list[tuple[str, str]] = []
    reason = ""
    try:
        trailers = e.trailing_metadata() or ()
    except Exception:
        trailers = ()
    for k, v in trailers:
        if k != _DETAILS_KEY:
            continue
        status = status_pb2.Status.FromString(v if isinstance(v, bytes) else v.encode())
        for d in status.details:
            if d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                br = error_details_pb2.BadRequest()
                d.Unpack(br)
                violations += [(fv.field, fv.description) for fv in br.field_violations]
            elif d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                d.Unpack(info)
                reason = reason or info.reason
    return violations, reason


def rpc_error_lines(e: Any, flags: dict[str, str] | None = None) -> tuple[str, list[str]]:
    """(the one-line message, field violations not already in it) of an RPC error.

    ``flags`` maps proto fields to the CLI options that set them, so a
    violation of ``expire_time`` reads ``expire_time (set by --expire-in)``.
    """
    from clients.sdk import grpc_target

    code = e.code()
    details = e.details() or ""
    violations, reason = _status_details(e)
    flags = flags or {}

    def label(field: str) -> str:
        root = field.split(".", 1)[0].split("[", 1)[0]
        return f"{field} (set by {flags[root]})" if root in flags else field

    if code == grpc.StatusCode.UNAVAILABLE and not violations and not reason:
        return (f"UNAVAILABLE: cannot reach the gRPC server at {grpc_target()} "
                f"(is `sysdesign up` running? set --addr or $SYSDESIGN_GRPC_ADDR)"), []
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"DEADLINE_EXCEEDED: the server at {grpc_target()} did not answer in time", []
    joined = "; ".join(f"{f}: {d}" for f, d in violations)
    if violations and details in ("", joined, "invalid argument"):
        return f"{code.name}: " + "; ".join(f"{label(f)}: {d}" for f, d in violations), []
    line = f"{code.name}: {details}"
    if code == grpc.StatusCode.UNAUTHENTICATED and reason == "TOKEN_INVALID":
        line += (f". The token ({_token_source or 'given'}) was signed with another secret than the "
                 f"server's at {grpc_target()}: a token from another data dir or deployment. Run "
                 "`sysdesign login USER` against this server, or mint with the server's "
                 "SYSDESIGN_DATA_DIR (or SYSDESIGN_TOKEN_SECRET)")
    elif code == grpc.StatusCode.UNAUTHENTICATED and reason == "TOKEN_EXPIRED":
        line += ". Run `sysdesign login USER` again (or mint a new one with `sysdesign token USER`)"
    extra = [f"{label(f)}: {d}" for f, d in violations if f"{f}: {d}" not in details]
    return line, extra


def rpc_fail(e: Any, flags: dict[str, str] | None = None) -> NoReturn:
    line, extra = rpc_error_lines(e, flags)
    fail(line, *extra)


def _rpc(fn: Any, *args: Any, flags: dict[str, str] | None = None, **kwargs: Any) -> Any:
    kwargs.setdefault("timeout", 10)
    try:
        return fn(*args, **kwargs)
    except grpc.RpcError as e:
        rpc_fail(e, flags)
