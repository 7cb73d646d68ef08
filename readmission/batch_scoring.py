"""Batch scoring: a CSV (or Parquet) of encounters in the scoring bucket -> predictions.

Contract (docs/predict.md, "Batch scoring"): `score_object(store, settings, options, bucket,
key, etag, model)` reads the object version `etag` in chunks (pyarrow's streaming CSV reader,
or Parquet row groups), checks every row with the predict function's rules
(readmission.serving.inputs, each distinct value of a column once), runs the champion's ONNX
model on the rows that pass (onnxruntime only, through `LoadedModel`), and writes, under
`predictions/<model version>/<key>`:

* `.parquet` and `.csv`: `encounter_id` (and `patient_nbr` if the input has it), `prediction`,
  `probability_<class>` per class, `model_version`; the rows in input order;
* `.summary.json`, written last (its presence means the outputs are complete): the source
  object, the model, rows read / scored / rejected, rows per class, every rejected row with
  its reasons, and a `timing` object (the only part that differs between two runs).

The target column may be present and is ignored; so are other data-file columns that are not
inputs. A file that cannot be read as a table with the model's input columns and
`encounter_id` is moved to the rejected bucket beside a report, as ingest does. Idempotent:
the same input version and model version give the same keys and the same Parquet and CSV
bytes; a summary naming this input version means there is nothing to do.

Imports only numpy, pyarrow, the serving core and the standard library: never scikit-learn,
pandas or mlflow (the score image is the serving image plus pyarrow; tests/test_imports.py).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from readmission import env
from readmission.config import Settings
from readmission.contract import TARGET
from readmission.keys import PREDICTIONS_PREFIX, rejected_key, rejected_report_key
from readmission.serving.errors import InputError
from readmission.serving.inputs import category_value, check_categories, number_value
from readmission.serving.model import LoadedModel
from readmission.storage import ObjectStore, PreconditionFailed, json_bytes

log = logging.getLogger(__name__)

EXPLAIN_PREFIX = "explain/"  # inputs under this prefix get explanations
ID_COLUMN = "encounter_id"
PATIENT_COLUMN = "patient_nbr"
JSON_TYPE = "application/json"

SCORED = "scored"
ALREADY_SCORED = "already_scored"
REJECTED = "rejected"
GONE = "gone"
SUPERSEDED = "superseded"
IGNORED = "ignored"


@dataclass(frozen=True)
class ScoreOptions:
    """Settings of the score function (env var -> default, documented in docs/predict.md)."""

    explain: bool = False  # SCORE_EXPLAIN: explanations for every file, not only `explain/`
    chunk_bytes: int = 1024 * 1024  # SCORE_CHUNK_BYTES: CSV bytes parsed per chunk
    top_k: int = 5  # SCORE_EXPLAIN_TOP_K: contributing features listed per row
    intra_op_threads: int = os.cpu_count() or 1  # SCORE_ORT_THREADS

    @classmethod
    def from_env(cls) -> ScoreOptions:
        return cls(
            explain=env.flag("SCORE_EXPLAIN", cls.explain),
            chunk_bytes=env.integer("SCORE_CHUNK_BYTES", cls.chunk_bytes, minimum=64 * 1024),
            top_k=env.integer("SCORE_EXPLAIN_TOP_K", cls.top_k, minimum=1),
            intra_op_threads=env.integer("SCORE_ORT_THREADS", cls.intra_op_threads, minimum=1),
        )


def output_prefix(model_version: str, key: str) -> str:
    """`predictions/v<model version>/<input key>`: same input key and model, same outputs."""
    return f"{PREDICTIONS_PREFIX}v{model_version}/{key}"


def output_keys(model_version: str, key: str) -> dict[str, str]:
    prefix = output_prefix(model_version, key)
    return {
        "parquet": f"{prefix}.parquet",
        "csv": f"{prefix}.csv",
        "summary": f"{prefix}.summary.json",
    }


def is_output_key(key: str) -> bool:
    return key.startswith(PREDICTIONS_PREFIX)


def wants_explanations(key: str, options: ScoreOptions) -> bool:
    return options.explain or key.startswith(EXPLAIN_PREFIX)


class NotATable(ValueError):
    """The file cannot be read as a table of encounters with the model's inputs."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class ScoreOutcome:
    status: str
    bucket: str
    key: str
    written: tuple[str, ...] = ()
    rows: int = 0
    rejected_rows: int = 0
    problems: tuple[str, ...] = ()

    def summary(self) -> str:
        text = f"{self.status} s3://{self.bucket}/{self.key}"
        if self.status == SCORED:
            text += f": {self.rows} rows scored, {self.rejected_rows} rejected"
        if self.problems:
            text += ": " + "; ".join(self.problems)
        return text


# ---- reading in chunks ------------------------------------------------------------------------
@dataclass
class _Malformed:
    """Lines the CSV parser skipped (wrong number of fields), with the reason."""

    lines: list[dict[str, Any]] = field(default_factory=list)

    def handler(self, row: Any) -> str:
        self.lines.append(
            {
                "line": row.number,
                "reason": f"{row.actual_columns} fields where the header has "
                f"{row.expected_columns}",
            }
        )
        return "skip"


def _csv_batches(
    body: Any, model: LoadedModel, chunk_bytes: int, malformed: _Malformed
) -> Iterator[pa.RecordBatch]:
    """Record batches of the CSV stream, every column read as text (the rules parse values)."""
    reader = pacsv.open_csv(
        body,
        read_options=pacsv.ReadOptions(block_size=chunk_bytes, use_threads=False),
        parse_options=pacsv.ParseOptions(invalid_row_handler=malformed.handler),
        convert_options=pacsv.ConvertOptions(
            column_types=_text_columns(model), strings_can_be_null=False, null_values=[]
        ),
    )
    _check_columns(reader.schema.names, model)
    yield from reader


def _parquet_batches(data: bytes, model: LoadedModel) -> Iterator[pa.RecordBatch]:
    """Record batches of a Parquet file, row group by row group."""
    parquet = pq.ParquetFile(io.BytesIO(data))
    _check_columns(parquet.schema_arrow.names, model)
    yield from parquet.iter_batches(batch_size=65536)


def _text_columns(model: LoadedModel) -> dict[str, pa.DataType]:
    names = [spec.column for spec in model.inputs] + [ID_COLUMN, PATIENT_COLUMN, TARGET]
    return dict.fromkeys(names, pa.string())


def _check_columns(names: list[str], model: LoadedModel) -> None:
    missing = [c for c in [ID_COLUMN] + [s.column for s in model.inputs] if c not in names]
    if missing:
        shown = ", ".join(missing[:10]) + (
            f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        )
        raise NotATable([f"the header lacks {len(missing)} required column(s): {shown}"])


# ---- one chunk: the rules over each distinct value, then the model ---------------------------
def _text_column(column: Any) -> tuple[list[Any], np.ndarray]:
    """(distinct values as Python objects, index of each row's value in them)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    encoded = pc.dictionary_encode(column)
    indices = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    values = encoded.dictionary.to_pylist()
    if (indices < 0).any():  # nulls (Parquet input): their own distinct value
        indices = np.where(indices < 0, len(values), indices)
        values.append(None)
    return values, indices


@dataclass
class _Chunk:
    ids: np.ndarray  # int64
    patients: np.ndarray | None  # int64
    good: np.ndarray  # bool: the row passed every rule
    reasons: dict[int, list[str]]  # row in chunk -> reasons
    arrays: list[np.ndarray]  # (n, 1) per input, input order, bad rows included


def _whole_numbers(column: Any, name: str, n: int, reasons: dict[int, list[str]]) -> np.ndarray:
    """An id column as int64; a row whose value is no whole number gets a reason."""
    try:  # the usual case, vectorised: every value is a plain integer
        return pc.cast(column, pa.int64()).to_numpy(zero_copy_only=False).astype(np.int64)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
        pass  # some value is not: each distinct value through int(), below
    values, indices = _text_column(column)
    parsed = np.zeros(len(values), dtype=np.int64)
    bad = np.zeros(len(values), dtype=bool)
    for i, value in enumerate(values):
        try:
            parsed[i] = int(str(value).strip())
        except (ValueError, OverflowError):
            bad[i] = True
    if bad.any():
        for row in np.flatnonzero(bad[indices]).tolist():
            reasons.setdefault(row, []).append(
                f"{name} must be a whole number, got {values[indices[row]]!r}"[:200]
            )
    return parsed[indices]


def _check_chunk(batch: pa.RecordBatch, model: LoadedModel) -> _Chunk:
    n = batch.num_rows
    reasons: dict[int, list[str]] = {}
    ids = _whole_numbers(batch.column(ID_COLUMN), ID_COLUMN, n, reasons)
    patients = None
    if PATIENT_COLUMN in batch.schema.names:
        patients = _whole_numbers(batch.column(PATIENT_COLUMN), PATIENT_COLUMN, n, reasons)
    arrays = []
    for spec in model.inputs:
        values, indices = _text_column(batch.column(spec.column))
        converted: list[Any] = []
        problems: list[str | None] = []
        for value in values:
            try:
                if spec.numeric:
                    converted.append(number_value(spec, value, 0))
                else:
                    text = category_value(spec, value, 0)
                    if spec.accepted is not None and text not in spec.accepted:
                        # policy reject raises; policy unseen passes the value to the model
                        check_categories(spec, (text,), {text}, model.policy, [[]])
                    converted.append(text)
                problems.append(None)
            except InputError as error:
                converted.append(np.nan if spec.numeric else "?")
                problems.append(str(error))
        if any(p is not None for p in problems):
            bad = np.array([p is not None for p in problems])
            for row in np.flatnonzero(bad[indices]).tolist():
                reasons.setdefault(row, []).append(str(problems[indices[row]]))
        if spec.numeric:
            column = np.array(converted, dtype=np.float32)[indices]
        else:
            column = np.array(converted, dtype=object)[indices]
        arrays.append(column.reshape(-1, 1))
    good = np.ones(n, dtype=bool)
    if reasons:
        good[list(reasons)] = False
    return _Chunk(ids, patients, good, reasons, arrays)


def _output_schema(model: LoadedModel, with_patients: bool, explain: bool) -> pa.Schema:
    fields = [pa.field(ID_COLUMN, pa.int64())]
    if with_patients:
        fields.append(pa.field(PATIENT_COLUMN, pa.int64()))
    fields.append(pa.field("prediction", pa.string()))
    fields += [pa.field(f"probability_{c}", pa.float64()) for c in model.classes]
    fields.append(pa.field("model_version", pa.string()))
    if explain:
        fields.append(pa.field("top_features", pa.string()))
    return pa.schema(fields)


# ---- the whole file ---------------------------------------------------------------------------
@dataclass
class _Result:
    parquet: bytes
    csv: bytes
    rows_read: int
    rows_scored: int
    per_class: dict[str, int]
    rejected: list[dict[str, Any]]
    malformed: list[dict[str, Any]]
    predict_seconds: float
    explain_seconds: float
    explained: bool


def score_batches(
    batches: Iterator[pa.RecordBatch],
    model: LoadedModel,
    *,
    with_patients: bool,
    explain: bool = False,
    top_k: int = 5,
    malformed: _Malformed | None = None,
) -> _Result:
    """Predictions (Parquet and CSV bytes) and the row accounting of a stream of batches."""
    schema = _output_schema(model, with_patients, explain)
    parquet_sink, csv_sink = io.BytesIO(), io.BytesIO()
    parquet_writer = pq.ParquetWriter(parquet_sink, schema, compression="zstd")
    csv_writer = pacsv.CSVWriter(csv_sink, schema)
    per_class = dict.fromkeys(model.classes, 0)
    rejected: list[dict[str, Any]] = []
    rows_read = rows_scored = 0
    predict_seconds = explain_seconds = 0.0
    explainer = None
    if explain:
        from readmission.serving.explain import Explainer  # only when asked for

        explainer = Explainer(model)
    for batch in batches:
        chunk = _check_chunk(batch, model)
        for row in sorted(chunk.reasons):
            rejected.append(
                {
                    "row": rows_read + row + 1,
                    ID_COLUMN: int(chunk.ids[row])
                    if not any(r.startswith(ID_COLUMN) for r in chunk.reasons[row])
                    else None,
                    "reasons": chunk.reasons[row],
                }
            )
        rows_read += batch.num_rows
        good = np.flatnonzero(chunk.good)
        if len(good) == 0:
            continue
        arrays = [a[good] for a in chunk.arrays]
        started = time.perf_counter()
        labels, probabilities = model.run_feeds(model.feeds_columns(arrays))
        predict_seconds += time.perf_counter() - started
        labels = np.asarray(labels).astype(str)
        rounded = np.round(probabilities.astype(np.float64), 6)
        columns: list[Any] = [pa.array(chunk.ids[good])]
        if with_patients:
            assert chunk.patients is not None
            columns.append(pa.array(chunk.patients[good]))
        columns.append(pa.array(labels.tolist(), pa.string()))
        columns += [pa.array(rounded[:, i]) for i in range(len(model.classes))]
        columns.append(pa.array([model.version] * len(good), pa.string()))
        if explainer is not None:
            started = time.perf_counter()
            columns.append(pa.array(explainer.top_features_json(arrays, top_k), pa.string()))
            explain_seconds += time.perf_counter() - started
        table = pa.Table.from_arrays(columns, schema=schema)
        parquet_writer.write_table(table)
        csv_writer.write_table(table)
        for label, count in zip(*np.unique(labels, return_counts=True), strict=True):
            per_class[str(label)] = per_class.get(str(label), 0) + int(count)
        rows_scored += len(good)
    parquet_writer.close()
    csv_writer.close()
    return _Result(
        parquet_sink.getvalue(),
        csv_sink.getvalue(),
        rows_read,
        rows_scored,
        per_class,
        rejected,
        malformed.lines if malformed else [],
        predict_seconds,
        explain_seconds,
        explain,
    )


def _read_and_score(
    store: ObjectStore, bucket: str, key: str, etag: str, model: LoadedModel, options: ScoreOptions
) -> _Result | None:
    """The object version's predictions; None if it is gone; PreconditionFailed if replaced;
    NotATable if it cannot be read as a table of encounters."""
    explain = wants_explanations(key, options)
    body = store.open_version(bucket, key, etag)
    if body is None:
        return None
    try:
        if key.lower().endswith(".parquet"):
            data = body.read()
            try:
                columns = pq.ParquetFile(io.BytesIO(data)).schema_arrow.names
            except (pa.ArrowInvalid, OSError) as error:
                raise NotATable([f"not a Parquet file: {error}"[:300]]) from error
            return score_batches(
                _parquet_batches(data, model),
                model,
                with_patients=PATIENT_COLUMN in columns,
                explain=explain,
                top_k=options.top_k,
            )
        malformed = _Malformed()
        batches = _csv_batches(body, model, options.chunk_bytes, malformed)
        first = next(batches, None)
        if first is None:
            raise NotATable(["no data rows after the header"])
        return score_batches(
            _chain(first, batches),
            model,
            with_patients=PATIENT_COLUMN in first.schema.names,
            explain=explain,
            top_k=options.top_k,
            malformed=malformed,
        )
    except (pa.ArrowInvalid, UnicodeDecodeError) as error:
        raise NotATable([f"not a CSV table of encounters: {error}"[:300]]) from error
    finally:
        body.close()


def _chain(first: pa.RecordBatch, rest: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    yield first
    yield from rest


def score_object(
    store: ObjectStore,
    settings: Settings,
    options: ScoreOptions,
    bucket: str,
    key: str,
    etag: str,
    model: LoadedModel,
) -> ScoreOutcome:
    """Score one object version of the scoring bucket (see the module docstring)."""
    if is_output_key(key):
        return ScoreOutcome(IGNORED, bucket, key, problems=("the scorer's own output",))
    keys = output_keys(model.version, key)
    summary = store.get_json_if_exists(bucket, keys["summary"])
    if summary is not None and summary.get("source", {}).get("etag") == etag:
        return ScoreOutcome(ALREADY_SCORED, bucket, key)
    started = time.perf_counter()
    try:
        result = _read_and_score(store, bucket, key, etag, model, options)
    except PreconditionFailed:
        return ScoreOutcome(SUPERSEDED, bucket, key)
    except NotATable as error:
        return _reject(store, settings, bucket, key, etag, error.problems)
    if result is None:
        return ScoreOutcome(GONE, bucket, key)
    seconds = time.perf_counter() - started
    if summary is not None:  # an older version of the input was scored: not done any more
        store.delete(bucket, keys["summary"])
    store.put_bytes(bucket, keys["parquet"], result.parquet, "application/vnd.apache.parquet")
    store.put_bytes(bucket, keys["csv"], result.csv, "text/csv")
    document = summary_document(bucket, key, etag, model, keys, result, seconds)
    store.put_bytes(bucket, keys["summary"], json_bytes(document), JSON_TYPE)  # last
    return ScoreOutcome(
        SCORED,
        bucket,
        key,
        (keys["parquet"], keys["csv"], keys["summary"]),
        result.rows_scored,
        len(result.rejected) + len(result.malformed),
    )


def summary_document(
    bucket: str,
    key: str,
    etag: str,
    model: LoadedModel,
    keys: dict[str, str],
    result: _Result,
    seconds: float,
) -> dict[str, Any]:
    explained = result.explained
    scored = max(result.rows_scored, 1)
    return {
        "source": {"bucket": bucket, "key": key, "etag": etag},
        "model": {
            "name": model.name,
            "version": model.version,
            "algorithm": model.metadata.get("algorithm"),
            "model_sha256": model.metadata.get("model_sha256"),
        },
        "outputs": {"parquet": keys["parquet"], "csv": keys["csv"]},
        "explanations": explained,
        "rows": {
            "read": result.rows_read,
            "scored": result.rows_scored,
            "rejected": len(result.rejected),
            "malformed_lines": len(result.malformed),
        },
        "rows_per_class": result.per_class,
        "rejected_rows": result.rejected,
        "malformed_lines": result.malformed,
        "parquet_sha256": hashlib.sha256(result.parquet).hexdigest(),
        # the only part of the summary that differs between two runs on the same input
        "timing": {
            "seconds": round(seconds, 3),
            "rows_per_second": round(result.rows_scored / seconds, 1) if seconds else None,
            "predict_ms_per_row": round(1000 * result.predict_seconds / scored, 4),
            "explain_ms_per_row": round(1000 * result.explain_seconds / scored, 4)
            if explained
            else None,
        },
    }


# ---- a file that is not a table: moved to the rejected bucket beside a report -----------------
def _reject(
    store: ObjectStore,
    settings: Settings,
    bucket: str,
    key: str,
    etag: str,
    problems: list[str],
) -> ScoreOutcome:
    """Copy the version to `rejected/<etag digest>/<key>`, write the report, then delete it
    (the ingest function's order: a crash before the delete is redone by the retry)."""
    rejected = settings.buckets.rejected
    digest = hashlib.sha256(f"{bucket}/{key}/{etag}".encode()).hexdigest()[:16]
    copy_key = rejected_key(digest, key)
    report_key = rejected_report_key(digest, key)
    written = []
    try:
        if not store.exists(rejected, copy_key):
            store.copy(bucket, key, rejected, copy_key, if_match=etag)
            written.append(f"{rejected}/{copy_key}")
    except PreconditionFailed:
        return ScoreOutcome(SUPERSEDED, bucket, key)
    report = {
        "status": "rejected",
        "function": "score",
        "problems": problems,
        "original": {"bucket": bucket, "key": key, "etag": etag},
        "rejected_copy": {"bucket": rejected, "key": copy_key},
        "how_to_fix": "Upload a CSV (comma-separated, one header line) or Parquet file holding "
        "encounter_id and the model's input columns (GET /model-info of predict lists them) "
        "to the scoring bucket again.",
    }
    if store.put_if_absent(rejected, report_key, json_bytes(report), JSON_TYPE):
        written.append(f"{rejected}/{report_key}")
    try:
        store.delete(bucket, key, if_match=etag)
    except PreconditionFailed:
        log.warning("score: s3://%s/%s was overwritten while being rejected", bucket, key)
    return ScoreOutcome(REJECTED, bucket, key, tuple(written), problems=tuple(problems))
