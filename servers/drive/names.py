"""Paths and names: what a name may be, how two names are compared, conflicted copies.

A path is ``/``-separated and absolute (``/docs/a.txt``), or ``id:<node_id>``
for a node wherever it is now. Names are stored as given, in NFC; two names
are the same name when they are equal after NFC, case folding and NFC again
(``Report.txt``, ``report.TXT`` and ``re\u0301sume\u0301`` vs ``r\u00e9sum\u00e9`` clash), so
a tree synced to a case-insensitive or normalising file system (macOS,
Windows) never holds two entries that would land on one file.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

MAX_NAME_BYTES = 255
MAX_DEPTH = 64
ROOT_ID = 0


class BadPath(ValueError):
    pass


def check_name(name: str) -> str:
    """The name in NFC; BadPath with the reason when it is not a valid name."""
    if not name:
        raise BadPath("a name cannot be empty")
    if "\x00" in name:
        raise BadPath("a name cannot contain NUL")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise BadPath("a name cannot contain control characters")
    if "/" in name or "\\" in name:
        raise BadPath("a name cannot contain '/' or '\\'")
    if name in (".", ".."):
        raise BadPath("a name cannot be '.' or '..'")
    if name != name.strip() or name.endswith("."):
        raise BadPath("a name cannot start or end with a space, or end with '.'")
    nfc = unicodedata.normalize("NFC", name)
    if len(nfc.encode()) > MAX_NAME_BYTES:
        raise BadPath(f"a name is at most {MAX_NAME_BYTES} bytes of UTF-8")
    return nfc


def name_key(name: str) -> str:
    """What two names are compared by: NFC, case-folded, NFC."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", name).casefold())


@dataclass(frozen=True)
class Path:
    node_id: int | None  # set for "id:<n>"
    parts: tuple[str, ...]  # NFC names from the root, for "/a/b"

    @property
    def is_root(self) -> bool:
        return self.node_id is None and not self.parts

    def __str__(self) -> str:
        if self.node_id is not None:
            return f"id:{self.node_id}"
        return "/" + "/".join(self.parts)


def parse(raw: str) -> Path:
    if raw.startswith("id:"):
        digits = raw[3:]
        if not digits.isascii() or not digits.isdigit() or len(digits) > 19 or (len(digits) > 1 and digits[0] == "0"):
            raise BadPath("an id path is id:<decimal node id>")
        n = int(digits)
        if n > (1 << 63) - 1:
            raise BadPath("an id path is id:<decimal node id>")
        return Path(node_id=n, parts=()) if n else Path(None, ())
    if not raw.startswith("/"):
        raise BadPath("a path starts with '/' (or is id:<node id>)")
    if raw == "/":
        return Path(None, ())
    body = raw[1:]
    if body.endswith("/"):
        body = body[:-1]
    parts = body.split("/")
    if len(parts) > MAX_DEPTH:
        raise BadPath(f"a path is at most {MAX_DEPTH} folders deep")
    return Path(None, tuple(check_name(p) for p in parts))


def join(parent: str, name: str) -> str:
    return f"/{name}" if parent in ("", "/") else f"{parent}/{name}"


def split_ext(name: str) -> tuple[str, str]:
    """("report", ".txt"); a leading dot is part of the stem (".bashrc", "")."""
    dot = name.rfind(".")
    if dot <= 0:
        return name, ""
    return name[:dot], name[dot:]


def conflicted_name(name: str, device: str, day: str, n: int = 0) -> str:
    """Dropbox's name for the loser of a conflict: "a (conflicted copy from laptop 2026-12-03).txt"."""
    stem, ext = split_ext(name)
    who = device or "another device"
    suffix = f" (conflicted copy from {who} {day})" + (f" ({n})" if n else "")
    # keep within the name limit: shorten the stem, never the suffix
    budget = MAX_NAME_BYTES - len((suffix + ext).encode())
    while len(stem.encode()) > budget and stem:
        stem = stem[:-1]
    return f"{stem}{suffix}{ext}"


def restored_name(name: str, n: int) -> str:
    stem, ext = split_ext(name)
    return f"{stem} (restored{f' {n}' if n > 1 else ''}){ext}"
