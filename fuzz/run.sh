#!/usr/bin/env bash
# Runs the libFuzzer targets of a COLCRYPT_FUZZ build (build-fuzz/).
#   fuzz/run.sh BUILD_DIR [SECONDS [TARGET...]]   each target SECONDS (default
#                                                 $FUZZ_SECONDS or 60), one after another
#   fuzz/run.sh --smoke BUILD_DIR                 every target for 3 s (ctest fuzz-smoke)
# Each run starts from the committed corpus (fuzz/corpus/TARGET) and the
# regression inputs (fuzz/regressions/TARGET), keeps what it finds in a
# scratch corpus, and saves a crashing input as fuzz/crashes/TARGET-*. Any
# crash, leak, UBSan report or property failure fails the run. Prints each
# target's executions per second and coverage (edges, libFuzzer's cov:).
set -euo pipefail

src=$(cd "$(dirname "$0")/.." && pwd)
smoke=0
if [ "${1:-}" = --smoke ]; then
  smoke=1
  shift
fi
build=${1:?usage: fuzz/run.sh [--smoke] BUILD_DIR [SECONDS [TARGET...]]}
shift
seconds=${FUZZ_SECONDS:-60}
if [ $# -gt 0 ]; then
  seconds=$1
  shift
fi
[ "$smoke" -eq 0 ] || seconds=3
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(envelope deterministic text recv wire store audit)

# The store and audit targets write and fsync files on every input: on a
# busy disk that is a few executions per second, on tmpfs thousands.
if [ -z "${TMPDIR:-}" ] && [ -d /dev/shm ] && [ -w /dev/shm ]; then
  export TMPDIR=/dev/shm
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/colcrypt-fuzz-run.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$src/fuzz/crashes"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

failed=0
summary=()
for t in "${targets[@]}"; do
  bin=$build/fuzz/colcrypt-fuzz-$t
  [ -x "$bin" ] || { echo "fuzz: $bin is missing (build with -DCOLCRYPT_FUZZ=ON)" >&2; exit 1; }
  mkdir -p "$work/$t" "$src/fuzz/regressions/$t"
  log=$work/$t.log
  echo "==> fuzz $t for ${seconds}s"
  rc=0
  "$bin" -max_total_time="$seconds" -timeout=10 -print_final_stats=1 \
    -artifact_prefix="$src/fuzz/crashes/$t-" \
    "$work/$t" "$src/fuzz/corpus/$t" "$src/fuzz/regressions/$t" >"$log" 2>&1 || rc=$?
  # libFuzzer's last status line: "#N  DONE  cov: E ft: F corp: ... exec/s: R ..."
  status=$(grep -E '^#[0-9]+' "$log" | tail -n 1 || true)
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  rate=$(sed -n 's/.*exec\/s: \([0-9]*\).*/\1/p' <<<"$status")
  cov=$(sed -n 's/.*cov: \([0-9]*\).*/\1/p' <<<"$status")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$status")
  if [ "$rc" -ne 0 ]; then
    failed=1
    echo "fuzz: $t FAILED (exit $rc); the input is in fuzz/crashes/; log:" >&2
    grep -v -E '^colcrypt-keyd: ' "$log" | tail -n 60 >&2
  fi
  summary+=("$(printf '%-14s %8ss %12s %10s %8s %8s  %s' "$t" "$seconds" "${execs:-?}" \
    "${rate:-?}" "${cov:-?}" "${ft:-?}" "$([ "$rc" -eq 0 ] && echo ok || echo FAILED)")")
done

printf '\n%-14s %9s %12s %10s %8s %8s  %s\n' target time execs exec/s edges features result
printf '%s\n' "${summary[@]}"
exit "$failed"
