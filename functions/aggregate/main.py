"""Knative Service ``aggregate``: fan-in of training results (io.readmission.result.created).

Thin entry point: the event names a result object; its key gives the dataset id, and
`readmission.aggregate.aggregate_dataset` does the rest (nothing until every job of the
dataset has a result; then select, test, export, check parity, register, publish).
A key that is not a result key, that no object store can serve, or that its manifest does not
list, a result that is not its key's job's, and a selected (or champion) model whose files in
MLflow's artifact store are not the ones its training run logged (all
`readmission.aggregate.InvalidResult`) answer 400 (MalformedEvent, dead-lettered, never
retried: a person must look); anything transient (S3 or MLflow
down, lease held too long, a failed parity check) raises: 500, retried.
"""

from __future__ import annotations

import logging
import os

import functions_framework
from cloudevents.http import CloudEvent

from readmission.aggregate import (
    AggregateOutcome,
    InvalidResult,
    aggregate_dataset,
    start_onnxruntime_warm_up,
    warm_up,
)
from readmission.glue import slow_clients
from readmission.glue.event_handler import (
    MalformedEvent,
    function_context,
    object_ref,
    reply_empty_on_success,
)
from readmission.keys import parse_job_key, unreadable_key_problem

slow_clients.install()  # header and body read timeouts: docs/reliability.md

reply_empty_on_success()
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
log = logging.getLogger("aggregate")

RESULT_CREATED = "io.readmission.result.created"
warm_up()  # in gunicorn's master, shared by its worker(s)
# onnxruntime only after the fork: a worker that inherits its thread aborts when it exits
os.register_at_fork(after_in_child=start_onnxruntime_warm_up)


@functions_framework.cloud_event
def aggregate(event: CloudEvent) -> None:
    settings, store = function_context()
    ref = object_ref(event, RESULT_CREATED, settings.buckets.results)
    try:
        dataset_id, _, _ = parse_job_key(ref.key)
    except ValueError as error:
        raise MalformedEvent(str(error)) from error
    problem = unreadable_key_problem(ref.key)
    if problem is not None:
        raise MalformedEvent(f"s3://{ref.bucket}: {problem}: it can never be read")
    try:
        outcome: AggregateOutcome = aggregate_dataset(
            store, settings, dataset_id, result_key=ref.key
        )
    except InvalidResult as error:
        raise MalformedEvent(str(error)) from error
    log.info("event %s (%s): %s", event["id"], ref.key, outcome)
