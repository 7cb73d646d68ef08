"""Where a Knative Service's replicas are in the local stack: the stack's ``services.json``.

Contract: ``ServiceDirectory(path).resolve(destination)`` gives the replica URLs of a
Destination (its URI, or the URLs listed for its Service name; none if the file or the name
is missing). The file is read again whenever its mtime or size changes; a half-written file
keeps the last good reading. Shared by the broker (Trigger subscribers) and the PingSource
adapter (ping sinks).
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from events.routing import Destination

log = logging.getLogger("services")


class ServiceDirectory:
    """Service name -> replica URLs, read from a JSON file again whenever it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[float, int] | None = None
        self._urls: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def urls(self, service: str) -> list[str]:
        with self._lock:
            try:
                stat = self.path.stat()
                stamp = (stat.st_mtime, stat.st_size)
                if stamp != self._stamp:
                    loaded = json.loads(self.path.read_text())
                    self._urls = {
                        str(name): [urls] if isinstance(urls, str) else [str(u) for u in urls]
                        for name, urls in loaded.items()
                    }
                    self._stamp = stamp
            except FileNotFoundError:
                self._urls, self._stamp = {}, None
            except (ValueError, AttributeError) as exc:  # half-written file: keep the last one
                log.warning("cannot read %s: %s", self.path, exc)
            return list(self._urls.get(service, []))

    def resolve(self, destination: Destination) -> list[str]:
        if destination.uri:
            return [destination.uri]
        return self.urls(destination.service or "")
