"""The predict function's flask replies: JSON documents, errors, files.

Contract: `json_response(body, status)` is compact JSON; `error_response(error)` is the
error's JSON body (`to_dict()`) with its `status`. For an error raised before the body was read
(`error.unread`), the reply is streamed and its connection closed after it, see
`error_response`.

Reach-in: to close such a connection, the error reply sets `must_close` on gunicorn's parsed
request (`wsgi.input.reader.req`, the `gunicorn.http.message.Request`). Checked against
gunicorn 26.x; with another version, another server or that internal missing, the
connection is only marked for a lingering close (readmission.glue.http_close), as a worker
with one request per connection needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import flask

from readmission.glue import http_close
from readmission.glue.json_codec import dumps
from readmission.glue.versions import checked

CHECKED_RANGE = ((26,), (27,))  # gunicorn versions the must_close reach-in was checked on
_WHAT = "gunicorn wsgi.input.reader.req.must_close"
JSON = "application/json"
checked("gunicorn", *CHECKED_RANGE, _WHAT)  # decided at import, not on a request

Response = flask.Response
Request = flask.Request


def json_response(body: Any, status: int = 200) -> flask.Response:
    return flask.Response(dumps(body), status, mimetype=JSON)


def raw_response(
    data: bytes,
    mimetype: str | None = None,
    headers: Mapping[str, str] | None = None,
    *,
    content_type: str | None = None,
) -> flask.Response:
    """A 200 reply of bytes (a file, a cached document, the metrics text)."""
    return flask.Response(
        data, 200, mimetype=mimetype, content_type=content_type, headers=dict(headers or {})
    )


class ErrorReply(Protocol):
    """What an error reply is made of (readmission.serving.errors.InputError has it)."""

    status: int

    def to_dict(self) -> dict[str, Any]: ...


def error_response(error: ErrorReply) -> flask.Response:
    if not getattr(error, "unread", False):
        return json_response(error.to_dict(), error.status)
    # functions-framework reads the whole request body into memory after every non-streamed
    # response (`read_request`); a streamed reply skips that (for an unreadable body that
    # read would fail again, and answer 500). Its connection is marked so that gunicorn's
    # close lingers and drops what the client still sends (readmission.glue.http_close):
    # arriving at a closed socket, it would make the kernel reset the connection and the
    # client could lose the reply. A worker that keeps connections open (THREADS > 1) is told
    # to close this one: its next request could not be found in the unread body.
    body = dumps(error.to_dict())
    environ = flask.request.environ
    http_close.linger_after_reply(environ)
    message = getattr(getattr(environ.get("wsgi.input"), "reader", None), "req", None)
    if (
        message is not None
        and hasattr(message, "must_close")
        and checked("gunicorn", *CHECKED_RANGE, _WHAT)
    ):
        message.must_close = True
    return flask.Response(
        iter([body]), error.status, mimetype=JSON, headers={"Content-Length": str(len(body))}
    )
