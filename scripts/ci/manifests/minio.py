"""MinIO: the bucket Job creates every bucket, the notification Job subscribes exactly the
objects of the CloudEvent table, both Job scripts lint clean, /data is persistent."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from .common import by_kind, load_docs


def _job_script(root: Path, name: str) -> str:
    for doc in by_kind(load_docs(root), "Job"):
        if doc.name == name:
            container = doc.obj["spec"]["template"]["spec"]["containers"][0]
            return "\n".join(container.get("command", []) + container.get("args", []))
    return ""


def _job_script_body(root: Path, name: str) -> str:
    for doc in by_kind(load_docs(root), "Job"):
        if doc.name == name:
            container = doc.obj["spec"]["template"]["spec"]["containers"][0]
            return container.get("args", [""])[0]
    return ""


def lint_shell(script: str) -> list[str]:
    """`sh -n` and, where installed, shellcheck on a Job's inline /bin/sh -ec script."""
    if not script:
        return []
    text = "#!/bin/sh\nset -e\n" + script
    problems = []
    result = subprocess.run(["sh", "-n"], input=text, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        problems.append(f"sh -n: {result.stderr.strip()}")
    shellcheck = shutil.which("shellcheck")
    if shellcheck:
        result = subprocess.run(
            [shellcheck, "--shell=sh", "--format=gcc", "-"],
            input=text,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0:
            problems.extend(line for line in result.stdout.splitlines() if line.strip())
    return problems


def check_minio(root: Path) -> list[str]:
    problems = []
    buckets = _job_script(root, "minio-buckets")
    if not buckets:
        problems.append("no Job minio-buckets")
    listed = re.search(r"^\s*set -- (.*)$", buckets.replace("\\\n", " "), re.MULTILINE)
    bucket_list = listed.group(1) if listed else ""
    for env in (
        "BUCKET_RAW",
        "BUCKET_DATASETS",
        "BUCKET_JOBS",
        "BUCKET_RESULTS",
        "BUCKET_MODELS",
        "BUCKET_REJECTED",
        "BUCKET_DEAD_LETTER",
        "BUCKET_MLFLOW",
        "BUCKET_SCORING",
        "BUCKET_PREDICTIONS_LOG",
        "BUCKET_OUTCOMES",
    ):
        if f'"${env}"' not in bucket_list:
            problems.append(f"minio-buckets does not create ${env}")
    if "mc mb --ignore-existing" not in buckets:
        problems.append("minio-buckets must create buckets idempotently (mc mb --ignore-existing)")
    notify = _job_script(root, "minio-notifications")
    if not notify:
        problems.append("no Job minio-notifications")
    for needle in (
        "notify_webhook:readmission",
        "endpoint=",
        "queue_dir=/data/.notify-queue",
        "queue_limit=",
    ):
        if needle not in notify:
            problems.append(f"minio-notifications: mc admin config set lacks {needle}")
    events = re.findall(r"mc event add[^\n]*", notify.replace("\\\n", " "))
    subscriptions = set()
    for line in events:
        bucket = re.search(r'"cluster/\$(\w+)"', line)
        prefix = re.search(r"--prefix (\S+)", line)
        suffix = re.search(r"--suffix (\S+)", line)
        if "--event put" not in line:
            problems.append(f"minio-notifications: {line.strip()!r} is not s3:ObjectCreated:*")
        subscriptions.add(
            (
                bucket.group(1) if bucket else None,
                prefix.group(1) if prefix else "",
                suffix.group(1) if suffix else "",
            )
        )
    wanted = {
        ("BUCKET_RAW", "", ".csv"),
        ("BUCKET_JOBS", "", ".json"),
        ("BUCKET_RESULTS", "", ".json"),
        ("BUCKET_MODELS", "champion/", "metadata.json"),
        ("BUCKET_MODELS", "decisions/", ".json"),
        ("BUCKET_MODELS", "reports/", "/drift-detected.json"),
        ("BUCKET_SCORING", "", ""),
        ("BUCKET_OUTCOMES", "", ".csv"),
    }
    if subscriptions != wanted:
        problems.append(
            f"minio-notifications subscribes {sorted(subscriptions)}, want {sorted(wanted)}"
        )
    for job in ("minio-buckets", "minio-notifications"):
        problems.extend(f"{job}: {p}" for p in lint_shell(_job_script_body(root, job)))
    minio = [d for d in by_kind(load_docs(root), "Deployment") if d.name == "minio"]
    if not minio:
        problems.append("no Deployment minio")
    else:
        volumes = minio[0].obj["spec"]["template"]["spec"].get("volumes", [])
        if not any(v.get("persistentVolumeClaim") for v in volumes):
            problems.append("MinIO's /data must be a PersistentVolumeClaim (queue_dir lives there)")
    return problems
