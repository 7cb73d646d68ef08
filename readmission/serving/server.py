"""The model server: holds the current model; loads, polls and hot-swaps it.

Transport-free (like KServe's model server): functions/predict/main.py maps HTTP onto it.

Contract. Lifecycle: `ModelServer(source)` -> `load()` (or `start_background_load()`) ->
`ready` -> `ensure_serving()` in the process that serves (builds the session, starts the poll
thread) -> `require_model().predict(rows)`. The poll thread watches the source's version token
(the ETag of `champion/metadata.json`, or the local metadata file's mtime and size) and, when
it changes, loads the new model completely and then swaps one reference. A request takes that
reference once, so in-flight requests finish on the model they started with. A failed load
keeps the previous model and records `last_error`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from readmission.serving.errors import ModelLoadError, ModelNotReady
from readmission.serving.model import LoadedModel
from readmission.serving.settings import ServingSettings

log = logging.getLogger(__name__)


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
        signal handlers, and a SIGTERM arriving while onnxruntime is imported and the session
        built would be lost (the worker then kept serving until gunicorn's
        graceful timeout killed it). A request's `ensure_serving()` waits for the thread.
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
