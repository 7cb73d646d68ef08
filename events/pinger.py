"""Knative PingSource for the local stack: fires ``dev.knative.sources.ping`` on a schedule.

Schedules of the form ``*/N * * * *`` (every N minutes, on the wall-clock minute like cron) and
``* * * * *`` are understood; any other schedule is logged and not fired (fire it by hand with
``POST /pingsources/<name>`` on the broker).

``python -m events.pinger`` is the stack's PingSource adapter, a process of its own as Knative's
is: it reads the PingSources of the manifests (PINGSOURCE_MANIFESTS, default ``infra/knative``)
and POSTs each ping straight to its sink's replicas (PINGSOURCE_SERVICES, the stack's
``services.json``), so the reconciler runs on schedule even while the broker is down. A ping
that is not delivered is retried with exponential backoff (1 s doubling, PING_ATTEMPTS
attempts in all, default 5), then logged and dropped: the next scheduled ping comes anyway.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from cloudevents.http import CloudEvent

from events.delivery import Verdict, post_binary
from events.routing import PingSource, Routing, load_routing
from events.services import ServiceDirectory
from readmission import env

log = logging.getLogger("broker.ping")

PING_TYPE = "dev.knative.sources.ping"
_EVERY_N_MINUTES = re.compile(r"^\*(?:/(\d+))?$")


def minute_step(schedule: str) -> int | None:
    """Minutes between fires of ``*/N * * * *`` (``*`` = 1); None for other schedules."""
    fields = schedule.split()
    if len(fields) != 5 or any(f != "*" for f in fields[1:]):
        return None
    match = _EVERY_N_MINUTES.match(fields[0])
    if not match:
        return None
    step = int(match.group(1) or 1)
    return step if 1 <= step <= 59 else None


def next_fire(step_minutes: int, now: float) -> float:
    """The first wall-clock time after ``now`` whose minute is a multiple of the step."""
    minute = math.floor(now / 60) + 1
    while minute % 60 % step_minutes:
        minute += 1
    return minute * 60.0


def ping_event(source: PingSource) -> CloudEvent:
    content_type = source.content_type or "text/plain"
    data: object = source.data
    if "json" in content_type and source.data:
        data = json.loads(source.data)
    return CloudEvent(
        {
            "type": PING_TYPE,
            "source": f"/apis/v1/namespaces/{source.namespace}/pingsources/{source.name}",
            "id": str(uuid.uuid4()),
            "datacontenttype": content_type,
        },
        data,
    )


class Pinger:
    """A thread that fires every scheduled PingSource through ``fire(source)``."""

    def __init__(
        self,
        routing: Callable[[], Routing],
        fire: Callable[[PingSource], bool],
        stopping: threading.Event,
    ) -> None:
        self.routing = routing
        self.fire = fire
        self.stopping = stopping
        self._warned: set[str] = set()
        self._fired: dict[str, float] = {}
        self.thread = threading.Thread(target=self._run, name="pingsources", daemon=True)

    def start(self) -> Pinger:
        self.thread.start()
        return self

    def _due(self) -> list[tuple[float, PingSource]]:
        due = []
        for source in self.routing().pings:
            step = minute_step(source.schedule)
            if step is None:
                if source.name not in self._warned:
                    log.warning(
                        "PingSource %s: schedule %r not supported", source.name, source.schedule
                    )
                    self._warned.add(source.name)
                continue
            due.append((next_fire(step, time.time()), source))
        return due

    def _run(self) -> None:
        while not self.stopping.is_set():
            due = self._due()
            if not due:
                self.stopping.wait(30)
                continue
            at = min(when for when, _ in due)
            if self.stopping.wait(max(0.0, at - time.time())):
                return
            for when, source in due:
                if when <= at and self._fired.get(source.name) != when:
                    self._fired[source.name] = when
                    self.fire(source)


def fire_direct(
    source: PingSource,
    services: ServiceDirectory,
    *,
    attempts: int = 5,
    timeout: float = 300.0,
    stopping: threading.Event | None = None,
) -> bool:
    """Deliver one ping to its sink, not through any broker; retried on any failure but 400.
    `services`: the process's one ServiceDirectory (it re-reads its file when that changes,
    so each attempt sees the replicas as they are then)."""
    event = ping_event(source)
    stopping = stopping or threading.Event()
    for attempt in range(max(1, attempts)):
        if attempt and stopping.wait(2.0 ** (attempt - 1)):
            return False
        urls = services.resolve(source.sink)
        if not urls:
            log.warning("PingSource %s: no replica of its sink %s", source.name, source.sink)
            continue
        result = post_binary(urls[attempt % len(urls)], event, timeout)
        if result.verdict == Verdict.DELIVERED:
            log.info("PingSource %s: delivered to %s", source.name, result.url)
            return True
        log.warning("PingSource %s: %s answered %s", source.name, result.url, result.error)
        if result.verdict == Verdict.NO_RETRY:
            return False
    return False


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    manifests = Path(env.text("PINGSOURCE_MANIFESTS", "infra/knative"))
    services_file = Path(env.text("PINGSOURCE_SERVICES", ".state/services.json"))
    services = ServiceDirectory(services_file)
    attempts = env.integer("PING_ATTEMPTS", 5)
    stopping = threading.Event()

    def fire(source: PingSource) -> bool:
        return fire_direct(source, services, attempts=attempts, stopping=stopping)

    pinger = Pinger(lambda: load_routing(manifests), fire, stopping).start()
    log.info("PingSources of %s fire to the sinks in %s", manifests, services_file)
    try:
        pinger.thread.join()
    except KeyboardInterrupt:
        stopping.set()


if __name__ == "__main__":
    main()
