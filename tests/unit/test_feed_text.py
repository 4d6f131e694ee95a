"""Post text rules: length in code points after NFC, characters, mentions, URLs, media."""

from __future__ import annotations

import pytest

from servers.feed import text as txt
from servers.platform.errors import Violations


def problems(text: str, *, allow_empty: bool = False) -> dict[str, str]:
    v = Violations()
    txt.check_text(txt.normalize(text), v, allow_empty=allow_empty)
    return dict(v.items)


def test_length_is_code_points_after_nfc() -> None:
    assert problems("a" * 280) == {}
    assert "at most 280" in problems("a" * 281)["text"]
    # e + combining acute: two code points typed, one after NFC
    assert len(txt.normalize("e\u0301")) == 1
    assert problems("e\u0301" * 280) == {}
    # 4-byte UTF-8 characters count once each
    assert problems("😀" * 280) == {}
    assert "got 281" in problems("😀" * 281)["text"]
    # a family emoji is 5 code points (ZWJ sequence): counted as 5
    assert len(txt.normalize("👩\u200d👩\u200d👧")) == 5


def test_empty_whitespace_and_control_characters() -> None:
    assert "required" in problems("")["text"]
    assert "required" in problems("  \n\t ")["text"]
    assert problems("", allow_empty=True) == {}  # a plain repost
    assert "whitespace" in problems("   ", allow_empty=True)["text"]
    assert "U+0007" in problems("ring\x07")["text"]
    assert "U+0000" in problems("nul\x00")["text"]
    assert problems("two\nlines\twith a tab") == {}


def test_mentions() -> None:
    spans = txt.find_mentions("hi @Alice and @bob_2, mail me at carol@example.com, @al @alice again")
    assert [s.value for s in spans] == ["alice", "bob_2"]  # lowercased, deduplicated
    text = "hi @Alice and @bob_2"
    for s in txt.find_mentions(text):
        assert text[s.start:s.end].lower() == "@" + s.value
    assert txt.find_mentions("@@double @x @toolong" + "x" * 40) == []
    many = " ".join(f"@user{i:03d}" for i in range(20))
    assert len(txt.find_mentions(many)) == txt.MAX_MENTIONS


@pytest.mark.parametrize(("text", "url"), [
    ("see https://example.com/a.", "https://example.com/a"),
    ("(https://en.wikipedia.org/wiki/Foo_(bar))", "https://en.wikipedia.org/wiki/Foo_(bar)"),
    ("(see https://example.com/x)", "https://example.com/x"),
    ("'https://example.com/q?a=1&b=2'!", "https://example.com/q?a=1&b=2"),
    ("HTTP://EXAMPLE.COM/UP", "HTTP://EXAMPLE.COM/UP"),
])
def test_urls(text: str, url: str) -> None:
    [span] = txt.find_urls(text)
    assert span.value == url
    assert text[span.start:span.end] == url


def test_url_limits() -> None:
    assert txt.find_urls("ftp://example.com https:// http://") == []
    many = " ".join(f"https://example.com/{i}" for i in range(10))
    assert len(txt.find_urls(many)) == txt.MAX_URLS


def test_media() -> None:
    v = Violations()
    txt.check_media([("img_1", 1), ("clip-2", 2)], v)
    assert not v
    v = Violations()
    txt.check_media([("bad id", 1), ("ok", 0)], v)
    assert set(dict(v.items)) == {"media[0].media_id", "media[1].type"}
    v = Violations()
    txt.check_media([("m", 1)] * 5, v)
    assert "at most 4" in dict(v.items)["media"]
