"""Errors of the serving core and how a client sees them.

Contract: `InputError` (and its subclasses) is bad input a client can fix: its `status` is the
HTTP status (4xx) and `to_dict()` the JSON body {"error", "field", "kind", ["row"],
["allowed"]}; `ModelNotReady` is 503; `ModelLoadError` is a model or metadata that cannot be
served (the model server keeps its previous model). `shown()` renders a client's value in a
message without ever recursing through it.
"""

from __future__ import annotations

import reprlib
from collections.abc import Sequence
from typing import Any


def shown(value: Any) -> str:
    """A client's value as an error message shows it: repr, with lists and objects shortened
    (and never recursing through a deeply nested one: its repr would raise RecursionError)."""
    return reprlib.repr(value) if isinstance(value, (list, dict)) else repr(value)


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


class BodyTooLarge(InputError):
    """413 for a body above PREDICT_MAX_BODY_BYTES; `unread` if the body is still unread."""

    def __init__(self, limit: int, unread: bool) -> None:
        super().__init__(
            f"the body is larger than {limit} bytes (PREDICT_MAX_BODY_BYTES)",
            None,
            kind="body_too_large",
            status=413,
        )
        self.unread = unread


class UnreadableBody(InputError):
    """400 for a body that cannot be read to its end: a malformed chunked encoding (an invalid
    size line, data longer than its size, a bad extension) or one cut off. gunicorn's reader
    raises an IOError for each; the rest of the connection cannot be framed, so nothing more
    is read from it (`unread`: the reply is streamed and the connection closed after it).
    408 body_timeout for a body that stalls past the server's read timeout."""

    def __init__(self, reason: str, kind: str = "unreadable_body", status: int = 400) -> None:
        super().__init__(f"the body cannot be read: {reason}"[:200], None, kind=kind, status=status)
        self.unread = True
