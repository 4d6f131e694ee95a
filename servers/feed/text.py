"""Post text rules: length, characters, @mentions and URLs.

- **Length** is counted in Unicode code points after NFC normalisation, at most
  280. NFC first, so "é" typed as e + combining accent counts as one, as it
  displays. Code points, not grapheme clusters: an emoji built from several
  code points (👩‍👩‍👧 is five) counts as several, as in Twitter's original
  rule; that keeps the rule identical in every language's standard library
  (Python ``len``, Java ``codePointCount``, Go ``utf8.RuneCountInString``).
  Offsets of mentions and URLs count code points the same way.
- **Characters**: no control characters except newline and tab.
- **@mentions**: ``@name`` not preceded by a word character or ``@`` (so an
  e-mail address is not a mention). Usernames are stored lowercase by the
  identity service, so ``@Alice`` resolves to ``alice``. A name that is no
  registered user stays plain text, with no entity and no error: people
  write "@" for many things.
- **URLs**: ``http://`` or ``https://`` up to whitespace, without trailing
  punctuation (``.,;:!?`` and an unbalanced closing bracket or quote), at
  most 5 per post. The length rule counts the text as written.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from servers.platform.errors import Violations

MAX_CHARS = 280
MAX_URLS = 5
MAX_MENTIONS = 10
MAX_MEDIA = 4

MENTION_RE = re.compile(r"(?<![\w@])@([A-Za-z][A-Za-z0-9_]{2,31})(?![\w@])")
URL_RE = re.compile(r"https?://[^\s<>\"]+", re.IGNORECASE)
MEDIA_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_TRAILING = ".,;:!?'\""
_PAIRS = {")": "(", "]": "[", "}": "{"}


def normalize(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def check_text(text: str, v: Violations, *, allow_empty: bool) -> None:
    """``text`` is already NFC."""
    if not text.strip():
        if not allow_empty:
            v.add("text", "is required (1-280 characters)")
        elif text:
            v.add("text", "must not be only whitespace")
        return
    if len(text) > MAX_CHARS:
        v.add("text", f"must be at most {MAX_CHARS} characters (Unicode code points), got {len(text)}")
        return
    bad = next((c for c in text if unicodedata.category(c) == "Cc" and c not in "\n\t"), None)
    if bad is not None:
        v.add("text", f"must not contain control characters (found U+{ord(bad):04X})")


@dataclass(frozen=True)
class Span:
    value: str
    start: int
    end: int


def find_mentions(text: str) -> list[Span]:
    """Distinct lowercased names with the span of their first occurrence (``@`` included)."""
    seen: dict[str, Span] = {}
    for m in MENTION_RE.finditer(text):
        name = m.group(1).lower()
        if name not in seen:
            seen[name] = Span(name, m.start(), m.end())
        if len(seen) >= MAX_MENTIONS:
            break
    return list(seen.values())


def find_urls(text: str) -> list[Span]:
    out: list[Span] = []
    for m in URL_RE.finditer(text):
        url = m.group(0)
        while url:
            last = url[-1]
            if last in _TRAILING:
                url = url[:-1]
            elif last in _PAIRS and url.count(_PAIRS[last]) < url.count(last):
                url = url[:-1]
            else:
                break
        if len(url) > len("https://"):
            out.append(Span(url, m.start(), m.start() + len(url)))
        if len(out) >= MAX_URLS:
            break
    return out


def check_media(media: list[tuple[str, int]], v: Violations) -> None:
    if len(media) > MAX_MEDIA:
        v.add("media", f"at most {MAX_MEDIA} items, got {len(media)}")
        return
    for i, (media_id, kind) in enumerate(media):
        if not MEDIA_ID_RE.match(media_id):
            v.add(f"media[{i}].media_id", "must be 1-64 characters of A-Z, a-z, 0-9, '_' and '-'")
        if kind == 0:
            v.add(f"media[{i}].type", "must be set (MEDIA_TYPE_IMAGE, _VIDEO or _GIF)")
