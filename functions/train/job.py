"""Kubernetes Job `train-long` (Knative Eventing's JobSink): one fit too long for a request.

JobSink starts this container with the event it received mounted as a JSON file (structured
CloudEvent) at /etc/jobsink-event/event; the local stack's JobSink passes another path in
JOBSINK_EVENT_PATH. The event is the train Service's `io.readmission.job.created`, forwarded by
`readmission.fit_handoff`; the work is the Service's own: `readmission.training.train_job`,
idempotent, with the same result object.

Usage: ``python functions/train/job.py [EVENT_FILE]``. Exit status, read by the Job's
podFailurePolicy (infra/knative/jobsink.yaml):

* 0: the result is written (by this run or an earlier one);
* 2: the event or its job spec can never be run (not a job event, no spec, not a job of its
  manifest, reused model files that are not the logged ones): the Job fails without retries
  (FailJob), as a 400 is dead-lettered without retries;
* 1: anything else (object store, MLflow): the Job's backoffLimit starts another pod.
"""

from __future__ import annotations

import os

# Before numpy/scikit-learn are imported: one thread per fit (see readmission.training).
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from cloudevents.http import CloudEvent  # noqa: E402

from readmission.config import Settings  # noqa: E402
from readmission.glue.event_handler import MalformedEvent, object_ref  # noqa: E402
from readmission.job_spec import InvalidJobSpec, read_job_spec  # noqa: E402
from readmission.model_files import ModelFilesMismatch  # noqa: E402
from readmission.storage import ObjectStore  # noqa: E402
from readmission.training import train_job  # noqa: E402

EVENT_TYPE = "io.readmission.job.created"
DEFAULT_EVENT_PATH = "/etc/jobsink-event/event"
EXIT_DONE, EXIT_RETRY, EXIT_NEVER = 0, 1, 2

log = logging.getLogger("train-job")


def read_event(path: Path) -> CloudEvent:
    """The structured CloudEvent in the file; MalformedEvent if it is not one."""
    try:
        document = json.loads(path.read_bytes())
        data = document.pop("data", None)
        return CloudEvent({name: str(value) for name, value in document.items()}, data)
    except (OSError, ValueError, AttributeError, TypeError) as error:
        raise MalformedEvent(f"{path}: not a structured CloudEvent: {error}") from error


def run(event: CloudEvent, settings: Settings, store: ObjectStore) -> None:
    ref = object_ref(event, EVENT_TYPE, settings.buckets.jobs)
    started = time.perf_counter()
    try:
        _, document = read_job_spec(store, settings, ref.bucket, ref.key)
        result = train_job(store, settings, document, key=ref.key)
    except (InvalidJobSpec, ModelFilesMismatch) as error:
        raise MalformedEvent(f"s3://{ref.bucket}/{ref.key}: {error}") from error
    log.info(
        "event %s: job %s done in %.2fs: run %s",
        event["id"],
        ref.key,
        time.perf_counter() - started,
        result.get("run_id"),
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0] if args else os.environ.get("JOBSINK_EVENT_PATH") or DEFAULT_EVENT_PATH)
    try:
        event = read_event(path)
        settings = Settings.from_env()
        run(event, settings, ObjectStore.from_settings(settings))
    except MalformedEvent as error:
        log.error("never runnable, not retried: %s", error.description)
        return EXIT_NEVER
    except Exception:
        log.exception("failed: the Job's backoffLimit retries it")
        return EXIT_RETRY
    return EXIT_DONE


if __name__ == "__main__":
    sys.exit(main())
