"""Drive's domain logic: the namespace tree, block commits, revisions, trash, shares, the journal.

How a commit works (``commit``), the Dropbox way:

1. The client names the file's blocks (SHA-256 and size, in order) and the
   revision its copy is based on.
2. Blocks the namespace does not hold (``ContentStore.referenced`` under
   ``drive/<ns>/``: a commit's reference or an upload's lease) come back as
   ``missing_blocks`` and nothing is written. Only this namespace's blocks
   count: another user's copy of the same bytes is never revealed.
3. Otherwise: the change is journalled, an intent is written (so a crash
   before the revision row exists gives the references back), the blocks are
   referenced by the new revision, and the revision is written ``IF NOT
   EXISTS`` at head+1. Of two commits on one base exactly one wins that row;
   the other, and any commit on a stale base, becomes a conflicted copy next
   to the file. Nothing is overwritten, no bytes are lost.

The journal is written before the state it describes, so a watcher may hear
of a change that then failed; every change names its node, and a client
looks at the node's current state. A watcher never misses a change that
happened: readers stay ``SETTLE_MS`` behind the clock, so a change written
by a slower process still lands ahead of every cursor, and an entry whose
write took more than half of that is written again under a new id (a
watcher may hear of a change twice).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog

from servers.drive import names
from servers.drive.names import ROOT_ID, BadPath, Path
from servers.drive.tables import (
    CHILDREN,
    GRANTS,
    INTENT_BUCKET_MS,
    INTENT_CURSOR,
    INTENTS,
    JOURNAL,
    JOURNAL_BUCKET_MS,
    NAMESPACES,
    NODES,
    REVISIONS,
    SHARES_IN,
    SHARES_OUT,
    TRASH,
)
from servers.platform.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from servers.platform.ids import bucket_of, id_for_time, id_timestamp_ms
from servers.platform.runtime import Runtime
from servers.storage.cas import BlockMismatch, ContentStore, MissingBlocks
from servers.storage.table import ClusteringRange, InvalidPageToken, Row

log = structlog.get_logger("sysdesign.drive")

FILE, FOLDER = 1, 2  # NodeKind
FIXED, FASTCDC = 1, 2  # Chunking
READER, WRITER = 1, 2  # Role
CREATED, MODIFIED, MOVED, DELETED, RESTORED, CONFLICTED_COPY = 1, 2, 3, 4, 5, 6  # ChangeKind

CDC_MIN, CDC_AVG, CDC_MAX = 512 << 10, 2 << 20, 8 << 20
PIECE = 2 << 20  # bytes per DownloadBlocks message
MAX_BLOCK = CDC_MAX
SETTLE_MS = 1500
MAX_EMPTY_BUCKETS = 24 * 31  # hours a ListChanges call walks before answering has_more


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


@dataclass(frozen=True)
class DriveSettings:
    block_bytes: int = field(default_factory=lambda: _env_int("SYSDESIGN_DRIVE_BLOCK_BYTES", 4 << 20))
    keep_revisions: int = field(default_factory=lambda: _env_int("SYSDESIGN_DRIVE_KEEP_REVISIONS", 20))
    chunking: int = field(default_factory=lambda: (
        FASTCDC if os.environ.get("SYSDESIGN_DRIVE_CHUNKING", "").strip().lower() == "fastcdc" else FIXED))
    # How long an uploaded block waits for its commit, and an unreferenced one
    # for collection.
    grace_s: int = field(default_factory=lambda: _env_int("SYSDESIGN_DRIVE_GRACE_SECONDS", 86_400))
    gc_bucket_s: int = field(default_factory=lambda: _env_int("SYSDESIGN_DRIVE_GC_BUCKET_SECONDS", 600))
    sweep_every_s: float = field(default_factory=lambda: float(_env_int("SYSDESIGN_DRIVE_SWEEP_SECONDS", 60)))
    intent_bucket_ms: int = field(default_factory=lambda: _env_int("SYSDESIGN_DRIVE_INTENT_BUCKET_MS",
                                                                   INTENT_BUCKET_MS))

    def __post_init__(self) -> None:
        if not 64 << 10 <= self.block_bytes <= MAX_BLOCK:
            raise ValueError("SYSDESIGN_DRIVE_BLOCK_BYTES is 64 KiB to 8 MiB")
        if self.keep_revisions < 1:
            raise ValueError("SYSDESIGN_DRIVE_KEEP_REVISIONS is at least 1")


@dataclass(frozen=True)
class BlockRef:
    sha256: str
    size: int


def encode_blocks(blocks: Sequence[BlockRef]) -> str:
    return ",".join(f"{b.sha256}:{b.size}" for b in blocks)


def decode_blocks(raw: str | None) -> list[BlockRef]:
    if not raw:
        return []
    out = []
    for item in raw.split(","):
        d, _, n = item.partition(":")
        out.append(BlockRef(d, int(n)))
    return out


def content_hash(blocks: Sequence[BlockRef]) -> str:
    return hashlib.sha256("".join(b.sha256 for b in blocks).encode()).hexdigest()


@dataclass(frozen=True)
class Lineage:
    """A node's row and its ancestors' up to (not including) the root: where the node is."""

    rows: list[Row]

    @property
    def path(self) -> str:
        return "/" + "/".join(str(r["name"]) for r in reversed(self.rows))

    @property
    def trashed(self) -> bool:
        """The node or a folder above it is in the trash."""
        return any(int(r["trash_id"] or 0) for r in self.rows)


@dataclass
class Access:
    """Who is calling into which namespace, and where a share lets them in."""

    caller: int
    ns: int
    own: bool
    grants: dict[int, int] = field(default_factory=dict)  # folder id -> role


@dataclass
class Located:
    row: Row  # the node's row (a synthetic one for the root)
    path: str
    trashed: bool
    role: int  # READER or WRITER for this caller

    @property
    def node_id(self) -> int:
        return int(self.row["node_id"])

    @property
    def kind(self) -> int:
        return int(self.row["kind"])


@dataclass
class NodeView:
    ns: int
    row: Row
    path: str
    trashed: bool
    head: Row | None


@dataclass
class CommitResult:
    missing: list[str] = field(default_factory=list)
    node: NodeView | None = None
    conflicted: bool = False
    conflict_with: NodeView | None = None
    unchanged: bool = False  # the content was the head's already: nothing written


def _root_row(ns: int) -> Row:
    return {"ns": ns, "node_id": ROOT_ID, "parent_id": ROOT_ID, "name": "", "kind": FOLDER,
            "create_ms": 0, "modify_ms": 0, "trash_id": 0}


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _day(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d")


def _not_found(raw: str) -> NotFound:
    return NotFound(f"no such file or folder: {raw}", reason="NODE_NOT_FOUND")


def _bad(field_name: str, exc: BadPath | str) -> InvalidArgument:
    return InvalidArgument([(field_name, str(exc))])


def ref_owner(ns: int, node_id: int, rev: int, attempt: int) -> str:
    return f"drive/{ns}/{node_id}@{rev}#{attempt}"


def lease_owner(ns: int) -> str:
    return f"drive/{ns}/lease"


def ns_prefix(ns: int) -> str:
    return f"drive/{ns}/"


class DriveCore:
    def __init__(self, rt: Runtime, settings: DriveSettings | None = None) -> None:
        self.rt = rt
        self.t = rt.tables
        self.settings = settings or DriveSettings()
        self.cas = ContentStore(rt.blobs, rt.tables, grace_s=self.settings.grace_s,
                                bucket_s=self.settings.gc_bucket_s, max_block_bytes=MAX_BLOCK)
        self._known_ns: set[int] = set()
        self.closing = asyncio.Event()

    @classmethod
    def for_runtime(cls, rt: Runtime) -> DriveCore:
        return rt.singleton("drive_core", lambda: cls(rt))

    # -- access --------------------------------------------------------------

    async def access(self, caller: int, namespace_id: str) -> Access:
        ns = int(namespace_id) if namespace_id else caller
        if ns == caller:
            return Access(caller, ns, own=True)
        page = await self.t.slice(GRANTS, {"ns": ns, "grantee": caller}, limit=1000)
        if not page.rows:
            raise NotFound(f"no such namespace: {namespace_id}", reason="NAMESPACE_NOT_FOUND")
        return Access(caller, ns, own=False, grants={int(r["folder_id"]): int(r["role"]) for r in page.rows})

    async def _lineage(self, ns: int, node_id: int) -> Lineage | None:
        """Where the node is (no rows for the root); None when the chain of parents is broken."""
        out: list[Row] = []
        current = node_id
        for _ in range(4 * names.MAX_DEPTH):
            if current == ROOT_ID:
                return Lineage(out)
            row = await self.t.get(NODES, {"ns": ns, "node_id": current})
            if row is None:
                return None
            out.append(row)
            current = int(row["parent_id"])
        return None

    def _role(self, acc: Access, ids: Sequence[int]) -> int:
        if acc.own:
            return WRITER
        return max((acc.grants.get(i, 0) for i in ids), default=0)

    async def locate(self, acc: Access, raw: str, *, field_name: str = "path") -> Located:
        """The node a path names, as this caller sees it; NOT_FOUND when it cannot see it."""
        try:
            p = names.parse(raw)
        except BadPath as exc:
            raise _bad(field_name, exc) from None
        if p.node_id is not None:
            lineage = await self._lineage(acc.ns, p.node_id)
            if lineage is None or not lineage.rows:
                raise _not_found(raw)
            role = self._role(acc, [int(r["node_id"]) for r in lineage.rows])
            if not role:
                raise _not_found(raw)
            return Located(lineage.rows[0], lineage.path, lineage.trashed, role)
        return await self._walk(acc, p, raw)

    async def _walk(self, acc: Access, p: Path, raw: str) -> Located:
        row = _root_row(acc.ns)
        role = self._role(acc, [ROOT_ID])
        for part in p.parts:
            if int(row["kind"]) != FOLDER:
                raise _not_found(raw)
            child = await self._child(acc.ns, int(row["node_id"]), part)
            if child is None:
                raise _not_found(raw)
            row = child
            role = max(role, self._role(acc, [int(row["node_id"])]))
        if not role:
            raise _not_found(raw)
        return Located(row, str(p), False, role)

    async def _child(self, ns: int, parent_id: int, name: str) -> Row | None:
        """The live node named ``name`` in a folder (entries left by an interrupted move are skipped)."""
        entry = await self.t.get(CHILDREN, {"ns": ns, "parent_id": parent_id, "key": names.name_key(name)})
        if entry is None:
            return None
        row = await self.t.get(NODES, {"ns": ns, "node_id": int(entry["node_id"])})
        if row is None or int(row["parent_id"]) != parent_id or int(row["trash_id"] or 0):
            return None
        return row

    @staticmethod
    def _clash(raw: str, existing: str) -> FailedPrecondition:
        return FailedPrecondition(
            f"{raw} differs only by case or Unicode normalisation from {existing!r}, which exists",
            reason="NAME_CLASH", subject=raw)

    @staticmethod
    def _need_writer(loc: Located) -> None:
        if loc.role < WRITER:
            raise PermissionDenied("this folder is shared with you read-only", reason="READ_ONLY_SHARE")

    async def view(self, ns: int, loc: Located) -> NodeView:
        head = await self.head(ns, loc.node_id) if loc.kind == FILE else None
        return NodeView(ns, loc.row, loc.path, loc.trashed, head)

    async def head(self, ns: int, node_id: int) -> Row | None:
        page = await self.t.slice(REVISIONS, {"ns": ns, "node_id": node_id}, limit=1)
        return page.rows[0] if page.rows else None

    # -- the journal ---------------------------------------------------------

    async def _ensure_namespace(self, ns: int) -> Row:
        row = await self.t.get(NAMESPACES, {"ns": ns})
        if row is None:
            now = _now_ms()
            await self.t.put(NAMESPACES, {"ns": ns, "chunking": self.settings.chunking, "create_ms": now,
                                          "first_bucket": now // JOURNAL_BUCKET_MS}, if_not_exists=True)
            row = await self.t.get(NAMESPACES, {"ns": ns})
            assert row is not None
        self._known_ns.add(ns)
        return row

    async def journal(self, ns: int, kind: int, node_id: int, node_kind: int, path: str, *,
                      from_path: str = "", rev: int = 0, device: str = "", conflict_with: str = "") -> int:
        if ns not in self._known_ns:
            await self._ensure_namespace(ns)
        # Readers stay SETTLE_MS behind the clock; an entry whose write took longer than
        # that may land behind a cursor that has passed its id, so it is written again
        # under a new id (a watcher may hear of a change twice, never miss it).
        for _ in range(5):
            change_id = self.rt.snowflake.next_id()
            await self.t.put(JOURNAL, {
                "ns": ns, "bucket": bucket_of(change_id, JOURNAL_BUCKET_MS), "change_id": change_id,
                "kind": kind, "node_id": node_id, "node_kind": node_kind, "path": path,
                "from_path": from_path, "rev": rev, "device": device, "conflict_with": conflict_with,
            })
            took_ms = _now_ms() - id_timestamp_ms(change_id)
            if took_ms < SETTLE_MS // 2:
                break
            log.warning("journal_write_slow", ns=ns, change_id=change_id, took_ms=took_ms)
        return change_id

    @staticmethod
    def _encode_cursor(bucket: int, last: int) -> str:
        return base64.urlsafe_b64encode(f"j1.{bucket}.{last}".encode()).decode().rstrip("=")

    @staticmethod
    def _decode_cursor(cursor: str) -> tuple[int, int]:
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
            tag, b, last = raw.split(".")
            if tag != "j1":
                raise ValueError(tag)
            return int(b), int(last)
        except Exception:
            raise _bad("cursor", "is not a cursor this journal returned") from None

    async def list_changes(self, acc: Access, cursor: str, limit: int) -> tuple[list[Row], str, bool]:
        limit = limit or 500
        settle_id = id_for_time(_now_ms() - SETTLE_MS)
        last_bucket = bucket_of(settle_id, JOURNAL_BUCKET_MS) if settle_id else 0
        if cursor:
            bucket, last = self._decode_cursor(cursor)
        else:
            nsrow = await self.t.get(NAMESPACES, {"ns": acc.ns})
            bucket, last = (int(nsrow["first_bucket"]) if nsrow else last_bucket), 0
        out: list[Row] = []
        walked = 0
        has_more = False
        while bucket <= last_bucket:
            want = limit - len(out)
            page = await self.t.slice(JOURNAL, {"ns": acc.ns, "bucket": bucket}, limit=want,
                                      bounds=ClusteringRange(gt=(last,), lt=(settle_id,)))
            out += page.rows
            if page.rows:
                last = int(page.rows[-1]["change_id"])
            if len(page.rows) == want:
                has_more = True
                break
            if bucket == last_bucket:
                break
            bucket, last = bucket + 1, 0
            walked += 1
            if walked >= MAX_EMPTY_BUCKETS:
                has_more = True
                break
        if not acc.own:
            out = await self._visible_changes(acc, out)
        return out, self._encode_cursor(bucket, last), has_more

    async def _visible_changes(self, acc: Access, rows: list[Row]) -> list[Row]:
        """A sharee sees the changes inside the folders shared with them."""
        roots = []
        for folder_id in acc.grants:
            path = await self._folder_path(acc.ns, folder_id)
            if path is not None:
                roots.append(path)

        def inside(p: str) -> bool:
            return bool(p) and any(p == r or p.startswith(r + "/") for r in roots)

        return [r for r in rows if inside(r["path"]) or inside(r["from_path"] or "")]

    async def watch(self, acc: Access, cursor: str) -> AsyncIterator[tuple[list[Row], str]]:
        """Batches of changes as they settle; an empty batch every 15 s as a heartbeat."""
        quiet_since = time.monotonic()
        first = True
        while not self.closing.is_set():
            rows, cursor, more = await self.list_changes(acc, cursor, 500)
            if rows or first or time.monotonic() - quiet_since >= 15:
                yield rows, cursor
                quiet_since = time.monotonic()
                first = False
            if more:
                continue
            try:
                await asyncio.wait_for(self.closing.wait(), timeout=0.5)
            except TimeoutError:
                pass

    # -- folders -------------------------------------------------------------

    async def _create_child(self, acc: Access, parent: Located, name: str, kind: int,
                            *, node_id: int | None = None) -> Row | None:
        """Claim ``name`` in ``parent`` for a new node; None when the name is taken."""
        now = _now_ms()
        node_id = node_id or self.rt.snowflake.next_id()
        row = {"ns": acc.ns, "node_id": node_id, "parent_id": parent.node_id, "name": name,
               "kind": kind, "create_ms": now, "modify_ms": now, "trash_id": 0}
        # the node row first: an orphan row (a crash before the claim) is never reached
        await self.t.put(NODES, row)
        claimed = await self.t.put(CHILDREN, {"ns": acc.ns, "parent_id": parent.node_id,
                                              "key": names.name_key(name), "node_id": node_id,
                                              "name": name, "kind": kind}, if_not_exists=True)
        if not claimed:
            # a stale entry (an interrupted move or delete) may hold the name: take it over
            entry = await self.t.get(CHILDREN, {"ns": acc.ns, "parent_id": parent.node_id,
                                                "key": names.name_key(name)})
            if entry is not None and await self._child(acc.ns, parent.node_id, name) is None:
                await self.t.delete(CHILDREN, {"ns": acc.ns, "parent_id": parent.node_id,
                                               "key": names.name_key(name)})
                claimed = await self.t.put(CHILDREN, {"ns": acc.ns, "parent_id": parent.node_id,
                                                      "key": names.name_key(name), "node_id": node_id,
                                                      "name": name, "kind": kind}, if_not_exists=True)
        if not claimed:
            await self.t.delete(NODES, {"ns": acc.ns, "node_id": node_id})
            return None
        return row

    async def ensure_folder(self, acc: Access, parts: Sequence[str], raw: str,
                            *, device: str = "") -> Located:
        """The folder at ``parts``, creating what is missing (each creation journalled)."""
        loc = Located(_root_row(acc.ns), "/", False, self._role(acc, [ROOT_ID]))
        path = ""
        for part in parts:
            path = names.join(path, part)
            child = await self._child(acc.ns, loc.node_id, part)
            if child is None:
                if not loc.role:
                    raise _not_found(raw)
                self._need_writer(loc)
                # journal first: a watcher hears of every folder that may exist
                pending_id = self.rt.snowflake.next_id()
                await self.journal(acc.ns, CREATED, pending_id, FOLDER, path, device=device)
                child = await self._create_child(acc, loc, part, FOLDER, node_id=pending_id)
                if child is None:  # created meanwhile by someone else
                    child = await self._child(acc.ns, loc.node_id, part)
                    if child is None:
                        raise AlreadyExists(f"{path} is being created; try again", reason="NAME_TAKEN")
            if int(child["kind"]) != FOLDER:
                raise FailedPrecondition(f"{path} is a file, not a folder", reason="NOT_A_FOLDER",
                                         subject=path)
            role = max(loc.role, self._role(acc, [int(child["node_id"])]))
            loc = Located(child, path, False, role)
        if not loc.role:
            raise _not_found(raw)
        return loc

    async def create_folder(self, acc: Access, raw: str) -> NodeView:
        p = self._parse_target(raw, "path")
        parent = await self.ensure_folder(acc, p.parts[:-1], raw)
        self._need_writer(parent)
        found = await self._child(acc.ns, parent.node_id, p.parts[-1])
        if found is not None:
            if str(found["name"]) != p.parts[-1]:
                raise self._clash(raw, str(found["name"]))
            raise AlreadyExists(f"{raw} already exists", reason="NAME_TAKEN")
        loc = await self.ensure_folder(acc, p.parts, raw)
        return await self.view(acc.ns, loc)

    @staticmethod
    def _parse_target(raw: str, field_name: str) -> Path:
        try:
            p = names.parse(raw)
        except BadPath as exc:
            raise _bad(field_name, exc) from None
        if p.node_id is not None or p.is_root:
            raise _bad(field_name, "must be a /path below the root")
        return p

    async def list_folder(self, acc: Access, raw: str, page_size: int,
                          page_token: str) -> tuple[list[NodeView], str]:
        loc = await self.locate(acc, raw)
        if loc.kind != FOLDER:
            raise FailedPrecondition(f"{raw} is a file, not a folder", reason="NOT_A_FOLDER", subject=raw)
        if loc.trashed:
            raise _not_found(raw)
        try:
            page = await self.t.slice(CHILDREN, {"ns": acc.ns, "parent_id": loc.node_id},
                                      limit=page_size or 100, page_token=page_token)
        except InvalidPageToken:
            raise _bad("page_token", "is not a page token of this folder") from None

        async def hydrate(entry: Row) -> NodeView | None:
            row = await self.t.get(NODES, {"ns": acc.ns, "node_id": int(entry["node_id"])})
            if row is None or int(row["parent_id"]) != loc.node_id or int(row["trash_id"] or 0):
                return None
            head = await self.head(acc.ns, int(row["node_id"])) if int(row["kind"]) == FILE else None
            return NodeView(acc.ns, row, names.join(loc.path, str(row["name"])), False, head)

        views = await asyncio.gather(*(hydrate(e) for e in page.rows))
        return [v for v in views if v is not None], page.next_page_token

    # -- commits -------------------------------------------------------------

    def _check_blocks(self, blocks: Sequence[BlockRef], chunking: int) -> None:
        bad: list[tuple[str, str]] = []
        n = len(blocks)
        for i, b in enumerate(blocks):
            last = i == n - 1
            if chunking == FIXED:
                if b.size > self.settings.block_bytes or (not last and b.size != self.settings.block_bytes):
                    bad.append((f"blocks[{i}].size_bytes",
                                f"fixed blocks are {self.settings.block_bytes} bytes (the last may be shorter)"))
            elif b.size > CDC_MAX or (not last and b.size < CDC_MIN):
                bad.append((f"blocks[{i}].size_bytes",
                            f"FastCDC chunks are {CDC_MIN} to {CDC_MAX} bytes (the last may be shorter)"))
        if bad:
            raise InvalidArgument(bad[:20])

    async def settings_of(self, ns: int) -> Row:
        row = await self.t.get(NAMESPACES, {"ns": ns})
        return row or {"ns": ns, "chunking": self.settings.chunking}

    async def commit(self, acc: Access, raw: str, base: int, blocks: Sequence[BlockRef], chunking: int,
                     device: str, *, expect_uploaded: bool = False) -> CommitResult:
        p = self._parse_target(raw, "path")
        if not chunking:
            chunking = int((await self.settings_of(acc.ns))["chunking"] or FIXED)
        self._check_blocks(blocks, chunking)
        digests = sorted({b.sha256 for b in blocks})
        held = await self.cas.referenced(digests, prefix=ns_prefix(acc.ns)) if digests else set()
        missing = [d for d in digests if d not in held]
        if missing:
            if expect_uploaded:
                raise FailedPrecondition(f"{len(missing)} block(s) were never uploaded",
                                         reason="BLOCKS_MISSING", kind="BLOCK_MISSING", subjects=missing)
            return CommitResult(missing=missing)
        parent = await self.ensure_folder(acc, p.parts[:-1], raw, device=device)
        self._need_writer(parent)
        name = p.parts[-1]
        chash = content_hash(blocks)
        try:
            existing = await self._child(acc.ns, parent.node_id, name)
            if existing is None:
                node_id = self.rt.snowflake.next_id()
                path = names.join(parent.path, name)
                change = await self.journal(acc.ns, CREATED, node_id, FILE, path, rev=1, device=device)
                row = await self._create_child(acc, parent, name, FILE, node_id=node_id)
                if row is not None:
                    loc = Located(row, path, False, parent.role)
                    if await self._write_revision(acc, loc, 1, blocks, chunking, device, change):
                        return CommitResult(node=await self.view(acc.ns, loc))
                existing = await self._child(acc.ns, parent.node_id, name)
                if existing is None:
                    raise AlreadyExists(f"{raw} is being created; try again", reason="NAME_TAKEN")
            if str(existing["name"]) != name:
                raise self._clash(raw, str(existing["name"]))
            loc = Located(existing, names.join(parent.path, str(existing["name"])), False, parent.role)
            if int(existing["kind"]) == FILE:
                head = await self.head(acc.ns, loc.node_id)
                head_rev = int(head["rev"]) if head else 0
                if head is not None and head["content_hash"] == chash:
                    return CommitResult(node=NodeView(acc.ns, existing, loc.path, False, head), unchanged=True)
                if base == head_rev:
                    change = await self.journal(acc.ns, MODIFIED, loc.node_id, FILE, loc.path,
                                                rev=head_rev + 1, device=device)
                    if await self._write_revision(acc, loc, head_rev + 1, blocks, chunking, device, change):
                        await self._prune(acc.ns, loc.node_id, head_rev + 1)
                        return CommitResult(node=await self.view(acc.ns, loc))
            return await self._conflicted_copy(acc, parent, loc, blocks, chunking, device)
        except MissingBlocks as exc:  # a block was collected between the check and the reference
            return CommitResult(missing=exc.digests)

    async def _write_revision(self, acc: Access, loc: Located, rev: int, blocks: Sequence[BlockRef],
                              chunking: int, device: str, attempt: int) -> bool:
        """Reference the blocks and write revision ``rev`` IF NOT EXISTS; False when another commit has it."""
        owner = ref_owner(acc.ns, loc.node_id, rev, attempt)
        digests = sorted({b.sha256 for b in blocks})
        intent = {"bucket": _now_ms() // self.settings.intent_bucket_ms, "ref_owner": owner, "ns": acc.ns,
                  "node_id": loc.node_id, "rev": rev, "digests": ",".join(digests)}
        await self.t.put(INTENTS, intent)
        if digests:
            await self.cas.add_refs(digests, owner=owner)
        now = _now_ms()
        won = await self.t.put(REVISIONS, {
            "ns": acc.ns, "node_id": loc.node_id, "rev": rev, "blocks": encode_blocks(blocks),
            "size": sum(b.size for b in blocks), "chunking": chunking, "device": device,
            "author": acc.caller, "create_ms": now, "content_hash": content_hash(blocks), "ref_owner": owner,
        }, if_not_exists=True)
        if not won and digests:
            await self.cas.remove_refs(digests, owner=owner)
        await self.t.delete(INTENTS, {"bucket": intent["bucket"], "ref_owner": owner})
        if won:
            await self.t.put(NODES, {"ns": acc.ns, "node_id": loc.node_id, "modify_ms": now})
        return won

    async def _conflicted_copy(self, acc: Access, parent: Located, winner: Located, blocks: Sequence[BlockRef],
                               chunking: int, device: str) -> CommitResult:
        base_name = str(winner.row["name"])
        day = _day(_now_ms())
        for n in range(100):
            name = names.conflicted_name(base_name, device, day, n)
            if await self._child(acc.ns, parent.node_id, name) is not None:
                continue
            node_id = self.rt.snowflake.next_id()
            path = names.join(parent.path, name)
            change = await self.journal(acc.ns, CONFLICTED_COPY, node_id, FILE, path, rev=1, device=device,
                                        conflict_with=winner.path)
            row = await self._create_child(acc, parent, name, FILE, node_id=node_id)
            if row is None:
                continue
            loc = Located(row, path, False, parent.role)
            await self._write_revision(acc, loc, 1, blocks, chunking, device, change)
            log.info("drive_conflicted_copy", ns=acc.ns, path=path, lost_to=winner.path)
            return CommitResult(node=await self.view(acc.ns, loc), conflicted=True,
                                conflict_with=await self.view(acc.ns, winner))
        raise AlreadyExists(f"too many conflicted copies of {winner.path}", reason="TOO_MANY_CONFLICTS")

    async def _prune(self, ns: int, node_id: int, head_rev: int) -> None:
        keep = self.settings.keep_revisions
        if head_rev <= keep:
            return
        page = await self.t.slice(REVISIONS, {"ns": ns, "node_id": node_id}, limit=100,
                                  bounds=ClusteringRange(le=(head_rev - keep,)))
        for r in page.rows:
            await self._drop_revision(ns, r)

    async def _drop_revision(self, ns: int, r: Row) -> None:
        digests = sorted({b.sha256 for b in decode_blocks(r["blocks"])})
        if digests:
            await self.cas.remove_refs(digests, owner=str(r["ref_owner"]))
        await self.t.delete(REVISIONS, {"ns": ns, "node_id": int(r["node_id"]), "rev": int(r["rev"])})

    # -- blocks --------------------------------------------------------------

    async def upload_access(self, acc: Access) -> None:
        if not acc.own and WRITER not in acc.grants.values():
            raise PermissionDenied("the folders shared with you here are read-only", reason="READ_ONLY_SHARE")

    async def store_block(self, acc: Access, sha256: str, data: bytes) -> None:
        try:
            await self.cas.put(data, owner=lease_owner(acc.ns), expected=sha256)
        except BlockMismatch as exc:
            raise InvalidArgument([("sha256", f"the block's bytes hash to {exc.actual}, not {exc.expected}")],
                                  "block does not match its hash") from None

    async def revision(self, acc: Access, loc: Located, rev: int) -> Row:
        if loc.kind != FILE:
            raise FailedPrecondition(f"{loc.path} is a folder", reason="NOT_A_FILE", subject=loc.path)
        row = (await self.head(acc.ns, loc.node_id) if rev == 0 else
               await self.t.get(REVISIONS, {"ns": acc.ns, "node_id": loc.node_id, "rev": rev}))
        if row is None:
            raise NotFound(f"{loc.path} has no revision {rev}", reason="REVISION_NOT_FOUND")
        return row

    async def read_block(self, sha256: str) -> bytes:
        return await self.cas.get(sha256)

    # -- revisions -----------------------------------------------------------

    async def list_revisions(self, acc: Access, raw: str, page_size: int,
                             page_token: str) -> tuple[list[Row], str]:
        loc = await self.locate(acc, raw)
        if loc.kind != FILE:
            raise FailedPrecondition(f"{raw} is a folder", reason="NOT_A_FILE", subject=raw)
        try:
            page = await self.t.slice(REVISIONS, {"ns": acc.ns, "node_id": loc.node_id},
                                      limit=page_size or 100, page_token=page_token)
        except InvalidPageToken:
            raise _bad("page_token", "is not a page token of this file") from None
        return page.rows, page.next_page_token

    async def restore_revision(self, acc: Access, raw: str, rev: int, device: str) -> NodeView:
        loc = await self.locate(acc, raw)
        if loc.trashed:
            raise FailedPrecondition(f"{loc.path} is in the trash: restore it first", reason="TRASHED",
                                     subject=raw)
        self._need_writer(loc)
        old = await self.revision(acc, loc, rev)
        for _ in range(5):
            head = await self.head(acc.ns, loc.node_id)
            head_rev = int(head["rev"]) if head else 0
            if head is not None and head["content_hash"] == old["content_hash"]:
                return await self.view(acc.ns, loc)
            blocks = decode_blocks(old["blocks"])
            change = await self.journal(acc.ns, MODIFIED, loc.node_id, FILE, loc.path, rev=head_rev + 1,
                                        device=device)
            if await self._write_revision(acc, loc, head_rev + 1, blocks, int(old["chunking"] or FIXED),
                                          device, change):
                await self._prune(acc.ns, loc.node_id, head_rev + 1)
                return await self.view(acc.ns, loc)
        raise AlreadyExists(f"{loc.path} keeps changing; try again", reason="CONCURRENT_CHANGE")

    # -- move, trash, restore ------------------------------------------------

    async def move(self, acc: Access, from_raw: str, to_raw: str) -> NodeView:
        loc = await self.locate(acc, from_raw, field_name="from_path")
        if loc.node_id == ROOT_ID:
            raise _bad("from_path", "the root cannot move")
        if loc.trashed:
            raise _not_found(from_raw)
        self._need_writer(loc)
        if not acc.own and loc.node_id in acc.grants:
            raise PermissionDenied("a shared folder is moved by its owner", reason="SHARED_FOLDER")
        p = self._parse_target(to_raw, "to_path")
        parent = await self.ensure_folder(acc, p.parts[:-1], to_raw)
        self._need_writer(parent)
        if loc.kind == FOLDER:
            lineage = await self._lineage(acc.ns, parent.node_id)
            above = lineage.rows if lineage is not None else []
            if parent.node_id == loc.node_id or any(int(r["node_id"]) == loc.node_id for r in above):
                raise _bad("to_path", "a folder cannot move into itself")
        name = p.parts[-1]
        old_parent, old_name = int(loc.row["parent_id"]), str(loc.row["name"])
        new_key, old_key = names.name_key(name), names.name_key(old_name)
        if parent.node_id == old_parent and new_key == old_key:
            if name == old_name:
                return await self.view(acc.ns, loc)
        else:
            claimed = await self.t.put(CHILDREN, {"ns": acc.ns, "parent_id": parent.node_id, "key": new_key,
                                                  "node_id": loc.node_id, "name": name, "kind": loc.kind},
                                       if_not_exists=True)
            if not claimed:
                found = await self._child(acc.ns, parent.node_id, name)
                if found is not None and str(found["name"]) != name:
                    raise self._clash(to_raw, str(found["name"]))
                raise AlreadyExists(f"{to_raw} already exists", reason="NAME_TAKEN")
        to_path = names.join(parent.path, name)
        await self.journal(acc.ns, MOVED, loc.node_id, loc.kind, to_path, from_path=loc.path)
        await self.t.put(NODES, {"ns": acc.ns, "node_id": loc.node_id, "parent_id": parent.node_id,
                                 "name": name, "modify_ms": _now_ms()})
        await self.t.put(CHILDREN, {"ns": acc.ns, "parent_id": parent.node_id, "key": new_key,
                                    "node_id": loc.node_id, "name": name, "kind": loc.kind})
        if (parent.node_id, new_key) != (old_parent, old_key):
            await self._drop_entry(acc.ns, old_parent, old_key, loc.node_id)
        row = await self.t.get(NODES, {"ns": acc.ns, "node_id": loc.node_id})
        assert row is not None
        return await self.view(acc.ns, Located(row, to_path, False, loc.role))

    async def _drop_entry(self, ns: int, parent_id: int, key: str, node_id: int) -> None:
        entry = await self.t.get(CHILDREN, {"ns": ns, "parent_id": parent_id, "key": key})
        if entry is not None and int(entry["node_id"]) == node_id:
            await self.t.delete(CHILDREN, {"ns": ns, "parent_id": parent_id, "key": key})

    async def delete(self, acc: Access, raw: str, *, permanent: bool, if_revision: int) -> NodeView:
        loc = await self.locate(acc, raw)
        if loc.node_id == ROOT_ID:
            raise _bad("path", "the root cannot be deleted")
        self._need_writer(loc)
        if not acc.own and loc.node_id in acc.grants:
            raise PermissionDenied("a shared folder is deleted by its owner", reason="SHARED_FOLDER")
        trash_id = int(loc.row["trash_id"] or 0)
        if permanent:
            if not trash_id:
                raise FailedPrecondition(f"{raw} is not in the trash: delete it first", reason="NOT_TRASHED",
                                         subject=raw)
            view = await self.view(acc.ns, loc)
            await self._purge(acc.ns, loc.row)
            await self.t.delete(TRASH, {"ns": acc.ns, "trash_id": trash_id})
            return view
        if loc.trashed:
            return await self.view(acc.ns, loc)
        if if_revision and loc.kind == FILE:
            head = await self.head(acc.ns, loc.node_id)
            if head is None or int(head["rev"]) != if_revision:
                raise FailedPrecondition(f"{loc.path} changed since revision {if_revision}",
                                         reason="REVISION_CHANGED", subject=loc.path)
        trash_id = self.rt.snowflake.next_id()
        await self.journal(acc.ns, DELETED, loc.node_id, loc.kind, loc.path)
        await self.t.put(TRASH, {"ns": acc.ns, "trash_id": trash_id, "node_id": loc.node_id,
                                 "parent_id": int(loc.row["parent_id"]), "name": loc.row["name"],
                                 "path": loc.path})
        await self.t.put(NODES, {"ns": acc.ns, "node_id": loc.node_id, "trash_id": trash_id})
        await self._drop_entry(acc.ns, int(loc.row["parent_id"]), names.name_key(str(loc.row["name"])),
                               loc.node_id)
        loc.row["trash_id"] = trash_id
        return await self.view(acc.ns, Located(loc.row, loc.path, True, loc.role))

    async def _purge(self, ns: int, row: Row) -> None:
        node_id = int(row["node_id"])
        if int(row["kind"]) == FOLDER:
            token = ""
            while True:
                page = await self.t.slice(CHILDREN, {"ns": ns, "parent_id": node_id}, limit=200, page_token=token)
                for entry in page.rows:
                    child = await self.t.get(NODES, {"ns": ns, "node_id": int(entry["node_id"])})
                    if child is not None and int(child["parent_id"]) == node_id:
                        await self._purge(ns, child)
                token = page.next_page_token
                if not token:
                    break
            await self.t.delete(CHILDREN, {"ns": ns, "parent_id": node_id})
        else:
            while True:
                page = await self.t.slice(REVISIONS, {"ns": ns, "node_id": node_id}, limit=100)
                for r in page.rows:
                    await self._drop_revision(ns, r)
                if not page.next_page_token:
                    break
        await self.t.delete(NODES, {"ns": ns, "node_id": node_id})

    async def restore(self, acc: Access, raw: str, new_name: str) -> NodeView:
        loc = await self.locate(acc, raw)
        trash_id = int(loc.row["trash_id"] or 0)
        if not trash_id:
            raise FailedPrecondition(f"{raw} is not in the trash", reason="NOT_TRASHED", subject=raw)
        self._need_writer(loc)
        name = str(loc.row["name"])
        if new_name:
            try:
                name = names.check_name(new_name)
            except BadPath as exc:
                raise _bad("new_name", exc) from None
        parent_id = int(loc.row["parent_id"])
        parent_lineage = await self._lineage(acc.ns, parent_id)
        if parent_lineage is None or parent_lineage.trashed:
            raise FailedPrecondition("the folder it was in is gone or in the trash: restore that first",
                                     reason="PARENT_GONE", subject=raw)
        parent_path = parent_lineage.path
        if await self._child(acc.ns, parent_id, name) is not None:
            raise AlreadyExists(f"{names.join(parent_path, name)} exists: restore under a new_name",
                                reason="NAME_TAKEN")
        claimed = await self.t.put(CHILDREN, {"ns": acc.ns, "parent_id": parent_id, "key": names.name_key(name),
                                              "node_id": loc.node_id, "name": name, "kind": loc.kind},
                                   if_not_exists=True)
        if not claimed:
            raise AlreadyExists(f"{names.join(parent_path, name)} exists: restore under a new_name",
                                reason="NAME_TAKEN")
        path = names.join(parent_path, name)
        await self.journal(acc.ns, RESTORED, loc.node_id, loc.kind, path)
        await self.t.put(NODES, {"ns": acc.ns, "node_id": loc.node_id, "name": name, "trash_id": 0})
        await self.t.delete(TRASH, {"ns": acc.ns, "trash_id": trash_id})
        row = await self.t.get(NODES, {"ns": acc.ns, "node_id": loc.node_id})
        assert row is not None
        return await self.view(acc.ns, Located(row, path, False, loc.role))

    async def list_trash(self, acc: Access, page_size: int, page_token: str) -> tuple[list[NodeView], str]:
        if not acc.own:
            raise PermissionDenied("the trash is its owner's", reason="NOT_OWNER")
        try:
            page = await self.t.slice(TRASH, {"ns": acc.ns}, limit=page_size or 100, page_token=page_token)
        except InvalidPageToken:
            raise _bad("page_token", "is not a page token of the trash") from None
        out = []
        for r in page.rows:
            row = await self.t.get(NODES, {"ns": acc.ns, "node_id": int(r["node_id"])})
            if row is None or int(row["trash_id"] or 0) != int(r["trash_id"]):
                continue
            head = await self.head(acc.ns, int(row["node_id"])) if int(row["kind"]) == FILE else None
            out.append(NodeView(acc.ns, row, str(r["path"]), True, head))
        return out, page.next_page_token

    # -- shares --------------------------------------------------------------

    async def share(self, caller: int, raw: str, grantee: int, role: int) -> Row:
        acc = Access(caller, caller, own=True)
        if grantee == caller:
            raise _bad("grantee_id", "a folder is shared with someone else")
        loc = await self.locate(acc, raw)
        if loc.kind != FOLDER or loc.node_id == ROOT_ID:
            raise _bad("path", "only a folder below the root can be shared")
        if loc.trashed:
            raise _not_found(raw)
        now = _now_ms()
        await self.t.put(GRANTS, {"ns": caller, "grantee": grantee, "folder_id": loc.node_id, "role": role,
                                  "create_ms": now})
        await self.t.put(SHARES_IN, {"grantee": grantee, "ns": caller, "folder_id": loc.node_id, "role": role,
                                     "create_ms": now})
        await self.t.put(SHARES_OUT, {"ns": caller, "folder_id": loc.node_id, "grantee": grantee, "role": role,
                                      "create_ms": now})
        return {"ns": caller, "folder_id": loc.node_id, "path": loc.path, "grantee": grantee, "role": role,
                "create_ms": now}

    async def unshare(self, caller: int, raw: str, grantee: int) -> None:
        acc = Access(caller, caller, own=True)
        loc = await self.locate(acc, raw)
        key = {"ns": caller, "folder_id": loc.node_id}
        if await self.t.get(SHARES_OUT, {**key, "grantee": grantee}) is None:
            raise NotFound(f"{raw} is not shared with user {grantee}", reason="SHARE_NOT_FOUND")
        await self.t.delete(GRANTS, {"ns": caller, "grantee": grantee, "folder_id": loc.node_id})
        await self.t.delete(SHARES_IN, {"grantee": grantee, "ns": caller, "folder_id": loc.node_id})
        await self.t.delete(SHARES_OUT, {**key, "grantee": grantee})

    async def _folder_path(self, ns: int, folder_id: int) -> str | None:
        """The path of a shared folder that is still there (not the root, not in the trash)."""
        lineage = await self._lineage(ns, folder_id)
        if lineage is None or not lineage.rows or lineage.trashed:
            return None
        return lineage.path

    async def list_shares(self, caller: int) -> tuple[list[Row], list[Row]]:
        inbound = (await self.t.slice(SHARES_IN, {"grantee": caller}, limit=1000)).rows
        outbound = (await self.t.slice(SHARES_OUT, {"ns": caller}, limit=1000)).rows
        out_in, out_out = [], []
        for r in inbound:
            path = await self._folder_path(int(r["ns"]), int(r["folder_id"]))
            if path is not None:
                out_in.append({**r, "path": path})
        for r in outbound:
            path = await self._folder_path(caller, int(r["folder_id"]))
            if path is not None:
                out_out.append({**r, "path": path})
        return out_in, out_out

    async def update_settings(self, caller: int, chunking: int) -> Row:
        await self._ensure_namespace(caller)
        await self.t.put(NAMESPACES, {"ns": caller, "chunking": chunking})
        return await self.settings_of(caller)

    # -- the sweep -----------------------------------------------------------

    async def sweep(self) -> dict[str, Any]:
        """Take back the references of commits that died mid-way, then collect unheld blocks."""
        undone = await self._sweep_intents()
        stats = await self.cas.collect(name="drive")
        return {"intents_undone": undone, **stats.__dict__}

    async def _sweep_intents(self) -> int:
        now_bucket = _now_ms() // self.settings.intent_bucket_ms
        last_due = now_bucket - 2  # an intent lives a few seconds; two buckets is plenty of margin
        cursor = await self.t.get(INTENT_CURSOR, {"name": "drive"})
        bucket = int(cursor["bucket"]) if cursor else last_due - 7 * 144
        undone = 0
        while bucket <= last_due:
            token = ""
            while True:
                page = await self.t.slice(INTENTS, {"bucket": bucket}, limit=200, page_token=token)
                for r in page.rows:
                    rev = await self.t.get(REVISIONS, {"ns": int(r["ns"]), "node_id": int(r["node_id"]),
                                                       "rev": int(r["rev"])})
                    if rev is None or rev["ref_owner"] != r["ref_owner"]:
                        digests = [d for d in str(r["digests"] or "").split(",") if d]
                        if digests:
                            await self.cas.remove_refs(digests, owner=str(r["ref_owner"]))
                        undone += 1
                token = page.next_page_token
                if not token:
                    break
            await self.t.delete(INTENTS, {"bucket": bucket})
            bucket += 1
            await self.t.put(INTENT_CURSOR, {"name": "drive", "bucket": bucket})
        return undone
