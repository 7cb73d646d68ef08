"""The deterministic object-key layout: one function per kind of object (see docs/design.md).

A "dataset id" is a corpus version id (16 hex characters, readmission.corpus.version_id): the
objects a version adds and its jobs, results and model live under that prefix.
"""

from __future__ import annotations

import hashlib
import re

CHAMPION_METADATA_KEY = "champion/metadata.json"
CHALLENGER_METADATA_KEY = "challenger/metadata.json"
# The last decision, for the predict function's page (no event: not a champion/metadata.json).
LAST_DECISION_KEY = "champion/last-decision.json"
DECISIONS_PREFIX = "decisions/"
DECISION_LEASE_KEY = "decisions.lease"  # in the models bucket: one decision at a time
RECEIPTS_PREFIX = "sources/"
# In the datasets bucket: the newest corpus version, and the lease that serialises appends.
CORPUS_HEAD_KEY = "corpus/head.json"
CORPUS_LEASE_KEY = "corpus/append.lease"
DROPS_PREFIX = "drops/"
# In the models bucket: the drift report of each drop (readmission.drift_reports), and a copy
# of the last one written, which the predict function polls.
REPORTS_PREFIX = "reports/"
LATEST_DRIFT_KEY = "reports/latest-drift.json"
DRIFT_ALERT_NAME = "drift-detected.json"
# In the models bucket: the realized metrics of each outcomes file (readmission.outcomes) and a
# copy of the newest, which the predict function polls.
REALIZED_PREFIX = "monitoring/realized/"
REALIZED_LATEST_KEY = f"{REALIZED_PREFIX}latest.json"
# In the scoring bucket: the score function's own outputs (readmission.batch_scoring), never
# scored again and firing no event.
PREDICTIONS_PREFIX = "predictions/"


def content_id(data: bytes) -> str:
    """Id of a raw file by content: the same bytes under any name give the same id."""
    return hashlib.sha256(data).hexdigest()[:16]


def batch_key(dataset_id: str, index: int) -> str:
    return f"{dataset_id}/train/batch-{index:04d}.parquet"


def validation_key(dataset_id: str) -> str:
    return f"{dataset_id}/validation.parquet"


def test_key(dataset_id: str) -> str:
    return f"{dataset_id}/test.parquet"


def manifest_key(dataset_id: str) -> str:
    return f"{dataset_id}/manifest.json"


def encounters_key(version: str) -> str:
    """The corpus's encounter index as of this version (id, patient, split, label, row hash)."""
    return f"{version}/encounters.parquet"


def drop_key(drop_id: str) -> str:
    """What became of a drop (by content: the first 16 hex of its sha256), once decided."""
    return f"{DROPS_PREFIX}{drop_id}.json"


def decision_key(version: str) -> str:
    """The gate's decision on a corpus version's challenger (models bucket)."""
    return f"{DECISIONS_PREFIX}{version}.json"


def manual_decision_key(sequence: int) -> str:
    """An operator's decision (promote or rollback), numbered in the decision sequence."""
    return f"{DECISIONS_PREFIX}manual-{sequence:06d}.json"


def job_name(cumulative_index: int, algorithm: str) -> str:
    return f"{cumulative_index:02d}-{algorithm}"


def job_key(dataset_id: str, cumulative_index: int, algorithm: str) -> str:
    return f"{dataset_id}/{job_name(cumulative_index, algorithm)}.json"


def result_key(dataset_id: str, cumulative_index: int, algorithm: str) -> str:
    """A result has the same key as its job, in the results bucket."""
    return job_key(dataset_id, cumulative_index, algorithm)


def parse_job_key(key: str) -> tuple[str, int, str]:
    """Inverse of job_key/result_key: (dataset_id, cumulative_index, algorithm)."""
    dataset_id, _, name = key.partition("/")
    index_text, _, algorithm = name.removesuffix(".json").partition("-")
    if not dataset_id or not index_text.isdigit() or not algorithm or not key.endswith(".json"):
        raise ValueError(f"not a job or result key: {key!r}")
    return dataset_id, int(index_text), algorithm


def model_key(dataset_id: str) -> str:
    return f"{dataset_id}/model.onnx"


def model_metadata_key(dataset_id: str) -> str:
    return f"{dataset_id}/metadata.json"


def learning_curve_key(dataset_id: str, extension: str) -> str:
    return f"{dataset_id}/learning_curve.{extension}"


def quality_key(dataset_id: str) -> str:
    """The selected model's calibration and per-group report (readmission.quality)."""
    return f"{dataset_id}/quality.json"


def reliability_key(dataset_id: str) -> str:
    """The selected model's reliability diagram (readmission.quality.to_png)."""
    return f"{dataset_id}/reliability.png"


def model_card_key(dataset_id: str, extension: str) -> str:
    """The model card of a version's selected model: `json` or `md` (readmission.model_card)."""
    return f"{dataset_id}/model_card.{extension}"


def reference_key(dataset_id: str) -> str:
    """The training reference profile of the version's model (readmission.drift)."""
    return f"{dataset_id}/reference.json"


def drift_report_key(drop_id: str, extension: str = "json") -> str:
    """The drift report of a drop (`json`, written last, or `md`)."""
    return f"{REPORTS_PREFIX}{drop_id}/drift.{extension}"


def drift_alert_key(drop_id: str) -> str:
    """Written only when the drop drifted: fires io.readmission.drift.detected."""
    return f"{REPORTS_PREFIX}{drop_id}/{DRIFT_ALERT_NAME}"


def rejected_key(content_hash: str, original_key: str) -> str:
    return f"{content_hash}/{original_key}"


def rejected_report_key(content_hash: str, original_key: str) -> str:
    return f"{content_hash}/{original_key}.error.json"


# A CloudEvent's type and id are free text from whoever posted it; they become key segments
# only when they are plain names (no "/", no "..", not empty), else a digest stands in.
_PLAIN_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._:-]{0,199}")


def _key_segment(value: str) -> str:
    if _PLAIN_SEGMENT.fullmatch(value) and ".." not in value:
        return value
    return "unsafe-" + hashlib.sha256(value.encode()).hexdigest()[:32]


def dead_letter_key(event_type: str, event_id: str) -> str:
    """``<type>/<id>.json``; a type or id that is no plain name is replaced by a digest."""
    return f"{_key_segment(event_type)}/{_key_segment(event_id)}.json"


def receipt_key(bucket: str, key: str, etag: str) -> str:
    """Key (in the datasets bucket) of the ingest receipt of one raw object version.

    Dataset ids are 16 hex characters, so the ``sources/`` prefix cannot clash with them.
    """
    version = etag.strip('"')
    digest = hashlib.sha256(f"{bucket}/{key}/{version}".encode()).hexdigest()
    return f"{RECEIPTS_PREFIX}{digest[:32]}.json"


# S3 object keys are at most 1,024 bytes of UTF-8.
MAX_KEY_BYTES = 1024


def unreadable_key_problem(key: str) -> str | None:
    """Why no object store can ever serve an object under `key`, or None if one may.

    SeaweedFS and MinIO answer 400 InvalidRequest to a key with a `.` or `..` path segment
    (MinIO trims blanks around a segment; SeaweedFS also splits on backslashes) or a NUL, a
    key with no UTF-8 spelling cannot be sent at all, and S3 keys are at most 1,024 bytes: an
    event naming such a key is malformed (400), since no retry can ever read it.
    """
    try:
        size = len(key.encode())
    except UnicodeEncodeError:
        return f"the key {key!r} has no UTF-8 spelling"
    if "\x00" in key:
        return f"the key {key!r} contains a NUL character"
    if size > MAX_KEY_BYTES:
        return f"the key is {size:,} bytes long, more than the {MAX_KEY_BYTES:,} S3 allows"
    segments = key.replace("\\", "/").split("/")
    if any(segment.strip() in (".", "..") for segment in segments):
        return f"the key {key!r} has a '.' or '..' path segment"
    return None
