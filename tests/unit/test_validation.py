"""The request rules declared in protos/ (buf.validate), as the server enforces them."""

from __future__ import annotations

import re

import pytest
from google.protobuf import descriptor_pool
from google.protobuf.message_factory import GetMessageClass
from sysdesign.chat.v1 import chat_pb2
from sysdesign.feed.v1 import feed_pb2
from sysdesign.identity.v1 import identity_pb2
from sysdesign.media.v1 import media_pb2
from sysdesign.shortener.v1 import shortener_pb2

from servers.media.probe import CONTENT_TYPES
from servers.platform import validation
from servers.platform.errors import InvalidArgument

SERVICE_MODULES = (chat_pb2, feed_pb2, identity_pb2, media_pb2, shortener_pb2)


def _request_types() -> list[str]:
    names = []
    for mod in SERVICE_MODULES:
        for service in mod.DESCRIPTOR.services_by_name.values():
            names += [m.input_type.full_name for m in service.methods]
    return sorted(set(names))


@pytest.mark.parametrize("full_name", _request_types())
def test_every_request_type_has_rules_that_compile(full_name: str) -> None:
    # A CEL expression that does not compile fails here, not on a user's first call.
    desc = descriptor_pool.Default().FindMessageTypeByName(full_name)
    message = GetMessageClass(desc)()
    assert isinstance(validation.violations(message), list)


def test_paths_name_repeated_elements_and_nested_fields() -> None:
    found = validation.violations(chat_pb2.CreateConversationRequest(member_ids=["7", "x", "0"]))
    assert [p for p, _ in found] == ["member_ids[1]", "member_ids[2]"]
    found = validation.violations(feed_pb2.FollowUserRequest(user=feed_pb2.UserRef(user_id="01")))
    assert found == [("user.user_id", "must be a positive decimal id")]
    assert validation.violations(feed_pb2.FollowUserRequest(user=feed_pb2.UserRef(user_id="12")), "x") == []
    found = validation.violations(chat_pb2.SendEvent(conversation_id="-1", client_message_id="m",
                                                     text="hi"), prefix="send")
    assert [p for p, _ in found] == ["send.conversation_id"]


def test_check_raises_one_violation_per_broken_rule() -> None:
    with pytest.raises(InvalidArgument) as info:
        validation.check(identity_pb2.RegisterUserRequest(username="9lives", password="short"))
    fields = [v.field for v in info.value.violations]
    assert sorted(fields) == ["password", "username"]


@pytest.mark.parametrize(("value", "ok"), [
    ("1", True), ("386542057998513522", True), ("9223372036854775807", True),
    ("9223372036854775808", False), ("0", False), ("007", False), ("-5", False), ("1e3", False),
    ("", False), (" 12", False), ("١٢", False),
])
def test_decimal_id_is_a_positive_int64_without_padding(value: str, ok: bool) -> None:
    found = validation.violations(feed_pb2.GetPostRequest(post_id=value))
    assert (found == []) is ok, found


@pytest.mark.parametrize(("value", "ok"), [
    ("phone-1", True), ("a.b_c-D9", True), ("x" * 64, True), ("x" * 65, False), ("", False),
    ("has space", False), ("slash/", False), ("émoji", False),
])
def test_client_token(value: str, ok: bool) -> None:
    found = validation.violations(chat_pb2.Hello(device_id=value))
    assert (found == []) is ok, found


@pytest.mark.parametrize(("value", "ok"), [
    ("abc123XYZ", True), ("a" * 32, True), ("a" * 33, False), ("", False), ("ab-c", False),
    ("ab_c", False),
])
def test_base62_code(value: str, ok: bool) -> None:
    found = validation.violations(shortener_pb2.GetShortUrlRequest(code=value))
    assert (found == []) is ok, found


def _upload(content_type: str) -> media_pb2.CreateUploadRequest:
    return media_pb2.CreateUploadRequest(filename="clip.mp4", content_type=content_type,
                                         size_bytes=1, sha256="ab" * 32)


def test_the_declared_content_types_are_the_ones_the_prober_knows() -> None:
    # The contract lists the supported types for clients; the prober maps each
    # to what the file must turn out to be. The two lists must not drift apart.
    for ct in CONTENT_TYPES:
        assert validation.violations(_upload(ct)) == [], ct
        assert validation.violations(_upload(ct.upper())) == [], ct
    (path, message), = validation.violations(_upload("text/plain"))
    assert path == "content_type"
    assert set(re.findall(r"[a-z0-9-]+/[a-z0-9.+-]+", message)) == set(CONTENT_TYPES)
    for near in ("video/mp4x", "xvideo/mp4", "video/", "image/svg+xml"):
        assert validation.violations(_upload(near)), near
