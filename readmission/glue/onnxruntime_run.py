"""Reach-in: run an onnxruntime session through its C++ binding (`session._sess.run`).

`InferenceSession.run` checks on every call what never changes for a served model (graph
capture, the feeds' input names) before calling the binding's `run(outputs, feeds,
run_options)`; on a single-row prediction those checks cost a noticeable share of the call.
Calling the binding directly is safe when the feeds' names and types were checked against
the session once, at load (readmission.serving.session.check_session).

Contract: `fast_run(session)` returns `run(output_names, feeds)`. Checked against onnxruntime
1.18 to 1.x (`_sess` is the binding in every 1.x release; verified on 1.32); outside that
range, or without a callable `_sess.run`, it warns once and returns the public
`session.run`.
"""

from __future__ import annotations

from typing import Any

from readmission.glue.versions import checked, warn_once

CHECKED_RANGE = ((1, 18), (2,))  # onnxruntime versions `_sess.run` was checked against
_WHAT = "onnxruntime InferenceSession._sess"
# decided at import (in gunicorn's master, before the fork), not in a worker's session thread
checked("onnxruntime", *CHECKED_RANGE, _WHAT)


def fast_run(session: Any) -> Any:
    """`run(output_names, feeds)` of the session: the binding's when checked, else public."""
    if not checked("onnxruntime", *CHECKED_RANGE, _WHAT):
        return session.run
    binding = getattr(session, "_sess", None)
    if binding is None or not callable(getattr(binding, "run", None)):
        warn_once(_WHAT, "the session has no binding with a run method")
        return session.run
    return lambda outputs, feeds: binding.run(outputs, feeds, None)
