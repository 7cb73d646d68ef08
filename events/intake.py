"""The HTTP intake the local broker and the local JobSink share: how they accept connections.

A thread per connection (`IntakeServer`, daemon threads) with a listen backlog of 128, and
read timeouts (`IntakeHandler`), so a slow or stalled client holds only its own thread and is
dropped:

* every read of a request head may wait at most `ReadTimeouts.header` seconds: a connection
  that goes silent that long before its head is complete is closed without an answer
  (BaseHTTPRequestHandler ends the connection on the timeout);
* once a handler reads the body (`IntakeHandler.read_body`), every read of it may wait at most
  `ReadTimeouts.body` seconds.

Settings: HTTP_HEADER_TIMEOUT and HTTP_BODY_TIMEOUT (seconds, default 10), the names the
functions' gate reads too (readmission.glue.slow_clients); docs/reliability.md, Slow clients.
"""

from __future__ import annotations

from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from readmission import env


@dataclass(frozen=True)
class ReadTimeouts:
    """Seconds a client may stay silent per read: of its request head, of its body."""

    header: float = 10.0
    body: float = 10.0

    @classmethod
    def from_env(cls) -> ReadTimeouts:
        return cls(
            header=env.seconds("HTTP_HEADER_TIMEOUT", cls.header),
            body=env.seconds("HTTP_BODY_TIMEOUT", cls.body),
        )


class IntakeServer(ThreadingHTTPServer):
    """A threaded HTTP server whose handlers (`IntakeHandler`) read under `timeouts`."""

    daemon_threads = True
    # listen backlog: socketserver's 5 drops the SYN of a 6th connection made at once, and
    # the client waits a 1 s retransmission (gunicorn's default backlog is 2048)
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[IntakeHandler],
        timeouts: ReadTimeouts,
    ) -> None:
        self.timeouts = timeouts
        super().__init__(address, handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class IntakeHandler(BaseHTTPRequestHandler):
    """A request handler whose reads time out (see the module docstring)."""

    server: IntakeServer

    def handle_one_request(self) -> None:
        # a read that times out ends the connection (BaseHTTPRequestHandler catches it)
        self.connection.settimeout(self.server.timeouts.header)
        super().handle_one_request()

    def read_body(self, length: int) -> bytes:
        """The request's `length` body bytes, each read waiting at most the body timeout."""
        self.connection.settimeout(self.server.timeouts.body)
        return self.rfile.read(length)
