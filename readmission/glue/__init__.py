"""Glue to other libraries' servers and internals: the one place that may touch them.

Contract (enforced by tests/test_imports.py): within `readmission/`, only modules of this
package import flask, werkzeug or gunicorn, and only they reach into another library's
private internals. Each such reach-in names the library version range it was checked against
(`readmission.glue.versions.checked`); outside that range, or when the internal is missing,
it logs one warning and takes the library's public path instead.

Modules: `event_handler` (functions-framework/flask glue of the CloudEvent functions),
`request_body` and `responses` (the predict function's flask requests and replies),
`json_codec` (orjson or the stdlib for HTTP bodies),
`http_close` (gunicorn's close after a reply), `heap` (glibc heap trimming of a worker),
`onnxruntime_run` (the session binding's run), `skl2onnx_patch` (a converter bug fix),
`versions` (the version guard). Glue imports nothing of readmission.serving: the serving
core stands on it, not the other way round.
"""
