#!/usr/bin/env bash
# The whole pipeline on this machine: SeaweedFS (S3 + filer webhook), MLflow, the local broker
# and one functions-framework process per function (docs/local-stack.md).
#
#   scripts/run-local.sh              start the stack, upload the dataset, follow the pipeline
#   scripts/run-local.sh up           start the stack only
#   scripts/run-local.sh stop         stop everything the stack started (also: down)
#   scripts/run-local.sh status       processes and broker counters
#   scripts/run-local.sh logs [NAME]  last lines of the log files
#   scripts/run-local.sh dead-letters events that could not be delivered
#   scripts/run-local.sh report       what the pipeline produced
#   scripts/run-local.sh predict-example  one prediction over HTTP
#   scripts/run-local.sh upload FILE  drop another extract (it grows the corpus), then follow it
#   scripts/run-local.sh decisions list | promote VERSION [--reason R] | rollback [--reason R]
#
# Env: DIABETES_CSV (default ../shared/data/diabetic_data.csv.gz; .gz is decompressed on the
# fly; if missing, readmission.dataset.ensure_dataset() fetches the UCI archive), STATE_DIR
# (.state), WAIT_TIMEOUT (3600 s), and the ports and settings in docs/local-stack.md.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/lib/bootstrap.sh
# Debian's prometheus for the stack's Prometheus (installed when root; else it says how)
system_deps() { bash scripts/lib/system-deps.sh prometheus; }
stack() { python -m readmission.localstack "$@"; }

dataset_path() {
  local csv="${DIABETES_CSV:-$ROOT/../shared/data/diabetic_data.csv.gz}"
  if [ -f "$csv" ]; then
    echo "$csv"
    return
  fi
  echo "==> $csv not found: fetching the UCI dataset" >&2
  python - <<'PY'
try:
    from readmission.dataset import ensure_dataset
except ImportError as error:
    raise SystemExit(f"no dataset: set DIABETES_CSV ({error})")
print(ensure_dataset())
PY
}

command="${1:-run}"
case "$command" in
  stop | down) stack down ;;
  up) system_deps; stack up ;;
  status) stack status ;;
  logs) shift; stack logs "$@" ;;
  dead-letters) stack dead-letters ;;
  report) stack report ;;
  predict-example) stack predict-example ;;
  upload)
    shift
    stack upload "$@"
    stack wait --timeout "${WAIT_TIMEOUT:-3600}"
    ;;
  decisions)
    shift
    env_file="${STATE_DIR:-$ROOT/.state}/env"
    [ -f "$env_file" ] || { echo "no stack running: scripts/run-local.sh up" >&2; exit 1; }
    # shellcheck disable=SC1090  # the stack's client env (S3 keys, MLflow URI)
    source "$env_file"
    python -m readmission.decisions "$@"
    ;;
  run)
    system_deps
    csv="$(dataset_path)"  # before starting anything: no dataset, no stack left behind
    echo "==> starting the local stack"
    stack up
    echo "==> uploading $csv"
    stack upload "$csv"
    echo "==> following the pipeline (Ctrl-C stops watching; the stack keeps running)"
    status=0
    stack wait --timeout "${WAIT_TIMEOUT:-3600}" || status=$?
    echo "==> produced"
    stack report
    if [ "$status" -eq 0 ]; then
      echo "==> an example prediction over HTTP"
      stack predict-example || true
    fi
    letters="$(stack dead-letters 2>/dev/null | wc -l)"
    if [ "$letters" -gt 0 ]; then
      echo "==> $letters dead letter(s): scripts/run-local.sh dead-letters"
    fi
    prometheus_url="$(stack env | sed -n "s/^export PROMETHEUS_URL=//p" | tr -d "'")"
    if [ -n "$prometheus_url" ]; then
      echo "==> Prometheus: $prometheus_url (alerts: $prometheus_url/alerts)"
    fi
    echo "==> the stack is still running: source ${STATE_DIR:-$ROOT/.state}/env to use it;"
    echo "    scripts/run-local.sh stop to stop it"
    exit "$status"
    ;;
  *)
    sed -n '2,15p' "$0"
    exit 2
    ;;
esac
