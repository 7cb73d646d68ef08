"""Schemas: built-in kinds against the Kubernetes OpenAPI schemas (kubernetes-validate,
offline), Knative and Prometheus Operator kinds against their CRD schemas (node,
scripts/ci/knative-validate/)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .common import (
    KNATIVE_REVISION_FIELDS,
    KUBERNETES_VERSIONS,
    NAMESPACE,
    Doc,
    is_crd_kind,
    load_docs,
)

# The node validator is a tool of this script, not part of the checked repository.
VALIDATOR_DIR = Path(__file__).resolve().parents[1] / "knative-validate"


def _pod_from_revision_template(doc: Doc) -> dict[str, Any]:
    template = doc.obj.get("spec", {}).get("template", {})
    spec = {k: v for k, v in template.get("spec", {}).items() if k not in KNATIVE_REVISION_FIELDS}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{doc.name}-template", "namespace": NAMESPACE},
        "spec": spec,
    }


def _job_from_jobsink(doc: Doc) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": f"{doc.name}-job", "namespace": NAMESPACE},
        "spec": doc.obj.get("spec", {}).get("job", {}).get("spec", {}),
    }


def check_kubernetes_schemas(
    root: Path, versions: Iterable[str] = KUBERNETES_VERSIONS
) -> list[str]:
    """Built-in kinds, strictly, against kubernetes-validate's offline schemas."""
    import kubernetes_validate

    problems = []
    for doc in load_docs(root):
        targets: list[tuple[str, dict[str, Any]]] = []
        if not is_crd_kind(doc):
            targets.append((doc.where, doc.obj))
        elif doc.kind == "Service" and doc.api_version.startswith("serving.knative.dev/"):
            targets.append(
                (f"{doc.where} (pod template as PodSpec)", _pod_from_revision_template(doc))
            )
        elif doc.kind == "JobSink" and doc.api_version.startswith("sinks.knative.dev/"):
            targets.append((f"{doc.where} (job as a batch/v1 Job)", _job_from_jobsink(doc)))
        for where, obj in targets:
            for version in versions:
                try:
                    kubernetes_validate.validate(obj, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    path = "/".join(str(p) for p in exc.path)
                    problems.append(f"{where}: Kubernetes {version}: /{path}: {exc.message}")
                except kubernetes_validate.SchemaNotFoundError as exc:
                    problems.append(f"{where}: no Kubernetes {version} schema: {exc}")
    return problems


class ValidatorUnavailable(RuntimeError):
    """node or the npm validator packages are not installed."""


def ensure_crd_validator(install: bool = True) -> str:
    """Path of node, after `npm ci` in scripts/ci/knative-validate if node_modules is missing."""
    node = shutil.which("node")
    if node is None:
        raise ValidatorUnavailable("node is not installed (apt-get install nodejs npm)")
    marker = VALIDATOR_DIR / "node_modules" / "@kubernetes-models" / "knative" / "package.json"
    if not marker.exists():
        npm = shutil.which("npm")
        if not install or npm is None:
            raise ValidatorUnavailable(f"run `npm ci --prefix {VALIDATOR_DIR}` first")
        result = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=VALIDATOR_DIR,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode != 0 or not marker.exists():
            raise ValidatorUnavailable(f"npm ci failed: {result.stderr.strip()[-2000:]}")
    return node


def check_crd_schemas(root: Path, install: bool = True) -> list[str]:
    """Knative and Prometheus Operator kinds against their CRD-generated JSON schemas."""
    node = ensure_crd_validator(install)
    docs = [d for d in load_docs(root) if is_crd_kind(d)]
    payload = [
        {"file": str(d.path.relative_to(root)), "index": d.index, "doc": d.obj} for d in docs
    ]
    result = subprocess.run(
        [node, str(VALIDATOR_DIR / "validate.mjs")],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=VALIDATOR_DIR,
    )
    if result.returncode != 0:
        return [f"CRD validator failed: {result.stderr.strip()[-2000:]}"]
    problems = []
    for item in json.loads(result.stdout):
        where = f"{item['file']}[{item['index']}] {item['kind']}/{item['name']}"
        if item["status"] == "invalid":
            problems.extend(f"{where}: {error}" for error in item["errors"])
        elif item["status"] != "valid":
            problems.append(f"{where}: no schema for {item['apiVersion']} {item['kind']}")
    return problems
