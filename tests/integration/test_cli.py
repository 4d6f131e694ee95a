"""The `sysdesign` CLI as a new user meets it, against a real `sysdesign up` (issue 23).

Every command runs as a subprocess (`python -m clients.cli ...`) with the
stack's environment, a private config dir and 80 columns, the way a person
types it in a terminal.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sysdesign.feed.v1 import feed_pb2, feed_pb2_grpc

from tests.integration.helpers import grpc_metadata
from tests.stack import ROOT, StackProcess

THRESHOLD = 40


@pytest.fixture(scope="module")
def cstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProcess]:
    s = StackProcess(tmp_path_factory.mktemp("cli") / "data", extra_env={
        "SYSDESIGN_FEED_CELEBRITY_THRESHOLD": str(THRESHOLD)}).start()
    yield s
    assert s.stop() == 0, s.logs()


@pytest.fixture(scope="module")
def config_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli-config")


def cli(stack: StackProcess, *args: str, env: dict[str, str] | None = None, stdin: str = "",
        config: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full = {**stack.env(), "COLUMNS": "80", "TERM": "dumb",
            "XDG_CONFIG_HOME": str(config or stack.data_dir.parent / "xdg"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "clients.cli", *args], env=full, cwd=str(ROOT),
                          input=stdin, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    """A refused command: non-zero exit, no traceback, the reason in one line on stderr."""
    assert r.returncode != 0, r
    assert "Traceback" not in r.stderr and "Error ─" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines, r
    for n in needles:
        assert n in lines[0], lines


def test_generate_yields_the_celebrities_asked_for(cstack: StackProcess) -> None:
    """30 users cannot give anyone 40 followers: the generator tops the top 2 up to the threshold."""
    r = cli(cstack, "feed", "generate", "--users", "30", "--celebrities", "2", "--posts-per-user", "0",
            "--prefix", "gen")
    assert r.returncode == 0, r.stderr
    assert f"2 celebrities (threshold {THRESHOLD} followers)" in r.stdout, r.stdout
    graph = feed_pb2_grpc.GraphServiceStub(cstack.channel())
    md = grpc_metadata(cstack.token("counter"))

    def counts(name: str) -> feed_pb2.GetFollowCountsResponse:
        return graph.GetFollowCounts(feed_pb2.GetFollowCountsRequest(
            user=feed_pb2.UserRef(username=name)), metadata=md, timeout=30)

    for name in ("gen0000000", "gen0000001"):
        c = counts(name)
        assert c.celebrity and c.follower_count >= THRESHOLD, (name, c)
    assert not counts("gen0000002").celebrity
    before = counts("gen0000000").follower_count
    again = cli(cstack, "feed", "generate", "--users", "30", "--celebrities", "2", "--posts-per-user",
                "0", "--prefix", "gen")
    assert again.returncode == 0, again.stderr
    assert counts("gen0000000").follower_count == before, "a re-run adds no followers twice"


# -- bad arguments: one line, non-zero exit, no traceback ---------------------


def test_paste_create_refuses_unreadable_files_in_one_line(cstack: StackProcess, tmp_path: Path) -> None:
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x7fELF\x00\x01\x02" * 100)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    for path, needle in ((tmp_path / "missing.txt", "no such file"), (binary, "binary file"),
                         (latin1, "not UTF-8 text"), (tmp_path, "is a directory")):
        r = cli(cstack, "paste", "create", str(path), "--user", "paster")
        assert_one_line_error(r, str(path), needle)
        assert r.stdout == ""


def test_usage_errors_are_one_line(cstack: StackProcess) -> None:
    for ttl in ("0", "-5"):
        r = cli(cstack, "token", "alice", "--ttl", ttl)
        assert_one_line_error(r, "--ttl")
        assert r.stdout == "", "no token is printed"
    assert_one_line_error(cli(cstack, "no-such-command"), "No such command")
    for args, needle in ((["chat", "attach", "--to", "bob", "/no/such/file"], "/no/such/file"),
                         (["bench", "shortener", "--env", "FOO"], "KEY=VALUE"),
                         (["migrate", "--replication", "SimpleStrategy:x"], "--replication"),
                         (["feed", "generate", "--users", "0"], "--users"),
                         (["worker", "nosuch"], "unknown worker"),
                         (["--addr", "nowhere", "resolve", "abcd"], "HOST:PORT")):
        assert_one_line_error(cli(cstack, *args, "--user", "alice") if args[0] == "chat"
                              else cli(cstack, *args), needle)
    assert_one_line_error(cli(cstack, "shorten", "https://example.com", "--expire-in", "-5",
                              "--user", "alice"), "--expire-in", "expire_time")


def test_rpc_errors_are_printed_once_with_their_fields(cstack: StackProcess) -> None:
    r = cli(cstack, "shorten", "https://example.com/x", "--alias", "ab", "--user", "alice")
    assert_one_line_error(r, "INVALID_ARGUMENT", "custom_alias (set by --alias)")
    assert r.stderr.count("must be 4-32 Base62 characters") == 1, r.stderr
    r = cli(cstack, "shorten", "ftp://example.com/x", "--user", "alice")
    assert_one_line_error(r, "INVALID_ARGUMENT", "long_url")
    assert r.stderr.count("long_url") == 1, r.stderr


def test_unreachable_server_is_one_line(cstack: StackProcess) -> None:
    from tests.stack import free_port

    r = cli(cstack, "--addr", f"127.0.0.1:{free_port()}", "resolve", "abcd")
    assert_one_line_error(r, "UNAVAILABLE", "cannot reach")


# -- labels, URLs, tables, global options ---------------------------------------


def test_feed_labels_name_the_tokens_user(cstack: StackProcess) -> None:
    bob = cstack.token("bob")
    r = cli(cstack, "feed", "home", env={"SYSDESIGN_TOKEN": bob})
    assert r.returncode == 0, r.stderr
    assert "home timeline of bob" in r.stdout and "demo" not in r.stdout, r.stdout
    r = cli(cstack, "feed", "followers", "--token", bob, "--user", "demo")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("bob:"), r.stdout


def test_commands_take_the_urls_they_print(cstack: StackProcess, tmp_path: Path) -> None:
    r = cli(cstack, "shorten", "https://example.com/landing", "--user", "linker")
    assert r.returncode == 0, r.stderr
    url = r.stdout.strip()
    assert url.startswith(cstack.http_base + "/")
    r = cli(cstack, "resolve", url)
    assert r.returncode == 0 and r.stdout.strip() == "https://example.com/landing", r.stderr
    r = cli(cstack, "stats", url, "--user", "linker")
    assert r.returncode == 0 and "1 clicks" in r.stdout, (r.stdout, r.stderr)
    text = tmp_path / "note.txt"
    text.write_text("hello from a file\n")
    r = cli(cstack, "paste", "create", str(text), "--user", "linker")
    assert r.returncode == 0, r.stderr
    raw = r.stdout.strip()
    assert "/p/" in raw
    r = cli(cstack, "paste", "get", raw)
    assert r.returncode == 0 and r.stdout == "hello from a file\n", r.stderr
    assert_one_line_error(cli(cstack, "paste", "get", cstack.http_base + "/x/y/z"), "/p/<paste id>")


def test_ids_are_never_cut_at_80_columns(cstack: StackProcess) -> None:
    name = "wide_" + "w" * 27  # 32 characters, the longest username
    token = cstack.token(name)
    ids = []
    for i in range(3):
        # an unbreakable word (a long URL) leaves the table nothing to wrap but the id columns
        r = cli(cstack, "feed", "post", f"{i} see https://example.com/{'a' * 70}", "--token", token)
        assert r.returncode == 0, r.stderr
        ids.append(r.stdout.strip())
    r = cli(cstack, "feed", "user", "--token", token)
    assert r.returncode == 0, r.stderr
    assert f"posts of {name}" in r.stdout
    assert "…" not in r.stdout, r.stdout
    for post_id in ids:
        assert post_id in r.stdout, (post_id, r.stdout)


def test_global_addr_and_help(cstack: StackProcess) -> None:
    r = cli(cstack, "--addr", cstack.grpc_addr, "resolve", "nope1",
            env={"SYSDESIGN_GRPC_ADDR": "127.0.0.1:1"})
    assert_one_line_error(r, "NOT_FOUND")  # reached the server named by --addr
    r = cli(cstack, "--help")
    assert r.returncode == 0
    for var in ("SYSDESIGN_GRPC_ADDR", "SYSDESIGN_PUBLIC_URL", "SYSDESIGN_TOKEN", "SYSDESIGN_DATA_DIR",
                "XDG_CONFIG_HOME", "--addr", "--edge"):
        assert var in r.stdout, var


def test_chat_violations_name_the_field_the_request_set(cstack: StackProcess) -> None:
    import grpc
    from sysdesign.chat.v1 import chat_pb2, chat_pb2_grpc

    from tests.integration.helpers import expect_error, violations

    stub = chat_pb2_grpc.ChatServiceStub(cstack.channel())
    md = grpc_metadata(cstack.token("chatter"))
    cstack.token("chatter2")
    for names in (["chatter"], ["chatter2", "bob"]):  # yourself; two peers in a 1:1
        e = expect_error(grpc.StatusCode.INVALID_ARGUMENT, stub.CreateConversation,
                         chat_pb2.CreateConversationRequest(type=chat_pb2.CONVERSATION_TYPE_DIRECT,
                                                            member_usernames=names), metadata=md)
        assert list(violations(e)) == ["member_usernames"], violations(e)
    r = cli(cstack, "chat", "send", "--to", "chatter", "hi", "--user", "chatter")
    assert_one_line_error(r, "member_usernames")


# -- login -----------------------------------------------------------------------


def test_login_stores_the_token_that_later_commands_use(cstack: StackProcess, tmp_path: Path) -> None:
    config = tmp_path / "config"
    r = cli(cstack, "login", "logan", "--register", "--password-stdin", stdin="correct horse\n",
            config=config)
    assert r.returncode == 0, r.stderr
    assert "logged in as logan" in r.stderr
    stored = config / "sysdesign" / "token"
    assert stored.stat().st_mode & 0o777 == 0o600
    token = stored.read_text().strip()
    r = cli(cstack, "feed", "home", config=config)
    assert r.returncode == 0, r.stderr
    assert "home timeline of logan" in r.stdout
    r = cli(cstack, "feed", "home", "--user", "bob", config=config)  # an explicit --user wins
    assert "home timeline of bob" in r.stdout, r.stderr
    r = cli(cstack, "login", "logan", "--password-stdin", stdin="wrong horse\n", config=config)
    assert_one_line_error(r, "UNAUTHENTICATED", "wrong username or password")
    assert stored.read_text().strip() == token, "a failed login keeps the stored token"
    r = cli(cstack, "login", "logan", "--password-stdin", stdin="correct horse\n", config=config)
    assert r.returncode == 0, r.stderr


def test_a_token_signed_with_another_secret_says_what_to_do(cstack: StackProcess,
                                                            tmp_path: Path) -> None:
    r = cli(cstack, "feed", "home", "--user", "stranger",
            env={"SYSDESIGN_DATA_DIR": str(tmp_path / "another-data-dir")})
    assert_one_line_error(r, "UNAUTHENTICATED", "signed with another secret",
                          str(tmp_path / "another-data-dir"), "sysdesign login")
