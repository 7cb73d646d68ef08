"""Fits longer than a request go to a JobSink (readmission/fit_handoff.py): which fits, and the
handoff generation that makes every redelivery land on one Job (real SeaweedFS), and the
forwarded event (a real HTTP CloudEvent to a real server)."""

from __future__ import annotations

import json

import pytest
from support.http_stub import Subscriber
from support.seaweed_server import SeaweedServer, seaweed_s3

from readmission import fit_handoff, jobs
from readmission.fit_handoff import HandoffFailed, HandoffSettings
from readmission.job_spec import JobSpec
from readmission.storage import ObjectStore

__all__ = ["seaweed_s3"]

BUCKET = "jobs"
JOB_KEY = "v1/004-gradient_boosting.json"


def job(algorithm: str, rows: int) -> JobSpec:
    return JobSpec("v1", 4, algorithm, rows, ("b/0.parquet",), ("v/0.parquet",), "datasets")


@pytest.fixture(scope="module")
def store(seaweed_s3: SeaweedServer) -> ObjectStore:
    store = ObjectStore(seaweed_s3.client())
    store.ensure_buckets([BUCKET])
    return store


def test_only_fits_estimated_longer_than_a_request_go_to_a_job() -> None:
    settings = HandoffSettings(jobsink_url="http://sink/ns/fits", request_seconds=300)
    assert jobs.estimated_fit_seconds(710_000, "gradient_boosting") > 300
    assert fit_handoff.runs_as_job(job("gradient_boosting", 710_000), settings)
    assert not fit_handoff.runs_as_job(job("gradient_boosting", 71_000), settings)
    assert not fit_handoff.runs_as_job(job("decision_tree", 400_000), settings)
    assert fit_handoff.runs_as_job(job("decision_tree", 710_000), settings)  # too big for it
    assert fit_handoff.runs_as_job(job("an_unlisted_algorithm", 710_000), settings)
    no_sink = HandoffSettings(jobsink_url=None, request_seconds=0)
    assert not fit_handoff.runs_as_job(job("gradient_boosting", 710_000), no_sink)


def test_the_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAIN_JOBSINK_URL", "http://sink/ns/fits")
    monkeypatch.setenv("TRAIN_REQUEST_SECONDS", "12.5")
    monkeypatch.setenv("TRAIN_JOB_DEADLINE_SECONDS", "60")
    monkeypatch.setenv("TRAIN_REQUEST_MAX_ROWS", "1000")
    settings = HandoffSettings.from_env()
    assert settings == HandoffSettings("http://sink/ns/fits", 12.5, 1000, 60.0)
    monkeypatch.delenv("TRAIN_JOBSINK_URL")
    assert HandoffSettings.from_env().jobsink_url is None
    monkeypatch.setenv("TRAIN_REQUEST_SECONDS", "five minutes")
    with pytest.raises(ValueError, match="TRAIN_REQUEST_SECONDS must be a number, got 'five"):
        HandoffSettings.from_env()


def test_a_generation_holds_until_the_job_deadline_then_the_next_one_starts(
    store: ObjectStore,
) -> None:
    key = "gen/" + JOB_KEY
    assert fit_handoff.generation(store, BUCKET, key, 100, now=1000.0) == 1
    assert fit_handoff.generation(store, BUCKET, key, 100, now=1099.0) == 1
    assert fit_handoff.generation(store, BUCKET, key, 100, now=1100.0) == 2
    assert fit_handoff.generation(store, BUCKET, key, 100, now=1150.0) == 2
    record = json.loads(store.get_bytes(BUCKET, fit_handoff.handoff_key(key)))
    assert record == {"generation": 2, "handed_off_at": 1100.0}
    assert not fit_handoff.handoff_key(key).endswith(".json")  # fires no job event


def test_the_forwarded_event_keeps_its_attributes_and_data_with_the_generation_in_its_id(
    store: ObjectStore,
) -> None:
    sink = Subscriber(replies=[(202, {}, b"")]).start()
    try:
        settings = HandoffSettings(jobsink_url=sink.url, request_seconds=0)
        attributes = {
            "specversion": "1.0",
            "type": "io.readmission.job.created",
            "source": "s3://jobs",
            "id": "abc",
            "subject": "fwd/" + JOB_KEY,
        }
        data = {"bucket": BUCKET, "key": "fwd/" + JOB_KEY}
        key = "fwd/" + JOB_KEY
        forwarded = fit_handoff.hand_off(store, settings, BUCKET, key, attributes, data)
        assert forwarded == "abc-g1"
        (received,) = sink.received
        assert received.headers["ce-id"] == "abc-g1"
        assert received.headers["ce-source"] == "s3://jobs"
        assert received.headers["ce-subject"] == "fwd/" + JOB_KEY
        assert json.loads(received.body) == data
    finally:
        sink.stop()


def test_a_jobsink_that_refuses_raises_so_the_event_is_retried(store: ObjectStore) -> None:
    sink = Subscriber(replies=[(503, {}, b"")]).start()
    try:
        settings = HandoffSettings(jobsink_url=sink.url, request_seconds=0)
        attributes = {"specversion": "1.0", "type": "t", "source": "s", "id": "x"}
        with pytest.raises(HandoffFailed, match="refused"):
            fit_handoff.hand_off(store, settings, BUCKET, "no/" + JOB_KEY, attributes, {})
    finally:
        sink.stop()
