#!/usr/bin/env bash
# Performance measurements of ComputeTower (README, "Performance").
#
#   scripts/bench.sh            full: criterion benches, then the load harness (~15 min)
#   scripts/bench.sh --quick    the load harness's quick mode only (< 5 min)
#   add --readme                also replace the results table in README.md (between the
#                               `bench:results` markers) with target/bench/results.md
#
# The load harness starts the release binary, demo sites, `computetower serve` and LiteLLM's
# proxy (installed into target/litellm-venv on first use; skipped with a note if pip fails),
# all on 127.0.0.1, and writes target/bench/results.md and results.json.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
readme=0
for arg in "$@"; do
  case "$arg" in
    --quick) quick=1 ;;
    --readme) readme=1 ;;
    *) echo "usage: scripts/bench.sh [--quick] [--readme]" >&2; exit 2 ;;
  esac
done

cargo build --release
if [ "$quick" = 1 ]; then
  cargo bench --bench load -- --quick
else
  cargo bench --bench decoders
  cargo bench --bench chunks
  cargo bench --bench load
fi

if [ "$readme" = 1 ]; then
  python3 - <<'PY'
import pathlib, re
readme = pathlib.Path("README.md")
text = readme.read_text()
results = pathlib.Path("target/bench/results.md").read_text().strip()
start, end = "<!-- bench:results:start -->", "<!-- bench:results:end -->"
if start not in text or end not in text:
    raise SystemExit("README.md has no bench:results markers")
head, rest = text.split(start, 1)
_, tail = rest.split(end, 1)
readme.write_text(f"{head}{start}\n{results}\n{end}{tail}")
print("README.md: results table replaced")
PY
fi
