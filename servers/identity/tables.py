"""Identity tables: users by id, and the username index that makes names unique."""

from servers.storage.table import Table

USERS = Table(
    name="users",
    partition_key=("user_id",),
    columns={"user_id": "bigint", "username": "text", "create_ms": "bigint"},
    comment="users by id",
)

# Written first with IF NOT EXISTS (a lightweight transaction on Cassandra):
# of two concurrent registrations of one name exactly one wins.
USERNAMES = Table(
    name="usernames",
    partition_key=("username",),
    columns={"username": "text", "user_id": "bigint", "password_hash": "text", "create_ms": "bigint"},
    comment="username -> user id and password hash",
)

TABLES = [USERS, USERNAMES]
