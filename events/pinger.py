"""Knative PingSource for the local broker: fires ``dev.knative.sources.ping`` on a schedule.

Schedules of the form ``*/N * * * *`` (every N minutes, on the wall-clock minute like cron) and
``* * * * *`` are understood; any other schedule is logged and not fired (fire it by hand with
``POST /pingsources/<name>`` on the broker).
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import Callable

from cloudevents.http import CloudEvent

from events.routing import PingSource, Routing

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
