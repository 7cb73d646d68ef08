"""What every check family shares: the repository being checked, its YAML documents, and
the accessors of a Knative Service's pod template."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

NAMESPACE = "readmission"


def infra_dir(root: Path) -> Path:
    return root / "infra"


def knative_dir(root: Path) -> Path:
    return infra_dir(root) / "knative"


def dashboard_json(root: Path) -> Path:
    return infra_dir(root) / "monitoring" / "grafana" / "readmission-predict.json"


def dashboard_configmap(root: Path) -> Path:
    return infra_dir(root) / "monitoring" / "grafana-dashboard-configmap.yaml"


# Oldest and newest Kubernetes the manifests are validated against (Knative Serving and
# Eventing 1.18+ need Kubernetes 1.31+; 1.32 is the minimum documented in docs/kubernetes.md).
KUBERNETES_VERSIONS = ("1.32.0", "1.37.0")

EXPECTED_SERVICES = (
    "events-adapter",
    "dead-letter",
    "ingest",
    "train",
    "aggregate",
    "predict",
    "score",
    "outcomes",
)
CRD_GROUPS = (
    "serving.knative.dev/",
    "eventing.knative.dev/",
    "sources.knative.dev/",
    "messaging.knative.dev/",
    "sinks.knative.dev/",
    "monitoring.coreos.com/",
)
# Fields of a Knative RevisionSpec that are not PodSpec fields.
KNATIVE_REVISION_FIELDS = (
    "containerConcurrency",
    "timeoutSeconds",
    "responseStartTimeoutSeconds",
    "idleTimeoutSeconds",
)


@dataclass(frozen=True)
class Doc:
    """One YAML document of a manifest file."""

    path: Path
    index: int
    obj: dict[str, Any]
    root: Path

    @property
    def kind(self) -> str:
        return str(self.obj.get("kind", ""))

    @property
    def api_version(self) -> str:
        return str(self.obj.get("apiVersion", ""))

    @property
    def name(self) -> str:
        return str((self.obj.get("metadata") or {}).get("name", ""))

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(self.root)}[{self.index}] {self.kind}/{self.name}"


# ---------------------------------------------------------------------------- loading


def manifest_files(root: Path) -> list[Path]:
    return sorted(
        p for p in infra_dir(root).rglob("*") if p.suffix in {".yaml", ".yml"} and p.is_file()
    )


def load_docs(root: Path, files: Iterable[Path] | None = None) -> list[Doc]:
    docs = []
    for path in files if files is not None else manifest_files(root):
        with path.open(encoding="utf-8") as handle:
            for index, obj in enumerate(yaml.safe_load_all(handle)):
                if obj is not None:
                    docs.append(Doc(path, index, obj, root))
    return docs


def by_kind(docs: Iterable[Doc], kind: str, api_prefix: str = "") -> list[Doc]:
    return [d for d in docs if d.kind == kind and d.api_version.startswith(api_prefix)]


def knative_services(docs: Iterable[Doc]) -> dict[str, Doc]:
    return {d.name: d for d in by_kind(docs, "Service", "serving.knative.dev/")}


def is_crd_kind(doc: Doc) -> bool:
    return doc.api_version.startswith(CRD_GROUPS)


def _container(doc: Doc) -> dict[str, Any]:
    return doc.obj["spec"]["template"]["spec"]["containers"][0]


def _args(container: dict[str, Any]) -> dict[str, str]:
    parsed = {}
    for arg in container.get("args", []):
        if arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
            parsed[key] = value
    return parsed


def _spec(doc: Doc) -> dict[str, Any]:
    return doc.obj["spec"]["template"]["spec"]


def _annotation(doc: Doc, key: str) -> str | None:
    meta = doc.obj["spec"]["template"].get("metadata", {})
    return meta.get("annotations", {}).get(f"autoscaling.knative.dev/{key}")


def iso_seconds(text: str) -> float:
    match = re.fullmatch(r"PT(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?", text)
    if not match or text == "PT":
        raise ValueError(f"unsupported ISO-8601 duration {text!r}")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds
