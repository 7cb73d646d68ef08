#!/usr/bin/env bash
# Installs the Debian packages the tests use, when they are missing and apt-get can run:
# chromium (browser test of the predict page), hey (load test), shellcheck (deploy scripts),
# prometheus (promtool checks the alert rules). Each check that needs one of them says so and
# skips when it is absent, so a machine without root still runs the rest.
set -euo pipefail
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v hey >/dev/null 2>&1 || need+=(hey)
command -v shellcheck >/dev/null 2>&1 || need+=(shellcheck)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "==> not installing ${need[*]} (needs root and apt-get): the checks that use them skip"
  exit 0
fi
echo "==> installing Debian packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
