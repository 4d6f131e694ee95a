"""Two-way sync of a local folder with the caller's Drive namespace (`sysdesign drive sync`).

One pass (``SyncEngine.reconcile``) is: pull, push, pull.

- **Pull** reads the change journal from the saved cursor. Its entries are
  hints: for each node named, the client asks for the node as it is now
  (``GetNode id:<node>``) and converges: a file with a newer head is
  downloaded (atomically, blocks it already holds copied locally), a moved
  node is renamed locally, a deleted one removed. A local file changed since
  its last sync is never overwritten or removed: it is pushed with its old
  base, and the server keeps it as a conflicted copy.
- **Push** walks the folder. A file whose (size, mtime_ns, inode) equal its
  state row is not read at all; any other is hashed into blocks, and
  committed when its content changed (sending only the blocks the server
  lacks). A vanished path whose inode (or content) reappears elsewhere is a
  rename (MoveNode); otherwise a delete (DeleteNode to the trash, with the
  revision it had, so a newer remote edit is never trashed unseen). New
  folders are created.
- A conflicted commit renames the local file to the conflicted copy's name
  (the bytes the server now holds under it) and downloads the winner.

``run`` repeats passes: once at start, then whenever the folder changes
(watchdog, debounced; polling when no watcher is available) or the server
announces changes (WatchChanges, reconnecting with backoff).
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc
from sysdesign.drive.v1 import drive_pb2 as pb

from clients.drive.blocks import BlockRef, Chunker, FileChanged, content_hash
from clients.drive.client import (
    TEMP_PREFIX,
    DownloadAborted,
    DriveClient,
    Transfer,
    code_of,
    rehash_file,
    retryable,
)
from clients.drive.state import STATE_DIR, Entry, State

Log = Callable[[str], None]


@dataclass
class Stats:
    hashed_files: int = 0
    hashed_bytes: int = 0
    uploaded_files: int = 0
    uploaded_blocks: int = 0
    uploaded_bytes: int = 0
    downloaded_files: int = 0
    downloaded_blocks: int = 0
    downloaded_bytes: int = 0
    reused_blocks: int = 0
    deleted_local: int = 0
    deleted_remote: int = 0
    moved_local: int = 0
    moved_remote: int = 0
    folders_created: int = 0
    conflicts: int = 0
    skipped: int = 0
    listed_nodes: int = 0
    local_only: int = 0

    def json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


class NotShared(Exception):
    """The namespace asked for holds nothing shared with the caller."""


def ignored(name: str) -> bool:
    """Names the sync never sends: its own state folder and the temporary files it writes."""
    return name == STATE_DIR or name.startswith(TEMP_PREFIX)


def token_subject(token: str) -> str:
    try:
        payload = token.split(".")[1]
        return str(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["sub"])
    except (IndexError, ValueError, KeyError, TypeError):
        return ""


class SyncEngine:
    def __init__(self, root: Path, client: DriveClient, state: State, *, log: Log | None = None,
                 transfer: Callable[[], Transfer] | None = None, hash_bar_bytes: int = 16 << 20) -> None:
        self.root = root
        self.client = client
        self.state = state
        self.log = log or (lambda _m: None)
        self.transfer = transfer or Transfer
        # Files at least this big show a bar while they are hashed.
        self.hash_bar_bytes = hash_bar_bytes
        self.stats = Stats()
        self._chunker: Chunker | None = None
        self.ns = client.namespace_id
        # Through a read-only share local changes are never sent (see ``check_access``).
        self.read_only = False
        self.roots: list[str] = ["/"]

    # -- helpers -----------------------------------------------------------

    @property
    def chunker(self) -> Chunker:
        if self._chunker is None:
            self._chunker = self.client.chunker()
        return self._chunker

    def local(self, rel: str) -> Path:
        return self.root.joinpath(*rel.split("/"))

    @staticmethod
    def remote(rel: str) -> str:
        return "/" + rel

    def _stat(self, rel: str) -> os.stat_result | None:
        try:
            return os.lstat(self.local(rel))
        except FileNotFoundError:
            return None

    def _unchanged(self, e: Entry) -> bool:
        """The file at the entry's path is what was last synced (or is gone)."""
        st = self._stat(e.path)
        return st is None or e.same_stat(st)

    def _record_file(self, rel: str, node: Any, st: os.stat_result, blocks: list[BlockRef] | None = None) -> None:
        if blocks is None:
            blocks, off = [], 0
            for b in node.head.blocks:
                blocks.append(BlockRef(off, b.size_bytes, b.sha256))
                off += b.size_bytes
        self.state.put(Entry(rel, "f", node.node_id, node.head.revision, st.st_size, st.st_mtime_ns, st.st_ino,
                             tuple(blocks), content_hash(blocks)))

    def _record_dir(self, rel: str, node_id: str) -> None:
        st = self._stat(rel)
        self.state.put(Entry(rel, "d", node_id, 0, 0, 0, st.st_ino if st else 0))

    # -- pull --------------------------------------------------------------

    def check_access(self) -> None:
        """For another user's namespace: the folders shared with the caller there, and whether read-only."""
        if not self.ns:
            return
        shares = [s for s in self.client.call("ListShares", pb.ListSharesRequest()).shared_with_me
                  if s.namespace_id == self.ns]
        if not shares:
            raise NotShared(f"namespace {self.ns}: nothing is shared with you there "
                             "(`sysdesign drive shares` lists what is)")
        self.roots = sorted(s.path for s in shares)
        writable = {s.path for s in shares if s.role == pb.ROLE_WRITER}
        was = self.read_only
        self.read_only = not writable
        if self.read_only and not was:
            self.log(f"namespace {self.ns} is shared with you read-only: changes made here stay local "
                     "(they are never sent, and a file changed on the server too is kept as it is here)")

    def journal_tip(self) -> str:
        """A cursor at the journal's end now, read without looking at any node."""
        cursor = ""
        while True:
            resp = self.client.call("ListChanges", pb.ListChangesRequest(
                cursor=cursor, limit=1000, namespace_id=self.ns))
            cursor = resp.cursor or cursor
            if not resp.has_more:
                return cursor

    def initial_listing(self) -> None:
        """First sync: download the tree as it is, then follow the journal from a cursor taken before.

        The cursor is taken first, so a change made while the tree is listed is
        read again from the journal afterwards (``apply_remote`` is idempotent:
        a node already as the server has it is left alone).
        """
        tip = self.journal_tip()
        done: set[str] = set()
        for root in self.roots:
            node = self.client.get_node(root)
            if node is None:
                continue
            self._list_tree(node, done)
        self.state.set_meta("cursor", tip)

    def _list_tree(self, node: Any, done: set[str]) -> None:
        folders = [node] if node.kind == pb.NODE_KIND_FOLDER else []
        if node.kind == pb.NODE_KIND_FILE:
            self.stats.listed_nodes += 1
            self._guarded(node.path, partial(self.apply_remote, node.node_id, done, node))
        while folders:
            f = folders.pop(0)
            if f.node_id not in ("", "0"):
                self.stats.listed_nodes += 1
                self._guarded(f.path, partial(self.apply_remote, f.node_id, done, f))
            for child in self.client.list_folder(f"id:{f.node_id}" if f.node_id not in ("", "0") else "/"):
                if child.trashed:
                    continue
                if child.kind == pb.NODE_KIND_FOLDER:
                    folders.append(child)
                else:
                    self.stats.listed_nodes += 1
                    self._guarded(child.path, partial(self.apply_remote, child.node_id, done, child))

    def pull(self) -> None:
        cursor = self.state.meta("cursor")
        if not cursor:
            self.initial_listing()
            cursor = self.state.meta("cursor")
        while True:
            try:
                resp = self.client.call("ListChanges", pb.ListChangesRequest(cursor=cursor, limit=1000,
                                                                             namespace_id=self.ns))
            except grpc.RpcError as e:
                if code_of(e) != grpc.StatusCode.INVALID_ARGUMENT or not cursor:
                    raise
                # A cursor this server does not know (its data was reset, or another
                # server): read the journal from the start; every entry is only a hint.
                self.log("the saved change cursor was refused; reading the whole change journal again")
                cursor = ""
                continue
            folders: dict[str, None] = {}
            files: dict[str, None] = {}
            for c in resp.changes:
                if c.node_id and c.node_id != "0":
                    (folders if c.node_kind == pb.NODE_KIND_FOLDER else files)[c.node_id] = None
            done: set[str] = set()
            for nid in [*folders, *files]:  # folders first: their moves carry the files inside
                self._guarded(f"id:{nid}", partial(self.apply_remote, nid, done))
            cursor = resp.cursor or cursor
            self.state.set_meta("cursor", cursor)
            if not resp.has_more:
                return

    def _guarded(self, what: str, fn: Callable[[], None]) -> None:
        """Run one item's sync; an error that is about that item only is logged and skipped."""
        try:
            fn()
        except grpc.RpcError as e:
            if retryable(e) or code_of(e) in (grpc.StatusCode.UNAUTHENTICATED,):
                raise
            self.stats.skipped += 1
            self.log(f"skipped {what}: {code_of(e).name}: {e.details()}")  # type: ignore[attr-defined, union-attr]
        except (FileChanged, DownloadAborted):
            self.stats.skipped += 1
            self.log(f"skipped {what}: it changed while being synced (next pass)")
        except OSError as e:
            self.stats.skipped += 1
            self.log(f"skipped {what}: {e.strerror or e}")

    def apply_remote(self, nid: str, done: set[str] | None = None, node: Any = None) -> None:
        """Converge the local copy of node ``nid`` on what the server says it is now (or ``node``, just read)."""
        done = set() if done is None else done
        if nid in done:
            return
        done.add(nid)
        if node is None:
            node = self.client.get_node(f"id:{nid}")
        entry = self.state.by_node(nid)
        if node is None or node.trashed:
            if entry:
                self._remove_local(entry)
            return
        rel = node.path.lstrip("/")
        if not rel:
            return
        # The parent first, when it moved too (its move carries this node along).
        parent = self.state.by_node(node.parent_id) if node.parent_id not in ("", "0") else None
        if parent and parent.path != rel.rpartition("/")[0]:
            self.apply_remote(node.parent_id, done)
            entry = self.state.by_node(nid)
        if entry and entry.path != rel:
            if not self._move_local(entry, rel):
                return
            entry = self.state.by_node(nid)
        if node.kind == pb.NODE_KIND_FOLDER:
            path = self.local(rel)
            if path.is_dir():
                self._record_dir(rel, nid)
            elif not path.exists():
                path.mkdir(parents=True, exist_ok=True)
                self._record_dir(rel, nid)
            else:
                self.log(f"kept {rel}: a local file where the server has a folder")
            return
        self._apply_file(node, rel, entry, done)

    def _apply_file(self, node: Any, rel: str, entry: Entry | None, done: set[str]) -> None:
        if entry is not None and entry.revision == node.head.revision:
            return
        path = self.local(rel)
        st = self._stat(rel)
        if entry is None:
            other = self.state.get(rel)
            if other is not None and other.node_id != node.node_id:
                # The path belonged to another node: settle that one first.
                self.apply_remote(other.node_id, done)
                if self.state.get(rel) is not None:
                    return
                st = self._stat(rel)
            if st is not None:
                if not os.path.isfile(path) or os.path.islink(path):
                    self.log(f"kept {rel}: not a regular file here, a file on the server")
                    return
                # An untracked local file where the server has one: the same bytes
                # are adopted; different ones are pushed (and kept as a conflicted copy).
                blocks = self._hash(rel)
                if blocks is not None and content_hash(blocks) == node.head.content_hash:
                    self._record_file(rel, node, st, blocks)
                return
        elif st is not None and not entry.same_stat(st):
            return  # changed here since the last sync: push commits it against its base
        self._download(node, rel, entry)

    def _download(self, node: Any, rel: str, entry: Entry | None) -> None:
        path = self.local(rel)
        before = self._stat(rel)
        have: dict[str, tuple[Path, int]] = {}
        if entry is not None and before is not None:
            have = {b.sha256: (path, b.offset) for b in entry.blocks}

        def still_ours() -> bool:
            now = self._stat(rel)
            if before is None:
                return now is None
            return now is not None and (now.st_size, now.st_mtime_ns, now.st_ino) == (
                before.st_size, before.st_mtime_ns, before.st_ino)

        res = self.client.download_file(self.remote(rel), path, node=node, progress=self.transfer(), have=have,
                                        before_replace=still_ours)
        st = os.lstat(path)
        self._record_file(rel, node, st)
        self.stats.downloaded_files += 1
        self.stats.downloaded_blocks += res.downloaded_blocks
        self.stats.downloaded_bytes += res.downloaded_bytes
        self.stats.reused_blocks += res.reused_blocks
        self.log(f"↓ {rel} (revision {node.head.revision})")

    def _remove_local(self, entry: Entry) -> None:
        if not entry.is_dir:
            path = self.local(entry.path)
            st = self._stat(entry.path)
            if st is not None and entry.same_stat(st):
                path.unlink()
                self.stats.deleted_local += 1
                self.log(f"✗ {entry.path}")
            elif st is not None:
                self.log(f"kept {entry.path}: deleted on the server, changed here (it will be sent again)")
            self.state.delete(entry.path)
            return
        for e in reversed(self.state.below(entry.path)):
            self._remove_local(e)
        path = self.local(entry.path)
        for d in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) \
                if path.is_dir() else []:
            if not any(d.iterdir()):
                d.rmdir()
        try:
            path.rmdir()
            self.stats.deleted_local += 1
            self.log(f"✗ {entry.path}/")
        except FileNotFoundError:
            pass
        except OSError:
            self.log(f"kept {entry.path}/: deleted on the server, holds files changed here")
        self.state.delete_tree(entry.path)

    def _move_local(self, entry: Entry, rel: str) -> bool:
        src, dst = self.local(entry.path), self.local(rel)
        if not os.path.lexists(src):
            self.state.move_tree(entry.path, rel)
            return True
        if os.path.lexists(dst):
            self.log(f"kept {entry.path}: moved on the server to {rel}, which exists here")
            self.state.delete_tree(entry.path)  # both are sent as they are
            return False
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.rename(src, dst)
        self.state.move_tree(entry.path, rel)
        self.stats.moved_local += 1
        self.log(f"→ {entry.path} → {rel}")
        return True

    # -- push --------------------------------------------------------------

    def _walk(self) -> tuple[dict[str, os.stat_result], dict[str, os.stat_result]]:
        dirs: dict[str, os.stat_result] = {}
        files: dict[str, os.stat_result] = {}

        def visit(path: Path, rel: str) -> None:
            try:
                it = list(os.scandir(path))
            except OSError:
                return
            for d in sorted(it, key=lambda d: d.name):
                if ignored(d.name):
                    continue
                r = f"{rel}/{d.name}" if rel else d.name
                try:
                    st = d.stat(follow_symlinks=False)
                except OSError:
                    continue
                if d.is_dir(follow_symlinks=False):
                    dirs[r] = st
                    visit(Path(d.path), r)
                elif d.is_file(follow_symlinks=False):
                    files[r] = st
        visit(self.root, "")
        return dirs, files

    def _hash(self, rel: str) -> list[BlockRef] | None:
        try:
            size = os.path.getsize(self.local(rel))
            progress = self.transfer() if size >= self.hash_bar_bytes else None
            known, known_quick = self.state.quick_of(rel)
            blocks, quick = rehash_file(self.local(rel), self.chunker, known, known_quick, progress, f"# {rel}")
        except FileNotFoundError:
            return None
        self.state.set_quick(rel, blocks, quick)
        self.stats.hashed_files += 1
        self.stats.hashed_bytes += sum(b.size for b in blocks)
        return blocks

    def push(self) -> None:
        dirs, files = self._walk()
        entries = self.state.all()
        known = {e.path for e in entries}
        # Folders that vanished, and new ones: a new folder with a vanished one's inode is a rename.
        gone_dirs = [e for e in entries if e.is_dir and e.path not in dirs]
        by_inode = {st.st_ino: r for r, st in dirs.items() if r not in known}
        for e in sorted(gone_dirs, key=lambda e: e.path.count("/")):
            cur = self.state.get(e.path)
            if cur is None or cur.node_id != e.node_id:
                continue  # carried along by its parent's move
            new = by_inode.get(e.inode) if e.inode else None
            if new is not None and new in dirs and self.state.get(new) is None:
                self._guarded(e.path, partial(self._move_remote, e, new))
        for e in sorted(self.state.all(), key=lambda e: e.path.count("/")):
            if e.is_dir and e.path not in dirs and self.state.get(e.path) is not None:
                self._guarded(e.path, partial(self._delete_remote, e))
        # Files that vanished: a new file with the inode (and stat) or content of one is its move.
        entries = self.state.all()
        known = {e.path for e in entries}
        gone = {e.path: e for e in entries if not e.is_dir and e.path not in files}
        fresh = [r for r in files if r not in known]
        inode_of = {(e.inode, e.size, e.mtime_ns): e for e in gone.values()}
        pending_hash: dict[str, list[BlockRef]] = {}
        for r in fresh:
            st = files[r]
            moved = inode_of.get((st.st_ino, st.st_size, st.st_mtime_ns))
            if moved is not None and moved.path in gone:
                del gone[moved.path]
                self._guarded(r, partial(self._move_remote, moved, r))
        if gone:
            by_hash = {e.content_hash: e for e in gone.values()}
            for r in fresh:
                if self.state.get(r) is not None:
                    continue
                blocks = self._hash(r)
                if blocks is None:
                    continue
                pending_hash[r] = blocks
                same = by_hash.pop(content_hash(blocks), None)
                if same is not None and same.path in gone:
                    del gone[same.path]
                    self._guarded(r, partial(self._move_remote, same, r))
        for e in gone.values():
            self._guarded(e.path, partial(self._delete_remote, e))
        for r in sorted(dirs):
            if self.state.get(r) is None:
                self._guarded(r, partial(self._create_remote_dir, r))
        for r, st in files.items():
            self._guarded(r, partial(self._push_file, r, st, pending_hash.get(r)))

    def _move_remote(self, e: Entry, new: str) -> None:
        try:
            node = self.client.call("MoveNode", pb.MoveNodeRequest(from_path=f"id:{e.node_id}",
                                                                    to_path=self.remote(new),
                                                                    namespace_id=self.ns)).node
        except grpc.RpcError as err:
            if code_of(err) in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS):
                # Gone on the server, or the name is taken there: send it as a new file.
                self.log(f"sending {new} anew: {err.details()}")  # type: ignore[attr-defined]
                self.state.delete_tree(e.path)
                return
            raise
        self.state.move_tree(e.path, node.path.lstrip("/"))
        self.stats.moved_remote += 1
        self.log(f"⇢ {e.path} → {new}")

    def _delete_remote(self, e: Entry) -> None:
        if self.state.get(e.path) is None:
            return
        try:
            self.client.call("DeleteNode", pb.DeleteNodeRequest(
                path=f"id:{e.node_id}", if_revision=0 if e.is_dir else e.revision, namespace_id=self.ns))
        except grpc.RpcError as err:
            if code_of(err) == grpc.StatusCode.FAILED_PRECONDITION:
                # Changed on the server since this copy was synced: that edit wins, bring it back.
                self.state.delete_tree(e.path)
                self.apply_remote(e.node_id)
                return
            if code_of(err) != grpc.StatusCode.NOT_FOUND:
                raise
        self.state.delete_tree(e.path)
        self.stats.deleted_remote += 1
        self.log(f"⇡✗ {e.path}{'/' if e.is_dir else ''}")

    def _create_remote_dir(self, rel: str) -> None:
        try:
            node = self.client.call("CreateFolder", pb.CreateFolderRequest(path=self.remote(rel),
                                                                                namespace_id=self.ns)).folder
        except grpc.RpcError as err:
            if code_of(err) != grpc.StatusCode.ALREADY_EXISTS:
                raise
            node = self.client.get_node(self.remote(rel))
            if node is None or node.kind != pb.NODE_KIND_FOLDER:
                self.log(f"kept {rel}/: the server has a file there")
                return
        else:
            self.stats.folders_created += 1
        self._record_dir(rel, node.node_id)

    def _push_file(self, rel: str, st: os.stat_result, blocks: list[BlockRef] | None) -> None:
        e = self.state.get(rel)
        if e is not None and e.same_stat(st):
            return
        if blocks is None:
            blocks = self._hash(rel)
            if blocks is None:
                return
        chash = content_hash(blocks)
        if e is not None and not e.is_dir and e.content_hash == chash:
            self.state.put(Entry(rel, "f", e.node_id, e.revision, st.st_size, st.st_mtime_ns, st.st_ino,
                                 tuple(blocks), chash))
            return
        base = e.revision if e is not None and not e.is_dir else 0
        res = self.client.upload_file(self.local(rel), self.remote(rel), base, blocks=blocks,
                                      chunker=self.chunker, progress=self.transfer())
        self.stats.uploaded_blocks += res.uploaded_blocks
        self.stats.uploaded_bytes += res.uploaded_bytes
        if not res.conflicted:
            self.stats.uploaded_files += 1
            self._record_file(rel, res.node, st, blocks)
            self.log(f"↑ {rel} (revision {res.node.head.revision}, {res.uploaded_blocks} of "
                     f"{len(blocks)} blocks sent)")
            return
        self.stats.conflicts += 1
        copy = res.node.path.lstrip("/")
        self.log(f"⚠ {rel}: changed on the server too; this copy is kept as {copy}")
        now = self._stat(rel)
        if now is not None and (now.st_size, now.st_mtime_ns, now.st_ino) == (st.st_size, st.st_mtime_ns,
                                                                                st.st_ino) \
                and not os.path.lexists(self.local(copy)):
            self.local(copy).parent.mkdir(parents=True, exist_ok=True)
            os.rename(self.local(rel), self.local(copy))
            self._record_file(copy, res.node, st, blocks)
        self.state.delete(rel)
        if res.conflict_with is not None:
            self.apply_remote(res.conflict_with.node_id)

    # -- a whole pass ------------------------------------------------------

    def local_changes(self) -> list[str]:
        """Paths that differ from what was last synced (new, changed, or removed here)."""
        dirs, files = self._walk()
        out = [r for r, st in files.items() if (e := self.state.get(r)) is None or not e.same_stat(st)]
        out += [r for r in dirs if self.state.get(r) is None]
        out += [e.path for e in self.state.all() if e.path not in files and e.path not in dirs]
        return sorted(out)

    def reconcile(self) -> Stats:
        self.check_access()
        self.pull()
        if self.read_only:
            changed = self.local_changes()
            self.stats.local_only = len(changed)
            if changed:
                more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
                self.log(f"read-only share: not sent: {', '.join(changed[:5])}{more}")
            return self.stats
        self.push()
        self.pull()
        return self.stats


# -- the long-running client ---------------------------------------------------


class RemoteWatch(threading.Thread):
    """Follows WatchChanges and sets ``event`` when the server announces changes; reconnects with backoff."""

    def __init__(self, client: DriveClient, cursor: str, event: threading.Event, log: Log) -> None:
        super().__init__(daemon=True, name="drive-watch")
        self.client = client
        self.cursor = cursor
        self.event = event
        self.log = log
        self.stopping = threading.Event()
        self._call: Any = None

    def run(self) -> None:
        failures = 0
        while not self.stopping.is_set():
            try:
                self._call = self.client.stub.WatchChanges(pb.WatchChangesRequest(
                    cursor=self.cursor, namespace_id=self.client.namespace_id),
                                                           metadata=self.client.md, timeout=24 * 3600)
                for resp in self._call:
                    failures = 0
                    self.cursor = resp.cursor or self.cursor
                    if resp.changes:
                        self.event.set()
            except grpc.RpcError as e:
                if self.stopping.is_set():
                    return
                if code_of(e) == grpc.StatusCode.UNAUTHENTICATED:
                    self.log(f"watch stopped: {e.details()}")  # type: ignore[attr-defined]
                    return
                failures += 1
                wait = min(0.5 * 2 ** min(failures, 6), 30.0)
                if failures == 1 or failures % 10 == 0:
                    self.log(f"lost the server's change stream ({code_of(e).name if code_of(e) else e}); "  # type: ignore[union-attr]
                             f"reconnecting")
                self.event.set()  # a pass once it is back catches up on what was missed
                self.stopping.wait(wait)

    def stop(self) -> None:
        self.stopping.set()
        if self._call is not None:
            self._call.cancel()


def _local_watch(root: Path, event: threading.Event, touched: list[float]) -> Any:
    """A watchdog observer setting ``event`` on any change outside the ignored names; None without one."""
    try:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer
    except ImportError:
        return None

    class Handler(FileSystemEventHandler):
        def on_any_event(self, ev: FileSystemEvent) -> None:
            paths = [str(ev.src_path), str(getattr(ev, "dest_path", "") or "")]
            if ev.event_type in ("opened", "closed_no_write"):
                return
            for p in paths:
                if p and not any(ignored(part) for part in Path(p).relative_to(root).parts):
                    touched[0] = time.monotonic()
                    event.set()
                    return

    obs = Observer()
    try:
        obs.schedule(Handler(), str(root), recursive=True)
        obs.start()
    except OSError:
        return None
    return obs


def run(engine: SyncEngine, *, once: bool, log: Log, on_pass: Callable[[Stats], None] | None = None,
        debounce: float = 0.5, poll: float = 2.0) -> int:
    """Sync until interrupted (or one pass with ``once``); retry an unreachable server with backoff."""
    def attempt() -> None:
        failures = 0
        while True:
            try:
                engine.reconcile()
                return
            except grpc.RpcError as e:
                if not retryable(e):
                    raise
                failures += 1
                if once and failures > 6:
                    raise
                wait = min(0.5 * 2 ** failures, 30.0)
                log(f"server unavailable ({code_of(e).name}); retrying in {wait:.0f}s")  # type: ignore[union-attr]
                time.sleep(wait)

    attempt()
    if on_pass:
        on_pass(engine.stats)
    if once:
        return 0
    event = threading.Event()
    touched = [0.0]
    observer = _local_watch(engine.root, event, touched)
    watch = RemoteWatch(engine.client, engine.state.meta("cursor"), event, log)
    watch.start()
    log(f"watching {engine.root} ({'file events' if observer else f'polling every {poll:g}s'}); Ctrl-C stops")
    try:
        while True:
            event.wait(timeout=30.0 if observer else poll)
            event.clear()
            # Debounce: let a burst of writes settle (at most 5 s) before reading the files.
            started = time.monotonic()
            while time.monotonic() - touched[0] < debounce and time.monotonic() - started < 5:
                time.sleep(debounce / 2)
            engine.stats = Stats()
            attempt()
            if on_pass and any(v for k, v in asdict(engine.stats).items() if k not in ("hashed_files",
                                                                                        "hashed_bytes")):
                on_pass(engine.stats)
    finally:
        watch.stop()
        if observer is not None:
            observer.stop()
            observer.join(timeout=5)


def iter_tree(root: Path) -> Iterator[Path]:
    """The files a sync of ``root`` covers (for tests and `drive sync --dry-run` style listings)."""
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(ignored(part) for part in rel.parts) or not p.is_file():
            continue
        yield p
