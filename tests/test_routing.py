"""Routing derived from infra/knative/*.yaml (events/routing.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from events.notifications import JOB_CREATED, MODEL_CREATED, RAW_CREATED, RESULT_CREATED
from events.routing import Delivery, load_routing, parse_duration, routing_from_documents

MANIFESTS = Path(__file__).resolve().parents[1] / "infra" / "knative"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("PT0.5S", 0.5), ("PT2S", 2), ("PT15M", 900), ("PT1H30M", 5400), ("P1D", 86400)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "P", "PT", "5s", "PT-1S", "1 minute"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_the_projects_manifests_route_each_pipeline_event_to_its_step() -> None:
    routing = load_routing(MANIFESTS)
    assert routing.broker == "readmission"

    def subscribers(event_type: str) -> list[str]:
        return [str(t.subscriber) for t in routing.route({"type": event_type})]

    assert subscribers(RAW_CREATED) == ["ingest"]
    assert subscribers(JOB_CREATED) == ["train"]
    assert subscribers(RESULT_CREATED) == ["aggregate"]
    assert subscribers(MODEL_CREATED) == []
    assert routing.delivery.retry == 6
    assert routing.delivery.backoff_delay == 1.0
    [train] = routing.route({"type": JOB_CREATED})
    assert train.delivery.retry == 5
    assert train.delivery.backoff_delay == 2.0
    assert train.delivery.timeout == 900.0
    assert str(train.delivery.dead_letter) == "dead-letter"


def test_container_concurrency_comes_from_the_service_manifests() -> None:
    routing = load_routing(MANIFESTS)
    if not (MANIFESTS / "services.yaml").exists():
        pytest.skip("infra/knative/services.yaml is not written yet")
    assert routing.container_concurrency("train") == 1
    assert routing.container_concurrency("aggregate") == 1
    assert routing.container_concurrency("no-such-service") == 0


def test_editing_a_trigger_filter_changes_routing(tmp_path: Path) -> None:
    copy = tmp_path / "knative"
    shutil.copytree(MANIFESTS, copy)
    triggers = list(yaml.safe_load_all((copy / "triggers.yaml").read_text()))
    for doc in triggers:
        if doc["spec"]["subscriber"]["ref"]["name"] == "ingest":
            doc["spec"]["filter"]["attributes"] = {"type": "io.example.other", "source": "s3://x"}
    (copy / "triggers.yaml").write_text(yaml.safe_dump_all(triggers))

    routing = load_routing(copy)
    assert routing.route({"type": RAW_CREATED}) == []
    assert routing.route({"type": "io.example.other", "source": "s3://y"}) == []
    [trigger] = routing.route({"type": "io.example.other", "source": "s3://x"})
    assert str(trigger.subscriber) == "ingest"


def _broker(delivery: dict | None = None) -> dict:
    return {
        "kind": "Broker",
        "metadata": {"name": "b"},
        "spec": {"delivery": delivery or {}},
    }


def _trigger(name: str, attributes: dict | None, delivery: dict | None = None) -> dict:
    spec: dict = {"broker": "b", "subscriber": {"ref": {"kind": "Service", "name": name}}}
    if attributes is not None:
        spec["filter"] = {"attributes": attributes}
    if delivery is not None:
        spec["delivery"] = delivery
    return {"kind": "Trigger", "metadata": {"name": f"t-{name}"}, "spec": spec}


def test_trigger_delivery_overrides_the_broker_field_by_field() -> None:
    documents = [
        _broker({"retry": 4, "backoffDelay": "PT1S", "deadLetterSink": {"uri": "http://dls"}}),
        _trigger("a", {"type": "x"}, {"retry": 1, "backoffPolicy": "linear", "timeout": "PT3S"}),
        _trigger("b", {"type": "x"}),
    ]
    routing = routing_from_documents(documents)
    a, b = routing.route({"type": "x"})
    assert a.delivery == Delivery(1, "linear", 1.0, 3.0, a.delivery.dead_letter)
    assert str(a.delivery.dead_letter) == "http://dls"
    assert b.delivery == routing.delivery
    assert [a.delivery.backoff(n) for n in (1, 2, 3)] == [1.0, 2.0, 3.0]
    assert [b.delivery.backoff(n) for n in (1, 2, 3)] == [1.0, 2.0, 4.0]


def test_filters_match_exactly_and_an_empty_filter_matches_everything() -> None:
    routing = routing_from_documents(
        [
            _broker(),
            _trigger("all", None),
            _trigger("typed", {"type": "x", "bucket": "raw"}),
            _trigger("other-broker", {"type": "x"}) | {"spec": {"broker": "else"}},
        ]
    )
    names = lambda attrs: [str(t.subscriber) for t in routing.route(attrs)]  # noqa: E731
    assert names({"type": "x", "bucket": "raw"}) == ["all", "typed"]
    assert names({"type": "x", "bucket": "raw2"}) == ["all"]
    assert names({"type": "x"}) == ["all"]
    assert names({"type": "X", "bucket": "raw"}) == ["all"]


def test_a_trigger_without_subscriber_is_an_error() -> None:
    bad = _trigger("a", {"type": "x"})
    bad["spec"]["subscriber"] = {}
    with pytest.raises(ValueError, match="no subscriber"):
        routing_from_documents([_broker(), bad])
