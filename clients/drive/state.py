"""The sync client's local state: what each synced path was when it was last in step with the server.

One SQLite file (``LOCAL_DIR/.sysdesign-sync/state.db``). A row per path
(relative, ``/``-separated) that is in step with the server::

    path, kind ('f' file | 'd' folder), node_id, revision,
    size, mtime_ns, inode, blocks, content_hash

A file whose (size, mtime_ns, inode) still equal its row is unchanged since
the last sync and is not read again; one that differs is hashed, and
committed with ``revision`` as its base when its content changed. ``meta``
keeps the change-journal cursor and whose namespace this folder mirrors.
``quick_digests`` keeps, per path, the blocks last cut from the local file
with each block's XXH3-128 beside its SHA-256 (``blocks.recut_file``): a
changed file is SHA-256 hashed again only in the blocks whose quick digest
changed. It is a cache of what the bytes hashed to, right whatever the
entries say.
Every change is committed at once, so a crash loses at most the operation
in flight, which the next pass redoes.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from clients.drive.blocks import BlockRef

STATE_DIR = ".sysdesign-sync"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    path TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    node_id TEXT NOT NULL,
    revision INTEGER NOT NULL DEFAULT 0,
    size INTEGER NOT NULL DEFAULT 0,
    mtime_ns INTEGER NOT NULL DEFAULT 0,
    inode INTEGER NOT NULL DEFAULT 0,
    blocks TEXT NOT NULL DEFAULT '[]',
    content_hash TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS entries_node ON entries (node_id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS quick_digests (
    path TEXT PRIMARY KEY,
    blocks TEXT NOT NULL,
    quick TEXT NOT NULL
);
"""


@dataclass
class Entry:
    path: str
    kind: str
    node_id: str
    revision: int = 0
    size: int = 0
    mtime_ns: int = 0
    inode: int = 0
    blocks: tuple[BlockRef, ...] = ()
    content_hash: str = ""

    @property
    def is_dir(self) -> bool:
        return self.kind == "d"

    def same_stat(self, st: os.stat_result) -> bool:
        return (self.size, self.mtime_ns, self.inode) == (st.st_size, st.st_mtime_ns, st.st_ino)


def under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


class State:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    # -- meta --------------------------------------------------------------

    def meta(self, key: str, default: str = "") -> str:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(row[0]) if row else default

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT INTO meta (key, value) VALUES (?, ?) "
                        "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))

    # -- entries -----------------------------------------------------------

    @staticmethod
    def _entry(row: tuple[object, ...]) -> Entry:
        path, kind, node_id, revision, size, mtime_ns, inode, blocks, chash = row
        refs = tuple(BlockRef(int(o), int(s), str(h)) for o, s, h in json.loads(str(blocks)))
        return Entry(str(path), str(kind), str(node_id), int(revision), int(size),  # type: ignore[call-overload]
                     int(mtime_ns), int(inode), refs, str(chash))  # type: ignore[call-overload]

    _COLS = "path, kind, node_id, revision, size, mtime_ns, inode, blocks, content_hash"

    def get(self, path: str) -> Entry | None:
        row = self.db.execute(f"SELECT {self._COLS} FROM entries WHERE path = ?", (path,)).fetchone()
        return self._entry(row) if row else None

    def by_node(self, node_id: str) -> Entry | None:
        row = self.db.execute(f"SELECT {self._COLS} FROM entries WHERE node_id = ?", (node_id,)).fetchone()
        return self._entry(row) if row else None

    def all(self) -> list[Entry]:
        return [self._entry(r) for r in self.db.execute(f"SELECT {self._COLS} FROM entries ORDER BY path")]

    def below(self, prefix: str) -> list[Entry]:
        """The entries strictly inside folder ``prefix``."""
        lo = prefix + "/"
        hi = prefix + "0"  # '0' follows '/' in code point order
        return [self._entry(r) for r in self.db.execute(
            f"SELECT {self._COLS} FROM entries WHERE path >= ? AND path < ? ORDER BY path", (lo, hi))]

    def put(self, e: Entry) -> None:
        blocks = json.dumps([[b.offset, b.size, b.sha256] for b in e.blocks])
        self.db.execute("DELETE FROM entries WHERE node_id = ? AND path != ?", (e.node_id, e.path))
        self.db.execute(
            f"INSERT OR REPLACE INTO entries ({self._COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (e.path, e.kind, e.node_id, e.revision, e.size, e.mtime_ns, e.inode, blocks, e.content_hash))

    def delete(self, path: str) -> None:
        self.db.execute("DELETE FROM entries WHERE path = ?", (path,))

    # -- quick digests -----------------------------------------------------

    def quick_of(self, path: str) -> tuple[list[BlockRef], list[str]]:
        row = self.db.execute("SELECT blocks, quick FROM quick_digests WHERE path = ?", (path,)).fetchone()
        if not row:
            return [], []
        refs = [BlockRef(int(o), int(s), str(h)) for o, s, h in json.loads(str(row[0]))]
        return refs, [str(q) for q in json.loads(str(row[1]))]

    def set_quick(self, path: str, blocks: list[BlockRef], quick: list[str]) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO quick_digests (path, blocks, quick) VALUES (?, ?, ?)",
            (path, json.dumps([[b.offset, b.size, b.sha256] for b in blocks]), json.dumps(quick)))

    def delete_tree(self, prefix: str) -> None:
        self.delete(prefix)
        for e in self.below(prefix):
            self.delete(e.path)

    def move_tree(self, old: str, new: str) -> None:
        """Rename ``old`` and everything inside it to ``new``."""
        self.db.execute("BEGIN")
        try:
            inside = self.below(old)
            me = self.get(old)
            for e in [*([me] if me else []), *inside]:
                self.db.execute("DELETE FROM entries WHERE path = ?", (e.path,))
            for e in [*([me] if me else []), *inside]:
                e.path = new + e.path[len(old):]
                self.put(e)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
