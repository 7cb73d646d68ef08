"""``python -m readmission.localstack up|down|status|upload|wait|report|dead-letters|logs|env``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from readmission.localstack import processes
from readmission.localstack.config import HOST, StackConfig, StackError, StackInfo
from readmission.localstack.progress import (
    broker_status,
    dead_letters,
    example_prediction,
    report,
    upload,
    wait,
)
from readmission.localstack.supervisor import Supervisor
from readmission.localstack.watchdog import restart_counts

# CLI ---------------------------------------------------------------------------------------------


def _status(config: StackConfig) -> int:
    supervisor = Supervisor(config)
    recorded = processes.recorded(supervisor.run_dir)
    if not recorded:
        print(f"no stack processes recorded in {config.state_dir}")
        return 1
    info = StackInfo.load(config.state_dir)
    restarts = restart_counts(config.state_dir)
    all_up = True
    for process in recorded:
        running = processes.is_running(process)
        all_up &= running
        port = info.ports.get("s3" if process.name == "seaweedfs" else process.name)
        where = f"http://{HOST}:{port}" if port else ""
        restarted = restarts.get(process.name) or {}
        count = f"restarts {restarted.get('restarts', 0)}"
        if restarted:
            count += f" (last {restarted.get('last_restart')})"
        print(
            f"  {process.name:<15} pid {process.pid:<8} {'up' if running else 'DOWN':<5} "
            f"{where:<24} {count}"
        )
    if info.skipped:
        print(f"  skipped (no source yet): {', '.join(info.skipped)}")
    status = broker_status(info)
    if status:
        print(f"  broker: {json.dumps(status['totals'], sort_keys=True)}")
    return 0 if all_up else 1


def _drop_to_wait_for(info: StackInfo, given: str | None) -> str:
    if given:
        return given
    last = Path(info.state_dir, "last-upload.json")
    if not last.exists():
        raise StackError("nothing uploaded yet: pass --drop ID or run upload FILE first")
    return str(json.loads(last.read_text())["drop_id"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m readmission.localstack")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="start the stack in the background")
    commands.add_parser("down", help="stop every process the stack started")
    commands.add_parser("status", help="processes and broker counters")
    upload_parser = commands.add_parser("upload", help="put a CSV (or .csv.gz) into the raw bucket")
    upload_parser.add_argument("file", type=Path)
    upload_parser.add_argument("--key", help="object key (default: the file name without .gz)")
    wait_parser = commands.add_parser("wait", help="follow the pipeline until it is done")
    wait_parser.add_argument(
        "--drop", help="drop id: first 16 hex of the file's sha256 (default: the last upload)"
    )
    wait_parser.add_argument("--timeout", type=float, default=3600.0)
    commands.add_parser("report", help="what the pipeline produced")
    commands.add_parser("predict-example", help="one prediction over HTTP from the test split")
    commands.add_parser("dead-letters", help="events that could not be delivered")
    logs_parser = commands.add_parser("logs", help="the last lines of the log files")
    logs_parser.add_argument("name", nargs="?", help="one process (default: all)")
    logs_parser.add_argument("-n", "--lines", type=int, default=20)
    commands.add_parser("env", help="print the client env (same as STATE_DIR/env)")
    args = parser.parse_args(argv)

    config = StackConfig.from_env()
    supervisor = Supervisor(config)
    try:
        if args.command == "up":
            info = supervisor.up()
            print(f"stack up. state: {config.state_dir}\n  source {config.path('env')}")
            for name, value in info.env.items():
                if not name.startswith("AWS_SECRET"):
                    print(f"  {name}={value}")
            return 0
        if args.command == "down":
            stopped = supervisor.down()
            print(f"stopped {len(stopped)} process(es)")
            return 0
        if args.command == "status":
            return _status(config)
        if args.command == "env":
            print(config.path("env").read_text(), end="")
            return 0
        if args.command == "logs":
            names = (
                [args.name]
                if args.name
                else [p.stem for p in sorted(supervisor.log_dir.glob("*.log"))]
            )
            for name in names:
                print(f"==> {supervisor.log_dir / (name + '.log')} <==")
                print(supervisor.tail(name, args.lines))
            return 0
        info = StackInfo.load(config.state_dir)
        if args.command == "upload":
            record = upload(info, args.file, args.key)
            print(
                f"uploaded {args.file} -> s3://{record['bucket']}/{record['key']} "
                f"({record['size']} bytes, drop {record['drop_id']})"
            )
            return 0
        if args.command == "wait":
            drop_id = _drop_to_wait_for(info, args.drop)
            return 0 if wait(info, config, drop_id, args.timeout) else 1
        if args.command == "report":
            print(report(info))
            return 0
        if args.command == "predict-example":
            print(example_prediction(info))
            return 0
        if args.command == "dead-letters":
            letters = dead_letters(info)
            for letter in letters:
                print(json.dumps(letter, sort_keys=True, default=str))
            print(f"{len(letters)} dead letter(s)", file=sys.stderr)
            return 0
    except StackError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 1
