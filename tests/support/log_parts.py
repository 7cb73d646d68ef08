"""Prediction-log parts as a predict server ships them, under any (version, day) prefix."""

from __future__ import annotations

import itertools

from readmission.serving.prediction_log import PredictionLog
from readmission.storage import ObjectStore

CLASSES = ("<30", ">30", "NO")
ROW = {"age": "[70-80)", "gender": "Female", "num_medications": 14}
_ENCOUNTERS = itertools.count(1000)


def ship_parts(
    store: ObjectStore,
    bucket: str,
    prefix: str,
    parts: int,
    writer: str = "host-1-abcd",
    rows_per_part: int = 2,
) -> list[int]:
    """`parts` log objects of `rows_per_part` single-row requests each under `<prefix>/`,
    written by the predict function's own writer; the encounter ids of their rows (every one
    distinct within the process). Part names never repeat, as a server's (a writer id is unique
    per process)."""
    shipped: list[bytes] = []
    encounters: list[int] = []
    log = PredictionLog(lambda key, data: shipped.append(data), rows=10**6, seconds=3600)
    try:
        for _ in range(parts):
            for _ in range(rows_per_part):
                n = next(_ENCOUNTERS)
                encounters.append(n)
                row = {**ROW, "encounter_id": n}
                log.record_rows(f"r{n}", "1", CLASSES, "predict", ["NO"], [[0.2, 0.3, 0.5]], [row])
            log.flush()
    finally:
        log.close()
    for i, data in enumerate(shipped):
        store.put_bytes(bucket, f"{prefix}/{writer}-{i:06d}.parquet", data)
    return encounters
