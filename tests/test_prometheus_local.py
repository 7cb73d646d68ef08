"""The local stack's Prometheus: the manifests' alert rules, loaded by a real Prometheus that
scrapes a real predict function, fire on real data and are read from Prometheus' HTTP API.

Lean: one SeaweedFS, one predict process and one Prometheus (no full stack). The rules file
and config are the ones the stack generates (readmission.localstack.prometheus), with every
`for:` shortened to 0s (PROMETHEUS_RULE_FOR) and a 0.5 s scrape and evaluation interval.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from support.predict_support import FunctionProcess, build_model, http, patient_rows
from support.seaweed_server import SeaweedServer

from readmission.config import Buckets, Settings
from readmission.localstack import prometheus
from readmission.localstack.processes import free_port, stop_popen_group
from readmission.outcomes import process_outcomes, read_log
from readmission.storage import ObjectStore

ROOT = Path(__file__).resolve().parents[1]


def _alerts(url: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{url}/api/v1/alerts", timeout=5) as response:
        return json.loads(response.read())["data"]["alerts"]


def _firing(url: str, name: str) -> list[dict[str, Any]]:
    return [a for a in _alerts(url) if a["labels"]["alertname"] == name and a["state"] == "firing"]


def _ready(url: str) -> bool:
    try:
        return http(f"{url}/-/ready", timeout=2)[0] == 200
    except OSError:  # not listening yet
        return False


def _wait(condition: Any, timeout: float, what: str, log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.25)
    raise AssertionError(
        f"{what} after {timeout:.0f}s; prometheus said:\n{log.read_text()[-3000:]}"
    )


def test_the_manifest_rules_fire_in_a_real_prometheus_on_scraped_predict_metrics() -> None:
    executable = prometheus.binary()
    if executable is None:
        pytest.skip(f"prometheus is not installed ({prometheus.INSTALL_HINT})")
    seaweed = SeaweedServer().start()
    buckets = Buckets()
    settings = Settings(s3_endpoint_url=seaweed.endpoint_url, buckets=buckets)
    store = ObjectStore.connect(
        seaweed.endpoint_url, "us-east-1", seaweed.access_key, seaweed.secret_key
    )
    store.ensure_buckets([buckets.models, buckets.predictions_log, buckets.outcomes])
    # a champion whose offline test F1 is far above what its predictions will realize
    onnx_bytes, metadata = build_model("decision_tree", "7")
    metadata["metrics"]["test"]["f1_weighted"] = 0.99
    store.put_bytes(buckets.models, metadata["model_key"], onnx_bytes)
    store.put_bytes(buckets.models, "champion/metadata.json", json.dumps(metadata).encode())
    env = {**seaweed.env(), "WORKERS": "1", "THREADS": "1", "PREDICTION_LOG_SECONDS": "0.2"}
    predict = FunctionProcess(env)
    directory = Path(tempfile.mkdtemp(prefix="prometheus-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = directory / "prometheus.log"
    server: subprocess.Popen[bytes] | None = None
    try:
        predict.wait_ready()
        host = predict.url.removeprefix("http://")
        prometheus.write_config(directory, ROOT, {"predict": [host]}, 0.5, rule_for="0s")
        with log.open("wb") as output:
            server = subprocess.Popen(
                prometheus.command(executable, directory, "127.0.0.1", port),
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait(lambda: _ready(url), 30, "not ready", log)
        loaded = json.loads(http(f"{url}/api/v1/rules")[2])["data"]["groups"]
        names = {rule["name"] for group in loaded for rule in group["rules"]}
        assert {"PredictHighErrorRate", "ReadmissionRealizedF1BelowOffline"} <= names
        assert not _firing(url, "PredictHighErrorRate")

        # the error-rate rule: requests the function refuses, until Prometheus fires it
        rows = patient_rows(3)
        bad = {"features": {**rows[0], "time_in_hospital": "a week"}}

        def error_rate_fires() -> list[dict[str, Any]]:
            for _ in range(10):
                assert http(predict.url + "/predict", bad)[0] == 422  # a refused row
            return _firing(url, "PredictHighErrorRate")

        _wait(error_rate_fires, 60, "PredictHighErrorRate never fired", log)

        # the realized-F1 rule: predictions the function logs, their true outcomes, the realized
        # document it exports; realized F1 is far below the 0.99 of the test split
        truth = "request_id,readmitted\n"
        for index, row in enumerate(rows):
            request = {"X-Request-Id": f"r{index}"}
            status, _, body = http(predict.url + "/predict", {"features": row}, headers=request)
            assert status == 200
            probabilities = json.loads(body)["probabilities"]
            truth += f"r{index},{min(probabilities, key=probabilities.get)}\n"  # never right
        _wait(
            lambda: (
                set(read_log(store, buckets.predictions_log)["request_id"]) >= {"r0", "r1", "r2"}
            ),
            30,
            "the predictions were never logged",
            log,
        )
        assert not _firing(url, "ReadmissionRealizedF1BelowOffline")
        store.put_bytes(buckets.outcomes, "truth.csv", truth.encode())
        realized = process_outcomes(store, settings, buckets.outcomes, "truth.csv")
        (group,) = realized.document["groups"]
        gap = group["realized_minus_offline"]["f1_weighted"]
        assert gap < -0.05
        (alert,) = _wait(
            lambda: _firing(url, "ReadmissionRealizedF1BelowOffline"),
            60,
            "ReadmissionRealizedF1BelowOffline never fired",
            log,
        )
        assert alert["labels"]["model_version"] == "7"
        assert float(alert["value"]) == pytest.approx(gap, abs=1e-9)
        # the replica has its champion: the `pod` label the stack gives its targets joins
        assert not _firing(url, "PredictNoChampionLoaded")
    finally:
        if server is not None:
            stop_popen_group(server)
        predict.stop()
        seaweed.stop()
        shutil.rmtree(directory, ignore_errors=True)
