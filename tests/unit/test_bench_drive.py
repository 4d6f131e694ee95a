"""The drive benchmark's pieces, and one small end-to-end run against the real stack.

No timing is asserted: the run checks that every scenario is measured and
written, and the byte counts the scenarios are about (what a 1-byte edit and
a 1-byte insert send), not how fast anything was.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from clients.bench.drive import (
    BLOCK,
    CDC_MAX,
    CDC_MIN,
    FASTCDC,
    FIXED,
    DriveBenchOptions,
    MiB,
    buf_blocks,
    cas_key,
    file_blocks,
    fixed_ranges,
    flip_byte,
    generated_trees,
    insert_front,
    main,
    parse_size,
)


def test_parse_size() -> None:
    assert parse_size("1GiB") == 1 << 30
    assert parse_size("8MiB") == parse_size("8m") == parse_size("8 MB") == 8 << 20
    assert parse_size("512k") == 512 << 10
    assert parse_size("1048576") == 1 << 20
    assert parse_size("1.5g") == 3 << 29
    assert parse_size(4096) == 4096
    for bad in ("", "lots", "-1M", "0", "1X"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_fixed_ranges_cover_the_file() -> None:
    assert fixed_ranges(0) == []
    assert fixed_ranges(BLOCK) == [(0, BLOCK)]
    assert fixed_ranges(2 * BLOCK + 5) == [(0, BLOCK), (BLOCK, BLOCK), (2 * BLOCK, 5)]


def test_file_blocks_match_the_bytes(tmp_path: Path) -> None:
    data = os.urandom(9 * MiB + 123)
    f = tmp_path / "f.bin"
    f.write_bytes(data)
    for chunking in (FIXED, FASTCDC):
        blocks = file_blocks(f, chunking)
        assert [(b.offset, b.size, b.sha256) for b in blocks] == \
               [(b.offset, b.size, b.sha256) for b in buf_blocks(data, chunking)]
        assert sum(b.size for b in blocks) == len(data)
        assert all(b.sha256 == hashlib.sha256(data[b.offset:b.offset + b.size]).hexdigest() for b in blocks)
        if chunking == FASTCDC:
            assert all(CDC_MIN <= b.size <= CDC_MAX for b in blocks[:-1])
        else:
            assert [b.size for b in blocks] == [BLOCK, BLOCK, MiB + 123]


def test_edits_change_the_blocks_they_should(tmp_path: Path) -> None:
    f, g = tmp_path / "f.bin", tmp_path / "g.bin"
    f.write_bytes(os.urandom(16 * MiB))
    before = {c: file_blocks(f, c) for c in (FIXED, FASTCDC)}
    flip_byte(f, 8 * MiB)
    after = file_blocks(f, FIXED)
    assert sum(a.sha256 != b.sha256 for a, b in zip(before[FIXED], after, strict=True)) == 1
    insert_front(f, g)
    assert g.stat().st_size == f.stat().st_size + 1
    shifted = {c: file_blocks(g, c) for c in (FIXED, FASTCDC)}
    flipped_cdc = {b.sha256 for b in file_blocks(f, FASTCDC)}
    assert not {b.sha256 for b in shifted[FIXED]} & {b.sha256 for b in after}
    assert len([b for b in shifted[FASTCDC] if b.sha256 not in flipped_cdc]) <= 2


def test_generated_trees_differ_a_little() -> None:
    v1, v2 = generated_trees(files=200)
    assert generated_trees(files=200) == (v1, v2)
    same = sum(1 for k, v in v2.items() if v1.get(k) == v)
    assert 0.5 * len(v1) < same < len(v1)
    assert set(v2) - set(v1) and set(v1) - set(v2)


def test_cas_key_is_the_content_stores(tmp_path: Path) -> None:
    """The floor writes its objects where the service's content store would."""
    from servers.storage.cas import ContentStore
    from servers.storage.fs_blob import FilesystemBlobStore
    from servers.storage.sqlite_table import SqliteTableStore

    cas = ContentStore(FilesystemBlobStore(tmp_path / "blobs"), SqliteTableStore(tmp_path / "t.sqlite3"))
    d = hashlib.sha256(b"x").hexdigest()
    assert cas_key(d) == cas.key(d)


@pytest.mark.slow
def test_small_run_measures_every_scenario(tmp_path: Path) -> None:
    """`sysdesign bench drive --size 8MiB --local-tree`: every scenario measured and written."""
    code = main(DriveBenchOptions(size=8 * MiB, out_dir=tmp_path, local_tree=True, progress=False,
                                  argv=["sysdesign", "bench", "drive"]))
    assert code == 0
    data = json.loads((tmp_path / "drive.json").read_text())
    assert data["error"] == ""
    assert [s["key"] for s in data["scenarios"]] == ["upload", "edit", "insert", "tree", "rss"]
    rows = {(s["key"], r["figure"]): r for s in data["scenarios"] for r in s["rows"]}
    assert rows[("upload", "upload throughput")]["value"] > 0
    assert rows[("upload", "download throughput")]["value"] > 0
    assert rows[("edit", "blocks sent")]["value"] == 1
    assert rows[("edit", "bytes sent")]["passed"] is True
    assert rows[("insert", "fixed 4 MiB blocks: blocks sent")]["value"] == 3  # 8 MiB + 1 byte
    assert rows[("insert", "FastCDC: chunks sent")]["value"] <= 2
    tree = data["measurements"]["tree"]
    for key in ("fixed", "cdc"):
        assert 0 < tree[key]["uploaded_payload_bytes"][1] < tree[key]["logical_bytes"][1]
        assert tree[key]["stored_bytes"] < sum(tree[key]["logical_bytes"])
        assert tree[key]["skipped"] == []
    assert data["measurements"]["rss_timeline"]
    assert (tmp_path / "drive.md").read_text().startswith("# `drive` benchmark")
    assert (tmp_path / "drive.png").stat().st_size > 0
