"""Knative Service ``events-adapter``: bucket notification webhook -> CloudEvents -> sink.

functions-framework HTTP function ``adapter``, served through functions/events-adapter/main.py.
It accepts a MinIO/S3 or a SeaweedFS filer notification on POST, converts it
(events/notifications.py) and POSTs every CloudEvent in binary mode to ``K_SINK`` (injected by a
Knative SinkBinding; locally: the broker's URL).

Answers: 200 ``{"events": [ids]}`` once every event was accepted by the sink; 400 with a JSON
error for a body that is no notification; 413 above ``ADAPTER_MAX_BODY_BYTES``; 502/503 when
the sink is unset or refuses, so the notifier (MinIO, the SeaweedFS filer) retries. HEAD/GET
answer 200: MinIO probes a webhook endpoint when the target is configured.

Env: ``K_SINK`` (required), ``ADAPTER_TOKEN`` (optional: then a POST must carry
``Authorization: Bearer <token>``, as MinIO's ``auth_token`` and SeaweedFS's ``bearer_token``
send it; else 401), ``ADAPTER_MAX_BODY_BYTES`` (default 1048576), ``ADAPTER_SINK_TIMEOUT``
seconds (default 10), the bucket names of readmission.config.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from typing import Any

import flask
from cloudevents.http import CloudEvent

from events.delivery import encode_header_value, post_binary
from events.notifications import UnknownNotification, notification_events
from readmission import env
from readmission.config import Buckets

log = logging.getLogger("events.adapter")
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")

DEFAULT_MAX_BODY_BYTES = 1024 * 1024
DEFAULT_SINK_TIMEOUT = 10.0


def _json(status: int, document: dict[str, Any]) -> flask.Response:
    return flask.Response(
        json.dumps(document, sort_keys=True), status=status, mimetype="application/json"
    )


def adapter(request: flask.Request) -> flask.Response:
    if request.method in {"GET", "HEAD"}:
        return _json(200, {"ok": True})
    if request.method != "POST":
        return _json(405, {"error": "POST a bucket notification"})
    token = os.environ.get("ADAPTER_TOKEN", "").strip()
    given = request.headers.get("Authorization", "")
    if token and not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        return _json(401, {"error": "missing or wrong bearer token"})
    limit = env.integer("ADAPTER_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES)
    if request.content_length is not None and request.content_length > limit:
        return _json(413, {"error": f"notification larger than {limit} bytes"})
    raw = request.stream.read(limit + 1)
    if len(raw) > limit:
        return _json(413, {"error": f"notification larger than {limit} bytes"})
    try:
        body = json.loads(raw)
        events = notification_events(body, Buckets.from_env())
    except (ValueError, UnknownNotification) as exc:
        return _json(400, {"error": str(exc)})

    sink = os.environ.get("K_SINK", "").strip()
    if events and not sink:
        log.error("K_SINK is not set: cannot forward %d event(s)", len(events))
        return _json(503, {"error": "K_SINK is not set"})
    timeout = env.seconds("ADAPTER_SINK_TIMEOUT", DEFAULT_SINK_TIMEOUT)
    for event in events:
        attempt = post_binary(sink, CloudEvent(event.attributes, event.data), timeout)
        if attempt.error:
            log.warning("sink %s refused event %s: %s", sink, event.id, attempt.error)
            return _json(502, {"error": f"sink refused event {event.id}: {attempt.error}"})
        log.info(
            "forwarded %s %s id=%s",
            event.type,
            encode_header_value(event.attributes["subject"]),  # one line whatever the key
            event.id,
        )
    return _json(200, {"events": [event.id for event in events]})
