"""A fit longer than a request completes exactly once (issue #21.4), on the real local stack.

The broker cuts every delivery to train after 1 s (BROKER_TIMEOUT_CAPS, as a Service's
timeoutSeconds cuts a request) and every gradient-boosting fit is estimated longer than
TRAIN_REQUEST_SECONDS, so the train Service hands each job to the JobSink of
infra/knative/jobsink.yaml, which runs it as a Job (a process here). Each fit takes longer
than the request could have lasted, and still every job has one result, one complete MLflow
run and one Job that succeeded at its first attempt; no delivery failed.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient
from support.seaweed_server import sample_csv
from support.stack import running_stack, version_of, wait_version_done

from readmission import keys, tracking

ENV = {
    "BATCH_ROWS": "3000",
    "ALGORITHMS": "gradient_boosting",
    "TRAIN_WORKERS": "1",
    "TRAIN_REQUEST_SECONDS": "1",
    "BROKER_TIMEOUT_CAPS": "train=1",
    "JOBSINK_BACKOFF_SECONDS": "1",
    "CODE_VERSION": "long-fits",
}
REQUEST_SECONDS = 1.0
TIMEOUT = 600.0


@pytest.mark.stack
def test_fits_longer_than_a_request_run_as_jobs_and_complete_exactly_once(tmp_path: Path) -> None:
    with running_stack(tmp_path / "state", ENV) as stack:
        data = sample_csv(every=20)
        stack.store.put_bytes(stack.settings.buckets.raw, "long/fits.csv", data, "text/csv")
        version = version_of(stack, data)
        assert version
        wait_version_done(stack, version, TIMEOUT)

        manifest = stack.store.get_json(stack.settings.buckets.datasets, keys.manifest_key(version))
        jobs = manifest["jobs"]
        assert len(jobs) >= 2
        for job in jobs:
            assert stack.store.exists(stack.settings.buckets.results, job), job

        client = MlflowClient(stack.mlflow_uri)
        experiment = client.get_experiment_by_name(stack.settings.mlflow_experiment)
        assert experiment is not None
        runs = client.search_runs(
            [experiment.experiment_id], f"tags.{tracking.DATASET_TAG} = '{version}'"
        )
        complete = [run for run in runs if tracking.is_complete(run)]
        assert sorted(run.data.tags[tracking.JOB_KEY_TAG] for run in complete) == sorted(jobs)
        assert len(runs) == len(jobs), "a fit ran twice"
        for run in complete:  # each fit outlived the request that would have carried it
            seconds = (run.info.end_time - run.info.start_time) / 1000
            assert seconds > REQUEST_SECONDS, (run.data.tags[tracking.JOB_KEY_TAG], seconds)

        with urllib.request.urlopen(f"{stack.env['JOBSINK_URL']}/status", timeout=10) as reply:
            status = json.loads(reply.read())
        assert len(status) == len(jobs), status
        assert {(s["state"], s["attempts"]) for s in status.values()} == {("succeeded", 1)}
        assert "handed to the JobSink" in stack.log("train-1")
        broker = stack.broker_status()
        assert not broker["dead_lettered_by_type"], broker
        assert broker["totals"]["failed_attempts"] == 0, broker  # no request was cut
