"""The scale-out blob adapter: the S3 API via boto3 (MinIO, AWS S3, moto).

boto3 is blocking; every call runs in a worker thread (``asyncio.to_thread``)
on one low-level client, which is thread-safe. Credentials come from the
arguments or boto3's default chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, shared config, instance roles).

Multipart uploads map one to one onto S3's (parts of at least 5 MiB but the
last); ``iter_range`` streams one GET's body chunk by chunk; presigned GET
URLs are signed locally (no request).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from servers.storage.blob import (
    BlobAttributes,
    BlobError,
    BlobNotFound,
    BlobStore,
    BytesLike,
    UploadNotFound,
    UploadPart,
    check_key,
    check_parts,
    prefix_can_match,
)

T = TypeVar("T")

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _etag(value: str) -> str:
    return value.strip('"')


def _server_time(resp: Any) -> float:
    """The response's Date header (unix seconds), else now."""
    try:
        date = resp["ResponseMetadata"]["HTTPHeaders"]["date"]
        return parsedate_to_datetime(date).timestamp()
    except Exception:  # a missing or odd header is not worth failing a put
        return time.time()


class S3BlobStore(BlobStore):
    min_part_size = 5 * 1024 * 1024

    def __init__(
        self,
        bucket: str,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key: str | None = None,
        secret_key: str | None = None,
        create_bucket: bool = False,
    ) -> None:
        self.bucket = bucket
        self.endpoint_url = endpoint_url or None
        self.region = region
        self._bucket_ready = not create_bucket
        self._bucket_lock = asyncio.Lock()
        config = BotoConfig(
            region_name=region,
            retries={"max_attempts": 5, "mode": "standard"},
            connect_timeout=5,
            read_timeout=30,
            max_pool_connections=32,
            # MinIO and other S3-compatible servers: path-style addressing.
            s3={"addressing_style": "path" if self.endpoint_url else "auto"},
            # Only the checksums S3 requires: not every S3-compatible server
            # understands the newer default flexible checksums.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        session = boto3.session.Session()
        self._client: Any = session.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=region,
            aws_access_key_id=access_key or None,
            aws_secret_access_key=secret_key or None,
            config=config,
        )

    # -- plumbing ---------------------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: Any, key: str = "", **kwargs: Any) -> T:
        if not self._bucket_ready:
            await self.ensure_bucket()
        return await self._raw_call(fn, *args, key=key, **kwargs)

    async def _raw_call(
        self, fn: Callable[..., T], *args: Any, key: str = "", **kwargs: Any
    ) -> T:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except ClientError as exc:
            if key and (_code(exc) in _NOT_FOUND or _status(exc) == 404) and (
                _code(exc) != "NoSuchBucket"
            ):
                raise BlobNotFound(key) from exc
            raise BlobError(f"s3 {self.bucket}: {_code(exc) or exc}") from exc
        except BotoCoreError as exc:
            raise BlobError(f"s3 {self.endpoint_url or 'aws'}: {exc}") from exc

    async def ensure_bucket(self) -> None:
        """Create the bucket when it does not exist."""
        async with self._bucket_lock:
            try:
                await self._raw_call(self._client.head_bucket, Bucket=self.bucket)
            except BlobError as exc:
                cause = exc.__cause__
                if not (isinstance(cause, ClientError) and _status(cause) == 404):
                    raise
                kwargs: dict[str, Any] = {"Bucket": self.bucket}
                if self.region != "us-east-1":
                    kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
                try:
                    await self._raw_call(self._client.create_bucket, **kwargs)
                except BlobError as exc2:
                    c2 = exc2.__cause__
                    if not (
                        isinstance(c2, ClientError)
                        and _code(c2) == "BucketAlreadyOwnedByYou"
                    ):
                        raise
            self._bucket_ready = True

    # -- the port ---------------------------------------------------------------

    async def put(
        self, key: str, data: bytes, *, content_type: str = "application/octet-stream"
    ) -> BlobAttributes:
        check_key(key)
        data = bytes(data)
        resp = await self._call(
            self._client.put_object,
            Bucket=self.bucket,
            Key=key,
            Body=data,
            ContentType=content_type,
        )
        return BlobAttributes(
            size=len(data), etag=_etag(resp["ETag"]), last_modified=_server_time(resp)
        )

    def _read(self, **kwargs: Any) -> bytes:
        resp = self._client.get_object(**kwargs)
        body = resp["Body"]
        try:
            return bytes(body.read())
        finally:
            body.close()

    async def get(self, key: str) -> bytes:
        check_key(key)
        return await self._call(self._read, key=key, Bucket=self.bucket, Key=key)

    async def get_range(self, key: str, offset: int, length: int | None = None) -> bytes:
        check_key(key)
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("offset and length must not be negative")
        if length == 0:
            await self.attributes(key)  # BlobNotFound when absent
            return b""
        end = "" if length is None else str(offset + length - 1)
        try:
            return await self._call(
                self._read, key=key, Bucket=self.bucket, Key=key, Range=f"bytes={offset}-{end}"
            )
        except BlobError as exc:
            cause = exc.__cause__
            if isinstance(cause, ClientError) and (
                _code(cause) == "InvalidRange" or _status(cause) == 416
            ):
                return b""  # the range starts at or past the end of the object
            raise

    async def attributes(self, key: str) -> BlobAttributes:
        check_key(key)
        resp = await self._call(self._client.head_object, key=key, Bucket=self.bucket, Key=key)
        return BlobAttributes(
            size=int(resp["ContentLength"]),
            etag=_etag(resp["ETag"]),
            last_modified=resp["LastModified"].timestamp(),
        )

    async def delete(self, key: str) -> None:
        check_key(key)
        await self._call(self._client.delete_object, Bucket=self.bucket, Key=key)

    async def iter_keys(self, prefix: str = "") -> AsyncIterator[str]:
        if not prefix_can_match(prefix):
            return
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": 1000}
            if token:
                kwargs["ContinuationToken"] = token
            resp = await self._call(self._client.list_objects_v2, **kwargs)
            for obj in resp.get("Contents", []):
                yield obj["Key"]
            if not resp.get("IsTruncated"):
                return
            token = resp.get("NextContinuationToken")
            if not token:
                return

    # -- multipart, streamed reads, URLs ------------------------------------------

    async def _upload_call(self, fn: Callable[..., T], key: str, upload_id: str, **kwargs: Any) -> T:
        try:
            return await self._call(fn, **kwargs)
        except BlobError as exc:
            cause = exc.__cause__
            if isinstance(cause, ClientError) and _code(cause) == "NoSuchUpload":
                raise UploadNotFound(f"{key} (upload {upload_id})") from cause
            raise

    async def create_multipart(
        self, key: str, *, content_type: str = "application/octet-stream"
    ) -> str:
        check_key(key)
        resp = await self._call(
            self._client.create_multipart_upload, Bucket=self.bucket, Key=key, ContentType=content_type
        )
        return str(resp["UploadId"])

    async def upload_part(
        self, key: str, upload_id: str, part_number: int, offset: int, data: BytesLike
    ) -> UploadPart:
        check_key(key)
        if part_number < 1 or offset < 0:
            raise ValueError("part numbers start at 1 and offsets must not be negative")
        resp = await self._upload_call(
            self._client.upload_part, key, upload_id, Bucket=self.bucket, Key=key,
            UploadId=upload_id, PartNumber=part_number, Body=bytes(data),
        )
        return UploadPart(part_number=part_number, offset=offset, size=len(data),
                          etag=_etag(resp["ETag"]))

    async def complete_multipart(
        self, key: str, upload_id: str, parts: Sequence[UploadPart]
    ) -> BlobAttributes:
        check_key(key)
        ordered, expected = check_parts(parts)
        resp = await self._upload_call(
            self._client.complete_multipart_upload, key, upload_id, Bucket=self.bucket, Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": [{"ETag": f'"{p.etag}"', "PartNumber": p.part_number}
                                       for p in ordered]},
        )
        return BlobAttributes(size=expected, etag=_etag(resp["ETag"]), last_modified=_server_time(resp))

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        check_key(key)
        try:
            await self._upload_call(self._client.abort_multipart_upload, key, upload_id,
                                    Bucket=self.bucket, Key=key, UploadId=upload_id)
        except UploadNotFound:
            return

    async def iter_range(
        self, key: str, offset: int = 0, length: int | None = None, *, chunk_size: int = 1 << 20
    ) -> AsyncIterator[bytes]:
        check_key(key)
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("offset and length must not be negative")
        if length == 0:
            await self.attributes(key)
            return
        end = "" if length is None else str(offset + length - 1)
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if offset or length is not None:
            kwargs["Range"] = f"bytes={offset}-{end}"
        try:
            resp = await self._call(self._client.get_object, key=key, **kwargs)
        except BlobError as exc:
            cause = exc.__cause__
            if isinstance(cause, ClientError) and (
                _code(cause) == "InvalidRange" or _status(cause) == 416
            ):
                return
            raise
        body = resp["Body"]
        try:
            while True:
                try:
                    chunk = await asyncio.to_thread(body.read, chunk_size)
                except BotoCoreError as exc:
                    raise BlobError(f"s3 {self.bucket}: {exc}") from exc
                if not chunk:
                    return
                yield bytes(chunk)
        finally:
            await asyncio.to_thread(body.close)

    async def presigned_get_url(self, key: str, *, expires_seconds: int = 3600) -> str | None:
        check_key(key)
        url: str = self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires_seconds
        )
        return url

    async def ping(self) -> None:
        await self._call(self._client.head_bucket, Bucket=self.bucket)

    async def close(self) -> None:
        close = getattr(self._client, "close", None)
        if close is not None:
            await asyncio.to_thread(close)
