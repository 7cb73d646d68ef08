#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with everything it needs.
# Sourced by run-local.sh and test.sh; safe to run again (pip skips what is installed).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  echo "==> creating virtualenv $ROOT/.venv"
  "$PYTHON" -m venv "$ROOT/.venv"
  "$ROOT/.venv/bin/pip" install --quiet --upgrade pip
fi
stamp="$ROOT/.venv/.installed-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "==> installing the project and its dependencies into .venv"
  "$ROOT/.venv/bin/pip" install --quiet -e "${ROOT}[pipeline,dev]"
  touch "$stamp"
fi
export PATH="$ROOT/.venv/bin:$PATH"
