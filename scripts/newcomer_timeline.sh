#!/usr/bin/env bash
# Re-measure the newcomer timeline of docs/install.md: a fresh clone of this repository and a fresh
# venv, then README's two set-up commands, each step timed with /usr/bin/time (wall and CPU).
# Writes OUT_DIR/timeline.md (a table with the date, the host's CPU, cores and load average, and
# the pytest summary line) and one log per step; paste the table into docs/install.md.
#
#   bash scripts/newcomer_timeline.sh OUT_DIR [TORCH_SPEC]
#
# TORCH_SPEC: what `pip install` gets for torch first (default "torch==2.13.0", the lowest
# supported; a local wheel path works too, which keeps the download out of the timing). The
# whole run takes ~25 minutes on 2 idle cores (most of it the test suite) and needs the network
# unless pip's cache or a wheel serves every package. Measure on an idle machine, and say so.
set -euo pipefail
out=${1:?usage: bash scripts/newcomer_timeline.sh OUT_DIR [TORCH_SPEC]}
torch_spec=${2:-torch==2.13.0}
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

rows=()
step() {  # step NAME COMMAND...: run in the clone with the venv active, record wall and CPU time
  local name=$1 log
  shift
  log="$out/$(echo "$name" | tr -c 'a-zA-Z0-9\n' '_').log"
  echo "== $name" >&2
  /usr/bin/time -f "%e %U %S" -o "$work/time" bash -c "$*" > "$log" 2>&1 || {
    echo "step failed: $name (log: $log)" >&2; tail -20 "$log" >&2; }
  read -r wall user sys < "$work/time"
  rows+=("| \`$name\` | $(printf '%.0f' "$wall") s | $(awk -v u="$user" -v s="$sys" 'BEGIN{printf "%.0f", u + s}') s |")
}

git clone -q "$repo" "$work/src"
cd "$work/src"
step "python -m venv .venv" python -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
step "pip install $torch_spec" pip install -q --progress-bar off "$torch_spec"
step "bash scripts/install.sh" bash scripts/install.sh
step "python -m gsa_kernels demo" python -m gsa_kernels demo --out-dir "$work/demo_out"
step "bash scripts/install.sh test" bash scripts/install.sh test
step "python -m pytest -q tests" python -m pytest -q -p no:cacheprovider tests
summary=$(grep -E "[0-9]+ (passed|failed)" "$out/python_m_pytest__q_tests.log" | tail -1 || true)

{
  echo "Measured $(date -u +%Y-%m-%d) on $(lscpu | sed -n 's/^Model name: *//p' | head -1)," \
       "$(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) at the end;" \
       "commit $(git rev-parse --short HEAD), $torch_spec."
  echo
  echo "| step | wall time | CPU time (user + sys) |"
  echo "|---|---|---|"
  printf '%s\n' "${rows[@]}"
  echo
  echo "pytest: ${summary:-no summary line (see the log)}"
} > "$out/timeline.md"
cat "$out/timeline.md"
