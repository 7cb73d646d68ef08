"""How the predict function's gunicorn closes a connection after its reply.

With `THREADS=1` (as shipped) gunicorn runs its sync worker, which answers one request per
connection and then closes it. Since gunicorn 26 that close lingers (`gunicorn.util.
close_graceful`, RFC 9112 section 9.6): it sends FIN, then waits until the client closes its
side (up to 2 s), reading and dropping what arrives. That protects a reply from a TCP reset
when request bytes are still unread or still on their way: closing a socket with unread data
makes the kernel answer with a reset, and the client may lose the reply.

A sync worker serves nothing else while it waits, so each request also cost the client's time
to read the reply and close, which bounds the requests per second of a worker (measured in
docs/predict.md, Benchmark). For this function the wait protects nothing in almost every
case. functions-framework reads the whole request body before every non-streamed reply
(`read_request`), so when nothing more has arrived either, nothing unread is left, and
close() sends a plain FIN after the reply.

`close_after_reply` therefore lingers as gunicorn does only when a reset could cost the client
its reply:
- the client has already sent more than the request (the linger reads and drops it), or
- the handler marked the connection with `linger_after_reply`: the reply was sent before the
  body was read (the predict function's streamed 413 for an oversized body).
Otherwise it half-closes and closes at once. The one case left to gunicorn ≤ 25's plain
close: an HTTP/1.1 client that pipelines a request onto a connection the server closes
(`Connection: close`) and sends it after the close. No client in this project's path does
(hey, Locust, Knative's queue-proxy wait for each reply).

Reach-in: `gunicorn.util.close_graceful` is gunicorn's internal, replaced by `install()`.
Checked against gunicorn 26.x (pinned in pyproject.toml); with another version, or without
`close_graceful`, `install()` warns once and leaves gunicorn's own close in place.
"""

from __future__ import annotations

import contextlib
import socket
import weakref
from collections.abc import Callable, MutableMapping
from typing import Any

import gunicorn.util

from readmission.glue.versions import checked, warn_once

CHECKED_RANGE = ((26,), (27,))  # gunicorn versions close_graceful was checked against
_WHAT = "gunicorn.util.close_graceful"
_LINGERING: weakref.WeakSet[socket.socket] = weakref.WeakSet()
_gunicorn_close: Callable[..., None] | None = getattr(gunicorn.util, "close_graceful", None)


def linger_after_reply(environ: MutableMapping[str, Any]) -> None:
    """Mark the request's connection: its close waits for the client (the body is unread)."""
    sock = environ.get("gunicorn.socket")
    if isinstance(sock, socket.socket):
        _LINGERING.add(sock)


def _unread_bytes_waiting(sock: socket.socket) -> bool:
    """True if the client has sent bytes nobody read; False if nothing (or only its FIN)."""
    try:
        sock.setblocking(False)  # with a timeout (slow_clients sets one) recv would wait for one
        return bool(sock.recv(1, socket.MSG_PEEK))
    except OSError:  # nothing waiting (EAGAIN), or reset: no reply left to protect
        return False


def close_after_reply(sock: socket.socket, timeout: float = 2.0, max_drain: int = 65536) -> None:
    """gunicorn's close_graceful when a reset could cost the client its reply, else close now."""
    if _gunicorn_close is not None and (sock in _LINGERING or _unread_bytes_waiting(sock)):
        _LINGERING.discard(sock)
        _gunicorn_close(sock, timeout, max_drain)
        return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)  # FIN after the reply
    with contextlib.suppress(OSError):
        sock.close()


def install() -> bool:
    """Make gunicorn's workers close with `close_after_reply`; False (with one warning) if this
    gunicorn is outside the checked range or has no lingering close: its own close stays."""
    if not checked("gunicorn", *CHECKED_RANGE, _WHAT):
        return False
    if _gunicorn_close is None:
        warn_once(_WHAT, "this gunicorn has no close_graceful")
        return False
    gunicorn.util.close_graceful = close_after_reply
    return True
