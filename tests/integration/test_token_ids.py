"""`sysdesign token` run many times at once: every new user gets an id of its own.

CLI tools share one Snowflake worker id, so two minters in the same
millisecond drew the same id and the second user overwrote the first (the
Cassandra pass caught bob signing in as alice). Runs on SQLite and on Cassandra.
"""

from __future__ import annotations

import asyncio
import functools
import time
from pathlib import Path

import pytest

from clients import localauth
from clients.localauth import mint_token
from servers.identity.tables import USERNAMES, USERS
from servers.platform.ids import Snowflake
from servers.storage.backends import open_table_store
from tests.stack import StackProcess

pytestmark = [pytest.mark.tables]


def test_tokens_minted_at_once_never_share_a_user_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every minter's clock reads the same millisecond (the Snowflake clock is injectable): the
    # worst case of processes started at once, every time instead of now and then.
    frozen = int(time.time() * 1000)
    monkeypatch.setattr(localauth, "Snowflake", functools.partial(Snowflake, clock=lambda: frozen))
    stack = StackProcess(tmp_path / "data")
    stack.data_dir.mkdir(parents=True)
    stack.migrate()
    config = stack.config()
    names = [f"minted_{i}" for i in range(12)]

    async def mint_all() -> list[tuple[str, int, int, bool]]:
        return list(await asyncio.gather(*(mint_token(config, n) for n in names)))

    minted = asyncio.run(mint_all())
    ids = [uid for _, _, uid, _ in minted]
    assert len(set(ids)) == len(names), ids
    assert all(created for *_, created in minted)

    async def read_back() -> None:
        tables = open_table_store(config)
        try:
            for name, uid in zip(names, ids, strict=True):
                by_name = await tables.get(USERNAMES, {"username": name})
                by_id = await tables.get(USERS, {"user_id": uid})
                assert by_name is not None and by_name["user_id"] == uid, (name, by_name)
                assert by_id is not None and by_id["username"] == name, (uid, by_id)
        finally:
            await tables.close()

    asyncio.run(read_back())
    # Minting again finds the same users.
    again = asyncio.run(mint_all())
    assert [uid for _, _, uid, _ in again] == ids and not any(c for *_, c in again)
