#!/usr/bin/env bash
# Installs Debian packages when they are missing and apt-get can run. Without arguments, the
# ones the tests use: chromium (browser test of the predict page), hey (load test), shellcheck
# (deploy scripts), prometheus (promtool checks the alert rules; the local stack's Prometheus).
# With arguments, only those (run-local.sh: prometheus). Each package is named after the
# command it provides. What needs one of them says so and skips when it is absent, so a
# machine without root still runs the rest.
set -euo pipefail
wanted=("$@")
[ ${#wanted[@]} -eq 0 ] && wanted=(chromium hey shellcheck prometheus)
need=()
for package in "${wanted[@]}"; do
  command -v "$package" >/dev/null 2>&1 || need+=("$package")
done
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "==> not installing ${need[*]} (needs root and apt-get: apt-get install ${need[*]});"
  echo "    what uses them is skipped"
  exit 0
fi
echo "==> installing Debian packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
