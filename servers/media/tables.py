"""Media tables (the table port; CQL emitted by `sysdesign migrate`)."""

from servers.storage.table import Table

# One row per media item, by id: the upload's progress (committed bytes and the
# staged parts), the probe, the status and the renditions. Every RPC but
# ListMedia reads exactly this row.
MEDIA = Table(
    name="media",
    partition_key=("media_id",),
    columns={
        "media_id": "bigint",
        "owner_id": "bigint",
        "filename": "text",
        "content_type": "text",
        "kind": "text",
        "state": "int",
        "percent": "int",
        "failure_reason": "text",
        "last_error": "text",
        "size_bytes": "bigint",
        "sha256": "text",
        "committed_bytes": "bigint",
        "staging_key": "text",
        "staging_upload_id": "text",
        "parts": "text",
        "probe": "text",
        "renditions": "text",
        "attempts": "int",
        "create_ms": "bigint",
        "update_ms": "bigint",
        "processing_ms": "bigint",
    },
    comment="media items by id: upload progress, probe, status, renditions",
)

# The owner's media ids, newest first (Snowflake ids), with the size so the
# quota is one partition slice. A user's list is one partition: rows are a few
# dozen bytes, so even 100k items per user stay far below Cassandra's
# comfortable partition size.
MEDIA_BY_OWNER = Table(
    name="media_by_owner",
    partition_key=("owner_id",),
    clustering=("media_id",),
    descending=True,
    columns={"owner_id": "bigint", "media_id": "bigint", "size_bytes": "bigint", "create_ms": "bigint"},
    comment="media ids by owner, newest first",
)

TABLES = [MEDIA, MEDIA_BY_OWNER]
