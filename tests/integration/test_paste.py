"""PasteService against the real stack: text in the blob store, metadata in the table store."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from sysdesign.identity.v1 import identity_pb2, identity_pb2_grpc
from sysdesign.shortener.v1 import shortener_pb2 as pb
from sysdesign.shortener.v1 import shortener_pb2_grpc as pbg

from tests.integration.helpers import (
    details_of,
    error_reason,
    expect_error,
    grpc_metadata,
    precondition_violations,
    violations,
)
from tests.stack import StackProcess

pytestmark = [pytest.mark.tables, pytest.mark.redis_cluster]

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def channel(stack: StackProcess) -> Iterator[grpc.Channel]:
    with stack.channel() as ch:
        yield ch


@pytest.fixture(scope="module")
def pastes(channel: grpc.Channel) -> pbg.PasteServiceStub:
    return pbg.PasteServiceStub(channel)


@pytest.fixture(scope="module")
def alice_id(channel: grpc.Channel, alice: str) -> str:
    stub = identity_pb2_grpc.IdentityServiceStub(channel)
    return stub.GetUser(identity_pb2.GetUserRequest(username="alice"), metadata=grpc_metadata(alice),
                        timeout=30).user.user_id


def ts_in(seconds: float) -> Timestamp:
    t = Timestamp()
    t.FromMilliseconds(int((time.time() + seconds) * 1000))
    return t


def create(pastes: pbg.PasteServiceStub, token: str, content: str, **fields: object) -> pb.Paste:
    req = pb.CreatePasteRequest(content=content, **fields)  # type: ignore[arg-type]
    return pastes.CreatePaste(req, metadata=grpc_metadata(token), timeout=30).paste


def get(pastes: pbg.PasteServiceStub, paste_id: str, token: str | None = None) -> pb.Paste:
    return pastes.GetPaste(pb.GetPasteRequest(paste_id=paste_id), metadata=grpc_metadata(token),
                           timeout=30).paste


def blob_files(stack: StackProcess) -> set[Path]:
    root = stack.data_dir / "blobs"
    return {p for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def blob_files_of(stack: StackProcess, paste_id: str) -> set[Path]:
    """The data file and sidecar of one paste's blob, wherever the adapter keeps them."""
    return {p for p in blob_files(stack) if p.name in (paste_id, f"{paste_id}.json")}


def stored_paste_ids(stack: StackProcess) -> set[str]:
    """The pastes table as it is stored (SQLite file or Cassandra keyspace)."""
    return {str(v) for v in stack.scan_column("pastes", "paste_id")}


class NothingStored:
    """Asserts that no blob file and no paste row appeared while the block ran.

    Compares sets, not counts: the blob-gc worker may remove the blobs of pastes
    other tests deleted at any moment, which must not hide a new file.
    """

    def __init__(self, stack: StackProcess) -> None:
        self.stack = stack

    def __enter__(self) -> NothingStored:
        self.files = blob_files(self.stack)
        self.rows = stored_paste_ids(self.stack)
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            return
        new_files = blob_files(self.stack) - self.files
        new_rows = stored_paste_ids(self.stack) - self.rows
        assert not new_files, f"a rejected request stored blob files: {new_files}"
        assert not new_rows, f"a rejected request stored paste rows: {new_rows}"


# --------------------------------------------------------------------------- roundtrip


@pytest.mark.parametrize(
    "content",
    [
        "hello, world",
        "Gr\u00fc\u00dfe, \u4e16\u754c! \U0001f680 \u0645\u0631\u062d\u0628\u0627",
        "def f(x):\n    return x * 2\n\n\tindented\r\nwindows line\n\n\n",
        "\x00nul and \x7f del are valid UTF-8 text",
        " ",
    ],
    ids=["ascii", "unicode", "multiline", "control-chars", "one-space"],
)
def test_create_get_roundtrip(stack: StackProcess, pastes: pbg.PasteServiceStub, alice: str,
                              alice_id: str, content: str) -> None:
    before_ms = int(time.time() * 1000) - 5_000
    created = create(pastes, alice, content, title="t\u00eftle \u2603", language="python")
    assert created.paste_id
    assert created.owner_id == alice_id
    assert created.content == ""  # CreatePaste does not echo the text
    assert created.size_bytes == len(content.encode())
    assert created.create_time.ToMilliseconds() >= before_ms
    assert not created.HasField("expire_time")
    assert created.raw_url == f"{stack.http_base}/p/{created.paste_id}"

    got = get(pastes, created.paste_id, alice)
    assert got.content == content
    assert got.title == "t\u00eftle \u2603"
    assert got.language == "python"
    assert got.size_bytes == created.size_bytes
    assert got.owner_id == alice_id
    assert got.raw_url == created.raw_url
    assert got.create_time == created.create_time


def test_exactly_one_mib_accepted(pastes: pbg.PasteServiceStub, alice: str) -> None:
    # 3-byte characters plus one ASCII byte: 1 MiB of UTF-8, far fewer characters.
    content = "\u20ac" * ((MIB - 1) // 3) + "a"
    assert len(content.encode()) == MIB
    created = create(pastes, alice, content)
    assert created.size_bytes == MIB
    assert get(pastes, created.paste_id).content == content


def test_ids_are_distinct(pastes: pbg.PasteServiceStub, alice: str) -> None:
    got = {create(pastes, alice, f"paste {i}").paste_id for i in range(20)}
    assert len(got) == 20


def test_optional_fields(pastes: pbg.PasteServiceStub, alice: str) -> None:
    exp = ts_in(3600)
    created = create(pastes, alice, "x", title="t" * 200, language="c#", expire_time=exp)
    got = get(pastes, created.paste_id)
    assert got.title == "t" * 200
    assert got.language == "c#"
    assert got.expire_time.ToMilliseconds() == exp.ToMilliseconds()
    for lang in ("c++", "objective-c", "f#", "x" * 32, "1c", "vb.net"):
        assert get(pastes, create(pastes, alice, "x", language=lang).paste_id).language == lang


def test_get_without_token_is_public(pastes: pbg.PasteServiceStub, alice: str) -> None:
    created = create(pastes, alice, "public text")
    assert get(pastes, created.paste_id, None).content == "public text"


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"content": ""}, "content"),
        ({"content": "a" * (MIB + 1)}, "content"),
        ({"content": "\u20ac" * ((MIB - 1) // 3) + "ab"}, "content"),  # 1 MiB + 1 byte of UTF-8
        ({"content": "ok", "title": "t" * 201}, "title"),
        ({"content": "ok", "title": "line\nbreak"}, "title"),
        ({"content": "ok", "language": "C Sharp!"}, "language"),
        ({"content": "ok", "language": "Python"}, "language"),
        ({"content": "ok", "language": "x" * 33}, "language"),
        ({"content": "ok", "expire_time": "past"}, "expire_time"),
        ({"content": "ok", "expire_time": "epoch"}, "expire_time"),
    ],
    ids=["empty", "1MiB+1-ascii", "1MiB+1-utf8", "long-title", "title-newline", "language-space",
         "language-upper", "language-long", "expire-past", "expire-epoch"],
)
def test_create_bad_input(stack: StackProcess, pastes: pbg.PasteServiceStub, alice: str,
                          fields: dict[str, object], field: str) -> None:
    fields = dict(fields)
    if fields.get("expire_time") == "past":
        fields["expire_time"] = ts_in(-60)
    elif fields.get("expire_time") == "epoch":
        fields["expire_time"] = Timestamp()  # set, but 1970
    with NothingStored(stack):
        err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, pastes.CreatePaste,
                           pb.CreatePasteRequest(**fields),  # type: ignore[arg-type]
                           metadata=grpc_metadata(alice))
    v = violations(err)
    assert set(v) == {field}, v
    assert v[field]


@pytest.mark.parametrize(
    "expire_time",
    [
        Timestamp(seconds=253402300800),  # 10000-01-01: past the range a Timestamp may hold
        Timestamp(seconds=2**40),
        Timestamp(seconds=int(time.time()) + 3600, nanos=-1),
        Timestamp(seconds=int(time.time()) + 3600, nanos=1_000_000_000),
    ],
    ids=["year-10000", "seconds-2^40", "nanos-negative", "nanos-1e9"],
)
def test_create_invalid_timestamp(stack: StackProcess, pastes: pbg.PasteServiceStub, alice: str,
                                  expire_time: Timestamp) -> None:
    """A Timestamp outside its documented range is bad input, not an internal error."""
    with NothingStored(stack):
        err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, pastes.CreatePaste,
                           pb.CreatePasteRequest(content="ok", expire_time=expire_time),
                           metadata=grpc_metadata(alice))
    assert set(violations(err)) == {"expire_time"}


def test_create_invalid_utf8_is_invalid_argument(stack: StackProcess, channel: grpc.Channel,
                                                 alice: str) -> None:
    """A request whose string field is not UTF-8 cannot be parsed: the caller's fault."""
    raw_create = channel.unary_unary(
        f"/{pb.DESCRIPTOR.services_by_name['PasteService'].full_name}/CreatePaste",
        request_serializer=lambda b: b, response_deserializer=lambda b: b)
    content_field = pb.CreatePasteRequest.DESCRIPTOR.fields_by_name["content"].number
    raw = bytes([content_field << 3 | 2, 3]) + b"\xff\xfeA"  # content: 3 bytes, not UTF-8
    with NothingStored(stack):
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, raw_create, raw, metadata=grpc_metadata(alice))


def test_create_reports_every_violation(stack: StackProcess, pastes: pbg.PasteServiceStub,
                                        alice: str) -> None:
    with NothingStored(stack):
        err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, pastes.CreatePaste,
                           pb.CreatePasteRequest(content="", title="t" * 201, language="C Sharp!",
                                                 expire_time=ts_in(-60)),
                           metadata=grpc_metadata(alice))
    assert set(violations(err)) == {"content", "title", "language", "expire_time"}


def test_create_without_token(stack: StackProcess, pastes: pbg.PasteServiceStub) -> None:
    with NothingStored(stack):
        err = expect_error(grpc.StatusCode.UNAUTHENTICATED, pastes.CreatePaste,
                           pb.CreatePasteRequest(content="anonymous"))
    assert error_reason(err) == "TOKEN_MISSING"


def test_get_unknown(pastes: pbg.PasteServiceStub) -> None:
    err = expect_error(grpc.StatusCode.NOT_FOUND, pastes.GetPaste,
                       pb.GetPasteRequest(paste_id="ZZZZzzzz0000"))
    assert error_reason(err) == "PASTE_NOT_FOUND"


@pytest.mark.parametrize("paste_id", ["", "../x", "..", "a/b", "abc def", "x" * 33, "caf\u00e9",
                                      "pastes%2Fx"])
def test_get_malformed_id(pastes: pbg.PasteServiceStub, paste_id: str) -> None:
    err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, pastes.GetPaste,
                       pb.GetPasteRequest(paste_id=paste_id))
    assert set(violations(err)) == {"paste_id"}


@pytest.mark.parametrize("paste_id", ["", "../x"])
def test_delete_malformed_id(pastes: pbg.PasteServiceStub, alice: str, paste_id: str) -> None:
    err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, pastes.DeletePaste,
                       pb.DeletePasteRequest(paste_id=paste_id), metadata=grpc_metadata(alice))
    assert set(violations(err)) == {"paste_id"}


def test_delete_unknown(pastes: pbg.PasteServiceStub, alice: str) -> None:
    expect_error(grpc.StatusCode.NOT_FOUND, pastes.DeletePaste,
                 pb.DeletePasteRequest(paste_id="ZZZZzzzz0000"), metadata=grpc_metadata(alice))


# --------------------------------------------------------------------------- delete


def test_delete_by_other_user_denied(stack: StackProcess, pastes: pbg.PasteServiceStub,
                                     alice: str, bob: str) -> None:
    created = create(pastes, alice, "alice's text")
    err = expect_error(grpc.StatusCode.PERMISSION_DENIED, pastes.DeletePaste,
                       pb.DeletePasteRequest(paste_id=created.paste_id), metadata=grpc_metadata(bob))
    assert error_reason(err) == "NOT_OWNER"
    assert get(pastes, created.paste_id).content == "alice's text"
    assert created.paste_id in stored_paste_ids(stack)
    expect_error(grpc.StatusCode.UNAUTHENTICATED, pastes.DeletePaste,
                 pb.DeletePasteRequest(paste_id=created.paste_id))
    assert get(pastes, created.paste_id).content == "alice's text"


def test_delete_by_owner_then_blob_collected(stack: StackProcess, pastes: pbg.PasteServiceStub,
                                             alice: str) -> None:
    created = create(pastes, alice, "short-lived text")
    assert blob_files_of(stack, created.paste_id), "the blob file was not where expected"
    pastes.DeletePaste(pb.DeletePasteRequest(paste_id=created.paste_id), metadata=grpc_metadata(alice),
                       timeout=30)
    err = expect_error(grpc.StatusCode.NOT_FOUND, pastes.GetPaste,
                       pb.GetPasteRequest(paste_id=created.paste_id))
    assert error_reason(err) == "PASTE_NOT_FOUND"
    assert created.paste_id not in stored_paste_ids(stack)
    # Deleting again: it is gone.
    expect_error(grpc.StatusCode.NOT_FOUND, pastes.DeletePaste,
                 pb.DeletePasteRequest(paste_id=created.paste_id), metadata=grpc_metadata(alice))
    # The blob-gc worker removes the text (a deadline against hangs, not a timing assertion).
    deadline = time.monotonic() + 15
    while blob_files_of(stack, created.paste_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not blob_files_of(stack, created.paste_id), "blob-gc did not remove the paste's blob"


# --------------------------------------------------------------------------- expiry


def test_expired_paste_failed_precondition(pastes: pbg.PasteServiceStub, alice: str) -> None:
    created = create(pastes, alice, "ephemeral", expire_time=ts_in(1.5))
    expire_s = created.expire_time.ToMilliseconds() / 1000
    try:
        assert get(pastes, created.paste_id).content == "ephemeral"
    except grpc.RpcError as early:  # only acceptable when this machine was slower than 1.5 s
        assert early.code() == grpc.StatusCode.FAILED_PRECONDITION and time.time() >= expire_s, early
    while time.time() <= expire_s + 0.1:
        time.sleep(0.1)
    err = expect_error(grpc.StatusCode.FAILED_PRECONDITION, pastes.GetPaste,
                       pb.GetPasteRequest(paste_id=created.paste_id))
    assert error_reason(err) == "PASTE_EXPIRED"
    pf = precondition_violations(err)
    assert len(pf) == 1
    assert pf[0].subject.endswith(created.paste_id)
    assert pf[0].type
    infos = details_of(err, error_details_pb2.ErrorInfo)
    assert infos[0].domain
