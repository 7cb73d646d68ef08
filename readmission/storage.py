"""ObjectStore: the one place that talks S3 (MinIO in production, SeaweedFS locally)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from readmission.config import Settings

_NOT_FOUND = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
_PRECONDITION_FAILED = {"412", "PreconditionFailed"}


class PreconditionFailed(Exception):
    """An If-Match did not hold: the object under the key is another version now (HTTP 412)."""


@dataclass(frozen=True)
class ObjectInfo:
    bucket: str
    key: str
    size: int
    etag: str


def _is_not_found(error: ClientError) -> bool:
    return str(error.response.get("Error", {}).get("Code")) in _NOT_FOUND


def _is_precondition_failed(error: ClientError) -> bool:
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status == 412 or str(error.response.get("Error", {}).get("Code")) in _PRECONDITION_FAILED


def _quoted(etag: str) -> str:
    return '"' + etag.strip('"') + '"'


class ObjectStore:
    """Thin, typed wrapper over a boto3 S3 client. Every write is one atomic PUT."""

    def __init__(self, client: Any) -> None:
        self.client = client

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> ObjectStore:
        """From the settings' endpoint and region, with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY."""
        settings = settings or Settings.from_env()
        return cls.connect(
            settings.s3_endpoint_url,
            settings.aws_region,
            os.environ.get("AWS_ACCESS_KEY_ID"),
            os.environ.get("AWS_SECRET_ACCESS_KEY"),
        )

    @classmethod
    def connect(
        cls, endpoint_url: str, region: str, access_key: str | None, secret_key: str | None
    ) -> ObjectStore:
        client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
            ),
        )
        return cls(client)

    # reads
    def head(self, bucket: str, key: str) -> ObjectInfo | None:
        try:
            response = self.client.head_object(Bucket=bucket, Key=key)
        except ClientError as error:
            if _is_not_found(error):
                return None
            raise
        return ObjectInfo(bucket, key, int(response["ContentLength"]), response["ETag"].strip('"'))

    def exists(self, bucket: str, key: str) -> bool:
        return self.head(bucket, key) is not None

    def get_bytes(self, bucket: str, key: str) -> bytes:
        return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()

    def get_with_etag(self, bucket: str, key: str) -> tuple[bytes, str]:
        """The object's bytes and the ETag of exactly those bytes."""
        response = self.client.get_object(Bucket=bucket, Key=key)
        return response["Body"].read(), response["ETag"].strip('"')

    def get_bytes_if_exists(self, bucket: str, key: str) -> bytes | None:
        try:
            return self.get_bytes(bucket, key)
        except ClientError as error:
            if _is_not_found(error):
                return None
            raise

    def open_version(self, bucket: str, key: str, etag: str | None = None) -> Any | None:
        """A stream of the object's bytes (botocore StreamingBody: `iter_chunks`, `close`),
        without reading them: with `etag`, only if it is still that version (If-Match; a
        multipart upload's ETag `<md5>-<parts>` works alike). None if there is no object,
        PreconditionFailed if another version replaced it."""
        extra = {} if etag is None else {"IfMatch": _quoted(etag)}
        try:
            response = self.client.get_object(Bucket=bucket, Key=key, **extra)
        except ClientError as error:
            if _is_not_found(error):
                return None
            if _is_precondition_failed(error):
                raise PreconditionFailed(f"s3://{bucket}/{key} is no longer {etag}") from error
            raise
        return response["Body"]

    def get_many(self, bucket: str, keys: list[str], workers: int = 8) -> list[bytes | None]:
        """`get_bytes_if_exists` of each key, `workers` at a time (one client: boto3's are
        thread-safe, and its pool holds 10 connections), in the keys' order."""
        if len(keys) <= 1:
            return [self.get_bytes_if_exists(bucket, key) for key in keys]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda key: self.get_bytes_if_exists(bucket, key), keys))

    def get_json(self, bucket: str, key: str) -> Any:
        return json.loads(self.get_bytes(bucket, key))

    def get_json_if_exists(self, bucket: str, key: str) -> Any | None:
        data = self.get_bytes_if_exists(bucket, key)
        return None if data is None else json.loads(data)

    def list(self, bucket: str, prefix: str = "") -> Iterator[ObjectInfo]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                yield ObjectInfo(bucket, item["Key"], int(item["Size"]), item["ETag"].strip('"'))

    def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        return [info.key for info in self.list(bucket, prefix)]

    # writes
    def put_bytes(
        self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> None:
        self.client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)

    def put_json(self, bucket: str, key: str, document: Any) -> None:
        self.put_bytes(bucket, key, json_bytes(document), "application/json")

    def put_if_changed(
        self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> bool:
        """PUT unless the object already holds exactly these bytes. True if this call wrote.

        For outputs rewritten by a redelivery: identical bytes make no new write (and no new
        notification downstream)."""
        if self.get_bytes_if_exists(bucket, key) == data:
            return False
        self.put_bytes(bucket, key, data, content_type)
        return True

    def put_if_absent(
        self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> bool:
        """Write unless the object exists. Returns True if this call wrote it.

        Writing nothing when the object is there keeps redelivered events from producing new
        notifications downstream.
        """
        if self.exists(bucket, key):
            return False
        self.put_bytes(bucket, key, data, content_type)
        return True

    def copy(
        self,
        source_bucket: str,
        source_key: str,
        bucket: str,
        key: str,
        *,
        if_match: str | None = None,
    ) -> None:
        """Server-side copy; with `if_match`, only of that source version (else
        PreconditionFailed)."""
        extra = {} if if_match is None else {"CopySourceIfMatch": _quoted(if_match)}
        try:
            self.client.copy_object(
                Bucket=bucket,
                Key=key,
                CopySource={"Bucket": source_bucket, "Key": source_key},
                **extra,
            )
        except ClientError as error:
            if if_match is not None and _is_precondition_failed(error):
                raise PreconditionFailed(f"s3://{source_bucket}/{source_key}: {error}") from error
            raise

    def delete(self, bucket: str, key: str, *, if_match: str | None = None) -> None:
        """Delete; with `if_match`, only that version (else PreconditionFailed). SeaweedFS and
        AWS honour the condition; MinIO ignores it and deletes whatever is there."""
        if if_match is None:
            self.client.delete_object(Bucket=bucket, Key=key)
            return
        try:
            self.client.delete_object(Bucket=bucket, Key=key, IfMatch=_quoted(if_match))
        except ClientError as error:
            if _is_not_found(error):
                return
            if _is_precondition_failed(error):
                raise PreconditionFailed(f"s3://{bucket}/{key} is no longer {if_match}") from error
            raise

    def delete_keys(self, bucket: str, keys: list[str]) -> None:
        """Delete every key (a missing one is no error), a thousand per request."""
        for start in range(0, len(keys), 1000):
            chunk = [{"Key": key} for key in keys[start : start + 1000]]
            reply = self.client.delete_objects(
                Bucket=bucket, Delete={"Objects": chunk, "Quiet": True}
            )
            if reply.get("Errors"):
                first = reply["Errors"][0]
                raise RuntimeError(
                    f"s3://{bucket}: {len(reply['Errors'])} key(s) not deleted, first"
                    f" {first.get('Key')!r}: {first.get('Code')} {first.get('Message')}"
                )

    def ensure_buckets(self, names: list[str]) -> None:
        existing = {b["Name"] for b in self.client.list_buckets().get("Buckets", [])}
        for name in names:
            if name not in existing:
                self.client.create_bucket(Bucket=name)


def json_bytes(document: Any) -> bytes:
    """Canonical JSON (sorted keys, fixed separators): equal documents give equal bytes."""
    return (json.dumps(document, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()
