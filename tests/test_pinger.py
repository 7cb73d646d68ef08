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
from events.pinger import PING_TYPE, parse_schedule, ping_event
from events.routing import Destination, PingSource, load_routing

MANIFESTS = Path(__file__).resolve().parents[1] / "infra" / "knative"


DAY = 86400


@pytest.mark.parametrize(
    ("schedule", "now", "fires"),
    [
        ("*/5 * * * *", 12 * 60 + 1, 15 * 60),
        ("*/5 * * * *", 15 * 60, 20 * 60),  # strictly after now
        ("* * * * *", 59.5, 60),
        ("*/1 * * * *", 59.5, 60),
        ("*/5 * * * *", 3600 * 7 + 58 * 60, 3600 * 8),  # wraps the hour like cron
        ("0 * * * *", 3600 * 7 + 1, 3600 * 8),
        ("17 3 * * *", 0, 3 * 3600 + 17 * 60),  # daily, UTC
        ("17 3 * * *", 3 * 3600 + 17 * 60, DAY + 3 * 3600 + 17 * 60),  # the next day
        ("0 */6 * * *", 7 * 3600, 12 * 3600),
    ],
)
def test_a_supported_schedule_fires_on_its_next_minute(
    schedule: str, now: float, fires: float
) -> None:
    parsed = parse_schedule(schedule)
    assert parsed is not None and parsed.next_fire(now) == fires


@pytest.mark.parametrize(
    "schedule",
    ["@hourly", "*/0 * * * *", "60 * * * *", "0 24 * * *", "0 3 1 * *", "0 3 * * 1", "1-5 * * * *"],
)
def test_an_unsupported_schedule_is_none(schedule: str) -> None:
    assert parse_schedule(schedule) is None


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
    assert all(parse_schedule(p.schedule) is not None for p in pings)
    assert parse_schedule(reconcile.schedule) is not None


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
