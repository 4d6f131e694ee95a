"""`drive sync --namespace` of a shared folder, and a first sync that lists the tree instead of the journal.

Every sync is the real CLI against the real stack (helpers from
test_drive_sync): the owner's folder and the sharee's folder stand for two
users' machines.
"""

from __future__ import annotations

import time
from pathlib import Path

from sysdesign.drive.v1 import drive_pb2 as pb

from clients.drive.sync import token_subject
from servers.drive.core import SETTLE_MS
from tests.integration.helpers import grpc_metadata
from tests.integration.test_drive_sync import cli, new_user, rand, stub, sync, tree
from tests.stack import StackProcess


def share(stack: StackProcess, owner: str, path: str, grantee: str, role: int) -> str:
    s = stub(stack).ShareFolder(pb.ShareFolderRequest(path=path, grantee_id=token_subject(grantee), role=role),
                                metadata=grpc_metadata(owner)).share
    return str(s.namespace_id)


def test_sharee_syncs_a_shared_folder_read_write(stack: StackProcess, tmp_path: Path) -> None:
    alice, bob = new_user(stack, "nsown"), new_user(stack, "nsrw")
    mine, theirs = tmp_path / "alice", tmp_path / "bob"
    (mine / "team").mkdir(parents=True)
    (mine / "team" / "plan.md").write_bytes(b"v1")
    (mine / "private.txt").write_bytes(b"secret")
    sync(stack, alice, mine, "alice-laptop")
    ns = share(stack, alice, "/team", bob, pb.ROLE_WRITER)

    sync(stack, bob, theirs, "bob-laptop", "--namespace", ns)
    assert tree(theirs) == {"team/plan.md": b"v1"}  # the shared folder only

    (mine / "team" / "new.bin").write_bytes(rand(300_000, 1))
    sync(stack, alice, mine, "alice-laptop")
    s = sync(stack, bob, theirs, "bob-laptop", "--namespace", ns)
    assert s["downloaded_files"] == 1
    assert (theirs / "team" / "new.bin").read_bytes() == rand(300_000, 1)

    (theirs / "team" / "plan.md").write_bytes(b"v2 by bob")
    s = sync(stack, bob, theirs, "bob-laptop", "--namespace", ns)
    assert s["uploaded_files"] == 1
    sync(stack, alice, mine, "alice-laptop")
    assert (mine / "team" / "plan.md").read_bytes() == b"v2 by bob"
    assert not (theirs / "private.txt").exists()


def test_read_only_sharee_keeps_local_edits_local(stack: StackProcess, tmp_path: Path) -> None:
    alice, bob = new_user(stack, "nsown2"), new_user(stack, "nsro")
    mine, theirs = tmp_path / "alice", tmp_path / "bob"
    (mine / "docs").mkdir(parents=True)
    (mine / "docs" / "a.txt").write_bytes(b"alice 1")
    sync(stack, alice, mine, "alice-laptop")
    ns = share(stack, alice, "/docs", bob, pb.ROLE_READER)
    sync(stack, bob, theirs, "bob-laptop", "--namespace", ns)
    assert tree(theirs) == {"docs/a.txt": b"alice 1"}

    (theirs / "docs" / "a.txt").write_bytes(b"bob's edit")
    (theirs / "docs" / "mine.txt").write_bytes(b"bob's file")
    (mine / "docs" / "b.txt").write_bytes(b"alice 2")
    sync(stack, alice, mine, "alice-laptop")
    time.sleep(SETTLE_MS / 1000 + 0.1)  # the journal is read this far behind the clock
    r = cli(stack, "sync", str(theirs), "--once", "--stats", "--device", "bob-laptop", "--token", bob,
            "--namespace", ns)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "read-only" in r.stderr and "docs/mine.txt" in r.stderr
    # the owner's new file arrives; bob's edits stay as they are, here only
    assert tree(theirs) == {"docs/a.txt": b"bob's edit", "docs/b.txt": b"alice 2", "docs/mine.txt": b"bob's file"}
    sync(stack, alice, mine, "alice-laptop")
    assert tree(mine) == {"docs/a.txt": b"alice 1", "docs/b.txt": b"alice 2"}


def test_unshared_namespace_is_a_clear_error(stack: StackProcess, tmp_path: Path) -> None:
    alice, bob = new_user(stack, "nsown3"), new_user(stack, "nsnone")
    r = cli(stack, "sync", str(tmp_path / "x"), "--once", "--token", bob, "--namespace", token_subject(alice))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "nothing is shared with you" in r.stderr


def test_first_sync_lists_the_tree_instead_of_replaying_history(stack: StackProcess, tmp_path: Path) -> None:
    token = new_user(stack, "hist")
    first = tmp_path / "first"
    first.mkdir()
    # A long history: the same names created, overwritten and deleted again and again.
    for round_ in range(6):
        for i in range(4):
            (first / f"f{i}.bin").write_bytes(rand(50_000, round_ * 10 + i))
        (first / "dir").mkdir(exist_ok=True)
        (first / "dir" / "gone.txt").write_bytes(f"round {round_}".encode())
        sync(stack, token, first, "laptop")
        for i in range(3):
            (first / f"f{i}.bin").unlink()
        (first / "dir" / "gone.txt").unlink()
        sync(stack, token, first, "laptop")
    (first / "dir" / "kept.txt").write_bytes(b"kept")
    sync(stack, token, first, "laptop")
    want = tree(first)
    assert set(want) == {"f3.bin", "dir/kept.txt"}

    fresh = tmp_path / "fresh"
    s = sync(stack, token, fresh, "desktop")
    assert tree(fresh) == want
    # only the live files came down: two files, one block each
    assert s["downloaded_files"] == 2 and s["downloaded_blocks"] == 2
    assert s["listed_nodes"] == 3  # dir, dir/kept.txt, f3.bin

    # and it goes on from the journal: a later change arrives
    (first / "late.txt").write_bytes(b"late")
    (first / "f3.bin").unlink()
    sync(stack, token, first, "laptop")
    s = sync(stack, token, fresh, "desktop")
    assert tree(fresh) == tree(first)
    assert s["listed_nodes"] == 0
