"""The predict function's request bodies, read from flask/werkzeug and gunicorn.

Contract: `read_json(request, limit)` returns the parsed JSON body or raises an InputError:
BodyTooLarge (413) above `limit` bytes, 415 for another Content-Type, UnreadableBody (400)
for a body that cannot be read to its end, 400 invalid_json. An oversized body up to
DRAIN_BYTES is read and dropped before the 413, so the client reliably receives the answer
(closing a socket with unread data resets the connection); a larger one is refused unread.

Reach-in: gunicorn's `wsgi.input` (`gunicorn.http.body.Body`) reads its length-delimited
reader in small pieces and copies the rest of each socket chunk back on every call, which is
a large part of reading a big batch. A body with a Content-Length that nobody has started
reading is read from that reader (`LengthReader`, via the Body's `reader` and `buf`)
directly. Checked against gunicorn 26.x; with another version, another server, a chunked body
or those internals missing, the body goes through werkzeug's public `request.stream`.
"""

from __future__ import annotations

from typing import Any

import flask

from readmission.glue.versions import checked
from readmission.serving.errors import BodyTooLarge, InputError, UnreadableBody
from readmission.serving.json_codec import MAX_NESTING, loads

try:  # functions-framework serves with gunicorn
    from gunicorn.http.body import LengthReader as _LengthReader
except ImportError:  # pragma: no cover
    _LengthReader = None

CHECKED_RANGE = ((26,), (27,))  # gunicorn versions the Body/LengthReader use was checked on
_WHAT = "gunicorn wsgi.input LengthReader"
DRAIN_BYTES = 16 * 1024 * 1024  # oversized bodies up to this are read and dropped before 413
JSON = "application/json"
checked("gunicorn", *CHECKED_RANGE, _WHAT)  # decided at import, not on a request


def _drain(request: flask.Request, budget: int) -> bool:
    """Read and drop up to `budget` bytes of the body; True if the body is then exhausted."""
    while budget > 0:
        chunk = request.stream.read(min(65536, budget))
        if not chunk:
            return True
        budget -= len(chunk)
    return not request.stream.read(1)


def _read_body(request: flask.Request, most: int) -> bytes:
    """Up to `most` bytes of the request body: from gunicorn's LengthReader when the body has
    a Content-Length and is unread (one copy per socket read), else through werkzeug."""
    length = request.content_length
    body = request.environ.get("wsgi.input")
    reader = getattr(body, "reader", None)
    buffered = getattr(body, "buf", None)
    if (
        length is not None
        and _LengthReader is not None
        and isinstance(reader, _LengthReader)
        and buffered is not None
        and buffered.tell() == 0
        and checked("gunicorn", *CHECKED_RANGE, _WHAT)
    ):
        return reader.read(min(length, most))
    return request.stream.read(most)


def read_json(request: flask.Request, limit: int) -> Any:
    """The JSON body, after checking its size (Content-Length first) and its content type."""
    length = request.content_length
    if length is not None and length > limit:
        raise BodyTooLarge(
            limit, unread=length > limit + DRAIN_BYTES or not _drain(request, length)
        )
    # the exact header first: werkzeug's parse of it (for parameters, case) costs more
    if request.environ.get("CONTENT_TYPE") != JSON and request.mimetype != JSON:
        raise InputError(
            "Content-Type must be application/json", None, kind="unsupported_media_type", status=415
        )
    try:
        data = _read_body(request, limit + 1)
        if len(data) > limit:
            raise BodyTooLarge(limit, unread=not _drain(request, DRAIN_BYTES))
    except OSError as exc:  # gunicorn's chunked-body errors are IOErrors, as a reset is
        raise UnreadableBody(str(exc) or type(exc).__name__) from exc
    try:
        return loads(data)
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
