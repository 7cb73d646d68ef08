"""A minimal S3 client (HEAD, GET and PUT, AWS Signature V4) for the predict function.

Importing boto3 and creating an S3 client costs about 0.3 s, a third of the cold-start budget of
the scale-to-zero predict function, which only ever reads two or three objects (and PUTs its
prediction log's batches). This module signs those requests itself with the standard
library. Everything else uses `readmission.storage.ObjectStore` (boto3).

Contract: `S3Reader.head_etag` and `get` return None for a missing object (404) and raise
S3Error for any other non-success status; `get(..., if_none_match=etag)` returns
`not_modified` while the object is still at that ETag; `put` stores bytes under a key
(a plain, atomic PUT) or raises S3Error.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import http.client
import os
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from readmission.config import Settings

_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


class S3Error(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"S3 answered {status}: {message}")
        self.status = status


@dataclass(frozen=True)
class S3Object:
    data: bytes
    etag: str
    not_modified: bool = False  # a conditional GET's 304: `data` is empty, `etag` unchanged


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


class S3Reader:
    """Path-style HEAD/GET against an S3 endpoint (MinIO, SeaweedFS, AWS)."""

    def __init__(
        self,
        endpoint_url: str,
        access_key: str | None,
        secret_key: str | None,
        region: str = "us-east-1",
        session_token: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        parts = urlsplit(endpoint_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"S3 endpoint must be an http(s) URL, got {endpoint_url!r}")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        default_port = (parts.scheme, self.port) in (("http", 80), ("https", 443))
        self.host_header = self.host if default_port else f"{self.host}:{self.port}"
        self.base_path = parts.path.rstrip("/")
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self.session_token = session_token
        self.timeout = timeout

    @classmethod
    def from_env(cls, settings: Settings | None = None) -> S3Reader:
        settings = settings or Settings.from_env()
        return cls(
            settings.s3_endpoint_url,
            os.environ.get("AWS_ACCESS_KEY_ID"),
            os.environ.get("AWS_SECRET_ACCESS_KEY"),
            settings.aws_region,
            os.environ.get("AWS_SESSION_TOKEN"),
        )

    def _headers(
        self, method: str, path: str, now: dt.datetime, payload_sha256: str = _EMPTY_SHA256
    ) -> dict[str, str]:
        amz_date = now.strftime("%Y%m%dT%H%M%SZ")
        headers = {
            "host": self.host_header,
            "x-amz-content-sha256": payload_sha256,
            "x-amz-date": amz_date,
        }
        if self.session_token:
            headers["x-amz-security-token"] = self.session_token
        if not (self.access_key and self.secret_key):
            return headers  # anonymous read
        day = amz_date[:8]
        signed = ";".join(sorted(headers))
        canonical = "\n".join(
            [
                method,
                path,
                "",
                "".join(f"{name}:{headers[name]}\n" for name in sorted(headers)),
                signed,
                payload_sha256,
            ]
        )
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = "\n".join(
            ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
        )
        key = _hmac(("AWS4" + self.secret_key).encode(), day)
        for part in (self.region, "s3", "aws4_request"):
            key = _hmac(key, part)
        signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={self.access_key}/{scope}, "
            f"SignedHeaders={signed}, Signature={signature}"
        )
        return headers

    def _request(
        self,
        method: str,
        bucket: str,
        key: str,
        extra: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """`extra` headers are sent unsigned (SigV4 signs only the headers it lists)."""
        path = quote(f"{self.base_path}/{bucket}/{key}", safe="/~")
        digest = _EMPTY_SHA256 if body is None else hashlib.sha256(body).hexdigest()
        headers = self._headers(method, path, dt.datetime.now(dt.UTC), digest)
        if extra:
            headers.update(extra)
        connection_class = (
            http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        )
        connection = connection_class(self.host, self.port, timeout=self.timeout)
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            body = response.read()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, body
        finally:
            connection.close()

    def head_etag(self, bucket: str, key: str) -> str | None:
        """The object's ETag (quotes stripped), or None if it does not exist."""
        status, headers, _ = self._request("HEAD", bucket, key)
        if status == 404:
            return None
        if status != 200:
            raise S3Error(status, f"HEAD {bucket}/{key}")
        return headers.get("etag", "").strip('"')

    def get(self, bucket: str, key: str, if_none_match: str | None = None) -> S3Object | None:
        """The object's bytes and ETag, or None if it does not exist.

        With `if_none_match` (an ETag this reader returned) the GET is conditional: an object
        still at that ETag answers 304, returned as `S3Object(b"", etag, not_modified=True)`
        (also when a store ignores the header and sends the same object again).
        """
        extra = {"if-none-match": f'"{if_none_match}"'} if if_none_match else None
        status, headers, body = self._request("GET", bucket, key, extra)
        if status == 404:
            return None
        if status == 304 and if_none_match:
            return S3Object(b"", if_none_match, not_modified=True)
        if status != 200:
            raise S3Error(status, f"GET {bucket}/{key}: {body[:200]!r}")
        etag = headers.get("etag", "").strip('"')
        if if_none_match and etag == if_none_match:
            return S3Object(b"", etag, not_modified=True)
        return S3Object(body, etag)

    def put(self, bucket: str, key: str, data: bytes, content_type: str) -> None:
        """Store `data` under `key` (one atomic PUT: readers see all of it or nothing)."""
        extra = {"content-type": content_type, "content-length": str(len(data))}
        status, _, body = self._request("PUT", bucket, key, extra, data)
        if status != 200:
            raise S3Error(status, f"PUT {bucket}/{key}: {body[:200]!r}")
