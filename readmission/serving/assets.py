"""The model's assets as the predict function serves them, cached per model version.

Contract: `ModelAssets(source)` answers, for a LoadedModel, its learning-curve table (inline
in the metadata, or the CSV the metadata names), its learning-curve PNG (bytes or None), and
the OpenAPI document (bytes) of the model being served. Each is read from the source at most
once per model token (a failed read is logged and remembered as None for that token); the
OpenAPI cache holds only the document of the latest token. Thread-safe for readers: a race
reads the same asset twice, never a wrong one.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable
from typing import Any, Protocol

from readmission.serving.model import LoadedModel

log = logging.getLogger(__name__)


class AssetSource(Protocol):
    def asset(self, key: str) -> bytes | None:
        """A file the metadata names (e.g. the learning-curve PNG), or None."""


class ModelAssets:
    def __init__(self, source: AssetSource) -> None:
        self.source = source
        self._learning_curves: dict[str, Any] = {}
        self._openapi: dict[str, bytes] = {}

    def _read(self, key: Any, what: str) -> bytes | None:
        if not isinstance(key, str):
            return None
        try:
            return self.source.asset(key)
        except Exception as exc:
            log.warning("%s unavailable: %s", what, exc)
            return None

    def learning_curve_table(self, model: LoadedModel) -> list[dict[str, Any]] | None:
        """The learning-curve table: inline in the metadata, or the CSV it names (cached)."""
        curve = model.metadata.get("learning_curve")
        if not isinstance(curve, dict):
            return None
        for key in ("table", "rows"):
            if isinstance(curve.get(key), list):
                return curve[key]
        cache_key = f"csv:{model.token}"
        if cache_key not in self._learning_curves:
            data = self._read(curve.get("csv"), "learning-curve CSV")
            table = None
            if data is not None:
                table = list(csv.DictReader(io.StringIO(data.decode("utf-8", "replace"))))
            self._learning_curves[cache_key] = table
        return self._learning_curves[cache_key]

    def learning_curve_png(self, model: LoadedModel) -> bytes | None:
        """The learning-curve plot the metadata names, or None (cached)."""
        curve = model.metadata.get("learning_curve")
        key = curve.get("png") if isinstance(curve, dict) else None
        cache_key = f"png:{model.token}"
        if cache_key not in self._learning_curves:
            self._learning_curves[cache_key] = self._read(key, "learning-curve PNG")
        return self._learning_curves[cache_key]

    def openapi(
        self, model: LoadedModel | None, build: Callable[[LoadedModel | None], dict[str, Any]]
    ) -> bytes:
        """The OpenAPI document `build(model)` gives, as bytes, for the latest model only."""
        key = model.token if model is not None else ""
        document = self._openapi.get(key)
        if document is None:
            document = json.dumps(build(model), indent=1).encode()
            self._openapi.clear()
            self._openapi[key] = document
        return document
