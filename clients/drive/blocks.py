"""Cutting a file into content-addressed blocks, the way DriveService stores it.

Two ways, as the namespace's settings say (drive.v1 ``Settings``):

- **fixed**: 4 MiB blocks, the last one shorter. A byte inserted at the
  front shifts every boundary, so every block changes.
- **FastCDC** (2020): boundaries where a rolling hash of the content says,
  between a minimum and a maximum size around an average. A byte inserted at
  the front changes the first chunk only; the cut points after it fall in
  the same places relative to the content.

Both stream through the file: memory stays at one block (or pyfastcdc's
read buffer), whatever the file's size. A block is identified by the
SHA-256 of its bytes (lowercase hex); a file's ``content_hash`` is the
SHA-256 of its block hashes, hex, concatenated in order, so equal content
cut the same way has an equal hash without reading the bytes again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

MiB = 1 << 20
FIXED = "fixed"
FASTCDC = "fastcdc"
# The largest block the contract accepts (Block.size_bytes).
MAX_BLOCK = 8 * MiB
_READ = 1 * MiB


class BlockRef(NamedTuple):
    """One block of a file: where it is and what its bytes hash to."""
    offset: int
    size: int
    sha256: str


@dataclass(frozen=True)
class Chunker:
    """How to cut: fixed blocks of ``block_size``, or FastCDC with these bounds."""
    kind: str = FIXED
    block_size: int = 4 * MiB
    cdc_min: int = 512 * 1024
    cdc_avg: int = 2 * MiB
    cdc_max: int = 8 * MiB

    def __post_init__(self) -> None:
        if self.kind not in (FIXED, FASTCDC):
            raise ValueError(f"chunking {self.kind!r}: expected {FIXED} or {FASTCDC}")
        if self.kind == FIXED and not 1 <= self.block_size <= MAX_BLOCK:
            raise ValueError(f"block size {self.block_size}: expected 1..{MAX_BLOCK}")
        if self.kind == FASTCDC and not (0 < self.cdc_min <= self.cdc_avg <= self.cdc_max <= MAX_BLOCK):
            raise ValueError(f"FastCDC sizes min {self.cdc_min} avg {self.cdc_avg} max {self.cdc_max}: "
                             f"expected 0 < min <= avg <= max <= {MAX_BLOCK}")

    @classmethod
    def from_settings(cls, settings: object) -> Chunker:
        """The chunker of a drive.v1 ``Settings`` message (its defaults where a size is unset)."""
        from sysdesign.drive.v1 import drive_pb2 as pb

        kind = FASTCDC if getattr(settings, "chunking", 0) == pb.CHUNKING_FASTCDC else FIXED
        d = cls()
        return cls(kind=kind,
                   block_size=int(getattr(settings, "block_size_bytes", 0) or d.block_size),
                   cdc_min=int(getattr(settings, "cdc_min_bytes", 0) or d.cdc_min),
                   cdc_avg=int(getattr(settings, "cdc_avg_bytes", 0) or d.cdc_avg),
                   cdc_max=int(getattr(settings, "cdc_max_bytes", 0) or d.cdc_max))

    @property
    def proto(self) -> int:
        """The drive.v1 ``Chunking`` value."""
        from sysdesign.drive.v1 import drive_pb2 as pb

        return int(pb.CHUNKING_FASTCDC if self.kind == FASTCDC else pb.CHUNKING_FIXED)


def cut_stream(f: BinaryIO, chunker: Chunker, on_bytes: Callable[[int], None] | None = None
               ) -> Iterator[BlockRef]:
    """The blocks of what ``f`` reads from its current position to its end (offsets from there)."""
    if chunker.kind == FIXED:
        yield from _cut_fixed(f, chunker.block_size, on_bytes)
        return
    from pyfastcdc import FastCDC

    # The parameters as FastCDC 2020 (and fastcdc-rs) name them, so every
    # client cuts the same content at the same points.
    cdc = FastCDC(avg_size=chunker.cdc_avg, min_size=chunker.cdc_min, max_size=chunker.cdc_max)
    for chunk in cdc.cut_stream(f):
        # The chunk's view is valid only until the next one is cut: hash it now.
        yield BlockRef(chunk.offset, chunk.length, hashlib.sha256(chunk.data).hexdigest())
        if on_bytes:
            on_bytes(chunk.length)


def _cut_fixed(f: BinaryIO, block_size: int, on_bytes: Callable[[int], None] | None) -> Iterator[BlockRef]:
    offset = 0
    buf = bytearray(min(block_size, _READ))
    view = memoryview(buf)
    while True:
        h = hashlib.sha256()
        size = 0
        while size < block_size:
            want = min(len(buf), block_size - size)
            n = f.readinto(view[:want])  # type: ignore[attr-defined]
            if not n:
                break
            h.update(view[:n])
            size += n
            if on_bytes:
                on_bytes(n)
        if not size:
            return
        yield BlockRef(offset, size, h.hexdigest())
        offset += size
        if size < block_size:
            return


def cut_file(path: str | Path, chunker: Chunker, on_bytes: Callable[[int], None] | None = None
             ) -> list[BlockRef]:
    """Every block of the file at ``path``, in order (an empty file has none)."""
    with open(path, "rb") as f:
        return list(cut_stream(f, chunker, on_bytes))


def cut_bytes(data: bytes, chunker: Chunker) -> list[BlockRef]:
    """The blocks of ``data`` (what ``cut_file`` says for a file holding it)."""
    import io

    return list(cut_stream(io.BytesIO(data), chunker))


def content_hash(hashes: list[str] | list[BlockRef]) -> str:
    """SHA-256 over the block hashes (hex) concatenated in order: the file's ``content_hash``."""
    h = hashlib.sha256()
    for b in hashes:
        h.update((b.sha256 if isinstance(b, BlockRef) else b).encode())
    return h.hexdigest()


def read_block(f: BinaryIO, block: BlockRef) -> bytes:
    """A block's bytes from an open file, checked against its hash (``FileChanged`` when they differ)."""
    f.seek(block.offset)
    data = f.read(block.size)
    if len(data) != block.size or hashlib.sha256(data).hexdigest() != block.sha256:
        raise FileChanged(f"the file changed while it was being sent (block at {block.offset})")
    return data


class FileChanged(Exception):
    """A file's bytes no longer match the blocks cut from it: it is being written to."""


def quick_digest(data: bytes | memoryview) -> str:
    """A block's quick digest: XXH3-128, an order of magnitude faster than SHA-256.

    Kept locally beside each block's SHA-256 (never sent, never trusted by the
    server) so that a changed file is re-hashed only where it changed: a block
    whose quick digest and size are what they were keeps its SHA-256 without
    SHA-256 reading it again. A collision would need 2^64 tries on purpose and
    is as unlikely as a SHA-256 one by accident; a user able to craft one
    already writes the file."""
    import xxhash

    return xxhash.xxh3_128_hexdigest(data)


def recut_file(path: str | Path, chunker: Chunker, known: Sequence[BlockRef] = (),
               known_quick: Sequence[str] = (), on_bytes: Callable[[int], None] | None = None
               ) -> tuple[list[BlockRef], list[str]]:
    """``cut_file`` for a file cut before: (its blocks, their quick digests).

    With fixed blocks, each block is read once and quick-hashed; only a block
    whose quick digest or size differs from the one ``known`` at its place is
    SHA-256 hashed. So one byte changed in a 1 GiB file costs one SHA-256 of
    one block plus an XXH3 pass over the file. FastCDC moves its cut points
    with the content, so there every chunk is hashed both ways."""
    blocks: list[BlockRef] = []
    quick: list[str] = []
    with open(path, "rb") as f:
        if chunker.kind != FIXED:
            for b in cut_stream(f, chunker, on_bytes):
                blocks.append(b)
            for b in blocks:
                f.seek(b.offset)
                quick.append(quick_digest(f.read(b.size)))
            return blocks, quick
        buf = bytearray(chunker.block_size)
        view = memoryview(buf)
        offset = 0
        i = 0
        while True:
            size = 0
            while size < chunker.block_size:
                n = f.readinto(view[size:])  # type: ignore[attr-defined]
                if not n:
                    break
                size += n
            if not size:
                break
            data = view[:size]
            q = quick_digest(data)
            prev = known[i] if i < len(known) and i < len(known_quick) else None
            if prev is not None and prev.offset == offset and prev.size == size and known_quick[i] == q:
                sha = prev.sha256
            else:
                sha = hashlib.sha256(data).hexdigest()
            blocks.append(BlockRef(offset, size, sha))
            quick.append(q)
            if on_bytes:
                on_bytes(size)
            offset += size
            i += 1
            if size < chunker.block_size:
                break
    return blocks, quick
