"""readmission.glue.http_close: the predict function's close after a reply, on real loopback TCP.

A server socket that is still open (lingering) reads and drops what the client sends; a closed
one answers it with a reset. The tests observe which one happened.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import gunicorn.util
import pytest
from support.predict_support import reset_after_sending

from readmission.glue import http_close

REQUEST = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
REPLY = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}"


@pytest.fixture
def connection() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(server side, client side) of one loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=10)
        server, _ = listener.accept()
    server.settimeout(None)
    try:
        yield server, client
    finally:
        client.close()
        server.close()


def _serve(server: socket.socket, read: int = len(REQUEST)) -> None:
    received = b""
    while len(received) < read:
        received += server.recv(read - len(received))
    server.sendall(REPLY)


def _close_in_thread(server: socket.socket) -> threading.Thread:
    """close_after_reply with a 60 s linger limit, so a linger outlasts every check below."""
    thread = threading.Thread(target=http_close.close_after_reply, args=(server, 60.0))
    thread.start()
    return thread


def _read_to_end(client: socket.socket) -> bytes:
    data = b""
    while chunk := client.recv(4096):
        data += chunk
    return data


def test_a_reply_to_a_request_read_to_its_end_closes_without_waiting_for_the_client(
    connection: tuple[socket.socket, socket.socket],
) -> None:
    server, client = connection
    client.sendall(REQUEST)
    _serve(server)
    closing = _close_in_thread(server)
    closing.join(10)
    assert not closing.is_alive()  # gunicorn's linger would wait for the client's close
    assert _read_to_end(client) == REPLY  # the whole reply, then FIN
    assert reset_after_sending(client)  # nothing is left listening


def test_bytes_sent_beyond_the_request_make_the_close_linger_and_the_reply_arrives(
    connection: tuple[socket.socket, socket.socket],
) -> None:
    server, client = connection
    client.sendall(REQUEST + b"x" * 1000)  # more than the request: a reset would follow
    _serve(server)
    closing = _close_in_thread(server)
    assert _read_to_end(client) == REPLY
    assert not reset_after_sending(client)  # read and dropped: the server still lingers
    assert closing.is_alive()
    client.close()  # the client's FIN ends the linger
    closing.join(10)
    assert not closing.is_alive()


def test_a_marked_connection_lingers_though_nothing_is_unread_yet(
    connection: tuple[socket.socket, socket.socket],
) -> None:
    """The predict function's streamed 413 marks its connection: the rest of an oversized
    body may still be on its way, and arriving at a closed socket it would reset the reply."""
    server, client = connection
    client.sendall(REQUEST)
    _serve(server)
    http_close.linger_after_reply({"gunicorn.socket": server})
    closing = _close_in_thread(server)
    assert _read_to_end(client) == REPLY
    assert not reset_after_sending(client)
    client.close()
    closing.join(10)
    assert not closing.is_alive()
    assert server not in http_close._LINGERING  # the mark went with the close


def test_unread_bytes_closed_at_once_reset_the_connection(
    connection: tuple[socket.socket, socket.socket],
) -> None:
    """Why the linger exists (the checks above would pass for the wrong reason without it):
    closing with unread bytes makes the kernel send a reset instead of FIN."""
    server, client = connection
    client.sendall(REQUEST + b"x" * 1000)
    _serve(server)
    server.close()
    with pytest.raises(ConnectionResetError):
        _read_to_end(client)


def test_install_replaces_gunicorns_close_and_keeps_it_for_the_linger(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = gunicorn.util.close_graceful
    monkeypatch.setattr(gunicorn.util, "close_graceful", original)
    assert http_close.install()
    assert gunicorn.util.close_graceful is http_close.close_after_reply
    assert http_close._gunicorn_close is original is not http_close.close_after_reply
