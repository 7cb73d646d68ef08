"""A real MLflow tracking server on a free loopback port, for tests and benchmarks.

`mlflow server` with a SQLite backend store and a local artifact root, both in a temp dir
(MLflow 3.17 refuses the plain file store). `MlflowServer` works without pytest (scripts use
it); `mlflow_server` is a module-scoped pytest fixture yielding a running server.
`logged_model_dir` and `rewritten` tamper with a logged model in its artifact store, as anyone
who can write MLflow's artifacts could.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from readmission.localstack.processes import free_port, stop_popen_group

MLFLOW = Path(sys.executable).with_name("mlflow")


class MlflowServer:
    """`mlflow server --backend-store-uri sqlite:///… --default-artifact-root …` on 127.0.0.1."""

    def __init__(self, workers: int = 1) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="mlflow-server-"))
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.workers = workers
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "mlflow.log"

    def command(self) -> list[str]:
        return [
            str(MLFLOW),
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.workdir / 'mlflow.db'}",
            "--default-artifact-root",
            str(self.workdir / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
        ]

    def start(self, timeout: float = 120.0) -> MlflowServer:
        log = self.log_path.open("wb")
        # No huey job runners (8 extra processes, ~2 GB): tracking and artifacts need none.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.process = subprocess.Popen(
            self.command(),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,  # its own process group: stop() ends its workers too
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited early; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server not ready after {timeout:.0f}s; see {self.log_path}")

    def stop(self) -> None:
        if self.process is not None:
            stop_popen_group(self.process)
        self.process = None
        if not os.environ.get("KEEP_MLFLOW_DIR"):
            shutil.rmtree(self.workdir, ignore_errors=True)


def logged_model_dir(client: Any, run_id: str) -> Path:
    """The directory of the server's artifact store (on this machine) holding the files of
    the run's logged model: where anyone who can write MLflow's artifacts could rewrite them."""
    [output] = client.get_run(run_id).outputs.model_outputs
    location = str(client.get_logged_model(output.model_id).artifact_location)
    directory = Path(location.removeprefix("file://"))
    if not (directory / "MLmodel").is_file():
        raise RuntimeError(f"run {run_id}'s model is not in a local artifact store: {location}")
    return directory


@contextmanager
def rewritten(path: Path, content: bytes) -> Iterator[bytes]:
    """`path` holds `content` while inside (yields the original bytes, restored after)."""
    original = path.read_bytes()
    path.write_bytes(content)
    try:
        yield original
    finally:
        path.write_bytes(original)


@pytest.fixture(scope="module")
def mlflow_server() -> Iterator[MlflowServer]:
    if not MLFLOW.exists():
        pytest.fail(f"mlflow not found at {MLFLOW}: install the project's pipeline extras")
    server = MlflowServer().start()
    try:
        yield server
    finally:
        server.stop()
