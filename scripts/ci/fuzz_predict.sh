#!/usr/bin/env bash
# Fuzz the predict function from its own OpenAPI document (schemathesis), on loopback only.
#
#   scripts/ci/fuzz_predict.sh                   # own stack: train a small champion, fuzz, stop
#   PREDICT_URL=http://127.0.0.1:8105 scripts/ci/fuzz_predict.sh   # fuzz a running predict
#
# Pass/fail: no 5xx answer (schemathesis check not_a_server_error), no request left without an
# answer, the predict process still healthy afterwards, and at least FUZZ_MIN_CASES cases run.
# Env (defaults): FUZZ_EXAMPLES (250 per operation), FUZZ_MIN_CASES (1000), FUZZ_MAX_TIME (300
# s for the schemathesis run), FUZZ_SEED (20261126), FUZZ_WORKERS (2), FUZZ_REPORT_DIR (a temp
# dir; kept), DIABETES_CSV (the sample the own stack trains on).
# Needs schemathesis in the virtualenv (pip install schemathesis).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
ST="$(dirname "$PY")/st"
EXAMPLES="${FUZZ_EXAMPLES:-250}"
MIN_CASES="${FUZZ_MIN_CASES:-1000}"
MAX_TIME="${FUZZ_MAX_TIME:-300}"
SEED="${FUZZ_SEED:-20261126}"
WORKERS="${FUZZ_WORKERS:-2}"
REPORT_DIR="${FUZZ_REPORT_DIR:-$(mktemp -d /tmp/fuzz-predict.XXXXXX)}"
mkdir -p "$REPORT_DIR"

[[ -x "$ST" ]] || { echo "schemathesis not installed: $(dirname "$PY")/pip install schemathesis" >&2; exit 2; }

OWN_STACK=""
cleanup() {
  if [[ -n "$OWN_STACK" ]]; then
    STATE_DIR="$OWN_STACK" "$PY" -m readmission.localstack down >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

if [[ -z "${PREDICT_URL:-}" ]]; then
  OWN_STACK="$(mktemp -d /tmp/fuzz-stack.XXXXXX)/state"
  echo "==> starting a small stack in $OWN_STACK"
  export STATE_DIR="$OWN_STACK" LOCAL_PORTS=free BATCH_ROWS=1500 TRAIN_WORKERS=2 \
    ALGORITHMS=logistic_regression,decision_tree
  "$PY" -m readmission.localstack up >"$REPORT_DIR/stack-up.log"
  SAMPLE="$REPORT_DIR/sample.csv"
  "$PY" - "$SAMPLE" <<'EOF'
import sys
sys.path.insert(0, "tests")
from support.seaweed_server import sample_csv  # every 25th row of the real CSV (DIABETES_CSV)
open(sys.argv[1], "wb").write(sample_csv(every=25))
EOF
  "$PY" -m readmission.localstack upload "$SAMPLE"
  "$PY" -m readmission.localstack wait --timeout 900
  # shellcheck source=/dev/null
  PREDICT_URL="$(. "$OWN_STACK/env" && echo "${PREDICT_URL:-}")"
  [[ -n "$PREDICT_URL" ]] || { echo "predict is not part of the stack" >&2; exit 2; }
fi

# Loopback only: this script never sends fuzz traffic anywhere else.
case "$PREDICT_URL" in
  http://127.*|http://localhost:*|http://localhost/*|http://\[::1\]*) ;;
  *) echo "refusing to fuzz $PREDICT_URL: loopback addresses only" >&2; exit 2 ;;
esac

echo "==> waiting for a model at $PREDICT_URL"
for _ in $(seq 1 120); do
  code="$(curl -s -o /dev/null -w '%{http_code}' "$PREDICT_URL/ready" || true)"
  [[ "$code" == 200 ]] && break
  sleep 1
done
[[ "$code" == 200 ]] || { echo "predict not ready (HTTP $code)" >&2; exit 1; }

echo "==> schemathesis: $EXAMPLES examples per operation, at most ${MAX_TIME}s, seed $SEED"
started=$(date +%s)
set +e
timeout --signal=INT --kill-after=30 $((MAX_TIME + 120)) "$ST" run "$PREDICT_URL/openapi.json" \
  --checks not_a_server_error \
  --max-examples "$EXAMPLES" \
  --max-time "$MAX_TIME" \
  --seed "$SEED" \
  --workers "$WORKERS" \
  --request-timeout 20 \
  --generation-database none \
  --suppress-health-check all \
  --no-color \
  --report ndjson,junit \
  --report-dir "$REPORT_DIR" \
  2>&1 | tee "$REPORT_DIR/schemathesis.log"
status=${PIPESTATUS[0]}
set -e
elapsed=$(( $(date +%s) - started ))

health="$(curl -s -o /dev/null -w '%{http_code}' "$PREDICT_URL/ready" || true)"
cases="$("$PY" - "$REPORT_DIR" <<'EOF'
import json, pathlib, sys
# one "ScenarioFinished"/interaction per generated case: count the recorded requests
total = 0
for path in pathlib.Path(sys.argv[1]).glob("*.ndjson"):
    for line in path.read_text().splitlines():
        event = json.loads(line)
        finished = event.get("ScenarioFinished") or {}
        total += len((finished.get("recorder") or {}).get("interactions") or {})
print(total)
EOF
)"
echo "==> figures: cases=$cases elapsed=${elapsed}s schemathesis_exit=$status health_after=$health report=$REPORT_DIR"
[[ "$status" == 0 ]] || { echo "FAIL: schemathesis found failures (see above)" >&2; exit 1; }
[[ "$health" == 200 ]] || { echo "FAIL: predict not healthy after the run" >&2; exit 1; }
[[ "$cases" -ge "$MIN_CASES" ]] || { echo "FAIL: only $cases cases (< $MIN_CASES)" >&2; exit 1; }
echo "PASS: $cases generated cases, no 5xx, predict healthy"
