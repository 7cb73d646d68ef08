"""Knative Service ``reconcile``: re-emits lost pipeline events, fired by a PingSource.

Thin entry point; the work is `readmission.reconcile.reconcile`. The PingSource
(infra/knative/reconcile.yaml) sends ``dev.knative.sources.ping`` every few minutes; each ping
lists the buckets and POSTs the missing events in binary mode to ``K_SINK`` (the Broker).
Any other event type answers 400. The store down, or the broker refusing every event it was
sent, raises (500): the PingSource's delivery retries, and the next ping tries again anyway.
Events refused while others went out are logged and left to the next ping, so a retried run
never re-emits the ones that were delivered.

Env: ``K_SINK`` (required), ``RECONCILE_GRACE_SECONDS`` (120), the settings of
readmission.config.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import functions_framework

from readmission.glue import slow_clients
from readmission.glue.event_handler import MalformedEvent, function_context, reply_empty_on_success
from readmission.reconcile import reconcile, sink_emitter

slow_clients.install()  # header and body read timeouts: docs/reliability.md

PING = "dev.knative.sources.ping"

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
log = logging.getLogger("reconcile")
reply_empty_on_success()


@functions_framework.cloud_event
def reconcile_ping(event: Any) -> None:
    if event["type"] != PING:
        raise MalformedEvent(f"event type {event['type']!r} is not {PING!r}")
    sink = os.environ.get("K_SINK", "").strip()
    if not sink:
        raise RuntimeError("K_SINK is not set: nowhere to re-emit events")
    settings, store = function_context()
    report = reconcile(store, settings, sink_emitter(sink))
    log.info("ping %s: %s", event["id"], report.summary())
    for failure in report.failed:
        log.warning("ping %s: not re-emitted, retried at the next ping: %r", event["id"], failure)
    if report.sink_down:
        raise RuntimeError(f"{len(report.failed)} event(s) refused by {sink}: {report.failed[0]}")
