"""Pick the adapter of each storage port from the configuration.

- table: Cassandra when ``SYSDESIGN_CASSANDRA_HOSTS`` is set, else a SQLite
  file under the data directory;
- blob: S3 when ``SYSDESIGN_S3_ENDPOINT`` is set (credentials from boto3's
  default chain: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ...), else
  files under the data directory.

Neither opens a connection: the adapters connect on first use.
"""

from __future__ import annotations

from servers.platform.config import Config
from servers.storage.blob import BlobStore
from servers.storage.table import TableStore


def open_table_store(config: Config) -> TableStore:
    if config.cassandra_hosts:
        from servers.storage.cassandra_table import CassandraTableStore

        return CassandraTableStore(
            config.cassandra_hosts,
            config.cassandra_port,
            config.cassandra_keyspace,
            local_dc=config.cassandra_local_dc or None,
        )
    from servers.storage.sqlite_table import SqliteTableStore

    return SqliteTableStore(config.sqlite_path)


def open_blob_store(config: Config) -> BlobStore:
    if config.s3_endpoint:
        from servers.storage.s3_blob import S3BlobStore

        # The bucket is created on first use when missing (MinIO in development);
        # on AWS, grant s3:CreateBucket or create it beforehand.
        return S3BlobStore(
            config.s3_bucket,
            endpoint_url=config.s3_endpoint,
            region=config.s3_region,
            create_bucket=True,
        )
    from servers.storage.fs_blob import FilesystemBlobStore

    return FilesystemBlobStore(config.blob_root)
