"""The prediction log: the stdlib Parquet writer, the spool's records, batching by rows and
seconds against a real SeaweedFS, retry of refused batches, and the predict function
(gunicorn, several workers) writing every answered request by the time it has stopped, those
of workers killed mid-serving included."""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.predict_support import FunctionProcess, build_model, http, patient_rows
from support.seaweed_server import SeaweedServer

from readmission.contract import NUMERIC_FEATURES
from readmission.localstack.processes import child_pids
from readmission.localstack.supervisor import PREDICT_SERVER_ENV
from readmission.serving.log_spool import SpoolReader, SpoolWriter, encode_record
from readmission.serving.parquet import Column, write_table
from readmission.serving.prediction_log import PredictionLog, request_id
from readmission.serving.s3 import S3Reader

LOG_BUCKET = "predictions-log"


def _read(data: bytes) -> pa.Table:
    return pq.read_table(io.BytesIO(data))


def test_parquet_writer_round_trips_through_pyarrow() -> None:
    rows = 300
    columns = [
        Column("text", "string", [f"é{i}" if i % 7 else "" for i in range(rows)]),
        Column("utf8", "string", [f'{{"é":{i}}}'.encode() for i in range(rows)]),
        Column("maybe", "string", [None if i % 3 else str(i) for i in range(rows)], True),
        Column("count", "int64", [i - 150 for i in range(rows)]),
        Column("sparse", "int64", [i if i >= 290 else None for i in range(rows)], True),
        Column("at", "timestamp_ms", [1_764_000_000_000 + i for i in range(rows)]),
        Column("p", "double", [i / 7 for i in range(rows)]),
    ]
    table = _read(write_table(columns, rows))
    assert table.num_rows == rows
    assert str(table.schema.field("at").type) == "timestamp[ms, tz=UTC]"
    assert not table.schema.field("text").nullable and table.schema.field("maybe").nullable
    for column in columns:
        got = table.column(column.name).to_pylist()
        if column.kind == "timestamp_ms":
            got = [int(v.timestamp() * 1000) for v in got]
        if column.name == "utf8":  # bytes holding UTF-8 are written as they are
            got = [v.encode() for v in got]
        assert got == list(column.values), column.name


def test_parquet_writer_refuses_a_null_in_a_required_column() -> None:
    with pytest.raises(ValueError, match="required"):
        write_table([Column("x", "string", ["a", None])], 2)
    with pytest.raises(ValueError, match="values"):
        write_table([Column("x", "double", [1.0])], 2)


def test_request_ids_are_kept_when_plausible_else_made() -> None:
    assert request_id("abc-123_X.y:z") == "abc-123_X.y:z"
    made = {request_id(None), request_id(""), request_id("has space"), request_id("x" * 129)}
    assert len(made) == 4 and all(len(m) == 32 for m in made)


@pytest.fixture(scope="module")
def seaweed() -> Iterator[SeaweedServer]:
    server = SeaweedServer().start()
    try:
        server.client().create_bucket(Bucket="models")  # type: ignore[attr-defined]
        yield server
    finally:
        server.stop()


def _reader(seaweed: SeaweedServer) -> S3Reader:
    return S3Reader(seaweed.endpoint_url, seaweed.access_key, seaweed.secret_key)


def _objects(seaweed: SeaweedServer, bucket: str, prefix: str = "") -> dict[str, bytes]:
    client: Any = seaweed.client()
    found = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in found}


CLASSES = ("<30", ">30", "NO")


def _record(log: PredictionLog, rid: str, n: int = 1, version: str = "7") -> None:
    rows = [{"age": "[50-60)", "encounter_id": 100 + i} for i in range(n)]
    log.record_rows(rid, version, CLASSES, "batch", ["NO"] * n, [[0.1, 0.2, 0.7]] * n, rows)


def test_spooled_records_are_read_once_whole_and_a_torn_end_only_when_the_writer_is_gone(
    tmp_path: Path,
) -> None:
    writer, reader = SpoolWriter(tmp_path), SpoolReader(tmp_path)
    body = json.dumps({"features": {"age": "[70-80)"}}).encode()
    first = encode_record(
        "a", 1.5, "3", CLASSES, "predict", ["NO"], [[0.2, 0.3, 0.5]], body, "features"
    )
    writer.append(first)
    (record,) = reader.read()
    assert (record.request_id, record.time, record.version, record.labels) == (
        "a",
        1.5,
        "3",
        ["NO"],
    )
    assert record.probabilities == [[0.2, 0.3, 0.5]]
    assert record.logged_rows() == ([b'{"age":"[70-80)"}'], [None])
    assert reader.read() == []  # read once
    (spool,) = tmp_path.iterdir()
    with spool.open("ab") as torn:  # half a record: its writer is still at work
        torn.write(first[:10])
    assert reader.read() == [] and spool.exists()
    writer.close()  # the writer is gone: the torn end is dropped, the file deleted
    assert reader.read() == [] and reader.torn_records == 1
    assert list(tmp_path.iterdir()) == []


def test_every_kind_of_record_logs_the_rows_as_the_request_carried_them() -> None:
    """A single-row body as received and rows a handler has parsed (record_rows: each row's
    JSON, no body) give the same features and encounter ids."""
    rows = [
        {"age": "[50-60)", "encounter_id": 7, "diag_1": "250.8"},
        {"encounter_id": "x-9", "payer_code": "?", "note": 'é\u2028"q"'},
        {"age": None},
    ]
    written: list[bytes] = []
    log = PredictionLog(lambda key, data: written.append(data), rows=10**6, seconds=3600)
    probabilities = [[0.1, 0.2, 0.7]] * 3
    for i, row in enumerate(rows):
        body = json.dumps({"features": row}).encode()
        log.record(f"one-{i}", "7", CLASSES, "predict", ["NO"], probabilities[:1], body, "features")
    log.record_rows("parsed", "7", CLASSES, "batch", ["NO"] * 3, probabilities, rows)
    assert log.flush() == 6
    (table,) = [_read(data) for data in written]
    logged: dict[str, list[tuple[Any, Any]]] = {}
    for row in table.to_pylist():
        request = "one" if row["request_id"].startswith("one-") else row["request_id"]
        logged.setdefault(request, []).append((json.loads(row["features"]), row["encounter_id"]))
    expected = [
        (row, None if "encounter_id" not in row else str(row["encounter_id"])) for row in rows
    ]
    assert logged == {"one": expected, "parsed": expected}
    log.close()


def test_a_record_whose_rows_cannot_be_found_is_dropped_and_counted_and_the_rest_shipped() -> None:
    written: list[bytes] = []
    log = PredictionLog(lambda key, data: written.append(data), rows=10**6, seconds=3600)
    probabilities = [[0.1, 0.2, 0.7]] * 2
    rows = json.dumps([{"age": "[50-60)"}, {}]).encode()  # a kind this version never writes
    log.record("old", "7", CLASSES, "batch", ["NO"] * 2, probabilities, rows, "instances")
    body = json.dumps({"age": "[50-60)"}).encode()  # no "features" key
    log.record("broken", "7", CLASSES, "predict", ["NO"], probabilities[:1], body, "features")
    log.record_rows("good", "7", CLASSES, "batch", ["NO"] * 2, probabilities, [{}, {}])
    assert log.flush() == 2
    (table,) = [_read(data) for data in written]
    assert set(table.column("request_id").to_pylist()) == {"good"}
    assert log.dropped_rows == 3
    log.close()


def test_a_reader_behind_its_writers_catches_up_in_bounded_steps(tmp_path: Path) -> None:
    writer, reader = SpoolWriter(tmp_path), SpoolReader(tmp_path)
    body = json.dumps({"features": {"age": "[70-80)"}}).encode()
    records = [
        encode_record(
            f"r{i}", 1.0, "3", CLASSES, "predict", ["NO"], [[0.2, 0.3, 0.5]], body, "features"
        )
        for i in range(10)
    ]
    for record in records:
        writer.append(record)
    writer.close()
    steps = [reader.read(budget=3 * len(records[0])) for _ in range(5)]
    assert [len(step) for step in steps] == [3, 3, 3, 1, 0]
    assert [r.request_id for step in steps for r in step] == [f"r{i}" for i in range(10)]
    assert list(tmp_path.iterdir()) == []
    writer.append(records[0])
    assert [r.request_id for r in reader.read(budget=10)] == ["r0"]  # longer than the budget


def test_a_writer_past_its_bound_waits_for_the_reader_and_writes_on_if_it_never_comes(
    tmp_path: Path,
) -> None:
    body = json.dumps({"features": {"age": "[70-80)"}}).encode()
    record = encode_record(
        "r", 1.0, "3", CLASSES, "predict", ["NO"], [[0.2, 0.3, 0.5]], body, "features"
    )
    # two records a file, two finished files unread at most
    writer = SpoolWriter(tmp_path, len(record) * 2, len(record) * 4, wait_seconds=10)
    reader = SpoolReader(tmp_path)
    for _ in range(4):
        writer.append(record)
    threading.Timer(0.5, reader.read).start()  # reads both finished files, 0.5 s from now
    started = time.monotonic()
    writer.append(record)  # a third finished file would pass the bound: waits for the read
    assert 0.4 < time.monotonic() - started < 5 and writer.waited_seconds > 0.4
    impatient = SpoolWriter(tmp_path / "stuck", len(record), len(record), wait_seconds=0.3)
    (tmp_path / "stuck").mkdir()
    for _ in range(3):  # nobody reads: each rotation waits 0.3 s, then writes on
        impatient.append(record)
    assert impatient.dropped_records == 0 and impatient.waited_seconds >= 0.6
    impatient.close()
    assert len(SpoolReader(tmp_path / "stuck").read()) == 3


def test_batches_are_cut_by_rows_and_by_seconds(seaweed: SeaweedServer) -> None:
    client: Any = seaweed.client()
    client.create_bucket(Bucket="log-timing")
    reader = _reader(seaweed)
    log = PredictionLog(
        lambda key, data: reader.put("log-timing", key, data, "application/octet-stream"),
        rows=5,
        seconds=4.0,
    ).start()
    _record(log, "full", n=5)  # reaches `rows`: written at the next scan, not after 4 s
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and not _objects(seaweed, "log-timing"):
        time.sleep(0.05)
    first = _objects(seaweed, "log-timing")
    assert len(first) == 1
    _record(log, "few", n=2)  # below `rows`: written by the timer
    time.sleep(1.0)
    assert len(_objects(seaweed, "log-timing")) == 1
    deadline = time.monotonic() + 8.0
    while time.monotonic() < deadline and len(_objects(seaweed, "log-timing")) < 2:
        time.sleep(0.1)
    written = _objects(seaweed, "log-timing")
    assert len(written) == 2
    day = time.strftime("%Y-%m-%d", time.gmtime())
    keys = sorted(written)
    assert keys == [f"7/{day}/{log.writer_id}-{n:06d}.parquet" for n in (1, 2)]
    table = _read(written[keys[1]])
    assert table.column("request_id").to_pylist() == ["few", "few"]
    assert table.column("row").to_pylist() == [0, 1]
    assert table.column("encounter_id").to_pylist() == ["100", "101"]
    assert table.column("probability_NO").to_pylist() == [0.7, 0.7]
    assert json.loads(table.column("features")[0].as_py()) == {
        "age": "[50-60)",
        "encounter_id": 100,
    }
    log.close()
    assert not log.directory.exists()  # its own temporary spool directory


def test_a_refused_batch_is_written_under_its_key_once_the_store_takes_it(
    seaweed: SeaweedServer,
) -> None:
    client: Any = seaweed.client()
    client.create_bucket(Bucket="log-later")
    refusing = S3Reader(seaweed.endpoint_url, seaweed.access_key, "not-the-secret")
    readers = [refusing]  # the store answers 403 until the right credentials are in place
    writes: list[int] = []
    log = PredictionLog(
        lambda key, data: readers[0].put("log-later", key, data, "application/octet-stream"),
        rows=10**6,
        seconds=3600,
        after_write=lambda: writes.append(1),
    )
    _record(log, "a", n=3)
    assert log.flush() == 0  # refused: kept with its key
    _record(log, "b", n=1, version="8")
    readers[0] = _reader(seaweed)
    assert log.flush() == 4
    written = _objects(seaweed, "log-later")
    assert sorted(k.split("/")[0] for k in written) == ["7", "8"]
    assert sorted(k.rsplit("-", 1)[-1] for k in written) == ["000001.parquet", "000002.parquet"]
    assert log.dropped_rows == 0 and log.written_rows == 4
    assert log.flush() == 0 and len(writes) == 2  # the heap-trim hook: after each attempt
    log.close()


def test_an_off_log_records_nothing() -> None:
    log = PredictionLog(None, rows=1, seconds=0.01)
    _record(log, "x", n=3)
    assert not log.enabled and log.flush() == 0


def _workers(master: int, count: int, timeout: float = 20.0) -> list[int]:
    """The master's `count` workers, once it has forked them all."""
    deadline = time.monotonic() + timeout
    while len(workers := child_pids(master)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(workers) == count, workers
    return workers


def test_every_answer_of_every_worker_is_in_the_log_after_a_graceful_stop(
    seaweed: SeaweedServer,
) -> None:
    """Nothing is written while serving (huge rows/seconds): the master's exit hook writes it
    all, the answers of two workers killed (SIGKILL) halfway included."""
    client: Any = seaweed.client()
    client.create_bucket(Bucket=LOG_BUCKET)
    onnx_bytes, metadata = build_model("decision_tree", "41")
    client.put_object(Bucket="models", Key=metadata["model_key"], Body=onnx_bytes)
    client.put_object(
        Bucket="models", Key="champion/metadata.json", Body=json.dumps(metadata).encode()
    )
    env = {
        **seaweed.env(),
        **PREDICT_SERVER_ENV,
        "WORKERS": "2",
        "PREDICTION_LOG_ROWS": "1000000",
        "PREDICTION_LOG_SECONDS": "3600",
    }
    process = FunctionProcess(env)
    rows = patient_rows(12)
    answered: dict[tuple[str, int], list[float]] = {}
    try:
        process.wait_ready()
        for index, row in enumerate(rows[:10]):
            status, headers, body = http(
                process.url + "/predict",
                {"features": {**row, "encounter_id": 9000 + index}},
                headers={"X-Request-Id": f"req-{index}"},
            )
            assert status == 200 and headers["X-Request-Id"] == f"req-{index}"
            answered[(f"req-{index}", 0)] = list(json.loads(body)["probabilities"].values())
            if index == 4:  # gunicorn starts new workers; the killed ones' spool is read
                workers = _workers(process.process.pid, 2)
                for pid in workers:
                    os.kill(pid, signal.SIGKILL)
                process.wait_ready()
        status, headers, body = http(process.url + "/predict/batch", {"instances": rows[10:]})
        assert status == 200
        made = headers["X-Request-Id"]
        for index, prediction in enumerate(json.loads(body)["predictions"]):
            answered[(made, index)] = list(prediction["probabilities"].values())
        inputs = [  # the same two rows as a KServe V2 request: one tensor per column
            {
                "name": column,
                "datatype": "FP32" if column in NUMERIC_FEATURES else "BYTES",
                "shape": [2, 1],
                "data": [row[column] for row in rows[10:]],
            }
            for column in rows[10]
        ]
        status, _, body = http(
            process.url + "/v2/models/diabetes_readmission_model/infer",
            {"id": "v2-req", "inputs": inputs},
        )
        assert status == 200, body[:300]
        (probabilities,) = [o for o in json.loads(body)["outputs"] if o["name"] == "probabilities"]
        for index in range(2):
            answered[("v2-req", index)] = probabilities["data"][3 * index : 3 * index + 3]
        assert _objects(seaweed, LOG_BUCKET) == {}  # nothing flushed while serving
    finally:
        output = process.stop()
    written = _objects(seaweed, LOG_BUCKET, "41/")
    assert written, output[-2000:]
    table = pa.concat_tables([_read(data) for data in written.values()])
    logged = {
        (r["request_id"], r["row"]): [
            r["probability_<30"],
            r["probability_>30"],
            r["probability_NO"],
        ]
        for r in table.to_pylist()
    }
    assert logged == answered and table.num_rows == len(answered)  # each once
    encounters = dict(
        zip(
            table.column("request_id").to_pylist(),
            table.column("encounter_id").to_pylist(),
            strict=True,
        )
    )
    assert encounters["req-3"] == "9003" and encounters[made] is None
    features = {(r["request_id"], r["row"]): json.loads(r["features"]) for r in table.to_pylist()}
    for index, row in enumerate(rows[10:]):  # the rows as each request carried them
        assert features[(made, index)] == row
        assert features[("v2-req", index)]["age"] == row["age"]
    assert set(table.column("model_version").to_pylist()) == {"41"}
