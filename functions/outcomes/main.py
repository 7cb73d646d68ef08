"""Knative Service `outcomes`: an outcomes CSV landed (io.readmission.outcomes.created) →
realized metrics per model version and period (readmission.outcomes.process_outcomes); the
daily PingSource (dev.knative.sources.ping, infra/knative/log-compaction.yaml) → the
prediction log's finished days compacted (readmission.log_compaction.compact_log).

Thin entry point. Retry rules: a malformed event, a key no object store can serve
(`keys.unreadable_key_problem`), and a CSV that breaks the outcomes rules
(no `readmitted` column, no `request_id`/`encounter_id`, an unknown label) are answered 400
naming the offending lines: no retry can fix them (dead-lettered once), and nothing is
written; an object-store failure raises (500) so the broker retries. Unknown and duplicate
ids are not errors: the realized document counts and names them (`problems`). Idempotent:
the realized-metrics key is the CSV's content id, so a redelivered event writes nothing new.
A ping's compaction is idempotent too (a repeated ping finds nothing left to do); a store
failure raises (500): the PingSource retries, and the next ping or outcomes file goes on.
"""

from __future__ import annotations

import logging
from typing import Any

import functions_framework

from readmission.glue import slow_clients
from readmission.glue.event_handler import (
    MalformedEvent,
    function_context,
    object_ref,
    reply_empty_on_success,
)
from readmission.keys import unreadable_key_problem
from readmission.log_compaction import compact_log
from readmission.outcomes import COMPACTION_BUDGET_SECONDS, OutcomesError, process_outcomes

EVENT_TYPE = "io.readmission.outcomes.created"
PING = "dev.knative.sources.ping"

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
log = logging.getLogger("outcomes")
slow_clients.install()  # header and body read timeouts: docs/reliability.md
reply_empty_on_success()


@functions_framework.cloud_event
def outcomes(event: Any) -> None:
    settings, store = function_context()
    if event["type"] == PING:
        bucket = settings.buckets.predictions_log
        report = compact_log(store, bucket, budget_seconds=COMPACTION_BUDGET_SECONDS)
        log.info("ping %s: prediction log %s: %s", event["id"], bucket, report.summary())
        return
    ref = object_ref(event, EVENT_TYPE, settings.buckets.outcomes)
    problem = unreadable_key_problem(ref.key)
    if problem is not None:  # a GET of it would fail the same way forever
        raise MalformedEvent(f"s3://{ref.bucket}: {problem}: it can never be read")
    try:
        realized = process_outcomes(store, settings, ref.bucket, ref.key)
    except OutcomesError as exc:
        raise MalformedEvent(f"s3://{ref.bucket}/{ref.key}: {exc}") from exc
    document = realized.document
    log.info(
        "event %s: %s (%s): %d matched, %d unmatched, %d groups, problems %s",
        event["id"],
        realized.key,
        "written" if realized.written else "already there",
        document["matched"],
        document["unmatched"],
        len(document["groups"]),
        document.get("problems"),
    )
