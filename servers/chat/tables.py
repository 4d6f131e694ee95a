"""Chat tables (the table port: Cassandra's model, SQLite by default).

The message table is the source of truth for delivery: a message is
acknowledged (SENT) only after its row is written, and every device catches
up by slicing it after its cursor. Partitions are ``(conversation_id,
bucket)`` with the bucket taken from the message's Snowflake id
(``bucket_of(message_id, BUCKET_MS)``, ten days as in Discord's message
store), so a busy conversation never grows one unbounded partition and a
page of history is a slice of one or two partitions.
"""

from servers.storage.table import Table

# Ten days per message partition: a year of a busy group is ~37 partitions.
BUCKET_MS = 10 * 86_400_000

CONVERSATIONS = Table(
    name="chat_conversations",
    partition_key=("conversation_id",),
    columns={
        "conversation_id": "bigint",
        "kind": "int",           # ConversationType
        "title": "text",
        "creator_id": "bigint",
        "create_ms": "bigint",
    },
    comment="chat conversations by id",
)

# One 1:1 conversation per pair: written IF NOT EXISTS with the smaller user id
# first, so two concurrent creates of the same pair agree on one conversation.
DIRECT_PAIRS = Table(
    name="chat_direct_pairs",
    partition_key=("user_lo", "user_hi"),
    columns={"user_lo": "bigint", "user_hi": "bigint", "conversation_id": "bigint",
             "create_ms": "bigint"},
    comment="the direct conversation of each pair of users",
)

# Members of a conversation: one partition of at most 500 rows.
MEMBERS = Table(
    name="chat_members",
    partition_key=("conversation_id",),
    clustering=("user_id",),
    columns={"conversation_id": "bigint", "user_id": "bigint", "username": "text",
             "role": "int", "join_ms": "bigint"},
    comment="members of each conversation",
)

# The conversations of a user, newest first (ListConversations, replay on connect).
USER_CONVERSATIONS = Table(
    name="chat_user_conversations",
    partition_key=("user_id",),
    clustering=("conversation_id",),
    descending=True,
    columns={"user_id": "bigint", "conversation_id": "bigint", "join_ms": "bigint"},
    comment="conversations of each user, newest first",
)

MESSAGES = Table(
    name="chat_messages",
    partition_key=("conversation_id", "bucket"),
    clustering=("message_id",),
    columns={
        "conversation_id": "bigint",
        "bucket": "bigint",
        "message_id": "bigint",
        "sender_id": "bigint",
        "sender_name": "text",
        "client_message_id": "text",
        "body": "text",
        "attachment_id": "bigint",
        "attachment_name": "text",
        "attachment_type": "text",
        "attachment_size": "bigint",
        "create_ms": "bigint",
    },
    comment="messages by (conversation, 10-day bucket), in id order",
)

# Idempotent sends: (sender, client_message_id) -> the message it became,
# written IF NOT EXISTS before the message row, so a resend returns the
# original and is never stored twice.
CLIENT_MESSAGES = Table(
    name="chat_client_messages",
    partition_key=("sender_id", "client_message_id"),
    columns={"sender_id": "bigint", "client_message_id": "text", "conversation_id": "bigint",
             "message_id": "bigint", "create_ms": "bigint"},
    comment="client message ids of each sender (send idempotency)",
)

# Per-device delivery cursors: every message of the conversation up to
# delivered_upto is on the device. One partition per device, so a reconnect
# reads all its cursors with one slice.
DEVICE_CURSORS = Table(
    name="chat_device_cursors",
    partition_key=("user_id", "device_id"),
    clustering=("conversation_id",),
    columns={"user_id": "bigint", "device_id": "text", "conversation_id": "bigint",
             "delivered_upto": "bigint"},
    comment="delivery cursor of each device in each conversation",
)

# Per-member receipts of a conversation: delivered (any device) and read
# positions; receipts of single messages derive from them.
RECEIPTS = Table(
    name="chat_receipts",
    partition_key=("conversation_id",),
    clustering=("user_id",),
    columns={"conversation_id": "bigint", "user_id": "bigint", "delivered_upto": "bigint",
             "read_upto": "bigint"},
    comment="delivered and read positions of each member",
)

# Attachment metadata; the bytes are in the blob store under blob_key.
ATTACHMENTS = Table(
    name="chat_attachments",
    partition_key=("conversation_id", "attachment_id"),
    columns={"conversation_id": "bigint", "attachment_id": "bigint", "uploader_id": "bigint",
             "filename": "text", "content_type": "text", "size_bytes": "bigint",
             "blob_key": "text", "etag": "text", "create_ms": "bigint"},
    comment="chat attachments (bytes in the blob store)",
)

TABLES = [CONVERSATIONS, DIRECT_PAIRS, MEMBERS, USER_CONVERSATIONS, MESSAGES, CLIENT_MESSAGES,
          DEVICE_CURSORS, RECEIPTS, ATTACHMENTS]
