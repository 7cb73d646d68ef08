"""Slow and stalled clients against the real servers: the predict function and the events
adapter (functions-framework processes serving with readmission.glue.slow_clients), the local
broker and the local JobSink. Raw sockets connect and send nothing, half a request head, or a
head and part of its body; the server must answer others meanwhile and close the stalled ones
after its read timeouts (set short here through HTTP_HEADER_TIMEOUT / HTTP_BODY_TIMEOUT)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.http_stub import Subscriber
from support.predict_support import FunctionProcess, http

from events.broker import BrokerConfig, BrokerServer, serve
from events.intake import ReadTimeouts
from events.jobsink import JobSink, JobSinkConfig, JobSinkServer
from readmission.glue import slow_clients
from readmission.glue.slow_clients import GATE_BYTES, PARTIAL, STREAMED, WHOLE, request_state
from readmission.localstack.supervisor import PREDICT_SERVER_ENV

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 2.0  # both read timeouts of the servers under test, seconds
SHORT = {"HTTP_HEADER_TIMEOUT": str(TIMEOUT), "HTTP_BODY_TIMEOUT": str(TIMEOUT)}
ANSWER_WITHIN = 1.0  # seconds: what a request may take while the slow clients are held
CLOSE_SLACK = 2.0  # seconds after its timeout by which a stalled connection must be closed
HALF_HEAD = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
SMALL_BODY_HEAD = HALF_HEAD + b"Content-Length: 100\r\n\r\n{"


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port.rstrip("/"))


def _slow_clients(url: str, each: int) -> list[tuple[socket.socket, float]]:
    """`each` connections that send nothing, half a head, a head and 1 byte of a 100-byte
    body; with the time each one last sent."""
    held = []
    for sent in (b"", HALF_HEAD, SMALL_BODY_HEAD):
        for _ in range(each):
            sock = socket.create_connection(_address(url), timeout=10)
            if sent:
                sock.sendall(sent)
            held.append((sock, time.monotonic()))
    return held


def _closed_after(sock: socket.socket, most: float) -> bytes | None:
    """What the server sent before closing the connection, or None if it is still open after
    `most` seconds."""
    sock.settimeout(most)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        return None
    return received


def _assert_closed_after_the_timeout(held: list[tuple[socket.socket, float]]) -> None:
    for sock, since in held:
        with sock:
            left = since + TIMEOUT + CLOSE_SLACK - time.monotonic()
            assert _closed_after(sock, max(left, 0.1)) is not None, "still open after timeout"
            assert time.monotonic() - since >= TIMEOUT - 0.1, "closed before its timeout"


def _timed(call: object) -> float:
    started = time.monotonic()
    call()  # type: ignore[operator]
    return time.monotonic() - started


# ---- the gate's rule ------------------------------------------------------------------------
def test_the_gate_settings_come_from_the_environment_and_name_a_bad_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("HTTP_HEADER_TIMEOUT", "HTTP_BODY_TIMEOUT", "HTTP_STREAM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    assert slow_clients.ReadTimeouts.from_env() == slow_clients.ReadTimeouts(10.0, 10.0, 4)
    monkeypatch.setenv("HTTP_BODY_TIMEOUT", "0")
    with pytest.raises(ValueError, match="HTTP_BODY_TIMEOUT must be a positive number of sec"):
        slow_clients.ReadTimeouts.from_env()
    monkeypatch.setenv("HTTP_BODY_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="HTTP_BODY_TIMEOUT must be a number, got 'soon'"):
        slow_clients.ReadTimeouts.from_env()
    monkeypatch.delenv("HTTP_BODY_TIMEOUT")
    monkeypatch.setenv("HTTP_STREAM_THREADS", "0.5")  # was int(0.5): no stream thread at all
    with pytest.raises(ValueError, match=r"HTTP_STREAM_THREADS must be an integer, got '0\.5'"):
        slow_clients.ReadTimeouts.from_env()


def test_the_broker_and_jobsink_intake_refuses_a_timeout_of_zero_like_the_functions_gate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("HTTP_HEADER_TIMEOUT", "HTTP_BODY_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    assert ReadTimeouts.from_env() == ReadTimeouts(10.0, 10.0)
    monkeypatch.setenv("HTTP_HEADER_TIMEOUT", "0")  # a socket timeout of 0 is non-blocking
    with pytest.raises(ValueError, match="HTTP_HEADER_TIMEOUT must be a positive number of sec"):
        ReadTimeouts.from_env()


@pytest.mark.parametrize(
    ("data", "state"),
    [
        (b"", PARTIAL),
        (HALF_HEAD, PARTIAL),
        (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", WHOLE),
        (SMALL_BODY_HEAD, PARTIAL),
        (SMALL_BODY_HEAD + b"x" * 99, WHOLE),
        (HALF_HEAD + b"content-length:  3 \r\n\r\n{}", PARTIAL),
        (HALF_HEAD + b"content-length:  3 \r\n\r\n{} ", WHOLE),
        (HALF_HEAD + b"Transfer-Encoding: chunked\r\n\r\n", STREAMED),
        (HALF_HEAD + b"Expect: 100-continue\r\nContent-Length: 9\r\n\r\n", STREAMED),
        (HALF_HEAD + f"Content-Length: {GATE_BYTES}\r\n\r\n".encode(), STREAMED),
        (b"x" * GATE_BYTES, STREAMED),  # a head this long: the handler reads (and refuses) it
    ],
)
def test_the_gate_hands_over_a_request_once_its_head_and_a_body_that_fits_are_there(
    data: bytes, state: str
) -> None:
    assert request_state(data) == state


# ---- the predict function -------------------------------------------------------------------
@pytest.fixture(scope="module")
def predict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The function as shipped (one single-threaded worker per core, 2 here), without a model:
    /health and the reading of a body do not need one."""
    missing = tmp_path_factory.mktemp("no-model") / "model.onnx"
    env = {
        **PREDICT_SERVER_ENV,
        **SHORT,
        "WORKERS": "2",
        "MODEL_PATH": str(missing),
        "MODEL_METADATA_PATH": str(missing.with_name("metadata.json")),
        "MODEL_LOAD": "background",
    }
    process = FunctionProcess(env)
    try:
        process.wait_ready("/health")
        yield process.url
    finally:
        process.stop()


def test_predict_answers_while_more_slow_clients_than_workers_are_held_then_drops_them(
    predict: str,
) -> None:
    held = _slow_clients(predict, each=3)  # 9 connections, 2 workers
    for _ in range(5):
        took = _timed(lambda: http(predict + "/health", timeout=10))
        assert took < ANSWER_WITHIN
    assert http(predict + "/health")[0] == 200
    _assert_closed_after_the_timeout(held)


def test_large_bodies_that_stall_are_answered_408_after_the_body_timeout(predict: str) -> None:
    head = HALF_HEAD + f"Content-Length: {2 * GATE_BYTES}\r\n\r\n".encode()
    stalled = [socket.create_connection(_address(predict), timeout=10) for _ in range(3)]
    for sock in stalled:  # more than the workers: each one is read by a stream thread
        sock.sendall(head + b"[" * 100)
    since = time.monotonic()
    for _ in range(3):
        took = _timed(lambda: http(predict + "/health", timeout=10))
        assert took < ANSWER_WITHIN
    for sock in stalled:
        with sock:
            reply = _closed_after(sock, TIMEOUT + CLOSE_SLACK)
            assert reply is not None and reply.startswith(b"HTTP/1.1 408 "), reply
            assert b'"body_timeout"' in reply
    assert time.monotonic() - since >= TIMEOUT - 0.1


# ---- the events adapter: event flow under slow clients ------------------------------------
@pytest.mark.parametrize("threads", ["1", "2"])
def test_the_events_adapter_forwards_notifications_while_slow_clients_are_held(
    threads: str,
) -> None:
    sink = Subscriber(default=(202, {}, b"")).start()
    env = {**SHORT, "THREADS": threads, "WORKERS": "1", "K_SINK": sink.url, "ADAPTER_TOKEN": ""}
    source = ROOT / "functions" / "events-adapter" / "main.py"
    process = FunctionProcess(env, source=source, target="adapter")
    try:
        process.wait_ready("/")
        held = _slow_clients(process.url, each=2)
        notification = (ROOT / "events" / "examples" / "seaweedfs-create.json").read_bytes()
        for _ in range(3):
            took = _timed(
                lambda: http(
                    process.url + "/",
                    data=notification,
                    headers={"Content-Type": "application/json"},
                    timeout=10,
                )
            )
            assert took < ANSWER_WITHIN
        assert len(sink.received) == 3
        _assert_closed_after_the_timeout(held)
    finally:
        process.stop()
        sink.stop()


# ---- the local broker -----------------------------------------------------------------------
@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerServer]:
    services = tmp_path / "services.json"
    services.write_text("{}")
    config = BrokerConfig(
        port=0,
        manifests=ROOT / "infra" / "knative",
        services_file=services,
        dead_letter_file=tmp_path / "dead-letters.jsonl",
        read_timeouts=ReadTimeouts(header=TIMEOUT, body=TIMEOUT),
    )
    server = serve(config)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_the_broker_answers_while_slow_clients_are_held_then_drops_them(
    broker: BrokerServer,
) -> None:
    held = _slow_clients(broker.url, each=2)
    took = _timed(lambda: http(broker.url + "/healthz", timeout=10))
    assert took < ANSWER_WITHIN
    _assert_closed_after_the_timeout(held)


# ---- the local JobSink (the broker's intake, events.intake) ---------------------------------
def test_the_jobsink_answers_while_slow_clients_are_held_then_drops_them(tmp_path: Path) -> None:
    config = JobSinkConfig(
        port=0,
        manifests=tmp_path,  # no JobSink: only its intake is under test
        state_dir=tmp_path / "state",
        read_timeouts=ReadTimeouts(header=TIMEOUT, body=TIMEOUT),
    )
    server = JobSinkServer(JobSink(config))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        held = _slow_clients(server.url, each=2)
        took = _timed(lambda: http(server.url + "/healthz", timeout=10))
        assert took < ANSWER_WITHIN
        _assert_closed_after_the_timeout(held)
    finally:
        server.sink.stopping.set()
        server.shutdown()
        server.server_close()
