#!/usr/bin/env bash
# Removes what scripts/deploy.sh applied, in reverse order. By default the data stays: MinIO's
# and PostgreSQL's PersistentVolumeClaims, the Secrets (their credentials own that data) and the
# namespace are kept, so a later deploy.sh finds every object and every MLflow run again.
#
# Usage: scripts/undeploy.sh [--dry-run] [--delete-data]
#   --dry-run      kubectl delete --dry-run=client (print what would go), change nothing.
#   --delete-data  also delete the PVCs, the Secrets and the namespace: every object, dataset,
#                  model and MLflow run is lost.
# Environment: KUBECTL (default kubectl).
# The knative-serving/config-defaults change deploy.sh may have made is left as it is.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NAMESPACE=readmission
KUBECTL="${KUBECTL:-kubectl}"
DRY_RUN=0
DELETE_DATA=0

while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --delete-data) DELETE_DATA=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

log() { printf '==> %s\n' "$*"; }
command -v "$KUBECTL" >/dev/null 2>&1 || { echo "ERROR: kubectl not found (set KUBECTL)" >&2; exit 1; }
if ! "$KUBECTL" version --request-timeout=10s >/dev/null 2>&1; then
  echo "ERROR: kubectl cannot reach a cluster" >&2
  exit 1
fi

DRY=()
((DRY_RUN)) && DRY=(--dry-run=client)
remove() {
  log "delete $(basename "$1")"
  "$KUBECTL" delete "${DRY[@]}" --ignore-not-found -f "$1"
}

K="$ROOT/infra/knative"
M="$ROOT/infra/minio"
MON="$ROOT/infra/monitoring"

remove "$M/notifications-job.yaml"
for file in "$K"/*.yaml; do
  case "$(basename "$file")" in
    namespace.yaml | secret.template.yaml | configmap.yaml | mlflow.yaml | services.yaml \
      | broker.yaml | triggers.yaml | sinkbinding.yaml) ;;
    *) remove "$file" ;;
  esac
done
for file in "$MON"/*.yaml; do
  # The ServiceMonitor and PrometheusRule exist only with the Prometheus Operator's CRDs.
  if grep -q '^apiVersion: monitoring.coreos.com/' "$file" \
    && ! "$KUBECTL" get crd servicemonitors.monitoring.coreos.com >/dev/null 2>&1; then
    continue
  fi
  remove "$file"
done
remove "$K/sinkbinding.yaml"
remove "$K/triggers.yaml"
remove "$K/broker.yaml"
remove "$K/services.yaml"
remove "$K/mlflow.yaml"
remove "$M/buckets-job.yaml"
remove "$M/minio.yaml"
remove "$K/configmap.yaml"

if ((DELETE_DATA)); then
  log "deleting data: PVCs, Secrets, namespace"
  remove "$M/pvc.yaml"
  # PostgreSQL's PVC comes from the StatefulSet's volumeClaimTemplates.
  "$KUBECTL" delete "${DRY[@]}" --ignore-not-found -n "$NAMESPACE" pvc data-mlflow-postgres-0
  "$KUBECTL" delete "${DRY[@]}" --ignore-not-found -n "$NAMESPACE" \
    secret readmission-s3 minio-root mlflow-db
  remove "$K/namespace.yaml"
else
  log "kept: namespace $NAMESPACE, Secrets, PVCs of MinIO and PostgreSQL (--delete-data removes them)"
fi
