"""Locust load profile for the predict function: varied, realistic patients.

    locust -f scripts/lib/locustfile.py --host http://127.0.0.1:8080 --headless -u 16 -r 16 -t 30s

(or `scripts/loadtest.sh --locust`). Patients come from the JSON file in env LOCUST_PATIENTS
(default .state/loadtest/patients.json, written once by `scripts/export_patients.py` from the
test split in the datasets bucket or from the UCI file), so Locust needs no pandas at run time.
Without that file it varies the built-in example patient. Env LOCUST_BATCH_SHARE (default 0)
is the share of requests sent to /predict/batch with LOCUST_BATCH_SIZE (default 20) patients.
Loopback targets only: the run stops at once for any other host. Env LOCUST_HOST_HEADER sets
a "Host:" header (Knative routing through a port-forwarded ingress).
"""

from __future__ import annotations

import json
import os
import random
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from locust import HttpUser, between, events, task

ROOT = Path(__file__).resolve().parents[2]
PATIENTS_FILE = Path(os.environ.get("LOCUST_PATIENTS", ROOT / ".state/loadtest/patients.json"))
BATCH_SHARE = float(os.environ.get("LOCUST_BATCH_SHARE", "0"))
BATCH_SIZE = int(os.environ.get("LOCUST_BATCH_SIZE", "20"))
# "Host:" header for Knative routing through a port-forwarded ingress (loadtest.sh --host-header)
HEADERS = {"Host": os.environ["LOCUST_HOST_HEADER"]} if os.environ.get("LOCUST_HOST_HEADER") else {}
LOOPBACK = ("127.", "localhost", "::1")


def _patients() -> list[dict[str, Any]]:
    if PATIENTS_FILE.exists():
        patients = json.loads(PATIENTS_FILE.read_text())
        if isinstance(patients, list) and patients:
            return patients
    import sys

    sys.path.insert(0, str(ROOT))
    from readmission.serving.examples import EXAMPLE_PATIENT

    rng = random.Random(42)
    varied = []
    for _ in range(200):
        patient = dict(EXAMPLE_PATIENT)
        patient["time_in_hospital"] = rng.randint(1, 14)
        patient["num_lab_procedures"] = rng.randint(1, 100)
        patient["num_medications"] = rng.randint(1, 60)
        patient["number_inpatient"] = rng.choice([0, 0, 0, 1, 2, 3])
        patient["number_emergency"] = rng.choice([0, 0, 0, 0, 1, 2])
        patient["gender"] = rng.choice(["Female", "Male"])
        patient["age"] = rng.choice(["[50-60)", "[60-70)", "[70-80)", "[80-90)"])
        patient["insulin"] = rng.choice(["No", "Steady", "Up", "Down"])
        varied.append(patient)
    return varied


PATIENTS = _patients()


def _known_only(patients: list[dict[str, Any]], info: dict[str, Any]) -> list[dict[str, Any]]:
    """Patients whose categories the served model knows (the default policy rejects others)."""
    known = {
        i["column"]: set(i["categories"]) | {"?", ""}
        for i in info.get("inputs", [])
        if i.get("categories")
    }
    return [
        p
        for p in patients
        if all(p.get(c) is None or p.get(c) in values for c, values in known.items())
    ]


@events.test_start.add_listener
def _prepare(environment: Any, **_: Any) -> None:
    host = urlsplit(environment.host or "").hostname or ""
    if not host.startswith(LOOPBACK):
        environment.runner.quit()
        raise SystemExit(f"refusing to load-test {host!r}: loopback targets only")
    request = urllib.request.Request(environment.host.rstrip("/") + "/model-info", headers=HEADERS)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            info = json.loads(response.read())
    except (OSError, ValueError) as exc:
        print(f"locustfile: /model-info unavailable ({exc}); sending every patient")
        return
    kept = _known_only(PATIENTS, info)
    if kept:
        print(f"locustfile: {len(kept)} of {len(PATIENTS)} patients use known categories")
        PATIENTS[:] = kept


class Patient(HttpUser):
    wait_time = between(0, 0)

    @task
    def predict(self) -> None:
        if BATCH_SHARE and random.random() < BATCH_SHARE:
            body = {"instances": random.sample(PATIENTS, min(BATCH_SIZE, len(PATIENTS)))}
            self.client.post("/predict/batch", json=body, name="/predict/batch", headers=HEADERS)
        else:
            self.client.post(
                "/predict",
                json={"features": random.choice(PATIENTS)},
                name="/predict",
                headers=HEADERS,
            )
