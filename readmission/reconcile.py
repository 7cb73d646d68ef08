"""The reconciler: re-emits pipeline events that a bucket notification never delivered.

SeaweedFS's filer webhook queue lives in memory and MinIO drops events when its webhook target
is down and no ``queue_dir`` is set, so an object can land without its CloudEvent ever reaching
the broker. The reconciler compares what is in the buckets with what was processed and emits,
for every object older than a grace period (``RECONCILE_GRACE_SECONDS``, default 120):

* a raw ``.csv`` with no ingest receipt           -> ``io.readmission.raw.created``
* a job spec with no result of the same name       -> ``io.readmission.job.created``
* a dataset whose every job has a result but no ``models/<id>/metadata.json``
                                                   -> ``io.readmission.result.created``
                                                      (for its newest result)

Each event is built by ``events.notifications.to_event``, so it has the id, type, attributes
and data a notification of the same object version would have had: a handler that already saw
it recognises the redelivery. An event whose dead letter records a 400 (the subscriber's
"never retry") is not re-emitted: a person has to look at it, and deleting the dead letter lets
the reconciler try again. A dead letter left by transient failures (5xx, timeout, no replica)
is re-emitted: the reconciler's period is the slow retry after the broker's fast ones.

Ingest receipt: ``keys.receipt_key(bucket, key, etag)`` in the datasets bucket, written by
``readmission.corpus_append.write_receipt`` at the end of every ingest outcome. A raw object
without a receipt (ingested by an older version, or its receipt lost) also counts as processed
when a manifest's ``source`` names its bucket, key and size and every job spec of that manifest
exists.

Plain Python over ``ObjectStore`` (no pandas, pyarrow, scikit-learn or mlflow). Entry points:
``reconcile(store, settings, emit)``; ``run_once(...)`` emits to a sink URL; and
``python -m readmission.reconcile [--sink URL] [--grace S] [--every S] [--dry-run]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cloudevents.http import CloudEvent

from events.delivery import post_binary
from events.notifications import (
    JOB_CREATED,
    RAW_CREATED,
    RESULT_CREATED,
    ObjectVersion,
    event_type_for,
    to_event,
)
from readmission import env, keys
from readmission.config import Settings
from readmission.storage import ObjectInfo, ObjectStore

log = logging.getLogger("reconcile")

GRACE_ENV = "RECONCILE_GRACE_SECONDS"
DEFAULT_GRACE_SECONDS = 120.0
ORIGIN_ENV = "RECONCILE_ORIGIN"  # "minio" | "seaweedfs"; default: from the S3 Server header

Emit = Callable[[CloudEvent], None]


# --------------------------------------------------------------------------- inventory


@dataclass(frozen=True)
class StoredObject:
    info: ObjectInfo
    last_modified: datetime

    @property
    def key(self) -> str:
        return self.info.key


def list_objects(store: ObjectStore, bucket: str, prefix: str = "") -> Iterator[StoredObject]:
    """Objects with their LastModified (``ObjectStore.list`` does not return it)."""
    paginator = store.client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            info = ObjectInfo(bucket, item["Key"], int(item["Size"]), item["ETag"].strip('"'))
            modified = item["LastModified"]
            if modified.tzinfo is None:
                modified = modified.replace(tzinfo=UTC)
            yield StoredObject(info, modified)


def detect_origin(store: ObjectStore, bucket: str) -> str:
    """``seaweedfs`` or ``minio`` (the notifier whose events we stand in for)."""
    configured = os.environ.get(ORIGIN_ENV, "").strip().lower()
    if configured in {"minio", "seaweedfs"}:
        return configured
    response = store.client.list_objects_v2(Bucket=bucket, MaxKeys=1)
    server = str(response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("server", ""))
    return "seaweedfs" if "seaweed" in server.lower() else "minio"


@dataclass
class Inventory:
    """One listing of every bucket the rules look at."""

    raw: list[StoredObject]
    datasets: dict[str, StoredObject]
    jobs: dict[str, StoredObject]
    results: dict[str, StoredObject]
    models: set[str]
    dead_letters: set[str]

    @classmethod
    def take(cls, store: ObjectStore, settings: Settings) -> Inventory:
        buckets = settings.buckets

        def by_key(bucket: str) -> dict[str, StoredObject]:
            return {obj.key: obj for obj in list_objects(store, bucket)}

        return cls(
            raw=list(list_objects(store, buckets.raw)),
            datasets=by_key(buckets.datasets),
            jobs=by_key(buckets.jobs),
            results=by_key(buckets.results),
            models=set(store.list_keys(buckets.models)),
            dead_letters=set(store.list_keys(buckets.dead_letter)),
        )

    def manifest_keys(self) -> list[str]:
        return sorted(
            key for key in self.datasets if key.count("/") == 1 and key.endswith("/manifest.json")
        )


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Emitted:
    type: str
    bucket: str
    key: str
    id: str


@dataclass
class ReconcileReport:
    emitted: list[Emitted] = field(default_factory=list)
    too_young: int = 0  # candidates inside the grace period (maybe in flight)
    dead_lettered: list[str] = field(default_factory=list)  # "<type>/<id>" refused with 400
    retried_dead_letters: int = 0  # dead-lettered after transient failures: emitted again
    processed: int = 0  # objects whose follow-up exists
    failed: list[str] = field(default_factory=list)  # emits that raised (retried next run)
    seconds: float = 0.0

    def count(self, event_type: str) -> int:
        return sum(1 for event in self.emitted if event.type == event_type)

    @property
    def sink_down(self) -> bool:
        """Every emit of this run failed: the run as a whole is worth retrying.

        When some events went out and others failed, a retried run would re-emit the ones
        that went out; the failed ones wait for the next run instead (one bad event never
        fails a whole run)."""
        return bool(self.failed) and not self.emitted

    def summary(self) -> str:
        kinds = ", ".join(
            f"{kind.rsplit('.', 2)[-2]}={self.count(kind)}"
            for kind in (RAW_CREATED, JOB_CREATED, RESULT_CREATED)
        )
        return (
            f"reconcile: emitted {len(self.emitted)} ({kinds}), processed {self.processed}, "
            f"too young {self.too_young}, dead-lettered (400) {len(self.dead_lettered)}, "
            f"dead letters retried {self.retried_dead_letters}, "
            f"failed {len(self.failed)}, {self.seconds:.2f}s"
        )


# --------------------------------------------------------------------------- rules


def grace_from_env() -> float:
    return env.number(GRACE_ENV, DEFAULT_GRACE_SECONDS, minimum=0)


@dataclass
class _Run:
    store: ObjectStore
    settings: Settings
    emit: Emit
    inventory: Inventory
    now: datetime
    grace: float
    origin: str
    report: ReconcileReport
    manifests: dict[str, dict[str, Any] | None] = field(default_factory=dict)

    def old_enough(self, obj: StoredObject) -> bool:
        return (self.now - obj.last_modified).total_seconds() >= self.grace

    def send(self, obj: StoredObject) -> None:
        info = obj.info
        version = ObjectVersion(
            bucket=info.bucket,
            key=info.key,
            size=info.size,
            etag=info.etag,
            sequencer="",
            origin=self.origin,
            time=obj.last_modified.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        event = to_event(version, self.settings.buckets)
        if event is None:  # not an object of the event table: nothing to emit
            return
        letter = keys.dead_letter_key(event.type, event.id)
        if letter in self.inventory.dead_letters:
            if self.refused_for_good(letter):
                self.report.dead_lettered.append(letter.removesuffix(".json"))
                return
            self.report.retried_dead_letters += 1
        try:
            self.emit(CloudEvent(dict(event.attributes), dict(event.data)))
        except Exception as exc:  # one refused event must not stop the others
            log.warning("emit %s %s/%s failed: %s", event.type, info.bucket, info.key, exc)
            self.report.failed.append(f"{event.type} {info.bucket}/{info.key}: {exc}")
            return
        self.report.emitted.append(Emitted(event.type, info.bucket, info.key, event.id))

    def refused_for_good(self, letter: str) -> bool:
        """The dead letter says the subscriber answered 400: Knative's "never retry"."""
        document = self.store.get_json_if_exists(self.settings.buckets.dead_letter, letter)
        error = (document or {}).get("error") if isinstance(document, dict) else None
        return str((error or {}).get("code")) == "400"

    def manifest(self, key: str) -> dict[str, Any] | None:
        """A manifest, read at most once per run."""
        if key not in self.manifests:
            document = self.store.get_json_if_exists(self.settings.buckets.datasets, key)
            self.manifests[key] = document if isinstance(document, dict) else None
        return self.manifests[key]


def _ingested_by_manifest(run: _Run) -> set[tuple[str, str, int]]:
    """(bucket, key, size) of every source a complete manifest (all jobs written) names."""
    found = set()
    for key in run.inventory.manifest_keys():
        manifest = run.manifest(key)
        source = (manifest or {}).get("source") or {}
        jobs = (manifest or {}).get("jobs") or []
        if all(job in run.inventory.jobs for job in jobs):
            found.add((str(source.get("bucket")), str(source.get("key")), source.get("size")))
    return found


def _raw_rule(run: _Run) -> None:
    buckets = run.settings.buckets
    by_manifest: set[tuple[str, str, int]] | None = None
    for obj in run.inventory.raw:
        if event_type_for(obj.info.bucket, obj.key, buckets) != RAW_CREATED:
            continue
        if keys.receipt_key(obj.info.bucket, obj.key, obj.info.etag) in run.inventory.datasets:
            run.report.processed += 1
            continue
        if by_manifest is None:  # read manifests only when a raw object has no receipt
            by_manifest = _ingested_by_manifest(run)
        if (obj.info.bucket, obj.key, obj.info.size) in by_manifest:
            run.report.processed += 1
        elif not run.old_enough(obj):
            run.report.too_young += 1
        else:
            run.send(obj)


def _job_rule(run: _Run) -> None:
    buckets = run.settings.buckets
    inventory = run.inventory
    # The newest job or result of each dataset: while it is inside the grace period, the
    # dataset's fan-out is still moving and a queued job is not lost, only waiting.
    newest: dict[str, datetime] = {}
    for obj in [*inventory.jobs.values(), *inventory.results.values()]:
        dataset_id = obj.key.partition("/")[0]
        newest[dataset_id] = max(newest.get(dataset_id, obj.last_modified), obj.last_modified)
    for key, obj in sorted(inventory.jobs.items()):
        if event_type_for(buckets.jobs, key, buckets) != JOB_CREATED:
            continue
        if key in inventory.results:
            run.report.processed += 1
            continue
        dataset_id = key.partition("/")[0]
        moving = (run.now - newest[dataset_id]).total_seconds() < run.grace
        if moving or not run.old_enough(obj):
            run.report.too_young += 1
        else:
            run.send(obj)


def _aggregate_rule(run: _Run) -> None:
    inventory = run.inventory
    for key in inventory.manifest_keys():
        dataset_id = key.partition("/")[0]
        if keys.model_metadata_key(dataset_id) in inventory.models:
            run.report.processed += 1
            continue
        manifest = run.manifest(key)
        jobs = (manifest or {}).get("jobs") or []
        results = [inventory.results.get(job) for job in jobs]
        if not jobs or any(result is None for result in results):
            continue  # training still owes results: the job rule covers it
        newest = max(
            (result for result in results if result is not None),
            key=lambda result: (result.last_modified, result.key),
        )
        if not run.old_enough(newest):
            run.report.too_young += 1
        else:
            run.send(newest)


def reconcile(
    store: ObjectStore,
    settings: Settings,
    emit: Emit,
    *,
    grace_seconds: float | None = None,
    now: datetime | None = None,
    origin: str | None = None,
) -> ReconcileReport:
    """Emit the CloudEvent of every object whose follow-up is missing (see the module doc)."""
    started = time.monotonic()
    report = ReconcileReport()
    run = _Run(
        store=store,
        settings=settings,
        emit=emit,
        inventory=Inventory.take(store, settings),
        now=now or datetime.now(UTC),
        grace=grace_from_env() if grace_seconds is None else grace_seconds,
        origin=origin or detect_origin(store, settings.buckets.raw),
        report=report,
    )
    _raw_rule(run)
    _job_rule(run)
    _aggregate_rule(run)
    report.seconds = time.monotonic() - started
    return report


# --------------------------------------------------------------------------- emitting


class SinkRefused(RuntimeError):
    """The broker did not accept a re-emitted event."""


def sink_emitter(sink: str, timeout: float = 10.0) -> Emit:
    """Emit = POST in binary mode to ``sink`` (the broker), raising if it is refused."""

    def emit(event: CloudEvent) -> None:
        attempt = post_binary(sink, event, timeout)
        if attempt.error:
            raise SinkRefused(f"{sink} refused event {event['id']}: {attempt.error}")

    return emit


def run_once(
    store: ObjectStore,
    settings: Settings,
    sink: str,
    grace_seconds: float | None = None,
) -> ReconcileReport:
    """One reconciliation that emits to ``sink`` (the local supervisor calls this)."""
    report = reconcile(store, settings, sink_emitter(sink), grace_seconds=grace_seconds)
    for event in report.emitted:
        log.info("re-emitted %s s3://%s/%s id=%s", event.type, event.bucket, event.key, event.id)
    log.info("%s", report.summary())
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m readmission.reconcile")
    parser.add_argument("--sink", default=os.environ.get("K_SINK") or os.environ.get("BROKER_URL"))
    parser.add_argument("--grace", type=float, default=None, help=f"default: ${GRACE_ENV} or 120")
    parser.add_argument("--every", type=float, default=0.0, help="repeat every N seconds")
    parser.add_argument("--dry-run", action="store_true", help="list, emit nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if not args.sink and not args.dry_run:
        parser.error("no sink: pass --sink URL or set K_SINK / BROKER_URL")
    settings = Settings.from_env()
    store = ObjectStore.from_settings(settings)
    while True:
        if args.dry_run:
            report = reconcile(store, settings, lambda _event: None, grace_seconds=args.grace)
            for event in report.emitted:
                print(f"would emit {event.type} s3://{event.bucket}/{event.key} id={event.id}")
            print(report.summary())
        else:
            try:
                report = run_once(store, settings, args.sink, args.grace)
            except Exception as exc:  # the store may be down: report and try again next time
                if not args.every:
                    raise
                log.error("reconcile failed: %s", exc)
        if not args.every:
            return 1 if report.failed else 0
        time.sleep(args.every)


if __name__ == "__main__":
    sys.exit(main())
