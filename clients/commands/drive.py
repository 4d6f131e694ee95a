"""`sysdesign drive …`: your files on DriveService, and a two-way sync of a local folder.

Paths are absolute in your tree (``/docs/a.txt``) or ``id:<node_id>`` for a
node wherever it is (what ``ls --ids`` and ``trash`` print). ``put`` sends
only the blocks the server does not hold already; ``get`` checks every
block's hash and replaces the target in one rename. ``sync DIR`` keeps DIR
and your tree in step until Ctrl-C (``--once``: one pass).
"""

from __future__ import annotations

import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table as RichTable

from clients.common import TokenOpt, UserOpt, _token, console, err, fail, id_column, rpc_fail
from clients.drive.client import Transfer

drive_app = typer.Typer(help="Files and folders on DriveService, and `drive sync` of a local folder.",
                        no_args_is_help=True)

DeviceOpt = Annotated[str | None, typer.Option(
    help="This machine's name in revisions and conflicted copies (default: the host name).")]
NamespaceOpt = Annotated[str, typer.Option(
    "--namespace", help="Another user's namespace id, inside a folder they shared with you.")]
KIND = {1: "file", 2: "folder"}
ROLES = {"reader": 1, "writer": 2}
ROLE_NAMES = {1: "reader", 2: "writer"}


def _device(device: str | None) -> str:
    return (device or socket.gethostname() or "device")[:64]


def _channel() -> grpc.Channel:
    from clients.sdk import RECONNECT_OPTIONS, channel_options, grpc_target

    # Blocks travel in messages of up to 4 MiB of data: allow 16 MiB answers.
    return grpc.insecure_channel(grpc_target(), options=(
        *channel_options(), *RECONNECT_OPTIONS, ("grpc.max_receive_message_length", 16 << 20),
        ("grpc.max_send_message_length", 16 << 20)))


def _client(ch: grpc.Channel, token: str | None, user: str | None, *, namespace: str = "",
            device: str | None = None, **kw: Any) -> Any:
    from clients.drive.client import DriveClient

    return DriveClient(ch, _token(token, user), namespace_id=namespace, device=_device(device), **kw)


def _when(ts: Any) -> str:
    if not ts.seconds and not ts.nanos:
        return ""
    return datetime.fromtimestamp(ts.seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


class RichTransfer(Transfer):
    """A rich progress task per transfer, on stderr; the bar goes when the transfer is done."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task: TaskID | None = None

    def start(self, description: str, total: int) -> None:
        self.task = self.progress.add_task(escape(description), total=total)

    def advance(self, n: int) -> None:
        if self.task is not None:
            self.progress.advance(self.task, n)

    def finish(self) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=err, transient=True, disable=not err.is_terminal)


@drive_app.command("ls")
def ls_cmd(
    path: Annotated[str, typer.Argument(help="A folder (or a file), /-rooted or id:<node>.")] = "/",
    ids: Annotated[bool, typer.Option("--ids", help="Show node ids.")] = False,
    namespace: NamespaceOpt = "",
    token: TokenOpt = None,
    user: UserOpt = None,
) -> None:
    """A folder's children: name, size, head revision, last change."""
    with _channel() as ch:
        c = _client(ch, token, user, namespace=namespace)
        try:
            node = c.call("GetNode", _pb().GetNodeRequest(path=path, namespace_id=namespace)).node
            children = [node] if node.kind == 1 else list(c.list_folder(path))
        except grpc.RpcError as e:
            rpc_fail(e)
    t = RichTable(*([id_column("id")] if ids else []), "name", "size", "rev", "modified", "device",
                  title=escape(node.path if node.kind == 2 else node.path.rpartition("/")[0] or "/"),
                  title_justify="left")
    for n in children:
        name = n.name + ("/" if n.kind == 2 else "")
        row = [escape(name), _size(n.head.size_bytes) if n.kind == 1 else "",
               str(n.head.revision) if n.kind == 1 else "", _when(n.modify_time), escape(n.head.device)]
        t.add_row(*([n.node_id] if ids else []), *row)
    console.print(t)


def _pb() -> Any:
    from sysdesign.drive.v1 import drive_pb2

    return drive_pb2


@drive_app.command("put")
def put_cmd(
    local: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="The file to send.")],
    remote: Annotated[str, typer.Argument(help="Where (a path, or a folder ending in /). Default: /NAME.")] = "",
    base: Annotated[int | None, typer.Option(
        help="The revision your copy is based on: a stale one is kept as a conflicted copy. "
             "Default: the head (replace it), 0 for a new file.")] = None,
    device: DeviceOpt = None,
    namespace: NamespaceOpt = "",
    workers: Annotated[int, typer.Option(help="Blocks sent at once.")] = 4,
    limit_rate: Annotated[int, typer.Option(help="At most this many bytes per second (0: no limit).")] = 0,
    token: TokenOpt = None,
    user: UserOpt = None,
) -> None:
    """Upload LOCAL as blocks; only the blocks the server lacks are sent."""
    from clients.drive.blocks import FileChanged

    remote = remote or "/"
    if remote.endswith("/"):
        remote += local.name
    with _channel() as ch:
        c = _client(ch, token, user, namespace=namespace, device=device, workers=workers, limit_rate=limit_rate)
        try:
            if base is None:
                node = c.get_node(remote)
                base = node.head.revision if node is not None and node.kind == 1 else 0
            with _progress() as progress:
                res = c.upload_file(local, remote, base, progress=RichTransfer(progress),
                                    hashing=RichTransfer(progress))
        except grpc.RpcError as e:
            rpc_fail(e, {"base_revision": "--base", "device": "--device", "path": "REMOTE"})
        except FileChanged as e:
            fail(f"{local}: {e}; try again once it is written")
    n = res.node
    if res.conflicted:
        err.print(f"[yellow]conflict:[/] {escape(remote)} changed since revision {base}; "
                  f"your copy is {escape(n.path)}")
    err.print(f"{escape(n.path)}: revision {n.head.revision}, {_size(n.head.size_bytes)}, "
              f"{res.uploaded_blocks} of {len(res.blocks)} blocks sent ({res.uploaded_bytes:,} bytes)",
              highlight=False)
    print(n.path)


@drive_app.command("get")
def get_cmd(
    remote: Annotated[str, typer.Argument(help="A file, /-rooted or id:<node>.")],
    local: Annotated[Path | None, typer.Argument(help="Where to write it (default: ./NAME).")] = None,
    revision: Annotated[int, typer.Option(help="An older revision (see `drive revisions`); 0: the head.")] = 0,
    namespace: NamespaceOpt = "",
    token: TokenOpt = None,
    user: UserOpt = None,
) -> None:
    """Download a file, every block checked, replacing LOCAL in one rename."""
    with _channel() as ch:
        c = _client(ch, token, user, namespace=namespace)
        try:
            node = c.call("GetNode", _pb().GetNodeRequest(path=remote, namespace_id=namespace)).node
            if node.kind != 1:
                fail(f"{remote} is a folder (`drive ls {remote}` lists it)")
            target = local or Path(node.name)
            if target.is_dir():
                target = target / node.name
            with _progress() as progress:
                res = c.download_file(remote, target, node=node, revision=revision,
                                      progress=RichTransfer(progress))
        except grpc.RpcError as e:
            rpc_fail(e, {"revision": "--revision"})
        except FileNotFoundError as e:
            fail(str(e))
    err.print(f"{escape(str(target))}: revision {res.revision.revision}, {_size(res.revision.size_bytes)}",
              highlight=False)
    print(target)


@drive_app.command("mkdir")
def mkdir_cmd(path: str, namespace: NamespaceOpt = "", token: TokenOpt = None, user: UserOpt = None) -> None:
    """Create a folder (and its missing parents)."""
    with _channel() as ch:
        c = _client(ch, token, user, namespace=namespace)
        try:
            node = c.call("CreateFolder", _pb().CreateFolderRequest(path=path, namespace_id=namespace)).folder
        except grpc.RpcError as e:
            rpc_fail(e)
    print(node.path)


@drive_app.command("mv")
def mv_cmd(src: str, dst: Annotated[str, typer.Argument(help="The new path (a folder ending in / keeps the name).")],
           namespace: NamespaceOpt = "", token: TokenOpt = None, user: UserOpt = None) -> None:
    """Move and/or rename a file or folder."""
    with _channel() as ch:
        c = _client(ch, token, user, namespace=namespace)
        try:
            if dst.endswith("/"):
                dst += c.call("GetNode", _pb().GetNodeRequest(path=src, namespace_id=namespace)).node.name
            node = c.call("MoveNode", _pb().MoveNodeRequest(from_path=src, to_path=dst,
                                                            namespace_id=namespace)).node
        except grpc.RpcError as e:
            rpc_fail(e, {"from_path": "SRC", "to_path": "DST"})
    print(node.path)


@drive_app.command("rm")
def rm_cmd(
    path: str,
    permanent: Annotated[bool, typer.Option(
        help="Delete for good (a node already in the trash: `drive trash` lists their ids).")] = False,
    if_revision: Annotated[int, typer.Option(help="Only if the file's head is this revision.")] = 0,
    namespace: NamespaceOpt = "",
    token: TokenOpt = None,
    user: UserOpt = None,
) -> None:
    """Move a file or folder to the trash (or, with --permanent, delete it from the trash)."""
    with _channel() as ch:
        c = _client(ch, token, user, namespace=namespace)
        try:
            node = c.call("DeleteNode", _pb().DeleteNodeRequest(
                path=path, namespace_id=namespace, permanent=permanent, if_revision=if_revision)).node
        except grpc.RpcError as e:
            rpc_fail(e, {"if_revision": "--if-revision", "permanent": "--permanent"})
    if permanent:
        err.print(f"deleted {escape(node.path)} for good")
    else:
        err.print(f"moved {escape(node.path)} to the trash (`sysdesign drive restore id:{node.node_id}` "
                  "brings it back)")
    print(f"id:{node.node_id}")


@drive_app.command("trash")
def trash_cmd(namespace: NamespaceOpt = "", token: TokenOpt = None, user: UserOpt = None) -> None:
    """What is in the trash, most recently deleted first."""
    pb = _pb()
    rows: list[Any] = []
    with _channel() as ch:
        c = _client(ch, token, user, namespace=namespace)
        page = ""
        try:
            while True:
                resp = c.call("ListTrash", pb.ListTrashRequest(namespace_id=namespace, page_size=1000,
                                                               page_token=page))
                rows += resp.nodes
                page = resp.next_page_token
                if not page:
                    break
        except grpc.RpcError as e:
            rpc_fail(e)
    t = RichTable(id_column("id", min_width=22), "was at", "kind", "size", "deleted")
    for n in rows:
        t.add_row(f"id:{n.node_id}", escape(n.path), KIND.get(n.kind, "?"),
                  _size(n.head.size_bytes) if n.kind == 1 else "", _when(n.modify_time))
    console.print(t)


@drive_app.command("restore")
def restore_cmd(
    path: Annotated[str, typer.Argument(help="With --revision: a file. Without: id:<node> of a node in the trash.")],
    revision: Annotated[int, typer.Option(help="Make this old revision the file's head again.")] = 0,
    name: Annotated[str, typer.Option(help="From the trash: restore under this name (the old one is taken).")] = "",
    device: DeviceOpt = None,
    namespace: NamespaceOpt = "",
    token: TokenOpt = None,
    user: UserOpt = None,
) -> None:
    """`restore PATH --revision N`: an old revision back as the head. `restore id:NODE`: out of the trash."""
    pb = _pb()
    with _channel() as ch:
        c = _client(ch, token, user, namespace=namespace, device=device)
        try:
            if revision:
                node = c.call("RestoreRevision", pb.RestoreRevisionRequest(
                    path=path, namespace_id=namespace, revision=revision, device=c.device)).node
                err.print(f"{escape(node.path)}: revision {revision} restored as revision {node.head.revision}")
            else:
                if not path.startswith("id:"):
                    fail(f"{path}: restore from the trash takes id:<node> (`sysdesign drive trash` lists them); "
                         "an old revision of a file takes --revision N")
                node = c.call("RestoreNode", pb.RestoreNodeRequest(path=path, namespace_id=namespace,
                                                                   new_name=name)).node
                err.print(f"restored {escape(node.path)} from the trash")
        except grpc.RpcError as e:
            rpc_fail(e, {"revision": "--revision", "new_name": "--name"})
    print(node.path)


@drive_app.command("revisions")
def revisions_cmd(path: str, namespace: NamespaceOpt = "", token: TokenOpt = None, user: UserOpt = None) -> None:
    """A file's revisions, newest first (`drive restore PATH --revision N` brings one back)."""
    with _channel() as ch:
        c = _client(ch, token, user, namespace=namespace)
        try:
            node = c.call("GetNode", _pb().GetNodeRequest(path=path, namespace_id=namespace)).node
            revs = list(c.revisions(path))
        except grpc.RpcError as e:
            rpc_fail(e)
        names = _usernames(ch, c.md, {r.author_id for r in revs})
    t = RichTable("rev", "size", "blocks", "device", "author", "time", title=escape(node.path),
                  title_justify="left")
    for r in revs:
        head = " (head)" if r.revision == node.head.revision else ""
        t.add_row(f"{r.revision}{head}", _size(r.size_bytes), str(len(r.blocks)), escape(r.device),
                  escape(names.get(r.author_id, r.author_id)), _when(r.create_time))
    console.print(t)


def _usernames(ch: grpc.Channel, md: Any, ids: set[str]) -> dict[str, str]:
    """User ids to usernames (IdentityService.GetUser); an id that cannot be looked up stays as it is."""
    from sysdesign.identity.v1 import identity_pb2 as ipb
    from sysdesign.identity.v1 import identity_pb2_grpc as ipbg

    stub = ipbg.IdentityServiceStub(ch)
    out: dict[str, str] = {}
    for uid in sorted(i for i in ids if i):
        try:
            out[uid] = str(stub.GetUser(ipb.GetUserRequest(user_id=uid), metadata=md, timeout=10).user.username)
        except grpc.RpcError:
            pass
    return out


def _user_id(ch: grpc.Channel, token: str, username: str) -> str:
    from sysdesign.identity.v1 import identity_pb2 as ipb
    from sysdesign.identity.v1 import identity_pb2_grpc as ipbg

    from clients.sdk import bearer

    try:
        return str(ipbg.IdentityServiceStub(ch).GetUser(ipb.GetUserRequest(username=username),
                                                        metadata=bearer(token), timeout=10).user.user_id)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
            fail(f"no user named {username!r}")
        rpc_fail(e, {"username": "USERNAME"})


@drive_app.command("share")
def share_cmd(
    path: Annotated[str, typer.Argument(help="A folder of yours.")],
    username: str,
    role: Annotated[str, typer.Option(help="reader (read-only) or writer (read-write).")] = "reader",
    token: TokenOpt = None,
    user: UserOpt = None,
) -> None:
    """Share a folder with another user (again: change their role)."""
    if role not in ROLES:
        fail(f"--role {role!r}: expected reader or writer", code=2)
    tok = _token(token, user)
    with _channel() as ch:
        grantee = _user_id(ch, tok, username)
        c = _client(ch, tok, None)
        try:
            share = c.call("ShareFolder", _pb().ShareFolderRequest(path=path, grantee_id=grantee,
                                                                  role=ROLES[role])).share
        except grpc.RpcError as e:
            rpc_fail(e, {"role": "--role", "grantee_id": "USERNAME"})
    err.print(f"shared {escape(share.path)} with {escape(username)} as {role}; they reach it with "
              f"--namespace {share.namespace_id} (`sysdesign drive shares`)")
    print(share.namespace_id)


@drive_app.command("unshare")
def unshare_cmd(path: str, username: str, token: TokenOpt = None, user: UserOpt = None) -> None:
    """Take a share back."""
    tok = _token(token, user)
    with _channel() as ch:
        grantee = _user_id(ch, tok, username)
        c = _client(ch, tok, None)
        try:
            c.call("UnshareFolder", _pb().UnshareFolderRequest(path=path, grantee_id=grantee))
        except grpc.RpcError as e:
            rpc_fail(e, {"grantee_id": "USERNAME"})
    err.print(f"{escape(path)} is no longer shared with {escape(username)}")


@drive_app.command("shares")
def shares_cmd(token: TokenOpt = None, user: UserOpt = None) -> None:
    """Folders shared with you (and the --namespace to reach them), and the ones you share."""
    with _channel() as ch:
        c = _client(ch, token, user)
        try:
            resp = c.call("ListShares", _pb().ListSharesRequest())
        except grpc.RpcError as e:
            rpc_fail(e)
    t = RichTable("", "folder", id_column("--namespace"), "owner", "grantee", "role", "since")
    for label, shares in (("with me", resp.shared_with_me), ("by me", resp.shared_by_me)):
        for s in shares:
            t.add_row(label, escape(s.path), s.namespace_id, s.owner_id, s.grantee_id,
                      ROLE_NAMES.get(s.role, "?"), _when(s.create_time))
    console.print(t)


@drive_app.command("settings")
def settings_cmd(
    chunking: Annotated[str, typer.Option(help="Change how new commits are cut: fixed or fastcdc.")] = "",
    token: TokenOpt = None,
    user: UserOpt = None,
) -> None:
    """Your namespace's settings: how files are cut into blocks, revisions kept."""
    pb = _pb()
    with _channel() as ch:
        c = _client(ch, token, user)
        try:
            if chunking:
                kinds = {"fixed": pb.CHUNKING_FIXED, "fastcdc": pb.CHUNKING_FASTCDC}
                if chunking not in kinds:
                    fail(f"--chunking {chunking!r}: expected fixed or fastcdc", code=2)
                s = c.call("UpdateSettings", pb.UpdateSettingsRequest(chunking=kinds[chunking])).settings
            else:
                s = c.settings()
        except grpc.RpcError as e:
            rpc_fail(e, {"chunking": "--chunking"})
    if s.chunking == pb.CHUNKING_FASTCDC:
        cut = (f"FastCDC: {_size(s.cdc_min_bytes)} min, {_size(s.cdc_avg_bytes)} average, "
               f"{_size(s.cdc_max_bytes)} max")
    else:
        cut = f"fixed {_size(s.block_size_bytes)} blocks"
    console.print(f"chunking: {cut}\nrevisions kept per file: {s.keep_revisions}", highlight=False)


@drive_app.command("sync")
def sync_cmd(
    local_dir: Annotated[Path, typer.Argument(file_okay=False, help="The folder to keep in step (created if missing).")],
    device: DeviceOpt = None,
    once: Annotated[bool, typer.Option("--once", help="One full pass, then exit.")] = False,
    stats: Annotated[bool, typer.Option("--stats", help="Print each pass's counts as a JSON line on stdout.")] = False,
    workers: Annotated[int, typer.Option(help="Blocks sent at once.")] = 4,
    limit_rate: Annotated[int, typer.Option(help="At most this many upload bytes per second (0: no limit).")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No line per file.")] = False,
    namespace: Annotated[str, typer.Option(
        "--namespace", help="Sync a folder another user shared with you (its --namespace from `drive shares`) "
                            "instead of your own tree; a read-only share is only received.")] = "",
    token: TokenOpt = None,
    user: UserOpt = None,
) -> None:
    """Two-way sync of LOCAL_DIR with your tree, until Ctrl-C (state in LOCAL_DIR/.sysdesign-sync)."""
    from clients.drive.state import STATE_DIR, State
    from clients.drive.sync import NotShared, Stats, SyncEngine, run, token_subject

    tok = _token(token, user)
    local_dir.mkdir(parents=True, exist_ok=True)
    root = local_dir.resolve()
    state = State(root / STATE_DIR / "state.db")
    sub = token_subject(tok)
    owner = state.meta("user")
    if owner and sub and owner != sub:
        state.close()
        fail(f"{root} is synced with another account (user {owner}); the token is user {sub}'s",
             f"remove {root / STATE_DIR} to sync this folder afresh")
    if sub and not owner:
        state.set_meta("user", sub)
    synced_ns = state.meta("namespace")
    if state.meta("cursor") and synced_ns != namespace:
        state.close()
        fail(f"{root} is synced with namespace {synced_ns or '(your own)'}, not {namespace or '(your own)'}",
             f"remove {root / STATE_DIR} to sync this folder afresh")
    state.set_meta("namespace", namespace)

    def log(message: str) -> None:
        if not quiet:
            err.print(escape(message), highlight=False, soft_wrap=True)

    def on_pass(s: Stats) -> None:
        if stats:
            print(s.json(), flush=True)
        err.print(f"synced: {s.uploaded_files} sent ({s.uploaded_blocks} blocks, {_size(s.uploaded_bytes)}), "
                  f"{s.downloaded_files} received, {s.deleted_local + s.deleted_remote} deleted, "
                  f"{s.moved_local + s.moved_remote} moved, {s.conflicts} conflicts; "
                  f"hashed {s.hashed_files} files", highlight=False, soft_wrap=True)

    with _channel() as ch, _progress() as progress:
        client = _client(ch, tok, None, namespace=namespace, device=device, workers=workers,
                         limit_rate=limit_rate)
        engine = SyncEngine(root, client, state, log=log, transfer=lambda: RichTransfer(progress))
        try:
            run(engine, once=once, log=log, on_pass=on_pass)
        except KeyboardInterrupt:
            progress.stop()
            err.print("sync stopped")
            raise typer.Exit(130) from None
        except NotShared as e:
            progress.stop()
            fail(str(e))
        except grpc.RpcError as e:
            progress.stop()
            rpc_fail(e, {"namespace_id": "--namespace"})
        finally:
            state.close()
            for tmp in root.rglob(".sysdesign-tmp-*"):  # a download cut short
                tmp.unlink(missing_ok=True)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    del bench_app
    app.add_typer(drive_app, name="drive")


