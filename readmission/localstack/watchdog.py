"""Restarts any local-stack process that dies, as a kubelet does for ``restartPolicy: Always``.

``python -m readmission.localstack.watchdog STATE_DIR`` runs as the stack's process ``watchdog``:
started last by ``up``, stopped first by ``down`` (so it never restarts what ``down`` stops).
Contract:

* every ``CHECK_SECONDS`` it looks at each process recorded in ``STATE_DIR/run`` (but itself);
  one that is no longer running is started again with the command, environment and working
  directory it was started with (``processes.relaunch``);
* consecutive restarts of one process wait a backoff that doubles from ``FIRST_BACKOFF`` up to
  ``MAX_BACKOFF`` (Kubernetes' CrashLoopBackOff); a process that has run ``STABLE_SECONDS``
  since its last restart starts again from the first backoff;
* every restart is logged and counted in ``STATE_DIR/run/restarts.json`` (written atomically),
  which ``status`` shows;
* after restarting a process on the event path (object store, adapter, broker: each can lose
  events in flight), it fires the stack's PingSources straight to their sinks twice: once the
  restarted process answers, and again when the reconciler's grace period
  (RECONCILE_GRACE_SECONDS, default 120) has passed, since the reconciler leaves objects
  younger than that alone. What the outage lost is re-emitted without waiting for the schedule.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from events.pinger import fire_direct
from events.routing import load_routing
from events.services import ServiceDirectory
from readmission.localstack import processes

log = logging.getLogger("watchdog")

NAME = "watchdog"
CHECK_SECONDS = 1.0
FIRST_BACKOFF = 1.0
MAX_BACKOFF = 60.0
STABLE_SECONDS = 60.0
# A lost process here can lose an event in flight: the reconciler runs after its restart.
EVENT_PATH = frozenset({"seaweedfs", "events-adapter", "broker"})


@dataclass
class RestartState:
    count: int = 0
    backoff: float = 0.0
    down_since: float | None = None
    restarted_at: float = 0.0  # time.monotonic() of the last restart
    last_restart: str = ""  # wall clock, ISO 8601


class Watchdog:
    def __init__(self, state_dir: Path, root: Path) -> None:
        self.state_dir = state_dir
        self.run_dir = state_dir / "run"
        self.log_dir = state_dir / "logs"
        self.root = root
        self.states: dict[str, RestartState] = {}
        self.stopping = threading.Event()
        self.services = ServiceDirectory(state_dir / "services.json")

    def check_once(self, now: float | None = None) -> list[str]:
        """Restart what is due; returns the names restarted."""
        now = time.monotonic() if now is None else now
        restarted = []
        for process in processes.recorded(self.run_dir):
            if process.name == NAME:
                continue
            state = self.states.setdefault(process.name, RestartState())
            if processes.is_running(process):
                if state.backoff and now - state.restarted_at >= STABLE_SECONDS:
                    state.backoff = 0.0
                state.down_since = None
                continue
            if state.down_since is None:
                state.down_since = now
                log.warning("%s (pid %d) is not running", process.name, process.pid)
            if now - state.down_since < state.backoff or self.stopping.is_set():
                continue
            try:
                started = processes.relaunch(
                    process.name, run_dir=self.run_dir, log_dir=self.log_dir
                )
            except (OSError, ValueError) as exc:
                log.error("cannot restart %s: %s", process.name, exc)
                continue
            state.count += 1
            state.backoff = min(MAX_BACKOFF, max(FIRST_BACKOFF, state.backoff * 2))
            state.down_since, state.restarted_at = None, now
            state.last_restart = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            log.warning(
                "restarted %s (pid %d -> %d), restart #%d; next backoff %gs",
                process.name,
                process.pid,
                started.pid,
                state.count,
                state.backoff,
            )
            restarted.append(process.name)
        if restarted:
            self._save()
            if EVENT_PATH.intersection(restarted):
                threading.Thread(target=self._reconcile_soon, daemon=True).start()
        return restarted

    def _save(self) -> None:
        document = {
            name: {"restarts": state.count, "last_restart": state.last_restart}
            for name, state in sorted(self.states.items())
            if state.count
        }
        path = self.run_dir / "restarts.json"
        partial = path.with_suffix(".json.partial")
        partial.write_text(json.dumps(document, indent=2, sort_keys=True))
        os.replace(partial, path)

    def _reconcile_soon(self) -> None:
        """Fire every PingSource when the restarted process answers, and after the grace."""
        # imported here: the reconciler's module brings boto3, which the watchdog needs not hold
        from readmission.reconcile import grace_from_env

        grace = grace_from_env()
        for delay in (0.0, grace + 2.0):
            if self.stopping.wait(delay):
                return
            for source in load_routing(self.root / "infra" / "knative").pings:
                if fire_direct(source, self.services, attempts=6, stopping=self.stopping):
                    log.info("fired PingSource %s after a restart on the event path", source.name)

    def run(self) -> None:
        # SIGTERM (``down``) ends the watch between two restarts, never inside one, so no
        # process is left started without its pid file.
        signal.signal(signal.SIGTERM, lambda _signum, _frame: self.stopping.set())
        log.info("watching the processes recorded in %s", self.run_dir)
        while not self.stopping.wait(CHECK_SECONDS):
            try:
                self.check_once()
            except Exception:  # one bad look must not end the watch
                log.exception("watch failed; trying again")


def restart_counts(state_dir: Path) -> dict[str, dict[str, object]]:
    """What ``restarts.json`` says (empty when nothing was restarted)."""
    try:
        loaded = json.loads((state_dir / "run" / "restarts.json").read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m readmission.localstack.watchdog STATE_DIR", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    Watchdog(Path(args[0]), Path(__file__).resolve().parents[2]).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
