"""The predict function's routes and the router that matches a request to one.

Contract: `ROUTES` is the single list of (method, path template) the function answers. A
`Router` is built from a dispatch table keyed by exactly those routes (anything else raises
RuntimeError at import: the OpenAPI document is generated from ROUTES) and returns, for a
method and path, the table's value and the template's parameters, or 404 (no such path) or
405 (the path exists for another method). HEAD is routed as GET.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Generic, TypeVar

ROUTES: tuple[tuple[str, str], ...] = (
    ("GET", "/"),
    ("GET", "/assets/{filename}"),
    ("POST", "/predict"),
    ("POST", "/predict/batch"),
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/model-info"),
    ("GET", "/model/learning-curve.png"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/v2"),
    ("GET", "/v2/health/live"),
    ("GET", "/v2/health/ready"),
    ("GET", "/v2/models/{model_name}"),
    ("GET", "/v2/models/{model_name}/ready"),
    ("POST", "/v2/models/{model_name}/infer"),
)

Target = TypeVar("Target")


class Router(Generic[Target]):
    def __init__(self, dispatch: Mapping[tuple[str, str], Target]) -> None:
        if set(dispatch) != set(ROUTES):
            raise RuntimeError("the dispatch table and readmission.serving.routes.ROUTES disagree")
        self._exact = {key: value for key, value in dispatch.items() if "{" not in key[1]}
        self._patterns = [
            (method, re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path) + "$"), value)
            for (method, path), value in dispatch.items()
            if "{" in path
        ]

    def route(self, method: str, path: str) -> tuple[Target, dict[str, str]] | int:
        """The target of a request and its path parameters, or 404/405."""
        method = "GET" if method == "HEAD" else method
        found = self._exact.get((method, path))
        if found is not None:
            return found, {}
        known_path = any(p == path for _, p in self._exact)
        for pattern_method, pattern, value in self._patterns:
            match = pattern.match(path)
            if match:
                if pattern_method == method:
                    return value, match.groupdict()
                known_path = True
        return 405 if known_path else 404
