"""Knative Service `ingest`: a raw CSV landed (io.readmission.raw.created) → Parquet + job specs.

Thin entry point; the work is `readmission.ingest.ingest_object`. A bad CSV is moved to the
rejected bucket by the core and answered 204 (no retry); a malformed event is answered 400, and
so is an event naming a key no object store can ever serve (a `.` or `..` segment, a NUL, no
UTF-8 spelling, over 1,024 bytes: `readmission.keys.unreadable_key_problem`); an object-store
failure raises (500) so the broker retries. The event's `etag` names the object version to read:
if the key was overwritten before the event got here, that version is `superseded` (a receipt
says so, nothing is ingested, 204) and the newer version is ingested by its own event. An
accepted drop's drift report (docs/monitoring.md) is written after its receipt: a failure to
write it raises (500), and the redelivery, finding the drop known, writes what is missing.
"""

from __future__ import annotations

import logging
from typing import Any

import functions_framework

from readmission import contract, drift
from readmission.glue import slow_clients
from readmission.glue.event_handler import (
    MalformedEvent,
    function_context,
    object_ref,
    reply_empty_on_success,
)
from readmission.ingest import ingest_object
from readmission.keys import unreadable_key_problem

slow_clients.install()  # header and body read timeouts: docs/reliability.md

EVENT_TYPE = "io.readmission.raw.created"

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
log = logging.getLogger("ingest")
reply_empty_on_success()
contract.arrow_schema()  # imports pandas/pyarrow now, at process start, not in the first event
drift.warm_up()  # and scipy's test, which the drift reports use


@functions_framework.cloud_event
def ingest(event: Any) -> None:
    settings, store = function_context()
    ref = object_ref(event, EVENT_TYPE, settings.buckets.raw)
    problem = unreadable_key_problem(ref.key)
    if problem is not None:
        raise MalformedEvent(f"s3://{ref.bucket}: {problem}: it can never be read")
    outcome = ingest_object(store, settings, ref.bucket, ref.key, etag=ref.etag or None)
    log.info("event %s: %s", event["id"], outcome.summary())
