"""A real HTTP server for tests that plays a subscriber or a sink from a script of replies."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Subscriber:
    """A real HTTP server replying from a script: (status, headers, body[, delay]) each."""

    replies: list[tuple[Any, ...]] = field(default_factory=list)
    default: tuple[Any, ...] = (204, {}, b"")
    received: list[Received] = field(default_factory=list)
    active: int = 0
    max_active: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> Subscriber:
        subscriber = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with subscriber.lock:
                    subscriber.received.append(
                        Received({k.lower(): v for k, v in self.headers.items()}, body, time.time())
                    )
                    reply = subscriber.replies.pop(0) if subscriber.replies else subscriber.default
                    subscriber.active += 1
                    subscriber.max_active = max(subscriber.max_active, subscriber.active)
                status, headers, payload, *delay = reply
                try:
                    if delay:
                        time.sleep(delay[0])
                finally:  # done before the reply leaves: once the caller has the reply, the
                    # request no longer counts as active (however late this thread resumes)
                    with subscriber.lock:
                        subscriber.active -= 1
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()

    def ids(self) -> list[str]:
        return [r.headers.get("ce-id", "") for r in self.received]
