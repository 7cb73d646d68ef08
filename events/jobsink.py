"""The local JobSink: Knative Eventing's JobSink semantics for the laptop stack.

Knative's JobSink (sinks.knative.dev/v1alpha1) turns each CloudEvent it receives into a
Kubernetes Job with the event mounted as a JSON file. Here a Job is a process. Contract, as
Knative's:

* ``POST /<namespace>/<name>`` with a CloudEvent (binary or structured) -> 202 with a
  ``Location``, once the Job is recorded; 400 if the body is not a CloudEvent, 404 if no
  JobSink manifest of that name exists in the manifest directory;
* one Job per (source, id) of the event: a second POST of the same event answers 202 and
  starts nothing;
* the Job runs the JobSink's first container ``command`` + ``args`` (``python`` is this
  interpreter) from the repository root, with the stack's environment, the container's literal
  ``env`` values for names the stack does not set, and the event as a structured CloudEvent
  in a file whose path is in ``JOBSINK_EVENT_PATH`` (Kubernetes: /etc/jobsink-event/event);
* a failed run is retried up to ``backoffLimit`` times (Kubernetes' default 6) after a backoff
  that doubles from ``JOBSINK_BACKOFF_SECONDS``; an exit code
  that a ``podFailurePolicy`` rule with ``action: FailJob`` lists fails the Job at once;
* at most ``JOBSINK_PARALLELISM`` Jobs run at once (a cluster's capacity, or Kueue), the others
  wait in arrival order;
* state lives in ``JOBSINK_STATE_DIR/<name>/<job id>/`` (``event.json``, ``status.json``,
  ``attempt-<n>.log``); on start, Jobs without a final status run again from their next
  attempt (a Job outlives a restart of its controller). A run is killed with the JobSink
  (PR_SET_PDEATHSIG), so a restart never leaves a run without an owner.

``GET /healthz`` -> 200; ``GET /status`` -> JSON of every Job's status. Connections are
accepted as the broker's are (events.intake: a thread each, backlog 128, read timeouts).
Run: ``python -m events.jobsink`` (JOBSINK_HOST, JOBSINK_PORT, JOBSINK_MANIFESTS,
JOBSINK_STATE_DIR, JOBSINK_PARALLELISM (2), JOBSINK_ROOT (the repository),
JOBSINK_BACKOFF_SECONDS (10), HTTP_HEADER_TIMEOUT (10), HTTP_BODY_TIMEOUT (10)).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

from cloudevents.conversion import to_structured
from cloudevents.exceptions import GenericException
from cloudevents.http import CloudEvent, from_http

from events.delivery import decode_attribute_headers
from events.intake import IntakeHandler, IntakeServer, ReadTimeouts
from events.routing import load_documents
from readmission import env

log = logging.getLogger("jobsink")

API_VERSION_PREFIX = "sinks.knative.dev/"
DEFAULT_BACKOFF_LIMIT = 6  # Kubernetes' default for a Job
FINAL = frozenset({"succeeded", "failed"})
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class JobTemplate:
    """What a JobSink manifest says a Job runs."""

    name: str
    namespace: str
    command: list[str]
    env: dict[str, str]
    backoff_limit: int
    fail_job_exit_codes: frozenset[int]

    @classmethod
    def from_manifest(cls, doc: dict[str, Any]) -> JobTemplate:
        job_spec = doc["spec"]["job"]["spec"]
        container = job_spec["template"]["spec"]["containers"][0]
        fail_codes: set[int] = set()
        for rule in (job_spec.get("podFailurePolicy") or {}).get("rules") or []:
            codes = rule.get("onExitCodes") or {}
            if rule.get("action") == "FailJob" and codes.get("operator") == "In":
                fail_codes |= {int(code) for code in codes.get("values") or []}
        literal_env = {
            str(item["name"]): str(item["value"])
            for item in container.get("env") or []
            if "value" in item
        }
        return cls(
            name=str(doc["metadata"]["name"]),
            namespace=str(doc["metadata"].get("namespace", "default")),
            command=[str(part) for part in [*container["command"], *(container.get("args") or [])]],
            env=literal_env,
            backoff_limit=int(job_spec.get("backoffLimit", DEFAULT_BACKOFF_LIMIT)),
            fail_job_exit_codes=frozenset(fail_codes),
        )


def job_sinks(manifest_dir: Path) -> dict[tuple[str, str], JobTemplate]:
    """(namespace, name) -> template of every JobSink manifest in the directory."""
    templates = {}
    for doc in load_documents(manifest_dir) if manifest_dir.is_dir() else []:
        if doc.get("kind") == "JobSink" and str(doc.get("apiVersion", "")).startswith(
            API_VERSION_PREFIX
        ):
            template = JobTemplate.from_manifest(doc)
            templates[(template.namespace, template.name)] = template
    return templates


def job_id(source: str, event_id: str) -> str:
    """One Job per (source, id), as Knative's JobSink labels its Jobs."""
    return hashlib.sha256(f"{source}\0{event_id}".encode()).hexdigest()[:32]


@dataclass(frozen=True)
class JobSinkConfig:
    host: str = "127.0.0.1"
    port: int = 8099
    manifests: Path = Path("infra/knative")
    state_dir: Path = Path(".state/jobsink")
    parallelism: int = 2
    root: Path = Path(".")
    backoff_seconds: float = 10.0  # before a retry, doubling up to 360 s (Kubernetes' pod backoff)
    max_body_bytes: int = 1024 * 1024
    # seconds a client may go silent per read of its request head, then its body
    read_timeouts: ReadTimeouts = field(default_factory=ReadTimeouts)

    @classmethod
    def from_env(cls) -> JobSinkConfig:
        return cls(
            host=env.text("JOBSINK_HOST", cls.host),
            port=env.integer("JOBSINK_PORT", cls.port),
            manifests=Path(env.text("JOBSINK_MANIFESTS", str(cls.manifests))),
            state_dir=Path(env.text("JOBSINK_STATE_DIR", str(cls.state_dir))),
            parallelism=env.integer("JOBSINK_PARALLELISM", cls.parallelism, minimum=1),
            root=Path(env.text("JOBSINK_ROOT", str(cls.root))),
            backoff_seconds=env.number("JOBSINK_BACKOFF_SECONDS", cls.backoff_seconds, minimum=0),
            read_timeouts=ReadTimeouts.from_env(),
        )


@dataclass
class _Job:
    template: JobTemplate
    directory: Path
    attempts: int = 0
    state: str = "pending"
    exit_codes: list[int] = field(default_factory=list)

    def status(self) -> dict[str, Any]:
        return {
            "jobsink": self.template.name,
            "state": self.state,
            "attempts": self.attempts,
            "exit_codes": self.exit_codes,
        }

    def save(self) -> None:
        partial = self.directory / "status.json.partial"
        partial.write_text(json.dumps(self.status()))
        partial.replace(self.directory / "status.json")


def _libc_prctl() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: a restart may leave a run behind
        return None


# Resolved once here: the child calls it between fork and exec, where it must not load anything.
_PRCTL = _libc_prctl()


def _die_with_parent() -> None:
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)


class JobSink:
    def __init__(self, config: JobSinkConfig) -> None:
        self.config = config
        self.templates = job_sinks(config.manifests)
        self.jobs: dict[str, _Job] = {}
        self.queue: deque[str] = deque()
        self.cond = threading.Condition()
        self.stopping = threading.Event()
        self._resume()
        self.runners = [
            threading.Thread(target=self._run, name=f"job-runner-{n}", daemon=True)
            for n in range(config.parallelism)
        ]
        for runner in self.runners:
            runner.start()

    def _resume(self) -> None:
        """Jobs recorded by an earlier run of this JobSink that have not ended run again."""
        for template in self.templates.values():
            base = self.config.state_dir / template.name
            for directory in sorted(base.glob("*/")) if base.is_dir() else []:
                if not (directory / "event.json").exists():
                    continue
                saved = {}
                if (directory / "status.json").exists():
                    saved = json.loads((directory / "status.json").read_text())
                job = _Job(
                    template,
                    directory,
                    attempts=int(saved.get("attempts", 0)),
                    state=str(saved.get("state", "pending")),
                    exit_codes=list(saved.get("exit_codes", [])),
                )
                self.jobs[directory.name] = job
                if job.state not in FINAL:
                    job.state = "pending"
                    self.queue.append(directory.name)
                    log.info("job %s/%s resumes after a restart", template.name, directory.name)

    def submit(self, template: JobTemplate, event: CloudEvent) -> tuple[str, bool]:
        """(job id, whether this call created the Job)."""
        identifier = job_id(str(event["source"]), str(event["id"]))
        with self.cond:
            if identifier in self.jobs:
                return identifier, False
            directory = self.config.state_dir / template.name / identifier
            directory.mkdir(parents=True, exist_ok=True)
            _, body = to_structured(event)
            partial = directory / "event.json.partial"
            partial.write_bytes(body)
            partial.replace(directory / "event.json")  # recorded: a restart runs it
            job = _Job(template, directory)
            job.save()
            self.jobs[identifier] = job
            self.queue.append(identifier)
            self.cond.notify()
        log.info("job %s/%s created for event %s", template.name, identifier, event["id"])
        return identifier, True

    def _run(self) -> None:
        while not self.stopping.is_set():
            with self.cond:
                while not self.queue and not self.stopping.is_set():
                    self.cond.wait(0.5)
                if self.stopping.is_set():
                    return
                identifier = self.queue.popleft()
                job = self.jobs[identifier]
                job.state = "running"
            self._execute(identifier, job)

    def _execute(self, identifier: str, job: _Job) -> None:
        template = job.template
        while True:
            job.attempts += 1
            job.save()
            env = {**template.env, **os.environ}
            env["JOBSINK_EVENT_PATH"] = str(job.directory / "event.json")
            command = [sys.executable if part == "python" else part for part in template.command]
            with open(job.directory / f"attempt-{job.attempts}.log", "wb") as output:
                code = subprocess.call(
                    command,
                    cwd=self.config.root,
                    env=env,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_die_with_parent,
                )
            job.exit_codes.append(code)
            if code == 0:
                job.state = "succeeded"
            elif code in template.fail_job_exit_codes or job.attempts > template.backoff_limit:
                job.state = "failed"
            log.info(
                "job %s/%s attempt %d exited %d: %s",
                template.name,
                identifier,
                job.attempts,
                code,
                job.state if job.state in FINAL else "retrying",
            )
            job.save()
            if job.state in FINAL:
                return
            backoff = min(self.config.backoff_seconds * 2 ** (job.attempts - 1), 360.0)
            if self.stopping.wait(backoff):
                return

    def status(self) -> dict[str, Any]:
        with self.cond:
            return {identifier: job.status() for identifier, job in self.jobs.items()}


class _Handler(IntakeHandler):
    server: JobSinkServer

    def _reply(self, status: HTTPStatus, body: Any = None, location: str | None = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        if location:
            self.send_header("Location", location)
        self.send_header("Content-Length", str(len(data)))
        if data:
            self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._reply(HTTPStatus.OK, {"ok": True})
        elif self.path == "/status":
            self._reply(HTTPStatus.OK, self.server.sink.status())
        else:
            self._reply(HTTPStatus.NOT_FOUND, {"error": "GET /healthz or /status"})

    def do_POST(self) -> None:
        sink = self.server.sink
        namespace, _, name = self.path.strip("/").partition("/")
        template = sink.templates.get((namespace, name))
        if template is None:
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no JobSink {namespace}/{name}"})
            return
        length_text = self.headers.get("Content-Length") or ""
        if not length_text.isdigit() or int(length_text) > sink.config.max_body_bytes:
            self.close_connection = True
            self._reply(HTTPStatus.BAD_REQUEST, {"error": "Content-Length missing or too large"})
            return
        body = self.read_body(int(length_text))
        try:
            event = from_http(decode_attribute_headers(dict(self.headers.items())), body)
            if not event.get("id") or not event.get("source"):
                raise ValueError("missing id or source")
        except (GenericException, ValueError, TypeError) as error:
            self._reply(HTTPStatus.BAD_REQUEST, {"error": f"not a valid CloudEvent: {error}"})
            return
        identifier, _ = sink.submit(template, event)
        self._reply(HTTPStatus.ACCEPTED, location=f"/{namespace}/{name}/{identifier}")

    def log_message(self, format: str, *args: Any) -> None:
        return


class JobSinkServer(IntakeServer):
    """The JobSink's intake (events.intake: a thread per connection, backlog, read timeouts)."""

    def __init__(self, sink: JobSink) -> None:
        self.sink = sink
        config = sink.config
        super().__init__((config.host, config.port), _Handler, config.read_timeouts)


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    config = JobSinkConfig.from_env()
    server = JobSinkServer(JobSink(config))
    log.info(
        "jobsink listening on %s:%d (JobSinks %s)",
        config.host,
        config.port,
        ", ".join(f"{ns}/{name}" for ns, name in server.sink.templates) or "none",
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
