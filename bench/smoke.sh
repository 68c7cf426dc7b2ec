#!/usr/bin/env bash
# A tiny run of the whole benchmark (ctest: bench-smoke), so that it cannot
# rot: every workload runs on a few rows and the report must come out with
# every figure present. Timings are not checked: on a few rows and a loaded
# machine a ratio may come out negative or absurd, and that is reported, not
# failed. What fails is breakage: a value that does not decrypt to its source
# (bench/run.sh checks every row), a crash, an error, a missing figure.
#   bench/smoke.sh KEYD_BIN KEYCTL_BIN CORE_BENCH_BIN KEYD_BENCH_BIN KEYCACHE_BENCH_BIN
# The extension must already be installed (scripts/test.sh does `make install`).
set -euo pipefail

[ $# -eq 5 ] || { echo "usage: $0 KEYD_BIN KEYCTL_BIN CORE_BENCH_BIN KEYD_BENCH_BIN KEYCACHE_BENCH_BIN" >&2; exit 2; }
src=$(cd "$(dirname "$0")/.." && pwd)
dir=$(mktemp -d /tmp/colcrypt-bench-smoke.XXXXXX)
chmod 0755 "$dir"  # postgres must reach the sandbox inside it
trap 'rm -rf "$dir"' EXIT

BENCH_SKIP_BUILD=1 COLCRYPT_KEYD=$1 COLCRYPT_KEYCTL=$2 BENCH_CORE_BIN=$3 BENCH_KEYD_BIN=$4 BENCH_KEYCACHE_BIN=$5 \
  BENCH_DIR=$dir/work BENCH_PORT=$((56000 + RANDOM % 1000)) \
  BENCH_OUT=$dir/RESULTS.md BENCH_CHART=$dir/results.png \
  BENCH_SHORT_ROWS=2000 BENCH_LONG_ROWS=300 BENCH_PGP_ROWS=20 BENCH_REPS=1 \
  BENCH_PGBENCH_SECONDS=1 BENCH_PGBENCH_CLIENTS=2 BENCH_KEYD_CLIENTS=8 BENCH_KEYD_REQUESTS=5 \
  BENCH_CORE_MIN_TIME=0.01 BENCH_READ_REPS=2 BENCH_CALLGRIND_FEW=2 BENCH_CALLGRIND_MANY=6 \
  BENCH_KEYD_LOW_CLIENTS=2 BENCH_KEYD_FETCHES=100 BENCH_KEYD_RATE=1000 BENCH_KEYD_OPEN_SECONDS=1 \
  BENCH_SCALE_ROWS="500 1000" BENCH_MEM_KEYS="1 5" BENCH_MEM_TOOL_KEYS="1 5" \
  "$src/bench/run.sh"

fail() { echo "bench-smoke: $*" >&2; exit 1; }
[ -s "$dir/RESULTS.md" ] || fail "no report written"
[ -s "$dir/results.png" ] || fail "no chart written"
[ "$(head -c 4 "$dir/results.png" | od -An -tx1 | tr -d ' \n')" = 89504e47 ] || fail "the chart is not a PNG"
# Every target row has a number and a verdict; nothing came out empty or NaN.
# Counted in the "## Targets" section only (ANALYSIS.md, appended, has tables too).
targets=$(awk '/^## /{in_targets = ($0 == "## Targets")} in_targets' "$dir/RESULTS.md" |
  grep -cE '^\| .* \| -?[0-9.]+(×| ms|× faster| %) .*\| (met|\*\*missed\*\*) \|$' || true)
[ "$targets" -eq 20 ] || fail "expected 20 target rows with figures, found $targets"
! grep -qiE '\b(nan|inf)\b|\?\s*\|' "$dir/RESULTS.md" || fail "the report holds NaN, inf or unknown fields"
for section in "Bulk encrypt" "Scan and decrypt" "Point reads" "Point reads, instructions" "Re-encryption" \
  "keyd cold key fetch" "Scale" "Backend key cache memory" "Core"; do
  grep -q "^## $section" "$dir/RESULTS.md" || fail "section '$section' missing"
done
echo "bench-smoke: report complete ($targets targets)"
