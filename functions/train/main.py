"""Knative Service `train`: a job spec landed (io.readmission.job.created) → MLflow run + result.

Thin entry point; the work is `readmission.training.train_job`. One fit per process at a time
(containerConcurrency 1) on one BLAS/OpenMP thread: the parallelism is the number of processes.
A job spec that is missing, not JSON, invalid, or not a job of the manifest it names (no such
corpus version, other batches, bucket, index, rows or algorithm: `job_spec.check_against_manifest`)
is a MalformedEvent (400: not retried, sent to the dead-letter sink once, and the reconciler does
not re-emit a job whose dead letter records a 400), and so is a reused fit whose model files are
not the ones its run logged (`readmission.model_files.ModelFilesMismatch`: a retry downloads the
same files); object-store or MLflow failures raise (500) so the broker retries.

A fit estimated longer than the request allows (`readmission.fit_handoff`: TRAIN_JOBSINK_URL,
TRAIN_REQUEST_SECONDS) is checked the same way, then handed to the JobSink, which runs it as a
Kubernetes Job (functions/train/job.py); the request answers once the JobSink accepted it
(202), and a JobSink that refuses raises (500: retried). Redeliveries land on the same Job.
"""

from __future__ import annotations

import os

# Before numpy/scikit-learn are imported: one thread per fit (see readmission.training).
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import logging  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import functions_framework  # noqa: E402

from readmission import fit_handoff, jobs, tracking  # noqa: E402
from readmission.glue import slow_clients  # noqa: E402
from readmission.glue.event_handler import (  # noqa: E402
    MalformedEvent,
    function_context,
    object_ref,
    reply_empty_on_success,
)
from readmission.job_spec import InvalidJobSpec, read_job_spec  # noqa: E402
from readmission.keys import unreadable_key_problem  # noqa: E402
from readmission.model_files import ModelFilesMismatch  # noqa: E402
from readmission.training import checked_job, train_job  # noqa: E402

slow_clients.install()  # header and body read timeouts: docs/reliability.md

EVENT_TYPE = "io.readmission.job.created"

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
log = logging.getLogger("train")
reply_empty_on_success()
tracking.warm_up()


@functions_framework.cloud_event
def train(event: Any) -> None:
    started = time.perf_counter()
    settings, store = function_context()
    ref = object_ref(event, EVENT_TYPE, settings.buckets.jobs)
    problem = unreadable_key_problem(ref.key)
    if problem is not None:  # a GET of it would fail the same way forever
        raise MalformedEvent(f"s3://{ref.bucket}: {problem}: it can never be read")
    try:
        job, document = read_job_spec(store, settings, ref.bucket, ref.key)
    except InvalidJobSpec as error:
        raise MalformedEvent(str(error)) from error
    handoff = fit_handoff.HandoffSettings.from_env()
    if fit_handoff.runs_as_job(job, handoff):
        try:
            checked_job(store, settings, document, key=ref.key)
        except InvalidJobSpec as error:
            raise MalformedEvent(f"s3://{ref.bucket}/{ref.key}: {error}") from error
        if store.exists(settings.buckets.results, job.result_key):
            log.info("event %s: job %s has its result, nothing to do", event["id"], job.key)
            return
        forwarded = fit_handoff.hand_off(
            store, handoff, ref.bucket, ref.key, event.get_attributes(), event.get_data()
        )
        log.info(
            "event %s: job %s (~%.0fs of fit) handed to the JobSink as event %s",
            event["id"],
            job.key,
            jobs.estimated_fit_seconds(job.training_rows, job.algorithm),
            forwarded,
        )
        return
    try:
        result = train_job(store, settings, document, key=ref.key)
    except (InvalidJobSpec, ModelFilesMismatch) as error:
        raise MalformedEvent(f"s3://{ref.bucket}/{ref.key}: {error}") from error
    log.info(
        "event %s: job %s done in %.2fs: run %s, validation f1_weighted %s",
        event["id"],
        job.key,
        time.perf_counter() - started,
        result.get("run_id"),
        result.get("metrics", {}).get("validation", {}).get("f1_weighted"),
    )
