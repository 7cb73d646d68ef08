"""The events-adapter function (functions/events-adapter/main.py over events/adapter.py) served by
functions-framework, forwarding to a real HTTP sink."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import flask
import functions_framework
import pytest
from support.http_stub import Subscriber

from events.delivery import decode_header_value

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "events" / "examples"


@pytest.fixture(scope="module")
def app() -> flask.Flask:
    return functions_framework.create_app(
        target="adapter",
        source=str(ROOT / "functions" / "events-adapter" / "main.py"),
        signature_type="http",
    )


@pytest.fixture
def sink(monkeypatch: pytest.MonkeyPatch) -> Iterator[Subscriber]:
    subscriber = Subscriber(default=(202, {}, b"")).start()
    monkeypatch.setenv("K_SINK", subscriber.url)
    yield subscriber
    subscriber.stop()


def example(name: str) -> bytes:
    return (EXAMPLES / name).read_bytes()


def test_a_seaweedfs_create_is_forwarded_in_binary_mode(app: flask.Flask, sink: Subscriber) -> None:
    response = app.test_client().post(
        "/", data=example("seaweedfs-create.json"), content_type="application/json"
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    [event_id] = response.get_json()["events"]
    [received] = sink.received
    assert received.headers["ce-id"] == event_id
    assert received.headers["ce-type"] == "io.readmission.raw.created"
    assert received.headers["ce-source"] == "s3://raw"
    assert decode_header_value(received.headers["ce-subject"]) == "dir one/a+b%.csv"
    assert received.headers["ce-etag"] == "e5ebd4c02cefbe7955977c67ada242b7"
    assert received.headers["content-type"] == "application/json"
    assert json.loads(received.body)["origin"] == "seaweedfs"


def test_a_minio_notification_is_forwarded(app: flask.Flask, sink: Subscriber) -> None:
    response = app.test_client().post("/", data=example("minio-put.json"))
    assert response.status_code == 200
    subject = decode_header_value(sink.received[0].headers["ce-subject"])
    assert subject == "uploads/diabetic data (2).csv"


@pytest.mark.parametrize(
    "name", ["seaweedfs-delete.json", "seaweedfs-directory.json", "s3-test-event.json"]
)
def test_notifications_without_events_answer_200_and_send_nothing(
    app: flask.Flask, sink: Subscriber, name: str
) -> None:
    response = app.test_client().post("/", data=example(name))
    assert response.status_code == 200
    assert response.get_json() == {"events": []}
    assert sink.received == []


def test_probes_answer_200(app: flask.Flask, sink: Subscriber) -> None:
    client = app.test_client()
    assert client.head("/").status_code == 200
    assert client.get("/").status_code == 200


@pytest.mark.parametrize("body", [b"not json", b"{}", b'{"Records": "x"}', b"[1, 2]"])
def test_a_body_that_is_no_notification_is_a_400_with_a_json_error(
    app: flask.Flask, sink: Subscriber, body: bytes
) -> None:
    response = app.test_client().post("/", data=body)
    assert response.status_code == 400
    assert response.get_json()["error"]
    assert sink.received == []


def test_a_body_above_the_limit_is_refused(
    app: flask.Flask, sink: Subscriber, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADAPTER_MAX_BODY_BYTES", "100")
    response = app.test_client().post("/", data=example("seaweedfs-create.json"))
    assert response.status_code == 413
    assert sink.received == []


def test_a_sink_that_refuses_makes_the_notifier_retry(app: flask.Flask, sink: Subscriber) -> None:
    sink.default = (500, {}, b"down")
    response = app.test_client().post("/", data=example("seaweedfs-create.json"))
    assert response.status_code == 502


def test_an_unreachable_or_missing_sink_is_a_5xx(
    app: flask.Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    gone = Subscriber().start()
    url = gone.url
    gone.stop()
    monkeypatch.setenv("K_SINK", url)
    assert app.test_client().post("/", data=example("minio-put.json")).status_code == 502
    monkeypatch.delenv("K_SINK")
    assert app.test_client().post("/", data=example("minio-put.json")).status_code == 503


def test_with_a_token_only_bearer_requests_are_accepted(
    app: flask.Flask, sink: Subscriber, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADAPTER_TOKEN", "s3cret")
    client = app.test_client()
    body = example("seaweedfs-create.json")
    assert client.post("/", data=body).status_code == 401
    assert client.post("/", data=body, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert sink.received == []
    ok = client.post("/", data=body, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and len(sink.received) == 1
