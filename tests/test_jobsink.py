"""The local JobSink (events/jobsink.py) keeps Knative JobSink's contract: one Job per event
(source, id), retries up to backoffLimit, FailJob exit codes end a Job at once, and Jobs that
had not ended run again after a restart. Real HTTP, real processes."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cloudevents.http import CloudEvent

from events.delivery import post_binary
from events.jobsink import JobSink, JobSinkConfig, JobSinkServer, job_id, job_sinks
from readmission.localstack.processes import free_port

# The Job appends its event id to runs.txt, then exits with the code the event's data asks for
# at that attempt (the last one given for every later attempt).
JOB_SCRIPT = """
import json, os, sys
event = json.load(open(os.environ["JOBSINK_EVENT_PATH"]))
with open(os.environ["RUNS_FILE"], "a") as runs:
    runs.write(event["id"] + "\\n")
codes = event["data"]["exit_codes"]
attempt = sum(1 for line in open(os.environ["RUNS_FILE"]) if line.strip() == event["id"])
sys.exit(codes[min(attempt, len(codes)) - 1])
"""

MANIFEST = """\
apiVersion: sinks.knative.dev/v1alpha1
kind: JobSink
metadata:
  name: fits
  namespace: test
spec:
  job:
    apiVersion: batch/v1
    kind: Job
    spec:
      backoffLimit: 2
      podFailurePolicy:
        rules:
          - action: FailJob
            onExitCodes:
              containerName: main
              operator: In
              values: [2]
      template:
        spec:
          restartPolicy: Never
          containers:
            - name: main
              image: example
              command: [python, job.py]
              env:
                - name: RUNS_FILE
                  value: {runs}
"""


class Sink:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        (tmp_path / "manifests").mkdir(exist_ok=True)
        self.runs = tmp_path / "runs.txt"
        (tmp_path / "manifests" / "jobsink.yaml").write_text(MANIFEST.format(runs=self.runs))
        (tmp_path / "job.py").write_text(JOB_SCRIPT)
        self.server: JobSinkServer | None = None

    def start(self) -> Sink:
        config = JobSinkConfig(
            port=free_port(),
            manifests=self.tmp_path / "manifests",
            state_dir=self.tmp_path / "state",
            parallelism=2,
            root=self.tmp_path,
            backoff_seconds=0.05,
        )
        self.server = JobSinkServer(JobSink(config))
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        assert self.server is not None
        self.server.sink.stopping.set()
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sink.config.port}/test/fits"

    def post(self, event_id: str, exit_codes: list[int]) -> int:
        event = CloudEvent(
            {"type": "io.test", "source": "tests", "id": event_id}, {"exit_codes": exit_codes}
        )
        return post_binary(self.url, event, 10).status

    def runs_of(self, event_id: str) -> int:
        if not self.runs.exists():
            return 0
        return sum(1 for line in self.runs.read_text().splitlines() if line == event_id)

    def state(self, event_id: str, timeout: float = 20.0) -> dict[str, object]:
        assert self.server is not None
        identifier = job_id("tests", event_id)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.server.sink.status().get(identifier, {})
            if status.get("state") in {"succeeded", "failed"}:
                return status
            time.sleep(0.05)
        raise AssertionError(f"job of {event_id} did not end: {self.server.sink.status()}")


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[Sink]:
    running = Sink(tmp_path).start()
    yield running
    running.stop()


def test_the_manifest_gives_the_job_command_retries_and_fail_job_codes(tmp_path: Path) -> None:
    Sink(tmp_path)
    template = job_sinks(tmp_path / "manifests")[("test", "fits")]
    assert template.command == ["python", "job.py"]
    assert template.backoff_limit == 2
    assert template.fail_job_exit_codes == {2}
    assert template.env == {"RUNS_FILE": str(tmp_path / "runs.txt")}


def test_an_event_starts_one_job_however_often_it_is_posted(sink: Sink) -> None:
    assert [sink.post("e1", [0]) for _ in range(3)] == [202, 202, 202]
    assert sink.state("e1") == {
        "jobsink": "fits",
        "state": "succeeded",
        "attempts": 1,
        "exit_codes": [0],
    }
    assert sink.post("e1", [0]) == 202  # after it ended, too
    time.sleep(0.3)
    assert sink.runs_of("e1") == 1


def test_a_failed_run_is_retried_up_to_the_backoff_limit(sink: Sink) -> None:
    sink.post("flaky", [1, 1, 0])
    assert sink.state("flaky")["exit_codes"] == [1, 1, 0]
    sink.post("broken", [1])
    status = sink.state("broken")
    assert (status["state"], status["exit_codes"]) == ("failed", [1, 1, 1])  # 1 + backoffLimit


def test_a_fail_job_exit_code_ends_the_job_without_retries(sink: Sink) -> None:
    sink.post("never", [2, 0])
    status = sink.state("never")
    assert (status["state"], status["exit_codes"]) == ("failed", [2])


def test_a_job_that_had_not_ended_runs_again_after_a_restart(tmp_path: Path) -> None:
    first = Sink(tmp_path).start()
    # a job recorded but not ended when its JobSink died: event written, status running
    directory = tmp_path / "state" / "fits" / job_id("tests", "orphan")
    directory.mkdir(parents=True)
    event = {"specversion": "1.0", "type": "io.test", "source": "tests", "id": "orphan"}
    (directory / "event.json").write_text(json.dumps({**event, "data": {"exit_codes": [0]}}))
    (directory / "status.json").write_text(json.dumps({"state": "running", "attempts": 1}))
    first.stop()
    second = Sink(tmp_path).start()
    try:
        status = second.state("orphan")
        assert (status["state"], status["attempts"]) == ("succeeded", 2)
        assert second.runs_of("orphan") == 1
    finally:
        second.stop()


def test_unknown_jobsinks_and_bodies_that_are_no_cloudevent_are_refused(sink: Sink) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(
            urllib.request.Request(sink.url, data=b"{}", method="POST"), timeout=10
        )
    assert refused.value.code == 400
    other = sink.url.replace("/test/fits", "/test/other")
    event = CloudEvent({"type": "io.test", "source": "tests", "id": "x"}, {})
    assert post_binary(other, event, 10).status == 404


def test_the_config_comes_from_the_environment_and_refuses_a_parallelism_of_no_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("JOBSINK_PARALLELISM", "JOBSINK_BACKOFF_SECONDS"):
        monkeypatch.delenv(name, raising=False)
    assert JobSinkConfig.from_env().parallelism == 2
    monkeypatch.setenv("JOBSINK_PARALLELISM", "0")  # a JobSink that runs no Job loses none
    with pytest.raises(ValueError, match="JOBSINK_PARALLELISM must be >= 1, got '0'"):
        JobSinkConfig.from_env()
    monkeypatch.setenv("JOBSINK_PARALLELISM", "two")
    with pytest.raises(ValueError, match="JOBSINK_PARALLELISM must be an integer, got 'two'"):
        JobSinkConfig.from_env()
    monkeypatch.delenv("JOBSINK_PARALLELISM")
    monkeypatch.setenv("JOBSINK_BACKOFF_SECONDS", "nan")
    with pytest.raises(ValueError, match="JOBSINK_BACKOFF_SECONDS must be a finite number"):
        JobSinkConfig.from_env()
    monkeypatch.setenv("JOBSINK_BACKOFF_SECONDS", "-1")
    with pytest.raises(ValueError, match="JOBSINK_BACKOFF_SECONDS must be >= 0, got '-1'"):
        JobSinkConfig.from_env()
