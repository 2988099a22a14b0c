#!/usr/bin/env bash
# Installs what ComputeTower's demo and tests need beyond the Rust toolchain:
# the official `openai` Python SDK, in a virtual environment under target/ (nothing global).
# Idempotent: a second run does nothing.
set -euo pipefail
cd "$(dirname "$0")"

venv=target/py-venv
if [ ! -f "$venv/.ready" ]; then
  echo "setup: creating $venv with the openai SDK" >&2
  rm -rf "$venv"
  mkdir -p target
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'openai>=1.60,<3'
  touch "$venv/.ready"
fi
