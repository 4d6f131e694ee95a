"""The Drive client against a real stack: `drive sync` of two folders, `drive put|get`, FastCDC deltas.

Every sync is the real CLI as a subprocess (`sysdesign drive sync DIR --once
--stats`), whose last stdout line is the pass's counts as JSON: what it
hashed, sent and received. Two folders of one user (devices "laptop" and
"desktop") stand for two machines.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from sysdesign.drive.v1 import drive_pb2 as pb
from sysdesign.drive.v1 import drive_pb2_grpc as pbg

from clients.drive.blocks import Chunker, cut_file
from clients.drive.client import DriveClient
from clients.drive.state import STATE_DIR
from servers.drive.core import SETTLE_MS
from tests.integration.helpers import grpc_metadata
from tests.stack import ROOT, StackProcess

MiB = 1 << 20
_users = iter(range(1_000_000))


def new_user(stack: StackProcess, tag: str) -> str:
    return stack.token(f"drv_{tag}_{os.getpid() % 10000}_{next(_users)}")


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def cli(stack: StackProcess, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**stack.env(), "COLUMNS": "120", "TERM": "dumb"}
    return subprocess.run([sys.executable, "-m", "clients.cli", "drive", *args], env=env, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=timeout)


def sync(stack: StackProcess, token: str, folder: Path, device: str, *extra: str) -> dict[str, Any]:
    # The change journal is read SETTLE_MS behind the clock (a change is listed once no
    # earlier one can still appear): a sync sees what the one before it did after that.
    time.sleep(SETTLE_MS / 1000 + 0.1)
    r = cli(stack, "sync", str(folder), "--once", "--stats", "--device", device, "--token", token, *extra)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


def tree(folder: Path) -> dict[str, bytes]:
    """Every synced file under ``folder``: relative path -> bytes (empty folders as b'<dir>')."""
    out: dict[str, bytes] = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if rel.split("/")[0] == STATE_DIR or p.name.startswith(".sysdesign-tmp-"):
            continue
        if p.is_file():
            out[rel] = p.read_bytes()
        elif p.is_dir() and not any(p.iterdir()):
            out[rel] = b"<dir>"
    return out


def stub(stack: StackProcess) -> pbg.DriveServiceStub:
    return pbg.DriveServiceStub(stack.channel())


def test_two_folders_converge_create_edit_delete_rename(stack: StackProcess, tmp_path: Path) -> None:
    token = new_user(stack, "conv")
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "docs" / "deep").mkdir(parents=True)
    (a / "empty-folder").mkdir()
    (a / "hello.txt").write_text("hello from a\n")
    (a / "empty.txt").write_bytes(b"")
    (a / "docs" / "big.bin").write_bytes(rand(9 * MiB + 5, 1))
    (a / "docs" / "deep" / "note.md").write_text("# note\n")
    (a / "Grüße ünïcode.txt").write_text("utf-8 name\n")

    s = sync(stack, token, a, "laptop")
    assert s["uploaded_files"] == 5 and s["uploaded_blocks"] == 3 + 1 + 1 + 1  # 9 MiB is 3 blocks
    s = sync(stack, token, b, "desktop")
    assert s["downloaded_files"] == 5
    assert tree(b) == tree(a)
    assert not s["uploaded_files"]

    # an edit in B reaches A; the new revision's unchanged blocks are not sent again
    with open(b / "docs" / "big.bin", "r+b") as f:
        f.seek(5 * MiB)
        f.write(b"EDITED")
    (b / "hello.txt").write_text("hello from b, longer\n")
    s = sync(stack, token, b, "desktop")
    assert s["uploaded_files"] == 2 and s["uploaded_blocks"] == 2, s  # one block of big.bin, hello.txt
    s = sync(stack, token, a, "laptop")
    assert s["downloaded_files"] == 2 and s["reused_blocks"] == 2, s  # big.bin's two other blocks: local
    assert tree(a) == tree(b)
    assert (a / "hello.txt").read_text() == "hello from b, longer\n"

    # a delete in A removes it from B (and it is in the trash)
    (a / "docs" / "deep" / "note.md").unlink()
    (a / "empty.txt").unlink()
    s = sync(stack, token, a, "laptop")
    assert s["deleted_remote"] == 2
    s = sync(stack, token, b, "desktop")
    assert s["deleted_local"] == 2
    assert not (b / "docs" / "deep" / "note.md").exists() and not (b / "empty.txt").exists()
    md = grpc_metadata(token)
    trashed = {n.path for n in stub(stack).ListTrash(pb.ListTrashRequest(), metadata=md).nodes}
    assert {"/docs/deep/note.md", "/empty.txt"} <= trashed

    # renames in B (a file, and a folder with a file in it) are moves, not new uploads
    (b / "hello.txt").rename(b / "greeting.txt")
    (b / "docs").rename(b / "papers")
    s = sync(stack, token, b, "desktop")
    assert s["moved_remote"] == 2 and s["uploaded_files"] == 0 and s["uploaded_bytes"] == 0, s
    s = sync(stack, token, a, "laptop")
    assert s["moved_local"] == 2 and s["downloaded_files"] == 0, s
    assert tree(a) == tree(b)
    assert (a / "greeting.txt").exists() and (a / "papers" / "big.bin").exists()
    assert not (a / "hello.txt").exists() and not (a / "docs").exists()

    # and a delete of a whole folder on one side
    import shutil

    shutil.rmtree(a / "papers")
    sync(stack, token, a, "laptop")
    s = sync(stack, token, b, "desktop")
    assert not (b / "papers").exists(), s
    assert tree(a) == tree(b)


def test_concurrent_edits_keep_both_as_a_conflicted_copy(stack: StackProcess, tmp_path: Path) -> None:
    token = new_user(stack, "conf")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (a / "plan.txt").write_text("v1\n")
    sync(stack, token, a, "laptop")
    sync(stack, token, b, "desktop")
    (a / "plan.txt").write_text("v2 from the laptop\n")
    (b / "plan.txt").write_text("v2 from the desktop, a different edit\n")
    sync(stack, token, a, "laptop")  # first: wins
    s = sync(stack, token, b, "desktop")
    assert s["conflicts"] == 1, s
    sync(stack, token, a, "laptop")
    for folder in (a, b):
        files = tree(folder)
        assert files["plan.txt"] == b"v2 from the laptop\n", files
        copies = [k for k in files if k.startswith("plan (conflicted copy from desktop ")]
        assert len(copies) == 1 and copies[0].endswith(").txt"), files
        assert files[copies[0]] == b"v2 from the desktop, a different edit\n"
        assert len(files) == 2
    assert tree(a) == tree(b)


def test_a_remote_change_never_overwrites_a_local_edit(stack: StackProcess, tmp_path: Path) -> None:
    """B edits a file A deleted: B's bytes survive (sent again as a new file) and reach A."""
    token = new_user(stack, "keep")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (a / "draft.txt").write_text("first\n")
    sync(stack, token, a, "laptop")
    sync(stack, token, b, "desktop")
    (a / "draft.txt").unlink()
    sync(stack, token, a, "laptop")
    (b / "draft.txt").write_text("edited on the desktop meanwhile\n")
    sync(stack, token, b, "desktop")
    assert (b / "draft.txt").read_text() == "edited on the desktop meanwhile\n"
    sync(stack, token, a, "laptop")
    assert (a / "draft.txt").read_text() == "edited on the desktop meanwhile\n"


def test_a_new_file_made_on_both_sides_keeps_both(stack: StackProcess, tmp_path: Path) -> None:
    token = new_user(stack, "both")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "idea.md").write_text("the laptop's idea\n")
    (b / "idea.md").write_text("the desktop's idea, longer\n")
    sync(stack, token, a, "laptop")
    s = sync(stack, token, b, "desktop")
    assert s["conflicts"] == 1, s
    sync(stack, token, a, "laptop")
    for folder in (a, b):
        files = tree(folder)
        assert files["idea.md"] == b"the laptop's idea\n"
        [copy] = [k for k in files if k != "idea.md"]
        assert copy.startswith("idea (conflicted copy from desktop ") and copy.endswith(").md")
        assert files[copy] == b"the desktop's idea, longer\n"


def test_a_local_delete_does_not_trash_a_newer_remote_edit(stack: StackProcess, tmp_path: Path) -> None:
    token = new_user(stack, "deledit")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (a / "todo.txt").write_text("v1\n")
    sync(stack, token, a, "laptop")
    sync(stack, token, b, "desktop")
    (b / "todo.txt").write_text("v2, edited on the desktop\n")
    sync(stack, token, b, "desktop")
    (a / "todo.txt").unlink()  # deleted on the laptop, which has not seen v2
    s = sync(stack, token, a, "laptop")
    assert s["deleted_remote"] == 0, s
    assert (a / "todo.txt").read_text() == "v2, edited on the desktop\n"
    assert on_server(stack, token, "/todo.txt")


def test_a_restart_hashes_only_what_changed(stack: StackProcess, tmp_path: Path) -> None:
    token = new_user(stack, "rehash")
    a = tmp_path / "a"
    (a / "sub").mkdir(parents=True)
    for i in range(6):
        (a / "sub" / f"f{i}.bin").write_bytes(rand(200_000 + i, i))
    (a / "big.bin").write_bytes(rand(6 * MiB, 99))
    first = sync(stack, token, a, "laptop")
    assert first["hashed_files"] == 7 and first["uploaded_files"] == 7
    again = sync(stack, token, a, "laptop")
    assert again["hashed_files"] == 0 and again["uploaded_files"] == 0 and again["uploaded_bytes"] == 0, again
    (a / "sub" / "f3.bin").write_bytes(rand(300_000, 1234))
    third = sync(stack, token, a, "laptop")
    assert third["hashed_files"] == 1 and third["uploaded_files"] == 1, third
    # a file downloaded from the server is not hashed again either
    b = tmp_path / "b"
    sync(stack, token, b, "desktop")
    assert sync(stack, token, b, "desktop")["hashed_files"] == 0
    # a change cursor the server refuses (its data reset, say): the journal is read again, nothing re-sent
    import sqlite3

    db = sqlite3.connect(b / STATE_DIR / "state.db")
    db.execute("UPDATE meta SET value = 'bm90LWEtY3Vyc29y' WHERE key = 'cursor'")
    db.commit()
    db.close()
    s = sync(stack, token, b, "desktop")
    assert s["hashed_files"] == 0 and s["uploaded_files"] == 0 and s["downloaded_files"] == 0, s
    assert tree(b) == tree(a)


def _missing(stack: StackProcess, token: str, blocks: list[Any]) -> list[str]:
    """Which of ``blocks`` the namespace lacks, asked without ever committing anything.

    The probe names one block nobody uploaded, so the commit always answers
    missing_blocks and writes nothing.
    """
    nobody = hashlib.sha256(os.urandom(16)).hexdigest()
    resp = stub(stack).CommitFile(pb.CommitFileRequest(
        path="/.probe", blocks=[*(pb.Block(sha256=b.sha256, size_bytes=b.size) for b in blocks),
                                pb.Block(sha256=nobody, size_bytes=1)]), metadata=grpc_metadata(token))
    return [h for h in resp.missing_blocks if h != nobody]


def test_an_interrupted_upload_resumes_with_the_missing_blocks_only(stack: StackProcess, tmp_path: Path) -> None:
    token = new_user(stack, "resume")
    a = tmp_path / "a"
    a.mkdir()
    payload = rand(40 * MiB, 7)
    (a / "video.bin").write_bytes(payload)
    blocks = cut_file(a / "video.bin", Chunker())
    assert len(blocks) == 10
    env = {**stack.env(), "TERM": "dumb"}
    first = subprocess.Popen([sys.executable, "-m", "clients.cli", "drive", "sync", str(a), "--once",
                              "--device", "laptop", "--token", token, "--workers", "1",
                              "--limit-rate", str(4 * MiB)],
                             env=env, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while True:
        assert first.poll() is None, "the sync finished before it could be interrupted"
        assert time.monotonic() < deadline
        if len(_missing(stack, token, blocks)) <= 7:
            break
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    left = _missing(stack, token, blocks)
    assert 0 < len(left) < len(blocks)
    s = sync(stack, token, a, "laptop")
    assert s["uploaded_blocks"] == len(left), (s, len(left))
    assert s["uploaded_bytes"] == sum(b.size for b in blocks if b.sha256 in set(left))
    assert s["uploaded_files"] == 1
    b = tmp_path / "b"
    sync(stack, token, b, "desktop")
    assert (b / "video.bin").read_bytes() == payload


def test_put_get_round_trip_of_a_multi_block_file(stack: StackProcess, tmp_path: Path) -> None:
    token = new_user(stack, "putget")
    src = tmp_path / "data.bin"
    payload = rand(10 * MiB + 77, 11)
    src.write_bytes(payload)
    r = cli(stack, "put", str(src), "/inbox/data.bin", "--token", token, "--device", "cli")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "/inbox/data.bin"
    assert "revision 1" in r.stderr and "3 of 3 blocks sent" in r.stderr, r.stderr
    # the same bytes again: nothing to send, still revision 1
    r = cli(stack, "put", str(src), "/inbox/data.bin", "--token", token)
    assert r.returncode == 0 and "revision 1" in r.stderr and "0 of 3 blocks sent" in r.stderr, r.stderr
    out = tmp_path / "out" / "copy.bin"
    out.parent.mkdir()
    r = cli(stack, "get", "/inbox/data.bin", str(out), "--token", token)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == payload
    assert [p.name for p in out.parent.iterdir()] == ["copy.bin"], "no temporary file left behind"

    # a second revision, the listing, the revisions, restoring the first one
    src.write_bytes(payload[:MiB])
    assert cli(stack, "put", str(src), "/inbox/data.bin", "--token", token).returncode == 0
    r = cli(stack, "ls", "/inbox", "--token", token)
    assert r.returncode == 0 and "data.bin" in r.stdout, r.stdout
    r = cli(stack, "revisions", "/inbox/data.bin", "--token", token)
    assert r.returncode == 0 and "2 (head)" in r.stdout, r.stdout
    r = cli(stack, "restore", "/inbox/data.bin", "--revision", "1", "--token", token)
    assert r.returncode == 0, r.stderr
    r = cli(stack, "get", "/inbox/data.bin", str(out), "--token", token)
    assert r.returncode == 0 and out.read_bytes() == payload
    r = cli(stack, "get", "/inbox/data.bin", str(out), "--revision", "2", "--token", token)
    assert r.returncode == 0 and out.read_bytes() == payload[:MiB], r.stderr

    # the trash and back
    r = cli(stack, "rm", "/inbox/data.bin", "--token", token)
    assert r.returncode == 0, r.stderr
    node = r.stdout.strip()
    assert node.startswith("id:")
    assert cli(stack, "get", "/inbox/data.bin", str(out), "--token", token).returncode != 0
    r = cli(stack, "trash", "--token", token)
    assert node in r.stdout, r.stdout
    r = cli(stack, "restore", node, "--token", token)
    assert r.returncode == 0 and r.stdout.strip() == "/inbox/data.bin", r.stderr

    # a folder is not a file; a path that does not exist is one line, no traceback
    r = cli(stack, "get", "/inbox", str(out), "--token", token)
    assert r.returncode != 0 and "folder" in r.stderr and "Traceback" not in r.stderr
    r = cli(stack, "get", "/nope.txt", str(out), "--token", token)
    assert r.returncode != 0 and "NOT_FOUND" in r.stderr and "Traceback" not in r.stderr


def test_share_with_another_user_by_name(stack: StackProcess, tmp_path: Path) -> None:
    owner = new_user(stack, "own")
    name = f"drv_guest_{os.getpid() % 10000}"
    guest = stack.token(name)
    f = tmp_path / "t.txt"
    f.write_text("shared\n")
    assert cli(stack, "put", str(f), "/team/t.txt", "--token", owner).returncode == 0
    r = cli(stack, "share", "/team", name, "--role", "reader", "--token", owner)
    assert r.returncode == 0, r.stderr
    ns = r.stdout.strip()
    r = cli(stack, "shares", "--token", guest)
    assert r.returncode == 0 and "/team" in r.stdout and "reader" in r.stdout, r.stdout
    out = tmp_path / "got.txt"
    r = cli(stack, "get", "/team/t.txt", str(out), "--namespace", ns, "--token", guest)
    assert r.returncode == 0 and out.read_text() == "shared\n", r.stderr
    r = cli(stack, "put", str(f), "/team/mine.txt", "--namespace", ns, "--token", guest)
    assert r.returncode != 0 and "PERMISSION_DENIED" in r.stderr, r.stderr
    r = cli(stack, "share", "/team", "no_such_user_here", "--token", owner)
    assert r.returncode != 0 and "no user named" in r.stderr, r.stderr
    assert cli(stack, "unshare", "/team", name, "--token", owner).returncode == 0
    r = cli(stack, "get", "/team/t.txt", str(out), "--namespace", ns, "--token", guest)
    assert r.returncode != 0 and "NOT_FOUND" in r.stderr


def test_fastcdc_sends_one_chunk_for_bytes_inserted_at_the_front(stack: StackProcess, tmp_path: Path) -> None:
    payload = rand(24 * MiB, 21)
    orig, shifted = tmp_path / "orig.bin", tmp_path / "shifted.bin"
    orig.write_bytes(payload)
    shifted.write_bytes(b"a new first line\n" + payload)
    sent = {}
    for mode in (pb.CHUNKING_FASTCDC, pb.CHUNKING_FIXED):
        token = new_user(stack, f"cdc{mode}")
        with grpc.insecure_channel(stack.grpc_addr, options=[("grpc.max_receive_message_length", 16 << 20)]) as ch:
            c = DriveClient(ch, token, device="cdc")
            c.call("UpdateSettings", pb.UpdateSettingsRequest(chunking=mode))
            first = c.upload_file(orig, "/v.bin")
            assert first.uploaded_blocks == len(first.blocks)
            second = c.upload_file(shifted, "/v.bin", base_revision=first.node.head.revision)
            assert not second.conflicted and second.node.head.revision == 2
            assert second.node.head.chunking == mode
            sent[mode] = (second.uploaded_blocks, len(second.blocks))
            back = tmp_path / f"back{mode}.bin"
            c.download_file("/v.bin", back)
            assert back.read_bytes() == shifted.read_bytes()
    cdc_sent, cdc_total = sent[pb.CHUNKING_FASTCDC]
    assert cdc_total >= 6 and cdc_sent <= 2, sent
    fixed_sent, fixed_total = sent[pb.CHUNKING_FIXED]
    assert fixed_sent == fixed_total == 7, sent  # every fixed block shifted


def wait_for(what: str, check: Any, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def live_sync(stack: StackProcess, token: str, folder: Path, device: str) -> subprocess.Popen[str]:
    env = {**stack.env(), "TERM": "dumb"}
    return subprocess.Popen([sys.executable, "-m", "clients.cli", "drive", "sync", str(folder), "--device", device,
                             "--token", token], env=env, cwd=str(ROOT), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def has_text(path: Path, text: str) -> bool:
    try:
        return path.read_text() == text
    except OSError:
        return False


def on_server(stack: StackProcess, token: str, path: str) -> bool:
    try:
        stub(stack).GetNode(pb.GetNodeRequest(path=path), metadata=grpc_metadata(token))
        return True
    except grpc.RpcError:
        return False


def test_a_running_sync_follows_both_sides_and_stops_on_ctrl_c(stack: StackProcess, tmp_path: Path) -> None:
    token = new_user(stack, "live")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    live = live_sync(stack, token, b, "desktop")
    try:
        (a / "news.txt").write_text("from the laptop\n")
        sync(stack, token, a, "laptop")
        wait_for("the laptop's file in the running sync's folder",
                 lambda: has_text(b / "news.txt", "from the laptop\n"))
        (b / "sub").mkdir()
        (b / "sub" / "reply.txt").write_text("from the desktop\n")
        wait_for("the running sync to send a new local file", lambda: on_server(stack, token, "/sub/reply.txt"))
        sync(stack, token, a, "laptop")
        assert (a / "sub" / "reply.txt").read_text() == "from the desktop\n"
        (a / "news.txt").write_text("edited on the laptop\n")
        sync(stack, token, a, "laptop")
        wait_for("the edit", lambda: has_text(b / "news.txt", "edited on the laptop\n"))
    finally:
        live.send_signal(signal.SIGINT)
        _, err = live.communicate(timeout=60)
    assert live.returncode == 130, err
    assert "sync stopped" in err and "Traceback" not in err, err
    assert tree(a) == tree(b)


def test_a_running_sync_rides_out_a_server_restart(tmp_path_factory: Any, tmp_path: Path) -> None:
    s = StackProcess(tmp_path_factory.mktemp("drive-restart") / "data").start()
    live = None
    try:
        token = s.token("drv_restart")
        a, b = tmp_path / "a", tmp_path / "b"
        a.mkdir()
        b.mkdir()
        live = live_sync(s, token, b, "desktop")
        (a / "before.txt").write_text("before\n")
        sync(s, token, a, "laptop")
        wait_for("the first file", lambda: has_text(b / "before.txt", "before\n"))
        assert s.stop() == 0, s.logs()
        time.sleep(1)  # the sync notices the server is gone (and keeps running)
        assert live.poll() is None
        s.start()
        (a / "after.txt").write_text("after the restart\n")
        sync(s, token, a, "laptop")
        wait_for("a file sent after the restart", lambda: has_text(b / "after.txt", "after the restart\n"))
    finally:
        if live is not None:
            live.send_signal(signal.SIGINT)
            _, err = live.communicate(timeout=60)
            assert live.returncode == 130, err
        assert s.stop() == 0, s.logs()


def test_a_slow_upload_outlasting_one_stream_deadline_goes_through(stack: StackProcess, tmp_path: Path) -> None:
    """The server holds an UploadBlocks stream 30 s at most: 36 MiB at 1 MiB/s needs several streams."""
    token = new_user(stack, "slow")
    f = tmp_path / "slow.bin"
    payload = rand(36 * MiB, 5)
    f.write_bytes(payload)
    with grpc.insecure_channel(stack.grpc_addr) as ch:
        c = DriveClient(ch, token, device="slow", workers=1, limit_rate=MiB)
        res = c.upload_file(f, "/slow.bin")
        assert res.uploaded_blocks == len(res.blocks) == 9
        assert res.uploaded_bytes == len(payload)
        back = tmp_path / "back.bin"
        c.download_file("/slow.bin", back)
    assert back.read_bytes() == payload


def test_a_rename_through_a_copy_is_found_by_its_content(stack: StackProcess, tmp_path: Path) -> None:
    """An editor that saves by writing a new file and removing the old one: a new inode, the same bytes."""
    token = new_user(stack, "copymv")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (a / "old-name.bin").write_bytes(rand(5 * MiB, 8))
    sync(stack, token, a, "laptop")
    sync(stack, token, b, "desktop")
    (a / "new-name.bin").write_bytes((a / "old-name.bin").read_bytes())
    (a / "old-name.bin").unlink()
    s = sync(stack, token, a, "laptop")
    assert s["moved_remote"] == 1 and s["uploaded_files"] == 0 and s["deleted_remote"] == 0, s
    s = sync(stack, token, b, "desktop")
    assert s["moved_local"] == 1 and s["downloaded_files"] == 0, s
    assert tree(a) == tree(b)
