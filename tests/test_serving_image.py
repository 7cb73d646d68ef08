"""The serving image's dependency set: the project's base dependencies only.

The Dockerfile installs `pip install /src` (no extras) for predict, events-adapter,
dead-letter and reconcile. This test does the same in a fresh virtualenv (non-editable, from a
copy of the files the Dockerfile copies), then checks that scikit-learn, pandas, pyarrow,
mlflow and the other pipeline-only packages are absent and that the serving functions load and
answer through functions-framework exactly as `functions-framework --target ... --source ...`
loads them. About 30 s with a warm pip cache (up to 2 min on a busy machine).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PIPELINE_ONLY = ("sklearn", "pandas", "pyarrow", "mlflow", "skl2onnx", "onnx", "matplotlib")

PROBE = textwrap.dedent(
    """
    import importlib.util, json, os, sys

    present = [m for m in sys.argv[1].split(",") if importlib.util.find_spec(m) is not None]
    import readmission, readmission.config, readmission.keys, readmission.storage
    import readmission.glue.event_handler
    report = {"present": present, "readmission": readmission.__file__, "prefix": sys.prefix,
              "functions": {}}
    os.chdir(sys.argv[2])  # the image's WORKDIR: functions/ and events/ below it
    from functions_framework import create_app
    for name, target, source, signature, probe in json.loads(sys.argv[3]):
        if not os.path.exists(source):
            report["functions"][name] = "missing"
            continue
        app = create_app(target, source, signature)
        client = app.test_client()
        status = {}
        for path in probe:
            response = client.get(path)
            status[path] = [response.status_code, response.get_data(as_text=True)[:4000]]
        report["functions"][name] = status
    # Loading the serving functions must not have pulled a pipeline-only module in either.
    report["loaded"] = sorted(m for m in sys.argv[1].split(",") if m in sys.modules)
    print(json.dumps(report))
    """
)

SERVING_FUNCTIONS = [
    # name, target, source, signature, GET paths to probe
    ("predict", "predict", "functions/predict/main.py", "http", ["/health", "/metrics"]),
    ("events-adapter", "adapter", "functions/events-adapter/main.py", "http", ["/"]),
    ("dead-letter", "dead_letter", "functions/dead-letter/main.py", "cloudevent", []),
    ("reconcile", "reconcile_ping", "functions/reconcile/main.py", "cloudevent", []),
]


@pytest.mark.slow
def test_base_dependency_set_serves_without_pipeline_packages(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(ROOT / "pyproject.toml", source / "pyproject.toml")
    # pyproject.toml names README.md as the readme (the Dockerfile copies it too).
    readme = ROOT / "README.md"
    (source / "README.md").write_text(
        readme.read_text(encoding="utf-8") if readme.exists() else "readmission\n",
        encoding="utf-8",
    )
    for package in ("readmission", "events"):
        shutil.copytree(
            ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--quiet",
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stdout + install.stderr

    workdir = tmp_path / "app"  # like the image: /app holds functions/ and events/ only
    shutil.copytree(
        ROOT / "functions", workdir / "functions", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copytree(
        ROOT / "events", workdir / "events", ignore=shutil.ignore_patterns("__pycache__")
    )
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        # Nothing listens on port 9: the model source fails fast; predict must still start.
        "S3_ENDPOINT_URL": "http://127.0.0.1:9",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test-secret",
        "AWS_EC2_METADATA_DISABLED": "true",
        "MODEL_LOAD": "background",
        "MODEL_POLL_SECONDS": "0",
        "K_SINK": "http://127.0.0.1:9/",
    }
    probe = subprocess.run(
        [
            str(python),
            "-I",
            "-c",
            PROBE,
            ",".join(PIPELINE_ONLY),
            str(workdir),
            json.dumps(SERVING_FUNCTIONS),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert probe.returncode == 0, probe.stdout + probe.stderr
    report = json.loads(probe.stdout.strip().splitlines()[-1])

    assert report["present"] == [], f"pipeline-only packages in the base set: {report['present']}"
    assert report["loaded"] == []
    # The installed (non-editable) package, not the source tree, was imported.
    assert Path(report["readmission"]).resolve().is_relative_to(Path(report["prefix"]).resolve())

    functions = report["functions"]
    missing = [name for name, status in functions.items() if status == "missing"]
    assert "predict" not in missing, "functions/predict/main.py is missing"
    predict = functions["predict"]
    assert predict["/health"][0] == 200
    assert predict["/metrics"][0] == 200
    for metric in ("predict_requests_total", "predict_latency_seconds", "predict_model_info"):
        assert (
            metric in predict["/metrics"][1]
            or metric.removesuffix("_total") in predict["/metrics"][1]
        )
    if "events-adapter" not in missing:
        assert functions["events-adapter"]["/"][0] == 200
