#!/usr/bin/env bash
# Installs the external programs the tests need when this machine lacks them:
# PostgreSQL (the tests start their own throwaway cluster), for the report's browser
# check Debian's chromium, and for the deployment tests promtool (Debian's prometheus
# package: `promtool check rules|metrics|config`, `promtool test rules`). Idempotent;
# needs root on a fresh machine.
set -euo pipefail
need=()
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  need+=(postgresql)
fi
if ! command -v chromium >/dev/null 2>&1; then
  need+=(chromium)
fi
if ! command -v promtool >/dev/null 2>&1; then
  need+=(prometheus)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "ensure_services: installing ${need[*]} from Debian's packages"
  if [ "$(id -u)" -ne 0 ]; then
    echo "ensure_services: not root; install ${need[*]} yourself" >&2
    exit 0
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
