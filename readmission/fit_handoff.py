"""Fits longer than a request: hand the job over to a Kubernetes Job (Knative Eventing's JobSink).

On Knative a training invocation is an HTTP request, cut at the Service's `timeoutSeconds` and
at the Trigger's delivery timeout; a fit that outlives them is retried and never finishes. The
train Service therefore runs a fit in the request only when its estimated length
(`jobs.estimated_fit_seconds`: training rows x the algorithm's measured cost) is within
`TRAIN_REQUEST_SECONDS` and its rows within `TRAIN_REQUEST_MAX_ROWS` (what the Service's memory
limit holds, docs/kubernetes.md). Any other is forwarded to the JobSink at `TRAIN_JOBSINK_URL`,
which answers 202 and starts a Job running `functions/train/job.py` on the same event, with the
same idempotent core (`readmission.training.train_job`) and the same result object. Without
`TRAIN_JOBSINK_URL` every fit runs in the request, as before.

Contract:

* JobSink starts one Job per (source, id) of the event it receives, and answers 202 for a
  second copy without starting anything. The forwarded event keeps the source and takes the id
  `<event id>-g<generation>`, so every redelivery of one job event, and every re-emission by the
  reconciler, lands on the same Job;
* the generation is recorded in the jobs bucket at `<job key>.handoff` (no `.json` suffix: it
  fires no event), created with `If-None-Match: *`. Once it is older than
  `TRAIN_JOB_DEADLINE_SECONDS` (the Job's `activeDeadlineSeconds`: its Job has certainly ended)
  and the job still has no result, the next event replaces it (`If-Match`) with the next
  generation, so a Job that failed for good is started again by the reconciler, never twice at
  once;
* a JobSink that does not accept the event raises HandoffFailed (the handler answers 500: the
  broker retries).

Settings (environment): TRAIN_JOBSINK_URL (unset: no handoff), TRAIN_REQUEST_SECONDS (300),
TRAIN_REQUEST_MAX_ROWS (500000), TRAIN_JOB_DEADLINE_SECONDS (21600).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cloudevents.http import CloudEvent

from events.delivery import post_binary
from readmission import env, lease
from readmission.job_spec import JobSpec
from readmission.jobs import estimated_fit_seconds
from readmission.storage import ObjectStore

HANDOFF_SUFFIX = ".handoff"


class HandoffFailed(RuntimeError):
    """The JobSink did not accept the job (transient: the event is retried)."""


@dataclass(frozen=True)
class HandoffSettings:
    jobsink_url: str | None = None
    request_seconds: float = 300.0  # a third of the train Service's timeoutSeconds (900)
    request_max_rows: int = 500_000  # the train Service's memory limit holds any fit this size
    job_deadline_seconds: float = 21600.0  # the JobSink Job's activeDeadlineSeconds
    post_timeout: float = 30.0

    @classmethod
    def from_env(cls) -> HandoffSettings:
        return cls(
            jobsink_url=env.text("TRAIN_JOBSINK_URL") or None,
            request_seconds=env.seconds("TRAIN_REQUEST_SECONDS", cls.request_seconds),
            request_max_rows=env.integer("TRAIN_REQUEST_MAX_ROWS", cls.request_max_rows, minimum=0),
            job_deadline_seconds=env.seconds(
                "TRAIN_JOB_DEADLINE_SECONDS", cls.job_deadline_seconds
            ),
        )


def runs_as_job(job: JobSpec, settings: HandoffSettings) -> bool:
    """Whether the job goes to a Kubernetes Job rather than running in the request."""
    return settings.jobsink_url is not None and (
        estimated_fit_seconds(job.training_rows, job.algorithm) > settings.request_seconds
        or job.training_rows > settings.request_max_rows
    )


def handoff_key(job_key: str) -> str:
    return job_key + HANDOFF_SUFFIX


def generation(
    store: ObjectStore, bucket: str, job_key: str, deadline_seconds: float, now: float | None = None
) -> int:
    """The handoff generation this event belongs to (see the module docstring)."""
    now = time.time() if now is None else now
    key = handoff_key(job_key)
    for _ in range(5):  # a turn is lost only to another writer, whose record the next one reads
        found = lease.read_json_with_etag(store, bucket, key)
        if found is None:
            first = json.dumps({"generation": 1, "handed_off_at": now}).encode()
            if lease.conditional_put(store, bucket, key, first, IfNoneMatch="*") is not None:
                return 1
            continue
        record, etag = found
        current = int(record.get("generation", 0))
        if now - float(record.get("handed_off_at", 0.0)) < deadline_seconds:
            return current
        renewed = json.dumps({"generation": current + 1, "handed_off_at": now}).encode()
        if lease.conditional_put(store, bucket, key, renewed, IfMatch=etag) is not None:
            return current + 1
    raise HandoffFailed(f"s3://{bucket}/{key}: could not settle the handoff generation")


def job_event(event: Mapping[str, Any], data: Any, handoff_generation: int) -> CloudEvent:
    """The event forwarded to the JobSink: the same attributes and data, id with generation."""
    attributes = {name: str(value) for name, value in event.items() if name != "data"}
    attributes["id"] = f"{attributes['id']}-g{handoff_generation}"
    return CloudEvent(attributes, data)


def hand_off(
    store: ObjectStore,
    settings: HandoffSettings,
    jobs_bucket: str,
    job_key: str,
    attributes: Mapping[str, Any],
    data: Any,
) -> str:
    """Forward the job's event to the JobSink; returns the forwarded event's id."""
    assert settings.jobsink_url is not None
    forwarded = job_event(
        attributes,
        data,
        generation(store, jobs_bucket, job_key, settings.job_deadline_seconds),
    )
    attempt = post_binary(settings.jobsink_url, forwarded, settings.post_timeout)
    if not 200 <= attempt.status < 300:
        raise HandoffFailed(
            f"JobSink {settings.jobsink_url} refused job {job_key}: "
            f"{attempt.error or attempt.status}"
        )
    return str(forwarded["id"])
