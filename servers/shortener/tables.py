"""Shortener and pastebin tables (the table port; CQL emitted by `sysdesign migrate`)."""

from servers.storage.table import Table

# The link itself, by code: the read path's only table (behind the Redis cache).
# A deleted link leaves a tombstone row (deleted_ms set, no target) so that its
# code is never handed out again (servers/shortener/core.py).
SHORT_URLS = Table(
    name="short_urls",
    partition_key=("code",),
    columns={
        "code": "text",
        "link_id": "bigint",
        "long_url": "text",
        "owner_id": "bigint",
        "create_ms": "bigint",
        "expire_ms": "bigint",
        "max_visits": "bigint",
        "redirect_type": "int",
        "custom_alias": "boolean",
        "deleted_ms": "bigint",
    },
    comment="short links by code; deleted ones as tombstones",
)

# The owner's links, newest first (link_id is a Snowflake id), denormalised so
# ListShortUrls is one partition slice.
SHORT_URLS_BY_OWNER = Table(
    name="short_urls_by_owner",
    partition_key=("owner_id",),
    clustering=("link_id",),
    descending=True,
    columns={
        "owner_id": "bigint",
        "link_id": "bigint",
        "code": "text",
        "long_url": "text",
        "create_ms": "bigint",
        "expire_ms": "bigint",
        "max_visits": "bigint",
        "redirect_type": "int",
        "custom_alias": "boolean",
    },
    comment="links by owner, newest first",
)

# Every block of the code counter handed out, newest first: if Redis loses its
# counter, reservation resumes above the highest block ever reserved, so a
# generated code is never reused.
CODE_BLOCKS = Table(
    name="code_blocks",
    partition_key=("counter",),
    clustering=("block_end",),
    descending=True,
    columns={"counter": "text", "block_end": "bigint", "reserved_ms": "bigint"},
    comment="high-water marks of the code counters",
)

# Paste metadata; the text itself is in the blob store under blob_key.
PASTES = Table(
    name="pastes",
    partition_key=("paste_id",),
    columns={
        "paste_id": "text",
        "owner_id": "bigint",
        "title": "text",
        "language": "text",
        "size_bytes": "bigint",
        "create_ms": "bigint",
        "expire_ms": "bigint",
        "blob_key": "text",
        "etag": "text",
    },
    comment="paste metadata by id",
)

TABLES = [SHORT_URLS, SHORT_URLS_BY_OWNER, CODE_BLOCKS, PASTES]
