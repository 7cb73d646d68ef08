"""Knative PingSource for the local stack: fires ``dev.knative.sources.ping`` on a schedule.

Cron schedules whose minute and hour fields are each ``*``, ``*/N`` or a number and whose other
fields are ``*`` are understood (``*/5 * * * *``: every 5 minutes on the wall-clock minute;
``17 3 * * *``: daily at 03:17 UTC, PingSource's default time zone); any other schedule is
logged and not fired (fire it by hand with ``POST /pingsources/<name>`` on the broker).

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
from dataclasses import dataclass
from pathlib import Path

from cloudevents.http import CloudEvent

from events.delivery import Verdict, post_binary
from events.routing import PingSource, Routing, load_routing
from events.services import ServiceDirectory
from readmission import env

log = logging.getLogger("broker.ping")

PING_TYPE = "dev.knative.sources.ping"
_EVERY_N = re.compile(r"^\*/(\d+)$")


@dataclass(frozen=True)
class Schedule:
    """The minutes and hours (UTC) a supported cron schedule fires at."""

    minutes: frozenset[int]
    hours: frozenset[int]

    def next_fire(self, now: float) -> float:
        """The first whole minute strictly after ``now`` (epoch seconds) the schedule fires."""
        minute = math.floor(now / 60) + 1
        while minute % 60 not in self.minutes or (minute // 60) % 24 not in self.hours:
            minute += 1  # at most a day of minutes: both sets are non-empty
        return minute * 60.0


def _cron_field(text: str, size: int) -> frozenset[int] | None:
    """The values of one cron field (``*``, ``*/N`` or a number below ``size``)."""
    if text == "*":
        return frozenset(range(size))
    match = _EVERY_N.match(text)
    if match:
        step = int(match.group(1))
        return frozenset(range(0, size, step)) if 1 <= step < size else None
    if text.isdigit() and int(text) < size:
        return frozenset({int(text)})
    return None


def parse_schedule(schedule: str) -> Schedule | None:
    """The schedule, or None for one this PingSource does not understand (module docstring)."""
    fields = schedule.split()
    if len(fields) != 5 or any(f != "*" for f in fields[2:]):
        return None
    minutes, hours = _cron_field(fields[0], 60), _cron_field(fields[1], 24)
    if minutes is None or hours is None:
        return None
    return Schedule(minutes, hours)


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
            schedule = parse_schedule(source.schedule)
            if schedule is None:
                if source.name not in self._warned:
                    log.warning(
                        "PingSource %s: schedule %r not supported", source.name, source.schedule
                    )
                    self._warned.add(source.name)
                continue
            due.append((schedule.next_fire(time.time()), source))
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
