"""The predict function over HTTP: the real functions-framework process on a free port.

Local-file mode (MODEL_PATH) for the endpoints and every bad input; a real SeaweedFS (keys
required) for the object-store mode, the learning-curve proxy and the hot swap under load.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest
from support.predict_support import (
    LEARNING_CURVE_CSV,
    FunctionProcess,
    build_model,
    challenger_metadata,
    decision_document,
    http,
    patient_rows,
    reset_after_sending,
    tiny_png,
    write_local_model,
)
from support.seaweed_server import SeaweedServer

from readmission.contract import FEATURES, ID_COLUMNS, NUMERIC_FEATURES, TARGET
from readmission.localstack.processes import child_pids
from readmission.localstack.supervisor import PREDICT_SERVER_ENV
from readmission.serving.examples import EXAMPLE_PATIENT
from readmission.serving.routes import ROUTES
from readmission.serving.s3 import S3Error, S3Reader

MODEL = "diabetes_readmission_model"
BATCH_LIMIT = 50
MAX_BODY = 200_000
_JSON = "application/json"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("predict-model")
    write_local_model(directory)
    return directory


def _start(env: dict[str, str], ready: bool = True) -> FunctionProcess:
    """The function, answering, with all its gunicorn workers running."""
    process = FunctionProcess(env)
    try:
        process.wait_ready("/ready" if ready else "/health")
        _workers(process, int(env.get("WORKERS", "1")))
    except Exception:
        process.stop()
        raise
    return process


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[str]:
    """The function as the local stack and the Knative Service run it: one single-threaded
    gunicorn worker per core (WORKERS=2 at least, so the metrics are summed across workers)."""
    process = _start(
        {
            **PREDICT_SERVER_ENV,
            "WORKERS": str(max(2, int(PREDICT_SERVER_ENV["WORKERS"]))),
            "MODEL_PATH": str(model_dir / "model.onnx"),
            "MODEL_METADATA_PATH": str(model_dir / "metadata.json"),
            "PREDICT_BATCH_LIMIT": str(BATCH_LIMIT),
            "PREDICT_MAX_BODY_BYTES": str(MAX_BODY),
        }
    )
    try:
        yield process.url
    finally:
        process.stop()


def _json(response: tuple[int, dict[str, str], bytes]) -> Any:
    return json.loads(response[2])


# ---- the endpoints --------------------------------------------------------------------------
def test_predict_one_patient(server: str) -> None:
    status, headers, body = http(server + "/predict", {"features": EXAMPLE_PATIENT})
    assert status == 200 and headers["Content-Type"] == "application/json"
    result = json.loads(body)
    assert set(result) == {"readmission_prediction", "probabilities", "model_version"}
    assert result["model_version"] == "1"
    assert set(result["probabilities"]) == {"NO", ">30", "<30"}
    assert abs(sum(result["probabilities"].values()) - 1) < 1e-4
    assert result["readmission_prediction"] == max(
        result["probabilities"], key=result["probabilities"].get
    )


def test_explain_false_answers_byte_for_byte_as_without_and_true_adds_the_factors(
    server: str,
) -> None:
    body = {"features": EXAMPLE_PATIENT}
    plain = http(server + "/predict", body)
    assert plain[0] == 200
    assert http(server + "/predict?explain=false", body)[2] == plain[2]
    status, _, explained = http(server + "/predict?explain=true", body)
    assert status == 200
    answer = json.loads(explained)
    explanation = answer.pop("explanation")
    assert answer == json.loads(plain[2])
    assert explanation["method"] == "occlusion" and len(explanation["top_factors"]) == 5
    label = answer["readmission_prediction"]
    assert all(set(f["contribution"]) == {"<30", label} for f in explanation["top_factors"])
    status, _, error = http(server + "/predict?explain=maybe", body)
    assert status == 400 and json.loads(error)["field"] == "explain"


def test_batch_in_both_forms_matches_single_predictions(server: str) -> None:
    rows = patient_rows(10)
    wrapped = _json(http(server + "/predict/batch", {"instances": rows}))
    bare = _json(http(server + "/predict/batch", rows))
    assert wrapped == bare and wrapped["count"] == 10 and wrapped["model_version"] == "1"
    for row, result in zip(rows[:3], wrapped["predictions"], strict=False):
        single = _json(http(server + "/predict", {"features": row}))
        assert single["readmission_prediction"] == result["readmission_prediction"]
        assert single["probabilities"] == result["probabilities"]


def _post_in_pieces(url: str, body: bytes, *, chunked: bool) -> tuple[int, bytes]:
    """POST a body written in 1000-byte pieces with pauses: with a Content-Length, or chunked."""
    target = urllib.parse.urlsplit(url)
    connection = HTTPConnection(target.hostname, target.port, timeout=30)
    try:
        connection.putrequest("POST", target.path)
        connection.putheader("Content-Type", "application/json")
        if chunked:
            connection.putheader("Transfer-Encoding", "chunked")
        else:
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders()
        for start in range(0, len(body), 1000):
            piece = body[start : start + 1000]
            connection.send(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            time.sleep(0.002)
        if chunked:
            connection.send(b"0\r\n\r\n")
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_arriving_in_pieces_is_read_whole(server: str, chunked: bool) -> None:
    rows = patient_rows(BATCH_LIMIT)
    body = json.dumps({"instances": rows}).encode()
    assert len(body) > 20_000  # many socket reads
    status, raw = _post_in_pieces(server + "/predict/batch", body, chunked=chunked)
    assert status == 200, raw[:300]
    assert json.loads(raw) == _json(http(server + "/predict/batch", rows))


def test_health_ready_and_model_info(server: str) -> None:
    assert _json(http(server + "/health")) == {"status": "ok"}
    assert _json(http(server + "/ready"))["model_version"] == "1"
    info = _json(http(server + "/model-info"))
    assert info["name"] == MODEL and info["algorithm"] == "decision_tree"
    assert info["training_rows"] > 1000 and info["classes"] == ["<30", ">30", "NO"]
    assert info["metrics"]["test"]["f1_weighted"] == 0.5
    assert [i["column"] for i in info["inputs"]] == list(FEATURES)
    assert info["learning_curve"][1]["training_rows"] == "30000"
    assert info["example"] == EXAMPLE_PATIENT
    status, headers, png = http(server + info["learning_curve_png"])
    assert status == 200 and headers["Content-Type"] == "image/png" and png == tiny_png()


def test_metrics_names(server: str) -> None:
    http(server + "/predict", {"features": EXAMPLE_PATIENT})
    http(server + "/predict", {"features": dict(EXAMPLE_PATIENT, race="Martian")})
    text = http(server + "/metrics")[2].decode()
    assert 'predict_requests_total{code="200",endpoint="predict"}' in text
    assert 'predict_requests_total{code="422",endpoint="predict"}' in text
    assert 'predict_latency_seconds_bucket{endpoint="predict",le="0.005"}' in text
    assert 'predictions_total{prediction_class="' in text
    assert 'predict_errors_total{kind="unknown_category"}' in text
    assert "predict_requests_in_progress " in text
    assert 'predict_model_info{algorithm="decision_tree"' in text and 'version="1"' in text


def _v2_inputs(rows: list[dict[str, Any]], v2_metadata: dict[str, Any]) -> list[dict[str, Any]]:
    """The request a V2 client builds from GET /v2/models/{name}: one tensor per input."""
    return [
        {
            "name": tensor["name"],
            "datatype": tensor["datatype"],
            "shape": [len(rows), 1],
            "data": [row[tensor["parameters"]["column"]] for row in rows],
        }
        for tensor in v2_metadata["inputs"]
    ]


def test_kserve_v2_protocol(server: str) -> None:
    assert _json(http(server + "/v2/health/live")) == {"live": True}
    assert _json(http(server + "/v2/health/ready")) == {"ready": True}
    assert _json(http(server + "/v2"))["name"] == "readmission-predict"
    meta = _json(http(server + f"/v2/models/{MODEL}"))
    assert meta["versions"] == ["1"] and [i["name"] for i in meta["inputs"]] == list(FEATURES)
    assert {o["name"] for o in meta["outputs"]} == {"label", "probabilities"}
    assert _json(http(server + f"/v2/models/{MODEL}/ready")) == {"name": MODEL, "ready": True}
    info = _json(http(server + "/model-info"))
    rows = patient_rows(4)
    response = _json(
        http(server + f"/v2/models/{MODEL}/infer", {"id": "r1", "inputs": _v2_inputs(rows, meta)})
    )
    assert response["id"] == "r1" and response["model_version"] == "1"
    outputs = {o["name"]: o for o in response["outputs"]}
    assert outputs["label"]["shape"] == [4] and outputs["probabilities"]["shape"] == [4, 3]
    batch = _json(http(server + "/predict/batch", rows))["predictions"]
    assert outputs["label"]["data"] == [p["readmission_prediction"] for p in batch]
    flat = [p["probabilities"][c] for p in batch for c in info["classes"]]
    assert outputs["probabilities"]["data"] == flat
    only = _json(
        http(
            server + f"/v2/models/{MODEL}/infer",
            {"inputs": _v2_inputs(rows, meta), "outputs": [{"name": "label"}]},
        )
    )
    assert [o["name"] for o in only["outputs"]] == ["label"]


def test_v2_sends_the_explanation_output_only_when_asked_for_it(server: str) -> None:
    meta = _json(http(server + f"/v2/models/{MODEL}"))
    rows = patient_rows(3)
    url = server + f"/v2/models/{MODEL}/infer"
    outputs = [{"name": "label"}, {"name": "explanation"}]
    answer = _json(http(url, {"inputs": _v2_inputs(rows, meta), "outputs": outputs}))
    found = {o["name"]: o for o in answer["outputs"]}
    assert list(found) == ["label", "explanation"] and found["explanation"]["shape"] == [3]
    for row, text in zip(rows, found["explanation"]["data"], strict=True):
        single = _json(http(server + "/predict?explain=true", {"features": row}))
        assert json.loads(text) == single["explanation"]["top_factors"]
    plain = _json(http(url, {"inputs": _v2_inputs(rows, meta)}))
    assert [o["name"] for o in plain["outputs"]] == ["label", "probabilities"]


# ---- bad input: always 4xx with a JSON error naming the field -------------------------------
def _without(column: str) -> dict[str, Any]:
    return {k: v for k, v in EXAMPLE_PATIENT.items() if k != column}


BAD_JSON_CASES = [
    # (path, body, status, field, kind)
    ("/predict", {"features": _without("insulin")}, 422, "insulin", "missing_feature"),
    (
        "/predict",
        {"features": dict(EXAMPLE_PATIENT, num_procedures="lots")},
        422,
        "num_procedures",
        "invalid_type",
    ),
    ("/predict", {"features": dict(EXAMPLE_PATIENT, gender=["F"])}, 422, "gender", "invalid_type"),
    (
        "/predict",
        {"features": dict(EXAMPLE_PATIENT, age="[200-210)")},
        422,
        "age",
        "unknown_category",
    ),
    ("/predict", {"features": "Caucasian"}, 422, "features", "invalid_body"),
    ("/predict", {"patient": EXAMPLE_PATIENT}, 422, "features", "invalid_body"),
    ("/predict", [EXAMPLE_PATIENT], 422, "features", "invalid_body"),
    ("/predict/batch", {"instances": "all"}, 422, "instances", "invalid_body"),
    (
        "/predict/batch",
        {"instances": [EXAMPLE_PATIENT] * (BATCH_LIMIT + 1)},
        413,
        "instances",
        "batch_too_large",
    ),
    ("/predict/batch", [EXAMPLE_PATIENT, _without("race")], 422, "race", "missing_feature"),
    # an unknown key is refused, never ignored: a typo must not become a missing value
    (
        "/predict",
        {"features": dict(EXAMPLE_PATIENT, num_medication=12)},
        422,
        "num_medication",
        "unknown_feature",
    ),
    (
        "/predict/batch",
        [EXAMPLE_PATIENT, dict(EXAMPLE_PATIENT, num_medication=12)],
        422,
        "num_medication",
        "unknown_feature",
    ),
    (
        f"/v2/models/{MODEL}/infer",
        {"inputs": [{"name": "num_medication", "datatype": "FP32", "shape": [1, 1], "data": [12]}]},
        422,
        "num_medication",
        "unknown_input",
    ),
    ("/predict/batch", [], 422, None, "empty_batch"),
    (f"/v2/models/{MODEL}/infer", {"inputs": []}, 422, "race", "missing_feature"),
    (
        f"/v2/models/{MODEL}/infer",
        {"inputs": [{"name": "race", "datatype": "BYTES", "shape": [2, 1], "data": ["x"]}]},
        422,
        "race",
        "invalid_tensor",
    ),
    (
        f"/v2/models/{MODEL}/infer",
        {"inputs": [{"name": "bogus", "datatype": "FP32", "shape": [1, 1], "data": [1]}]},
        422,
        "bogus",
        "unknown_input",
    ),
    ("/v2/models/other/infer", {"inputs": []}, 404, "model_name", "unknown_model"),
]


@pytest.mark.parametrize(("path", "body", "status", "field", "kind"), BAD_JSON_CASES)
def test_bad_json_input(
    server: str, path: str, body: Any, status: int, field: str | None, kind: str
) -> None:
    code, headers, raw = http(server + path, body)
    assert code == status and headers["Content-Type"] == "application/json"
    error = json.loads(raw)
    assert (error["field"], error["kind"]) == (field, kind)
    assert error["error"]
    if kind == "unknown_category":
        assert "[70-80)" in error["allowed"]
    if path == "/predict/batch" and field in ("race", "num_medication"):
        assert error["row"] == 1
    if kind in ("unknown_feature", "unknown_input"):
        assert field in error["error"]


@pytest.mark.parametrize(
    ("path", "data", "content_type", "status", "kind"),
    [
        ("/predict", b'{"features": ', "application/json", 400, "invalid_json"),
        ("/predict", b"\xff\xfe", "application/json", 400, "invalid_json"),
        (
            "/predict",
            json.dumps({"features": EXAMPLE_PATIENT}).encode(),
            "text/plain",
            415,
            "unsupported_media_type",
        ),
        (
            "/predict/batch",
            b"[]",
            "application/x-www-form-urlencoded",
            415,
            "unsupported_media_type",
        ),
        ("/predict", b" " * (MAX_BODY + 1), "application/json", 413, "body_too_large"),
        (f"/v2/models/{MODEL}/infer", b"nope", "application/json", 400, "invalid_json"),
    ],
)
def test_bad_body(
    server: str, path: str, data: bytes, content_type: str, status: int, kind: str
) -> None:
    code, _, raw = http(
        server + path, data=data, headers={"Content-Type": content_type}, method="POST"
    )
    assert code == status
    error = json.loads(raw)
    assert error["kind"] == kind and "field" in error and error["error"]


# ---- malformed bodies and the input rule (issue #22 item 6) ---------------------------------
JSON_ENDPOINTS = ["/predict", "/predict/batch", f"/v2/models/{MODEL}/infer"]


def _v2_body(rows: list[dict[str, Any]], extra: dict[str, str] | None = None) -> dict[str, Any]:
    """A V2 infer request for rows: one [N, 1] tensor per column of the rows (FEATURES, and
    the columns in `extra`, name -> datatype)."""
    columns = {c: "FP32" if c in NUMERIC_FEATURES else "BYTES" for c in FEATURES}
    columns.update(extra or {})
    return {
        "inputs": [
            {
                "name": column,
                "datatype": datatype,
                "shape": [len(rows), 1],
                "data": [row[column] for row in rows],
            }
            for column, datatype in columns.items()
        ]
    }


def _still_serving(server: str) -> None:
    assert _json(http(server + "/health")) == {"status": "ok"}
    status, _, raw = http(server + "/predict", {"features": EXAMPLE_PATIENT})
    assert status == 200, raw[:300]


def _deep(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


def _deep_bodies(path: str, depth: int) -> list[str]:
    """JSON nested `depth` levels: bare (lists, objects) and inside an otherwise valid body."""
    patient = json.dumps(EXAMPLE_PATIENT)[1:-1]
    inside = {
        "/predict": f'{{"features": {{{patient}, "extra": {_deep(depth)}}}}}',
        "/predict/batch": f'{{"instances": [{{{patient}, "race": {_deep(depth)}}}]}}',
        f"/v2/models/{MODEL}/infer": '{"inputs": [{"name": "race", "datatype": "BYTES", '
        f'"shape": [1, 1], "data": {_deep(depth)}}}]}}',
    }[path]
    return [_deep(depth), '{"a": ' * depth + "1" + "}" * depth, inside]


@pytest.mark.parametrize("path", JSON_ENDPOINTS)
def test_json_nested_5000_levels_deep_is_a_400(server: str, path: str) -> None:
    for body in _deep_bodies(path, 5000):
        code, headers, raw = http(
            server + path, data=body.encode(), headers={"Content-Type": _JSON}, method="POST"
        )
        assert code == 400, (body[:40], code, raw[:300])
        assert headers["Content-Type"] == _JSON
        error = json.loads(raw)
        assert error["kind"] == "invalid_json" and "nested too deeply" in error["error"]
    _still_serving(server)


@pytest.mark.parametrize("path", JSON_ENDPOINTS)
def test_json_nested_just_within_the_parser_limit_is_a_4xx(server: str, path: str) -> None:
    """1,000 levels parse (orjson takes up to 1,024): what reads them must not recurse."""
    bodies = _deep_bodies(path, 1000)
    patient = json.dumps(EXAMPLE_PATIENT)[1:-1]
    if path == "/predict":
        bodies += [
            f'{{"features": {{{patient}, "race": {_deep(1000)}}}}}',
            f'{{"features": {{{patient}, "num_medications": {_deep(1000)}}}}}',
        ]
    if path.endswith("/infer"):
        bodies.append(
            json.dumps(_v2_body([EXAMPLE_PATIENT]))[:-1]
            + f', "outputs": [{{"name": {_deep(1000)}}}]}}'
        )
    for body in bodies:
        code, _, raw = http(
            server + path, data=body.encode(), headers={"Content-Type": _JSON}, method="POST"
        )
        assert 400 <= code < 500, (body[:40], body[-80:], code, raw[:300])
        error = json.loads(raw)
        assert error["kind"] != "internal" and error["error"]
    _still_serving(server)


def _exchange(server: str, request: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes, half-close, and read the reply until the server closes (a hang fails
    with a timeout instead)."""
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


BAD_CHUNKS = {
    "invalid size line": b"zz\r\n{}\r\n0\r\n\r\n",
    "negative size": b"-2\r\n{}\r\n0\r\n\r\n",
    "data longer than its size": b"2\r\n{}{}\r\n0\r\n\r\n",
    "cut off": b"a\r\n{}",
}


@pytest.mark.parametrize("chunks", list(BAD_CHUNKS.values()), ids=list(BAD_CHUNKS))
@pytest.mark.parametrize("path", JSON_ENDPOINTS)
def test_a_malformed_chunked_body_is_a_400(server: str, path: str, chunks: bytes) -> None:
    reply = _exchange(
        server,
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
        + b"Transfer-Encoding: chunked\r\n\r\n"
        + chunks,
    )
    assert reply.startswith(b"HTTP/1.1 400"), reply[:300]
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"application/json" in head.lower()
    error = json.loads(body)
    assert error["kind"] == "unreadable_body" and error["field"] is None and error["error"]
    _still_serving(server)


def test_a_malformed_chunked_body_closes_a_kept_alive_connection(model_dir: Path) -> None:
    """With THREADS > 1 gunicorn keeps connections open; after an unreadable body the next
    request cannot be framed, so the 400 closes the connection."""
    process = _start(
        {
            "WORKERS": "1",
            "THREADS": "4",
            "MODEL_PATH": str(model_dir / "model.onnx"),
            "MODEL_METADATA_PATH": str(model_dir / "metadata.json"),
        }
    )
    try:
        reply = _exchange(
            process.url,
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + BAD_CHUNKS["invalid size line"],
        )
        head = reply.partition(b"\r\n\r\n")[0]
        assert head.startswith(b"HTTP/1.1 400") and b"Connection: close" in head, reply[:300]
        _still_serving(process.url)
    finally:
        process.stop()


def test_ids_and_the_target_are_ignored_on_every_endpoint(server: str) -> None:
    """The one input rule: the model's inputs are required; the data file's other columns
    (the ids and the target) are accepted and ignored; any other key is refused (above)."""
    rows = patient_rows(3)
    full = [
        dict(row, encounter_id=7 + i, patient_nbr=11, readmitted="NO") for i, row in enumerate(rows)
    ]
    assert set(full[0]) == set(FEATURES) | set(ID_COLUMNS) | {TARGET}
    plain = _json(http(server + "/predict", {"features": rows[0]}))
    assert _json(http(server + "/predict", {"features": full[0]})) == plain
    batch = _json(http(server + "/predict/batch", rows))
    assert _json(http(server + "/predict/batch", {"instances": full})) == batch
    v2_url = server + f"/v2/models/{MODEL}/infer"
    extra = {"encounter_id": "INT64", "patient_nbr": "INT64", "readmitted": "BYTES"}
    status, _, raw = http(v2_url, _v2_body(full, extra))
    assert status == 200, raw[:300]
    assert json.loads(raw) == _json(http(v2_url, _v2_body(rows)))


def test_v2_infer_has_the_batch_limit_of_predict_batch(server: str) -> None:
    v2_url = server + f"/v2/models/{MODEL}/infer"
    assert http(v2_url, _v2_body([EXAMPLE_PATIENT] * BATCH_LIMIT))[0] == 200
    too_many = [EXAMPLE_PATIENT] * (BATCH_LIMIT + 1)
    for url, body, field in (
        (v2_url, _v2_body(too_many), "inputs"),
        (server + "/predict/batch", too_many, "instances"),
    ):
        code, _, raw = http(url, body)
        assert code == 413, raw[:300]
        error = json.loads(raw)
        assert (error["kind"], error["field"]) == ("batch_too_large", field)
        assert str(BATCH_LIMIT) in error["error"]


def test_content_length_is_checked_before_reading(server: str) -> None:
    """A huge Content-Length is refused at once, without waiting for a body never sent."""
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\n\r\n"
        )
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        # the body never sent may still come: the function lingers and drops it (no reset)
        assert not reset_after_sending(sock)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b'"kind":"body_too_large"' in reply


def test_a_finished_connection_is_closed_without_waiting_for_the_client(server: str) -> None:
    """gunicorn's sync worker answers one request per connection and, since gunicorn 26,
    lingers until the client closes (up to 2 s), serving nothing else meanwhile. The function
    reads every body to its end, so it closes at once (readmission.glue.http_close): bytes sent
    after the reply then meet a closed socket and are answered with a reset."""
    host, port = server.removeprefix("http://").split(":")
    body = json.dumps({"features": EXAMPLE_PATIENT}).encode()
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
        assert b"readmission_prediction" in reply
        assert reset_after_sending(sock)


def test_unknown_path_and_method(server: str) -> None:
    code, _, raw = http(server + "/predictions")
    assert code == 404 and json.loads(raw)["kind"] == "not_found"
    code, _, raw = http(server + "/predict")
    assert code == 405 and json.loads(raw)["kind"] == "method_not_allowed"
    assert http(server + "/assets/../main.py")[0] == 404


# ---- OpenAPI --------------------------------------------------------------------------------
def test_openapi_documents_exactly_what_the_server_answers(server: str) -> None:
    document = _json(http(server + "/openapi.json"))
    assert document["openapi"].startswith("3.")
    documented = {
        (method.upper(), path) for path, item in document["paths"].items() for method in item
    }
    assert documented == set(ROUTES)
    v2_metadata = _json(http(server + f"/v2/models/{MODEL}"))
    bodies = {
        "/predict": {"features": EXAMPLE_PATIENT},
        "/predict/batch": [EXAMPLE_PATIENT],
        "/v2/models/{model_name}/infer": {"inputs": _v2_inputs([EXAMPLE_PATIENT], v2_metadata)},
    }
    for method, template in sorted(documented):
        path = template.replace("{model_name}", MODEL).replace("{filename}", "app.js")
        code, _, _ = http(server + path, bodies.get(template), method=method)
        assert code == 200, (method, path, code)
    features = document["components"]["schemas"]["Features"]
    assert features["required"] == list(FEATURES)
    assert features["additionalProperties"] is False  # the input rule: unknown keys are 422
    assert set(features["properties"]) == {*FEATURES, *ID_COLUMNS, TARGET}
    assert "Caucasian" in features["properties"]["race"]["anyOf"][0]["enum"]


def test_openapi_document_is_valid(server: str) -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(_json(http(server + "/openapi.json")))


# ---- other modes ----------------------------------------------------------------------------
def test_not_ready_until_a_model_appears(tmp_path: Path) -> None:
    process = _start(
        {
            "MODEL_PATH": str(tmp_path / "model.onnx"),
            "MODEL_METADATA_PATH": str(tmp_path / "metadata.json"),
        },
        ready=False,
    )
    try:
        assert http(process.url + "/health")[0] == 200
        for path in ("/ready", "/v2/health/ready", "/model-info"):
            code, _, raw = http(process.url + path)
            assert code == 503 and json.loads(raw)["kind"] == "model_not_ready", path
        code, _, raw = http(process.url + "/predict", {"features": EXAMPLE_PATIENT})
        assert code == 503 and json.loads(raw)["kind"] == "model_not_ready"
        write_local_model(tmp_path)
        process.wait_ready(timeout=30)
        assert http(process.url + "/predict", {"features": EXAMPLE_PATIENT})[0] == 200
    finally:
        process.stop()


def test_unseen_category_policy(model_dir: Path) -> None:
    process = _start(
        {
            "MODEL_PATH": str(model_dir / "model.onnx"),
            "MODEL_METADATA_PATH": str(model_dir / "metadata.json"),
            "UNKNOWN_CATEGORY_POLICY": "unseen",
        }
    )
    try:
        code, _, raw = http(
            process.url + "/predict",
            {"features": dict(EXAMPLE_PATIENT, medical_specialty="Astrology")},
        )
        assert code == 200
        assert "medical_specialty" in json.loads(raw)["warnings"][0]
        document = _json(http(process.url + "/openapi.json"))
        assert "anyOf" not in document["components"]["schemas"]["Features"]["properties"]["race"]
    finally:
        process.stop()


@pytest.mark.parametrize("load_mode", ["eager", "background"])
def test_model_loaded_before_the_fork_serves_in_the_worker(model_dir: Path, load_mode: str) -> None:
    """gunicorn forks after import: a session with its own thread pool (2 intra-op threads)
    loaded in the master must still answer in the worker (it is rebuilt there)."""
    process = _start(
        {
            "MODEL_PATH": str(model_dir / "model.onnx"),
            "MODEL_METADATA_PATH": str(model_dir / "metadata.json"),
            "MODEL_LOAD": load_mode,
            "ORT_INTRA_OP_THREADS": "2",
        }
    )
    try:
        code, _, raw = http(process.url + "/predict/batch", patient_rows(30), timeout=20)
        assert code == 200 and json.loads(raw)["count"] == 30
    finally:
        process.stop()


def test_workers_exit_cleanly_when_the_function_stops(model_dir: Path) -> None:
    """Knative stops the function at every scale-down. gunicorn's workers must end without
    aborting: an onnxruntime thread started in the master (by importing it there) was copied
    into each worker, which joined it on exit and aborted ("terminate called ...
    std::system_error"), in most stops."""
    for _ in range(3):
        process = _start(
            {
                "MODEL_PATH": str(model_dir / "model.onnx"),
                "MODEL_METADATA_PATH": str(model_dir / "metadata.json"),
                **PREDICT_SERVER_ENV,
            }
        )
        try:
            _predict_concurrently(process.url, 8)
        finally:
            output = process.stop()
        assert "terminate called" not in output and "system_error" not in output, output
        assert process.process.returncode == 0, output  # not killed after the 10 s grace


def test_a_worker_told_to_stop_while_it_builds_its_session_stops(model_dir: Path) -> None:
    """A stop that arrives as the workers start (Knative scaling a pod down that has just
    come up): each worker builds its session right after gunicorn's fork; a SIGTERM then must
    neither be lost (the worker served on until gunicorn's 30 s graceful timeout) nor abort
    the worker in the middle of onnxruntime's initialisation."""
    env = {
        "MODEL_PATH": str(model_dir / "model.onnx"),
        "MODEL_METADATA_PATH": str(model_dir / "metadata.json"),
        **PREDICT_SERVER_ENV,
    }
    for _ in range(3):
        process = FunctionProcess(env)
        try:
            _workers(process, int(env["WORKERS"]))  # forked, not yet serving
        finally:
            output = process.stop()
        assert "terminate called" not in output and "Traceback" not in output, output
        assert process.process.returncode == 0, output  # not killed after the 10 s grace


def _metric(text: str, series: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def _workers(process: FunctionProcess, count: int, gone: int | None = None) -> set[int]:
    """gunicorn's `count` workers (the children of its master) once all run and `gone` is not
    one of them: the master forks them one after the other, and replaces a dead one."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        workers = set(child_pids(process.process.pid))
        if len(workers) == count and gone not in workers:
            return workers
        time.sleep(0.05)
    raise AssertionError(f"gunicorn's workers: {child_pids(process.process.pid)}, not {count}")


def _predict_concurrently(url: str, requests: int, clients: int = 4) -> None:
    codes: list[int] = []

    def client(n: int) -> None:
        codes.extend(http(url + "/predict", {"features": EXAMPLE_PATIENT})[0] for _ in range(n))

    threads = [threading.Thread(target=client, args=(requests // clients,)) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert codes == [200] * requests


def test_metrics_are_summed_across_workers_and_survive_a_worker_crash(
    model_dir: Path, tmp_path: Path
) -> None:
    metrics_dir = tmp_path / "metrics"
    process = _start(
        {
            "MODEL_PATH": str(model_dir / "model.onnx"),
            "MODEL_METADATA_PATH": str(model_dir / "metadata.json"),
            "WORKERS": "2",
            "THREADS": "1",
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        }
    )
    answered = 'predict_requests_total{code="200",endpoint="predict"}'
    try:
        workers = _workers(process, 2)
        sent, histogram_pids = 0, set()
        for _ in range(10):  # until both workers have answered (each writes its own files);
            # on a busy machine one worker may take a whole round
            _predict_concurrently(process.url, 40)
            sent += 40
            histogram_pids = {
                int(p.stem.rsplit("_", 1)[1]) for p in metrics_dir.glob("histogram_*")
            }
            if histogram_pids == workers:
                break
        assert set(child_pids(process.process.pid)) == workers
        assert histogram_pids == workers
        # every scrape counts all requests, whichever worker answers it
        for _ in range(6):
            text = http(process.url + "/metrics")[2].decode()
            assert _metric(text, answered) == sent
            assert _metric(text, "predict_requests_in_progress") == 0
            assert 'predict_model_info{algorithm="decision_tree"' in text
            assert "process_resident_memory_bytes" not in text  # would be one worker's

        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        _workers(process, 2, gone=victim)
        process.wait_ready()
        _predict_concurrently(process.url, 8)
        # the dead worker's counts stay; its in-progress gauge is forgotten by its replacement
        for _ in range(6):
            text = http(process.url + "/metrics")[2].decode()
            assert _metric(text, answered) == sent + 8
            assert _metric(text, "predict_requests_in_progress") == 0
        assert not list(metrics_dir.glob(f"gauge_live*_{victim}.db"))
    finally:
        process.stop()


# ---- object-store mode (SeaweedFS with keys) ------------------------------------------------
def _publish(store: Any, version: str, algorithm: str) -> None:
    """What the aggregator does: ONNX and plots first, champion metadata last."""
    onnx_bytes, metadata = build_model(algorithm, version)
    store.put_object(Bucket="models", Key=metadata["model_key"], Body=onnx_bytes)
    store.put_object(Bucket="models", Key=metadata["learning_curve"]["png"], Body=tiny_png())
    store.put_object(
        Bucket="models", Key=metadata["learning_curve"]["csv"], Body=LEARNING_CURVE_CSV
    )
    store.put_object(
        Bucket="models", Key="champion/metadata.json", Body=json.dumps(metadata).encode()
    )


@pytest.fixture(scope="module")
def seaweed() -> Iterator[SeaweedServer]:
    server = SeaweedServer().start()
    try:
        server.client().create_bucket(Bucket="models")  # type: ignore[attr-defined]
        yield server
    finally:
        server.stop()


def test_s3_reader_signs_requests(seaweed: SeaweedServer) -> None:
    client: Any = seaweed.client()
    client.put_object(Bucket="models", Key="dir/a file+x.bin", Body=b"payload")
    reader = S3Reader(seaweed.endpoint_url, seaweed.access_key, seaweed.secret_key)
    found = reader.get("models", "dir/a file+x.bin")
    assert found is not None and found.data == b"payload"
    assert reader.head_etag("models", "dir/a file+x.bin") == found.etag
    assert reader.get("models", "missing") is None and reader.head_etag("models", "nx") is None
    unchanged = reader.get("models", "dir/a file+x.bin", if_none_match=found.etag)
    assert unchanged is not None and unchanged.not_modified and unchanged.data == b""
    changed = reader.get("models", "dir/a file+x.bin", if_none_match="0" * 32)
    assert changed is not None and not changed.not_modified and changed.data == b"payload"
    assert reader.get("models", "missing", if_none_match=found.etag) is None
    wrong = S3Reader(seaweed.endpoint_url, seaweed.access_key, "not-the-secret")
    with pytest.raises(S3Error) as info:
        wrong.get("models", "dir/a file+x.bin")
    assert info.value.status == 403


def test_store_mode_hot_swap_under_load(seaweed: SeaweedServer) -> None:
    """Continuous requests while the champion changes in the bucket: zero failures."""
    store: Any = seaweed.client()
    _publish(store, "1", "decision_tree")
    process = _start({**seaweed.env(), "MODEL_POLL_SECONDS": "0.3"})
    rows = patient_rows(5)
    failures: list[str] = []
    versions: list[str] = []
    answers: list[tuple[float, float, str]] = []  # (sent, answered, version)
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            sent = time.monotonic()
            code, _, raw = http(process.url + "/predict/batch", rows, timeout=10)
            if code != 200:
                failures.append(f"{code} {raw[:200]!r}")
            else:
                version = json.loads(raw)["model_version"]
                answers.append((sent, time.monotonic(), version))
                versions.append(version)

    threads = [threading.Thread(target=client) for _ in range(3)]
    try:
        status, _, png = http(process.url + "/model/learning-curve.png")
        assert status == 200 and png == tiny_png()
        assert _json(http(process.url + "/model-info"))["learning_curve"][0]["cumulative_index"]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        _publish(store, "2", "logistic_regression")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not versions or versions[-1] != "2"):
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        process.stop()
    assert failures == [], failures[:3]
    assert {version for *_, version in answers} == {"1", "2"}, versions[-5:]
    # once swapped, never back: a request sent after some answer came from v2 gets v2 (v1
    # answers arriving later are requests that were in flight on v1, as they should be)
    first_v2 = min(answered for _, answered, version in answers if version == "2")
    late = [
        (sent - first_v2, version)
        for sent, _, version in answers
        if version == "1" and sent >= first_v2
    ]
    assert late == []
    assert max(answers)[2] == "2"  # the last request sent was answered by the new model


def test_store_mode_hot_swap_reaches_every_worker(seaweed: SeaweedServer) -> None:
    """With two workers, each polls and swaps on its own: no request fails, and within a few
    poll intervals every answer, whichever worker gives it, comes from the new model."""
    store: Any = seaweed.client()
    _publish(store, "1", "decision_tree")
    process = _start({**seaweed.env(), "MODEL_POLL_SECONDS": "0.3", "WORKERS": "2", "THREADS": "1"})
    results: list[tuple[int, str]] = []
    lock = threading.Lock()

    def client(stop: threading.Event) -> None:
        while not stop.is_set():
            code, _, raw = http(process.url + "/predict", {"features": EXAMPLE_PATIENT})
            with lock:
                results.append((code, json.loads(raw).get("model_version", "") if raw else ""))

    stop = threading.Event()
    threads = [threading.Thread(target=client, args=(stop,)) for _ in range(4)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        _publish(store, "2", "logistic_regression")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with lock:
                tail = results[-40:]
            if len(tail) == 40 and all(version == "2" for _, version in tail):
                break
            time.sleep(0.1)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        process.stop()
    assert {code for code, _ in results} == {200}
    assert {version for _, version in results} == {"1", "2"}
    assert all(version == "2" for _, version in results[-40:]), results[-40:]


def test_store_mode_shows_the_challenger_and_the_last_decision(seaweed: SeaweedServer) -> None:
    """challenger/metadata.json and champion/last-decision.json beside the champion: null
    while absent, shown after the next poll, null when unreadable (serving unaffected)."""
    store: Any = seaweed.client()
    _publish(store, "1", "decision_tree")

    def put(key: str, document: Any) -> None:
        body = document if isinstance(document, bytes) else json.dumps(document).encode()
        store.put_object(Bucket="models", Key=key, Body=body)

    def gate_info(check: Any) -> dict[str, Any]:
        """/model-info once `check(info)` holds (the poll thread reads the objects)."""
        deadline = time.monotonic() + 15
        while True:
            info = _json(http(process.url + "/model-info"))
            if check(info) or time.monotonic() > deadline:
                return info
            time.sleep(0.1)

    process = _start({**seaweed.env(), "MODEL_POLL_SECONDS": "0.3"})
    try:
        time.sleep(0.5)  # the poll thread has read both objects (missing) by now
        info = _json(http(process.url + "/model-info"))
        assert info["version"] == "1" and "learning_curve" in info
        assert info["challenger"] is None and info["last_decision"] is None
        put("challenger/metadata.json", challenger_metadata("2"))
        put("champion/last-decision.json", decision_document("kept"))
        info = gate_info(lambda i: i["challenger"] and i["last_decision"])
        assert info["challenger"]["version"] == "2"
        assert info["challenger"]["corpus_version"] == "0000000000000002"
        assert info["challenger"]["test_score"] == 0.5712
        assert info["challenger"]["training_rows"] == 2103
        assert info["last_decision"] == decision_document("kept")
        put("champion/last-decision.json", b"{not json")
        info = gate_info(lambda i: i["last_decision"] is None)
        assert info["last_decision"] is None and info["challenger"]["version"] == "2"
        assert http(process.url + "/ready")[0] == 200
        status, _, raw = http(process.url + "/predict", {"features": EXAMPLE_PATIENT})
        assert status == 200 and json.loads(raw)["model_version"] == "1"
        put("challenger/metadata.json", challenger_metadata("3", "random_forest"))
        put("champion/last-decision.json", decision_document("promoted", "3", "1", sequence=4))
        info = gate_info(lambda i: i["last_decision"] and i["challenger"]["version"] == "3")
        assert info["challenger"]["algorithm"] == "random_forest"
        assert info["last_decision"]["verdict"] == "promoted"
        assert info["last_decision"]["sequence"] == 4
        store.delete_object(Bucket="models", Key="challenger/metadata.json")
        assert gate_info(lambda i: i["challenger"] is None)["challenger"] is None
    finally:
        output = process.stop()
        store.delete_object(Bucket="models", Key="challenger/metadata.json")
        store.delete_object(Bucket="models", Key="champion/last-decision.json")
    assert "champion/last-decision.json is not valid JSON" in output


def test_store_mode_wrong_credentials_is_not_ready(seaweed: SeaweedServer) -> None:
    env = {**seaweed.env(), "AWS_SECRET_ACCESS_KEY": "wrong"}
    process = _start(env, ready=False)
    try:
        code, _, raw = http(process.url + "/ready")
        assert code == 503 and "403" in json.loads(raw)["detail"]
    finally:
        process.stop()


def test_store_mode_shows_the_latest_drift_report_and_its_psi_gauges(
    seaweed: SeaweedServer,
) -> None:
    """reports/latest-drift.json (written by ingest): null and no gauge while absent; after
    the next poll a summary on /model-info and one readmission_drift_psi series per column."""
    store: Any = seaweed.client()
    _publish(store, "1", "decision_tree")
    report = {
        "drop_id": "0123456789abcdef",
        "status": "drifted",
        "message": "1 drifted (age)",
        "rows": 5000,
        "reference": {"model_version": "1", "corpus_version": "0000000000000001", "rows": 900},
        "thresholds": {"watch": 0.1, "drifted": 0.2},
        "drifted": ["age"],
        "watch": [],
        "max_psi": 0.8125,
        "columns": {
            "age": {"psi": 0.8125, "status": "drifted", "unseen": {"rows": 0}},
            "admission_type_id": {"psi": 0.03125, "status": "stable", "unseen": {"rows": 7}},
        },
        "target": {"column": "readmitted", "psi": 0.0625, "status": "stable"},
    }
    process = _start({**seaweed.env(), "MODEL_POLL_SECONDS": "0.3"})
    try:
        time.sleep(0.5)
        assert _json(http(process.url + "/model-info"))["drift"] is None
        assert "readmission_drift_psi{" not in http(process.url + "/metrics")[2].decode()
        store.put_object(
            Bucket="models", Key="reports/latest-drift.json", Body=json.dumps(report).encode()
        )
        deadline = time.monotonic() + 15
        while (drift := _json(http(process.url + "/model-info"))["drift"]) is None:
            assert time.monotonic() < deadline, "the drift report was never read"
            time.sleep(0.1)
        assert (drift["status"], drift["drifted"], drift["drop_id"]) == (
            "drifted",
            ["age"],
            "0123456789abcdef",
        )
        assert [(c["column"], c["status"], c["unseen"]) for c in drift["top"]] == [
            ("age", "drifted", 0),
            ("readmitted", "stable", None),
            ("admission_type_id", "stable", 7),
        ]
        scraped = http(process.url + "/metrics")[2].decode()
        assert 'readmission_drift_psi{column="age"} 0.8125' in scraped
        assert 'readmission_drift_psi{column="admission_type_id"} 0.03125' in scraped
        assert 'readmission_drift_psi{column="readmitted"} 0.0625' in scraped
    finally:
        process.stop()
        store.delete_object(Bucket="models", Key="reports/latest-drift.json")
