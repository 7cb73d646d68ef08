"""Detached background processes with pid and log files (used by the local stack supervisor).

Each process runs in its own session (its own process group), so stopping it stops everything
it started and nothing else. A pid file records the pid and the command line: ``stop`` signals
the group only while the pid still runs that command (a reused pid is left alone).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from readmission.localstack.private_files import write_private


@dataclass(frozen=True)
class Process:
    name: str
    pid: int
    cmd: list[str]
    log: Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct free ports (held open together so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def start(
    name: str,
    cmd: Sequence[str],
    *,
    run_dir: Path,
    log_dir: Path,
    env: Mapping[str, str],
    cwd: Path,
) -> Process:
    """Start ``cmd`` detached, output appended to ``<log_dir>/<name>.log``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with log_path.open("ab") as log_file:
        child = subprocess.Popen(
            list(cmd),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    process = Process(name, child.pid, list(cmd), log_path)
    # How to start it again (the watchdog's restarts): private, as the env holds the S3 keys.
    launch = run_dir / f"{name}.launch.json"
    write_private(launch, json.dumps({"cmd": list(cmd), "env": dict(env), "cwd": str(cwd)}))
    (run_dir / f"{name}.pid").write_text(
        json.dumps({"pid": child.pid, "cmd": list(cmd), "log": str(log_path)})
    )
    return process


def relaunch(name: str, *, run_dir: Path, log_dir: Path) -> Process:
    """Start ``name`` again with the command, environment and working directory it was started
    with (OSError or ValueError when it was never started through `start`)."""
    launch = json.loads((run_dir / f"{name}.launch.json").read_text())
    return start(
        name,
        launch["cmd"],
        run_dir=run_dir,
        log_dir=log_dir,
        env=launch["env"],
        cwd=Path(launch["cwd"]),
    )


def recorded(run_dir: Path) -> list[Process]:
    processes = []
    for path in sorted(run_dir.glob("*.pid")):
        try:
            info = json.loads(path.read_text())
            processes.append(
                Process(path.stem, int(info["pid"]), list(info["cmd"]), Path(info["log"]))
            )
        except (ValueError, KeyError, OSError):
            continue
    return processes


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def is_running(process: Process) -> bool:
    """True while the pid is alive and still runs the recorded command."""
    _reap(process.pid)
    try:
        raw = Path(f"/proc/{process.pid}/cmdline").read_bytes()
        state = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    if state == "Z":
        return False
    argv = [part.decode(errors="replace") for part in raw.split(b"\0") if part]
    tail = process.cmd[1:]
    return bool(argv) and (not tail or argv[-len(tail) :] == tail)


def _signal_group(process: Process, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def stop_popen_group(process: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """SIGTERM the process group of a child started with start_new_session=True, SIGKILL it if
    the leader is still running after `grace` seconds, and reap the leader."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def proc_stats() -> Iterator[tuple[int, list[str]]]:
    """(pid, the fields of /proc/<pid>/stat after the command name) for every process now: [0]
    is the state, [1] the parent, [2] the process group, [11:15] utime, stime, cutime, cstime
    in clock ticks."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            yield int(entry), Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue


def group_alive(pgid: int) -> bool:
    """Whether any process of the group (its leader or a child it started) is alive, zombies
    aside: a leader that exits first leaves its children running in the group."""
    return any(fields[0] != "Z" and int(fields[2]) == pgid for _, fields in proc_stats())


def child_pids(parent: int) -> list[int]:
    """The live children of a process, zombies aside (e.g. gunicorn's workers of its master)."""
    return sorted(
        pid for pid, fields in proc_stats() if fields[0] != "Z" and int(fields[1]) == parent
    )


def _running(process: Process) -> bool:
    return is_running(process) or group_alive(process.pid)


@dataclass(frozen=True)
class StopStage:
    """Processes stopped together: SIGTERM, then SIGKILL after `grace` seconds. `slow_exit`
    says why a SIGKILL is expected (logged as information instead of a warning)."""

    names: frozenset[str] | None  # None: every process that no other stage names
    grace: float = 10.0
    slow_exit: str = ""


def stop_all(
    recorded_processes: list[Process],
    run_dir: Path,
    grace: float = 10.0,
    stages: Sequence[StopStage] = (),
) -> list[str]:
    """Stop the recorded process groups, stage after stage (default: all together, SIGKILL
    after ``grace`` seconds), then remove their pid files.

    Waits until every member of each group is gone, not only its leader. Returns the names of
    the processes that were running.
    """
    running = [p for p in recorded_processes if is_running(p)]
    named = set().union(*(stage.names for stage in stages if stage.names is not None))
    for stage in stages or (StopStage(None, grace),):
        _stop_together(
            [
                p
                for p in running
                if (p.name in stage.names if stage.names is not None else p.name not in named)
            ],
            stage,
        )
    for process in recorded_processes:
        (run_dir / f"{process.name}.pid").unlink(missing_ok=True)
        (run_dir / f"{process.name}.launch.json").unlink(missing_ok=True)
    return [p.name for p in running]


def _stop_together(group: list[Process], stage: StopStage) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for process in group:
            if _running(process):
                if sig == signal.SIGKILL:
                    logging.getLogger(__name__).log(
                        logging.INFO if stage.slow_exit else logging.WARNING,
                        "%s (pid %d) still running %gs after SIGTERM: SIGKILL%s",
                        process.name,
                        process.pid,
                        stage.grace,
                        f" ({stage.slow_exit})" if stage.slow_exit else "",
                    )
                _signal_group(process, sig)
        deadline = time.monotonic() + stage.grace
        while time.monotonic() < deadline and any(_running(p) for p in group):
            time.sleep(0.1)


def http_status(url: str, timeout: float = 2.0, method: str = "GET") -> int | None:
    """The HTTP status a request with no body gets, or None when nothing answers."""
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except (urllib.error.URLError, OSError, ValueError):
        return None


def wait_until(check: Callable[[], object], timeout: float, interval: float = 0.25) -> bool:
    """Call ``check()`` until it returns True or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
