"""Settings of the predict function, read once from the environment.

Contract: `ServingSettings.from_env()` returns a frozen value or raises ValueError naming the
variable that is wrong; every variable and its default is documented in docs/predict.md. No
other serving module reads the environment for these settings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from readmission import env

POLICIES = ("reject", "unseen")  # UNKNOWN_CATEGORY_POLICY values


@dataclass(frozen=True)
class ServingSettings:
    """Settings of the predict function (env var -> default, documented in docs/predict.md)."""

    model_path: str = ""  # MODEL_PATH: local ONNX file (with MODEL_METADATA_PATH): no store
    metadata_path: str = ""  # MODEL_METADATA_PATH
    poll_seconds: float = 10.0  # MODEL_POLL_SECONDS: 0 disables hot swap
    unknown_category_policy: str = "reject"  # UNKNOWN_CATEGORY_POLICY: reject | unseen
    batch_limit: int = 1000  # PREDICT_BATCH_LIMIT
    max_body_bytes: int = 2 * 1024 * 1024  # PREDICT_MAX_BODY_BYTES
    intra_op_threads: int = 1  # ORT_INTRA_OP_THREADS
    # THREADS: gunicorn's threads per worker (functions-framework reads it; its default is
    # cores x 4). With one, a worker answers one request at a time, and single rows skip the
    # micro-batcher, which only helps rows of concurrent requests meet.
    request_threads: int = (os.cpu_count() or 1) * 4
    load_mode: str = "eager"  # MODEL_LOAD: eager (at import, before the port opens) | background
    # The prediction log (readmission.serving.prediction_log): PREDICTION_LOG on | off; a batch
    # is written every PREDICTION_LOG_ROWS rows or PREDICTION_LOG_SECONDS, whichever is first;
    # PREDICTION_LOG_DIR: the workers' spool files (default: a new temporary directory per
    # server; a volume that outlives the server lets a restarted one ship what was left);
    # PREDICTION_LOG_SPOOL_MB: the unread spool a worker may leave before it waits for the
    # master (readmission.serving.log_spool, Bound).
    prediction_log: bool = True
    prediction_log_rows: int = 1000
    prediction_log_seconds: float = 30.0
    prediction_log_dir: str = ""
    prediction_log_spool_mb: float = 64.0

    @classmethod
    def from_env(cls) -> ServingSettings:
        policy = env.text("UNKNOWN_CATEGORY_POLICY", cls.unknown_category_policy).lower()
        if policy not in POLICIES:
            raise ValueError(f"UNKNOWN_CATEGORY_POLICY must be one of {POLICIES}, got {policy!r}")
        load_mode = env.text("MODEL_LOAD", cls.load_mode).lower()
        if load_mode not in ("eager", "background"):
            raise ValueError(f"MODEL_LOAD must be eager or background, got {load_mode!r}")
        prediction_log = env.text("PREDICTION_LOG", "on").lower()
        if prediction_log not in ("on", "off"):
            raise ValueError(f"PREDICTION_LOG must be on or off, got {prediction_log!r}")
        model_path = env.text("MODEL_PATH", "")
        metadata_path = env.text("MODEL_METADATA_PATH", "")
        if bool(model_path) != bool(metadata_path):
            raise ValueError("set both MODEL_PATH and MODEL_METADATA_PATH, or neither")
        return cls(
            model_path=model_path,
            metadata_path=metadata_path,
            poll_seconds=env.number("MODEL_POLL_SECONDS", cls.poll_seconds, minimum=0),
            unknown_category_policy=policy,
            batch_limit=env.integer("PREDICT_BATCH_LIMIT", cls.batch_limit, minimum=1),
            max_body_bytes=env.integer("PREDICT_MAX_BODY_BYTES", cls.max_body_bytes, minimum=1),
            intra_op_threads=env.integer("ORT_INTRA_OP_THREADS", cls.intra_op_threads, minimum=1),
            request_threads=env.integer("THREADS", cls.request_threads, minimum=1),
            load_mode=load_mode,
            prediction_log=prediction_log == "on",
            prediction_log_rows=env.integer(
                "PREDICTION_LOG_ROWS", cls.prediction_log_rows, minimum=1
            ),
            prediction_log_seconds=env.number(
                "PREDICTION_LOG_SECONDS", cls.prediction_log_seconds, minimum=0.01
            ),
            prediction_log_dir=env.text("PREDICTION_LOG_DIR", cls.prediction_log_dir),
            prediction_log_spool_mb=env.number(
                "PREDICTION_LOG_SPOOL_MB", cls.prediction_log_spool_mb, minimum=1
            ),
        )
