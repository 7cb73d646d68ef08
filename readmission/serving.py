"""The model server core of the predict function: load, ready, predict, hot swap.

Transport-free (like KServe's model server): `functions/predict/main.py` maps HTTP onto it.
Only numpy and onnxruntime are imported here: never scikit-learn, pandas or mlflow (the
predict image has none of them; a test checks `sys.modules`). onnxruntime is imported when a
process builds its first session, which only a process that serves does (see ModelServer).

Lifecycle: `ModelServer(source)` -> `load()` (or `start_background_load()`) -> `ready` ->
`ensure_serving()` in the process that serves (builds the session, starts the poll thread) ->
`require_model().predict(rows)`. The poll thread watches the source's version token (the ETag
of `champion/metadata.json`, or the local metadata file's mtime and size) and, when it
changes, loads the new model completely and then swaps one reference. A request takes that
reference once, so in-flight requests finish on the model they started with.

Input rules (see docs/predict.md): every input named in the metadata is a required key; the
data file's other columns (the ids, the target) are ignored and any other key is refused
(a misspelt feature must not pass as a missing value); `null`, `"?"` and `""` mean missing;
numeric inputs take a JSON number or a numeric string; categorical inputs take a string
(integers are accepted and turned into their decimal string); a category the model never
saw is rejected (UNKNOWN_CATEGORY_POLICY=reject, the default) or passed to the model as
unseen with a warning (UNKNOWN_CATEGORY_POLICY=unseen).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import reprlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from readmission.contract import COLUMNS, MISSING_MARKER

if TYPE_CHECKING:
    import onnxruntime as ort

log = logging.getLogger(__name__)

POLICIES = ("reject", "unseen")
_MISSING_VALUES = frozenset({MISSING_MARKER, ""})
_NUMBER_TYPES = frozenset({int, float})
_NUMERIC_FAST_TYPES = frozenset({int, float, type(None)})
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def shown(value: Any) -> str:
    """A client's value as an error message shows it: repr, with lists and objects shortened
    (and never recursing through a deeply nested one: its repr would raise RecursionError)."""
    return reprlib.repr(value) if isinstance(value, (list, dict)) else repr(value)


def _env(name: str, default: str) -> str:
    return os.environ.get(name, "").strip() or default


def _env_number(name: str, default: float, minimum: float) -> float:
    raw = _env(name, str(default))
    try:
        value = float(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a number, got {raw!r}") from exc
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {raw!r}")
    return value


@dataclass(frozen=True)
class ServingSettings:
    """Settings of the predict function (env var -> default, documented in docs/predict.md)."""

    model_path: str = ""  # MODEL_PATH: local ONNX file (with MODEL_METADATA_PATH): no store
    metadata_path: str = ""  # MODEL_METADATA_PATH
    poll_seconds: float = 10.0  # MODEL_POLL_SECONDS: 0 disables hot swap
    unknown_category_policy: str = "reject"  # UNKNOWN_CATEGORY_POLICY: reject | unseen
    batch_limit: int = 1000  # PREDICT_BATCH_LIMIT
    max_body_bytes: int = 2 * 1024 * 1024  # PREDICT_MAX_BODY_BYTES
    intra_op_threads: int = 1  # ORT_INTRA_OP_THREADS
    # THREADS: gunicorn's threads per worker (functions-framework reads it; its default is
    # cores x 4). With one, a worker answers one request at a time, and single rows skip the
    # micro-batcher, which only helps rows of concurrent requests meet.
    request_threads: int = (os.cpu_count() or 1) * 4
    load_mode: str = "eager"  # MODEL_LOAD: eager (at import, before the port opens) | background

    @classmethod
    def from_env(cls) -> ServingSettings:
        policy = _env("UNKNOWN_CATEGORY_POLICY", cls.unknown_category_policy).lower()
        if policy not in POLICIES:
            raise ValueError(f"UNKNOWN_CATEGORY_POLICY must be one of {POLICIES}, got {policy!r}")
        load_mode = _env("MODEL_LOAD", cls.load_mode).lower()
        if load_mode not in ("eager", "background"):
            raise ValueError(f"MODEL_LOAD must be eager or background, got {load_mode!r}")
        model_path = _env("MODEL_PATH", "")
        metadata_path = _env("MODEL_METADATA_PATH", "")
        if bool(model_path) != bool(metadata_path):
            raise ValueError("set both MODEL_PATH and MODEL_METADATA_PATH, or neither")
        return cls(
            model_path=model_path,
            metadata_path=metadata_path,
            poll_seconds=_env_number("MODEL_POLL_SECONDS", cls.poll_seconds, 0),
            unknown_category_policy=policy,
            batch_limit=int(_env_number("PREDICT_BATCH_LIMIT", cls.batch_limit, 1)),
            max_body_bytes=int(_env_number("PREDICT_MAX_BODY_BYTES", cls.max_body_bytes, 1)),
            intra_op_threads=int(_env_number("ORT_INTRA_OP_THREADS", cls.intra_op_threads, 1)),
            request_threads=int(_env_number("THREADS", cls.request_threads, 1)),
            load_mode=load_mode,
        )


class InputError(ValueError):
    """Bad input a client can fix: 4xx with a JSON body naming the field."""

    def __init__(
        self,
        message: str,
        field: str | None = None,
        *,
        row: int | None = None,
        allowed: Sequence[str] | None = None,
        kind: str = "invalid_input",
        status: int = 422,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.row = row
        self.allowed = list(allowed) if allowed is not None else None
        self.kind = kind
        self.status = status

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.message, "field": self.field, "kind": self.kind}
        if self.row is not None:
            body["row"] = self.row
        if self.allowed is not None:
            body["allowed"] = self.allowed
        return body


class ModelNotReady(RuntimeError):
    """No model is loaded yet (503)."""


class ModelLoadError(RuntimeError):
    """The model or its metadata cannot be used."""


@dataclass(frozen=True)
class InputSpec:
    column: str
    onnx_name: str  # the ONNX input tensor holding this column
    numeric: bool
    categories: tuple[str, ...] | None  # None: any string is accepted
    accepted: frozenset[str] | None  # categories plus the missing marker
    index: int | None = None  # position in a packed [N, k] tensor; None: its own [N, 1] input

    def schema(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "column": self.column,
            "onnx_name": self.onnx_name,
            "kind": "numeric" if self.numeric else "categorical",
        }
        if self.index is not None:
            entry["index"] = self.index
        if self.categories is not None:
            entry["categories"] = list(self.categories)
        return entry


@dataclass(frozen=True)
class Prediction:
    label: str
    probabilities: dict[str, float]
    warnings: list[str] = field(default_factory=list)


def parse_inputs(metadata: Mapping[str, Any]) -> tuple[InputSpec, ...]:
    raw = metadata.get("inputs")
    if not isinstance(raw, list) or not raw:
        raise ModelLoadError("metadata has no 'inputs' list")
    specs = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("column"), str):
            raise ModelLoadError(f"metadata input without a column name: {item!r}")
        kind = item.get("kind")
        if kind not in ("numeric", "categorical"):
            raise ModelLoadError(f"input {item['column']}: kind must be numeric or categorical")
        categories = item.get("categories")
        cats = None
        if kind == "categorical" and isinstance(categories, list):
            cats = tuple(str(c) for c in categories)
        index = item.get("index")
        if index is not None and (type(index) is not int or index < 0):
            raise ModelLoadError(f"input {item['column']}: index must be a non-negative integer")
        specs.append(
            InputSpec(
                column=item["column"],
                onnx_name=str(item.get("onnx_name") or item["column"]),
                numeric=kind == "numeric",
                categories=cats,
                accepted=None if cats is None else frozenset(cats) | {MISSING_MARKER},
                index=index,
            )
        )
    return tuple(specs)


@dataclass(frozen=True)
class InputLayout:
    """How the metadata's columns map onto the graph's input tensors.

    packed (this project's exports): one float tensor [N, n_numeric] and one string tensor
    [N, n_categorical], each column at its `index`; per_column (older exports, or a graph
    converted feature by feature): one [N, 1] tensor per column.
    """

    packed: bool
    numeric_tensor: str  # packed only
    categorical_tensor: str  # packed only
    # positions (in the metadata's input order) of the numeric / categorical columns, in the
    # order their values are fed: by index when packed, else as listed
    numeric_order: tuple[int, ...]
    categorical_order: tuple[int, ...]


def input_layout(inputs: Sequence[InputSpec]) -> InputLayout:
    """The layout of the inputs, or ModelLoadError if they are neither packed nor per column."""
    numeric = [i for i, spec in enumerate(inputs) if spec.numeric]
    categorical = [i for i, spec in enumerate(inputs) if not spec.numeric]
    names = [spec.onnx_name for spec in inputs]
    if len(set(names)) == len(names) and all(spec.index is None for spec in inputs):
        return InputLayout(False, "", "", tuple(numeric), tuple(categorical))
    tensors = []
    orders = []
    for group, kind in ((numeric, "numeric"), (categorical, "categorical")):
        group_names = {inputs[i].onnx_name for i in group}
        if len(group_names) > 1:
            raise ModelLoadError(f"the {kind} inputs span several tensors: {sorted(group_names)}")
        indexes = sorted(inputs[i].index for i in group if inputs[i].index is not None)
        if indexes != list(range(len(group))):
            raise ModelLoadError(f"the {kind} inputs' indexes must be 0..{len(group) - 1}")
        tensors.append(group_names.pop() if group_names else "")
        orders.append(tuple(sorted(group, key=lambda i: inputs[i].index or 0)))
    if tensors[0] and tensors[0] == tensors[1]:
        raise ModelLoadError("numeric and categorical inputs share one tensor")
    return InputLayout(True, tensors[0], tensors[1], orders[0], orders[1])


def _is_number(value: Any) -> bool:
    return type(value) in _NUMBER_TYPES


RowsRunner = Callable[[list[list[float]], list[list[str]]], tuple[list[Any], list[list[float]]]]


class _Slot:
    """A queued row of `_MicroBatcher`: its inputs, then its answer (or error)."""

    __slots__ = ("error", "event", "label", "lead", "numbers", "probabilities", "texts")

    def __init__(self, numbers: list[float], texts: list[str]) -> None:
        self.numbers = numbers
        self.texts = texts
        self.label: str = ""
        self.probabilities: list[float] = []
        self.error: BaseException | None = None
        self.event: threading.Event | None = None  # only a queued row waits
        self.lead = False  # set by the finishing leader: this waiter runs the next batch


class _MicroBatcher:
    """Opportunistic micro-batching of concurrent single-row predictions, with no wait window.

    A request that finds no session run in progress runs its row at once, so a lone request
    never waits. Requests arriving while a run is in progress (onnxruntime releases the GIL)
    queue up; when the run ends, the finishing thread wakes the first waiter, which takes the
    queue (up to `max_rows` rows) and runs it as one batch, and so on. A gradient-boosting run
    costs about 16 us for one row and 35 us for four with warm caches (several times more
    inside a busy server, whose HTTP work between runs evicts the 300 trees), so rows that
    meet share that cost; no request waits longer than the run in progress plus its own
    batch. How often rows meet depends on how much of a request holds the GIL: measured in
    docs/predict.md (Benchmark).
    """

    def __init__(self, max_rows: int = 32) -> None:
        self._max_rows = max_rows
        self._lock = threading.Lock()
        self._queue: list[_Slot] = []
        self._busy = False

    def run(
        self, run_rows: RowsRunner, numbers: list[float], texts: list[str]
    ) -> tuple[str, list[float]]:
        """`run_rows` runs the session on rows; it comes with each call rather than being
        kept, so that the model, which owns this batcher, is not in a reference cycle (a
        swapped-out model is then freed at once, also when gc.freeze() has frozen it)."""
        with self._lock:
            busy = self._busy
            self._busy = True
            if busy:
                slot = _Slot(numbers, texts)
                slot.event = threading.Event()
                self._queue.append(slot)
        if not busy:  # nobody running: run this row now
            slot = _Slot(numbers, texts)
            self._run_batch(run_rows, [slot])
        else:
            slot.event.wait()  # type: ignore[union-attr]
            if slot.lead:  # the previous run handed the queue over to this thread
                with self._lock:
                    batch = self._queue[: self._max_rows]
                    del self._queue[: self._max_rows]
                self._run_batch(run_rows, batch)
        if slot.error is not None:
            raise slot.error
        return slot.label, slot.probabilities

    def _run_batch(self, run_rows: RowsRunner, batch: list[_Slot]) -> None:
        try:
            labels, probabilities = run_rows([s.numbers for s in batch], [s.texts for s in batch])
            for s, label, probs in zip(batch, labels, probabilities, strict=True):
                s.label, s.probabilities = str(label), probs
        except BaseException as exc:  # every row of the batch gets the error
            for s in batch:
                s.error = exc
        with self._lock:
            following = self._queue[0] if self._queue else None
            if following is None:
                self._busy = False
        for s in batch[1:]:  # batch[0] is this thread's own row
            s.event.set()  # type: ignore[union-attr]
        if following is not None:  # hand over: that waiter takes the queue, itself first
            following.lead = True
            following.event.set()  # type: ignore[union-attr]


_FEW_ROWS = 8  # up to this many rows, rounding in Python is faster than numpy's call


def rounded_probabilities(probabilities: np.ndarray) -> list[list[float]]:
    """Rows of probabilities rounded to 6 digits, exactly as `np.round(p.astype(float64), 6)`
    rounds them: p·10⁶ to the nearest integer (ties to even), ÷10⁶, in float64. For a few
    rows in Python (~1.5 µs for one row of three, numpy's calls ~5), else with numpy."""
    if len(probabilities) <= _FEW_ROWS:
        try:
            return [[round(p * 1e6) / 1e6 for p in row] for row in probabilities.tolist()]
        except (ValueError, OverflowError):  # NaN or infinity: numpy keeps them as they are
            pass
    return np.round(probabilities.astype(np.float64), 6).tolist()


class LoadedModel:
    """One ONNX model and its metadata: validation, feeds and inference. Immutable.

    With `session=False` only the bytes and the metadata are checked and no onnxruntime
    session is built (no onnxruntime import either): `with_session()` makes the servable copy.
    """

    def __init__(
        self,
        model_bytes: bytes,
        metadata: Mapping[str, Any],
        *,
        token: str = "",
        policy: str = "reject",
        intra_op_threads: int = 1,
        micro_batching: bool = True,
        session: bool = True,
    ) -> None:
        expected = metadata.get("model_sha256")
        if expected and hashlib.sha256(model_bytes).hexdigest() != expected:
            raise ModelLoadError("model_sha256 in the metadata does not match the ONNX bytes")
        self.metadata = dict(metadata)
        self.token = token
        self.policy = policy
        self.version = str(metadata.get("version", ""))
        self.name = str(metadata.get("model_name", "model"))
        classes = metadata.get("classes")
        if not isinstance(classes, list) or not classes:
            raise ModelLoadError("metadata has no 'classes' list")
        self.classes = [str(c) for c in classes]
        self.inputs = parse_inputs(metadata)
        self.layout = input_layout(self.inputs)
        outputs = metadata.get("outputs") or {}
        self.label_output = str(outputs.get("label", "label"))
        self.probabilities_output = str(outputs.get("probabilities", "probabilities"))
        self.model_bytes = model_bytes
        self.intra_op_threads = intra_op_threads
        self.session: ort.InferenceSession | None = None
        self._run: Any = None
        if session:
            self.session = self._new_session()
            self._check_session(self.session)
            self._run = self._fast_run(self.session)
        self._getter = itemgetter(*(spec.column for spec in self.inputs))
        columns = {spec.column for spec in self.inputs}
        # the data file's columns that are not inputs (ids, target): accepted and ignored
        self.ignored_columns = tuple(c for c in COLUMNS if c not in columns)
        self._known_keys = frozenset(columns) | frozenset(self.ignored_columns)
        layout = self.layout
        self._numeric_specs = [(self.inputs[i], i) for i in layout.numeric_order]
        self._categorical_specs = [(self.inputs[i], i) for i in layout.categorical_order]
        self._numeric_names = [s.onnx_name for s, _ in self._numeric_specs]
        self._categorical_names = [s.onnx_name for s, _ in self._categorical_specs]
        self._batcher = _MicroBatcher() if micro_batching else None
        self.loaded_at = time.time()

    def _new_session(self) -> ort.InferenceSession:
        import onnxruntime as ort  # here, not at module level: see ModelServer

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            return ort.InferenceSession(
                self.model_bytes, options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelLoadError(f"onnxruntime cannot load the model: {exc}") from exc

    def with_session(self) -> LoadedModel:
        """The same model with its own onnxruntime session (ModelLoadError if onnxruntime
        refuses the model)."""
        return LoadedModel(
            self.model_bytes,
            self.metadata,
            token=self.token,
            policy=self.policy,
            intra_op_threads=self.intra_op_threads,
            micro_batching=self._batcher is not None,
        )

    @staticmethod
    def _fast_run(session: ort.InferenceSession) -> Any:
        """The binding's run, skipping the Python wrapper's per-call checks (graph-capture
        and input-name validation: 0.1-0.2 ms of a single-row call). Safe here: the feeds'
        names and types were checked against the session when it was loaded."""
        binding = getattr(session, "_sess", None)
        if binding is not None and callable(getattr(binding, "run", None)):
            return lambda outputs, feeds: binding.run(outputs, feeds, None)
        return session.run

    def _check_session(self, session: ort.InferenceSession) -> None:
        if self.layout.packed:
            self._check_packed_session(session)
        else:
            self._check_per_column_session(session)
        outputs = {o.name for o in session.get_outputs()}
        for name in (self.label_output, self.probabilities_output):
            if name not in outputs:
                raise ModelLoadError(f"the ONNX model has no output {name!r}")

    def _check_packed_session(self, session: ort.InferenceSession) -> None:
        layout = self.layout
        session_inputs = {i.name: i for i in session.get_inputs()}
        wanted = {}
        if layout.numeric_order:
            wanted[layout.numeric_tensor] = ("tensor(float)", len(layout.numeric_order))
        if layout.categorical_order:
            wanted[layout.categorical_tensor] = ("tensor(string)", len(layout.categorical_order))
        if set(session_inputs) != set(wanted):
            raise ModelLoadError(
                f"the ONNX inputs {sorted(session_inputs)} are not the metadata's {sorted(wanted)}"
            )
        for name, (onnx_type, width) in wanted.items():
            graph_input = session_inputs[name]
            if graph_input.type != onnx_type:
                raise ModelLoadError(f"ONNX input {name} is {graph_input.type}, not {onnx_type}")
            shape = list(graph_input.shape)
            if len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != width):
                raise ModelLoadError(f"ONNX input {name} has shape {shape}, not [N, {width}]")

    def _check_per_column_session(self, session: ort.InferenceSession) -> None:
        session_inputs = {i.name: i.type for i in session.get_inputs()}
        for spec in self.inputs:
            onnx_type = session_inputs.pop(spec.onnx_name, None)
            if onnx_type is None:
                raise ModelLoadError(f"the ONNX model has no input {spec.onnx_name!r}")
            wanted = "tensor(float)" if spec.numeric else "tensor(string)"
            if onnx_type != wanted:
                raise ModelLoadError(f"ONNX input {spec.onnx_name} is {onnx_type}, not {wanted}")
        if session_inputs:
            raise ModelLoadError(f"ONNX inputs missing from metadata: {sorted(session_inputs)}")

    # ---- validation and feeds -------------------------------------------------------------
    def _table(self, rows: Sequence[Any]) -> list[tuple[Any, ...]]:
        getter = self._getter
        try:
            table = [getter(row) for row in rows]
        except (KeyError, TypeError, IndexError):
            self._diagnose_rows(rows)
            raise
        # every row holds every input (or the getter failed): more keys than inputs means
        # other keys, checked only then (one C loop over the rows on the usual path)
        if max(map(len, rows)) > len(self.inputs):
            self._unknown_keys(rows)
        if len(self.inputs) == 1:  # itemgetter of one key returns the value, not a tuple
            table = [(value,) for value in table]
        return table

    def _unknown_keys(self, rows: Sequence[Any]) -> None:
        """InputError naming the first row's keys that are neither an input nor ignored."""
        for index, row in enumerate(rows):
            unknown = sorted(map(str, row.keys() - self._known_keys))
            if unknown:
                names = ", ".join(repr(name) for name in unknown)
                raise InputError(
                    f"unknown feature{'s' if len(unknown) > 1 else ''} {names}: not an input "
                    "of the model (only the data file's ids and target are ignored)"[:300],
                    unknown[0],
                    row=index,
                    kind="unknown_feature",
                )

    def _diagnose_rows(self, rows: Sequence[Any]) -> None:
        for index, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise InputError(
                    "each instance must be a JSON object of feature values",
                    None,
                    row=index,
                    kind="invalid_row",
                )
            for spec in self.inputs:
                if spec.column not in row:
                    raise InputError(
                        f"missing feature {spec.column!r}",
                        spec.column,
                        row=index,
                        kind="missing_feature",
                    )

    def _numeric(self, spec: InputSpec, values: Sequence[Any]) -> np.ndarray:
        array = None
        if set(map(type, values)) <= _NUMERIC_FAST_TYPES:
            try:
                array = np.array(values, dtype=np.float64)  # None -> NaN (missing)
            except OverflowError:  # an integer beyond float64: the slow path names it
                array = None
        if array is not None:
            bad = ~(np.abs(array) <= _FLOAT32_MAX)  # NaN, infinite or beyond float32
            if bad.any():
                for index in np.flatnonzero(bad).tolist():
                    if values[index] is not None:
                        self._number(spec, values[index], index)
        else:
            array = np.empty(len(values), dtype=np.float64)
            for index, value in enumerate(values):
                array[index] = self._number(spec, value, index)
        return array.astype(np.float32).reshape(-1, 1)

    @staticmethod
    def _number(spec: InputSpec, value: Any, index: int) -> float:
        if value is None or (isinstance(value, str) and value.strip() in _MISSING_VALUES):
            return math.nan
        number: float | None = None
        try:
            if _is_number(value):
                number = float(value)
            elif isinstance(value, str):
                number = float(value.strip())
        except (ValueError, OverflowError):
            number = None
        if number is None or not -_FLOAT32_MAX <= number <= _FLOAT32_MAX:
            raise InputError(
                f"{spec.column} must be a number within the float32 range (or null for "
                f"missing), got {shown(value)}"[:300],
                spec.column,
                row=index,
                kind="invalid_type",
            )
        return number

    def _categorical(
        self, spec: InputSpec, values: Sequence[Any], warnings: list[list[str]] | None
    ) -> np.ndarray:
        try:
            distinct = set(values)
        except TypeError:  # an unhashable value (list, object): the slow path names it
            distinct = {None, 0}
        if all(type(v) is str for v in distinct):
            text = values
        elif all(v is None or type(v) is str for v in distinct):
            text = [MISSING_MARKER if v is None else v for v in values]
            distinct.discard(None)
            distinct.add(MISSING_MARKER)
        else:
            text = [self._category(spec, value, index) for index, value in enumerate(values)]
            distinct = set(text)
        if "" in distinct:
            text = [MISSING_MARKER if v == "" else v for v in text]
            distinct.discard("")
        if spec.accepted is not None and not distinct <= spec.accepted:
            self._unknown(spec, text, distinct - spec.accepted, warnings)
        return np.array(text, dtype=object).reshape(-1, 1)

    def _unknown(
        self,
        spec: InputSpec,
        text: Sequence[str],
        unknown: set[str],
        warnings: list[list[str]] | None,
    ) -> None:
        if self.policy == "reject" or warnings is None:
            row = next(i for i, v in enumerate(text) if v in unknown)
            raise InputError(
                f"{spec.column}: unknown category {text[row]!r}"[:300],
                spec.column,
                row=row,
                allowed=spec.categories,
                kind="unknown_category",
            )
        for index, value in enumerate(text):
            if value in unknown:
                warnings[index].append(
                    f"{spec.column}: category {value!r} was not seen in training; "
                    "the model treats it as unseen"
                )

    @staticmethod
    def _category(spec: InputSpec, value: Any, index: int) -> str:
        if value is None:
            return MISSING_MARKER
        if isinstance(value, str):
            return value or MISSING_MARKER
        if type(value) is int:
            return str(value)
        raise InputError(
            f"{spec.column} must be a string (or null for missing), got {shown(value)}"[:300],
            spec.column,
            row=index,
            kind="invalid_type",
        )

    def feeds(
        self, rows: Sequence[Any], warnings: list[list[str]] | None = None
    ) -> dict[str, np.ndarray]:
        """ONNX feeds for rows (mappings column -> value), or InputError naming the field."""
        if not rows:
            raise InputError("no instances to predict", None, kind="empty_batch")
        if len(rows) == 1:
            return self._feeds_one(rows[0], warnings)
        columns = zip(*self._table(rows), strict=True)
        arrays: list[np.ndarray] = []
        for spec, values in zip(self.inputs, columns, strict=True):
            if spec.numeric:
                arrays.append(self._numeric(spec, values))
            else:
                arrays.append(self._categorical(spec, values, warnings))
        layout = self.layout
        if not layout.packed:
            return {spec.onnx_name: array for spec, array in zip(self.inputs, arrays, strict=True)}
        feeds: dict[str, np.ndarray] = {}
        for name, order in (
            (layout.numeric_tensor, layout.numeric_order),
            (layout.categorical_tensor, layout.categorical_order),
        ):
            if order:
                feeds[name] = np.hstack([arrays[i] for i in order])
        return feeds

    def _values_one(
        self, row: Any, warnings: list[list[str]] | None
    ) -> tuple[list[float], list[str]]:
        """One row validated in one pass: (numeric values, categorical strings), input order."""
        values = self._table([row])[0]
        numbers = []
        for spec, index in self._numeric_specs:
            value = values[index]
            if type(value) not in _NUMBER_TYPES or not -_FLOAT32_MAX <= value <= _FLOAT32_MAX:
                value = self._number(spec, value, 0)
            numbers.append(value)
        texts = []
        for spec, index in self._categorical_specs:
            value = values[index]
            if type(value) is not str or value == "":
                value = self._category(spec, value, 0)
            if spec.accepted is not None and value not in spec.accepted:
                self._unknown(spec, (value,), {value}, warnings)
            texts.append(value)
        return numbers, texts

    def _feeds_rows(
        self, numbers: list[list[float]], texts: list[list[str]]
    ) -> dict[str, np.ndarray]:
        """Feeds of k validated rows: packed, the two (k, n) arrays; per column, one
        contiguous (k, 1) view per input."""
        k = len(numbers)
        numeric = np.array(numbers, dtype=np.float32)
        layout = self.layout
        if layout.packed:
            feeds = {}
            if layout.numeric_order:
                feeds[layout.numeric_tensor] = numeric
            if layout.categorical_order:
                feeds[layout.categorical_tensor] = np.array(texts, dtype=object)
            return feeds
        text = np.array(texts, dtype=np.str_)
        if k > 1:  # column-major, so that each input's (k, 1) view is contiguous
            numeric = np.ascontiguousarray(numeric.T)
            text = np.ascontiguousarray(text.T)
        feeds = dict(zip(self._numeric_names, numeric.reshape(-1, k, 1), strict=True))
        feeds.update(zip(self._categorical_names, text.reshape(-1, k, 1), strict=True))
        return feeds

    def _feeds_one(self, row: Any, warnings: list[list[str]] | None) -> dict[str, np.ndarray]:
        """The single-row path (latency matters): two numpy arrays, one (1, 1) view per input."""
        numbers, texts = self._values_one(row, warnings)
        return self._feeds_rows([numbers], [texts])

    def predict_lists(
        self, rows: Sequence[Any]
    ) -> tuple[list[str], list[list[float]], list[list[str]]]:
        """(labels, probabilities rounded to 6 digits in `classes` order, warnings per row):
        the batch path without a Prediction object per row."""
        warnings: list[list[str]] = [[] for _ in rows]
        feeds = self.feeds(rows, warnings if self.policy == "unseen" else None)
        labels, probabilities = self._run([self.label_output, self.probabilities_output], feeds)
        rounded = rounded_probabilities(probabilities)
        return [str(label) for label in labels.tolist()], rounded, warnings

    def predict(self, rows: Sequence[Any]) -> list[Prediction]:
        labels, rounded, warnings = self.predict_lists(rows)
        classes = self.classes
        return [
            Prediction(label, dict(zip(classes, probs, strict=True)), warn)
            for label, probs, warn in zip(labels, rounded, warnings, strict=True)
        ]

    def predict_one(self, row: Any) -> tuple[str, list[float], list[str]]:
        """One row: (label, probabilities rounded to 6 digits in `classes` order, warnings).

        Same validation and answer as `predict([row])`, but concurrent single-row calls share
        one session run (see `_MicroBatcher`), unless the model was made without micro-batching
        (a server answering one request at a time).
        """
        warnings: list[list[str]] = [[]]
        numbers, texts = self._values_one(row, warnings if self.policy == "unseen" else None)
        if self._batcher is None:
            labels, rows = self._run_rows([numbers], [texts])
            return str(labels[0]), rows[0], warnings[0]
        label, probabilities = self._batcher.run(self._run_rows, numbers, texts)
        return label, probabilities, warnings[0]

    def _run_rows(
        self, numbers: list[list[float]], texts: list[list[str]]
    ) -> tuple[list[Any], list[list[float]]]:
        labels, probabilities = self._run(
            [self.label_output, self.probabilities_output], self._feeds_rows(numbers, texts)
        )
        return labels.tolist(), rounded_probabilities(probabilities)

    def run_tensors(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Run already-built feeds (KServe V2 path); returns (labels, probabilities)."""
        labels, probabilities = self._run([self.label_output, self.probabilities_output], feeds)
        return labels, probabilities

    def info(self) -> dict[str, Any]:
        meta = self.metadata
        return {
            "name": self.name,
            "version": self.version,
            "algorithm": meta.get("algorithm"),
            "run_id": meta.get("run_id"),
            "dataset_id": meta.get("dataset_id"),
            "training_rows": meta.get("training_rows"),
            "cumulative_index": meta.get("cumulative_index"),
            "registered_at": meta.get("registered_at"),
            "selection_metric": meta.get("selection_metric"),
            "metrics": meta.get("metrics", {}),
            "classes": self.classes,
            "inputs": [spec.schema() for spec in self.inputs],
            "outputs": {"label": self.label_output, "probabilities": self.probabilities_output},
            "model_sha256": meta.get("model_sha256"),
            "unknown_category_policy": self.policy,
        }


class ModelSource(Protocol):
    """Where models come from: the object store, or local files."""

    description: str

    def token(self) -> str | None:
        """A version token of the current metadata (ETag); None if there is none yet."""

    def fetch(self) -> tuple[bytes, dict[str, Any], str]:
        """(ONNX bytes, metadata, token) of the current model."""

    def asset(self, key: str) -> bytes | None:
        """A file the metadata names (e.g. the learning-curve PNG), or None."""


class ModelServer:
    """Holds the current model; loads, polls and swaps it. Thread-safe for readers.

    Fork safety: gunicorn imports the function in its master and forks the workers. No
    onnxruntime state may cross that fork: importing onnxruntime starts a thread, and a
    forked worker that exits joins its copy of that thread and aborts (std::system_error),
    and a session's thread pool does not exist in the child either. So until
    `ensure_serving()` runs in a process, `load()` fetches and checks the model without a
    session (and without importing onnxruntime); `ensure_serving()`, first thing in each
    worker, builds the session and starts the poll thread.
    """

    def __init__(self, source: ModelSource, settings: ServingSettings | None = None) -> None:
        self.source = source
        self.settings = settings or ServingSettings()
        self._model: LoadedModel | None = None
        self.last_error: str | None = None
        self.swaps = 0
        self._loader: threading.Thread | None = None
        self._poller: threading.Thread | None = None
        self._serving_pid = 0
        self._stop = threading.Event()
        self._load_lock = threading.Lock()
        self._serving_lock = threading.Lock()
        self.on_swap: list[Any] = []  # callbacks(model) after each successful load
        # side reads of the poll thread (the gate's challenger and last decision): run when
        # the thread starts and after each poll; they never touch the model or its readiness
        self.on_poll: list[Callable[[], None]] = []

    @property
    def model(self) -> LoadedModel | None:
        return self._model

    @property
    def ready(self) -> bool:
        return self._model is not None

    def require_model(self) -> LoadedModel:
        model = self._model
        if model is None:
            raise ModelNotReady(self.last_error or "the model is still loading")
        if model.session is None:
            raise ModelNotReady("the model's session is built when this process serves")
        return model

    def load(self, token: str | None = None) -> LoadedModel | None:
        """Load the source's current model if its token differs from ours; swap it in."""
        with self._load_lock:
            current = self._model
            if token is not None and current is not None and token == current.token:
                return None
            started = time.perf_counter()
            model_bytes, metadata, fetched_token = self.source.fetch()
            model = LoadedModel(
                model_bytes,
                metadata,
                token=fetched_token,
                policy=self.settings.unknown_category_policy,
                intra_op_threads=self.settings.intra_op_threads,
                micro_batching=self.settings.request_threads > 1,
                session=self._serving_pid == os.getpid(),
            )
            self._model = model  # the swap: one reference assignment
            self.last_error = None
            if current is not None:
                self.swaps += 1
            log.info(
                "loaded model %s version %s from %s in %.3f s",
                model.name,
                model.version,
                self.source.description,
                time.perf_counter() - started,
            )
        for callback in self.on_swap:
            callback(model)
        return model

    def try_load(self) -> bool:
        try:
            self.load()
            return True
        except Exception as exc:
            self.last_error = f"model load failed: {exc}"
            if isinstance(exc, ModelLoadError):  # a reason in words (no champion yet...)
                log.warning("model load from %s failed: %s", self.source.description, exc)
            else:
                log.exception("model load from %s failed", self.source.description)
            return False

    def start_background_load(self) -> None:
        self._loader = threading.Thread(target=self.try_load, name="model-loader", daemon=True)
        self._loader.start()

    def wait_for_loader(self) -> None:
        loader = self._loader
        if loader is not None and loader.is_alive():
            loader.join()

    def poll_once(self) -> bool:
        """Compare the source's token with the loaded one; load on change. True if swapped."""
        token = self.source.token()
        if token is None:
            return False
        current = self._model
        if current is not None and token == current.token:
            return False
        return self.load(token) is not None

    def _run_poll_hooks(self) -> None:
        for hook in self.on_poll:
            try:
                hook()
            except Exception:  # informational: logged, never the model's error
                log.exception("poll hook %r failed", hook)

    def _poll_loop(self) -> None:
        """The hooks once at start, then every `poll_seconds` (0: no polling) the model's
        token and the hooks."""
        self._run_poll_hooks()
        interval = self.settings.poll_seconds
        if interval <= 0:
            return
        while not self._stop.wait(interval):
            try:
                self.poll_once()
            except Exception as exc:
                self.last_error = f"model poll failed: {exc}"
                log.warning("model poll of %s failed: %s", self.source.description, exc)
            self._run_poll_hooks()

    def ensure_serving(self) -> None:
        """Once per process that serves: build the model's session, start the poll thread
        (with MODEL_POLL_SECONDS=0 it only runs the `on_poll` hooks once)."""
        if self._serving_pid == os.getpid():
            return
        with self._serving_lock:
            if self._serving_pid == os.getpid():
                return
            with self._load_lock:
                model = self._model
                if model is not None and model.session is None:
                    try:
                        self._model = model.with_session()
                    except ModelLoadError as exc:  # the poll thread retries the load
                        self._model = None
                        self.last_error = f"model load failed: {exc}"
                        log.error("model %s: %s", model.version, exc)
                self._serving_pid = os.getpid()  # under the load lock: later loads build
            if self.settings.poll_seconds > 0 or self.on_poll:
                self._stop = threading.Event()
                self._poller = threading.Thread(
                    target=self._poll_loop, name="model-poller", daemon=True
                )
                self._poller.start()

    def stop(self) -> None:
        self._stop.set()

    def after_fork_in_child(self) -> None:
        """Fresh locks and threads in a forked worker (gunicorn forks after import).

        The session is built in a thread: this hook runs before gunicorn installs the worker's
        signal handlers, and a SIGTERM arriving during the ~0.4 s of importing onnxruntime
        and building the session would be lost (the worker then kept serving until gunicorn's
        30 s graceful timeout killed it). A request's `ensure_serving()` waits for the thread.
        It is not a daemon: a worker told to stop meanwhile lets it finish before exiting
        (exiting in the middle of onnxruntime's initialisation aborts the process).
        """
        self._load_lock = threading.Lock()
        self._serving_lock = threading.Lock()
        self._serving_pid = 0
        self._loader = None
        threading.Thread(target=self.ensure_serving, name="model-session").start()
        if self._model is None:
            self.start_background_load()
