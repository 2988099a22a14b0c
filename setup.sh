#!/usr/bin/env bash
# Installs what ComputeTower's demo and tests need beyond the Rust toolchain: Debian's
# Chromium (the browser that logs in to sites); the official `openai` and `anthropic` Python
# SDKs and LangChain's `langchain-openai`, in a virtual environment under target/; and the
# official `openai` Node SDK under target/node (nothing global). Idempotent: a second run does
# nothing.
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
# The marker names what the venv holds, so a venv from an older setup.sh is topped up.
python_packages=('openai>=1.60,<3' 'anthropic>=0.40,<1' 'langchain-openai>=0.3,<2')
marker="$venv/.ready-$(printf '%s\n' "${python_packages[@]}" | sha256sum | cut -c1-12)"
if [ ! -f "$marker" ]; then
  echo "setup: preparing $venv with the openai and anthropic SDKs and langchain-openai" >&2
  mkdir -p target
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  # `python -m pip`, not `bin/pip`: a venv copied from another checkout keeps that one's
  # path in its scripts, and would install there.
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${python_packages[@]}"
  rm -f "$venv"/.ready*
  touch "$marker"
fi

# The official `openai` Node SDK, for the Node conformance client (tests/clients/*.mjs).
node_dir=target/node
if [ ! -f "$node_dir/node_modules/openai/package.json" ]; then
  if ! command -v npm >/dev/null; then
    echo "setup: npm is missing; install Node.js (apt-get install -y nodejs npm)" >&2
    exit 1
  fi
  echo "setup: installing the openai Node SDK in $node_dir" >&2
  mkdir -p "$node_dir"
  npm install --prefix "$node_dir" --no-audit --no-fund --no-save --silent 'openai@^6' >/dev/null
fi
