#!/usr/bin/env bash
# ctest `systemd-unit`: `systemd-analyze verify` of keyd/colcrypt-keyd.service
# (any complaint fails) and its exposure score from `systemd-analyze security
# --offline=yes`, which must be 2.0 or below. ExecStart points at KEYD_BIN, so
# that verify finds the binary without an install. Exit 77 (skipped) only when
# systemd-analyze is absent.
#   scripts/unit-check.sh KEYD_BIN
set -euo pipefail

[ $# -eq 1 ] || { echo "usage: $0 KEYD_BIN" >&2; exit 2; }
keyd=$(readlink -f "$1")
src=$(cd "$(dirname "$0")/.." && pwd)
max_exposure=2.0

command -v systemd-analyze >/dev/null ||
  { echo "unit-check: systemd-analyze not installed: skipped" >&2; exit 77; }
[ -x "$keyd" ] || { echo "unit-check: no executable $keyd" >&2; exit 1; }

dir=$(mktemp -d /tmp/colcrypt-unit.XXXXXX)
trap 'rm -rf "$dir"' EXIT
unit=$dir/colcrypt-keyd.service
sed "s|/usr/local/bin/colcrypt-keyd|$keyd|" "$src/keyd/colcrypt-keyd.service" >"$unit"
grep -q "^ExecStart=$keyd " "$unit" || { echo "unit-check: no ExecStart=/usr/local/bin/colcrypt-keyd in the unit" >&2; exit 1; }

# verify exits 0 on some warnings (an unknown setting, a bad value): any output
# fails. --man=no: the manual pages come with the package (deb-test checks them).
if ! out=$(cd "$dir" && systemd-analyze verify --man=no "$unit" 2>&1) || [ -n "$out" ]; then
  printf 'unit-check: systemd-analyze verify complains:\n%s\n' "$out" >&2
  exit 1
fi
echo "unit-check: systemd-analyze verify: no complaint"

report=$(cd "$dir" && systemd-analyze security --offline=yes --no-pager "$unit" 2>&1) || true
score=$(printf '%s\n' "$report" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\) .*/\1/p')
[ -n "$score" ] || { printf 'unit-check: no exposure level in:\n%s\n' "$report" >&2; exit 1; }
printf '%s\n' "$report" | grep '✗' || true
echo "unit-check: exposure level $score (goal: $max_exposure or below)"
awk -v s="$score" -v m="$max_exposure" 'BEGIN { exit !(s <= m) }' ||
  { echo "unit-check: exposure $score is above $max_exposure" >&2; exit 1; }
