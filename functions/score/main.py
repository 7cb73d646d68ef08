"""Knative Service `score`: a file landed in the scoring bucket (io.readmission.scoring.created)
→ predictions of the champion model, `predictions/v<model version>/<key>.parquet|.csv` and a
`.summary.json` written last.

Thin entry point; the work is `readmission.batch_scoring.score_object` (onnxruntime and
pyarrow only: no scikit-learn, pandas or mlflow). Retry rules:
* 204: scored, already scored (a summary names this input version), the scorer's own output
  (`predictions/...`), gone or overwritten since the event (the newer version has its own
  event), or not a table at all (moved to the rejected bucket beside a report: no retry).
  Rows that break the contract are listed in the summary; they never fail the file.
* 400 (dead-lettered, never retried): a malformed event, or a key no object store can serve.
* 500 (retried by the broker): the object store down, or no champion model yet.
Idempotent: the outputs' keys depend only on the input key and the model version, and their
bytes only on the input version and the model; a crash before the summary is redone whole.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import functions_framework

from readmission.batch_scoring import ScoreOptions, is_output_key, score_object
from readmission.glue import slow_clients
from readmission.glue.event_handler import (
    MalformedEvent,
    function_context,
    object_ref,
    reply_empty_on_success,
)
from readmission.keys import unreadable_key_problem
from readmission.serving.model import LoadedModel
from readmission.serving.settings import ServingSettings
from readmission.serving.sources import StoreModelSource

EVENT_TYPE = "io.readmission.scoring.created"

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
log = logging.getLogger("score")
slow_clients.install()  # header and body read timeouts: docs/reliability.md
reply_empty_on_success()

_LOCK = threading.Lock()
_MODEL: dict[str, Any] = {}  # "token" -> the champion's metadata ETag, "model" -> LoadedModel


def champion(options: ScoreOptions) -> LoadedModel:
    """The champion model, reloaded whenever `champion/metadata.json` changes (ETag)."""
    source = StoreModelSource.from_env()
    with _LOCK:
        token = source.token()
        if token is None or token != _MODEL.get("token"):
            model_bytes, metadata, token = source.fetch()  # ModelLoadError: 500, retried
            _MODEL["model"] = LoadedModel(
                model_bytes,
                metadata,
                token=token,
                policy=ServingSettings.from_env().unknown_category_policy,
                intra_op_threads=options.intra_op_threads,
                micro_batching=False,
            )
            _MODEL["token"] = token
        return _MODEL["model"]


@functions_framework.cloud_event
def score(event: Any) -> None:
    settings, store = function_context()
    ref = object_ref(event, EVENT_TYPE, settings.buckets.scoring)
    problem = unreadable_key_problem(ref.key)
    if problem is not None:  # a GET of it would fail the same way forever
        raise MalformedEvent(f"s3://{ref.bucket}: {problem}: it can never be read")
    if is_output_key(ref.key):  # the scorer's own output: never scored
        log.info("event %s: ignored %s (an output)", event["id"], ref.key)
        return
    etag = ref.etag
    if not etag:  # an event sent by hand: the version there now
        found = store.head(ref.bucket, ref.key)
        if found is None:
            log.info("event %s: s3://%s/%s is gone", event["id"], ref.bucket, ref.key)
            return
        etag = found.etag
    options = ScoreOptions.from_env()
    outcome = score_object(store, settings, options, ref.bucket, ref.key, etag, champion(options))
    log.info("event %s: %s", event["id"], outcome.summary())
