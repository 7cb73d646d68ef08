#!/usr/bin/env bash
# Load test of the predict function, loopback targets only, bounded in time (and count).
#
#   scripts/loadtest.sh [URL] [--locust] [-c N] [-z DURATION] [-n REQUESTS]
#
#   URL          base URL of the function; /predict is added. Default: $PREDICT_URL, else the
#                local stack's (PREDICT_URL in $STATE_DIR/env, .state/env), else
#                http://127.0.0.1:8080 (the function started by hand, docs/predict.md)
#   --locust     use Locust (scripts/lib/locustfile.py: varied patients) instead of hey
#   -c N         concurrent clients (default 16, at most 256)
#   -z DURATION  run time, e.g. 30s or 2m (default 30s, at most 10m)
#   -n REQUESTS  with hey: stop after this many requests instead (at most 1,000,000)
#   --host-header NAME  send "Host: NAME" (Knative routing through a port-forwarded ingress)
#
# hey is Debian's package `hey` (apt-get install hey); Locust is the project's optional extra
# `load` (installed into .venv on first use of --locust).
# Locust patients: scripts/export_patients.py writes .state/loadtest/patients.json once.
# Prints a fixed summary: tool, target, concurrency, duration, requests, throughput, latency
# percentiles (p50/p90/p99 in ms) and the error count. Exit status 1 if any request failed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
URL=""
TOOL=hey
CONCURRENCY=16
DURATION=30s
REQUESTS=""
HOST_HEADER=""

while [ $# -gt 0 ]; do
  case "$1" in
    --locust) TOOL=locust ;;
    -c) CONCURRENCY="$2"; shift ;;
    -z) DURATION="$2"; shift ;;
    -n) REQUESTS="$2"; shift ;;
    --host-header) HOST_HEADER="$2"; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    http://*|https://*) URL="$1" ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

if [ -z "$URL" ]; then
  URL="${PREDICT_URL:-}"
  STACK_ENV="${STATE_DIR:-$ROOT/.state}/env"
  if [ -z "$URL" ] && [ -f "$STACK_ENV" ]; then
    URL="$(sed -n "s/^export PREDICT_URL='\(.*\)'$/\1/p" "$STACK_ENV")"
  fi
  URL="${URL:-http://127.0.0.1:8080}"
fi
URL="${URL%/}"
URL="${URL%/predict}"
if ! [[ "$URL" =~ ^https?://(127\.[0-9]+\.[0-9]+\.[0-9]+|localhost|\[::1\])(:[0-9]+)?$ ]]; then
  echo "refusing to load-test $URL: loopback targets only (127.0.0.0/8, localhost, [::1])" >&2
  exit 2
fi
if ! [[ "$CONCURRENCY" =~ ^[0-9]+$ ]] || [ "$CONCURRENCY" -lt 1 ] || [ "$CONCURRENCY" -gt 256 ]; then
  echo "-c must be 1..256" >&2; exit 2
fi
if ! [[ "$DURATION" =~ ^([0-9]+)(s|m)$ ]]; then echo "-z must look like 30s or 2m" >&2; exit 2; fi
SECONDS_TOTAL="${BASH_REMATCH[1]}"
if [ "${BASH_REMATCH[2]}" = m ]; then SECONDS_TOTAL=$(( SECONDS_TOTAL * 60 )); fi
if [ "$SECONDS_TOTAL" -lt 1 ] || [ "$SECONDS_TOTAL" -gt 600 ]; then
  echo "-z must be between 1s and 10m" >&2; exit 2
fi
if [ -n "$REQUESTS" ] && { ! [[ "$REQUESTS" =~ ^[0-9]+$ ]] || [ "$REQUESTS" -gt 1000000 ]; }; then
  echo "-n must be a number up to 1000000" >&2; exit 2
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
PYTHON="$ROOT/.venv/bin/python"; [ -x "$PYTHON" ] || PYTHON=python3

summary() {  # tool requests duration_s rps p50_s p90_s p99_s errors
  awk -v tool="$1" -v target="$URL/predict" -v c="$CONCURRENCY" -v n="$2" -v d="$3" \
      -v rps="$4" -v p50="$5" -v p90="$6" -v p99="$7" -v err="$8" 'BEGIN {
    print "== predict load test =="
    printf "tool:         %s\n", tool
    printf "target:       %s\n", target
    printf "concurrency:  %d\n", c
    printf "duration_s:   %.1f\n", d
    printf "requests:     %d\n", n
    printf "throughput:   %.1f req/s\n", rps
    printf "latency_ms:   p50=%.2f p90=%.2f p99=%.2f\n", p50 * 1000, p90 * 1000, p99 * 1000
    printf "errors:       %d\n", err
  }'
}

if [ "$TOOL" = hey ]; then
  command -v hey >/dev/null || { echo "hey not found: apt-get install hey" >&2; exit 2; }
  # The example patient of the API (readmission.serving.examples.EXAMPLE_PATIENT).
  cat > "$TMP/body.json" <<'JSON'
{"features": {"race": "Caucasian", "gender": "Female", "age": "[70-80)", "weight": "?",
 "admission_type_id": "1", "discharge_disposition_id": "1", "admission_source_id": "7",
 "time_in_hospital": 5, "payer_code": "MC", "medical_specialty": "InternalMedicine",
 "num_lab_procedures": 45, "num_procedures": 1, "num_medications": 16, "number_outpatient": 0,
 "number_emergency": 0, "number_inpatient": 1, "diag_1": "428", "diag_2": "427", "diag_3": "250",
 "number_diagnoses": 9, "max_glu_serum": "None", "A1Cresult": ">8", "metformin": "Steady",
 "repaglinide": "No", "nateglinide": "No", "chlorpropamide": "No", "glimepiride": "No",
 "acetohexamide": "No", "glipizide": "No", "glyburide": "No", "tolbutamide": "No",
 "pioglitazone": "No", "rosiglitazone": "No", "acarbose": "No", "miglitol": "No",
 "troglitazone": "No", "tolazamide": "No", "examide": "No", "citoglipton": "No", "insulin": "Up",
 "glyburide-metformin": "No", "glipizide-metformin": "No", "glimepiride-pioglitazone": "No",
 "metformin-rosiglitazone": "No", "metformin-pioglitazone": "No", "change": "Ch",
 "diabetesMed": "Yes"}}
JSON
  if [ -n "$REQUESTS" ]; then LIMIT=(-n "$REQUESTS"); else LIMIT=(-z "$DURATION"); fi
  if [ -n "$HOST_HEADER" ]; then LIMIT+=(-host "$HOST_HEADER"); fi
  timeout $(( SECONDS_TOTAL + 60 )) hey "${LIMIT[@]}" -c "$CONCURRENCY" -t 10 -m POST \
    -T application/json -D "$TMP/body.json" "$URL/predict" > "$TMP/hey.txt"
  get() { awk -v pat="$1" '$0 ~ pat { for (i = 1; i <= NF; i++) if ($i ~ /^[0-9.]+$/) { print $i; exit } }' "$TMP/hey.txt"; }
  total=$(get "Total:")
  rps=$(get "Requests/sec:")
  p50=$(get "50% in"); p90=$(get "90% in"); p99=$(get "99% in")
  ok=$(awk '/\[200\]/ { s += $2 } END { print s + 0 }' "$TMP/hey.txt")
  all=$(awk '/\[[0-9]+\][ \t]+[0-9]+ responses/ { s += $2 } END { print s + 0 }' "$TMP/hey.txt")
  transport=$(awk '/Error distribution/ { e = 1; next } e && /\[[0-9]+\]/ { gsub(/[^0-9]/, "", $1); s += $1 } END { print s + 0 }' "$TMP/hey.txt")
  errors=$(( all - ok + transport ))
  summary hey "$(( all + transport ))" "${total:-0}" "${rps:-0}" "${p50:-0}" "${p90:-0}" "${p99:-0}" "$errors"
else
  LOCUST="$ROOT/.venv/bin/locust"
  if [ ! -x "$LOCUST" ] && [ -x "$ROOT/.venv/bin/pip" ]; then  # the project's optional extra
    echo "==> installing Locust into .venv (pip install -e '.[load]')" >&2
    "$ROOT/.venv/bin/pip" install --quiet -e "${ROOT}[load]" > "$TMP/pip.txt" 2>&1 || cat "$TMP/pip.txt" >&2
  fi
  [ -x "$LOCUST" ] || LOCUST=locust
  command -v "$LOCUST" >/dev/null || {
    echo "locust not found: .venv/bin/pip install -e '.[load]' (scripts/lib/bootstrap.sh makes .venv)" >&2
    exit 2
  }
  LOCUST_HOST_HEADER="$HOST_HEADER" timeout $(( SECONDS_TOTAL + 60 )) "$LOCUST" -f "$ROOT/scripts/lib/locustfile.py" --host "$URL" \
    --headless -u "$CONCURRENCY" -r "$CONCURRENCY" -t "${SECONDS_TOTAL}s" --stop-timeout 5 \
    --csv "$TMP/stats" --only-summary --loglevel WARNING > "$TMP/locust.txt" 2>&1 || true
  [ -f "$TMP/stats_stats.csv" ] || { cat "$TMP/locust.txt" >&2; exit 2; }
  read -r n errors rps p50 p90 p99 < <("$PYTHON" - "$TMP/stats_stats.csv" <<'PY'
import csv, sys
row = next(r for r in csv.DictReader(open(sys.argv[1])) if r["Name"] == "Aggregated")
ms = lambda k: float(row[k] or 0) / 1000
print(row["Request Count"], row["Failure Count"], row["Requests/s"], ms("50%"), ms("90%"), ms("99%"))
PY
)
  summary locust "$n" "$SECONDS_TOTAL" "$rps" "$p50" "$p90" "$p99" "$errors"
fi
[ "$errors" -eq 0 ]
