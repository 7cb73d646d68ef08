"""What a request body must be to be read as a JSON document: the size, type and syntax rules.

Contract: `read_json(request, limit)` returns the parsed JSON body (`read_json_bytes`: the
body's bytes as well, e.g. for the prediction log) or raises an InputError:
BodyTooLarge (413) above `limit` bytes, 415 for another Content-Type, UnreadableBody (400)
for a body that cannot be read to its end (408 body_timeout for one that stalls past the
server's read timeout), 400 invalid_json (nested deeper than the codec's MAX_NESTING
included). An oversized body up to DRAIN_BYTES is read and dropped before the
413, so the client reliably receives the answer (closing a socket with unread data resets the
connection); a larger one is refused unread. How the bytes are read from the server is
readmission.glue.request_body's business; `request` is whatever that module reads.
"""

from __future__ import annotations

from typing import Any

from readmission.glue.json_codec import MAX_NESTING, loads
from readmission.glue.request_body import content_length, declares_json, drain, read_body
from readmission.serving.errors import BodyTooLarge, InputError, UnreadableBody

DRAIN_BYTES = 16 * 1024 * 1024  # oversized bodies up to this are read and dropped before 413


def read_json(request: Any, limit: int) -> Any:
    """The JSON body, after checking its size (Content-Length first) and its content type."""
    return read_json_bytes(request, limit)[0]


def read_json_bytes(request: Any, limit: int) -> tuple[Any, bytes]:
    """The JSON body and the bytes it was read from (see read_json)."""
    length = content_length(request)
    if length is not None and length > limit:
        raise BodyTooLarge(limit, unread=length > limit + DRAIN_BYTES or not drain(request, length))
    if not declares_json(request):
        raise InputError(
            "Content-Type must be application/json", None, kind="unsupported_media_type", status=415
        )
    try:
        data = read_body(request, limit + 1)
        if len(data) > limit:
            raise BodyTooLarge(limit, unread=not drain(request, DRAIN_BYTES))
    except TimeoutError as exc:  # the server's body read timeout (readmission.glue.slow_clients)
        raise UnreadableBody("it stalled", kind="body_timeout", status=408) from exc
    except OSError as exc:  # gunicorn's chunked-body errors are IOErrors, as a reset is
        raise UnreadableBody(str(exc) or type(exc).__name__) from exc
    try:
        return loads(data), data
    except RecursionError:
        raise InputError(
            f"the body is not valid JSON: nested too deeply (at most {MAX_NESTING} levels)",
            None,
            kind="invalid_json",
            status=400,
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(
            f"the body is not valid JSON: {exc}"[:200], None, kind="invalid_json", status=400
        ) from exc
