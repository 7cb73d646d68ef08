"""Routing derived from the Knative manifests in infra/knative/*.yaml.

* every ``Trigger`` of the broker: ``spec.filter.attributes`` (exact match on each named
  attribute, like Knative; no filter matches everything), ``spec.subscriber`` (a ``ref`` to a
  Service by name, or a ``uri``), and ``spec.delivery`` overriding the Broker's field by field;
* the ``Broker``'s ``spec.delivery``: ``retry``, ``backoffPolicy``, ``backoffDelay`` and
  ``timeout`` (ISO-8601 durations), ``deadLetterSink``;
* each Knative ``Service``'s ``spec.template.spec.containerConcurrency`` (0 = unlimited);
* every ``PingSource`` (``spec.schedule``, ``spec.data``, ``spec.contentType``, ``spec.sink``):
  the local broker fires them too (events/pinger.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

_DURATION = re.compile(
    r"^P(?:(?P<days>\d+(?:\.\d+)?)D)?"
    r"(?:T(?:(?P<hours>\d+(?:\.\d+)?)H)?(?:(?P<minutes>\d+(?:\.\d+)?)M)?"
    r"(?:(?P<seconds>\d+(?:\.\d+)?)S)?)?$"
)


def parse_duration(text: str) -> float:
    """Seconds in an ISO-8601 duration such as ``PT0.5S``, ``PT15M`` or ``P1DT2H``."""
    match = _DURATION.match(text.strip()) if isinstance(text, str) else None
    if not match or text.strip() in {"P", "PT"} or text.strip().endswith("T"):
        raise ValueError(f"not an ISO-8601 duration: {text!r}")
    parts = {name: float(value) for name, value in match.groupdict().items() if value}
    return (
        parts.get("days", 0.0) * 86400
        + parts.get("hours", 0.0) * 3600
        + parts.get("minutes", 0.0) * 60
        + parts.get("seconds", 0.0)
    )


@dataclass(frozen=True)
class Destination:
    """Where to send: a Service by name (resolved locally) or a plain URI."""

    service: str | None = None
    uri: str | None = None

    @classmethod
    def parse(cls, spec: Any) -> Destination | None:
        if not isinstance(spec, Mapping):
            return None
        ref = spec.get("ref")
        if isinstance(ref, Mapping) and ref.get("name"):
            return cls(service=str(ref["name"]))
        if spec.get("uri"):
            return cls(uri=str(spec["uri"]))
        return None

    def __str__(self) -> str:
        return self.service or self.uri or "?"


@dataclass(frozen=True)
class Delivery:
    """Knative delivery spec. ``retry`` is the number of retries after the first attempt."""

    retry: int = 0
    backoff_policy: str = "exponential"
    backoff_delay: float = 0.0
    timeout: float | None = None
    dead_letter: Destination | None = None

    def backoff(self, retry_number: int) -> float:
        """Delay before retry number ``retry_number`` (1-based), Knative's formula."""
        if self.backoff_policy == "linear":
            return self.backoff_delay * retry_number
        return self.backoff_delay * 2 ** (retry_number - 1)

    def override(self, spec: Any) -> Delivery:
        """This delivery with the fields present in a manifest ``delivery`` block replaced."""
        if not isinstance(spec, Mapping):
            return self
        changes: dict[str, Any] = {}
        if "retry" in spec:
            changes["retry"] = int(spec["retry"])
        if "backoffPolicy" in spec:
            policy = str(spec["backoffPolicy"]).lower()
            if policy not in {"exponential", "linear"}:
                raise ValueError(f"unknown backoffPolicy {spec['backoffPolicy']!r}")
            changes["backoff_policy"] = policy
        if "backoffDelay" in spec:
            changes["backoff_delay"] = parse_duration(spec["backoffDelay"])
        if "timeout" in spec:
            changes["timeout"] = parse_duration(spec["timeout"])
        if "deadLetterSink" in spec:
            changes["dead_letter"] = Destination.parse(spec["deadLetterSink"])
        return replace(self, **changes)


@dataclass(frozen=True)
class Trigger:
    name: str
    filter: dict[str, str]
    subscriber: Destination
    delivery: Delivery

    def matches(self, attributes: Mapping[str, Any]) -> bool:
        return all(
            name in attributes and str(attributes[name]) == value
            for name, value in self.filter.items()
        )


@dataclass(frozen=True)
class PingSource:
    name: str
    namespace: str
    schedule: str
    data: str
    content_type: str
    sink: Destination


@dataclass(frozen=True)
class Routing:
    broker: str
    triggers: tuple[Trigger, ...] = ()
    concurrency: dict[str, int] = field(default_factory=dict)
    delivery: Delivery = field(default_factory=Delivery)
    pings: tuple[PingSource, ...] = ()

    def route(self, attributes: Mapping[str, Any]) -> list[Trigger]:
        return [trigger for trigger in self.triggers if trigger.matches(attributes)]

    def container_concurrency(self, service: str) -> int:
        return self.concurrency.get(service, 0)


def load_documents(manifest_dir: Path) -> list[dict[str, Any]]:
    documents: list[dict[str, Any]] = []
    for path in sorted([*manifest_dir.glob("*.yaml"), *manifest_dir.glob("*.yml")]):
        with path.open() as handle:
            documents.extend(doc for doc in yaml.safe_load_all(handle) if isinstance(doc, dict))
    return documents


def routing_from_documents(
    documents: Iterable[Mapping[str, Any]], broker: str | None = None
) -> Routing:
    """Routing for one broker (the only Broker in the documents if not named)."""
    documents = list(documents)
    brokers = [doc for doc in documents if doc.get("kind") == "Broker"]
    if broker is None:
        if len(brokers) != 1:
            raise ValueError(f"expected exactly one Broker manifest, found {len(brokers)}")
        broker = str(brokers[0]["metadata"]["name"])
    broker_doc = next((doc for doc in brokers if doc["metadata"]["name"] == broker), None)
    if broker_doc is None:
        raise ValueError(f"no Broker named {broker!r} in the manifests")
    base = Delivery().override((broker_doc.get("spec") or {}).get("delivery"))

    triggers = []
    for doc in documents:
        spec = doc.get("spec") or {}
        if doc.get("kind") != "Trigger" or spec.get("broker") != broker:
            continue
        name = str(doc["metadata"]["name"])
        subscriber = Destination.parse(spec.get("subscriber"))
        if subscriber is None:
            raise ValueError(f"Trigger {name!r} has no subscriber ref or uri")
        attributes = (spec.get("filter") or {}).get("attributes") or {}
        triggers.append(
            Trigger(
                name=name,
                filter={str(k): str(v) for k, v in attributes.items()},
                subscriber=subscriber,
                delivery=base.override(spec.get("delivery")),
            )
        )

    concurrency = {}
    for doc in documents:
        if doc.get("kind") == "Service" and "serving.knative.dev" in str(doc.get("apiVersion")):
            template_spec = ((doc.get("spec") or {}).get("template") or {}).get("spec") or {}
            concurrency[str(doc["metadata"]["name"])] = int(
                template_spec.get("containerConcurrency") or 0
            )
    pings = []
    for doc in documents:
        spec = doc.get("spec") or {}
        sink = Destination.parse(spec.get("sink"))
        if doc.get("kind") != "PingSource" or sink is None:
            continue
        metadata = doc.get("metadata") or {}
        pings.append(
            PingSource(
                name=str(metadata.get("name")),
                namespace=str(metadata.get("namespace", "default")),
                schedule=str(spec.get("schedule", "")),
                data=str(spec.get("data", "")),
                content_type=str(spec.get("contentType", "")),
                sink=sink,
            )
        )
    return Routing(broker, tuple(triggers), concurrency, base, tuple(pings))


def load_routing(manifest_dir: Path, broker: str | None = None) -> Routing:
    return routing_from_documents(load_documents(manifest_dir), broker)


def manifests_signature(manifest_dir: Path) -> tuple[tuple[str, float, int], ...]:
    """Changes when a manifest is added, removed or edited (to reload routing)."""
    paths = sorted([*manifest_dir.glob("*.yaml"), *manifest_dir.glob("*.yml")])
    signature = []
    for path in paths:
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        signature.append((path.name, stat.st_mtime, stat.st_size))
    return tuple(signature)
