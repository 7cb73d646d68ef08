"""scripts/loadtest.sh with hey against the real predict function (functions-framework)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.predict_support import ROOT, FunctionProcess, write_local_model

from readmission.localstack.processes import free_port

LOADTEST = ROOT / "scripts" / "loadtest.sh"
pytestmark = pytest.mark.skipif(
    shutil.which("hey") is None, reason="hey not installed (Debian package hey)"
)


@pytest.fixture(scope="module")
def function_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    model, metadata = write_local_model(tmp_path_factory.mktemp("loadtest-model"))
    process = FunctionProcess(
        {"MODEL_PATH": str(model), "MODEL_METADATA_PATH": str(metadata), "WORKERS": "2"}
    )
    try:
        process.wait_ready()
        yield process.url
    finally:
        process.stop()


def _loadtest(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    run_env = {k: v for k, v in os.environ.items() if k not in ("PREDICT_URL", "STATE_DIR")}
    done = subprocess.run(
        ["bash", str(LOADTEST), *args],
        env={**run_env, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, done.stdout + done.stderr


def _summary(output: str) -> dict[str, str]:
    return dict(re.findall(r"^(\w+):\s+(.+)$", output, re.M))


def test_a_run_against_the_function_prints_the_summary_and_succeeds(function_url: str) -> None:
    code, output = _loadtest(function_url, "-c", "4", "-z", "2s")
    summary = _summary(output)
    assert code == 0, output
    assert summary["tool"] == "hey" and summary["target"] == function_url + "/predict"
    assert int(summary["requests"]) > 0 and float(summary["throughput"].split()[0]) > 0
    assert re.fullmatch(r"p50=[\d.]+ p90=[\d.]+ p99=[\d.]+", summary["latency_ms"])
    assert summary["errors"] == "0"


def test_without_a_url_it_targets_the_local_stack_from_its_env_file(
    function_url: str, tmp_path: Path
) -> None:
    (tmp_path / "env").write_text(f"export PREDICT_URL='{function_url}'\n")
    code, output = _loadtest("-c", "2", "-z", "1s", env={"STATE_DIR": str(tmp_path)})
    assert code == 0, output
    assert _summary(output)["target"] == function_url + "/predict"


def test_failed_requests_are_counted_and_fail_the_run() -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    code, output = _loadtest(closed, "-c", "2", "-n", "20")
    assert code == 1, output
    assert int(_summary(output)["errors"]) > 0


def test_only_loopback_targets_are_accepted() -> None:
    code, output = _loadtest("http://192.0.2.1:8080", "-z", "1s")
    assert code == 2 and "loopback targets only" in output
