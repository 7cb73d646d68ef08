"""Model sources for the predict function: the object store, or two local files.

Contract (readmission.serving.server.ModelSource): `token()` is a version token of the current
metadata (None when there is none yet) that changes whenever the model `fetch()` would give
changes; `fetch()` returns (ONNX bytes, metadata, token) or raises ModelLoadError saying why
(no champion yet, a missing or malformed file); `asset(key)` and `document(key, token)` read
the other files the metadata or the gate names, None when missing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from readmission.config import Settings
from readmission.keys import CHAMPION_METADATA_KEY
from readmission.serving.errors import ModelLoadError
from readmission.serving.s3 import S3Object, S3Reader
from readmission.serving.settings import ServingSettings


class StoreModelSource:
    """`models/champion/metadata.json` and the ONNX object it names (ETag = version token)."""

    def __init__(
        self, reader: S3Reader, bucket: str, metadata_key: str = CHAMPION_METADATA_KEY
    ) -> None:
        self.reader = reader
        self.bucket = bucket
        self.metadata_key = metadata_key
        self.description = f"s3://{bucket}/{metadata_key}"

    @classmethod
    def from_env(cls) -> StoreModelSource:
        settings = Settings.from_env()
        return cls(S3Reader.from_env(settings), settings.buckets.models)

    def token(self) -> str | None:
        return self.reader.head_etag(self.bucket, self.metadata_key)

    def fetch(self) -> tuple[bytes, dict[str, Any], str]:
        meta_object = self.reader.get(self.bucket, self.metadata_key)
        if meta_object is None:
            raise ModelLoadError(f"no champion model yet: {self.description} does not exist")
        metadata = _parse_metadata(meta_object.data, self.description)
        bucket = str(metadata.get("model_bucket") or self.bucket)
        key = metadata.get("model_key")
        if not isinstance(key, str) or not key:
            raise ModelLoadError(f"{self.description} names no model_key")
        model_object = self.reader.get(bucket, key)
        if model_object is None:
            raise ModelLoadError(f"the model s3://{bucket}/{key} named by the metadata is missing")
        return model_object.data, metadata, meta_object.etag

    def asset(self, key: str) -> bytes | None:
        found = self.reader.get(self.bucket, key)
        return None if found is None else found.data

    def document(self, key: str, token: str | None = None) -> S3Object | None:
        """Another object of the models bucket (the gate's challenger or last decision), or
        None if missing: a conditional GET, `not_modified` while its ETag is still `token`."""
        return self.reader.get(self.bucket, key, if_none_match=token)


class LocalModelSource:
    """MODEL_PATH + MODEL_METADATA_PATH: serve a downloaded model without any stack.

    The version token is the metadata file's mtime and size, so replacing the metadata file
    hot-swaps locally too. Assets named by the metadata (learning-curve PNG) and the gate's
    documents (`challenger.json`, `last-decision.json`) are looked up by file name next to the
    metadata file.
    """

    def __init__(self, model_path: str, metadata_path: str) -> None:
        self.model_path = Path(model_path)
        self.metadata_path = Path(metadata_path)
        self.description = f"file {self.model_path} (metadata {self.metadata_path})"

    def token(self) -> str | None:
        try:
            stat = self.metadata_path.stat()
        except FileNotFoundError:
            return None
        return f"{stat.st_mtime_ns}-{stat.st_size}"

    def fetch(self) -> tuple[bytes, dict[str, Any], str]:
        token = self.token() or ""
        try:
            metadata = _parse_metadata(self.metadata_path.read_bytes(), str(self.metadata_path))
            return self.model_path.read_bytes(), metadata, token
        except FileNotFoundError as exc:
            raise ModelLoadError(f"model file missing: {exc.filename}") from exc

    def asset(self, key: str) -> bytes | None:
        path = self.metadata_path.parent / os.path.basename(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            return None

    def document(self, key: str, token: str | None = None) -> S3Object | None:
        """A file next to the metadata file, by the file name of `key` (None if missing);
        `not_modified` while its mtime and size are still `token`."""
        path = self.metadata_path.parent / os.path.basename(key)
        try:
            stat = path.stat()
            found = f"{stat.st_mtime_ns}-{stat.st_size}"
            if found == token:
                return S3Object(b"", found, not_modified=True)
            return S3Object(path.read_bytes(), found)
        except (FileNotFoundError, IsADirectoryError):
            return None


def _parse_metadata(data: bytes, where: str) -> dict[str, Any]:
    try:
        metadata = json.loads(data)
    except ValueError as exc:
        raise ModelLoadError(f"{where} is not valid JSON: {exc}") from exc
    if not isinstance(metadata, dict):
        raise ModelLoadError(f"{where} is not a JSON object")
    return metadata


def source_from_settings(settings: ServingSettings) -> StoreModelSource | LocalModelSource:
    if settings.model_path:
        return LocalModelSource(settings.model_path, settings.metadata_path)
    return StoreModelSource.from_env()
