"""The reconciler (readmission/reconcile.py) against a REAL SeaweedFS, and on the real stack.

Rule tests: objects are written to a real SeaweedFS S3 server (fresh buckets per test) and
`reconcile` runs with a fixed clock, so "older than the grace period" needs no sleeping.
Function test: functions/reconcile/main.py served by functions-framework, a real HTTP sink.
Stack test: the events adapter is replaced by one whose sink drops every event (a lost
notification, as with SeaweedFS's in-memory webhook queue), a real CSV sample is uploaded, the
real adapter comes back, and the reconciler alone gets the pipeline going.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cloudevents.http import CloudEvent, from_http
from support.http_stub import Subscriber
from support.python_snippet import run_python
from support.seaweed_server import SeaweedServer, free_port, sample_csv
from support.stack import next_version, version_of

from events.notifications import JOB_CREATED, RAW_CREATED, RESULT_CREATED
from readmission import keys
from readmission.config import Buckets, Settings
from readmission.corpus_append import write_receipt
from readmission.localstack import processes
from readmission.reconcile import (
    ReconcileReport,
    SinkRefused,
    grace_from_env,
    reconcile,
    run_once,
    sink_emitter,
)
from readmission.storage import ObjectInfo, ObjectStore

ROOT = Path(__file__).resolve().parents[1]
DATASET = "0123456789abcdef"
LATER = timedelta(hours=1)
_counter = itertools.count()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def seaweed() -> Iterator[SeaweedServer]:
    server = SeaweedServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def env(seaweed: SeaweedServer) -> tuple[ObjectStore, Settings]:
    """An ObjectStore and Settings whose eight buckets are new and empty."""
    n = next(_counter)
    names = {name: f"t{n}-{name}".replace("_", "-") for name in Buckets().__dataclass_fields__}
    settings = Settings(s3_endpoint_url=seaweed.endpoint_url, buckets=Buckets(**names))
    store = ObjectStore(seaweed.client())
    store.ensure_buckets(settings.buckets.all())
    return store, settings


class Collector:
    def __init__(self) -> None:
        self.events: list[CloudEvent] = []

    def __call__(self, event: CloudEvent) -> None:
        self.events.append(event)

    def types(self) -> list[str]:
        return [event["type"] for event in self.events]

    def subjects(self) -> list[str]:
        return [event["subject"] for event in self.events]


def run(
    store: ObjectStore, settings: Settings, later: timedelta = LATER
) -> tuple[Collector, ReconcileReport]:
    emitted = Collector()
    report = reconcile(store, settings, emitted, grace_seconds=120, now=datetime.now(UTC) + later)
    return emitted, report


def put_manifest(
    store: ObjectStore, settings: Settings, source_key: str, size: int, jobs: list[str]
) -> None:
    manifest = {
        "dataset_id": DATASET,
        "source": {"bucket": settings.buckets.raw, "key": source_key, "size": size},
        "jobs": jobs,
    }
    store.put_json(settings.buckets.datasets, keys.manifest_key(DATASET), manifest)


JOBS = [keys.job_key(DATASET, 1, "decision_tree"), keys.job_key(DATASET, 0, "decision_tree")]


# --------------------------------------------------------------------------- raw rule


def test_a_raw_csv_without_receipt_is_re_emitted_with_the_notification_id(env) -> None:
    store, settings = env
    data = b"encounter_id,patient_nbr\n1,2\n"
    store.put_bytes(settings.buckets.raw, "uploads/a file.csv", data, "text/csv")
    store.put_bytes(settings.buckets.raw, "notes.txt", b"not a csv")

    emitted, report = run(store, settings)

    assert emitted.types() == [RAW_CREATED]
    event = emitted.events[0]
    etag = hashlib.md5(data).hexdigest()  # S3 ETag of a single PUT
    bucket = settings.buckets.raw
    expected_id = hashlib.sha256(f"{bucket}/uploads/a file.csv/{etag}".encode()).hexdigest()[:32]
    assert event["id"] == expected_id
    assert event["source"] == f"s3://{bucket}"
    assert event["subject"] == "uploads/a file.csv"
    assert event["bucket"] == bucket and event["etag"] == etag
    assert event.get_data() == {
        "bucket": bucket,
        "key": "uploads/a file.csv",
        "size": len(data),
        "etag": etag,
        "origin": "seaweedfs",  # from the S3 Server header of the real SeaweedFS
    }
    assert [e.id for e in report.emitted] == [expected_id]


def test_objects_inside_the_grace_period_are_left_alone(env) -> None:
    store, settings = env
    store.put_bytes(settings.buckets.raw, "fresh.csv", b"x\n1\n")
    emitted, report = run(store, settings, later=timedelta(0))
    assert emitted.events == []
    assert report.too_young == 1


def test_grace_comes_from_the_environment(env, monkeypatch: pytest.MonkeyPatch) -> None:
    store, settings = env
    store.put_bytes(settings.buckets.raw, "fresh.csv", b"x\n1\n")
    monkeypatch.setenv("RECONCILE_GRACE_SECONDS", "100000")
    held = reconcile(store, settings, Collector(), now=datetime.now(UTC) + LATER)
    monkeypatch.setenv("RECONCILE_GRACE_SECONDS", "0")
    emitted = Collector()
    reconcile(store, settings, emitted)
    assert (held.too_young, len(held.emitted)) == (1, 0)
    assert emitted.types() == [RAW_CREATED]


def test_a_bad_grace_names_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECONCILE_GRACE_SECONDS", "two minutes")
    with pytest.raises(ValueError, match="RECONCILE_GRACE_SECONDS must be a number, got 'two"):
        grace_from_env()
    monkeypatch.setenv("RECONCILE_GRACE_SECONDS", " ")
    assert grace_from_env() == 120.0


def test_a_receipt_marks_the_raw_object_processed(env) -> None:
    store, settings = env
    store.put_bytes(settings.buckets.raw, "a.csv", b"x\n1\n")
    info = store.head(settings.buckets.raw, "a.csv")
    assert info is not None

    outcome = {"status": "ingested", "version": DATASET}
    key = write_receipt(store, settings, replace(info, etag=f'"{info.etag}"'), outcome)
    first = store.head(settings.buckets.datasets, key)
    write_receipt(store, settings, info, outcome)

    assert key == keys.receipt_key(info.bucket, info.key, info.etag)
    assert key.startswith("sources/") and len(key) == len("sources/") + 32 + len(".json")
    assert store.get_json(settings.buckets.datasets, key) == {
        **outcome,
        "object": {"bucket": info.bucket, "key": "a.csv", "etag": info.etag},
    }
    assert store.head(settings.buckets.datasets, key) == first  # not rewritten
    emitted, report = run(store, settings)
    assert emitted.events == [] and report.processed == 1


def test_a_receipt_of_another_version_does_not_count(env) -> None:
    store, settings = env
    store.put_bytes(settings.buckets.raw, "a.csv", b"x\n1\n")
    other = ObjectInfo(settings.buckets.raw, "a.csv", 4, "0" * 32)
    write_receipt(store, settings, other, {"status": "ingested", "version": DATASET})
    emitted, _ = run(store, settings)
    assert emitted.types() == [RAW_CREATED]


def test_a_complete_manifest_naming_the_source_marks_it_processed(env) -> None:
    store, settings = env
    data = b"x\n1\n2\n"
    store.put_bytes(settings.buckets.raw, "a.csv", data)
    put_manifest(store, settings, "a.csv", len(data), JOBS)
    for job in JOBS:
        store.put_json(settings.buckets.jobs, job, {"job": job})
        store.put_json(settings.buckets.results, job, {"job": job})
    store.put_json(settings.buckets.models, keys.model_metadata_key(DATASET), {})

    emitted, report = run(store, settings)
    assert emitted.events == []
    assert report.processed == 1 + len(JOBS) + 1  # raw, the jobs, the dataset


def test_a_manifest_whose_jobs_are_not_all_written_does_not_count(env) -> None:
    """Ingest died between the manifest and its job specs: the raw event must run again."""
    store, settings = env
    data = b"x\n1\n2\n"
    store.put_bytes(settings.buckets.raw, "a.csv", data)
    put_manifest(store, settings, "a.csv", len(data), JOBS)
    store.put_json(settings.buckets.jobs, JOBS[0], {})
    store.put_json(settings.buckets.results, JOBS[0], {})

    emitted, _ = run(store, settings)
    assert emitted.types() == [RAW_CREATED]


def test_a_manifest_of_another_size_does_not_count(env) -> None:
    store, settings = env
    store.put_bytes(settings.buckets.raw, "a.csv", b"x\n1\n2\n")
    put_manifest(store, settings, "a.csv", 999, [])
    emitted, _ = run(store, settings)
    assert emitted.types() == [RAW_CREATED]


# --------------------------------------------------------------------------- job rule


def test_a_job_without_result_is_re_emitted(env) -> None:
    store, settings = env
    put_manifest(store, settings, "gone.csv", 1, JOBS)
    for job in JOBS:
        store.put_json(settings.buckets.jobs, job, {"job": job})
    store.put_json(settings.buckets.results, JOBS[1], {"job": JOBS[1]})

    emitted, report = run(store, settings)

    assert emitted.types() == [JOB_CREATED]
    assert emitted.subjects() == [JOBS[0]]
    assert emitted.events[0]["source"] == f"s3://{settings.buckets.jobs}"
    assert report.count(JOB_CREATED) == 1


def test_jobs_of_a_dataset_still_moving_are_not_re_emitted(env) -> None:
    """A result younger than the grace period: the fan-out is busy, queued jobs are not lost."""
    store, settings = env
    for job in JOBS:
        store.put_json(settings.buckets.jobs, job, {"job": job})
    time.sleep(1.5)
    store.put_json(settings.buckets.results, JOBS[1], {"job": JOBS[1]})
    emitted = Collector()
    # the jobs are 1.5 s old, the result is new: with a 1 s grace only the dataset's recent
    # activity holds the job back
    report = reconcile(store, settings, emitted, grace_seconds=1.0, now=datetime.now(UTC))
    assert emitted.events == [] and report.too_young == 1


# --------------------------------------------------------------------------- aggregate rule


def test_a_dataset_with_every_result_but_no_model_gets_one_result_event(env) -> None:
    store, settings = env
    put_manifest(store, settings, "gone.csv", 1, JOBS)
    for job in JOBS:
        store.put_json(settings.buckets.jobs, job, {"job": job})
    store.put_json(settings.buckets.results, JOBS[0], {"job": JOBS[0]})
    time.sleep(1.1)  # LastModified has one-second resolution
    store.put_json(settings.buckets.results, JOBS[1], {"job": JOBS[1]})

    emitted, _ = run(store, settings)

    assert emitted.types() == [RESULT_CREATED]
    assert emitted.subjects() == [JOBS[1]]  # the newest result
    assert emitted.events[0]["source"] == f"s3://{settings.buckets.results}"


def test_no_result_event_while_a_result_is_missing_or_the_model_exists(env) -> None:
    store, settings = env
    put_manifest(store, settings, "gone.csv", 1, JOBS)
    for job in JOBS:
        store.put_json(settings.buckets.jobs, job, {"job": job})
    store.put_json(settings.buckets.results, JOBS[0], {"job": JOBS[0]})
    missing, _ = run(store, settings)
    store.put_json(settings.buckets.results, JOBS[1], {"job": JOBS[1]})
    store.put_json(settings.buckets.models, keys.model_metadata_key(DATASET), {"done": True})
    done, _ = run(store, settings)
    assert RESULT_CREATED not in missing.types()
    assert missing.types() == [JOB_CREATED]
    assert done.events == []


# --------------------------------------------------------------------------- delivery


def _dead_letter(store: ObjectStore, settings: Settings, event: CloudEvent, code: Any) -> str:
    letter = keys.dead_letter_key(event["type"], event["id"])
    document = {"attributes": {}, "data": {}, "error": {"code": code, "destination": "x"}}
    store.put_json(settings.buckets.dead_letter, letter, document)
    return letter


def test_an_event_refused_with_400_is_not_re_emitted(env) -> None:
    store, settings = env
    store.put_bytes(settings.buckets.raw, "poison.csv", b"x\n")
    first, _ = run(store, settings)
    letter = _dead_letter(store, settings, first.events[0], 400)

    again, report = run(store, settings)
    assert again.events == []
    assert report.dead_lettered == [letter.removesuffix(".json")]


@pytest.mark.parametrize("code", [500, None])  # None: no answer (refused, timeout)
def test_an_event_dead_lettered_after_transient_failures_is_re_emitted(env, code: Any) -> None:
    store, settings = env
    store.put_bytes(settings.buckets.raw, "a.csv", b"x\n")
    first, _ = run(store, settings)
    _dead_letter(store, settings, first.events[0], code)

    again, report = run(store, settings)
    assert again.types() == [RAW_CREATED]
    assert again.events[0]["id"] == first.events[0]["id"]
    assert report.retried_dead_letters == 1 and report.dead_lettered == []


def test_a_refused_event_is_reported_and_the_others_still_go_out(env) -> None:
    store, settings = env
    store.put_bytes(settings.buckets.raw, "a.csv", b"a\n")
    store.put_bytes(settings.buckets.raw, "b.csv", b"b\n")
    sent: list[str] = []

    def flaky(event: CloudEvent) -> None:
        if event["subject"] == "a.csv":
            raise SinkRefused("no")
        sent.append(event["subject"])

    report = reconcile(store, settings, flaky, grace_seconds=0)
    assert sent == ["b.csv"]
    assert len(report.failed) == 1 and "a.csv" in report.failed[0]
    assert not report.sink_down, "one refused event does not make the whole run fail"


def test_a_run_whose_every_emit_failed_is_reported_as_sink_down(env) -> None:
    store, settings = env
    store.put_bytes(settings.buckets.raw, "a.csv", b"a\n")

    def refuse(event: CloudEvent) -> None:
        raise SinkRefused("down")

    assert reconcile(store, settings, refuse, grace_seconds=0).sink_down


def test_run_once_posts_binary_cloudevents_to_the_sink(env) -> None:
    store, settings = env
    store.put_bytes(settings.buckets.raw, "a.csv", b"a\n")
    sink = Subscriber().start()
    try:
        report = run_once(store, settings, sink.url, grace_seconds=0)
    finally:
        sink.stop()
    assert len(sink.received) == 1
    received = sink.received[0]
    assert received.headers["ce-type"] == RAW_CREATED
    assert received.headers["ce-id"] == report.emitted[0].id
    assert received.headers["content-type"].startswith("application/json")
    assert json.loads(received.body)["key"] == "a.csv"


def test_a_sink_that_refuses_raises() -> None:
    sink = Subscriber(default=(503, {}, b"busy")).start()
    try:
        emit = sink_emitter(sink.url, timeout=5)
        with pytest.raises(SinkRefused, match="HTTP 503"):
            emit(CloudEvent({"type": RAW_CREATED, "source": "s3://raw"}, {"key": "a.csv"}))
    finally:
        sink.stop()


# --------------------------------------------------------------------------- the function


def _post_event(url: str, event_type: str) -> int:
    import urllib.error
    import urllib.request

    from cloudevents.conversion import to_binary

    headers, body = to_binary(
        CloudEvent({"type": event_type, "source": "/ping", "id": "ping-1"}, {"reason": "test"})
    )
    request = urllib.request.Request(url, data=body, headers=dict(headers), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def test_the_function_reconciles_on_a_ping(env, seaweed: SeaweedServer, tmp_path: Path) -> None:
    store, settings = env
    store.put_bytes(settings.buckets.raw, "a.csv", b"a\n")
    sink = Subscriber().start()
    port = free_port()
    bucket_env = {f"BUCKET_{name.upper()}": value for name, value in vars(settings.buckets).items()}
    process_env = {
        **os.environ,
        **seaweed.env(),
        **bucket_env,
        "K_SINK": sink.url,
        "RECONCILE_GRACE_SECONDS": "0",
        "PYTHONPATH": str(ROOT),
    }
    log = (tmp_path / "reconcile.log").open("wb")
    child = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("functions-framework")),
            f"--source={ROOT / 'functions/reconcile/main.py'}",
            "--target=reconcile_ping",
            "--signature-type=cloudevent",
            "--host=127.0.0.1",
            f"--port={port}",
        ],
        env=process_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        assert processes.wait_until(lambda: processes.http_status(url) is not None, 60)
        assert _post_event(url, "io.readmission.raw.created") == 400
        assert sink.received == []
        assert _post_event(url, "dev.knative.sources.ping") == 204
        assert [r.headers["ce-subject"] for r in sink.received] == ["a.csv"]
    finally:
        child.terminate()
        child.wait(timeout=10)
        sink.stop()


# --------------------------------------------------------------------------- the real stack

STACK_ENV = {
    "BATCH_ROWS": "1500",
    "ALGORITHMS": "logistic_regression,decision_tree",
    "TRAIN_WORKERS": "2",
}


@pytest.fixture(scope="module")
def small_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from support.stack import running_stack

    with running_stack(tmp_path_factory.mktemp("reconcile") / "state", STACK_ENV) as running:
        yield running


def _adapter_env(stack: Any, sink: str) -> dict[str, str]:
    """What the supervisor gives the events adapter (readmission/localstack.py)."""
    credentials = json.loads((stack.state_dir / "credentials.json").read_text())
    token = (
        {"ADAPTER_TOKEN": credentials["webhook_token"]} if "webhook_token" in credentials else {}
    )
    return {
        **os.environ,
        **stack.env,
        **token,
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        "K_SINK": sink,
        "THREADS": "4",
    }


def _restart_adapter(stack: Any, sink: str) -> processes.Process:
    run_dir = stack.state_dir / "run"
    adapter = next(p for p in processes.recorded(run_dir) if p.name == "events-adapter")
    processes.stop_all([adapter], run_dir)
    started = processes.start(
        "events-adapter",
        adapter.cmd,
        run_dir=run_dir,
        log_dir=stack.state_dir / "logs",
        env=_adapter_env(stack, sink),
        cwd=ROOT,
    )
    url = stack.function_urls["events-adapter"][0] + "/"
    assert processes.wait_until(lambda: processes.http_status(url) == 200, 60), "adapter down"
    return started


@pytest.mark.stack
@pytest.mark.slow
def test_a_lost_raw_notification_is_recovered_by_the_reconciler(
    small_stack: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = small_stack
    buckets = stack.settings.buckets
    lost = Subscriber().start()  # accepts and drops: the notification never reaches the broker
    try:
        _restart_adapter(stack, lost.url)
        data = sample_csv(every=25)
        dataset_id = next_version(stack, data)  # the corpus version it will make (a fresh stack)
        stack.store.put_bytes(buckets.raw, "lost/diabetic_sample.csv", data, "text/csv")
        assert stack.wait_for(
            lambda: RAW_CREATED in [r.headers.get("ce-type") for r in lost.received], timeout=60
        )
        notified = next(r for r in lost.received if r.headers.get("ce-type") == RAW_CREATED)
    finally:
        _restart_adapter(stack, stack.broker_url)
        lost.stop()
    time.sleep(3)
    assert stack.store.get_json_if_exists(buckets.datasets, keys.manifest_key(dataset_id)) is None

    # inside the default grace period (120 s) nothing is emitted: it could be in flight
    monkeypatch.delenv("RECONCILE_GRACE_SECONDS", raising=False)
    held = run_once(stack.store, stack.settings, stack.broker_url)
    assert held.emitted == [] and held.too_young >= 1

    monkeypatch.setenv("RECONCILE_GRACE_SECONDS", "2")
    sent = Collector()
    post = sink_emitter(stack.broker_url)

    def record_and_post(event: CloudEvent) -> None:
        sent(event)
        post(event)

    report = reconcile(stack.store, stack.settings, record_and_post)
    assert [(e.type, e.key) for e in report.emitted] == [(RAW_CREATED, "lost/diabetic_sample.csv")]

    # the re-emitted event is the one SeaweedFS's notification produced: id, type, data
    original = from_http(notified.headers, notified.body)
    ours = sent.events[0]
    assert ours["id"] == original["id"]
    skip = {"time"}  # seconds from the filer's mtime vs S3's LastModified: same clock, maybe not
    assert {k: v for k, v in ours.get_attributes().items() if k not in skip} == {
        k: v for k, v in original.get_attributes().items() if k not in skip
    }
    assert ours.get_data() == original.get_data()

    manifest = stack.wait_for(
        lambda: stack.store.get_json_if_exists(buckets.datasets, keys.manifest_key(dataset_id)),
        timeout=180,
    )
    assert manifest is not None, stack.log("ingest", 40)
    assert version_of(stack, data, timeout=60) == dataset_id
    jobs = stack.wait_for(
        lambda: set(manifest["jobs"]) <= set(stack.store.list_keys(buckets.jobs, dataset_id)),
        timeout=60,
    )
    assert jobs, "job specs missing"
    if stack.has_function("train") and stack.has_function("aggregate"):
        champion = stack.wait_for(
            lambda: stack.store.exists(buckets.models, keys.model_metadata_key(dataset_id)),
            timeout=600,
            interval=2,
        )
        assert champion, stack.log("aggregate", 40) + stack.log("train-1", 40)
    # nothing left to do: a second pass emits nothing
    monkeypatch.setenv("RECONCILE_GRACE_SECONDS", "0")
    if stack.has_function("train") and stack.has_function("aggregate"):
        assert run_once(stack.store, stack.settings, stack.broker_url).emitted == []


def test_the_reconciler_needs_no_pipeline_library() -> None:
    """It runs in the serving image (Dockerfile stage fn-reconcile): base dependencies only."""
    probe = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'sklearn', 'pandas', 'pyarrow', 'mlflow', 'scipy'}:\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import flask, runpy\n"
        "with flask.Flask('probe').app_context():\n"
        "    runpy.run_path('functions/reconcile/main.py')\n"
    )
    run_python(probe, env={"PYTHONPATH": str(ROOT)})
