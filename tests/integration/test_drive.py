"""DriveService against a real stack: block commits, dedup without an oracle, conflicts, trash,
revisions, shares, the journal, bad input, and the block collector.

The stack runs with 64 KiB fixed blocks (so multi-block files stay small)
and a two-second grace period with a sweep every second, so collection is
observable within a test.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
import unicodedata
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from sysdesign.drive.v1 import drive_pb2 as pb
from sysdesign.drive.v1 import drive_pb2_grpc as pbg

from servers.storage.fs_blob import FilesystemBlobStore
from tests.integration.helpers import error_reason, grpc_metadata, violations
from tests.stack import StackProcess

# Drive keeps nothing in Redis: the Cassandra pass runs it again, the Redis Cluster pass need not.
pytestmark = [pytest.mark.tables]

BLOCK = 64 << 10
GRACE_S = 2


@pytest.fixture(scope="module")
def drive_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProcess]:
    s = StackProcess(tmp_path_factory.mktemp("drive") / "data", extra_env={
        "SYSDESIGN_DRIVE_BLOCK_BYTES": str(BLOCK),
        "SYSDESIGN_DRIVE_GRACE_SECONDS": str(GRACE_S),
        "SYSDESIGN_DRIVE_GC_BUCKET_SECONDS": "1",
        "SYSDESIGN_DRIVE_SWEEP_SECONDS": "1",
        "SYSDESIGN_DRIVE_INTENT_BUCKET_MS": "1000",
        "SYSDESIGN_DRIVE_KEEP_REVISIONS": "3",
    }).start()
    yield s
    assert s.stop() == 0, s.logs()


@pytest.fixture(scope="module")
def stub(drive_stack: StackProcess) -> pbg.DriveServiceStub:
    return pbg.DriveServiceStub(drive_stack.channel())


def _user(stack: StackProcess) -> tuple[str, str]:
    """A fresh user: (token, user id)."""
    from sysdesign.identity.v1 import identity_pb2 as ipb
    from sysdesign.identity.v1 import identity_pb2_grpc as ipbg

    name = "d" + uuid.uuid4().hex[:12]
    token = stack.token(name)
    me = ipbg.IdentityServiceStub(stack.channel()).GetUser(ipb.GetUserRequest(username=name),
                                                           metadata=grpc_metadata(token))
    return token, me.user.user_id


@pytest.fixture()
def alice(drive_stack: StackProcess) -> tuple[str, str]:
    return _user(drive_stack)


@pytest.fixture()
def bob(drive_stack: StackProcess) -> tuple[str, str]:
    return _user(drive_stack)


def blocks_of(data: bytes) -> list[pb.Block]:
    return [pb.Block(sha256=hashlib.sha256(data[i:i + BLOCK]).hexdigest(), size_bytes=len(data[i:i + BLOCK]))
            for i in range(0, len(data), BLOCK)]


def upload(stub: pbg.DriveServiceStub, token: str, data: bytes, digests: list[str], ns: str = "") -> int:
    by = {hashlib.sha256(data[i:i + BLOCK]).hexdigest(): data[i:i + BLOCK] for i in range(0, len(data), BLOCK)}

    def messages() -> Iterator[pb.UploadBlocksRequest]:
        for d in digests:
            b = by[d]
            half = len(b) // 2  # two messages per block, as a client under the message limit would
            yield pb.UploadBlocksRequest(namespace_id=ns, sha256=d, data=b[:half])
            yield pb.UploadBlocksRequest(namespace_id=ns, sha256=d, data=b[half:], last=True)

    r = stub.UploadBlocks(messages(), metadata=grpc_metadata(token))
    assert list(r.stored) == digests
    return r.bytes_received


def put(stub: pbg.DriveServiceStub, token: str, path: str, data: bytes, base: int = 0, device: str = "laptop",
        ns: str = "") -> pb.CommitFileResponse:
    """The client's dance: commit, upload what is missing, commit again."""
    req = pb.CommitFileRequest(path=path, base_revision=base, blocks=blocks_of(data), device=device,
                               namespace_id=ns)
    r = stub.CommitFile(req, metadata=grpc_metadata(token))
    if r.missing_blocks:
        upload(stub, token, data, list(r.missing_blocks), ns)
        req.expect_uploaded = True
        r = stub.CommitFile(req, metadata=grpc_metadata(token))
    assert not r.missing_blocks
    return r


def get(stub: pbg.DriveServiceStub, token: str, path: str, revision: int = 0, ns: str = "") -> bytes:
    out = bytearray()
    current, size = "", 0
    for m in stub.DownloadBlocks(pb.DownloadBlocksRequest(path=path, revision=revision, namespace_id=ns),
                                 metadata=grpc_metadata(token)):
        if m.sha256:
            current, size, start = m.sha256, m.size_bytes, len(out)
        out += m.data
        if m.last:
            assert len(out) - start == size
            assert hashlib.sha256(out[start:]).hexdigest() == current
    return bytes(out)


def changes(stub: pbg.DriveServiceStub, token: str, cursor: str = "", wait_for: int = 1,
            timeout: float = 10, ns: str = "") -> tuple[list[pb.Change], str]:
    """Journal entries after ``cursor``, waiting until at least ``wait_for`` have settled."""
    out: list[pb.Change] = []
    deadline = time.monotonic() + timeout
    while True:
        r = stub.ListChanges(pb.ListChangesRequest(cursor=cursor, namespace_id=ns), metadata=grpc_metadata(token))
        out += r.changes
        cursor = r.cursor
        if len(out) >= wait_for or time.monotonic() > deadline:
            return out, cursor
        time.sleep(0.3)


class _Blob:
    """Whether a block is on the stack's blob store (the filesystem adapter under its data dir)."""

    def __init__(self, stack: StackProcess, digest: str) -> None:
        self.store = FilesystemBlobStore(stack.data_dir / "blobs")
        self.key = f"cas/sha256/{digest[:2]}/{digest[2:4]}/{digest}"

    def exists(self) -> bool:
        return asyncio.run(self.store.exists(self.key))

    def is_file(self) -> bool:
        return self.exists()


def blob_path(stack: StackProcess, digest: str) -> _Blob:
    return _Blob(stack, digest)


def data_of(n: int, seed: int = 0) -> bytes:
    return hashlib.shake_256(f"{seed}".encode()).digest(n)


def test_commit_uploads_only_missing_blocks_and_round_trips(stub: pbg.DriveServiceStub,
                                                              alice: tuple[str, str]) -> None:
    token, uid = alice
    data = data_of(5 * BLOCK + 123, 1)
    first = stub.CommitFile(pb.CommitFileRequest(path="/docs/a.bin", blocks=blocks_of(data), device="laptop"),
                            metadata=grpc_metadata(token))
    assert sorted(first.missing_blocks) == sorted(b.sha256 for b in blocks_of(data))
    assert not first.HasField("node")
    with pytest.raises(grpc.RpcError) as e:  # nothing was written by the first commit
        stub.GetNode(pb.GetNodeRequest(path="/docs/a.bin"), metadata=grpc_metadata(token))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND

    r = put(stub, token, "/docs/a.bin", data)
    assert r.node.head.revision == 1 and r.node.head.size_bytes == len(data)
    assert r.node.path == "/docs/a.bin" and r.node.namespace_id == uid
    assert get(stub, token, "/docs/a.bin") == data

    # change one byte in the middle: only that block is asked for
    changed = bytearray(data)
    changed[2 * BLOCK + 7] ^= 0xFF
    again = stub.CommitFile(pb.CommitFileRequest(path="/docs/a.bin", base_revision=1,
                                                 blocks=blocks_of(bytes(changed))), metadata=grpc_metadata(token))
    assert list(again.missing_blocks) == [hashlib.sha256(changed[2 * BLOCK:3 * BLOCK]).hexdigest()]
    r2 = put(stub, token, "/docs/a.bin", bytes(changed), base=1)
    assert r2.node.head.revision == 2 and not r2.conflicted
    assert get(stub, token, "/docs/a.bin") == bytes(changed)
    assert get(stub, token, "/docs/a.bin", revision=1) == data

    # the same content again is a no-op that answers the head
    same = put(stub, token, "/docs/a.bin", bytes(changed), base=1)
    assert same.node.head.revision == 2 and not same.conflicted

    # an empty file is a file with no blocks
    empty = put(stub, token, "/docs/empty", b"")
    assert empty.node.head.size_bytes == 0 and get(stub, token, "/docs/empty") == b""

    listing = stub.ListFolder(pb.ListFolderRequest(path="/docs"), metadata=grpc_metadata(token))
    assert [n.name for n in listing.children] == ["a.bin", "empty"]


def test_no_existence_oracle_across_users(stub: pbg.DriveServiceStub, alice: tuple[str, str],
                                          bob: tuple[str, str], drive_stack: StackProcess) -> None:
    data = data_of(2 * BLOCK, 2)
    put(stub, alice[0], "/secret.bin", data)
    # bob names the same blocks: he must upload them himself
    r = stub.CommitFile(pb.CommitFileRequest(path="/mine.bin", blocks=blocks_of(data)),
                        metadata=grpc_metadata(bob[0]))
    assert sorted(r.missing_blocks) == sorted(b.sha256 for b in blocks_of(data))
    put(stub, bob[0], "/mine.bin", data)
    # ... and the store keeps one copy
    for b in blocks_of(data):
        assert blob_path(drive_stack, b.sha256).is_file()


def test_stale_base_becomes_a_conflicted_copy(stub: pbg.DriveServiceStub, alice: tuple[str, str]) -> None:
    token, _ = alice
    v1 = put(stub, token, "/notes/plan.txt", b"v1")
    _, cursor = changes(stub, token, wait_for=2)
    put(stub, token, "/notes/plan.txt", b"v2 from desktop", base=1, device="desktop")
    lost = put(stub, token, "/notes/plan.txt", b"v2 from laptop", base=1, device="laptop")
    assert v1.node.head.revision == 1
    assert lost.conflicted
    day = time.strftime("%Y-%m-%d", time.gmtime())
    assert lost.node.name == f"plan (conflicted copy from laptop {day}).txt"
    assert lost.conflict_with.path == "/notes/plan.txt"
    assert get(stub, token, "/notes/plan.txt") == b"v2 from desktop"
    assert get(stub, token, lost.node.path) == b"v2 from laptop"
    # a second loser on the same day gets a number
    lost2 = put(stub, token, "/notes/plan.txt", b"v2 again from laptop", base=1, device="laptop")
    assert lost2.node.name == f"plan (conflicted copy from laptop {day}) (1).txt"
    found, _ = changes(stub, token, cursor, wait_for=3)
    kinds = [(c.kind, c.path) for c in found]
    assert (pb.CHANGE_KIND_MODIFIED, "/notes/plan.txt") in kinds
    conflict = [c for c in found if c.kind == pb.CHANGE_KIND_CONFLICTED_COPY]
    assert [c.path for c in conflict] == [lost.node.path, lost2.node.path]
    assert all(c.conflict_with == "/notes/plan.txt" for c in conflict)


def test_concurrent_commits_on_one_base_exactly_one_wins(stub: pbg.DriveServiceStub,
                                                           alice: tuple[str, str]) -> None:
    token, _ = alice
    put(stub, token, "/race.txt", b"base")
    contents = [f"edit {i}".encode() * 1000 for i in range(6)]
    for c in contents:  # blocks uploaded first, so the commits race on the revision alone
        r = stub.CommitFile(pb.CommitFileRequest(path="/race.txt", base_revision=1, blocks=blocks_of(c)),
                            metadata=grpc_metadata(token))
        upload(stub, token, c, list(r.missing_blocks))
    barrier = threading.Barrier(len(contents))

    def commit(i: int) -> pb.CommitFileResponse:
        barrier.wait()
        return stub.CommitFile(pb.CommitFileRequest(path="/race.txt", base_revision=1,
                                                    blocks=blocks_of(contents[i]), device=f"dev{i}"),
                               metadata=grpc_metadata(token))

    with ThreadPoolExecutor(len(contents)) as pool:
        results = list(pool.map(commit, range(len(contents))))
    winners = [r for r in results if not r.conflicted]
    assert len(winners) == 1 and winners[0].node.head.revision == 2
    # no bytes lost: every edit is the file or one of the copies
    stored = {get(stub, token, r.node.path) for r in results}
    assert stored == set(contents)
    assert len({r.node.path for r in results}) == len(contents)


def test_bad_blocks_are_refused_and_nothing_is_stored(stub: pbg.DriveServiceStub, alice: tuple[str, str],
                                                      drive_stack: StackProcess) -> None:
    token, _ = alice
    data = data_of(BLOCK, 3)
    claimed = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(grpc.RpcError) as e:
        stub.UploadBlocks(iter([pb.UploadBlocksRequest(sha256=claimed, data=data, last=True)]),
                          metadata=grpc_metadata(token))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(violations(e.value)) == ["sha256"]
    assert not blob_path(drive_stack, claimed).exists()
    assert not blob_path(drive_stack, hashlib.sha256(data).hexdigest()).exists()

    # a commit that names a block never uploaded, after the upload: FAILED_PRECONDITION per block
    never = hashlib.sha256(b"never uploaded").hexdigest()
    with pytest.raises(grpc.RpcError) as e:
        stub.CommitFile(pb.CommitFileRequest(path="/x.bin", blocks=[pb.Block(sha256=never, size_bytes=14)],
                                             expect_uploaded=True), metadata=grpc_metadata(token))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(e.value) == "BLOCKS_MISSING"
    from google.rpc import error_details_pb2

    from tests.integration.helpers import details_of
    subjects = [v.subject for d in details_of(e.value, error_details_pb2.PreconditionFailure) for v in d.violations]
    assert subjects == [never]

    # blocks of the wrong size for fixed chunking, a bad hash
    with pytest.raises(grpc.RpcError) as e:
        stub.CommitFile(pb.CommitFileRequest(path="/x.bin", blocks=[pb.Block(sha256=never, size_bytes=10),
                                                                    pb.Block(sha256=never, size_bytes=10)]),
                        metadata=grpc_metadata(token))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(violations(e.value)) == ["blocks[0].size_bytes"]
    with pytest.raises(grpc.RpcError) as e:
        stub.CommitFile(pb.CommitFileRequest(path="/x.bin", blocks=[pb.Block(sha256="AB" * 32, size_bytes=1)]),
                        metadata=grpc_metadata(token))
    assert list(violations(e.value)) == ["blocks[0].sha256"]
    # a stream that ends inside a block stores nothing
    with pytest.raises(grpc.RpcError) as e:
        stub.UploadBlocks(iter([pb.UploadBlocksRequest(sha256=hashlib.sha256(data).hexdigest(), data=data)]),
                          metadata=grpc_metadata(token))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not blob_path(drive_stack, hashlib.sha256(data).hexdigest()).exists()
    with pytest.raises(grpc.RpcError) as e:
        stub.GetNode(pb.GetNodeRequest(path="/x.bin"), metadata=grpc_metadata(token))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND



def test_a_bad_block_mid_stream_keeps_the_blocks_before_it(stub: pbg.DriveServiceStub, alice: tuple[str, str],
                                                           drive_stack: StackProcess) -> None:
    """Blocks are stored while the next ones arrive: a refused block still ends the call with its
    error, the blocks before it are stored, and none after it."""
    token, _ = alice
    good, bad, after = data_of(BLOCK, 51), data_of(BLOCK, 52), data_of(BLOCK, 53)
    d_good, d_after = hashlib.sha256(good).hexdigest(), hashlib.sha256(after).hexdigest()
    claimed = hashlib.sha256(b"not these bytes").hexdigest()

    def messages() -> Iterator[pb.UploadBlocksRequest]:
        yield pb.UploadBlocksRequest(sha256=d_good, data=good, last=True)
        yield pb.UploadBlocksRequest(sha256=claimed, data=bad[:100])
        yield pb.UploadBlocksRequest(sha256=claimed, data=bad[100:], last=True)
        yield pb.UploadBlocksRequest(sha256=d_after, data=after, last=True)

    with pytest.raises(grpc.RpcError) as e:
        stub.UploadBlocks(messages(), metadata=grpc_metadata(token))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(violations(e.value)) == ["sha256"]
    assert blob_path(drive_stack, d_good).exists()
    assert not blob_path(drive_stack, claimed).exists()
    assert not blob_path(drive_stack, hashlib.sha256(bad).hexdigest()).exists()
    assert not blob_path(drive_stack, d_after).exists()

    # a stream that breaks the protocol after a whole block: that block is stored all the same
    d_first = hashlib.sha256(after).hexdigest()
    with pytest.raises(grpc.RpcError) as e:
        stub.UploadBlocks(iter([pb.UploadBlocksRequest(sha256=d_first, data=after, last=True),
                                pb.UploadBlocksRequest(sha256=d_good, data=good[:10])]),
                          metadata=grpc_metadata(token))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(violations(e.value)) == ["last"]
    assert blob_path(drive_stack, d_first).exists()


@pytest.mark.parametrize("path, field", [
    ("/a/../b", "path"), ("/a/./b", "path"), ("/nul\x00name", "path"), ("relative/x", "path"),
    ("/" + "n" * 256, "path"), ("/a//b", "path"), ("/ends-with-dot.", "path"), ("/ctl\x07", "path"),
    ("/" + "/".join(["d"] * 65), "path"),
])
def test_bad_paths_are_invalid_argument(stub: pbg.DriveServiceStub, alice: tuple[str, str], path: str,
                                        field: str) -> None:
    token, _ = alice
    for call in (lambda: put(stub, token, path, b"x"),
                 lambda: stub.CreateFolder(pb.CreateFolderRequest(path=path), metadata=grpc_metadata(token))):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, path
        assert list(violations(e.value)) == [field]
    listing = stub.ListFolder(pb.ListFolderRequest(path="/"), metadata=grpc_metadata(token))
    assert list(listing.children) == []


def test_names_differing_by_case_or_normalisation_clash(stub: pbg.DriveServiceStub,
                                                         alice: tuple[str, str]) -> None:
    token, _ = alice
    composed = unicodedata.normalize("NFC", "/résumé.txt")
    decomposed = unicodedata.normalize("NFD", "/Résumé.txt")
    put(stub, token, composed, b"cv")
    for path in ("/RÉSUMÉ.txt", decomposed):
        with pytest.raises(grpc.RpcError) as e:
            put(stub, token, path, b"another cv")
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_reason(e.value) == "NAME_CLASH"
    stub.CreateFolder(pb.CreateFolderRequest(path="/Photos"), metadata=grpc_metadata(token))
    with pytest.raises(grpc.RpcError) as e:
        stub.CreateFolder(pb.CreateFolderRequest(path="/photos"), metadata=grpc_metadata(token))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as e:
        stub.CreateFolder(pb.CreateFolderRequest(path="/Photos"), metadata=grpc_metadata(token))
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    names = [n.name for n in stub.ListFolder(pb.ListFolderRequest(path="/"),
                                             metadata=grpc_metadata(token)).children]
    assert sorted(names) == ["Photos", composed[1:]]
    assert get(stub, token, composed) == b"cv"


def test_another_users_files_are_not_found(stub: pbg.DriveServiceStub, alice: tuple[str, str],
                                           bob: tuple[str, str]) -> None:
    r = put(stub, alice[0], "/private/tax.pdf", b"numbers")
    node = r.node.node_id
    calls = [
        lambda: stub.GetNode(pb.GetNodeRequest(path=f"id:{node}"), metadata=grpc_metadata(bob[0])),
        lambda: stub.GetNode(pb.GetNodeRequest(path="/private/tax.pdf", namespace_id=alice[1]),
                             metadata=grpc_metadata(bob[0])),
        lambda: get(stub, bob[0], f"id:{node}"),
        lambda: stub.DeleteNode(pb.DeleteNodeRequest(path=f"id:{node}"), metadata=grpc_metadata(bob[0])),
        lambda: stub.ListChanges(pb.ListChangesRequest(namespace_id=alice[1]), metadata=grpc_metadata(bob[0])),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert get(stub, alice[0], f"id:{node}") == b"numbers"


def test_shares_read_only_and_read_write(stub: pbg.DriveServiceStub, alice: tuple[str, str],
                                         bob: tuple[str, str]) -> None:
    a, b = alice, bob
    put(stub, a[0], "/team/roadmap.md", b"q1")
    put(stub, a[0], "/private/diary.md", b"dear diary")
    share = stub.ShareFolder(pb.ShareFolderRequest(path="/team", grantee_id=b[1], role=pb.ROLE_READER),
                             metadata=grpc_metadata(a[0])).share
    assert share.path == "/team" and share.owner_id == a[1]
    mine = stub.ListShares(pb.ListSharesRequest(), metadata=grpc_metadata(b[0]))
    assert [(s.namespace_id, s.path, s.role) for s in mine.shared_with_me] == [(a[1], "/team", pb.ROLE_READER)]
    assert get(stub, b[0], "/team/roadmap.md", ns=a[1]) == b"q1"
    # outside the shared folder: not found; writes through a read-only share: refused
    with pytest.raises(grpc.RpcError) as e:
        get(stub, b[0], "/private/diary.md", ns=a[1])
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        put(stub, b[0], "/team/roadmap.md", b"q2", base=1, ns=a[1])
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as e:
        stub.CommitFile(pb.CommitFileRequest(path="/team/roadmap.md", base_revision=1, namespace_id=a[1]),
                        metadata=grpc_metadata(b[0]))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # read-write: bob's edit lands in alice's file
    stub.ShareFolder(pb.ShareFolderRequest(path="/team", grantee_id=b[1], role=pb.ROLE_WRITER),
                     metadata=grpc_metadata(a[0]))
    r = put(stub, b[0], "/team/roadmap.md", b"q2 by bob", base=1, ns=a[1])
    assert r.node.head.revision == 2 and r.node.head.author_id == b[1]
    assert get(stub, a[0], "/team/roadmap.md") == b"q2 by bob"
    with pytest.raises(grpc.RpcError) as e:
        put(stub, b[0], "/private/new.md", b"x", ns=a[1])
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    # bob sees the shared folder's changes, not the rest of alice's namespace
    seen, _ = changes(stub, b[0], wait_for=3, ns=a[1])
    assert [c.path for c in seen] == ["/team", "/team/roadmap.md", "/team/roadmap.md"]
    with pytest.raises(grpc.RpcError) as e:  # the trash stays its owner's
        stub.ListTrash(pb.ListTrashRequest(namespace_id=a[1]), metadata=grpc_metadata(b[0]))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    stub.UnshareFolder(pb.UnshareFolderRequest(path="/team", grantee_id=b[1]), metadata=grpc_metadata(a[0]))
    with pytest.raises(grpc.RpcError) as e:
        get(stub, b[0], "/team/roadmap.md", ns=a[1])
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_trash_restore_move_and_revisions(stub: pbg.DriveServiceStub, alice: tuple[str, str]) -> None:
    token, _ = alice
    md = grpc_metadata(token)
    _, cursor = changes(stub, token, wait_for=0, timeout=0)
    f = put(stub, token, "/work/report.txt", b"r1").node
    for i in range(2, 6):
        put(stub, token, "/work/report.txt", f"r{i}".encode(), base=i - 1)
    revs = stub.ListRevisions(pb.ListRevisionsRequest(path="/work/report.txt"), metadata=md).revisions
    assert [r.revision for r in revs] == [5, 4, 3]  # keep_revisions=3
    restored = stub.RestoreRevision(pb.RestoreRevisionRequest(path="/work/report.txt", revision=3), metadata=md)
    assert restored.node.head.revision == 6 and get(stub, token, "/work/report.txt") == b"r3"

    moved = stub.MoveNode(pb.MoveNodeRequest(from_path="/work/report.txt", to_path="/archive/2026/report-final.txt"),
                          metadata=md).node
    assert moved.node_id == f.node_id and moved.path == "/archive/2026/report-final.txt"
    with pytest.raises(grpc.RpcError) as e:
        stub.MoveNode(pb.MoveNodeRequest(from_path="/archive", to_path="/archive/2026/inside"), metadata=md)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(violations(e.value)) == ["to_path"]

    with pytest.raises(grpc.RpcError) as e:
        stub.DeleteNode(pb.DeleteNodeRequest(path="/archive", permanent=True), metadata=md)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    gone = stub.DeleteNode(pb.DeleteNodeRequest(path="/archive"), metadata=md).node
    assert gone.trashed
    for p in ("/archive", "/archive/2026/report-final.txt"):
        with pytest.raises(grpc.RpcError) as e:
            stub.GetNode(pb.GetNodeRequest(path=p), metadata=md)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    by_id = stub.GetNode(pb.GetNodeRequest(path=f"id:{f.node_id}"), metadata=md).node
    assert by_id.trashed and by_id.path == "/archive/2026/report-final.txt"
    trash = stub.ListTrash(pb.ListTrashRequest(), metadata=md).nodes
    assert [n.path for n in trash] == ["/archive"]
    stub.RestoreNode(pb.RestoreNodeRequest(path=f"id:{gone.node_id}"), metadata=md)
    assert get(stub, token, "/archive/2026/report-final.txt") == b"r3"
    assert list(stub.ListTrash(pb.ListTrashRequest(), metadata=md).nodes) == []

    # a restore whose name is taken asks for a new name
    stub.DeleteNode(pb.DeleteNodeRequest(path="/archive"), metadata=md)
    put(stub, token, "/archive", b"now a file")
    with pytest.raises(grpc.RpcError) as e:
        stub.RestoreNode(pb.RestoreNodeRequest(path=f"id:{gone.node_id}"), metadata=md)
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    back = stub.RestoreNode(pb.RestoreNodeRequest(path=f"id:{gone.node_id}", new_name="archive-old"),
                            metadata=md).node
    assert back.path == "/archive-old"

    found, _ = changes(stub, token, cursor, wait_for=14)
    kinds = [c.kind for c in found]
    assert kinds.count(pb.CHANGE_KIND_MODIFIED) == 5 and kinds.count(pb.CHANGE_KIND_MOVED) == 1
    assert kinds.count(pb.CHANGE_KIND_DELETED) == 2 and kinds.count(pb.CHANGE_KIND_RESTORED) == 2
    moves = [c for c in found if c.kind == pb.CHANGE_KIND_MOVED]
    assert (moves[0].from_path, moves[0].path) == ("/work/report.txt", "/archive/2026/report-final.txt")
    assert [int(c.change_id) for c in found] == sorted(int(c.change_id) for c in found)


def test_watch_changes_streams_what_happens(stub: pbg.DriveServiceStub, alice: tuple[str, str]) -> None:
    token, _ = alice
    _, cursor = changes(stub, token, wait_for=0, timeout=0)
    stream = stub.WatchChanges(pb.WatchChangesRequest(cursor=cursor), metadata=grpc_metadata(token), timeout=20)
    first = next(stream)  # answers at once
    assert list(first.changes) == []
    put(stub, token, "/live.txt", b"hello")
    for m in stream:
        if m.changes:
            assert [(c.kind, c.path) for c in m.changes] == [(pb.CHANGE_KIND_CREATED, "/live.txt")]
            break
    stream.cancel()


def test_unreferenced_blocks_are_collected_after_the_grace_period(stub: pbg.DriveServiceStub,
                                                                   alice: tuple[str, str],
                                                                   drive_stack: StackProcess) -> None:
    token, _ = alice
    md = grpc_metadata(token)
    kept, dropped, orphan = data_of(BLOCK, 10), data_of(BLOCK, 11), data_of(BLOCK, 12)
    put(stub, token, "/gc/kept.bin", kept)
    node = put(stub, token, "/gc/dropped.bin", dropped).node
    # an upload no commit ever names
    d_orphan = hashlib.sha256(orphan).hexdigest()
    upload(stub, token, orphan, [d_orphan])
    stub.DeleteNode(pb.DeleteNodeRequest(path="/gc/dropped.bin"), metadata=md)
    stub.DeleteNode(pb.DeleteNodeRequest(path=f"id:{node.node_id}", permanent=True), metadata=md)
    d_kept, d_dropped = hashlib.sha256(kept).hexdigest(), hashlib.sha256(dropped).hexdigest()
    assert blob_path(drive_stack, d_dropped).exists() and blob_path(drive_stack, d_orphan).exists()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (blob_path(drive_stack, d_dropped).exists()
                                           or blob_path(drive_stack, d_orphan).exists()):
        time.sleep(0.5)
    assert not blob_path(drive_stack, d_dropped).exists()
    assert not blob_path(drive_stack, d_orphan).exists()
    assert blob_path(drive_stack, d_kept).exists()
    assert get(stub, token, "/gc/kept.bin") == kept


def test_acknowledged_commits_survive_a_restart_and_uploads_wait_for_their_commit(tmp_path: Path) -> None:
    env = {"SYSDESIGN_DRIVE_BLOCK_BYTES": str(BLOCK)}
    s = StackProcess(tmp_path / "data", extra_env=env).start()
    try:
        stub = pbg.DriveServiceStub(s.channel())
        token = s.token("restarter")
        put(stub, token, "/kept.bin", data_of(3 * BLOCK, 20))
        pending = data_of(2 * BLOCK, 21)
        r = stub.CommitFile(pb.CommitFileRequest(path="/pending.bin", blocks=blocks_of(pending)),
                            metadata=grpc_metadata(token))
        upload(stub, token, pending, list(r.missing_blocks))
    finally:
        assert s.stop() == 0, s.logs()
    # the server died between the upload and the commit: nothing is visible, the retry completes
    s2 = StackProcess(tmp_path / "data", extra_env=env).start()
    try:
        stub = pbg.DriveServiceStub(s2.channel())
        token = s2.token("restarter")
        assert get(stub, token, "/kept.bin") == data_of(3 * BLOCK, 20)
        with pytest.raises(grpc.RpcError) as e:
            stub.GetNode(pb.GetNodeRequest(path="/pending.bin"), metadata=grpc_metadata(token))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        again = stub.CommitFile(pb.CommitFileRequest(path="/pending.bin", blocks=blocks_of(pending),
                                                     expect_uploaded=True), metadata=grpc_metadata(token))
        assert again.node.head.revision == 1
        assert get(stub, token, "/pending.bin") == pending
    finally:
        assert s2.stop() == 0, s2.logs()




def test_a_slow_block_upload_runs_as_long_as_its_deadline_asks(stub: pbg.DriveServiceStub,
                                                                alice: tuple[str, str]) -> None:
    """Past the platform's 30 s default: a slow link finishing one block must not be cut off."""
    token, _ = alice
    data = data_of(BLOCK, 40)
    digest = hashlib.sha256(data).hexdigest()

    def slow() -> Iterator[pb.UploadBlocksRequest]:
        yield pb.UploadBlocksRequest(sha256=digest, data=data[:100])
        time.sleep(32)
        yield pb.UploadBlocksRequest(sha256=digest, data=data[100:], last=True)

    r = stub.UploadBlocks(slow(), metadata=grpc_metadata(token), timeout=60)
    assert list(r.stored) == [digest]
    assert put(stub, token, "/slow.bin", data).node.head.size_bytes == len(data)
