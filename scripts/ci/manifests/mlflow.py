"""MLflow behind authentication: the server runs MLflow's basic-auth app with its admin taken
from the Secret mlflow-auth and its Flask key from mlflow-server (without which the app does not
start), and every Service that talks to MLflow reads mlflow-auth (whose keys are the ones
MLflow's client sends as HTTP basic credentials)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import _args, by_kind, knative_services, load_docs

AUTH_SECRET = "mlflow-auth"
CLIENT_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
# What the server reads (its admin user, the auth app's Flask key) -> (Secret, key).
SERVER_ENV = {
    "MLFLOW_AUTH_ADMIN_USERNAME": (AUTH_SECRET, "MLFLOW_TRACKING_USERNAME"),
    "MLFLOW_AUTH_ADMIN_PASSWORD": (AUTH_SECRET, "MLFLOW_TRACKING_PASSWORD"),
    "MLFLOW_FLASK_SERVER_SECRET_KEY": ("mlflow-server", "MLFLOW_FLASK_SERVER_SECRET_KEY"),
}
# The Knative Services whose code uses MLflow (the train step and the aggregator).
MLFLOW_CLIENTS = ("train", "aggregate")


def _secret_ref(env: dict[str, Any]) -> tuple[str, str] | None:
    ref = (env.get("valueFrom") or {}).get("secretKeyRef") or {}
    return (ref.get("name"), ref.get("key")) if ref else None


def check_mlflow_auth(root: Path) -> list[str]:
    docs = load_docs(root)
    problems = []
    servers = [d for d in by_kind(docs, "Deployment") if d.name == "mlflow"]
    if not servers:
        problems.append("no Deployment mlflow")
    for doc in servers:
        [container] = doc.obj["spec"]["template"]["spec"]["containers"]
        if _args(container).get("app-name") != "basic-auth":
            problems.append(f"{doc.where}: the server must run --app-name=basic-auth")
        env = {e.get("name"): e for e in container.get("env", [])}
        for name, (secret, key) in SERVER_ENV.items():
            if _secret_ref(env.get(name, {})) != (secret, key):
                problems.append(f"{doc.where}: {name} must come from Secret {secret} {key}")
    secrets = {d.name: d for d in by_kind(docs, "Secret")}
    keys = set((secrets[AUTH_SECRET].obj.get("stringData") or {}) if AUTH_SECRET in secrets else ())
    for key in CLIENT_KEYS:
        if key not in keys:
            problems.append(f"Secret {AUTH_SECRET} lacks {key}")
    services = knative_services(docs)
    for name in MLFLOW_CLIENTS:
        if name not in services:
            problems.append(f"no Knative Service {name}")
            continue
        container = services[name].obj["spec"]["template"]["spec"]["containers"][0]
        refs = {e.get("secretRef", {}).get("name") for e in container.get("envFrom", [])}
        if AUTH_SECRET not in refs:
            problems.append(f"{services[name].where}: envFrom must include secretRef {AUTH_SECRET}")
    return problems
