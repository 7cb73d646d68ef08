"""Knative Service ``dead-letter``: the broker's dead-letter sink.

Stores each undeliverable event (its attributes, data and the decoded ``knativeerror*``
attributes) as JSON in the dead-letter bucket under ``<type>/<id>.json``. The key is
deterministic and an existing object is left alone, so a redelivery changes nothing.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import functions_framework
from cloudevents.http import CloudEvent

from readmission.glue import slow_clients
from readmission.glue.event_handler import function_context, reply_empty_on_success
from readmission.keys import dead_letter_key
from readmission.storage import json_bytes

slow_clients.install()  # header and body read timeouts: docs/reliability.md

reply_empty_on_success()

ERROR_ATTRIBUTES = ("knativeerrordest", "knativeerrorcode", "knativeerrordata")


def _decode_error_data(value: str | None) -> str | None:
    if not value:
        return None
    try:
        return base64.b64decode(value, validate=True).decode(errors="replace")
    except (binascii.Error, ValueError):
        return value


def dead_letter_document(event: CloudEvent) -> dict[str, Any]:
    attributes = dict(event.get_attributes())
    data = event.get_data()
    if isinstance(data, bytes | bytearray):
        data = {"base64": base64.b64encode(bytes(data)).decode()}
    code = attributes.get("knativeerrorcode")
    return {
        "attributes": attributes,
        "data": data,
        "error": {
            "destination": attributes.get("knativeerrordest"),
            "code": int(code) if isinstance(code, str) and code.isdigit() else code,
            "data": _decode_error_data(attributes.get("knativeerrordata")),
        },
    }


@functions_framework.cloud_event
def dead_letter(event: CloudEvent) -> None:
    settings, store = function_context()
    key = dead_letter_key(event["type"], event["id"])
    document = json_bytes(dead_letter_document(event))
    store.put_if_absent(settings.buckets.dead_letter, key, document, "application/json")
