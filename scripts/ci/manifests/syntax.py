"""Syntax: every YAML file under infra/ parses, holds namespaced Kubernetes objects and is
yamllint-clean."""

from __future__ import annotations

from pathlib import Path

import yaml

from .common import NAMESPACE, manifest_files

YAMLLINT_CONFIG = """
extends: default
rules:
  line-length:
    max: 120
    allow-non-breakable-inline-mappings: true
    # Generated from the dashboard JSON (PromQL expressions are long).
    ignore: |
      infra/monitoring/grafana-dashboard-configmap.yaml
  document-start: disable
  comments: {min-spaces-from-content: 1}
  comments-indentation: disable
  truthy: {allowed-values: ["true", "false"], check-keys: false}
  indentation: {spaces: 2, indent-sequences: consistent}
"""


def check_parse(root: Path) -> list[str]:
    problems = []
    for path in manifest_files(root):
        try:
            docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
        except yaml.YAMLError as exc:
            problems.append(f"{path.relative_to(root)}: does not parse: {exc}")
            continue
        if not docs:
            problems.append(f"{path.relative_to(root)}: no YAML document")
        for index, obj in enumerate(docs):
            where = f"{path.relative_to(root)}[{index}]"
            if not isinstance(obj, dict):
                problems.append(f"{where}: not a mapping")
                continue
            for key in ("apiVersion", "kind"):
                if not obj.get(key):
                    problems.append(f"{where}: no {key}")
            meta = obj.get("metadata") or {}
            if not meta.get("name"):
                problems.append(f"{where}: no metadata.name")
            if obj.get("kind") != "Namespace" and meta.get("namespace") != NAMESPACE:
                problems.append(f"{where}: metadata.namespace must be {NAMESPACE!r}")
    return problems


def check_yamllint(root: Path) -> list[str]:
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig(YAMLLINT_CONFIG)
    problems = []
    for path in manifest_files(root):
        relative = str(path.relative_to(root))
        for problem in linter.run(path.read_text(encoding="utf-8"), config, relative):
            problems.append(
                f"{path.relative_to(root)}:{problem.line}:{problem.column}: "
                f"[{problem.level}] {problem.desc} ({problem.rule})"
            )
    return problems
