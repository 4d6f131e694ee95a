"""Hashing a file reports its bytes to a progress callback (the bar of `drive put` / `drive sync`)."""

from __future__ import annotations

from pathlib import Path

from clients.drive.blocks import Chunker, cut_file
from clients.drive.client import Transfer, hash_file


class Recorder(Transfer):
    def __init__(self) -> None:
        self.started: list[tuple[str, int]] = []
        self.advanced: list[int] = []
        self.finished = 0

    def start(self, description: str, total: int) -> None:
        self.started.append((description, total))

    def advance(self, n: int) -> None:
        self.advanced.append(n)

    def finish(self) -> None:
        self.finished += 1


def test_hash_progress_gets_the_byte_totals(tmp_path: Path) -> None:
    p = tmp_path / "big.bin"
    data = bytes(range(256)) * (3 * 4096 + 7)  # several fixed blocks and a short last one
    p.write_bytes(data)
    chunker = Chunker(block_size=256 * 1024)
    rec = Recorder()
    blocks = hash_file(p, chunker, rec, "# big.bin")
    assert blocks == cut_file(p, chunker)
    assert rec.started == [("# big.bin", len(data))]
    assert sum(rec.advanced) == len(data) and len(rec.advanced) > 1
    assert rec.finished == 1


def test_hash_progress_fastcdc(tmp_path: Path) -> None:
    import random

    p = tmp_path / "cdc.bin"
    data = random.Random(3).randbytes(3 << 20)
    p.write_bytes(data)
    rec = Recorder()
    hash_file(p, Chunker(kind="fastcdc", cdc_min=64 * 1024, cdc_avg=256 * 1024, cdc_max=1 << 20), rec)
    assert rec.started[0][1] == len(data) and sum(rec.advanced) == len(data) and rec.finished == 1
