"""A lease object in S3: at most one holder at a time, built on conditional PUTs.

`PUT` with `If-None-Match: *` creates the object only if it does not exist (SeaweedFS >= 3.8x,
MinIO and AWS S3 answer 412 PreconditionFailed otherwise); a holder that died leaves a lease
that expires after `ttl_seconds` and is taken over with `If-Match: <etag>`, so two callers
cannot both take over the same expired lease. A live holder keeps its lease by renewing it
(`keep_alive`: a daemon thread re-PUTs it with `If-Match` every few seconds), so the TTL can be
short: a holder that was killed (SIGKILL, OOM, evicted pod) blocks the next caller for at most
one TTL instead of the whole length of the longest step. The lease guards long steps (the
aggregator) on top of their own idempotency; it is a second line, never the only one.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import ClientError

from readmission.storage import ObjectStore

log = logging.getLogger(__name__)

_CONFLICT = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}


class LeaseBusy(RuntimeError):
    """Another holder kept the lease for longer than we were willing to wait (transient)."""


@dataclass
class Lease:
    store: ObjectStore
    bucket: str
    key: str
    owner: str
    etag: str
    purpose: str = ""
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _keeper: threading.Thread | None = field(default=None, repr=False)

    def renew(self, ttl_seconds: float) -> bool:
        """Push the expiry `ttl_seconds` ahead; False if the lease is no longer ours."""
        etag = conditional_put(
            self.store,
            self.bucket,
            self.key,
            _body(self.owner, ttl_seconds, self.purpose),
            IfMatch=self.etag,
        )
        if etag is None:
            return False
        self.etag = etag
        return True

    def keep_alive(self, ttl_seconds: float, every: float) -> None:
        """Renew the lease every `every` seconds until `release` (a daemon thread)."""

        def run() -> None:
            while not self._stop.wait(every):
                try:
                    if not self.renew(ttl_seconds):
                        log.warning("lease s3://%s/%s was taken over", self.bucket, self.key)
                        return
                except Exception:  # transient S3 error: try again at the next tick
                    log.exception("could not renew lease s3://%s/%s", self.bucket, self.key)

        self._keeper = threading.Thread(target=run, name=f"lease-{self.key}", daemon=True)
        self._keeper.start()

    def release(self) -> None:
        """Delete the lease if we still own it (an expired lease may have been taken over)."""
        self._stop.set()
        if self._keeper is not None:
            self._keeper.join()
        current = read_json_with_etag(self.store, self.bucket, self.key)
        if current is not None and current[0].get("owner") == self.owner:
            self.store.delete(self.bucket, self.key)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _is_conflict(error: ClientError) -> bool:
    code = str(error.response.get("Error", {}).get("Code"))
    status = str(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
    return code in _CONFLICT or status in _CONFLICT


def read_json_with_etag(
    store: ObjectStore, bucket: str, key: str
) -> tuple[dict[str, Any], str] | None:
    """A JSON object ({} if it is not JSON) and its ETag, or None if there is none."""
    try:
        response = store.client.get_object(Bucket=bucket, Key=key)
    except ClientError as error:
        if str(error.response.get("Error", {}).get("Code")) in {"NoSuchKey", "404", "NotFound"}:
            return None
        raise
    try:
        document = json.loads(response["Body"].read())
    except ValueError:
        document = {}
    return document, response["ETag"]


def conditional_put(
    store: ObjectStore, bucket: str, key: str, body: bytes, **condition: str
) -> str | None:
    """Conditional PUT: the new ETag, or None when the condition failed."""
    try:
        response = store.client.put_object(
            Bucket=bucket, Key=key, Body=body, ContentType="application/json", **condition
        )
    except ClientError as error:
        if _is_conflict(error):
            return None
        raise
    return str(response["ETag"])


def _body(owner: str, ttl_seconds: float, purpose: str) -> bytes:
    return json.dumps(
        {"owner": owner, "expires_at": time.time() + ttl_seconds, "purpose": purpose}
    ).encode()


def try_acquire(
    store: ObjectStore, bucket: str, key: str, ttl_seconds: float, purpose: str = ""
) -> Lease | None:
    """Take the lease now, or None if someone else holds an unexpired one."""
    owner = uuid.uuid4().hex
    body = _body(owner, ttl_seconds, purpose)
    etag = conditional_put(store, bucket, key, body, IfNoneMatch="*")
    if etag is not None:
        return Lease(store, bucket, key, owner, etag, purpose)
    current = read_json_with_etag(store, bucket, key)
    if current is None:  # released between our PUT and GET: try once more
        etag = conditional_put(store, bucket, key, body, IfNoneMatch="*")
        return None if etag is None else Lease(store, bucket, key, owner, etag, purpose)
    document, current_etag = current
    expires_at = document.get("expires_at")
    if isinstance(expires_at, int | float) and expires_at > time.time():
        return None
    log.warning(
        "lease s3://%s/%s expired (holder %s): taking it over", bucket, key, document.get("owner")
    )
    etag = conditional_put(store, bucket, key, body, IfMatch=current_etag)
    return None if etag is None else Lease(store, bucket, key, owner, etag, purpose)


def acquire(
    store: ObjectStore,
    bucket: str,
    key: str,
    ttl_seconds: float,
    wait_seconds: float,
    purpose: str = "",
    poll_seconds: float = 0.5,
    renew_every: float | None = None,
) -> Lease:
    """Take the lease, waiting up to `wait_seconds` for a holder to finish; else LeaseBusy.
    With `renew_every`, the lease is kept alive until released (see `Lease.keep_alive`)."""
    deadline = time.monotonic() + wait_seconds
    while True:
        lease = try_acquire(store, bucket, key, ttl_seconds, purpose)
        if lease is not None:
            if renew_every:
                lease.keep_alive(ttl_seconds, renew_every)
            return lease
        if time.monotonic() >= deadline:
            raise LeaseBusy(f"s3://{bucket}/{key} is held by another invocation")
        time.sleep(poll_seconds)
