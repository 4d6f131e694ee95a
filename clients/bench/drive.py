"""`sysdesign bench drive`: file sync (DriveService) against floors measured in the same run.

Five scenarios, each a figure next to a floor or a target:

1. ``upload``  First upload of a ``--size`` file of random bytes (1 GiB by
   default): the client hashes it into fixed 4 MiB blocks (two threads),
   commits (every block comes back missing), streams the blocks over
   ``--streams`` concurrent UploadBlocks calls (2 MiB messages) and commits
   again; timed from the first byte hashed to the last commit's answer. The
   floor is **the blob port writing the same bytes in 4 MiB objects under the
   content store's key layout** (``cas/sha256/ab/cd/<digest>``, and its
   write call, ``put_without_etag``), in-process,
   with the same concurrency, on the same filesystem (a sibling directory of
   the stack's data dir): no gRPC, no hashing, no table writes. Download: the
   head revision streamed back over ``--streams`` DownloadBlocks calls, every
   block verified against its hash and written at its offset into a file,
   against the blob port reading the same objects. Target >= 0.7x both ways.
2. ``edit``  One byte changed in the middle: the client reads the file
   again with the quick digest it kept per block (XXH3-128,
   ``clients/drive/blocks.py`` ``recut_file``), SHA-256 hashes the block
   whose quick digest changed, commits against the first revision, uploads
   what is missing, commits. Bytes sent (UploadBlocks payload plus the serialized CommitFile
   requests) <= one block + the two commits; time <= 0.1x the first upload.
3. ``insert``  One byte inserted at the front, committed over the edited
   file with fixed blocks (every block shifts: the whole file is sent), and
   with FastCDC in a namespace whose setting is CHUNKING_FASTCDC, over the
   same (edited) file first uploaded there: at most 2 chunks sent.
4. ``tree``  Two versions of a real source tree (two Django sdists from the
   package index by default, cached under ``~/.cache/sysdesign/bench``),
   the first uploaded file by file, then the second over it (a changed file
   commits against the first version's revision): files, logical bytes,
   bytes uploaded for v2, bytes stored (the unique blocks of both versions)
   and the dedup ratio, with fixed blocks and with FastCDC, each in its own
   namespace. When the index cannot be reached a generated tree stands in,
   and the report says so.
5. ``rss``  The server process's RSS sampled every 100 ms during the first
   upload, against its RSS just before it. Target: peak <= idle + 100 MB.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from clients.bench.report import (
    ProgressUI,
    Row,
    RunReport,
    Scenario,
    command_line,
    machine_info,
    print_report,
    to_markdown,
)
from clients.bench.stack import Stack, rss_tree
from clients.drive.blocks import BlockRef, Chunker, quick_digest, recut_file

KiB = 1024
MiB = 1024 * 1024
GiB = 1024 * MiB
MB = 1_000_000
BLOCK = 4 * MiB  # the service's fixed block size
CDC_MIN, CDC_AVG, CDC_MAX = 512 * KiB, 2 * MiB, 8 * MiB
PIECE = 2 * MiB  # bytes per UploadBlocks message (the server takes up to 8 MiB)
STREAM_BYTES = 256 * MiB  # an UploadBlocks call ends after this much; the next one goes on
FIXED, FASTCDC = 1, 2  # sysdesign.drive.v1.Chunking
DEFAULT_TREE = ("django==5.0.6", "django==5.1.3")

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """``"1GiB"``, ``"8MiB"``, ``"512k"``, ``"1048576"`` -> bytes (K, M, G, T are powers of 1024)."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (try 1GiB, 64MiB, 1048576)")
    n, unit = float(m.group(1)), m.group(2).lower()
    size = int(n * {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1024 * GiB}[unit])
    if size < 1:
        raise ValueError(f"a size is at least 1 byte: {text!r}")
    return size


def human_bytes(n: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


@dataclass
class DriveBenchOptions:
    size: int = GiB
    out_dir: Path = Path("bench-results")
    streams: int = 3
    rounds: int = 1
    tree: tuple[str, ...] = DEFAULT_TREE
    local_tree: bool = False  # skip the package index: a generated tree
    keep_data: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)
    progress: bool = True
    argv: list[str] | None = None


# --------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class FileBlock:
    offset: int
    size: int
    sha256: str
    quick: str = ""  # XXH3-128, kept by the client so an edited file is re-hashed only where it changed


def _hash_range(fd: int, offset: int, size: int) -> tuple[str, str]:
    # os.pread and hashlib both let go of the GIL: two threads hash on two cores
    data = os.pread(fd, size, offset)
    return hashlib.sha256(data).hexdigest(), quick_digest(data)


def hash_ranges(path: Path, ranges: Sequence[tuple[int, int]], workers: int = 2,
                on_bytes: Callable[[int], None] | None = None) -> list[FileBlock]:
    """SHA-256 of each (offset, size) range of the file, ``workers`` threads at a time."""
    fd = os.open(path, os.O_RDONLY)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            def one(r: tuple[int, int]) -> FileBlock:
                d, q = _hash_range(fd, r[0], r[1])
                if on_bytes:
                    on_bytes(r[1])
                return FileBlock(r[0], r[1], d, q)
            return list(pool.map(one, ranges))
    finally:
        os.close(fd)


def fixed_ranges(size: int, block: int = BLOCK) -> list[tuple[int, int]]:
    return [(off, min(block, size - off)) for off in range(0, size, block)]


def cdc_ranges_of_file(path: Path) -> list[tuple[int, int]]:
    """FastCDC cut points of a file (the service's 512 KiB / 2 MiB / 8 MiB)."""
    import pyfastcdc

    cdc = pyfastcdc.FastCDC(avg_size=CDC_AVG, min_size=CDC_MIN, max_size=CDC_MAX)
    return [(c.offset, c.length) for c in cdc.cut_file(str(path))]


def file_blocks(path: Path, chunking: int, on_bytes: Callable[[int], None] | None = None) -> list[FileBlock]:
    size = path.stat().st_size
    ranges = fixed_ranges(size) if chunking == FIXED else cdc_ranges_of_file(path) if size else []
    return hash_ranges(path, ranges, on_bytes=on_bytes)


def buf_blocks(data: bytes, chunking: int) -> list[FileBlock]:
    if chunking == FIXED:
        ranges = fixed_ranges(len(data))
    else:
        import pyfastcdc

        cdc = pyfastcdc.FastCDC(avg_size=CDC_AVG, min_size=CDC_MIN, max_size=CDC_MAX)
        ranges = [(c.offset, c.length) for c in cdc.cut_buf(data)] if data else []
    view = memoryview(data)
    return [FileBlock(o, n, hashlib.sha256(view[o:o + n]).hexdigest()) for o, n in ranges]


# --------------------------------------------------------------------------- client


@dataclass
class Sent:
    """What a put sent: UploadBlocks payload and the serialized CommitFile requests."""

    payload_bytes: int = 0
    blocks: int = 0
    commit_bytes: int = 0
    commits: int = 0

    @property
    def total(self) -> int:
        return self.payload_bytes + self.commit_bytes

    def add(self, other: Sent) -> None:
        self.payload_bytes += other.payload_bytes
        self.blocks += other.blocks
        self.commit_bytes += other.commit_bytes
        self.commits += other.commits


Source = Callable[[int, int], bytes]  # (offset, size) -> bytes


def file_source(fd: int) -> Source:
    return lambda offset, size: os.pread(fd, size, offset)


def bytes_source(data: bytes) -> Source:
    view = memoryview(data)
    return lambda offset, size: bytes(view[offset:offset + size])


class DriveClient:
    """The bench's own client: commit, upload what is missing over concurrent streams, commit."""

    def __init__(self, addr: str, token: str, streams: int = 3, piece: int = PIECE) -> None:
        import grpc
        from sysdesign.drive.v1 import drive_pb2 as pb
        from sysdesign.drive.v1 import drive_pb2_grpc as pbg

        self.pb = pb
        self.md = (("authorization", f"Bearer {token}"),)
        self.streams = max(1, streams)
        self.piece = piece
        self.channel = grpc.insecure_channel(addr, options=[
            ("grpc.max_send_message_length", 16 * MiB), ("grpc.max_receive_message_length", 16 * MiB)])
        self.stub = pbg.DriveServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> DriveClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_chunking(self, chunking: int) -> None:
        req = self.pb.UpdateSettingsRequest(chunking=chunking)  # type: ignore[arg-type]
        self.stub.UpdateSettings(req, metadata=self.md, timeout=30)

    def _commit(self, req: Any, sent: Sent) -> Any:
        sent.commit_bytes += req.ByteSize()
        sent.commits += 1
        return self.stub.CommitFile(req, metadata=self.md, timeout=120)

    def upload(self, blocks: Sequence[FileBlock], source: Source, sent: Sent,
               on_bytes: Callable[[int], None] | None = None, streams: int | None = None) -> None:
        """Every block of ``blocks`` over ``streams`` concurrent UploadBlocks calls."""
        todo: deque[FileBlock] = deque(blocks)
        lock = threading.Lock()
        pb, piece = self.pb, self.piece

        def messages() -> Iterator[Any]:
            budget = STREAM_BYTES
            while budget > 0:
                try:
                    b = todo.popleft()
                except IndexError:
                    return
                data = source(b.offset, b.size)
                view = memoryview(data)
                for off in range(0, len(data), piece):
                    chunk = view[off:off + piece]
                    last = off + piece >= len(data)
                    yield pb.UploadBlocksRequest(sha256=b.sha256, data=bytes(chunk), last=last)
                    with lock:
                        sent.payload_bytes += len(chunk)
                    if on_bytes:
                        on_bytes(len(chunk))
                with lock:
                    sent.blocks += 1
                budget -= b.size

        def worker() -> None:
            while todo:
                self.stub.UploadBlocks(messages(), metadata=self.md, timeout=300)

        n = min(streams or self.streams, len(blocks))
        if n <= 1:
            worker()
            return
        with ThreadPoolExecutor(max_workers=n) as pool:
            for f in [pool.submit(worker) for _ in range(n)]:
                f.result()

    def put(self, path: str, blocks: Sequence[FileBlock], source: Source, *, base: int = 0,
            chunking: int = 0, on_bytes: Callable[[int], None] | None = None,
            streams: int | None = None) -> tuple[Any, Sent]:
        """The client's dance; (the committed node, what was sent)."""
        pb = self.pb
        sent = Sent()
        req = pb.CommitFileRequest(path=path, base_revision=base, chunking=chunking, device="bench",
                                   blocks=[pb.Block(sha256=b.sha256, size_bytes=b.size) for b in blocks])
        resp = self._commit(req, sent)
        if resp.missing_blocks:
            missing = set(resp.missing_blocks)
            todo, seen = [], set()
            for b in blocks:
                if b.sha256 in missing and b.sha256 not in seen:
                    seen.add(b.sha256)
                    todo.append(b)
            self.upload(todo, source, sent, on_bytes, streams)
            req.expect_uploaded = True
            resp = self._commit(req, sent)
        if resp.conflicted:
            raise RuntimeError(f"{path}: the commit against revision {base} became a conflicted copy")
        return resp.node, sent

    def download(self, path: str, out: Path, blocks: Sequence[FileBlock], revision: int = 0,
                 on_bytes: Callable[[int], None] | None = None) -> int:
        """The revision's blocks over concurrent DownloadBlocks calls, verified, written at their
        offsets into ``out``; bytes received."""
        pb = self.pb
        size = sum(b.size for b in blocks)
        n = max(1, min(self.streams, len(blocks)))
        per = -(-len(blocks) // n) if blocks else 0
        groups = [list(blocks[i:i + per]) for i in range(0, len(blocks), per)] if per else []
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        received = [0]
        lock = threading.Lock()
        try:
            os.ftruncate(fd, size)

            def fetch(group: list[FileBlock]) -> None:
                req = pb.DownloadBlocksRequest(path=path, revision=revision, sha256=[b.sha256 for b in group])
                i, pos, h = 0, 0, hashlib.sha256()
                for m in self.stub.DownloadBlocks(req, metadata=self.md, timeout=600):
                    # hashed and written piece by piece: no block-sized buffer, no copy
                    b = group[i]
                    h.update(m.data)
                    os.pwrite(fd, m.data, b.offset + pos)
                    pos += len(m.data)
                    if on_bytes:
                        on_bytes(len(m.data))
                    if m.last:
                        if pos != b.size or h.hexdigest() != b.sha256:
                            raise RuntimeError(f"{path}: block {i} does not match {b.sha256}")
                        with lock:
                            received[0] += pos
                        i, pos, h = i + 1, 0, hashlib.sha256()
                if i != len(group):
                    raise RuntimeError(f"{path}: {len(group) - i} block(s) never came")

            with ThreadPoolExecutor(max_workers=n) as pool:
                for f in [pool.submit(fetch, g) for g in groups]:
                    f.result()
        finally:
            os.close(fd)
        return received[0]


    def stream_only(self, path: str) -> int:
        """One DownloadBlocks call of the head revision, the bytes counted and dropped: the ceiling
        of the server and gRPC without the client's verifying and writing."""
        n = 0
        for m in self.stub.DownloadBlocks(self.pb.DownloadBlocksRequest(path=path), metadata=self.md, timeout=600):
            n += len(m.data)
        return n


# --------------------------------------------------------------------------- floors


def _floor_store(stack: Stack, root: Path) -> Any:
    """A blob store on the stack's backend: a sibling directory, or the same bucket."""
    from servers.platform.config import Config
    from servers.storage.backends import open_blob_store

    env = stack.extra_env
    config = Config(data_dir=root, s3_endpoint=env.get("SYSDESIGN_S3_ENDPOINT", ""),
                    s3_bucket=env.get("SYSDESIGN_S3_BUCKET", "sysdesign"),
                    s3_region=env.get("SYSDESIGN_S3_REGION", "us-east-1"))
    return open_blob_store(config)


def cas_key(digest: str) -> str:
    """The content store's key of a block (servers.storage.cas.ContentStore.key, prefix ``cas``)."""
    return f"cas/sha256/{digest[:2]}/{digest[2:4]}/{digest}"


def raw_blob_seconds(stack: Stack, path: Path, blocks: Sequence[FileBlock], root: Path,
                     concurrency: int) -> tuple[float, float]:
    """The blob port writing the file's blocks as objects, then reading them: (write s, read s)."""

    async def go() -> tuple[float, float]:
        store = _floor_store(stack, root)
        prefix = f"bench-floor-{time.time_ns()}"
        sem = asyncio.Semaphore(concurrency)
        fd = os.open(path, os.O_RDONLY)
        try:
            async def put(b: FileBlock) -> None:
                async with sem:
                    data = await asyncio.to_thread(os.pread, fd, b.size, b.offset)
                    # the content store's own write (no etag: it names blocks by their hash)
                    await store.put_without_etag(f"{prefix}/{cas_key(b.sha256)}", data)

            async def get(b: FileBlock) -> None:
                async with sem:
                    await store.get(f"{prefix}/{cas_key(b.sha256)}")

            t0 = time.perf_counter()
            await asyncio.gather(*(put(b) for b in blocks))
            t1 = time.perf_counter()
            await asyncio.gather(*(get(b) for b in blocks))
            t2 = time.perf_counter()
            await store.delete_prefix(prefix + "/")
            return t1 - t0, t2 - t1
        finally:
            os.close(fd)
            await store.close()

    return asyncio.run(go())


# --------------------------------------------------------------------------- inputs


def write_random_file(path: Path, size: int, progress: Callable[[int], None] | None = None) -> None:
    with open(path, "wb") as f:
        done = 0
        while done < size:
            n = min(16 * MiB, size - done)
            f.write(os.urandom(n))
            done += n
            if progress:
                progress(done)


def insert_front(src: Path, dst: Path, byte: bytes = b"\x00") -> None:
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        fo.write(byte)
        shutil.copyfileobj(fi, fo, 16 * MiB)


def flip_byte(path: Path, offset: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        b = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([b[0] ^ 0xFF]), offset)
    finally:
        os.close(fd)


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "sysdesign" / "bench"


def fetch_sdist(spec: str, dest: Path) -> Path:
    """``pip download --no-deps --no-binary :all: <spec>`` into ``dest`` (cached); the archive."""
    name, _, version = spec.partition("==")
    dest.mkdir(parents=True, exist_ok=True)
    stem = re.compile(rf"^{re.escape(name)}-{re.escape(version)}\.(tar\.gz|zip)$", re.IGNORECASE)
    hits = [p for p in dest.iterdir() if stem.match(p.name)]
    if not hits:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "--no-build-isolation", "-q", "-d", str(dest), spec],
                       check=True, capture_output=True, timeout=300, stdin=subprocess.DEVNULL)
        hits = [p for p in dest.iterdir() if stem.match(p.name)]
    if not hits:
        raise RuntimeError(f"pip download {spec} left no archive in {dest}")
    return hits[0]


def read_tree_archive(archive: Path) -> dict[str, bytes]:
    """Every regular file of a .tar.gz sdist, by path relative to its top directory."""
    out: dict[str, bytes] = {}
    with tarfile.open(archive) as tf:
        for m in tf.getmembers():
            if not m.isfile():
                continue
            parts = m.name.split("/")[1:]  # drop "Django-5.0.6/"
            f = tf.extractfile(m)
            if parts and f is not None:
                out["/".join(parts)] = f.read()
    return out


def generated_trees(seed: int = 7, files: int = 600) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """Two versions of a made-up source tree: v2 edits a fifth of the files, adds and drops some."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(2000)]

    def text(n: int) -> bytes:
        return " ".join(rng.choice(words) for _ in range(n)).encode() + b"\n"

    v1 = {f"pkg{i % 20}/mod{i}.py": text(rng.randint(50, 4000)) for i in range(files)}
    v1["data/blob.bin"] = rng.randbytes(3 * MiB)
    v2 = dict(v1)
    for k in rng.sample(sorted(v1), files // 5):
        body = v2[k]
        at = rng.randrange(len(body))
        v2[k] = body[:at] + text(20) + body[at:]
    for k in rng.sample(sorted(v1), files // 50):
        v2.pop(k, None)
    for i in range(files // 25):
        v2[f"pkg_new/mod{i}.py"] = text(rng.randint(50, 2000))
    return v1, v2


def load_trees(specs: Sequence[str], local: bool, work: Path) -> tuple[dict[str, bytes], dict[str, bytes], str]:
    """(v1 files, v2 files, where they came from)."""
    if not local and len(specs) == 2:
        try:
            a, b = (read_tree_archive(fetch_sdist(s, cache_dir() / "sdists")) for s in specs)
            return a, b, f"{specs[0]} and {specs[1]} sdists from the package index (pip download)"
        except (OSError, RuntimeError, subprocess.SubprocessError, tarfile.TarError) as exc:
            reason = str(exc).strip().splitlines()[-1:] or [type(exc).__name__]
            v1, v2 = generated_trees()
            return v1, v2, f"a generated tree (the package index failed: {reason[0][:200]})"
    v1, v2 = generated_trees()
    return v1, v2, "a generated tree (--local-tree)"


# --------------------------------------------------------------------------- tree upload


@dataclass
class TreeResult:
    files: tuple[int, int] = (0, 0)
    logical: tuple[int, int] = (0, 0)
    sent: tuple[Sent, Sent] = field(default_factory=lambda: (Sent(), Sent()))
    stored: int = 0
    seconds: tuple[float, float] = (0.0, 0.0)
    skipped: list[str] = field(default_factory=list)

    @property
    def dedup_ratio(self) -> float:
        return sum(self.logical) / self.stored if self.stored else 0.0


def upload_tree(client: DriveClient, root: str, v1: dict[str, bytes], v2: dict[str, bytes], chunking: int,
                workers: int = 4, progress: Callable[[int], None] | None = None) -> TreeResult:
    """v1 file by file, then v2 over it (a file v1 had commits against v1's revision)."""
    res = TreeResult()
    unique: dict[str, int] = {}
    revs: dict[str, int] = {}
    lock = threading.Lock()
    done = [0]
    sents: list[Sent] = []
    secs: list[float] = []
    for version, tree in enumerate((v1, v2)):
        total = Sent()

        def one(item: tuple[str, bytes], total: Sent = total, version: int = version) -> None:
            rel, data = item
            blocks = buf_blocks(data, chunking)
            try:
                node, sent = client.put(f"{root}/{rel}", blocks, bytes_source(data),
                                        base=revs.get(rel, 0) if version else 0, chunking=chunking, streams=1)
            except Exception as exc:  # a name the service refuses: counted, reported
                code = getattr(exc, "code", None)
                if code is None:
                    raise
                with lock:
                    res.skipped.append(f"{rel}: {code().name}")
                return
            with lock:
                total.add(sent)
                revs[rel] = int(node.head.revision)
                for b in blocks:
                    unique[b.sha256] = b.size
                done[0] += 1
                if progress:
                    progress(done[0])

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(one, sorted(tree.items())))
        secs.append(time.perf_counter() - t0)
        sents.append(total)
    res.files = (len(v1), len(v2))
    res.logical = (sum(map(len, v1.values())), sum(map(len, v2.values())))
    res.sent = (sents[0], sents[1])
    res.seconds = (secs[0], secs[1])
    res.stored = sum(unique.values())
    return res


# --------------------------------------------------------------------------- RSS


class RssSampler:
    """The stack's RSS (server process, and the tree) every ``every_s``."""

    def __init__(self, pid: int, every_s: float = 0.1) -> None:
        self.pid, self.every_s = pid, every_s
        self.samples: list[tuple[float, float, float]] = []  # (t, server MiB, tree MiB)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.perf_counter()

    def _run(self) -> None:
        while not self._stop.is_set():
            s = rss_tree(self.pid)
            self.samples.append((time.perf_counter() - self._t0, s.server_mib, s.total_mib))
            self._stop.wait(self.every_s)

    def __enter__(self) -> RssSampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()

    @property
    def peak_server(self) -> float:
        return max((s for _, s, _ in self.samples), default=0.0)

    @property
    def peak_tree(self) -> float:
        return max((t for _, _, t in self.samples), default=0.0)


# --------------------------------------------------------------------------- run


def _settings(o: DriveBenchOptions) -> dict[str, Any]:
    if o.size < BLOCK:
        raise ValueError(f"--size is at least {BLOCK // MiB} MiB (one block)")
    return {
        "size": human_bytes(o.size),
        "size_bytes": o.size,
        "streams": o.streams,
        "rounds": max(1, o.rounds),
        "message_bytes": PIECE,
        "block_bytes": BLOCK,
        "tree": "generated" if o.local_tree else " / ".join(o.tree),
        "backend": "s3" if o.extra_env.get("SYSDESIGN_S3_ENDPOINT") else "filesystem",
    }


class _Bar:
    """A counting progress callback safe to call from several threads."""

    def __init__(self, ui: ProgressUI, label: str, total: int) -> None:
        self._cb = ui.count(label, total)
        self._n = 0
        self._lock = threading.Lock()
        self._last = 0.0

    def __call__(self, n: int) -> None:
        with self._lock:
            self._n += n
            now = time.monotonic()
            if now - self._last < 0.1:
                return
            self._last = now
            done = self._n
        self._cb(done)


def run(o: DriveBenchOptions, console: Console) -> RunReport:
    s = _settings(o)
    report = RunReport(system="drive", command=command_line(o.argv), machine=machine_info(), settings=s)
    size = o.size
    base = Path(tempfile.mkdtemp(prefix="sysdesign-bench-drive-"))
    env = {"SYSDESIGN_ACCESS_LOG": "0", **o.extra_env}
    stack = Stack(base / "data", extra_env=env)
    up_sc = Scenario("upload", f"First upload and download of {s['size']} (fixed 4 MiB blocks) vs the blob "
                               f"port writing and reading the same 4 MiB objects ({s['backend']})")
    edit_sc = Scenario("edit", f"One byte changed in the middle of the {s['size']} file")
    ins_sc = Scenario("insert", f"One byte inserted at the front of the {s['size']} file")
    tree_sc = Scenario("tree", "A source tree uploaded twice (v1, then v2 over it): dedup")
    rss_sc = Scenario("rss", f"Server RSS during the {s['size']} upload")
    report.scenarios = [up_sc, edit_sc, ins_sc, tree_sc, rss_sc]
    n_blocks = -(-size // BLOCK)
    with ProgressUI(console, total_phases=6, enabled=o.progress) as ui:
        try:
            with ui.phase("inputs"):
                file = base / "big.bin"
                write_random_file(file, size, ui.count(f"writing {s['size']} of random bytes", size))
            with ui.phase("stack"):
                stack.start()
                tokens = {k: stack.token(f"drivebench{k}") for k in ("fixed", "cdc", "treefixed", "treecdc")}
                for r in range(1, s["rounds"]):
                    tokens[f"fixed{r}"] = stack.token(f"drivebenchfixed{r}")

            # -- 1 and 5: first upload, download, RSS ------------------------------------
            with ui.phase("first upload"):
                floors_w, floors_r, ups, downs, hashes, raws = [], [], [], [], [], []
                idles, peaks, trees_idle, trees_peak = [], [], [], []
                timelines: list[list[tuple[float, float, float]]] = []
                blocks: list[FileBlock] = []
                first_sent = Sent()
                for r in range(s["rounds"]):
                    if r:  # new bytes: the store already holds the last round's blocks
                        write_random_file(file, size, ui.count(f"new random bytes, round {r + 1}", size))
                    blocks = file_blocks(file, FIXED)
                    ui.step(f"blob port write + read, round {r + 1}", 10)
                    w, rd = raw_blob_seconds(stack, file, blocks, base / "floor", o.streams)
                    floors_w.append(w)
                    floors_r.append(rd)
                    time.sleep(1.0)
                    idle = rss_tree(stack.pid)
                    bar = _Bar(ui, f"upload, round {r + 1}", 2 * size)
                    token = tokens["fixed" if r == 0 else f"fixed{r}"]
                    with DriveClient(stack.grpc_addr, token, o.streams) as client:
                        fd = os.open(file, os.O_RDONLY)
                        try:
                            with RssSampler(stack.pid) as sampler:
                                t0 = time.perf_counter()
                                blocks = file_blocks(file, FIXED, on_bytes=bar)
                                th = time.perf_counter() - t0
                                node, sent = client.put("/big.bin", blocks, file_source(fd), on_bytes=bar)
                                ups.append(time.perf_counter() - t0)
                        finally:
                            os.close(fd)
                        hashes.append(th)
                        if r == 0:
                            first_sent = sent
                            first_rev = int(node.head.revision)
                        dbar = _Bar(ui, f"download, round {r + 1}", size)
                        t0 = time.perf_counter()
                        got = client.download("/big.bin", base / "down.bin", blocks, on_bytes=dbar)
                        downs.append(time.perf_counter() - t0)
                        if got != size:
                            raise RuntimeError(f"downloaded {got} bytes of {size}")
                        (base / "down.bin").unlink()
                        t0 = time.perf_counter()
                        client.stream_only("/big.bin")
                        raws.append(time.perf_counter() - t0)
                    idles.append(idle.server_mib)
                    trees_idle.append(idle.total_mib)
                    peaks.append(sampler.peak_server)
                    trees_peak.append(sampler.peak_tree)
                    timelines.append(sampler.samples)
                ratios = [f / u for f, u in zip(floors_w, ups, strict=True)]
                mid = sorted(range(len(ratios)), key=lambda i: ratios[i])[len(ratios) // 2]
                up_sc.rows.append(Row("upload throughput", size / ups[mid] / MB, "MB/s", size / floors_w[mid] / MB,
                                      "blob port write", ">=", 0.7))
                dr = [f / d for f, d in zip(floors_r, downs, strict=True)]
                dmid = sorted(range(len(dr)), key=lambda i: dr[i])[len(dr) // 2]
                up_sc.rows.append(Row("download throughput", size / downs[dmid] / MB, "MB/s",
                                      size / floors_r[dmid] / MB, "blob port read", ">=", 0.7))
                up_sc.rows.append(Row("DownloadBlocks, one stream, bytes dropped", size / raws[dmid] / MB, "MB/s",
                                      size / floors_r[dmid] / MB, "blob port read"))
                up_sc.rows.append(Row("client hashing (part of the upload)", size / hashes[mid] / MB, "MB/s"))
                up_sc.rows.append(Row("bytes sent", first_sent.total / MiB, "MiB", size / MiB, "file size"))
                up_sc.notes.append(
                    f"seconds per round: upload {[round(x, 2) for x in ups]} (hashing "
                    f"{[round(x, 2) for x in hashes]} of it), blob port write {[round(x, 2) for x in floors_w]}; "
                    f"download {[round(x, 2) for x in downs]}, blob port read {[round(x, 2) for x in floors_r]}"
                    + ("; the round with the median upload ratio is reported" if len(ups) > 1 else ""))
                up_sc.notes.append(
                    f"upload: {n_blocks} blocks hashed by 2 threads, CommitFile, {o.streams} concurrent UploadBlocks "
                    f"streams of {PIECE // MiB} MiB messages, CommitFile(expect_uploaded); the floor writes the same "
                    f"blocks through open_blob_store(Config()).put_without_etag (the content store's write) "
                    f"{o.streams} at a time, same key layout, same "
                    "filesystem; download: DownloadBlocks over the same number of streams, each block verified "
                    "and written at its offset, against blob-port get() of the same objects")
                worst = max(range(len(peaks)), key=lambda i: peaks[i] - idles[i])
                rss_sc.rows.append(Row("peak server RSS over idle", peaks[worst] - idles[worst], "MiB",
                                       target_op="<=", target=100 * MB / MiB, target_on="value"))
                rss_sc.rows.append(Row("idle server RSS", idles[worst], "MiB"))
                rss_sc.rows.append(Row("peak server RSS", peaks[worst], "MiB"))
                rss_sc.rows.append(Row("peak RSS of the stack's process tree over idle",
                                       trees_peak[worst] - trees_idle[worst], "MiB"))
                rss_sc.notes.append(f"sampled every 100 ms over {len(timelines[worst])} samples; the `sysdesign up` "
                                    "process itself is the target (its children, such as Valkey, are the tree row)")
                report.measurements["rss_timeline"] = [(round(t, 2), round(v, 1), round(x, 1))
                                                       for t, v, x in timelines[worst]]
                report.measurements["rounds"] = {"upload_s": ups, "hash_s": hashes, "floor_write_s": floors_w,
                                                 "download_s": downs, "floor_read_s": floors_r, "stream_only_s": raws,
                                                 "idle_server_mib": idles, "peak_server_mib": peaks}

            # -- 2: one byte changed in the middle ---------------------------------------
            with ui.phase("edit"):
                ui.step("one byte changed: hash again, commit, upload, commit", 5)
                flip_byte(file, size // 2)
                with DriveClient(stack.grpc_addr, tokens["fixed"], o.streams) as client:
                    fd = os.open(file, os.O_RDONLY)
                    try:
                        t0 = time.perf_counter()
                        # As the sync client does: the quick digests kept from the first upload
                        # say which block changed; only that one is SHA-256 hashed again.
                        refs, quick = recut_file(file, Chunker(block_size=BLOCK),
                                                 [BlockRef(b.offset, b.size, b.sha256) for b in blocks],
                                                 [b.quick for b in blocks])
                        eblocks = [FileBlock(b.offset, b.size, b.sha256, q) for b, q in zip(refs, quick,
                                                                                             strict=True)]
                        node, esent = client.put("/big.bin", eblocks, file_source(fd), base=first_rev)
                        edit_s = time.perf_counter() - t0
                    finally:
                        os.close(fd)
                    edit_rev = int(node.head.revision)
                meta = esent.commit_bytes
                edit_sc.rows.append(Row("bytes sent", esent.total / KiB, "KiB", size / KiB, "file size", "<=",
                                        (BLOCK + meta) / KiB, target_on="value",
                                        note="one block + the two CommitFile requests"))
                edit_sc.rows.append(Row("blocks sent", esent.blocks, "", n_blocks, "blocks in the file",
                                        "<=", 1, target_on="value"))
                edit_sc.rows.append(Row("time", edit_s, "s", ups[mid], "first upload", "<=", 0.1))
                edit_sc.notes.append(f"payload {esent.payload_bytes:,} B in {esent.blocks} block(s), "
                                     f"{esent.commits} CommitFile requests of {esent.commit_bytes:,} B in all "
                                     f"({n_blocks} block hashes each); the time includes reading the whole file "
                                     "again with the quick digest (XXH3-128) the client keeps per block, and "
                                     "SHA-256 of the one block whose quick digest changed")

            # -- 3: one byte inserted at the front ---------------------------------------
            with ui.phase("insert"):
                shifted = base / "shifted.bin"
                insert_front(file, shifted)
                with DriveClient(stack.grpc_addr, tokens["fixed"], o.streams) as client:
                    bar = _Bar(ui, "insert, fixed blocks", 2 * size)
                    fd = os.open(shifted, os.O_RDONLY)
                    try:
                        t0 = time.perf_counter()
                        fblocks = file_blocks(shifted, FIXED, on_bytes=bar)
                        _, fsent = client.put("/big.bin", fblocks, file_source(fd), base=edit_rev, on_bytes=bar)
                        fixed_s = time.perf_counter() - t0
                    finally:
                        os.close(fd)
                with DriveClient(stack.grpc_addr, tokens["cdc"], o.streams) as client:
                    client.set_chunking(FASTCDC)
                    bar = _Bar(ui, "FastCDC first upload (the edited file)", 2 * size)
                    fd = os.open(file, os.O_RDONLY)
                    try:
                        t0 = time.perf_counter()
                        cblocks = file_blocks(file, FASTCDC, on_bytes=bar)
                        node, csent0 = client.put("/big.bin", cblocks, file_source(fd), on_bytes=bar)
                        cdc_first_s = time.perf_counter() - t0
                    finally:
                        os.close(fd)
                    bar = _Bar(ui, "insert, FastCDC", size)
                    fd = os.open(shifted, os.O_RDONLY)
                    try:
                        t0 = time.perf_counter()
                        c2 = file_blocks(shifted, FASTCDC, on_bytes=bar)
                        _, csent = client.put("/big.bin", c2, file_source(fd), base=int(node.head.revision))
                        cdc_s = time.perf_counter() - t0
                    finally:
                        os.close(fd)
                shifted.unlink()
                ins_sc.rows.append(Row("fixed 4 MiB blocks: blocks sent", fsent.blocks, "", len(fblocks),
                                       "blocks in the file"))
                ins_sc.rows.append(Row("fixed 4 MiB blocks: bytes sent", fsent.total / MiB, "MiB", (size + 1) / MiB,
                                       "file size"))
                ins_sc.rows.append(Row("FastCDC: chunks sent", csent.blocks, "", len(c2), "chunks in the file",
                                       "<=", 2, target_on="value"))
                ins_sc.rows.append(Row("FastCDC: bytes sent", csent.total / MiB, "MiB", (size + 1) / MiB, "file size"))
                ins_sc.rows.append(Row("FastCDC: time", cdc_s, "s", fixed_s, "fixed blocks"))
                ins_sc.rows.append(Row("FastCDC first upload throughput", size / cdc_first_s / MB, "MB/s",
                                       size / floors_w[mid] / MB, "blob port write (4 MiB objects)"))
                ins_sc.notes.append(f"fixed: {fsent.payload_bytes:,} B payload in {fsent.blocks} blocks, "
                                    f"{fixed_s:.2f} s; FastCDC: {csent.payload_bytes:,} B payload in {csent.blocks} "
                                    f"chunk(s) of {len(c2)}, {cdc_s:.2f} s (mean chunk "
                                    f"{human_bytes((size + 1) / max(1, len(c2)))})")
                ins_sc.notes.append("FastCDC runs in its own namespace (UpdateSettings(CHUNKING_FASTCDC)), "
                                    "first uploaded with the edited file, then the shifted one over it")
                report.measurements["insert"] = {"fixed_s": fixed_s, "cdc_s": cdc_s, "cdc_first_upload_s": cdc_first_s,
                                                 "cdc_first_sent_bytes": csent0.total}

            # -- 4: a real tree twice ---------------------------------------------------
            with ui.phase("tree"):
                ui.step("source trees", 5)
                v1, v2, origin = load_trees(o.tree, o.local_tree, base)
                results: dict[str, TreeResult] = {}
                for key, chunking in (("fixed", FIXED), ("cdc", FASTCDC)):
                    with DriveClient(stack.grpc_addr, tokens[f"tree{key}"], 1) as client:
                        if chunking == FASTCDC:
                            client.set_chunking(FASTCDC)
                        cb = ui.count(f"tree, {key}: {len(v1)} + {len(v2)} files", len(v1) + len(v2))
                        results[key] = upload_tree(client, "/tree", v1, v2, chunking, progress=cb)
                for key, label in (("fixed", "fixed 4 MiB"), ("cdc", "FastCDC")):
                    t = results[key]
                    tree_sc.rows.append(Row(f"{label}: v2 bytes uploaded", t.sent[1].payload_bytes / MB, "MB",
                                            t.logical[1] / MB, "v2 logical bytes"))
                    tree_sc.rows.append(Row(f"{label}: bytes stored (unique blocks)", t.stored / MB, "MB",
                                            sum(t.logical) / MB, "v1 + v2 logical bytes"))
                    tree_sc.rows.append(Row(f"{label}: dedup ratio", t.dedup_ratio, "x"))
                    tree_sc.notes.append(
                        f"{label}: v1 {t.files[0]:,} files, {t.logical[0]:,} B, uploaded {t.sent[0].payload_bytes:,} B "
                        f"in {t.seconds[0]:.1f} s; v2 {t.files[1]:,} files, {t.logical[1]:,} B, uploaded "
                        f"{t.sent[1].payload_bytes:,} B in {t.sent[1].blocks:,} blocks plus {t.sent[1].commit_bytes:,} B "
                        f"of CommitFile in {t.seconds[1]:.1f} s; stored {t.stored:,} B"
                        + (f"; {len(t.skipped)} file(s) refused: {t.skipped[:3]}" if t.skipped else ""))
                small = sum(1 for t in (v1, v2) for d in t.values() if len(d) <= CDC_MIN)
                tree_sc.notes.append(f"{small:,} of the {len(v1) + len(v2):,} files are at most {CDC_MIN // KiB} KiB "
                                     "(FastCDC's minimum chunk): one block under either chunking, so the two "
                                     "differ only on the larger files")
                tree_sc.notes.append(f"the tree: {origin}; v2's files commit over v1's at the same paths "
                                     "(files v2 dropped stay; they add nothing to v2's figures)")
                report.measurements["tree"] = {
                    k: {"files": t.files, "logical_bytes": t.logical,
                        "uploaded_payload_bytes": (t.sent[0].payload_bytes, t.sent[1].payload_bytes),
                        "commit_bytes": (t.sent[0].commit_bytes, t.sent[1].commit_bytes),
                        "blocks_uploaded": (t.sent[0].blocks, t.sent[1].blocks),
                        "stored_bytes": t.stored, "dedup_ratio": round(t.dedup_ratio, 3),
                        "seconds": t.seconds, "skipped": t.skipped, "origin": origin}
                    for k, t in results.items()}
            with ui.phase("stop"):
                pass
        except Exception as exc:
            report.error = f"{type(exc).__name__}: {exc}\n{stack.log_tail(2000)}"
        finally:
            stack.stop()
            if not o.keep_data:
                shutil.rmtree(base, ignore_errors=True)
            else:
                console.print(f"data kept in {base}")
    report.finished = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    return report


# --------------------------------------------------------------------------- plot


def _row(report: RunReport, key: str, figure: str) -> Row | None:
    for sc in report.scenarios:
        if sc.key == key:
            for r in sc.rows:
                if r.figure == figure:
                    return r
    return None


def plot(report: RunReport, path: Path) -> Path | None:
    """Throughput against the floors, bytes sent per scenario, server RSS during the upload."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 5))
    labels, values, colors = [], [], []
    for fig_name, short in (("upload throughput", "upload"), ("download throughput", "download")):
        r = _row(report, "upload", fig_name)
        if r is not None and r.value is not None and r.floor is not None:
            labels += [f"{short}\n(system)", f"{short}\n(blob port)"]
            values += [r.value, r.floor]
            colors += ["tab:green" if r.passed else "tab:red", "tab:gray"]
    cdc = _row(report, "insert", "FastCDC first upload throughput")
    if cdc is not None and cdc.value is not None:
        labels.append("FastCDC\nfirst upload")
        values.append(cdc.value)
        colors.append("tab:blue")
    ax1.bar(labels, values, color=colors)
    for i, v in enumerate(values):
        ax1.text(i, v, f"{v:.0f}", ha="center", va="bottom")
    ax1.set(ylabel="MB/s", title=f"throughput, {report.settings.get('size')} (grey: floors)")

    size = float(report.settings.get("size_bytes") or 0)
    bars: list[tuple[str, float]] = []
    first = _row(report, "upload", "bytes sent")
    if first is not None and first.value is not None:
        bars.append(("first upload", first.value * MiB))
    edit = _row(report, "edit", "bytes sent")
    if edit is not None and edit.value is not None:
        bars.append(("1 byte changed", edit.value * KiB))
    for fig_name, short in (("fixed 4 MiB blocks: bytes sent", "insert, fixed"),
                            ("FastCDC: bytes sent", "insert, FastCDC")):
        r = _row(report, "insert", fig_name)
        if r is not None and r.value is not None:
            bars.append((short, r.value * MiB))
    for fig_name, short in (("fixed 4 MiB: v2 bytes uploaded", "tree v2, fixed"),
                            ("FastCDC: v2 bytes uploaded", "tree v2, FastCDC")):
        r = _row(report, "tree", fig_name)
        if r is not None and r.value is not None:
            bars.append((short, r.value * MB))
    if bars:
        ax2.bar([b[0] for b in bars], [max(1.0, b[1]) for b in bars], color="tab:blue")
        for i, (_, v) in enumerate(bars):
            ax2.text(i, max(1.0, v), human_bytes(v), ha="center", va="bottom", fontsize="small")
        if size:
            ax2.axhline(size, color="gray", linestyle="dashed", label="file size")
            ax2.legend()
    ax2.set(yscale="log", ylabel="bytes sent (payload + CommitFile)", title="bytes sent per scenario")
    ax2.tick_params(axis="x", labelrotation=30)

    timeline = report.measurements.get("rss_timeline") or []
    if timeline:
        ax3.plot([t[0] for t in timeline], [t[1] for t in timeline], label="server")
        idle = _row(report, "rss", "idle server RSS")
        if idle is not None and idle.value is not None:
            ax3.axhline(idle.value + 100 * MB / MiB, color="red", linestyle="dashed", label="idle + 100 MB")
        ax3.legend()
    ax3.set(xlabel="seconds into the upload", ylabel="RSS (MiB)", title="server RSS during the upload")
    for ax in (ax1, ax2, ax3):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write(report: RunReport, out: Path) -> tuple[Path, Path, Path | None]:
    """``drive.json``, ``drive.md`` and ``drive.png`` in ``out`` (the names docs/bench/ keeps)."""
    out.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out / "drive.json", out / "drive.md"
    jpath.write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    md = to_markdown(report)
    png = plot(report, out / "drive.png")
    if png is not None:
        md += "\n![throughput against the floors, bytes sent per scenario, server RSS](drive.png)\n"
    mpath.write_text(md)
    return jpath, mpath, png


def main(options: DriveBenchOptions | None = None) -> int:
    """Exit code: 0 when it measured (targets met or not), 1 on a harness error, 130 on Ctrl-C."""
    o = options or DriveBenchOptions()
    console = Console()
    try:
        report = run(o, console)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted")
        return 130
    console.print()
    print_report(report, console)
    jpath, mpath, png = write(report, Path(o.out_dir))
    console.print(f"results: {jpath}  {mpath}  {png or '(no plot)'}")
    if report.error:
        console.print(f"[bold red]harness error:[/] {report.error}")
        return 1
    return 0


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--size", default="1GiB")
    p.add_argument("--out", default="bench-results")
    p.add_argument("--streams", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--local-tree", action="store_true")
    a = p.parse_args()
    raise SystemExit(main(DriveBenchOptions(size=parse_size(a.size), out_dir=Path(a.out), streams=a.streams,
                                            rounds=a.rounds, local_tree=a.local_tree)))
