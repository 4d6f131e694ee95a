"""Input rules of the chat system; every rule reports a field violation.

Ids travel as decimal strings (JSON keeps every digit of a 64-bit id) and
are parsed here, so domain code only ever sees ints.
"""

from __future__ import annotations

import re

from servers.platform.errors import Violations
from servers.platform.ids import MAX_ID

MAX_TEXT_CHARS = 4096
MAX_GROUP_MEMBERS = 500
MAX_TITLE_CHARS = 100
MAX_FILENAME_CHARS = 255
MAX_ATTACHMENT_BYTES = 10 * 1024 * 1024
MAX_CHUNK_BYTES = 1024 * 1024
TOKEN_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
CONTENT_TYPE_RE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,127}$")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def parse_id(value: str, v: Violations, field: str, *, required: bool = True) -> int:
    """A Snowflake id from its decimal string; 0 (and a violation if required) when absent."""
    if not value:
        if required:
            v.add(field, "is required")
        return 0
    if not value.isascii() or not value.isdigit() or len(value) > 19 or int(value) > MAX_ID \
            or int(value) == 0:
        v.add(field, "must be a positive decimal id")
        return 0
    return int(value)


def check_token(value: str, v: Violations, field: str) -> None:
    """Client-chosen ids (device ids, client message ids)."""
    if not value:
        v.add(field, "is required")
    elif not TOKEN_RE.match(value):
        v.add(field, "must be 1-64 characters of letters, digits, '.', '_' or '-'")


def check_text(text: str, v: Violations, field: str, *, allow_empty: bool) -> None:
    if not text.strip():
        if not allow_empty:
            v.add(field, "must not be empty")
        return
    if len(text) > MAX_TEXT_CHARS:
        v.add(field, f"must be at most {MAX_TEXT_CHARS} characters (got {len(text)})")
    elif _CONTROL.search(text):
        v.add(field, "must not contain control characters other than tab and newline")


def check_title(title: str, v: Violations, field: str = "title") -> None:
    if not title.strip():
        v.add(field, "is required for a group")
    elif len(title) > MAX_TITLE_CHARS:
        v.add(field, f"must be at most {MAX_TITLE_CHARS} characters")
    elif _CONTROL.search(title) or "\n" in title:
        v.add(field, "must be one line without control characters")


def check_filename(name: str, v: Violations, field: str) -> None:
    if not name:
        v.add(field, "is required")
    elif len(name) > MAX_FILENAME_CHARS:
        v.add(field, f"must be at most {MAX_FILENAME_CHARS} characters")
    elif "/" in name or "\\" in name or _CONTROL.search(name) or "\n" in name or name in (".", ".."):
        v.add(field, "must be a plain file name (no path separators or control characters)")
