"""Cutting files into blocks (fixed and FastCDC), the content hash, and the sync client's state rows."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest

from clients.drive.blocks import (
    FASTCDC,
    BlockRef,
    Chunker,
    FileChanged,
    content_hash,
    cut_bytes,
    cut_file,
    read_block,
)
from clients.drive.state import Entry, State

MiB = 1 << 20


def data(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def test_fixed_blocks_are_4_mib_but_the_last() -> None:
    payload = data(9 * MiB + 123)
    blocks = cut_bytes(payload, Chunker())
    assert [b.size for b in blocks] == [4 * MiB, 4 * MiB, MiB + 123]
    assert [b.offset for b in blocks] == [0, 4 * MiB, 8 * MiB]
    for b in blocks:
        assert b.sha256 == hashlib.sha256(payload[b.offset:b.offset + b.size]).hexdigest()


def test_exact_multiple_and_empty() -> None:
    assert [b.size for b in cut_bytes(data(8 * MiB), Chunker())] == [4 * MiB, 4 * MiB]
    assert cut_bytes(b"", Chunker()) == []
    assert cut_bytes(b"", Chunker(FASTCDC)) == []


def test_cut_file_equals_cut_bytes(tmp_path: Path) -> None:
    payload = data(11 * MiB, seed=2)
    f = tmp_path / "f.bin"
    f.write_bytes(payload)
    for ch in (Chunker(), Chunker(FASTCDC)):
        assert cut_file(f, ch) == cut_bytes(payload, ch)


def test_fastcdc_chunks_cover_the_file_within_bounds() -> None:
    payload = data(24 * MiB, seed=3)
    ch = Chunker(FASTCDC)
    blocks = cut_bytes(payload, ch)
    assert b"".join(payload[b.offset:b.offset + b.size] for b in blocks) == payload
    assert all(ch.cdc_min <= b.size <= ch.cdc_max for b in blocks[:-1])
    assert blocks[-1].size <= ch.cdc_max
    assert len(blocks) >= 4


def test_fastcdc_insert_at_front_changes_one_chunk_fixed_changes_all() -> None:
    payload = data(24 * MiB, seed=4)
    shifted = os.urandom(100) + payload
    for ch, most in ((Chunker(FASTCDC), 2), (Chunker(), None)):
        before = {b.sha256 for b in cut_bytes(payload, ch)}
        after = cut_bytes(shifted, ch)
        new = [b for b in after if b.sha256 not in before]
        if most is None:
            assert len(new) == len(after), "fixed blocks all shift"
        else:
            assert 1 <= len(new) <= most, [b.size for b in new]


def test_content_hash_is_sha256_of_the_hex_hashes_in_order() -> None:
    blocks = cut_bytes(data(9 * MiB), Chunker())
    want = hashlib.sha256("".join(b.sha256 for b in blocks).encode()).hexdigest()
    assert content_hash(blocks) == want == content_hash([b.sha256 for b in blocks])
    assert content_hash([]) == hashlib.sha256(b"").hexdigest()
    assert content_hash(list(reversed(blocks))) != want


def test_read_block_notices_a_changed_file(tmp_path: Path) -> None:
    f = tmp_path / "f.bin"
    f.write_bytes(data(5 * MiB))
    blocks = cut_file(f, Chunker())
    with open(f, "rb") as fh:
        assert len(read_block(fh, blocks[1])) == MiB
    with open(f, "r+b") as fh:
        fh.seek(4 * MiB + 10)
        fh.write(b"!")
    with open(f, "rb") as fh, pytest.raises(FileChanged):
        read_block(fh, blocks[1])


@pytest.mark.parametrize("kw", [{"kind": "rabin"}, {"block_size": 0}, {"block_size": 9 * MiB},
                                {"kind": FASTCDC, "cdc_min": 4 * MiB, "cdc_avg": 2 * MiB}])
def test_bad_chunker_settings(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Chunker(**kw)  # type: ignore[arg-type]


def test_state_moves_a_tree_and_keeps_one_row_per_node(tmp_path: Path) -> None:
    s = State(tmp_path / "s" / "state.db")
    b = (BlockRef(0, 3, "a" * 64),)
    s.put(Entry("docs", "d", "10"))
    s.put(Entry("docs/a.txt", "f", "11", 2, 3, 5, 7, b, "h"))
    s.put(Entry("docs/sub", "d", "12"))
    s.put(Entry("docs/sub/b.txt", "f", "13", 1))
    s.put(Entry("docs2.txt", "f", "14", 1))  # sorts between "docs/" and "docs0": not inside
    assert [e.path for e in s.below("docs")] == ["docs/a.txt", "docs/sub", "docs/sub/b.txt"]
    s.move_tree("docs", "papers/docs")
    assert [e.path for e in s.all()] == ["docs2.txt", "papers/docs", "papers/docs/a.txt", "papers/docs/sub",
                                         "papers/docs/sub/b.txt"]
    moved = s.by_node("11")
    assert moved is not None and moved.blocks == b and moved.revision == 2 and moved.inode == 7
    s.put(Entry("elsewhere.txt", "f", "11", 3))
    assert s.get("papers/docs/a.txt") is None and s.by_node("11").path == "elsewhere.txt"  # type: ignore[union-attr]
    s.delete_tree("papers")
    assert [e.path for e in s.all()] == ["docs2.txt", "elsewhere.txt"]
    s.set_meta("cursor", "abc")
    s.close()
    assert State(tmp_path / "s" / "state.db").meta("cursor") == "abc"


def test_recut_hashes_again_only_the_blocks_that_changed(tmp_path: Path) -> None:
    from clients.drive.blocks import recut_file

    ch = Chunker(block_size=64 * 1024)
    p = tmp_path / "f.bin"
    p.write_bytes(os.urandom(10 * 64 * 1024 + 123))
    first, quick = recut_file(p, ch)
    assert first == cut_file(p, ch) and len(quick) == len(first) == 11
    # One byte changed in block 4, and the tail grown by a byte.
    data = bytearray(p.read_bytes())
    data[4 * 64 * 1024 + 7] ^= 0xFF
    data += b"!"
    p.write_bytes(bytes(data))
    again, quick2 = recut_file(p, ch, first, quick)
    assert again == cut_file(p, ch)
    assert [i for i, (a, b) in enumerate(zip(first, again, strict=True)) if a != b] == [4, 10]
    assert [i for i, (a, b) in enumerate(zip(quick, quick2, strict=True)) if a != b] == [4, 10]
    # A stale quick digest beside a wrong SHA-256 is not trusted blindly: a mismatch in
    # the quick digest means the block is hashed again, so the answer is right.
    lying = [first[0]._replace(sha256=hashlib.sha256(b"not it").hexdigest()), *again[1:]]
    wrong_quick = ["0" * 32, *quick2[1:]]
    fixed, _ = recut_file(p, ch, lying, wrong_quick)
    assert fixed == cut_file(p, ch)


def test_state_keeps_the_quick_digests_across_reopen(tmp_path: Path) -> None:
    from clients.drive.blocks import recut_file

    p = tmp_path / "f.bin"
    p.write_bytes(os.urandom(3 * MiB + 5))
    ch = Chunker(block_size=MiB)
    blocks, quick = recut_file(p, ch)
    st = State(tmp_path / "state.db")
    assert st.quick_of("f.bin") == ([], [])
    st.set_quick("f.bin", blocks, quick)
    st.close()
    st = State(tmp_path / "state.db")
    try:
        assert st.quick_of("f.bin") == (blocks, quick)
    finally:
        st.close()
