"""Read timeouts for the functions' gunicorn, so that slow or stalled clients cannot starve them.

gunicorn's sync worker reads a connection's request on its one thread with no timeout: two
connections that send nothing take a two-worker function offline. gunicorn 26's threaded
worker waits 5 s for a first byte on a pool thread, then has no timeout for the rest of the
head or for the body. So every function serves with `GatedWorker`, a sync worker with a gate
in front of its handler:

- The gate accepts every connection at once and watches it with epoll (edge-triggered, one
  `MSG_PEEK` per arrival, nothing consumed), no thread per connection. A connection is handed
  to a handler only once its whole request head is there and, for a body that declares a
  Content-Length and fits in `GATE_BYTES` with its head, its whole body too (a WHOLE
  request). So any number of idle, half-header and stalled small-body clients hold no handler.
- Invariant: a connection that has not sent its whole head within `HTTP_HEADER_TIMEOUT`
  seconds of its accept, or whose body (waited for in the gate) makes no progress for
  `HTTP_BODY_TIMEOUT` seconds, is closed without an answer. A worker holds at most gunicorn's
  `worker_connections` (1000) connections in its gate; it closes the ones beyond at once.
- A WHOLE request goes to the worker's own thread when `THREADS=1` (the predict function, as
  before), else to a pool of `THREADS` threads. A STREAMED one (larger or chunked body, or
  `Expect: 100-continue`) goes to a pool of `HTTP_STREAM_THREADS` threads of its own, so a
  stalled body never holds the handler of whole requests.
- A handed-over connection reads and writes with a socket timeout of `HTTP_BODY_TIMEOUT`
  seconds per operation: a streamed body that stalls holds its thread at most that long, then
  the read raises `TimeoutError` (the predict function answers 408, the CloudEvent functions
  500, which their sender retries). Each connection serves one request and is closed, as
  with the sync worker (readmission.glue.http_close decides how).

Settings (environment, read when the worker starts): `HTTP_HEADER_TIMEOUT` (seconds, default
10), `HTTP_BODY_TIMEOUT` (seconds, default 10), `HTTP_STREAM_THREADS` (default 4).
docs/reliability.md (Slow clients) describes the behaviour, docs/performance.md the predict
figures before and after.

Reach-in: `install()` makes functions-framework's `GunicornApplication` choose this worker
class; `GatedWorker` extends gunicorn's `SyncWorker` (its `handle`). Checked against
functions-framework 3.x and gunicorn 26.x; outside those, or without epoll, `install()` warns
once and gunicorn's own workers stay.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import select
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from gunicorn.workers.sync import SyncWorker

from readmission import env
from readmission.glue.versions import checked, warn_once

GUNICORN_RANGE = ((26,), (27,))
FUNCTIONS_FRAMEWORK_RANGE = ((3,), (4,))
_WHAT = "functions-framework GunicornApplication worker class"
WORKER_CLASS = f"{__name__}.GatedWorker"
GATE_BYTES = 65536  # what the gate peeks at most: a request this small is handed over whole
_HEAD_END = b"\r\n\r\n"
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)[ \t]*\r\n", re.IGNORECASE)
_NO_WAIT_FOR_BODY = re.compile(rb"\r\n(transfer-encoding|expect):", re.IGNORECASE)
_MOST_WAIT = 1.0  # the loop wakes at least this often (gunicorn's heartbeat, parent check)


@dataclass(frozen=True)
class ReadTimeouts:
    """Seconds a client may take: its whole request head; each read (or write) of its body.
    And how many streamed bodies a worker reads at once."""

    header: float = 10.0
    body: float = 10.0
    streams: int = 4  # threads per worker that read the bodies the gate does not wait for

    @classmethod
    def from_env(cls) -> ReadTimeouts:
        return cls(
            header=env.seconds("HTTP_HEADER_TIMEOUT", cls.header),
            body=env.seconds("HTTP_BODY_TIMEOUT", cls.body),
            streams=env.integer("HTTP_STREAM_THREADS", cls.streams, minimum=1),
        )


PARTIAL, WHOLE, STREAMED = "partial", "whole", "streamed"


def request_state(data: bytes, most: int = GATE_BYTES) -> str:
    """What `data` (the first bytes of a connection, at most `most`) holds: WHOLE, a request
    head and all of its body (none, or a Content-Length that fits in `most` with the head);
    STREAMED, a head whose body is read by the handler (larger, chunked, or after a
    100 Continue), or `most` bytes of a head; PARTIAL, less."""
    if len(data) >= most:
        return STREAMED
    end = data.find(_HEAD_END)
    if end < 0:
        return PARTIAL
    head = data[: end + 2]  # ends with the last header line's CRLF, for the patterns
    if _NO_WAIT_FOR_BODY.search(head):  # chunked, or the client waits for 100 Continue
        return STREAMED
    match = _CONTENT_LENGTH.search(head)
    whole = end + len(_HEAD_END) + (int(match.group(1)) if match else 0)
    if whole > most:
        return STREAMED
    return WHOLE if len(data) >= whole else PARTIAL


class _Waiting:
    """A connection in the gate: not yet handed to a handler."""

    __slots__ = ("addr", "deadline", "head_done", "listener", "seen", "sock", "watched")

    def __init__(
        self, sock: socket.socket, addr: object, listener: socket.socket, deadline: float
    ) -> None:
        self.sock = sock
        self.addr = addr
        self.listener = listener
        self.deadline = deadline
        self.seen = -1  # not looked at yet
        self.head_done = False
        self.watched = False  # registered with the epoll


class GatedWorker(SyncWorker):
    """gunicorn's sync worker behind an epoll gate that waits for whole requests (see module)."""

    def run(self) -> None:
        timeouts = ReadTimeouts.from_env()
        threads = max(1, int(self.cfg.threads))
        pool = ThreadPoolExecutor(threads, thread_name_prefix="handler") if threads > 1 else None
        streams = ThreadPoolExecutor(timeouts.streams, thread_name_prefix="stream")
        poller = select.epoll()
        listeners = {s.fileno(): s for s in self.sockets}
        for sock in self.sockets:
            sock.setblocking(False)
            poller.register(sock.fileno(), select.EPOLLIN)
        poller.register(self.PIPE[0], select.EPOLLIN)
        waiting: dict[int, _Waiting] = {}

        def hand_over(conn: _Waiting, state: str) -> None:
            del waiting[conn.sock.fileno()]
            if conn.watched:
                poller.unregister(conn.sock.fileno())
            conn.sock.settimeout(timeouts.body)  # every read and write of the handler
            if state == STREAMED:  # its reads may stall: never on the handlers of whole ones
                streams.submit(self.handle, conn.listener, conn.sock, conn.addr)
            elif pool is None:
                self.handle(conn.listener, conn.sock, conn.addr)
            else:
                pool.submit(self.handle, conn.listener, conn.sock, conn.addr)

        def drop(conn: _Waiting) -> None:
            del waiting[conn.sock.fileno()]
            if conn.watched:
                with contextlib.suppress(OSError, KeyError, ValueError):
                    poller.unregister(conn.sock.fileno())
            with contextlib.suppress(OSError):
                conn.sock.close()

        def look(conn: _Waiting, now: float) -> None:
            try:
                data = conn.sock.recv(GATE_BYTES, socket.MSG_PEEK)
            except BlockingIOError:
                return
            except OSError:  # reset
                drop(conn)
                return
            state = request_state(data) if data else PARTIAL
            if not data:  # closed before a whole request: nothing to answer
                drop(conn)
            elif state != PARTIAL:
                hand_over(conn, state)
            elif len(data) > conn.seen:
                if not conn.head_done and _HEAD_END in data:
                    conn.head_done = True  # from now on: no progress for the body timeout
                if conn.head_done:
                    conn.deadline = now + timeouts.body
                conn.seen = len(data)

        try:
            while self.alive:
                self.notify()
                if not self.is_parent_alive():
                    return
                now = time.monotonic()
                wait = min([_MOST_WAIT, *(c.deadline - now for c in waiting.values())])
                try:
                    events = poller.poll(max(wait, 0.0))
                except InterruptedError:
                    continue
                now = time.monotonic()
                for fd, _mask in events:
                    if fd in listeners:
                        self._accept_all(listeners[fd], waiting, now + timeouts.header)
                    elif fd == self.PIPE[0]:
                        with contextlib.suppress(OSError):
                            os.read(fd, 64)
                    elif fd in waiting:
                        look(waiting[fd], now)
                    if not self.alive:
                        break
                # new connections: most have sent their whole request already and are handed
                # over at once; the others are watched (an edge for each arrival from now on,
                # and one at once if bytes came since the look: no arrival is missed)
                for conn in [c for c in waiting.values() if c.seen < 0]:
                    conn.seen = 0
                    look(conn, now)
                    if conn.sock.fileno() in waiting and not conn.watched:
                        conn.watched = True
                        events_mask = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
                        poller.register(conn.sock.fileno(), events_mask)
                now = time.monotonic()
                for conn in [c for c in waiting.values() if c.deadline <= now]:
                    drop(conn)
        finally:
            for conn in list(waiting.values()):
                drop(conn)
            poller.close()
            for executor in (pool, streams):  # in-flight requests finish (graceful timeout)
                if executor is not None:
                    executor.shutdown(wait=True)

    def _accept_all(
        self,
        listener: socket.socket,
        waiting: dict[int, _Waiting],
        deadline: float,
    ) -> None:
        while True:
            try:
                client, addr = listener.accept()
            except OSError as error:
                if error.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.ECONNABORTED):
                    return
                raise
            if len(waiting) >= self.cfg.worker_connections:  # gunicorn's cap (1000): shed
                client.close()
                continue
            client.setblocking(False)
            waiting[client.fileno()] = _Waiting(client, addr, listener, deadline)


def install() -> bool:
    """Make functions-framework's gunicorn serve with `GatedWorker`; False (with one warning)
    outside the checked versions or without epoll: gunicorn's own worker stays. Call it when
    the function's module is imported (before functions-framework builds its server)."""
    if not hasattr(select, "epoll"):
        warn_once(_WHAT, "no epoll on this platform")
        return False
    if not (
        checked("gunicorn", *GUNICORN_RANGE, _WHAT)
        and checked("functions-framework", *FUNCTIONS_FRAMEWORK_RANGE, _WHAT)
    ):
        return False
    try:
        from functions_framework._http import gunicorn as ff_gunicorn
    except ImportError:
        warn_once(_WHAT, "functions-framework has no gunicorn application")
        return False
    application = ff_gunicorn.GunicornApplication
    load_config: Callable[..., None] = application.load_config
    if getattr(load_config, "gated", False):
        return True

    def gated_load_config(self: ff_gunicorn.GunicornApplication) -> None:
        load_config(self)
        if "worker_class" not in self.options:  # THREADED_TIMEOUT_ENABLED chose its own
            self.cfg.set("worker_class", WORKER_CLASS)

    gated_load_config.gated = True  # type: ignore[attr-defined]
    application.load_config = gated_load_config  # type: ignore[method-assign]
    return True
