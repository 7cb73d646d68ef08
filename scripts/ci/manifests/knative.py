"""The shared contract of docs/design.md: the Knative Services with their entry points (each at
functions/<service>/main.py), their autoscaling and timeouts, the Broker and its delivery, the
Triggers and the SinkBinding."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .common import (
    EXPECTED_SERVICES,
    _annotation,
    _args,
    _container,
    _spec,
    by_kind,
    iso_seconds,
    knative_dir,
    knative_services,
    load_docs,
)


def design_services(root: Path) -> dict[str, tuple[str, str, str]]:
    """Service name -> (source file, target, signature) from docs/design.md."""
    text = (root / "docs" / "design.md").read_text(encoding="utf-8")
    rows = re.findall(
        r"^\|\s*`([a-z-]+)`\s*\|\s*`([^`:]+):([A-Za-z_]+)`\s*\|\s*(http|cloudevent)\s*\|",
        text,
        re.MULTILINE,
    )
    return {name: (source, target, signature) for name, source, target, signature in rows}


def design_event_types(root: Path) -> dict[str, str]:
    """CloudEvent type -> consumer cell of docs/design.md's table (and events/README.md's)."""
    types: dict[str, str] = {}
    for path in (root / "docs" / "design.md", root / "events" / "README.md"):
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            match = re.match(r"^\|\s*`(io\.readmission\.[a-z0-9.]+)`\s*\|(.*)$", line)
            if match:
                cells = [c.strip() for c in match.group(2).strip().strip("|").split("|")]
                types.setdefault(match.group(1), cells[-1] if cells else "")
    return types


def check_services(root: Path) -> list[str]:
    docs = load_docs(root)
    services = knative_services(docs)
    problems = []
    missing = sorted(set(EXPECTED_SERVICES) - set(services))
    if missing:
        problems.append(f"Knative Services {missing} missing (docs/design.md names them)")
    for name in EXPECTED_SERVICES:
        if name in services and services[name].path.name != "services.yaml":
            problems.append(f"Knative Service {name} must be in infra/knative/services.yaml")
    design = design_services(root)
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


def check_scaling(root: Path) -> list[str]:
    services = knative_services(load_docs(root))
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


def check_eventing(root: Path) -> list[str]:
    docs = load_docs(root)
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

    types = design_event_types(root)
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


def check_function_sources(root: Path) -> list[str]:
    """Every Knative Service of infra/knative/ runs functions/<its name>/main.py, which exists,
    and every folder of functions/ is such a Service: one spelling per function."""
    knative = knative_dir(root)
    services = {
        name: doc
        for name, doc in knative_services(load_docs(root)).items()
        if doc.path.is_relative_to(knative)
    }
    problems = []
    for name, doc in sorted(services.items()):
        wanted = f"functions/{name}/main.py"
        source = _args(_container(doc)).get("source")
        if source != wanted:
            problems.append(f"{doc.where}: --source={source}, want {wanted}")
        if not (root / wanted).is_file():
            problems.append(f"{doc.where}: {wanted} does not exist")
    functions = root / "functions"
    folders = sorted(
        p.name
        for p in (functions.iterdir() if functions.is_dir() else [])
        if p.is_dir() and not p.name.startswith((".", "_"))
    )
    for folder in folders:
        if folder not in services:
            problems.append(f"functions/{folder}/ is not a Knative Service in infra/knative/")
    return problems
