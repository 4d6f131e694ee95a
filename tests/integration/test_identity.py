"""IdentityService against the real stack: registration, login, profiles, bearer tokens."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from sysdesign.identity.v1 import identity_pb2 as pb
from sysdesign.identity.v1 import identity_pb2_grpc as pbg

from servers.platform.auth import TokenSigner
from tests.integration.helpers import error_reason, expect_error, grpc_metadata, violations
from tests.stack import StackProcess

pytestmark = [pytest.mark.tables, pytest.mark.redis_cluster]

PASSWORD = "correct horse battery"


def uname(prefix: str = "u") -> str:
    """A username no other test (or test file sharing the stack) uses."""
    return f"{prefix}_{secrets.token_hex(5)}"


@pytest.fixture(scope="module")
def channel(stack: StackProcess) -> Iterator[grpc.Channel]:
    with stack.channel() as ch:
        yield ch


@pytest.fixture(scope="module")
def ids(channel: grpc.Channel) -> pbg.IdentityServiceStub:
    return pbg.IdentityServiceStub(channel)


def stored_usernames(stack: StackProcess) -> set[str]:
    """The usernames table as it is stored (SQLite file or Cassandra keyspace)."""
    return {str(v) for v in stack.scan_column("usernames", "username")}


def register(ids: pbg.IdentityServiceStub, username: str, password: str = PASSWORD) -> pb.User:
    return ids.RegisterUser(pb.RegisterUserRequest(username=username, password=password), timeout=30).user


def login(ids: pbg.IdentityServiceStub, username: str, password: str = PASSWORD) -> pb.LoginResponse:
    return ids.Login(pb.LoginRequest(username=username, password=password), timeout=30)


def stack_signer(stack: StackProcess) -> TokenSigner:
    return TokenSigner((stack.data_dir / "token-secret").read_text().strip().encode())


# --------------------------------------------------------------------------- RegisterUser


def test_register_ok(ids: pbg.IdentityServiceStub) -> None:
    name = uname("reg")
    before_ms = int(time.time() * 1000) - 5_000
    user = register(ids, name)
    assert user.username == name
    assert int(user.user_id) > 0
    assert user.create_time.ToMilliseconds() >= before_ms
    # 3 and 32 characters are both in range.
    for _ in range(20):  # a 3-character name another test file might hold: try another
        short = "z" + secrets.token_hex(1)
        try:
            assert register(ids, short).username == short
            break
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.ALREADY_EXISTS, err
    else:
        raise AssertionError("no free 3-character name")
    long_name = ("l" + secrets.token_hex(16))[:32]
    assert register(ids, long_name).username == long_name


def test_register_duplicate_already_exists(ids: pbg.IdentityServiceStub) -> None:
    name = uname("dup")
    first = register(ids, name)
    err = expect_error(grpc.StatusCode.ALREADY_EXISTS, ids.RegisterUser,
                       pb.RegisterUserRequest(username=name, password="another password"))
    assert error_reason(err) == "USERNAME_TAKEN"
    # The first registration is untouched: its password still works, the second one does not.
    assert login(ids, name).user.user_id == first.user_id
    expect_error(grpc.StatusCode.UNAUTHENTICATED, ids.Login,
                 pb.LoginRequest(username=name, password="another password"))


@pytest.mark.parametrize(
    ("username", "why"),
    [
        ("", "required"),
        ("ab", "too short"),
        ("x" * 33, "too long"),
        ("Upper_case", "uppercase"),
        ("9lives_abc", "starts with a digit"),
        ("_leading", "starts with underscore"),
        ("has-dash", "dash"),
        ("has space", "space"),
        ("caf\u00e9_user", "non-ascii"),
        ("admin", "reserved"),
        ("root", "reserved"),
    ],
)
def test_register_bad_username(stack: StackProcess, ids: pbg.IdentityServiceStub,
                               username: str, why: str) -> None:
    before = stored_usernames(stack)
    err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, ids.RegisterUser,
                       pb.RegisterUserRequest(username=username, password=PASSWORD))
    v = violations(err)
    assert set(v) == {"username"}, (why, v)
    assert v["username"]
    # Nothing stored.
    assert stored_usernames(stack) == before


def test_register_reserved_says_reserved(ids: pbg.IdentityServiceStub) -> None:
    err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, ids.RegisterUser,
                       pb.RegisterUserRequest(username="sysdesign", password=PASSWORD))
    assert "reserved" in violations(err)["username"]


@pytest.mark.parametrize("password", ["", "short", "1234567", "x" * 129])
def test_register_bad_password_stores_nothing(stack: StackProcess, ids: pbg.IdentityServiceStub,
                                              password: str) -> None:
    name = uname("pw")
    before = stored_usernames(stack)
    err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, ids.RegisterUser,
                       pb.RegisterUserRequest(username=name, password=password))
    assert set(violations(err)) == {"password"}
    assert stored_usernames(stack) == before
    # Login with that name fails; the name is still free.
    if password:
        expect_error(grpc.StatusCode.UNAUTHENTICATED, ids.Login,
                     pb.LoginRequest(username=name, password=password))
    expect_error(grpc.StatusCode.UNAUTHENTICATED, ids.Login,
                 pb.LoginRequest(username=name, password=PASSWORD))
    assert register(ids, name).username == name


def test_register_reports_every_violation(ids: pbg.IdentityServiceStub) -> None:
    err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, ids.RegisterUser,
                       pb.RegisterUserRequest(username="X", password="short"))
    assert set(violations(err)) == {"username", "password"}


def test_password_boundaries_accepted(ids: pbg.IdentityServiceStub) -> None:
    for pw in ("p" * 8, "q" * 128, "p\u00e4ssw\u00f6rd \U0001f511"):
        name = uname("pwb")
        register(ids, name, pw)
        assert login(ids, name, pw).user.username == name


def test_concurrent_registration_one_winner(stack: StackProcess, channel: grpc.Channel) -> None:
    name = uname("race")
    n = 8
    barrier = threading.Barrier(n)

    def attempt(i: int) -> tuple[int, grpc.StatusCode, str]:
        stub = pbg.IdentityServiceStub(channel)
        barrier.wait(timeout=30)
        try:
            resp = stub.RegisterUser(pb.RegisterUserRequest(username=name, password=f"password-{i}"),
                                     timeout=60)
            return i, grpc.StatusCode.OK, resp.user.user_id
        except grpc.RpcError as err:
            return i, err.code(), err.details() or ""

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(attempt, range(n)))
    winners = [r for r in results if r[1] == grpc.StatusCode.OK]
    losers = [r for r in results if r[1] != grpc.StatusCode.OK]
    assert len(winners) == 1, results
    assert {r[1] for r in losers} == {grpc.StatusCode.ALREADY_EXISTS}, results
    win_i, _, win_id = winners[0]
    ids = pbg.IdentityServiceStub(channel)
    assert login(ids, name, f"password-{win_i}").user.user_id == win_id
    for i, _, _ in losers:
        expect_error(grpc.StatusCode.UNAUTHENTICATED, ids.Login,
                     pb.LoginRequest(username=name, password=f"password-{i}"))
    assert name in stored_usernames(stack)


# --------------------------------------------------------------------------- Login


def test_login_token_works(ids: pbg.IdentityServiceStub) -> None:
    name = uname("login")
    user = register(ids, name)
    resp = login(ids, name)
    assert resp.access_token.count(".") == 2
    assert resp.user.user_id == user.user_id
    assert resp.user.username == name
    assert resp.expire_time.seconds > time.time()
    got = ids.GetUser(pb.GetUserRequest(username=name), metadata=grpc_metadata(resp.access_token),
                      timeout=30)
    assert got.user == user


def test_login_wrong_password_and_unknown_user_look_the_same(ids: pbg.IdentityServiceStub) -> None:
    name = uname("wp")
    register(ids, name)
    wrong = expect_error(grpc.StatusCode.UNAUTHENTICATED, ids.Login,
                         pb.LoginRequest(username=name, password="not the password"))
    unknown = expect_error(grpc.StatusCode.UNAUTHENTICATED, ids.Login,
                           pb.LoginRequest(username=uname("nobody"), password=PASSWORD))
    assert wrong.details() == unknown.details()
    assert error_reason(wrong) == error_reason(unknown)


def test_login_missing_fields(ids: pbg.IdentityServiceStub) -> None:
    err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, ids.Login, pb.LoginRequest())
    assert set(violations(err)) == {"username", "password"}


# --------------------------------------------------------------------------- GetUser


def test_get_user_by_id_and_username(ids: pbg.IdentityServiceStub, alice: str) -> None:
    name = uname("get")
    user = register(ids, name)
    md = grpc_metadata(alice)
    by_id = ids.GetUser(pb.GetUserRequest(user_id=user.user_id), metadata=md, timeout=30).user
    by_name = ids.GetUser(pb.GetUserRequest(username=name), metadata=md, timeout=30).user
    assert by_id == user
    assert by_name == user


def test_get_user_not_found(ids: pbg.IdentityServiceStub, alice: str) -> None:
    md = grpc_metadata(alice)
    err = expect_error(grpc.StatusCode.NOT_FOUND, ids.GetUser,
                       pb.GetUserRequest(username=uname("ghost")), metadata=md)
    assert error_reason(err) == "USER_NOT_FOUND"
    expect_error(grpc.StatusCode.NOT_FOUND, ids.GetUser,
                 pb.GetUserRequest(user_id=str(2**62 + 12345)), metadata=md)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.GetUserRequest(), "lookup"),
        (pb.GetUserRequest(user_id="abc"), "user_id"),
        (pb.GetUserRequest(user_id="-5"), "user_id"),
        (pb.GetUserRequest(user_id="0"), "user_id"),
        (pb.GetUserRequest(user_id=""), "user_id"),
        (pb.GetUserRequest(username="Bad Name"), "username"),
    ],
)
def test_get_user_bad_input(ids: pbg.IdentityServiceStub, alice: str, request_: pb.GetUserRequest,
                            field: str) -> None:
    err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, ids.GetUser, request_,
                       metadata=grpc_metadata(alice))
    assert set(violations(err)) == {field}


# --------------------------------------------------------------------------- tokens


def test_get_user_without_token(ids: pbg.IdentityServiceStub) -> None:
    err = expect_error(grpc.StatusCode.UNAUTHENTICATED, ids.GetUser, pb.GetUserRequest(username="alice"))
    assert error_reason(err) == "TOKEN_MISSING"


def _bad_tokens(stack: StackProcess) -> dict[str, tuple[tuple[str, str], ...]]:
    signer = stack_signer(stack)
    expired, _ = signer.mint(1, "alice", ttl_seconds=-10)
    expired_long_ago, _ = signer.mint(1, "alice", now=time.time() - 7200)
    other, _ = TokenSigner(secrets.token_bytes(32)).mint(1, "alice")
    good, _ = signer.mint(1, "alice")
    h, p, s = good.split(".")
    tampered = f"{h}.{p[:-2]}{'A' if p[-2] != 'A' else 'B'}{p[-1]}.{s}"
    return {
        "malformed": grpc_metadata("not-a-token"),
        "malformed_parts": grpc_metadata("a.b.c"),
        "other_secret": grpc_metadata(other),
        "tampered_payload": grpc_metadata(tampered),
        "expired": grpc_metadata(expired),
        "expired_long_ago": grpc_metadata(expired_long_ago),
        "basic": (("authorization", "Basic xyz"),),
        "bearer_empty": (("authorization", "Bearer "),),
    }


@pytest.mark.parametrize("kind", ["malformed", "malformed_parts", "other_secret", "tampered_payload",
                                  "expired", "expired_long_ago", "basic", "bearer_empty"])
def test_bad_token_unauthenticated(stack: StackProcess, ids: pbg.IdentityServiceStub, kind: str) -> None:
    md = _bad_tokens(stack)[kind]
    err = expect_error(grpc.StatusCode.UNAUTHENTICATED, ids.GetUser,
                       pb.GetUserRequest(username="alice"), metadata=md)
    assert error_reason(err).startswith("TOKEN_"), error_reason(err)
    if kind.startswith("expired"):
        assert error_reason(err) == "TOKEN_EXPIRED"


def test_bad_token_refused_on_public_method(stack: StackProcess, ids: pbg.IdentityServiceStub) -> None:
    """A present but bad token is refused even where no token is needed."""
    name = uname("pub")
    register(ids, name)
    expired, _ = stack_signer(stack).mint(1, "alice", ttl_seconds=-10)
    expect_error(grpc.StatusCode.UNAUTHENTICATED, ids.Login,
                 pb.LoginRequest(username=name, password=PASSWORD), metadata=grpc_metadata(expired))


def test_fresh_token_from_stack_secret_works(stack: StackProcess, ids: pbg.IdentityServiceStub) -> None:
    """The control for the expired case: the same signer with a live ttl is accepted."""
    name = uname("sig")
    user = register(ids, name)
    tok, _ = stack_signer(stack).mint(int(user.user_id), name, ttl_seconds=600)
    got = ids.GetUser(pb.GetUserRequest(user_id=user.user_id), metadata=grpc_metadata(tok), timeout=30)
    assert got.user == user
