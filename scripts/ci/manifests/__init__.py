"""The checks of scripts/ci/check_manifests.py, one module per family; each check takes the
root of the repository it checks and returns its problems (empty: none)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .config import check_config_refs, check_no_secrets
from .dockerfile import check_dockerfile
from .knative import check_eventing, check_function_sources, check_scaling, check_services
from .minio import check_minio
from .mlflow import check_mlflow_auth
from .monitoring import check_monitoring, check_promql
from .schemas import check_crd_schemas, check_kubernetes_schemas
from .syntax import check_parse, check_yamllint

CHECKS: dict[str, Callable[[Path], list[str]]] = {
    "parse": check_parse,
    "yamllint": check_yamllint,
    "kubernetes-schemas": check_kubernetes_schemas,
    "crd-schemas": check_crd_schemas,
    "services": check_services,
    "function-sources": check_function_sources,
    "scaling": check_scaling,
    "eventing": check_eventing,
    "config-refs": check_config_refs,
    "no-secrets": check_no_secrets,
    "minio": check_minio,
    "mlflow-auth": check_mlflow_auth,
    "monitoring": check_monitoring,
    "promql": check_promql,
    "dockerfile": check_dockerfile,
}
