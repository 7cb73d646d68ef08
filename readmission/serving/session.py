"""The onnxruntime session of a model: built, checked against the metadata, and run.

Contract: `new_session(model_bytes, intra_op_threads)` returns a sequential CPU session or
raises ModelLoadError; `check_session` raises ModelLoadError unless the graph's inputs and
outputs are exactly those the metadata's layout feeds and reads; `session_runner` returns
`run(output_names, feeds)`. onnxruntime is imported inside `new_session` only, never at module
level (see readmission.serving.server.ModelServer: no onnxruntime state may cross a fork).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from readmission.glue.onnxruntime_run import fast_run
from readmission.serving.errors import ModelLoadError
from readmission.serving.inputs import InputLayout, InputSpec

if TYPE_CHECKING:
    import onnxruntime as ort


def new_session(model_bytes: bytes, intra_op_threads: int) -> ort.InferenceSession:
    import onnxruntime as ort  # here, not at module level: see ModelServer

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelLoadError(f"onnxruntime cannot load the model: {exc}") from exc


def session_runner(session: ort.InferenceSession) -> Any:
    """`run(output_names, feeds)` of the session. The feeds' names and types were checked
    against the session when it was loaded (`check_session`), so the binding's run may skip
    the Python wrapper's per-call checks (readmission.glue.onnxruntime_run)."""
    return fast_run(session)


def check_session(
    session: ort.InferenceSession,
    inputs: Sequence[InputSpec],
    layout: InputLayout,
    outputs: Sequence[str],
) -> None:
    """ModelLoadError unless the graph takes the layout's tensors and has the `outputs`."""
    if layout.packed:
        _check_packed_session(session, layout)
    else:
        _check_per_column_session(session, inputs)
    names = {o.name for o in session.get_outputs()}
    for name in outputs:
        if name not in names:
            raise ModelLoadError(f"the ONNX model has no output {name!r}")


def _check_packed_session(session: ort.InferenceSession, layout: InputLayout) -> None:
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


def _check_per_column_session(session: ort.InferenceSession, inputs: Sequence[InputSpec]) -> None:
    session_inputs = {i.name: i.type for i in session.get_inputs()}
    for spec in inputs:
        onnx_type = session_inputs.pop(spec.onnx_name, None)
        if onnx_type is None:
            raise ModelLoadError(f"the ONNX model has no input {spec.onnx_name!r}")
        wanted = "tensor(float)" if spec.numeric else "tensor(string)"
        if onnx_type != wanted:
            raise ModelLoadError(f"ONNX input {spec.onnx_name} is {onnx_type}, not {wanted}")
    if session_inputs:
        raise ModelLoadError(f"ONNX inputs missing from metadata: {sorted(session_inputs)}")
