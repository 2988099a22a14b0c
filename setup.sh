#!/usr/bin/env bash
# Installs what ComputeTower's demo and tests need beyond the Rust toolchain: Debian's
# Chromium (the browser that logs in to sites) and the official `openai` Python SDK, in a
# virtual environment under target/ (nothing global). Idempotent: a second run does nothing.
set -euo pipefail
cd "$(dirname "$0")"

chrome="${COMPUTETOWER_CHROME:-/usr/bin/chromium}"
if [ ! -x "$chrome" ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: Chromium is missing; run as root or: sudo apt-get install -y chromium" >&2
    exit 1
  fi
  echo "setup: installing Chromium (Debian package)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

venv=target/py-venv
if [ ! -f "$venv/.ready" ]; then
  echo "setup: creating $venv with the openai SDK" >&2
  rm -rf "$venv"
  mkdir -p target
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'openai>=1.60,<3'
  touch "$venv/.ready"
fi
