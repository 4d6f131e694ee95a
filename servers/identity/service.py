"""sysdesign.identity.v1.IdentityService: registration, login, profiles."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import grpc
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from google.protobuf.timestamp_pb2 import Timestamp
from sysdesign.identity.v1 import identity_pb2, identity_pb2_grpc

from servers.identity.tables import TABLES, USERNAMES, USERS
from servers.platform.auth import require_caller
from servers.platform.errors import AlreadyExists, NotFound, Unauthenticated, Violations
from servers.platform.runtime import Runtime

SERVICE_NAME = identity_pb2.DESCRIPTOR.services_by_name["IdentityService"].full_name
PUBLIC_METHODS = {
    f"/{SERVICE_NAME}/RegisterUser",
    f"/{SERVICE_NAME}/Login",
}

USERNAME_RE = re.compile(r"^[a-z][a-z0-9_]{2,31}$")
RESERVED_USERNAMES = frozenset({"admin", "root", "system", "sysdesign", "anonymous", "support", "api"})

# argon2id, memory-hard: 64 MiB, 3 passes (RFC 9106's second recommended option).
_hasher = PasswordHasher(time_cost=3, memory_cost=64 * 1024, parallelism=1)
# Verifying an unknown user's password against this keeps login time the same
# whether or not the name exists.
_DUMMY_HASH = _hasher.hash("not-a-real-password")


def validate_username(username: str, v: Violations, field: str = "username") -> None:
    if not username:
        v.add(field, "is required")
    elif not USERNAME_RE.match(username):
        v.add(field, "must be 3-32 characters of lowercase letters, digits and '_', starting with a letter")
    elif username in RESERVED_USERNAMES:
        v.add(field, "is reserved")


def _ts(ms: int) -> Timestamp:
    t = Timestamp()
    t.FromMilliseconds(ms)
    return t


def user_message(row: dict[str, Any]) -> identity_pb2.User:
    return identity_pb2.User(user_id=str(row["user_id"]), username=row["username"],
                             create_time=_ts(row["create_ms"]))


class IdentityCore:
    """Domain logic, shared by the servicer and the CLI (`sysdesign token`)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    async def register(self, username: str, password: str) -> dict[str, Any]:
        # The shape of both fields is the contract's (identity.proto); the
        # reserved names are the server's.
        v = Violations()
        validate_username(username, v)
        v.raise_if_any()
        password_hash = await asyncio.to_thread(_hasher.hash, password)
        user_id = self.rt.snowflake.next_id()
        now = int(time.time() * 1000)
        won = await self.rt.tables.put(
            USERNAMES,
            {"username": username, "user_id": user_id, "password_hash": password_hash, "create_ms": now},
            if_not_exists=True,
        )
        if not won:
            raise AlreadyExists(f"username {username!r} is taken", reason="USERNAME_TAKEN",
                                metadata={"username": username})
        row = {"user_id": user_id, "username": username, "create_ms": now}
        await self.rt.tables.put(USERS, row)
        return row

    async def authenticate(self, username: str, password: str) -> dict[str, Any]:
        row = await self.rt.tables.get(USERNAMES, {"username": username}) if username else None
        stored = row["password_hash"] if row else _DUMMY_HASH
        try:
            await asyncio.to_thread(_hasher.verify, stored, password)
            ok = row is not None
        except (VerificationError, InvalidHashError):
            ok = False
        if not ok or row is None:
            raise Unauthenticated("wrong username or password", reason="BAD_CREDENTIALS")
        return {"user_id": row["user_id"], "username": row["username"], "create_ms": row["create_ms"]}

    async def get_by_id(self, user_id: int) -> dict[str, Any] | None:
        return await self.rt.tables.get(USERS, {"user_id": user_id})

    async def get_by_name(self, username: str) -> dict[str, Any] | None:
        row = await self.rt.tables.get(USERNAMES, {"username": username})
        if row is None:
            return None
        return {"user_id": row["user_id"], "username": row["username"], "create_ms": row["create_ms"]}


class IdentityServicer(identity_pb2_grpc.IdentityServiceServicer):
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.core = IdentityCore(rt)

    async def RegisterUser(self, request: identity_pb2.RegisterUserRequest,
                           context: grpc.aio.ServicerContext) -> identity_pb2.RegisterUserResponse:
        row = await self.core.register(request.username, request.password)
        return identity_pb2.RegisterUserResponse(user=user_message(row))

    async def Login(self, request: identity_pb2.LoginRequest,
                    context: grpc.aio.ServicerContext) -> identity_pb2.LoginResponse:
        row = await self.core.authenticate(request.username, request.password)
        token, exp = self.rt.signer.mint(row["user_id"], row["username"])
        return identity_pb2.LoginResponse(access_token=token, expire_time=_ts(exp * 1000),
                                          user=user_message(row))

    async def GetUser(self, request: identity_pb2.GetUserRequest,
                      context: grpc.aio.ServicerContext) -> identity_pb2.GetUserResponse:
        require_caller()
        which = request.WhichOneof("lookup")
        v = Violations()
        row = None
        # identity.proto requires one of the two, a decimal id or a well-formed name.
        if which == "user_id":
            row = await self.core.get_by_id(int(request.user_id))
        else:
            validate_username(request.username, v)
            v.raise_if_any()
            row = await self.core.get_by_name(request.username)
        if row is None:
            raise NotFound("no such user", reason="USER_NOT_FOUND")
        return identity_pb2.GetUserResponse(user=user_message(row))


def register(server: grpc.aio.Server, rt: Runtime) -> list[str]:
    identity_pb2_grpc.add_IdentityServiceServicer_to_server(IdentityServicer(rt), server)
    return [SERVICE_NAME]


__all__ = ["PUBLIC_METHODS", "SERVICE_NAME", "TABLES", "IdentityCore", "register"]
