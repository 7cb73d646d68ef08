"""The local stack's Prometheus: its config and the project's alert rules, generated at start.

Contract. `write_config(directory, targets, ...)` writes `<directory>/prometheus.yml` (scraping
each job's `host:port` targets at `/metrics` every `scrape_seconds`, rules evaluated as often)
and `<directory>/rules.yml`: the `spec.groups` of every PrometheusRule in
infra/monitoring/prometheusrule.yaml, which is exactly the format of a Prometheus rules file,
so the cluster's alert rules are the ones loaded here. `rule_for`, when given, replaces every
alert's `for:` (PROMETHEUS_RULE_FOR; tests use it to see a rule fire in seconds). Each target
carries a `pod` label (its job name), the label the rules join on in the cluster.

`binary()` is Debian's `/usr/bin/prometheus` (apt-get install prometheus) or one on PATH, else
None: the stack then starts without it and says how to install it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

RULES_MANIFEST = Path("infra") / "monitoring" / "prometheusrule.yaml"
INSTALL_HINT = "apt-get install prometheus (Debian's package; scripts/lib/system-deps.sh)"


def binary() -> str | None:
    return shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
    )


def rule_groups(root: Path, rule_for: str | None = None) -> list[dict[str, Any]]:
    """The rule groups of every PrometheusRule in the manifest (alerts' `for:` replaced)."""
    groups: list[dict[str, Any]] = []
    with (root / RULES_MANIFEST).open(encoding="utf-8") as handle:
        for doc in yaml.safe_load_all(handle):
            if isinstance(doc, dict) and doc.get("kind") == "PrometheusRule":
                groups.extend(doc["spec"]["groups"])
    if rule_for:
        for group in groups:
            for rule in group["rules"]:
                if "alert" in rule:
                    rule["for"] = rule_for
    return groups


def config_document(
    targets: dict[str, list[str]], rules_file: Path, scrape_seconds: float
) -> dict[str, Any]:
    interval = f"{max(1, round(scrape_seconds * 1000))}ms"
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(rules_file)],
        "scrape_configs": [
            {
                "job_name": job,
                "metrics_path": "/metrics",
                "static_configs": [{"targets": hosts, "labels": {"pod": job}}],
            }
            for job, hosts in sorted(targets.items())
        ],
    }


def write_config(
    directory: Path,
    root: Path,
    targets: dict[str, list[str]],
    scrape_seconds: float,
    rule_for: str | None = None,
) -> Path:
    """Write rules.yml and prometheus.yml into `directory`; returns prometheus.yml."""
    directory.mkdir(parents=True, exist_ok=True)
    rules = directory / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": rule_groups(root, rule_for)}, sort_keys=False))
    config = directory / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(config_document(targets, rules, scrape_seconds), sort_keys=False)
    )
    return config


def command(executable: str, directory: Path, host: str, port: int) -> list[str]:
    """The server on `host:port`, its data under `directory`/data (kept across restarts)."""
    return [
        executable,
        f"--config.file={directory / 'prometheus.yml'}",
        f"--storage.tsdb.path={directory / 'data'}",
        f"--web.listen-address={host}:{port}",
        "--storage.tsdb.retention.time=7d",
    ]
