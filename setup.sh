#!/usr/bin/env bash
# Installs what ComputeTower's demo and tests need beyond the Rust toolchain: Debian's
# Chromium (the browser that logs in to sites) and PostgreSQL (the store's second engine, for
# its tests); the official `openai` and `anthropic` Python
# SDKs and LangChain's `langchain-openai`, in a virtual environment under target/; and the
# official `openai` Node SDK under target/node (nothing global). Idempotent: a second run does
# nothing.
set -euo pipefail
cd "$(dirname "$0")"

# Debian packages: Chromium, and PostgreSQL for the store tests on that engine (the tests
# start their own unprivileged cluster in a temp dir; the package's own cluster is not used).
missing=()
chrome="${COMPUTETOWER_CHROME:-/usr/bin/chromium}"
[ -x "$chrome" ] || missing+=(chromium)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: ${missing[*]} missing; run as root or: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]} (Debian packages)" >&2
  # No system cluster, nor a server started by the package: nothing here uses them.
  mkdir -p /etc/postgresql-common/createcluster.d
  echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.d/computetower.conf
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
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
