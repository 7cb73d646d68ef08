"""Detached processes with pid files (readmission/localstack/processes.py), on real processes."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from readmission.localstack import processes


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_stop_all_stops_the_whole_process_group_and_removes_pid_files(tmp_path: Path) -> None:
    run_dir, log_dir = tmp_path / "run", tmp_path / "logs"
    script = (
        "import subprocess, time; subprocess.Popen(['sleep', '300']); "
        "print('up', flush=True); time.sleep(300)"
    )
    started = processes.start(
        "parent",
        [sys.executable, "-c", script],
        run_dir=run_dir,
        log_dir=log_dir,
        env=dict(os.environ),
        cwd=tmp_path,
    )
    assert processes.wait_until(lambda: "up" in started.log.read_text(), timeout=10)
    children = [
        int(pid)
        for pid in os.listdir("/proc")
        if pid.isdigit() and _group_of(int(pid)) == started.pid
    ]
    assert len(children) >= 2  # the python parent and its sleep child
    [recorded] = processes.recorded(run_dir)
    assert recorded == started and processes.is_running(recorded)

    assert processes.stop_all([recorded], run_dir) == ["parent"]
    assert not any(_alive(pid) for pid in children)
    assert list(run_dir.glob("*.pid")) == []


def test_a_pid_that_runs_another_command_is_left_alone(tmp_path: Path) -> None:
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        (run_dir / "old.pid").write_text(
            json.dumps({"pid": bystander.pid, "cmd": ["weed", "server"], "log": "x.log"})
        )
        [stale] = processes.recorded(run_dir)
        assert not processes.is_running(stale)
        assert processes.stop_all([stale], run_dir, grace=1) == []
        time.sleep(0.2)
        assert bystander.poll() is None  # still running
        assert not (run_dir / "old.pid").exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = processes.free_ports(20)
    assert len(set(ports)) == 20
    assert not any(processes.port_in_use(port) for port in ports)


def _group_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, ValueError, IndexError):
        return None


def test_stop_all_stops_stage_after_stage(tmp_path: Path, caplog: Any) -> None:
    """Each stage is gone before the next one gets SIGTERM; a stage's slow process gets SIGKILL
    after that stage's grace, logged as expected (info), not as a warning."""
    run_dir, log_dir = tmp_path / "run", tmp_path / "logs"
    # Records when it got SIGTERM; `stubborn` ignores SIGTERM.
    script = (
        "import signal, sys, time\n"
        "def term(*_):\n"
        "    open(sys.argv[1], 'w').write(repr(time.time()))\n"
        "    if sys.argv[2] == 'polite': sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, term)\n"
        "print('up', flush=True)\n"
        "while True: time.sleep(0.05)\n"
    )
    started = {
        name: processes.start(
            name,
            [sys.executable, "-c", script, str(tmp_path / f"{name}.term"), manner],
            run_dir=run_dir,
            log_dir=log_dir,
            env=dict(os.environ),
            cwd=tmp_path,
        )
        for name, manner in (("client", "polite"), ("server", "polite"), ("store", "stubborn"))
    }
    for process in started.values():
        assert processes.wait_until(lambda p=process: "up" in p.log.read_text(), timeout=10)
    stages = (
        processes.StopStage(None),
        processes.StopStage(frozenset({"server"})),
        processes.StopStage(frozenset({"store"}), grace=1.0, slow_exit="as expected"),
    )
    caplog.set_level(logging.INFO, logger="readmission.localstack.processes")
    began = time.monotonic()
    stopped = processes.stop_all(processes.recorded(run_dir), run_dir, stages=stages)

    assert sorted(stopped) == ["client", "server", "store"]
    assert not any(_alive(p.pid) for p in started.values())
    term = {name: float((tmp_path / f"{name}.term").read_text()) for name in started}
    assert term["client"] < term["server"] < term["store"]
    assert 1.0 <= time.monotonic() - began < 10
    [kill] = [r for r in caplog.records if "SIGKILL" in r.getMessage()]
    assert kill.levelno == logging.INFO and "store" in kill.getMessage()
    assert "as expected" in kill.getMessage()
    assert list(run_dir.glob("*.pid")) == []
