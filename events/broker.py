"""The local broker: Knative Broker + Triggers semantics for the laptop stack.

Ingress: POST a CloudEvent (binary or structured) to any path -> 202 once queued, 400 if it is
not a valid CloudEvent. ``GET /status`` -> JSON counters, ``GET /healthz`` -> 200.
PingSources of the manifests are fired on their schedule straight to their sink (events/pinger.py;
not with BROKER_PINGSOURCES=off, as in the local stack, whose PingSources are a process of their
own); ``POST /pingsources/<name>`` fires one now.

Routing comes from the manifests (events/routing.py), reloaded when they change. Subscribers
are Knative Service names resolved through a JSON file ``{"service": ["http://...", ...]}``;
several URLs form a pool of replicas, each given at most ``containerConcurrency`` deliveries at
once. Each subscriber has its own FIFO queue. Delivery is at least once: a failed attempt is
retried with backoff per the Trigger's delivery spec, then sent to the dead-letter sink with
Knative's ``knativeerror*`` attributes; if that fails too, it is appended to a JSON-lines file.

Run: ``python -m events.broker`` (settings from env vars, see BrokerConfig).
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

from cloudevents.exceptions import GenericException
from cloudevents.http import CloudEvent, from_http

from events.delivery import (
    Attempt,
    Verdict,
    dead_letter_event,
    decode_attribute_headers,
    encode_header_value,
    post_binary,
)
from events.intake import IntakeHandler, IntakeServer, ReadTimeouts
from events.pinger import Pinger, ping_event
from events.routing import (
    Destination,
    PingSource,
    Routing,
    Trigger,
    load_routing,
    manifests_signature,
)
from events.services import ServiceDirectory
from readmission import env

log = logging.getLogger("broker")

REQUIRED_ATTRIBUTES = ("specversion", "id", "source", "type")


def parse_timeout_caps(text: str) -> dict[str, float]:
    """ "train=1,ingest=30" -> {"train": 1.0, "ingest": 30.0}; ValueError if malformed."""
    caps = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        service, _, seconds = item.partition("=")
        if not service.strip() or not seconds.strip():
            raise ValueError(f"BROKER_TIMEOUT_CAPS: {item!r} is not service=seconds")
        try:
            caps[service.strip()] = float(seconds)
        except ValueError as exc:
            raise ValueError(f"BROKER_TIMEOUT_CAPS: {item!r} is not service=seconds") from exc
    return caps


@dataclass(frozen=True)
class BrokerConfig:
    host: str = "127.0.0.1"
    port: int = 8100
    manifests: Path = Path("infra/knative")
    services_file: Path = Path(".state/services.json")
    dead_letter_file: Path = Path(".state/dead-letters.jsonl")
    broker_name: str | None = None
    default_timeout: float = 600.0  # per attempt, when the delivery spec sets no timeout
    # Service -> seconds: caps the delivery timeout to that Service, as a shorter timeoutSeconds
    # would cut its requests (BROKER_TIMEOUT_CAPS="train=1"): to try out requests shorter
    # than the work they carry.
    timeout_caps: dict[str, float] = field(default_factory=dict)
    max_inflight_per_replica: int = 16  # cap for containerConcurrency 0 (unlimited)
    max_body_bytes: int = 1024 * 1024
    dead_letter_attempts: int = 3
    # seconds a client may go silent while it sends a request head, then its body (each read;
    # events.intake: a thread per connection, so a slow client holds only its own)
    read_timeouts: ReadTimeouts = field(default_factory=ReadTimeouts)

    @classmethod
    def from_env(cls) -> BrokerConfig:
        state = Path(env.text("STATE_DIR", ".state"))
        return cls(
            host=env.text("BROKER_HOST", cls.host),
            port=env.integer("BROKER_PORT", cls.port),
            manifests=Path(env.text("BROKER_MANIFESTS", str(cls.manifests))),
            services_file=Path(env.text("BROKER_SERVICES", str(state / "services.json"))),
            dead_letter_file=Path(
                env.text("BROKER_DEAD_LETTER_FILE", str(state / "dead-letters.jsonl"))
            ),
            broker_name=env.text("BROKER_NAME") or None,
            default_timeout=env.seconds("BROKER_DEFAULT_TIMEOUT", cls.default_timeout),
            timeout_caps=parse_timeout_caps(env.text("BROKER_TIMEOUT_CAPS")),
            max_inflight_per_replica=env.integer(
                "BROKER_MAX_INFLIGHT", cls.max_inflight_per_replica, minimum=1
            ),
            max_body_bytes=env.integer("BROKER_MAX_BODY_BYTES", cls.max_body_bytes, minimum=1),
            read_timeouts=ReadTimeouts.from_env(),
        )


@dataclass(order=True)
class _Job:
    not_before: float
    seq: int
    trigger: Trigger = field(compare=False)
    event: CloudEvent = field(compare=False)
    attempt: int = field(default=1, compare=False)
    last: Attempt | None = field(default=None, compare=False)


class _SubscriberQueue:
    """FIFO queue of one subscriber, dispatched to its replicas within their concurrency."""

    def __init__(self, broker: Broker, name: str) -> None:
        self.broker = broker
        self.name = name
        self.heap: list[_Job] = []
        self.inflight: Counter[str] = Counter()
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name=f"dispatch-{name}", daemon=True)
        self.thread.start()

    def put(self, job: _Job) -> None:
        with self.cond:
            heapq.heappush(self.heap, job)
            self.cond.notify_all()

    def _free_replica(self, urls: list[str], limit: int) -> str | None:
        free = [url for url in urls if self.inflight[url] < limit]
        return min(free, key=lambda url: self.inflight[url]) if free else None

    def _run(self) -> None:
        while not self.broker.stopping.is_set():
            with self.cond:
                if not self.heap:
                    self.cond.wait(0.5)
                    continue
                job = self.heap[0]
                wait = job.not_before - time.monotonic()
                if wait > 0:
                    self.cond.wait(min(wait, 0.5))
                    continue
                urls = self.broker.services.resolve(job.trigger.subscriber)
                if not urls:  # no replica: the attempt fails like a refused connection
                    heapq.heappop(self.heap)
                    url = ""
                else:
                    url = self._free_replica(urls, self.broker.replica_limit(job.trigger))
                    if url is None:
                        self.cond.wait(0.5)
                        continue
                    heapq.heappop(self.heap)
                    self.inflight[url] += 1
            threading.Thread(target=self._deliver, args=(job, url), daemon=True).start()

    def _deliver(self, job: _Job, url: str) -> None:
        try:
            self.broker.attempt(job, url)
        finally:
            if url:
                with self.cond:
                    self.inflight[url] -= 1
                    self.cond.notify_all()

    def depth(self) -> tuple[int, int]:
        with self.cond:
            return len(self.heap), sum(self.inflight.values())


class Broker:
    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self.services = ServiceDirectory(config.services_file)
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._seq = itertools.count()
        self._queues: dict[str, _SubscriberQueue] = {}
        self._routing_signature: tuple[Any, ...] | None = None
        self._routing = Routing(broker="")
        self.counts: Counter[str] = Counter()
        self.received_by_type: Counter[str] = Counter()  # also events no Trigger subscribes to
        self.delivered_by_type: Counter[str] = Counter()
        self.dead_lettered_by_type: Counter[str] = Counter()
        self.routing()  # fail fast on broken manifests

    # routing ---------------------------------------------------------------------------------
    def routing(self) -> Routing:
        signature = manifests_signature(self.config.manifests)
        with self._lock:
            if signature != self._routing_signature:
                self._routing = load_routing(self.config.manifests, self.config.broker_name)
                self._routing_signature = signature
                log.info(
                    "routing: %s",
                    ", ".join(f"{t.filter} -> {t.subscriber}" for t in self._routing.triggers),
                )
            return self._routing

    def replica_limit(self, trigger: Trigger) -> int:
        service = trigger.subscriber.service
        concurrency = self.routing().container_concurrency(service) if service else 0
        return concurrency if concurrency > 0 else self.config.max_inflight_per_replica

    # ingress ---------------------------------------------------------------------------------
    def publish(self, event: CloudEvent) -> int:
        """Queue the event for every matching Trigger; returns how many matched."""
        attributes = event.get_attributes()
        triggers = self.routing().route(attributes)
        with self._lock:
            self.counts["received"] += 1
            self.received_by_type[str(attributes.get("type"))] += 1
            if not triggers:
                self.counts["unrouted"] += 1
        for trigger in triggers:
            self._queue(str(trigger.subscriber)).put(
                _Job(time.monotonic(), next(self._seq), trigger, event)
            )
        return len(triggers)

    def fire_ping(self, source: PingSource) -> bool:
        """Send one ping of a PingSource to its sink (not through the Triggers, like Knative).

        Not fired (False) when the sink Service has no replica, e.g. its function is missing.
        """
        if not self.services.resolve(source.sink):
            log.debug("PingSource %s: no replica of %s", source.name, source.sink)
            return False
        trigger = Trigger(
            name=f"pingsource/{source.name}",
            filter={},
            subscriber=source.sink,
            delivery=self.routing().delivery,
        )
        with self._lock:
            self.counts["pings"] += 1
        self._queue(str(source.sink)).put(
            _Job(time.monotonic(), next(self._seq), trigger, ping_event(source))
        )
        return True

    def start_pinger(self) -> None:
        Pinger(self.routing, self.fire_ping, self.stopping).start()

    def _queue(self, name: str) -> _SubscriberQueue:
        with self._lock:
            if name not in self._queues:
                self._queues[name] = _SubscriberQueue(self, name)
            return self._queues[name]

    # delivery --------------------------------------------------------------------------------
    def attempt(self, job: _Job, url: str) -> None:
        delivery = job.trigger.delivery
        timeout = delivery.timeout or self.config.default_timeout
        cap = self.config.timeout_caps.get(job.trigger.subscriber.service or "")
        if cap is not None:
            timeout = min(timeout, cap)
        if url:
            result = post_binary(url, job.event, timeout)
        else:
            result = Attempt("", 0, b"", {}, f"no replica of {job.trigger.subscriber}", 0)
        verdict = result.verdict
        total = delivery.retry + 1
        outcome = verdict.value
        if (verdict is Verdict.RETRY and job.attempt >= total) or verdict is Verdict.NO_RETRY:
            outcome = "dead-letter"
        log.info(
            "delivery type=%s subject=%s id=%s subscriber=%s url=%s status=%s attempt=%d/%d "
            "ms=%d outcome=%s%s",
            job.event["type"],
            encode_header_value(job.event.get("subject") or ""),  # one line whatever the key
            job.event["id"],
            job.trigger.subscriber,
            url or "-",
            result.status or "-",
            job.attempt,
            total,
            result.ms,
            outcome,
            f" error={result.error!r}" if result.error else "",
        )
        if verdict is Verdict.DELIVERED:
            with self._lock:
                self.counts["delivered"] += 1
                self.delivered_by_type[job.event["type"]] += 1
            if result.reply is not None:
                self.publish(result.reply)
            return
        with self._lock:
            self.counts["failed_attempts"] += 1
        if outcome == "retry":
            job.not_before = time.monotonic() + delivery.backoff(job.attempt)
            job.attempt += 1
            job.last = result
            with self._lock:
                self.counts["retries"] += 1
            self._queue(str(job.trigger.subscriber)).put(job)
            return
        self._dead_letter(job, result)

    def _dead_letter(self, job: _Job, result: Attempt) -> None:
        destination = result.url or str(job.trigger.subscriber)
        event = dead_letter_event(job.event, result, destination)
        sink = job.trigger.delivery.dead_letter
        for number in range(1, self.config.dead_letter_attempts + 1):
            urls = self.services.resolve(sink) if sink else []
            if not urls:
                break
            sent = post_binary(urls[0], event, self.config.default_timeout)
            log.info(
                "dead-letter type=%s id=%s sink=%s status=%s attempt=%d ms=%d%s",
                event["type"],
                event["id"],
                sink,
                sent.status or "-",
                number,
                sent.ms,
                f" error={sent.error!r}" if sent.error else "",
            )
            if sent.verdict is Verdict.DELIVERED:
                with self._lock:
                    self.counts["dead_lettered"] += 1
                    self.dead_lettered_by_type[event["type"]] += 1
                return
            time.sleep(0.5 * number)
        self._dead_letter_to_file(event, result, sink)

    def _dead_letter_to_file(
        self, event: CloudEvent, result: Attempt, sink: Destination | None
    ) -> None:
        record = {
            "attributes": dict(event.get_attributes()),
            "data": event.get_data()
            if not isinstance(event.get_data(), bytes)
            else event.get_data().decode(errors="replace"),
            "error": result.error,
            "status": result.status,
            "dead_letter_sink": str(sink) if sink else None,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        path = self.config.dead_letter_file
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, path.open("a") as handle:
            handle.write(json.dumps(record, sort_keys=True, default=str) + "\n")
            self.counts["dead_letter_file"] += 1
            self.dead_lettered_by_type[event["type"]] += 1
        log.error("dead-letter sink unreachable; event %s appended to %s", event["id"], path)

    # status ----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        with self._lock:
            queues = dict(self._queues)
            counts = dict(self.counts)
            received = dict(self.received_by_type)
            delivered = dict(self.delivered_by_type)
            dead = dict(self.dead_lettered_by_type)
        subscribers = {}
        for name, queue in sorted(queues.items()):
            queued, inflight = queue.depth()
            subscribers[name] = {"queued": queued, "inflight": inflight}
        totals = {
            key: counts.get(key, 0)
            for key in (
                "received",
                "unrouted",
                "delivered",
                "failed_attempts",
                "retries",
                "dead_lettered",
                "dead_letter_file",
                "pings",
            )
        }
        totals["queued"] = sum(s["queued"] for s in subscribers.values())
        totals["inflight"] = sum(s["inflight"] for s in subscribers.values())
        return {
            "broker": self.routing().broker,
            "totals": totals,
            "subscribers": subscribers,
            "received_by_type": received,
            "delivered_by_type": delivered,
            "dead_lettered_by_type": dead,
        }

    def idle(self) -> bool:
        totals = self.status()["totals"]
        return totals["queued"] == 0 and totals["inflight"] == 0


class _Handler(IntakeHandler):
    server: BrokerServer
    protocol_version = "HTTP/1.1"

    def _reply(self, status: int, document: Any | None = None) -> None:
        body = b"" if document is None else json.dumps(document, sort_keys=True).encode()
        self.send_response(status)
        if body:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/status":
            self._reply(HTTPStatus.OK, self.server.broker.status())
        elif self.path.rstrip("/") in {"/healthz", "/readyz", ""}:
            self._reply(HTTPStatus.OK, {"ok": True})
        else:
            self._reply(HTTPStatus.NOT_FOUND, {"error": "not found"})

    def do_POST(self) -> None:
        if self.path.startswith("/pingsources/"):
            self._fire_ping(self.path.removeprefix("/pingsources/").strip("/"))
            return
        length_text = self.headers.get("Content-Length")
        if length_text is None or not length_text.isdigit():
            self._reply(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length required"})
            return
        length = int(length_text)
        if length > self.server.broker.config.max_body_bytes:
            self.close_connection = True
            self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "event too large"})
            return
        body = self.read_body(length)
        try:
            event = from_http(decode_attribute_headers(dict(self.headers.items())), body)
            missing = [name for name in REQUIRED_ATTRIBUTES if not event.get(name)]
            if missing:
                raise ValueError(f"missing attributes: {', '.join(missing)}")
        except (GenericException, ValueError, TypeError) as exc:
            self._reply(HTTPStatus.BAD_REQUEST, {"error": f"not a valid CloudEvent: {exc}"})
            return
        self.server.broker.publish(event)
        self._reply(HTTPStatus.ACCEPTED)

    def _fire_ping(self, name: str) -> None:
        """``POST /pingsources/<name>``: fire that PingSource now (tests, impatient people)."""
        broker = self.server.broker
        source = next((p for p in broker.routing().pings if p.name == name), None)
        if source is None:
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no PingSource named {name!r}"})
        elif broker.fire_ping(source):
            self._reply(HTTPStatus.ACCEPTED)
        else:
            self._reply(HTTPStatus.SERVICE_UNAVAILABLE, {"error": f"no replica of {source.sink}"})

    def log_message(self, format: str, *args: Any) -> None:  # one line per delivery is enough
        return


class BrokerServer(IntakeServer):
    """The broker's ingress (events.intake: a thread per connection, backlog, read timeouts)."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        config = broker.config
        super().__init__((config.host, config.port), _Handler, config.read_timeouts)

    def shutdown(self) -> None:
        self.broker.stopping.set()
        super().shutdown()


def serve(config: BrokerConfig, pings: bool = False) -> BrokerServer:
    """Start the broker in a background thread (tests); ``main`` serves in the foreground."""
    server = BrokerServer(Broker(config))
    if pings:
        server.broker.start_pinger()
    threading.Thread(target=server.serve_forever, name="broker-http", daemon=True).start()
    return server


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    config = BrokerConfig.from_env()
    server = BrokerServer(Broker(config))
    # The local stack runs its PingSources as a process of their own (python -m events.pinger),
    # so the reconciler is not lost with the broker; BROKER_PINGSOURCES=off says so.
    if env.flag("BROKER_PINGSOURCES", True):
        server.broker.start_pinger()
    log.info("broker listening on %s (manifests %s)", server.url, config.manifests)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
