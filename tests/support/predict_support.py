"""Test helpers for the predict function: real models on real rows, and a real server process.

Models are the project's own pipeline (`features.build_pipeline`) exported by the real
`onnx_export.export_onnx`, trained on a sample of the UCI file, with metadata shaped exactly as
the aggregator writes it (docs/design.md). `FunctionProcess` runs the real functions-framework
server on a free loopback port.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any

from readmission.localstack.processes import free_port, stop_popen_group

ROOT = Path(__file__).resolve().parents[2]
FUNCTIONS_FRAMEWORK = Path(sys.executable).with_name("functions-framework")


@functools.cache
def sample_frame(every: int = 20) -> Any:
    """Every `every`-th row of the real UCI file, parsed by the contract (pandas)."""
    from readmission.contract import parse_csv
    from readmission.dataset import ensure_dataset, read_dataset_bytes

    os.environ.setdefault("DIABETES_CSV", "../shared/data/diabetic_data.csv.gz")
    lines = read_dataset_bytes(ensure_dataset()).split(b"\r\n")
    rows = [line for line in lines[1:] if line][::every]
    return parse_csv(b"\r\n".join([lines[0], *rows]) + b"\r\n")


def patient_rows(n: int, offset: int = 0, every: int = 20) -> list[dict[str, Any]]:
    """JSON-ready patients (feature -> value) as a client would send them."""
    import math

    from readmission.contract import FEATURES, NUMERIC_FEATURES

    frame = sample_frame(every).iloc[offset : offset + n]
    rows = []
    for record in frame.to_dict("records"):
        row: dict[str, Any] = {}
        for column in FEATURES:
            value = record[column]
            if column in NUMERIC_FEATURES:
                row[column] = None if value is None or math.isnan(value) else int(value)
            else:
                row[column] = None if value is None or value != value else str(value)
        rows.append(row)
    return rows


def tiny_png(
    width: int = 48, height: int = 24, rgb: tuple[int, int, int] = (35, 100, 170)
) -> bytes:
    """A valid solid-colour PNG (stands in for the learning-curve plot)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    raw = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


@functools.cache
def build_per_column_model(
    algorithm: str = "decision_tree", every: int = 20
) -> tuple[bytes, dict[str, Any]]:
    """The model of `build_model` exported as before the packed graph: skl2onnx converting the
    whole pipeline, one [N, 1] input per column (names with '-' renamed by skl2onnx)."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType

    from readmission.contract import FEATURES, NUMERIC_FEATURES
    from readmission.features import build_pipeline, target_values, to_model_frame
    from readmission.onnx_export import TARGET_OPSET

    frame = sample_frame(every)
    pipeline = build_pipeline(algorithm)
    pipeline.fit(to_model_frame(frame), target_values(frame))
    classifier = pipeline[-1]
    model = convert_sklearn(
        pipeline,
        initial_types=[
            (
                c,
                FloatTensorType([None, 1])
                if c in NUMERIC_FEATURES
                else StringTensorType([None, 1]),
            )
            for c in FEATURES
        ],
        options={id(classifier): {"zipmap": False}},
        target_opset=TARGET_OPSET,
        final_types=[
            ("label", StringTensorType([None])),
            ("probabilities", FloatTensorType([None, len(classifier.classes_)])),
        ],
    )
    _, metadata = build_model(algorithm, every=every)
    names = [graph_input.name for graph_input in model.graph.input]
    inputs = []
    for spec, name in zip(metadata["inputs"], names, strict=True):
        spec = {k: v for k, v in spec.items() if k != "index"}
        inputs.append(dict(spec, onnx_name=name))
    onnx_bytes = model.SerializeToString()
    digest = hashlib.sha256(onnx_bytes).hexdigest()
    return onnx_bytes, dict(metadata, inputs=inputs, model_sha256=digest)


def build_model(
    algorithm: str = "decision_tree", version: str = "1", every: int = 20
) -> tuple[bytes, dict[str, Any]]:
    """(ONNX bytes, metadata) of a pipeline fitted on a sample of the real data."""
    from readmission.features import build_pipeline, target_values, to_model_frame
    from readmission.model_artifacts import input_ranges
    from readmission.onnx_export import export_onnx

    frame = sample_frame(every)
    pipeline = build_pipeline(algorithm)
    pipeline.fit(to_model_frame(frame), target_values(frame))
    exported = export_onnx(pipeline, frame.head(200))
    digest = hashlib.sha256(exported.onnx_bytes).hexdigest()
    metadata = {
        "model_name": "diabetes_readmission_model",
        "version": version,
        "run_id": f"run-{version}",
        "dataset_id": "0123456789abcdef",
        "algorithm": algorithm,
        "training_rows": len(frame),
        "cumulative_index": 0,
        "registered_at": "2026-01-01T00:00:00Z",
        "model_bucket": "models",
        "model_key": f"v{version}/model.onnx",
        "model_sha256": digest,
        "classes": list(exported.classes),
        "inputs": exported.inputs,
        "outputs": dict(exported.outputs),
        "input_ranges": input_ranges(to_model_frame(frame)),
        "metrics": {
            "validation": {"f1_weighted": 0.51, "roc_auc_ovr": 0.62, "accuracy": 0.55},
            "test": {"f1_weighted": 0.5, "roc_auc_ovr": 0.61, "accuracy": 0.54},
        },
        "selection_metric": "f1_weighted",
        # as readmission.model_artifacts.build_metadata writes them (figures made up)
        "quality": {
            "ece_bins": 10,
            "positive_class": "<30",
            "validation": {"brier_mean": 0.2101, "positive_recall": 0.1234},
            "test": {
                "brier_mean": 0.2111,
                "ece": {"<30": 0.031, ">30": 0.012, "NO": 0.014},
                "positive_recall": 0.1302,
            },
            "flagged_groups": [
                {
                    "column": "race",
                    "group": "Other",
                    "rows": 600,
                    "recall": 0.01,
                    "overall_recall": 0.1302,
                }
            ],
        },
        "selection": {
            "rule": "leader: highest validation f1_weighted; …",
            "metric": "f1_weighted",
            "leader": "01-decision_tree",
            "selected": "00-decision_tree",
            "tied": ["00-decision_tree", "01-decision_tree"],
            "selected_interval": [-0.0042, 0.0031],
        },
        "learning_curve": {
            "csv": f"v{version}/learning_curve.csv",
            "png": f"v{version}/learning_curve.png",
        },
    }
    return exported.onnx_bytes, metadata


LEARNING_CURVE_CSV = (
    b"cumulative_index,training_rows,decision_tree_f1_weighted,decision_tree_roc_auc_ovr\n"
    b"0,15000,0.5012,0.6101\n1,30000,0.5105,0.6203\n"
)


def write_local_model(
    directory: Path, algorithm: str = "decision_tree", version: str = "1"
) -> tuple[Path, Path]:
    """model.onnx, metadata.json and the learning-curve files in `directory`."""
    onnx_bytes, metadata = build_model(algorithm, version)
    directory.mkdir(parents=True, exist_ok=True)
    model_path = directory / "model.onnx"
    metadata_path = directory / "metadata.json"
    model_path.write_bytes(onnx_bytes)
    (directory / "learning_curve.png").write_bytes(tiny_png())
    (directory / "learning_curve.csv").write_bytes(LEARNING_CURVE_CSV)
    tmp = directory / "metadata.json.tmp"
    tmp.write_text(json.dumps(metadata))
    tmp.replace(metadata_path)  # atomic: a poller never sees half a file
    return model_path, metadata_path


def challenger_metadata(
    version: str = "2", algorithm: str = "logistic_regression"
) -> dict[str, Any]:
    """`challenger/metadata.json` as the gate writes it: a model's metadata (no ONNX needed:
    the predict function only shows it)."""
    metadata = {
        "model_name": "diabetes_readmission_model",
        "version": version,
        "run_id": f"run-{version}",
        "dataset_id": f"{int(version):016x}",
        "algorithm": algorithm,
        "training_rows": 2103,
        "registered_at": "2026-12-04T05:00:00Z",
        "model_bucket": "models",
        "model_key": f"v{version}/model.onnx",
        "selection_metric": "f1_weighted",
        "metrics": {
            "validation": {"f1_weighted": 0.57, "accuracy": 0.58},
            "test": {"f1_weighted": 0.5712, "accuracy": 0.59},
        },
    }
    return metadata


def decision_document(
    verdict: str = "kept", challenger: str = "2", champion: str = "1", sequence: int = 3
) -> dict[str, Any]:
    """`champion/last-decision.json` as the gate writes it."""
    after = champion if verdict == "kept" else challenger
    return {
        "kind": "gate",
        "sequence": sequence,
        "key": "decisions/0123456789abcdef.json",
        "corpus_version": "0123456789abcdef",
        "verdict": verdict,
        "reason": "challenger f1_weighted 0.5712 vs champion 0.5750 on 15,210 test rows: "
        "-0.0038 < margin 0.0020",
        "decided_at": "2026-12-04T05:00:00.000Z",
        "rule": {
            "metric": "f1_weighted",
            "margin": 0.002,
            "resamples": 1000,
            "seed": 42,
            "confidence": 0.95,
        },
        "challenger": {
            "model_version": challenger,
            "corpus_version": "0123456789abcdef",
            "algorithm": "logistic_regression",
            "training_rows": 2103,
            "run_id": f"run-{challenger}",
            "score": 0.5712,
        },
        "champion": {
            "model_version": champion,
            "corpus_version": "00000000000000aa",
            "algorithm": "decision_tree",
            "training_rows": 45000,
            "run_id": f"run-{champion}",
            "score": 0.575,
        },
        "difference": -0.0038,
        "interval": [-0.009, 0.001],
        "rows": 15210,
        "champion_after": {"model_version": after, "corpus_version": "00000000000000aa"},
    }


class FunctionProcess:
    """`functions-framework --target predict` on a free 127.0.0.1 port."""

    def __init__(
        self, env: dict[str, str], source: Path | None = None, target: str = "predict"
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(tempfile.mkstemp(prefix="predict-", suffix=".log")[1])
        command = [
            str(FUNCTIONS_FRAMEWORK),
            f"--target={target}",
            f"--source={source or ROOT / 'functions' / 'predict' / 'main.py'}",
            "--signature-type=http",
            "--host=127.0.0.1",
            f"--port={self.port}",
        ]
        full_env = {**os.environ, "MODEL_POLL_SECONDS": "0.5", **env}
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                command,
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,
            )

    def wait_ready(self, path: str = "/ready", timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"function exited early:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + path, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.url}{path} not ready:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> str:
        """Stop the function (SIGTERM to its process group); what it printed, start to end."""
        stop_popen_group(self.process)
        output = self.log.read_text(errors="replace")
        self.log.unlink(missing_ok=True)
        return output


def reset_after_sending(client: socket.socket) -> bool:
    """Send bytes on a connection whose reply was read to its end. True if the server's kernel
    answers with a reset (the server closed its socket), False if they are read and dropped
    for a second (the server lingers: readmission.glue.http_close, gunicorn's 2 s close_graceful).
    The reset answering one send fails a later one (a read only reports the earlier FIN)."""
    try:
        for _ in range(10):
            client.sendall(b"more")
            time.sleep(0.1)
    except (ConnectionResetError, BrokenPipeError):
        return True
    return False


def http(
    url: str,
    body: Any = None,
    *,
    method: str | None = None,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) without raising on 4xx/5xx."""
    if body is not None:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()
