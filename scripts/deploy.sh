#!/usr/bin/env bash
# Deploys the pipeline to the Kubernetes cluster of the current kubectl context (Knative Serving
# and Eventing installed; see docs/kubernetes.md), in dependency order:
#   namespace, Secrets (from the environment or generated), ConfigMap, MinIO, bucket Job,
#   PostgreSQL + MLflow, Knative Services, Broker, Triggers, SinkBinding, the other Knative
#   manifests (reconcile.yaml), monitoring, MinIO bucket notifications
# waiting for each step to be ready (kubectl wait / rollout status), then prints the routes.
#
# Usage: scripts/deploy.sh [--dry-run] [--no-validate] [--no-patch-knative-config]
#                          [--skip-monitoring] [--render-dir DIR]
#   --dry-run        kubectl apply --dry-run=client against the current context when kubectl
#                    can reach a cluster; otherwise only validate and render the manifests.
#                    Never creates or prints a secret.
#   --no-validate    skip scripts/ci/check_manifests.py (run before anything is applied).
#   --no-patch-knative-config
#                    do not raise knative-serving/config-defaults max-revision-timeout-seconds
#                    to the longest timeoutSeconds of services.yaml (train: 900 s).
#   --skip-monitoring  do not apply infra/monitoring (needs the Prometheus Operator CRDs for
#                    the ServiceMonitor and PrometheusRule; applied only when they exist).
#   --render-dir DIR keep the rendered manifests in DIR (default: a temporary directory).
#
# Environment:
#   IMAGE_REGISTRY   image prefix, e.g. ghcr.io/acme/readmission (default: the placeholder
#                    registry.example.com/readmission of the manifests)
#   IMAGE_TAG        image tag (default 0.1.0)
#   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY          -> Secret readmission-s3
#   MINIO_ROOT_USER, MINIO_ROOT_PASSWORD              -> Secret minio-root
#   POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB, POSTGRES_HOST -> Secret mlflow-db
#   MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD -> Secret mlflow-auth (MLflow's admin)
#   MLFLOW_FLASK_SERVER_SECRET_KEY                    -> Secret mlflow-server
#       An existing Secret is kept unless all of its variables are set; a missing one is
#       created from the variables, generating random values for unset credentials.
#   WAIT_TIMEOUT     per-step readiness timeout (default 300s)
#   KUBECTL          kubectl binary (default kubectl)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NAMESPACE=readmission
PLACEHOLDER_REGISTRY=registry.example.com/readmission
IMAGE_REGISTRY="${IMAGE_REGISTRY:-$PLACEHOLDER_REGISTRY}"
IMAGE_REGISTRY="${IMAGE_REGISTRY%/}"
IMAGE_TAG="${IMAGE_TAG:-0.1.0}"
WAIT_TIMEOUT="${WAIT_TIMEOUT:-300s}"
KUBECTL="${KUBECTL:-kubectl}"

DRY_RUN=0
VALIDATE=1
PATCH_KNATIVE=1
MONITORING=1
RENDER_DIR=""

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }

while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --no-validate) VALIDATE=0 ;;
    --no-patch-knative-config) PATCH_KNATIVE=0 ;;
    --skip-monitoring) MONITORING=0 ;;
    --render-dir) RENDER_DIR="${2:?--render-dir needs a directory}"; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

log() { printf '==> %s\n' "$*"; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
die() { printf 'ERROR: %s\n' "$*" >&2; exit 1; }

# ------------------------------------------------------------------ validate and render
if ((VALIDATE)); then
  PYTHON="$ROOT/.venv/bin/python"
  [[ -x "$PYTHON" ]] || PYTHON="$(command -v python3 || true)"
  [[ -n "$PYTHON" ]] || die "python3 is needed for scripts/ci/check_manifests.py (or pass --no-validate)"
  log "validating manifests (scripts/ci/check_manifests.py)"
  checks=()
  command -v node >/dev/null 2>&1 || { warn "node not found: skipping the Knative CRD schema check"; checks+=(--no-crd-schemas); }
  "$PYTHON" "$ROOT/scripts/ci/check_manifests.py" "${checks[@]}"
fi

KEEP_RENDERED=1
if [[ -z "$RENDER_DIR" ]]; then
  RENDER_DIR="$(mktemp -d)"
  KEEP_RENDERED=0
  trap 'rm -rf "$RENDER_DIR"' EXIT
fi
mkdir -p "$RENDER_DIR"
log "rendering manifests into $RENDER_DIR (images: $IMAGE_REGISTRY/<function>:$IMAGE_TAG)"
for dir in knative minio monitoring; do
  mkdir -p "$RENDER_DIR/$dir"
  for file in "$ROOT/infra/$dir"/*.yaml; do
    sed -E "s#image: ${PLACEHOLDER_REGISTRY//./\\.}/([a-z0-9-]+):[^[:space:]]+#image: ${IMAGE_REGISTRY}/\\1:${IMAGE_TAG}#" \
      "$file" >"$RENDER_DIR/$dir/$(basename "$file")"
  done
done
K="$RENDER_DIR/knative"
M="$RENDER_DIR/minio"
MON="$RENDER_DIR/monitoring"

# ------------------------------------------------------------------ cluster access
LIVE=1
if ! command -v "$KUBECTL" >/dev/null 2>&1; then
  ((DRY_RUN)) || die "kubectl not found (set KUBECTL)"
  LIVE=0
elif ! "$KUBECTL" version --request-timeout=10s >/dev/null 2>&1; then
  ((DRY_RUN)) || die "kubectl cannot reach a cluster (context: $("$KUBECTL" config current-context 2>/dev/null || echo none))"
  LIVE=0
fi
if ((DRY_RUN && !LIVE)); then
  log "dry run without a reachable cluster: manifests $( ((VALIDATE)) && printf 'validated and ')rendered, nothing applied"
  if ((KEEP_RENDERED)); then
    printf '  %s\n' "$K"/*.yaml "$M"/*.yaml "$MON"/*.yaml
  else
    echo "  (pass --render-dir DIR to keep the rendered manifests)"
  fi
  exit 0
fi

DRY=()
((DRY_RUN)) && DRY=(--dry-run=client)
k() { "$KUBECTL" "$@"; }
apply() { log "apply $(basename "$1")"; k apply "${DRY[@]}" -f "$1"; }
wait_for() { ((DRY_RUN)) && return 0; k wait -n "$NAMESPACE" --timeout="$WAIT_TIMEOUT" "$@"; }
rollout() { ((DRY_RUN)) && return 0; k rollout status -n "$NAMESPACE" --timeout="$WAIT_TIMEOUT" "$@"; }
rerun_job() {
  local file="$1" name="$2"
  ((DRY_RUN)) || k delete job -n "$NAMESPACE" "$name" --ignore-not-found --wait=true
  apply "$file"
  wait_for --for=condition=complete "job/$name"
}

for crd in services.serving.knative.dev brokers.eventing.knative.dev triggers.eventing.knative.dev \
  sinkbindings.sources.knative.dev jobsinks.sinks.knative.dev; do
  k get crd "$crd" >/dev/null 2>&1 || die "CRD $crd not found: install Knative Serving and Eventing first"
done

# ------------------------------------------------------------------ namespace, secrets, settings
apply "$K/namespace.yaml"

random_secret() { od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'; }

# ensure_secret NAME VAR...: keeps an existing Secret unless every VAR is set; creates a
# missing one from the VARs, generating values for unset credentials. Never prints a value.
ensure_secret() {
  local name="$1"; shift
  local all_set=1 var
  for var in "$@"; do [[ -n "${!var:-}" ]] || all_set=0; done
  if k get secret -n "$NAMESPACE" "$name" >/dev/null 2>&1 && ((!all_set)); then
    log "secret $name exists: kept"
    return 0
  fi
  local literals=() value
  for var in "$@"; do
    value="${!var:-}"
    if [[ -z "$value" ]]; then
      case "$var" in
        AWS_ACCESS_KEY_ID) value="readmission-$(random_secret 6)" ;;
        MINIO_ROOT_USER) value="minio-admin-$(random_secret 4)" ;;
        POSTGRES_USER) value=mlflow ;;
        POSTGRES_DB) value=mlflow ;;
        POSTGRES_HOST) value=mlflow-postgres ;;
        MLFLOW_TRACKING_USERNAME) value="admin" ;;
        *) value="$(random_secret 24)" ;;
      esac
      log "secret $name: generated $var"
    fi
    literals+=("--from-literal=$var=$value")
  done
  log "secret $name: create/update"
  k create secret generic "$name" -n "$NAMESPACE" "${literals[@]}" --dry-run=client -o yaml \
    | k label --local -f - app.kubernetes.io/part-of=readmission -o yaml \
    | k apply "${DRY[@]}" -f - >/dev/null
}

ensure_secret readmission-s3 AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
ensure_secret minio-root MINIO_ROOT_USER MINIO_ROOT_PASSWORD
ensure_secret mlflow-db POSTGRES_USER POSTGRES_PASSWORD POSTGRES_DB POSTGRES_HOST
ensure_secret mlflow-auth MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD
ensure_secret mlflow-server MLFLOW_FLASK_SERVER_SECRET_KEY
apply "$K/configmap.yaml"

# ------------------------------------------------------------------ MinIO and buckets
apply "$M/pvc.yaml"
apply "$M/minio.yaml"
rollout deployment/minio
rerun_job "$M/buckets-job.yaml" minio-buckets

# ------------------------------------------------------------------ MLflow
apply "$K/mlflow.yaml"
rollout statefulset/mlflow-postgres
rollout deployment/mlflow

# ------------------------------------------------------------------ Knative
# train's timeoutSeconds (900) is above Knative's default max-revision-timeout-seconds (600).
needed="$(grep -Eo 'timeoutSeconds: [0-9]+' "$K/services.yaml" | awk '{print $2}' | sort -n | tail -n 1)"
current="$(k get configmap config-defaults -n knative-serving \
  -o jsonpath='{.data.max-revision-timeout-seconds}' 2>/dev/null || true)"
if ((${current:-600} < needed)); then
  if ((PATCH_KNATIVE)); then
    log "knative-serving/config-defaults: max-revision-timeout-seconds ${current:-600} -> $needed"
    k patch configmap config-defaults -n knative-serving --type merge "${DRY[@]}" \
      -p "{\"data\":{\"max-revision-timeout-seconds\":\"$needed\"}}"
  else
    die "knative-serving max-revision-timeout-seconds is ${current:-600} < $needed (drop --no-patch-knative-config)"
  fi
fi

apply "$K/services.yaml"
wait_for --for=condition=Ready ksvc --all
apply "$K/broker.yaml"
wait_for --for=condition=Ready broker/readmission
apply "$K/triggers.yaml"
wait_for --for=condition=Ready trigger --all
apply "$K/sinkbinding.yaml"
wait_for --for=condition=Ready sinkbinding/events-adapter-sink
# The SinkBinding injects K_SINK into events-adapter: a new revision rolls out.
wait_for --for=condition=Ready ksvc/events-adapter
# Any further Knative manifest (reconcile.yaml: the PingSource-driven reconciler, ...).
for file in "$K"/*.yaml; do
  case "$(basename "$file")" in
    namespace.yaml | secret.template.yaml | configmap.yaml | mlflow.yaml | services.yaml \
      | broker.yaml | triggers.yaml | sinkbinding.yaml) ;;
    *) apply "$file"; extra_knative=1 ;;
  esac
done
if ((${extra_knative:-0})); then
  wait_for --for=condition=Ready ksvc --all
fi

# ------------------------------------------------------------------ monitoring
if ((MONITORING)); then
  apply "$MON/grafana-dashboard-configmap.yaml"
  apply "$MON/grafana-provisioning.yaml"
  apply "$MON/prometheus-scrape.yaml"
  if k get crd servicemonitors.monitoring.coreos.com prometheusrules.monitoring.coreos.com >/dev/null 2>&1; then
    apply "$MON/servicemonitor.yaml"
    apply "$MON/prometheusrule.yaml"
  else
    warn "Prometheus Operator CRDs not found: ServiceMonitor and PrometheusRule not applied"
  fi
fi

# ------------------------------------------------------------------ MinIO notifications (last)
rerun_job "$M/notifications-job.yaml" minio-notifications

# ------------------------------------------------------------------ routes
if ((DRY_RUN)); then
  log "dry run done: nothing was changed"
  exit 0
fi
log "Knative Services"
k get ksvc -n "$NAMESPACE" \
  -o custom-columns='NAME:.metadata.name,URL:.status.url,READY:.status.conditions[?(@.type=="Ready")].status'
log "Broker ingress: $(k get broker readmission -n "$NAMESPACE" -o jsonpath='{.status.address.url}')"
log "Triggers"
k get trigger -n "$NAMESPACE" \
  -o custom-columns='NAME:.metadata.name,TYPE:.spec.filter.attributes.type,SUBSCRIBER:.status.subscriberUri'
log "MLflow: kubectl -n $NAMESPACE port-forward svc/mlflow 5000:5000"
log "MinIO:  kubectl -n $NAMESPACE port-forward svc/minio 9000:9000 9001:9001"
log "predict: $(k get ksvc predict -n "$NAMESPACE" -o jsonpath='{.status.url}')"
