"""Prediction-log parts as a predict server ships them, under any (version, day) prefix."""

from __future__ import annotations

import itertools

from readmission.serving.prediction_log import PredictionLog
from readmission.storage import ObjectStore

CLASSES = ("<30", ">30", "NO")
_ENCOUNTERS = itertools.count(1000)


def ship_parts(
    store: ObjectStore, bucket: str, prefix: str, parts: int, writer: str = "host-1-abcd"
) -> None:
    """`parts` log objects of two single-row requests each under `<prefix>/`, written by the
    predict function's own writer (every encounter id distinct within the process); part
    names never repeat, as a server's (a writer id is unique per process)."""
    rows = 2
    shipped: list[bytes] = []
    log = PredictionLog(lambda key, data: shipped.append(data), rows=10**6, seconds=3600)
    try:
        for _ in range(parts):
            for _ in range(rows):
                n = next(_ENCOUNTERS)
                row = {"age": "[70-80)", "encounter_id": n}
                log.record_rows(f"r{n}", "1", CLASSES, "predict", ["NO"], [[0.2, 0.3, 0.5]], [row])
            log.flush()
    finally:
        log.close()
    for i, data in enumerate(shipped):
        store.put_bytes(bucket, f"{prefix}/{writer}-{i:06d}.parquet", data)
