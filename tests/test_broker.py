"""The local broker (events/broker.py) against real HTTP subscribers on free loopback ports."""

from __future__ import annotations

import base64
import contextlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cloudevents.conversion import to_binary, to_structured
from cloudevents.http import CloudEvent
from support.http_stub import Subscriber

from events.broker import BrokerConfig, BrokerServer, parse_timeout_caps, serve
from events.delivery import decode_header_value, encode_header_value, post_binary

MANIFESTS = """
apiVersion: eventing.knative.dev/v1
kind: Broker
metadata: {name: test}
spec:
  delivery:
    retry: 2
    backoffPolicy: exponential
    backoffDelay: PT0.1S
    deadLetterSink: {ref: {kind: Service, name: dead-letter}}
---
apiVersion: eventing.knative.dev/v1
kind: Trigger
metadata: {name: to-step}
spec:
  broker: test
  filter: {attributes: {type: test.step}}
  subscriber: {ref: {kind: Service, name: step}}
  delivery: {timeout: PT0.5S}
---
apiVersion: eventing.knative.dev/v1
kind: Trigger
metadata: {name: to-next}
spec:
  broker: test
  filter: {attributes: {type: test.next}}
  subscriber: {ref: {kind: Service, name: next}}
---
apiVersion: eventing.knative.dev/v1
kind: Trigger
metadata: {name: to-pool}
spec:
  broker: test
  filter: {attributes: {type: test.pool}}
  subscriber: {ref: {kind: Service, name: pool}}
---
apiVersion: serving.knative.dev/v1
kind: Service
metadata: {name: pool}
spec: {template: {spec: {containerConcurrency: 1}}}
"""


@dataclass
class Setup:
    broker: BrokerServer
    services_file: Path
    dead_letter_file: Path
    subscribers: dict[str, Subscriber]
    manifests: Path

    def route(self, **services: list[Subscriber] | list[str]) -> None:
        urls = {
            name: [s.url if isinstance(s, Subscriber) else s for s in replicas]
            for name, replicas in services.items()
        }
        self.services_file.write_text(json.dumps(urls))

    def subscriber(self, name: str, *replies: tuple[Any, ...]) -> Subscriber:
        subscriber = Subscriber(list(replies)).start()
        self.subscribers[f"{name}-{len(self.subscribers)}"] = subscriber
        return subscriber

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.broker.url}/status", timeout=5) as response:
            return json.loads(response.read())

    def wait_idle(self, timeout: float = 10.0, **expected: int) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            totals = self.status()["totals"]
            done = all(totals[name] >= value for name, value in expected.items())
            if done and totals["queued"] == 0 and totals["inflight"] == 0:
                return totals
            if time.monotonic() > deadline:
                raise AssertionError(f"broker not idle with {expected}: {totals}")
            time.sleep(0.05)


@contextlib.contextmanager
def broker_setup(tmp_path: Path, **config_fields: Any) -> Iterator[Setup]:
    """A broker routing by MANIFESTS (its config fields overridden by `config_fields`)."""
    manifests = tmp_path / "knative"
    manifests.mkdir()
    (manifests / "all.yaml").write_text(MANIFESTS)
    config = BrokerConfig(
        port=0,
        manifests=manifests,
        services_file=tmp_path / "services.json",
        dead_letter_file=tmp_path / "dead-letters.jsonl",
        **config_fields,
    )
    server = serve(config)
    result = Setup(server, config.services_file, config.dead_letter_file, {}, manifests)
    try:
        yield result
    finally:
        server.shutdown()
        server.server_close()
        for subscriber in result.subscribers.values():
            subscriber.stop()


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    with broker_setup(tmp_path) as result:
        yield result


def event(event_type: str = "test.step", event_id: str = "e1", **extra: str) -> CloudEvent:
    return CloudEvent(
        {
            "type": event_type,
            "source": "s3://raw",
            "id": event_id,
            "subject": "a.csv",
            "datacontenttype": "application/json",
            **extra,
        },
        {"bucket": "raw", "key": "a.csv"},
    )


def post(url: str, ce: CloudEvent, structured: bool = False) -> int:
    headers, body = to_structured(ce) if structured else to_binary(ce)
    request = urllib.request.Request(url, data=body, headers=dict(headers), method="POST")
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status


def post_raw(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, {}
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


# --------------------------------------------------------------------------- tests


def test_ingress_accepts_binary_and_structured_and_rejects_malformed(setup: Setup) -> None:
    step = setup.subscriber("step")
    setup.route(step=[step])
    assert post(setup.broker.url, event(event_id="binary")) == 202
    assert post(f"{setup.broker.url}/readmission/readmission", event(event_id="s"), True) == 202
    status, error = post_raw(
        setup.broker.url, b'{"hello": 1}', {"Content-Type": "application/json"}
    )
    assert status == 400 and "CloudEvent" in error["error"]
    status, _ = post_raw(
        setup.broker.url, b"{}", {"ce-specversion": "1.0", "ce-id": "x", "ce-type": "t"}
    )
    assert status == 400  # no ce-source
    setup.wait_idle(delivered=2)
    assert sorted(step.ids()) == ["binary", "s"]
    assert setup.status()["totals"]["received"] == 2


UNUSUAL_KEYS = [
    "adv/p8/данные.csv",
    "emoji/\U0001f3e5 ward 5.csv",
    'quote"percent%20plus+.csv',
    "line\nbreak\r.csv",
    "latin-1 café.csv",
]


@pytest.mark.parametrize("key", UNUSUAL_KEYS)
def test_attribute_header_values_percent_encode_to_ascii_and_decode_back_exactly(
    key: str,
) -> None:
    encoded = encode_header_value(key)
    assert encoded.isascii() and all(0x21 <= ord(c) <= 0x7E for c in encoded)
    assert " " not in encoded and '"' not in encoded and "\n" not in encoded
    assert decode_header_value(encoded) == key


def test_a_header_value_that_is_not_utf8_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="UTF-8"):
        decode_header_value("%FF%FE")


def test_keys_outside_latin1_travel_through_the_broker_and_decode_back_exactly(
    setup: Setup,
) -> None:
    step = setup.subscriber("step")
    setup.route(step=[step])
    for index, key in enumerate(UNUSUAL_KEYS):
        attempt = post_binary(
            setup.broker.url, event(event_id=f"k{index}", subject=f"raw/{key}"), timeout=5
        )
        assert attempt.status == 202, attempt.error
    setup.wait_idle(delivered=len(UNUSUAL_KEYS))
    received = sorted(step.received, key=lambda r: r.headers["ce-id"])
    assert [decode_header_value(r.headers["ce-subject"]) for r in received] == [
        f"raw/{key}" for key in UNUSUAL_KEYS
    ]
    assert all(r.headers["ce-subject"].isascii() for r in received)


def test_an_attribute_header_that_does_not_decode_to_utf8_is_refused_with_400(
    setup: Setup,
) -> None:
    status, error = post_raw(
        setup.broker.url,
        b"{}",
        {
            "ce-specversion": "1.0",
            "ce-id": "x",
            "ce-type": "t",
            "ce-source": "s",
            "ce-subject": "bad%FF",
            "Content-Type": "application/json",
        },
    )
    assert status == 400 and "UTF-8" in error["error"]


def test_delivery_is_binary_mode_and_unrouted_events_are_dropped(setup: Setup) -> None:
    step = setup.subscriber("step")
    setup.route(step=[step])
    post(setup.broker.url, event(bucket="raw"))
    post(setup.broker.url, event("nobody.listens", "e2"))
    setup.wait_idle(delivered=1)
    [received] = step.received
    assert received.headers["ce-type"] == "test.step"
    assert received.headers["ce-bucket"] == "raw"
    assert received.headers["content-type"] == "application/json"
    assert json.loads(received.body) == {"bucket": "raw", "key": "a.csv"}
    assert setup.status()["totals"]["unrouted"] == 1


def test_5xx_and_4xx_other_than_400_are_retried_with_exponential_backoff(setup: Setup) -> None:
    step = setup.subscriber("step", (500, {}, b"boom"), (404, {}, b""), (204, {}, b""))
    setup.route(step=[step])
    post(setup.broker.url, event())
    totals = setup.wait_idle(delivered=1)
    assert totals["retries"] == 2 and totals["dead_lettered"] == 0
    gaps = [b.at - a.at for a, b in zip(step.received, step.received[1:], strict=False)]
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2  # PT0.1S, then doubled


def test_400_is_not_retried_and_goes_to_the_dead_letter_sink(setup: Setup) -> None:
    step = setup.subscriber("step", (400, {}, b'{"error": "bad event"}'))
    sink = setup.subscriber("dead-letter")
    setup.route(step=[step], **{"dead-letter": [sink]})
    post(setup.broker.url, event())
    totals = setup.wait_idle(dead_lettered=1)
    assert len(step.received) == 1 and totals["retries"] == 0
    [letter] = sink.received
    assert letter.headers["ce-id"] == "e1" and letter.headers["ce-type"] == "test.step"
    assert letter.headers["ce-knativeerrorcode"] == "400"
    assert letter.headers["ce-knativeerrordest"] == step.url
    assert base64.b64decode(letter.headers["ce-knativeerrordata"]) == b'{"error": "bad event"}'
    assert json.loads(letter.body) == {"bucket": "raw", "key": "a.csv"}


def test_exhausted_retries_go_to_the_dead_letter_sink(setup: Setup) -> None:
    step = setup.subscriber("step")
    step.default = (503, {}, b"busy")
    sink = setup.subscriber("dead-letter")
    setup.route(step=[step], **{"dead-letter": [sink]})
    post(setup.broker.url, event())
    setup.wait_idle(dead_lettered=1)
    assert len(step.received) == 3  # first attempt + retry: 2
    assert sink.received[0].headers["ce-knativeerrorcode"] == "503"
    assert setup.status()["dead_lettered_by_type"] == {"test.step": 1}


def test_a_2xx_reply_that_is_not_a_cloudevent_is_a_failure(setup: Setup) -> None:
    step = setup.subscriber("step")
    step.default = (200, {"Content-Type": "text/plain"}, b"OK")
    sink = setup.subscriber("dead-letter")
    setup.route(step=[step], **{"dead-letter": [sink]})
    post(setup.broker.url, event())
    totals = setup.wait_idle(dead_lettered=1)
    assert len(step.received) == 3 and totals["delivered"] == 0
    assert sink.received[0].headers["ce-knativeerrorcode"] == "200"


def test_a_reply_that_is_a_cloudevent_is_published_back(setup: Setup) -> None:
    headers, body = to_binary(event("test.next", "reply-1"))
    step = setup.subscriber("step", (200, dict(headers), body))
    nxt = setup.subscriber("next")
    setup.route(step=[step], next=[nxt])
    post(setup.broker.url, event())
    setup.wait_idle(delivered=2)
    assert nxt.ids() == ["reply-1"]


def test_connection_errors_and_timeouts_are_retried(setup: Setup) -> None:
    slow = setup.subscriber("step", (204, {}, b"", 2.0))  # longer than the Trigger's PT0.5S
    setup.route(step=[slow])
    post(setup.broker.url, event())
    totals = setup.wait_idle(delivered=1)
    assert totals["retries"] == 1 and len(slow.received) == 2

    refused = setup.subscriber("gone")
    url = refused.url
    refused.stop()
    sink = setup.subscriber("dead-letter")
    setup.route(step=[url], **{"dead-letter": [sink]})
    post(setup.broker.url, event(event_id="e2"))
    setup.wait_idle(dead_lettered=1)
    assert sink.ids() == ["e2"] and sink.received[0].headers["ce-knativeerrordest"] == url
    assert "ce-knativeerrorcode" not in sink.received[0].headers


def test_a_timeout_cap_cuts_the_deliveries_to_one_service_only(tmp_path: Path) -> None:
    assert parse_timeout_caps(" next=0.2, step=30 ") == {"next": 0.2, "step": 30.0}
    with pytest.raises(ValueError, match="service=seconds"):
        parse_timeout_caps("next")
    with pytest.raises(ValueError, match="'next=soon' is not service=seconds"):
        parse_timeout_caps("next=soon")
    with broker_setup(tmp_path, timeout_caps={"next": 0.3}) as setup:
        # 1 s answers: far within the pool Trigger's timeout (none: 600 s), beyond next's cap
        uncapped = setup.subscriber("pool", (204, {}, b"", 1.0))
        capped = setup.subscriber("next", (204, {}, b"", 1.0))
        setup.route(pool=[uncapped], next=[capped])
        post(setup.broker.url, event("test.pool", "p1"))
        post(setup.broker.url, event("test.next", "n1"))
        totals = setup.wait_idle(delivered=2)
        assert len(uncapped.received) == 1
        assert len(capped.received) >= 2 and totals["retries"] >= 1


def test_unreachable_dead_letter_sink_appends_to_a_file(setup: Setup) -> None:
    step = setup.subscriber("step", (400, {}, b""))
    setup.route(step=[step])  # no dead-letter Service at all
    post(setup.broker.url, event())
    setup.wait_idle(dead_letter_file=1, timeout=15)
    [line] = setup.dead_letter_file.read_text().splitlines()
    record = json.loads(line)
    assert record["attributes"]["id"] == "e1" and record["status"] == 400
    assert record["data"] == {"bucket": "raw", "key": "a.csv"}


def test_fifo_per_subscriber_with_one_replica_of_concurrency_one(setup: Setup) -> None:
    pool = setup.subscriber("pool")
    pool.default = (204, {}, b"", 0.05)
    setup.route(pool=[pool])
    ids = [f"job-{i}" for i in range(8)]
    for event_id in ids:
        post(setup.broker.url, event("test.pool", event_id))
    setup.wait_idle(delivered=8)
    assert pool.ids() == ids
    assert pool.max_active == 1


def test_a_pool_of_replicas_shares_the_work_within_container_concurrency(setup: Setup) -> None:
    replicas = [setup.subscriber("pool"), setup.subscriber("pool")]
    for replica in replicas:
        replica.default = (204, {}, b"", 0.3)
    setup.route(pool=replicas)
    for i in range(4):
        post(setup.broker.url, event("test.pool", f"job-{i}"))
    setup.wait_idle(delivered=4)
    assert [len(r.received) for r in replicas] == [2, 2]
    assert all(r.max_active == 1 for r in replicas)  # containerConcurrency 1 each
    first, second = replicas
    overlapping = [
        (a, b) for a in first.received for b in second.received if abs(a.at - b.at) < 0.25
    ]
    assert overlapping, "the two replicas never worked at the same time"


def test_editing_the_manifests_changes_routing_of_a_running_broker(setup: Setup) -> None:
    step, nxt = setup.subscriber("step"), setup.subscriber("next")
    setup.route(step=[step], next=[nxt])
    text = (setup.manifests / "all.yaml").read_text()
    documents = list(yaml.safe_load_all(text))
    for doc in documents:
        if doc["kind"] == "Trigger" and doc["metadata"]["name"] == "to-next":
            doc["spec"]["filter"]["attributes"]["type"] = "test.step"
    (setup.manifests / "all.yaml").write_text(yaml.safe_dump_all(documents) + "\n# edited\n")
    post(setup.broker.url, event())
    setup.wait_idle(delivered=2)
    assert step.ids() == ["e1"] and nxt.ids() == ["e1"]


def test_a_key_with_a_newline_stays_on_one_delivery_log_line(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    step = setup.subscriber("step")
    setup.route(step=[step])
    caplog.set_level("INFO", logger="broker")
    attempt = post_binary(
        setup.broker.url, event(event_id="nl", subject="raw/forged\nline.csv"), timeout=5
    )
    assert attempt.status == 202
    setup.wait_idle(delivered=1)
    [line] = [r.getMessage() for r in caplog.records if "delivery type=" in r.getMessage()]
    assert "\n" not in line and "subject=raw/forged%0Aline.csv " in line


def test_the_config_comes_from_the_environment_and_names_a_bad_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("BROKER_PORT", "BROKER_DEFAULT_TIMEOUT", "HTTP_BODY_TIMEOUT", "BROKER_NAME"):
        monkeypatch.delenv(name, raising=False)
    config = BrokerConfig.from_env()
    assert (config.port, config.default_timeout, config.broker_name) == (8100, 600.0, None)
    monkeypatch.setenv("BROKER_PORT", " 8200 ")
    monkeypatch.setenv("BROKER_DEFAULT_TIMEOUT", "30")
    monkeypatch.setenv("HTTP_BODY_TIMEOUT", "2.5")
    config = BrokerConfig.from_env()
    assert (config.port, config.default_timeout, config.read_timeouts.body) == (8200, 30.0, 2.5)
    monkeypatch.setenv("BROKER_PORT", "http")
    with pytest.raises(ValueError, match="BROKER_PORT must be an integer, got 'http'"):
        BrokerConfig.from_env()
    monkeypatch.delenv("BROKER_PORT")
    monkeypatch.setenv("HTTP_BODY_TIMEOUT", "ten")
    with pytest.raises(ValueError, match="HTTP_BODY_TIMEOUT must be a number, got 'ten'"):
        BrokerConfig.from_env()
