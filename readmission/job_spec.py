"""A training job spec as the train step trusts it: parsed, checked against its manifest, and
the content address of its fit.

Reads the job spec document (the caller's) and the manifest of the corpus version it names
(`read_manifest`, through this process's ManifestCache: one HEAD per job, a GET only for a
manifest not seen before or rewritten under its key); writes nothing.

Contract:

* `JobSpec.parse` accepts only a document of the layout readmission.ingest writes
  (readmission.jobs.job_spec); `check_against_manifest` accepts only a spec that is,
  word for word, one of the jobs its manifest lists (version, key, datasets bucket, cumulative
  index, batch, validation and test keys, training rows, algorithm). Anything else is an
  InvalidJobSpec: no retry can fix it (the train function answers 400, dead-lettered once),
  and it is raised before any object is read or run made.
* `JobSpec.fit_id` is a pure function of the set's batch keys (immutable, content-addressed
  objects), the algorithm, the classifier's parameters, the code version and the digest of the
  modules that define a fit (`pipeline_source_digest`): the same rows, algorithm, parameters and
  code give the same id in every process, and MLflow runs are found and reused by it
  (readmission.tracking.FIT_ID_TAG).
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from readmission import contract as contract_module
from readmission import features as features_module
from readmission import keys, tracking
from readmission.config import Settings
from readmission.features import ALGORITHMS, build_pipeline, classifier_params
from readmission.storage import ObjectStore


@functools.cache
def pipeline_source_digest() -> str:
    """sha256 of the source of the modules that define what a fit is (the data contract and
    the pipeline), part of every fit id."""
    digest = hashlib.sha256()
    for module in (contract_module, features_module):
        digest.update(Path(str(module.__file__)).read_bytes())
    return digest.hexdigest()[:16]


class InvalidJobSpec(ValueError):
    """The job spec is not a job this step can run (no retry can fix it)."""


@dataclass(frozen=True)
class JobSpec:
    dataset_id: str
    cumulative_index: int
    algorithm: str
    training_rows: int
    batch_keys: tuple[str, ...]
    validation_keys: tuple[str, ...]
    datasets_bucket: str

    @functools.cached_property
    def fit_id(self) -> str:
        """Content address of this job's fit: same rows, algorithm, parameters and code ->
        same id (batch keys name immutable objects whose bytes never change). The code is the
        code version and the digest of the modules that define the pipeline, so a change to
        the preprocessing is a new fit even where the code version is not known."""
        params = classifier_params(build_pipeline(self.algorithm))
        text = json.dumps(
            {
                "algorithm": self.algorithm,
                "batch_keys": list(self.batch_keys),
                "params": {name: repr(value) for name, value in sorted(params.items())},
                "code_version": tracking.code_version(),
                "pipeline_source": pipeline_source_digest(),
            },
            sort_keys=True,
        )
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    @property
    def key(self) -> str:
        return keys.job_key(self.dataset_id, self.cumulative_index, self.algorithm)

    @property
    def result_key(self) -> str:
        return keys.result_key(self.dataset_id, self.cumulative_index, self.algorithm)

    @property
    def run_name(self) -> str:
        return tracking.run_name(self.dataset_id, self.cumulative_index, self.algorithm)

    @classmethod
    def parse(cls, document: Any, default_bucket: str) -> JobSpec:
        """Validate a job spec document (docs/design.md); InvalidJobSpec says what is wrong."""
        if not isinstance(document, Mapping):
            raise InvalidJobSpec("the job spec must be a JSON object")
        problems = []

        def text(name: str, required: bool = True) -> str:
            value = document.get(name)
            if isinstance(value, str) and value:
                return value
            if required or value is not None:
                problems.append(f"{name} must be a non-empty string")
            return ""

        def integer(name: str) -> int:
            value = document.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return value
            problems.append(f"{name} must be a non-negative integer")
            return 0

        dataset_id = text("dataset_id")
        cumulative_index = integer("cumulative_index")
        algorithm = text("algorithm")
        if algorithm and algorithm not in ALGORITHMS:
            problems.append(f"algorithm {algorithm!r} is not one of {', '.join(ALGORITHMS)}")
        training_rows = integer("training_rows")
        batch_keys = document.get("batch_keys")
        if (
            not isinstance(batch_keys, list)
            or not batch_keys
            or not all(isinstance(k, str) and k for k in batch_keys)
        ):
            problems.append("batch_keys must be a non-empty list of object keys")
            batch_keys = []
        validation_keys = document.get("validation_keys")
        if validation_keys is None and isinstance(document.get("validation_key"), str):
            validation_keys = [document["validation_key"]]  # a spec of the older layout
        if (
            not isinstance(validation_keys, list)
            or not validation_keys
            or not all(isinstance(k, str) and k for k in validation_keys)
        ):
            problems.append("validation_keys must be a non-empty list of object keys")
            validation_keys = []
        bucket = text("datasets_bucket", required=False) or default_bucket
        if problems:
            raise InvalidJobSpec("invalid job spec: " + "; ".join(problems))
        return cls(
            dataset_id,
            cumulative_index,
            algorithm,
            training_rows,
            tuple(batch_keys),
            tuple(validation_keys),
            bucket,
        )


class ManifestCache:
    """The manifests this process read last, by bucket, key and ETag: a job's check costs one
    HEAD, and a GET only for a manifest not seen before (or rewritten under its key)."""

    MAX_ENTRIES = 8

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], tuple[str, Any]] = {}

    def get(self, store: ObjectStore, bucket: str, key: str) -> Any | None:
        """The manifest's document (shared: not to be changed; its bytes if it is not JSON),
        None if there is none."""
        info = store.head(bucket, key)
        if info is None:
            return None
        with self._lock:
            cached = self._entries.get((bucket, key))
        if cached is not None and cached[0] == info.etag:
            return cached[1]
        data, etag = store.get_with_etag(bucket, key)  # raises if deleted since: a retry
        try:
            document: Any = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            document = data  # not JSON: the caller refuses it as no manifest
        with self._lock:
            if len(self._entries) >= self.MAX_ENTRIES:
                self._entries.clear()
            self._entries[(bucket, key)] = (etag, document)
        return document


MANIFESTS = ManifestCache()


def read_job_spec(
    store: ObjectStore, settings: Settings, bucket: str, key: str
) -> tuple[JobSpec, dict[str, Any]]:
    """The job spec at a job key (parsed, and as read), or InvalidJobSpec saying why no retry
    can run it: no such key, no such object, not JSON, not a job spec, or another job's."""
    try:
        keys.parse_job_key(key)
    except ValueError as error:
        raise InvalidJobSpec(str(error)) from error
    data = store.get_bytes_if_exists(bucket, key)
    if data is None:
        raise InvalidJobSpec(f"job spec s3://{bucket}/{key} does not exist")
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidJobSpec(f"job spec s3://{bucket}/{key} is not JSON: {error}") from error
    try:
        job = JobSpec.parse(document, settings.buckets.datasets)
    except InvalidJobSpec as error:
        raise InvalidJobSpec(f"s3://{bucket}/{key}: {error}") from error
    if job.key != key:
        raise InvalidJobSpec(f"job spec s3://{bucket}/{key} describes job {job.key}")
    return job, document


def read_manifest(
    store: ObjectStore, settings: Settings, dataset_id: str, cache: ManifestCache = MANIFESTS
) -> Mapping[str, Any]:
    """The manifest of the corpus version a job names, or InvalidJobSpec: ingest writes a
    version's manifest before its job specs, so a spec without one names no version at all."""
    bucket, key = settings.buckets.datasets, keys.manifest_key(dataset_id)
    manifest = cache.get(store, bucket, key)
    if manifest is None:
        raise InvalidJobSpec(
            f"no corpus version {dataset_id}: the spec names a version that does not exist "
            f"(no s3://{bucket}/{key})"
        )
    if not isinstance(manifest, Mapping):
        raise InvalidJobSpec(f"s3://{bucket}/{key} is not a manifest (not a JSON object)")
    return manifest


def check_against_manifest(
    job: JobSpec,
    document: Mapping[str, Any],
    manifest: Mapping[str, Any],
    settings: Settings,
    key: str | None = None,
) -> None:
    """InvalidJobSpec naming every field in which the spec (`document`, parsed as `job`, read
    from `key` when the caller knows it) is not the job its manifest lists, as
    readmission.jobs.job_spec writes it."""
    datasets = settings.buckets.datasets
    where = f"s3://{datasets}/{keys.manifest_key(job.dataset_id)}"
    problems = []
    if key is not None and key != job.key:
        problems.append(f"the spec stored as {key} describes job {job.key}")
    if job.datasets_bucket != datasets:
        problems.append(
            f"datasets_bucket {job.datasets_bucket!r} is not the datasets bucket {datasets!r}"
        )
    named = document.get("manifest_key")
    if named is not None and named != keys.manifest_key(job.dataset_id):
        problems.append(f"manifest_key {named!r} is not {keys.manifest_key(job.dataset_id)!r}")
    try:
        if manifest.get("dataset_id") != job.dataset_id:
            problems.append(f"the manifest is version {manifest.get('dataset_id')!r}'s")
        sets = manifest["cumulative_sets"]
        if job.cumulative_index >= len(sets):
            problems.append(
                f"cumulative_index {job.cumulative_index} is out of range: version "
                f"{job.dataset_id} has {len(sets)} cumulative sets"
            )
        else:
            cumulative = sets[job.cumulative_index]
            if list(job.batch_keys) != list(cumulative["batch_keys"]):
                problems.append(
                    f"batch_keys ({len(job.batch_keys)} keys) are not the "
                    f"{len(cumulative['batch_keys'])} batches of cumulative set "
                    f"{job.cumulative_index}"
                )
            if job.training_rows != cumulative["rows"]:
                problems.append(
                    f"training_rows {job.training_rows} is not the {cumulative['rows']} rows "
                    f"of cumulative set {job.cumulative_index}"
                )
        if list(job.validation_keys) != list(manifest["validation"]["keys"]):
            problems.append("validation_keys are not the version's validation parts")
        test_keys = document.get("test_keys")
        if test_keys is not None and test_keys != list(manifest["test"]["keys"]):
            problems.append("test_keys are not the version's test parts")
        if job.algorithm not in manifest["algorithms"]:
            problems.append(f"algorithm {job.algorithm!r} is not one of the version's")
        if job.key not in manifest["jobs"]:
            problems.append(f"{job.key} is not one of the version's jobs")
    except (KeyError, TypeError, IndexError) as error:
        raise InvalidJobSpec(f"{where} is not a manifest: {error!r}") from error
    if problems:
        raise InvalidJobSpec(
            f"job spec {key or job.key} is not a job of its manifest {where}: "
            + "; ".join(problems)
        )
