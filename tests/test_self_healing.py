"""The local stack heals itself (issue #22.1): the watchdog restarts any process that dies, and
the reconciler's PingSource fires to its sink without the broker.

The stack test SIGKILLs, one after the other while a drop is being trained, the broker, the
events adapter, a train process, the MLflow server and SeaweedFS, and expects each to be
restarted and the corpus version to be aggregated and decided with one finished MLflow run per
job: nothing lost. Small settings (1,000-row batches, two fast algorithms, a short reconcile
grace) keep it near two minutes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from mlflow import MlflowClient
from support.http_stub import Subscriber
from support.seaweed_server import sample_csv
from support.stack import RunningStack, running_stack, version_of, wait_version_done

from events.pinger import PING_TYPE, fire_direct
from events.routing import Destination, PingSource
from events.services import ServiceDirectory
from readmission import keys, tracking
from readmission.localstack import processes
from readmission.localstack.watchdog import restart_counts

ROOT = Path(__file__).resolve().parents[1]
ENV = {
    "BATCH_ROWS": "1000",
    "ALGORITHMS": "logistic_regression,decision_tree",
    "TRAIN_WORKERS": "2",
    "LOCAL_RESTART": "on",
    "RECONCILE_GRACE_SECONDS": "5",
    "CODE_VERSION": "self-healing",
}
TIMEOUT = 600.0
VICTIMS = ("broker", "events-adapter", "train-1", "mlflow", "seaweedfs")


def ping_source(sink: str) -> PingSource:
    return PingSource(
        name="reconcile-test",
        namespace="readmission",
        schedule="*/5 * * * *",
        data='{"reason": "reconcile"}',
        content_type="application/json",
        sink=Destination(service=sink),
    )


def test_a_ping_goes_straight_to_its_sink_and_is_retried_until_delivered(tmp_path: Path) -> None:
    sink = Subscriber(replies=[(503, {}, b"")]).start()
    try:
        services = tmp_path / "services.json"
        services.write_text(json.dumps({"reconcile": [sink.url]}))
        assert fire_direct(ping_source("reconcile"), ServiceDirectory(services), attempts=3)
        assert [r.headers.get("ce-type") for r in sink.received] == [PING_TYPE, PING_TYPE]
        assert json.loads(sink.received[-1].body) == {"reason": "reconcile"}
    finally:
        sink.stop()


def test_a_ping_without_a_running_sink_is_not_delivered(tmp_path: Path) -> None:
    services = tmp_path / "services.json"
    services.write_text(json.dumps({"ingest": ["http://127.0.0.1:9"]}))
    stopping = threading.Event()
    stopping.set()  # no backoff waits: one attempt
    directory = ServiceDirectory(services)
    assert not fire_direct(ping_source("reconcile"), directory, attempts=3, stopping=stopping)


def kill(stack: RunningStack, name: str) -> int:
    """SIGKILL a recorded process with its whole group; its pid."""
    process = next(p for p in processes.recorded(stack.state_dir / "run") if p.name == name)
    assert processes.is_running(process), f"{name} is not running"
    os.killpg(process.pid, signal.SIGKILL)
    gone = processes.wait_until(lambda: not processes.is_running(process), timeout=10)
    assert gone, f"{name} survived SIGKILL"
    return process.pid


def restarted(stack: RunningStack, name: str, old_pid: int) -> bool:
    now = next((p for p in processes.recorded(stack.state_dir / "run") if p.name == name), None)
    counted = restart_counts(stack.state_dir).get(name, {}).get("restarts", 0)
    if not (now and now.pid != old_pid and processes.is_running(now) and counted >= 1):
        return False
    port = stack.ports["s3" if name == "seaweedfs" else name]
    return processes.http_status(f"http://127.0.0.1:{port}/") is not None  # it answers again


@pytest.mark.stack
def test_every_kind_of_process_killed_mid_pipeline_is_restarted_and_nothing_is_lost(
    tmp_path: Path,
) -> None:
    with running_stack(tmp_path / "state", ENV) as stack:
        names = {p.name for p in processes.recorded(stack.state_dir / "run")}
        assert {"watchdog", "pingsource", *VICTIMS} <= names
        data = sample_csv(every=10)
        stack.store.put_bytes(stack.settings.buckets.raw, "heal/sample.csv", data, "text/csv")
        version = version_of(stack, data)
        assert version

        for name in VICTIMS:  # one after the other, while the version trains
            old_pid = kill(stack, name)
            back = stack.wait_for(lambda n=name, p=old_pid: restarted(stack, n, p), 120, 0.5)
            assert back, f"{name} not restarted\n--- watchdog\n{stack.log('watchdog', 30)}"

        wait_version_done(stack, version, TIMEOUT)
        manifest = stack.store.get_json(stack.settings.buckets.datasets, keys.manifest_key(version))
        for job in manifest["jobs"]:
            assert stack.store.exists(stack.settings.buckets.results, job), job
        client = MlflowClient(stack.mlflow_uri)
        experiment = client.get_experiment_by_name(stack.settings.mlflow_experiment)
        assert experiment is not None
        runs = client.search_runs(
            [experiment.experiment_id], f"tags.{tracking.DATASET_TAG} = '{version}'"
        )
        # Exactly one complete run per job. A run of an attempt killed while the broker that
        # dispatched it was also gone has no redelivery to clean it up: it may stay RUNNING
        # as debris, but it is never taken for the job's run.
        finished: dict[str, int] = {}
        for run in runs:
            if tracking.is_complete(run):
                job = run.data.tags[tracking.JOB_KEY_TAG]
                finished[job] = finished.get(job, 0) + 1
        assert finished == dict.fromkeys(manifest["jobs"], 1), [
            (r.data.tags.get(tracking.JOB_KEY_TAG), r.info.status) for r in runs
        ]

        status = subprocess.run(
            [sys.executable, "-m", "readmission.localstack", "status"],
            cwd=ROOT,
            env={**os.environ, "STATE_DIR": str(stack.state_dir)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        lines = {line.split()[0]: line for line in status.stdout.splitlines() if line.strip()}
        for name in VICTIMS:
            assert "restarts 1" in lines[name], status.stdout
