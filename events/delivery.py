"""One HTTP delivery of a CloudEvent in binary mode, and how Knative judges its outcome."""

from __future__ import annotations

import base64
import http.client
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum

from cloudevents.conversion import to_binary
from cloudevents.exceptions import GenericException
from cloudevents.http import CloudEvent, from_http

ERROR_DATA_LIMIT = 1024  # bytes of the reply body kept in knativeerrordata (as Knative does)


class Verdict(Enum):
    DELIVERED = "delivered"
    RETRY = "retry"  # connection error, timeout, 5xx, 4xx other than 400, non-CloudEvent reply
    NO_RETRY = "no-retry"  # 400: Knative does not retry it


@dataclass(frozen=True)
class Attempt:
    url: str
    status: int  # 0 when no HTTP answer came (connection refused, timeout)
    body: bytes
    headers: dict[str, str]
    error: str
    ms: int
    reply: CloudEvent | None = None

    @property
    def verdict(self) -> Verdict:
        if self.error:
            return Verdict.NO_RETRY if self.status == 400 else Verdict.RETRY
        return Verdict.DELIVERED


# CloudEvents HTTP binding, 3.1.3.2: in a ce-* header value, space, '"', '%' and every
# character outside printable ASCII travel percent-encoded as UTF-8 bytes, so any object key
# (Cyrillic, emoji, a newline) fits an HTTP header and is decoded back exactly.
_HEADER_SAFE_BYTES = frozenset(range(0x21, 0x7F)) - {0x22, 0x25}
ATTRIBUTE_HEADER_PREFIX = "ce-"


def encode_header_value(value: str) -> str:
    """Percent-encode one attribute value for its ce-* header (pure ASCII out)."""
    return "".join(
        chr(byte) if byte in _HEADER_SAFE_BYTES else f"%{byte:02X}" for byte in value.encode()
    )


def decode_header_value(value: str) -> str:
    """Inverse of `encode_header_value`; ValueError if the bytes are not UTF-8."""
    try:
        return urllib.parse.unquote(value, encoding="utf-8", errors="strict")
    except UnicodeDecodeError as error:
        raise ValueError(f"header value {value!r} does not percent-decode to UTF-8") from error


def _map_attribute_headers(
    headers: Mapping[str, str], convert: Callable[[str], str]
) -> dict[str, str]:
    return {
        name: convert(value) if name.lower().startswith(ATTRIBUTE_HEADER_PREFIX) else value
        for name, value in headers.items()
    }


def encode_attribute_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers with every ce-* value percent-encoded (other headers unchanged)."""
    return _map_attribute_headers(headers, encode_header_value)


def decode_attribute_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers with every ce-* value percent-decoded; ValueError if one is not UTF-8."""
    return _map_attribute_headers(headers, decode_header_value)


def post_binary(url: str, event: CloudEvent, timeout: float) -> Attempt:
    """POST the event in binary mode and classify the answer (never raises for HTTP errors).

    Attribute values are percent-encoded as the HTTP binding says (`encode_header_value`)."""
    headers, body = to_binary(event)
    headers = encode_attribute_headers(headers)
    if not any(name.lower() == "content-type" for name in headers):
        # no datacontenttype: say what the SDK wrote (JSON for structured data, else bytes)
        is_json = not isinstance(event.get_data(), bytes | str | None)
        headers["content-type"] = "application/json" if is_json else "application/octet-stream"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    started = time.monotonic()
    status, reply_body, reply_headers, error = 0, b"", {}, ""
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status = response.status
            reply_headers = dict(response.headers.items())
            reply_body = response.read()
    except urllib.error.HTTPError as failure:
        status = failure.code
        reply_headers = dict(failure.headers.items()) if failure.headers else {}
        reply_body = failure.read() or b""
        error = f"HTTP {status}"
    except TimeoutError:
        error = f"timeout after {timeout:g}s"
    except (urllib.error.URLError, ConnectionError, http.client.HTTPException, OSError) as exc:
        error = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
    ms = int((time.monotonic() - started) * 1000)

    reply = None
    if not error and not 200 <= status < 300:
        error = f"HTTP {status}"
    if not error and reply_body.strip():
        try:
            reply = from_http(reply_headers, reply_body)
        except (GenericException, ValueError) as exc:
            error = f"reply is not a CloudEvent ({type(exc).__name__})"
    return Attempt(url, status, reply_body, reply_headers, error, ms, reply)


def dead_letter_event(event: CloudEvent, attempt: Attempt | None, destination: str) -> CloudEvent:
    """A copy of the event carrying Knative's error extension attributes."""
    attributes = dict(event.get_attributes())
    attributes["knativeerrordest"] = destination
    if attempt is not None and attempt.status:
        attributes["knativeerrorcode"] = str(attempt.status)
    if attempt is not None:
        detail = attempt.body[:ERROR_DATA_LIMIT] if attempt.status else attempt.error.encode()
        if detail:
            attributes["knativeerrordata"] = base64.b64encode(detail).decode()
    return CloudEvent(attributes, event.get_data())
