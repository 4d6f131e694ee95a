"""Minting tokens with the deployment's own secret (the `sysdesign token` command).

Reads the user from the table store directly (the same SQLite file or
Cassandra keyspace the servers use) and signs with the same secret, so a
person can explore with grpcurl without writing a login client first.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

from servers.identity.tables import USERNAMES, USERS
from servers.platform.auth import TokenSigner
from servers.platform.config import Config
from servers.platform.ids import SEQUENCE_BITS, TOOL_WORKER_ID, Snowflake
from servers.storage.backends import open_table_store
from servers.systems import all_tables


async def _claim_user_id(tables: Any, username: str, now_ms: int) -> int:
    """A user id no one else holds, claimed with a conditional insert of the user's row.

    Servers draw ids from a worker id leased in Redis; CLI tools share the one
    id kept for tools (``TOOL_WORKER_ID``), so two `sysdesign token` runs in
    the same millisecond would draw the same id and the second user would
    overwrite the first (seen on Cassandra with tokens minted in parallel).
    A random sequence makes that unlikely, and ``IF NOT EXISTS`` makes it
    impossible: a taken id is drawn again.
    """
    for _ in range(16):
        user_id = Snowflake(TOOL_WORKER_ID).next_id() | secrets.randbelow(1 << SEQUENCE_BITS)
        if await tables.put(USERS, {"user_id": user_id, "username": username, "create_ms": now_ms},
                            if_not_exists=True):
            return user_id
        await asyncio.sleep(0.001 + secrets.randbelow(5) / 1000)
    raise RuntimeError("could not claim a free user id")


async def mint_token(config: Config, username: str, *, create: bool = True,
                     ttl_seconds: int | None = None) -> tuple[str, int, int, bool]:
    """(token, expires_at, user_id, created): the user is registered first when missing."""
    from argon2 import PasswordHasher

    from servers.platform.errors import Violations

    v = Violations()
    from servers.identity.service import validate_username

    validate_username(username, v)
    v.raise_if_any()
    tables = open_table_store(config)
    created = False
    try:
        if not config.cassandra_hosts:
            await tables.create_tables(all_tables())
        row = await tables.get(USERNAMES, {"username": username})
        if row is None:
            if not create:
                raise LookupError(f"no user {username!r}")
            now = int(time.time() * 1000)
            user_id = await _claim_user_id(tables, username, now)
            # A random password nobody knows: this user logs in with minted tokens.
            pw_hash = PasswordHasher().hash(secrets.token_urlsafe(32))
            if await tables.put(USERNAMES, {"username": username, "user_id": user_id,
                                            "password_hash": pw_hash, "create_ms": now},
                                if_not_exists=True):
                created = True
            else:  # another minter registered the name first: give the id back
                await tables.delete(USERS, {"user_id": user_id})
            row = await tables.get(USERNAMES, {"username": username})
            assert row is not None
        signer = TokenSigner(config.secret(), config.token_ttl_seconds)
        token, exp = signer.mint(row["user_id"], username, ttl_seconds=ttl_seconds)
        return token, exp, row["user_id"], created
    finally:
        await tables.close()
