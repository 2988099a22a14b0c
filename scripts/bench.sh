#!/usr/bin/env bash
# Performance measurements of ComputeTower (README, "Performance").
#
#   scripts/bench.sh            full: criterion benches, then the load harness (~15 min)
#   scripts/bench.sh --quick    the load harness's quick mode only (< 5 min)
#   add --runs N                run the load harness N times (default 1); the headline figures'
#                               median and range over the runs go to target/bench/summary.md
#   add --readme                also replace the results in README.md (between the
#                               `bench:results` markers) with the summary and the last run's tables
#
# The load harness starts the release binary, demo sites, `computetower serve` and LiteLLM's
# proxy (installed into target/litellm-venv on first use; skipped with a note if pip fails),
# all on 127.0.0.1, and writes target/bench/results.md and results.json.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
readme=0
runs=1
while [ "$#" -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --readme) readme=1 ;;
    --runs) shift; runs="${1:-}" ;;
    *) echo "usage: scripts/bench.sh [--quick] [--runs N] [--readme]" >&2; exit 2 ;;
  esac
  shift
done
case "$runs" in
  '' | *[!0-9]* | 0) echo "bench.sh: --runs takes a positive number" >&2; exit 2 ;;
esac

cargo build --release
if [ "$quick" = 0 ]; then
  cargo bench --bench decoders
  cargo bench --bench chunks
fi
rm -rf target/bench/run-*
for run in $(seq 1 "$runs"); do
  echo "bench.sh: load harness, run $run of $runs" >&2
  if [ "$quick" = 1 ]; then
    cargo bench --bench load -- --quick
  else
    cargo bench --bench load
  fi
  mkdir -p "target/bench/run-$run"
  cp target/bench/results.json target/bench/results.md "target/bench/run-$run/"
done
python3 scripts/bench_summary.py target/bench/run-*/results.json >target/bench/summary.md
cat target/bench/summary.md

if [ "$readme" = 1 ]; then
  python3 - <<'PY'
import pathlib, re
readme = pathlib.Path("README.md")
text = readme.read_text()
summary = pathlib.Path("target/bench/summary.md").read_text().strip()
last = pathlib.Path("target/bench/results.md").read_text().strip()
results = f"{summary}\n\nThe last run's tables:\n\n{last}"
start, end = "<!-- bench:results:start -->", "<!-- bench:results:end -->"
if start not in text or end not in text:
    raise SystemExit("README.md has no bench:results markers")
head, rest = text.split(start, 1)
_, tail = rest.split(end, 1)
readme.write_text(f"{head}{start}\n{results}\n{end}{tail}")
print("README.md: results table replaced")
PY
fi
