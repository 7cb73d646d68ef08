"""The JSON codec of the predict function's HTTP bodies: orjson if installed, else the stdlib.

Contract: `dumps(body)` gives compact JSON bytes, the same document either way. `loads(data)`
accepts and reads exactly what the stdlib's `json.loads` does (orjson only makes the common
case faster); a document nested too deeply raises RecursionError, anything else invalid
ValueError (UnicodeDecodeError included).
"""

from __future__ import annotations

import json
from typing import Any

try:  # a C JSON codec (base dependency), much faster on large batches
    import orjson
except ImportError:  # pragma: no cover - the stdlib then does it all
    orjson = None

MAX_NESTING = 1024  # orjson's depth limit; the stdlib recurses beyond it


def dumps(body: Any) -> bytes:
    """Compact JSON: orjson when installed, else the stdlib (same document)."""
    if orjson is not None:
        try:
            return orjson.dumps(body)
        except TypeError:  # e.g. an integer beyond 64 bits: the stdlib handles it
            pass
    return json.dumps(body, separators=(",", ":")).encode()


def loads(data: bytes) -> Any:
    """Parse JSON. orjson first; on its refusal the stdlib decides, so what is accepted and
    how it is read is exactly the stdlib's (NaN/Infinity literals, integers beyond 64 bits,
    lone surrogates are accepted there, then refused or handled by validation). Nesting is
    the exception: beyond orjson's 1,024 levels the stdlib recurses too, so RecursionError
    (raised by either) means "nested too deeply"."""
    if orjson is not None:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            reason = str(exc).lower()
            if "depth" in reason or "recursion" in reason:
                raise RecursionError(str(exc)) from None
    return json.loads(data)
