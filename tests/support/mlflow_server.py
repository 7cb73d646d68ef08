"""A real MLflow tracking server on a free loopback port, for tests and benchmarks.

`mlflow server` with a SQLite backend store and a local artifact root, both in a temp dir
(MLflow 3.17 refuses the plain file store). `MlflowServer` works without pytest (scripts use
it); `mlflow_server` is a module-scoped pytest fixture yielding a running server.
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
from pathlib import Path

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


@pytest.fixture(scope="module")
def mlflow_server() -> Iterator[MlflowServer]:
    if not MLFLOW.exists():
        pytest.fail(f"mlflow not found at {MLFLOW}: install the project's pipeline extras")
    server = MlflowServer().start()
    try:
        yield server
    finally:
        server.stop()
