#!/usr/bin/env bash
# Sets up the virtualenv and runs the whole test suite: lint, unit and integration tests
# (the integration tests start the real local stack on free loopback ports).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/lib/bootstrap.sh
bash scripts/lib/system-deps.sh
echo "==> ruff"
ruff check .
echo "==> pytest"
exec pytest -q "$@"
