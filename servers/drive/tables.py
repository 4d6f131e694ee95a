"""Drive tables (the table port: Cassandra's model, SQLite by default).

Metadata is kept apart from the blocks (which live in the content-addressed
store, servers/storage/cas.py) and partitioned so that no partition grows
without bound: a folder's children are one partition per ``(namespace,
folder)``, a file's revisions one per ``(namespace, file)`` (at most
``keep_revisions`` rows), the change journal one per ``(namespace, hour)``.
A namespace is a user's tree (its id is the user's id).
"""

from servers.storage.table import Table

# One journal partition per namespace and hour (from the change's Snowflake id).
JOURNAL_BUCKET_MS = 3_600_000
# Commit intents: one partition per ten minutes, swept once due.
INTENT_BUCKET_MS = 600_000

NAMESPACES = Table(
    name="drive_namespaces",
    partition_key=("ns",),
    columns={"ns": "bigint", "chunking": "int", "create_ms": "bigint", "first_bucket": "bigint"},
    comment="drive namespaces (one per user): settings and the first journal bucket",
)

NODES = Table(
    name="drive_nodes",
    partition_key=("ns", "node_id"),
    columns={
        "ns": "bigint", "node_id": "bigint", "parent_id": "bigint", "name": "text",
        "kind": "int",  # NodeKind
        "create_ms": "bigint", "modify_ms": "bigint",
        # Set while in the trash: when, and the trash row's id.
        "trash_id": "bigint",
    },
    comment="drive files and folders by id",
)

# A folder's children by normalised name (NFC, case-folded, NFC). Claimed IF
# NOT EXISTS, so two names that differ only by case or normalisation cannot
# both exist, and two concurrent creates of one name agree on one node.
CHILDREN = Table(
    name="drive_children",
    partition_key=("ns", "parent_id"),
    clustering=("key",),
    columns={"ns": "bigint", "parent_id": "bigint", "key": "text", "node_id": "bigint",
             "name": "text", "kind": "int"},
    comment="drive folder entries by normalised name",
)

# A file's revisions, newest first; the top row is the head. A revision is
# written IF NOT EXISTS at head+1, so of two commits on the same base exactly
# one wins. ``ref_owner`` is the owner its blocks are referenced by in the
# content-addressed store (unique per commit attempt).
REVISIONS = Table(
    name="drive_revisions",
    partition_key=("ns", "node_id"),
    clustering=("rev",),
    descending=True,
    columns={
        "ns": "bigint", "node_id": "bigint", "rev": "bigint",
        "blocks": "text",  # "sha256:size,sha256:size,…"
        "size": "bigint", "chunking": "int", "device": "text", "author": "bigint",
        "create_ms": "bigint", "content_hash": "text", "ref_owner": "text",
    },
    comment="drive file revisions, newest first",
)

# The change journal: every create, modify, move, delete, restore, conflict.
JOURNAL = Table(
    name="drive_journal",
    partition_key=("ns", "bucket"),
    clustering=("change_id",),
    columns={
        "ns": "bigint", "bucket": "bigint", "change_id": "bigint", "kind": "int",
        "node_id": "bigint", "node_kind": "int", "path": "text", "from_path": "text",
        "rev": "bigint", "device": "text", "conflict_with": "text",
    },
    comment="drive change journal per namespace and hour",
)

TRASH = Table(
    name="drive_trash",
    partition_key=("ns",),
    clustering=("trash_id",),
    descending=True,
    columns={"ns": "bigint", "trash_id": "bigint", "node_id": "bigint", "parent_id": "bigint",
             "name": "text", "path": "text"},
    comment="drive trash per namespace, most recent first",
)

# Shares. GRANTS answers "may this caller reach this namespace, and where";
# SHARES_IN lists what was shared with a user, SHARES_OUT what a user shared.
GRANTS = Table(
    name="drive_grants",
    partition_key=("ns", "grantee"),
    clustering=("folder_id",),
    columns={"ns": "bigint", "grantee": "bigint", "folder_id": "bigint", "role": "int",
             "create_ms": "bigint"},
    comment="drive folders shared with a user, by namespace and grantee",
)
SHARES_IN = Table(
    name="drive_shares_in",
    partition_key=("grantee",),
    clustering=("ns", "folder_id"),
    columns={"grantee": "bigint", "ns": "bigint", "folder_id": "bigint", "role": "int",
             "create_ms": "bigint"},
    comment="drive folders shared with each user",
)
SHARES_OUT = Table(
    name="drive_shares_out",
    partition_key=("ns",),
    clustering=("folder_id", "grantee"),
    columns={"ns": "bigint", "folder_id": "bigint", "grantee": "bigint", "role": "int",
             "create_ms": "bigint"},
    comment="drive folders each user shared",
)

# A commit references its blocks before it writes its revision row; the
# intent, written first, lets the sweep take the references back when the
# process died in between (the revision row never appeared).
INTENTS = Table(
    name="drive_intents",
    partition_key=("bucket",),
    clustering=("ref_owner",),
    columns={"bucket": "bigint", "ref_owner": "text", "ns": "bigint", "node_id": "bigint",
             "rev": "bigint", "digests": "text"},
    comment="drive commits in flight, by ten-minute bucket",
)
INTENT_CURSOR = Table(
    name="drive_intent_cursor",
    partition_key=("name",),
    columns={"name": "text", "bucket": "bigint"},
    comment="the first intent bucket the sweep has not finished",
)

TABLES = [NAMESPACES, NODES, CHILDREN, REVISIONS, JOURNAL, TRASH, GRANTS, SHARES_IN, SHARES_OUT,
          INTENTS, INTENT_CURSOR]
