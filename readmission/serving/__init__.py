"""The predict function's serving core, one concern per module (transport-free: no flask,
werkzeug or gunicorn here; that glue is readmission.glue).

settings (ServingSettings from the environment), errors (InputError and the other errors a
client sees), inputs (the model's inputs and the one rule set validating a client's values),
feeds (rows -> ONNX feeds), batching (micro-batching of concurrent single rows), session (the
onnxruntime session), model (LoadedModel: load, predict), server (ModelServer: ready, poll,
hot swap), sources and s3 (where models come from), decisions (the gate's documents), v2
(KServe V2 protocol), request_json (what a JSON request body must be), routes, openapi,
examples, assets, static_files, metrics, forking (gunicorn's fork hooks).

Layers: serving uses readmission.glue (below it) and glue never imports serving.

Callers import from the module that defines a name; this package re-exports nothing.
"""
