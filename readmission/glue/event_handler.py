"""Glue between functions-framework CloudEvent handlers and Knative's delivery rules.

Knative's broker treats any reply that is neither empty nor a CloudEvent as a failure and
redelivers it, but functions-framework answers "OK" after a cloudevent function returns.
`reply_empty_on_success()` fixes that for the app that is loading the function module, and
`object_ref()` reads the object reference every pipeline event carries, answering 400 (which
Knative does not retry; it goes to the dead-letter sink) when the event is malformed, and
`function_context()` gives a handler its settings and an S3 client.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import flask
from werkzeug.exceptions import BadRequest

from readmission import env
from readmission.config import Settings
from readmission.storage import ObjectStore

log = logging.getLogger(__name__)


class MalformedEvent(BadRequest):
    """An event no retry can fix: answered 400, so Knative routes it to the dead-letter sink."""


@functools.cache
def _store_for(settings: Settings) -> ObjectStore:
    return ObjectStore.from_settings(settings)


def function_context() -> tuple[Settings, ObjectStore]:
    """The settings in the environment now, and an S3 client for them: built once per
    distinct settings (building a boto3 client costs much CPU), not once per event."""
    settings = Settings.from_env()
    return settings, _store_for(settings)


def max_event_bytes() -> int:
    """EVENT_MAX_BYTES (default 1 MiB): the largest CloudEvent body a function reads."""
    return env.integer("EVENT_MAX_BYTES", 1024 * 1024)


def reply_empty_on_success() -> None:
    """Turn functions-framework's 200 "OK" into 204 with an empty body, and limit body size.

    Call it at import time of a function module: functions-framework executes the module inside
    the Flask application context, so `flask.current_app` is the app that will serve it.
    """

    app = flask.current_app
    # Pipeline events are small object references: refuse big bodies (413) before reading them.
    app.config["MAX_CONTENT_LENGTH"] = max_event_bytes()

    @app.after_request
    def _empty_reply(response: flask.Response) -> flask.Response:
        if response.status_code == 200 and response.get_data() == b"OK":
            response.set_data(b"")
            response.status_code = 204
        return response


@dataclass(frozen=True)
class ObjectRef:
    bucket: str
    key: str
    etag: str
    size: int | None


def object_ref(event: Any, expected_type: str, expected_bucket: str) -> ObjectRef:
    """The object an event is about, or MalformedEvent naming what is wrong."""
    event_type = event["type"]
    if event_type != expected_type:
        raise MalformedEvent(f"event type {event_type!r} is not {expected_type!r}")
    data = event.get_data() if hasattr(event, "get_data") else event.data
    if not isinstance(data, dict):
        raise MalformedEvent("event data must be a JSON object with bucket and key")
    bucket, key = data.get("bucket"), data.get("key")
    if not isinstance(bucket, str) or not isinstance(key, str) or not key:
        raise MalformedEvent("event data must name a bucket and a key (strings)")
    if bucket != expected_bucket:
        raise MalformedEvent(f"bucket {bucket!r} is not the configured bucket {expected_bucket!r}")
    size = data.get("size")
    return ObjectRef(
        bucket, key, str(data.get("etag") or ""), size if isinstance(size, int) else None
    )
