"""The predict function's request bodies, read from flask/werkzeug and gunicorn.

Contract: `content_length(request)`, `declares_json(request)`, `read_body(request, most)`
(at most `most` bytes; an OSError for a body that cannot be read to its end, as gunicorn
raises for a malformed chunked body or a reset) and `drain(request, budget)` (read and drop;
True when the body is exhausted). What a body must be (size, type, JSON) is the serving
core's rule (readmission.serving.request_json), not this module's.

Reach-in: gunicorn's `wsgi.input` (`gunicorn.http.body.Body`) reads its length-delimited
reader in small pieces and copies the rest of each socket chunk back on every call, which is
a large part of reading a big batch. A body with a Content-Length that nobody has started
reading is read from that reader (`LengthReader`, via the Body's `reader` and `buf`)
directly. Checked against gunicorn 26.x; with another version, another server, a chunked body
or those internals missing, the body goes through werkzeug's public `request.stream`.
"""

from __future__ import annotations

import flask

from readmission.glue.versions import checked

try:  # functions-framework serves with gunicorn
    from gunicorn.http.body import LengthReader as _LengthReader
except ImportError:  # pragma: no cover
    _LengthReader = None

CHECKED_RANGE = ((26,), (27,))  # gunicorn versions the Body/LengthReader use was checked on
_WHAT = "gunicorn wsgi.input LengthReader"
JSON = "application/json"
checked("gunicorn", *CHECKED_RANGE, _WHAT)  # decided at import, not on a request


def drain(request: flask.Request, budget: int) -> bool:
    """Read and drop up to `budget` bytes of the body; True if the body is then exhausted."""
    while budget > 0:
        chunk = request.stream.read(min(65536, budget))
        if not chunk:
            return True
        budget -= len(chunk)
    return not request.stream.read(1)


def read_body(request: flask.Request, most: int) -> bytes:
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


def content_length(request: flask.Request) -> int | None:
    return request.content_length


def declares_json(request: flask.Request) -> bool:
    """The Content-Type is application/json (the exact header first: werkzeug's parse of it,
    for parameters and case, costs more)."""
    return request.environ.get("CONTENT_TYPE") == JSON or request.mimetype == JSON
