"""Configuration: every ConfigMap/Secret (and key) a workload reads is defined, the ConfigMap
sets every setting of readmission/config.py, the Secret template holds no value."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .common import Doc, by_kind, knative_dir, load_docs

# Settings read by readmission/config.py that the cluster does not set in the ConfigMap.
SETTINGS_NOT_IN_CONFIGMAP = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "STATE_DIR"}


def _workloads(docs: Iterable[Doc]) -> Iterator[tuple[Doc, dict[str, Any]]]:
    """(doc, container) for every container of every workload."""
    for doc in docs:
        spec = doc.obj.get("spec", {})
        if (
            doc.kind == "Service" and doc.api_version.startswith("serving.knative.dev/")
        ) or doc.kind in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
            pod = spec.get("template", {}).get("spec", {})
        elif doc.kind == "CronJob":
            pod = spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec", {})
        elif doc.kind == "JobSink":
            pod = spec.get("job", {}).get("spec", {}).get("template", {}).get("spec", {})
        else:
            continue
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            yield doc, container


def settings_env_vars(root: Path) -> set[str]:
    text = (root / "readmission" / "config.py").read_text(encoding="utf-8")
    return set(
        re.findall(r"\benv\.(?:text|number|seconds|integer|flag)\(\s*\"([A-Z0-9_]+)\"", text)
    )


def secret_template_docs(root: Path) -> list[Doc]:
    return by_kind(load_docs(root, [knative_dir(root) / "secret.template.yaml"]), "Secret")


def check_config_refs(root: Path) -> list[str]:
    docs = load_docs(root)
    configmaps = {d.name: set(d.obj.get("data") or {}) for d in by_kind(docs, "ConfigMap")}
    secrets = {
        d.name: set(d.obj.get("stringData") or {}) | set(d.obj.get("data") or {})
        for d in by_kind(docs, "Secret")
    }
    problems = []
    for doc, container in _workloads(docs):
        where = f"{doc.where} container {container.get('name')}"
        for source in container.get("envFrom", []):
            for kind, store in (("configMapRef", configmaps), ("secretRef", secrets)):
                if kind in source and source[kind].get("name") not in store:
                    problems.append(
                        f"{where}: envFrom {kind} {source[kind].get('name')!r} undefined"
                    )
        for env in container.get("env", []):
            value_from = env.get("valueFrom") or {}
            for kind, store in (("configMapKeyRef", configmaps), ("secretKeyRef", secrets)):
                if kind not in value_from:
                    continue
                ref = value_from[kind]
                if ref.get("name") not in store:
                    problems.append(f"{where}: {env['name']}: {kind} {ref.get('name')!r} undefined")
                elif ref.get("key") not in store[ref["name"]]:
                    problems.append(
                        f"{where}: {env['name']}: key {ref.get('key')!r} not in {ref['name']}"
                    )
            if "value" in env and re.search(r"PASSWORD|SECRET|ACCESS_KEY", env["name"]):
                problems.append(f"{where}: {env['name']} has a literal value (use a Secret)")
    settings = configmaps.get("readmission-settings", set())
    for name in sorted(settings_env_vars(root) - SETTINGS_NOT_IN_CONFIGMAP - settings):
        problems.append(
            f"ConfigMap readmission-settings does not set {name} (readmission/config.py)"
        )
    problems += _check_jobsink_settings(docs)
    s3 = secrets.get("readmission-s3", set())
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        if key not in s3:
            problems.append(f"Secret readmission-s3 lacks {key}")
    return problems


def _check_jobsink_settings(docs: list[Doc]) -> list[str]:
    """TRAIN_JOBSINK_URL names a JobSink of the manifests, whose Job deadline is the
    ConfigMap's TRAIN_JOB_DEADLINE_SECONDS (readmission/fit_handoff.py)."""
    configmaps = [d for d in by_kind(docs, "ConfigMap") if d.name == "readmission-settings"]
    data = configmaps[0].obj.get("data") or {} if configmaps else {}
    url = str(data.get("TRAIN_JOBSINK_URL") or "")
    if not url:
        return []
    sinks = {(d.obj["metadata"].get("namespace"), d.name): d for d in by_kind(docs, "JobSink")}
    namespace, _, name = url.split("://", 1)[-1].partition("/")[2].partition("/")
    sink = sinks.get((namespace, name))
    if sink is None:
        return [f"TRAIN_JOBSINK_URL {url} names no JobSink {namespace}/{name} of the manifests"]
    deadline = sink.obj["spec"]["job"]["spec"].get("activeDeadlineSeconds")
    if str(deadline) != str(data.get("TRAIN_JOB_DEADLINE_SECONDS")):
        return [
            f"{sink.where}: activeDeadlineSeconds {deadline} is not the ConfigMap's "
            f"TRAIN_JOB_DEADLINE_SECONDS {data.get('TRAIN_JOB_DEADLINE_SECONDS')}"
        ]
    return []


def check_no_secrets(root: Path) -> list[str]:
    """Secrets only as the empty template; deploy.sh creates every key of it."""
    problems = []
    deploy = (root / "scripts" / "deploy.sh").read_text(encoding="utf-8")
    for doc in load_docs(root):
        if doc.kind != "Secret":
            continue
        if doc.path.name != "secret.template.yaml":
            problems.append(f"{doc.where}: Secrets belong in secret.template.yaml only")
        if doc.obj.get("data"):
            problems.append(f"{doc.where}: the template must not have data (use empty stringData)")
        for key, value in (doc.obj.get("stringData") or {}).items():
            if value not in ("", None):
                problems.append(f"{doc.where}: {key} has a value; the template must stay empty")
            if not re.search(rf"\b{re.escape(key)}\b", deploy):
                problems.append(f"{doc.where}: scripts/deploy.sh does not create {key}")
        if not re.search(rf"\b{re.escape(doc.name)}\b", deploy):
            problems.append(f"{doc.where}: scripts/deploy.sh does not create Secret {doc.name}")
    return problems
