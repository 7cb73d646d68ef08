"""PingSource emulation (events/pinger.py) and its use by the broker."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from support.http_stub import Subscriber

from events.broker import BrokerConfig, serve
from events.pinger import PING_TYPE, minute_step, next_fire, ping_event
from events.routing import Destination, PingSource, load_routing

MANIFESTS = Path(__file__).resolve().parents[1] / "infra" / "knative"


@pytest.mark.parametrize(
    ("schedule", "step"),
    [
        ("*/5 * * * *", 5),
        ("* * * * *", 1),
        ("*/1 * * * *", 1),
        ("0 * * * *", None),
        ("*/5 1 * * *", None),
        ("@hourly", None),
        ("*/0 * * * *", None),
    ],
)
def test_minute_step(schedule: str, step: int | None) -> None:
    assert minute_step(schedule) == step


def test_next_fire_is_on_the_next_multiple_of_the_step() -> None:
    assert next_fire(5, 12 * 60 + 1) == 15 * 60
    assert next_fire(5, 15 * 60) == 20 * 60  # strictly after now
    assert next_fire(1, 59.5) == 60
    assert next_fire(5, 3600 * 7 + 58 * 60) == 3600 * 8  # wraps the hour like cron


def test_ping_event_carries_the_json_data() -> None:
    source = PingSource(
        "p", "ns", "* * * * *", '{"reason": "x"}', "application/json", Destination(service="svc")
    )
    event = ping_event(source)
    assert event["type"] == PING_TYPE
    assert event["source"] == "/apis/v1/namespaces/ns/pingsources/p"
    assert event.get_data() == {"reason": "x"}


def test_the_projects_pingsources_are_read_from_the_manifests() -> None:
    pings = load_routing(MANIFESTS).pings
    if not (MANIFESTS / "reconcile.yaml").exists():
        pytest.skip("infra/knative/reconcile.yaml is not there")
    [reconcile] = [p for p in pings if str(p.sink) == "reconcile"]
    assert minute_step(reconcile.schedule) is not None


def test_a_pingsource_fired_through_the_broker_reaches_its_sink(tmp_path: Path) -> None:
    manifests = tmp_path / "knative"
    manifests.mkdir()
    (manifests / "all.yaml").write_text(
        "kind: Broker\nmetadata: {name: b}\nspec: {}\n---\n"
        "kind: PingSource\nmetadata: {name: every-minute, namespace: ns}\n"
        "spec: {schedule: '* * * * *', contentType: application/json, data: '{\"a\": 1}',"
        " sink: {ref: {kind: Service, name: pinged}}}\n"
    )
    sink = Subscriber().start()
    services = tmp_path / "services.json"
    services.write_text(json.dumps({"pinged": [sink.url]}))
    server = serve(
        BrokerConfig(
            port=0,
            manifests=manifests,
            services_file=services,
            dead_letter_file=tmp_path / "dl.jsonl",
        )
    )
    try:
        fire = urllib.request.Request(f"{server.url}/pingsources/every-minute", method="POST")
        with urllib.request.urlopen(fire, timeout=5) as response:
            assert response.status == 202
        missing = urllib.request.Request(f"{server.url}/pingsources/nope", method="POST")
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(missing, timeout=5)
        assert caught.value.code == 404
        deadline = time.monotonic() + 5
        while not sink.received and time.monotonic() < deadline:
            time.sleep(0.05)
        [received] = sink.received
        assert received.headers["ce-type"] == PING_TYPE
        assert json.loads(received.body) == {"a": 1}
        assert server.broker.status()["totals"]["pings"] == 1
    finally:
        server.shutdown()
        server.server_close()
        sink.stop()
