"""The real local stack (SeaweedFS, MLflow, broker, functions) as a pytest fixture.

Every port is chosen free at runtime and all state lives in a pytest temp folder, so parallel
test runs on one machine do not collide.

* ``stack`` (session-scoped fixture): one stack shared by every test that asks for it.
* ``running_stack(state_dir, env)`` (context manager): a stack of your own, e.g. in a
  module-scoped fixture with small settings (``{"BATCH_ROWS": "2000"}``).

Mark tests that use it ``@pytest.mark.stack``. A ``RunningStack`` exposes the ObjectStore,
the settings, the client env (``environ()`` applies it to ``os.environ`` temporarily), the
broker, function and MLflow URLs, and the broker's status.

A drop (an uploaded CSV) is known by its content id (``keys.content_id``); the corpus version
it makes, the id its jobs, results and model live under, depends on the versions the stack
holds already: ``version_of`` reads it from the drop's record, ``next_version`` says what it
will be before the drop is ingested, ``wait_version_done`` waits for the version's
``models/<version>/metadata.json`` (written last, also for a challenger the gate kept) and
``decision_of`` reads the gate's decision on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from readmission import corpus, keys
from readmission.config import Settings
from readmission.localstack import (
    StackConfig,
    StackInfo,
    Supervisor,
    settings_for,
    store_for,
)
from readmission.storage import ObjectStore

# The watchdog is off: several tests kill and restart processes themselves (on in
# tests/test_self_healing.py, and for `scripts/run-local.sh`).
DEFAULT_TEST_ENV = {"TRAIN_WORKERS": "2", "LOCAL_RESTART": "off"}


@dataclass
class RunningStack:
    config: StackConfig
    info: StackInfo
    store: ObjectStore
    settings: Settings

    @property
    def state_dir(self) -> Path:
        return self.config.state_dir

    @property
    def env(self) -> dict[str, str]:
        """What a client needs: S3 endpoint and keys, MLflow URI, broker and predict URLs."""
        return dict(self.info.env)

    @property
    def s3_url(self) -> str:
        return self.info.s3_url

    @property
    def broker_url(self) -> str:
        return self.info.broker_url

    @property
    def mlflow_uri(self) -> str:
        return self.info.mlflow_uri

    @property
    def filer_url(self) -> str:
        return self.info.filer_url

    @property
    def function_urls(self) -> dict[str, list[str]]:
        """Knative Service name -> URLs of its running replicas."""
        return {name: list(urls) for name, urls in self.info.services.items()}

    @property
    def predict_url(self) -> str | None:
        return self.info.env.get("PREDICT_URL")

    @property
    def ports(self) -> dict[str, int]:
        return dict(self.info.ports)

    def has_function(self, service: str) -> bool:
        return bool(self.info.services.get(service))

    @contextlib.contextmanager
    def environ(self) -> Iterator[dict[str, str]]:
        """os.environ with the stack's client env, restored afterwards."""
        saved = dict(os.environ)
        os.environ.update(self.info.env)
        try:
            yield dict(os.environ)
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def broker_status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.broker_url}/status", timeout=5) as response:
            return json.loads(response.read())

    def fire_pingsource(self, name: str) -> int:
        """POST /pingsources/<name> on the broker (fires it now, through the broker); the status."""
        request = urllib.request.Request(f"{self.broker_url}/pingsources/{name}", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status

    def delivered(self, event_type: str, at_least: int = 1, timeout: float = 120.0) -> bool:
        """Whether the broker counts ``at_least`` deliveries of ``event_type`` within
        ``timeout``: a subscriber's side effects (a report, job specs) are visible before its
        reply reaches the broker, and ingest still writes the drift report after its job specs."""
        return bool(
            self.wait_for(
                lambda: self.broker_status()["delivered_by_type"].get(event_type, 0) >= at_least,
                timeout=timeout,
            )
        )

    def log(self, name: str, lines: int = 200) -> str:
        return Supervisor(self.config).tail(name, lines)

    def wait_for(
        self, check: Callable[[], Any], timeout: float = 60.0, interval: float = 0.5
    ) -> Any:
        """Poll ``check()`` until it returns something truthy; that value, or None on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() >= deadline:
                return None
            time.sleep(interval)


@contextlib.contextmanager
def running_stack(state_dir: Path, env: Mapping[str, str] | None = None) -> Iterator[RunningStack]:
    """Start the stack on free ports with its state in ``state_dir``; stop it afterwards."""
    extra = {**DEFAULT_TEST_ENV, **(env or {}), "LOCAL_PORTS": "free", "STATE_DIR": str(state_dir)}
    config = StackConfig.from_env(state_dir=state_dir, extra_env=extra)
    supervisor = Supervisor(config)
    try:
        info = supervisor.up(log=lambda _line: None)
        yield RunningStack(config, info, store_for(info.env), settings_for(info.env))
    finally:
        supervisor.down(log=lambda _line: None)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """One real stack for the whole test session (started on first use)."""
    with running_stack(tmp_path_factory.mktemp("stack") / "state") as running:
        yield running


# --------------------------------------------------------------------------- corpus versions


def drop_record(stack: RunningStack, data: bytes) -> dict[str, Any] | None:
    """``datasets/drops/<content id>.json``: what ingest did with these bytes (None: not yet)."""
    return stack.store.get_json_if_exists(
        stack.settings.buckets.datasets, keys.drop_key(keys.content_id(data))
    )


def version_of(stack: RunningStack, data: bytes, timeout: float = 300.0) -> str | None:
    """The corpus version a drop made, once ingest recorded it (before its job specs are
    written); None if the drop added nothing (status ``nothing_new``). Fails the test if the
    drop is not recorded within `timeout` seconds."""
    record = stack.wait_for(lambda: drop_record(stack, data), timeout, 0.2)
    if record is None:
        pytest.fail(
            f"drop {keys.content_id(data)} not recorded after {timeout:.0f}s: "
            f"{stack.broker_status()}\n--- ingest log\n{stack.log('ingest', 40)}"
        )
    return record.get("version")


def next_version(stack: RunningStack, data: bytes) -> str:
    """The version these bytes will make if appended to the corpus as it is now (head). A
    corpus keeps the split seed and batch size of its first version."""
    datasets = stack.settings.buckets.datasets
    head = stack.store.get_json_if_exists(datasets, keys.CORPUS_HEAD_KEY)
    if head is None:
        parent, split_seed, batch_rows = None, stack.settings.split_seed, stack.settings.batch_rows
    else:
        manifest = stack.store.get_json(datasets, keys.manifest_key(head["version"]))
        parent = head["version"]
        split_seed, batch_rows = int(manifest["split_seed"]), int(manifest["batch_rows"])
    return corpus.version_id(parent, hashlib.sha256(data).hexdigest(), split_seed, batch_rows)


def wait_version_done(stack: RunningStack, version: str, timeout: float) -> dict[str, Any]:
    """``models/<version>/metadata.json`` (the aggregator writes it last, whatever the gate
    decided); fails the test after `timeout` seconds."""
    key = keys.model_metadata_key(version)
    models = stack.settings.buckets.models
    metadata = stack.wait_for(lambda: stack.store.get_json_if_exists(models, key), timeout, 1.0)
    if metadata is None:
        pytest.fail(
            f"version {version} not aggregated after {timeout:.0f}s: {stack.broker_status()}"
            f"\n--- broker log\n{stack.log('broker', 40)}"
            f"\n--- aggregate log\n{stack.log('aggregate', 40)}"
        )
    return metadata


def decision_of(stack: RunningStack, version: str) -> dict[str, Any]:
    """The gate's decision on a version (``models/decisions/<version>.json``)."""
    return stack.store.get_json(stack.settings.buckets.models, keys.decision_key(version))
