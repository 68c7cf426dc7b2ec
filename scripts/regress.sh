#!/usr/bin/env bash
# pg_regress (`make installcheck`) against a throwaway sandbox: a private
# cluster and a keyd with a fresh store holding the keys the tests use.
# Called by ctest: scripts/regress.sh KEYD_BIN KEYCTL_BIN
# The extension must already be installed (scripts/test.sh does `make install`).
set -euo pipefail

[ $# -eq 2 ] || { echo "usage: $0 KEYD_BIN KEYCTL_BIN" >&2; exit 2; }
export COLCRYPT_KEYD=$1 COLCRYPT_KEYCTL=$2
export COLCRYPT_FAST_KDF=1
src=$(cd "$(dirname "$0")/.." && pwd)
sandbox=$src/scripts/sandbox.sh
dir=$(mktemp -d /tmp/colcrypt-regress.XXXXXX)
port=$((55000 + RANDOM % 1000))

finish() {
  local rc=$?
  if [ $rc -ne 0 ]; then
    echo "regress: FAILED (exit $rc)" >&2
    if [ -s "$src/regression.diffs" ]; then
      echo "--- regression.diffs ---" >&2
      head -n 300 "$src/regression.diffs" >&2
    fi
    for log in "$dir/postgres.log" "$dir/keyd.log"; do
      [ -s "$log" ] && { echo "--- last 40 lines of $log ---" >&2; tail -n 40 "$log" >&2; }
    done
  fi
  "$sandbox" destroy "$dir" >/dev/null 2>&1 || echo "regress: could not remove $dir" >&2
  exit $rc
}
trap finish EXIT

"$sandbox" up "$dir" "$port"
eval "$("$sandbox" env "$dir")"
for key in regress_key regress_other; do
  "$COLCRYPT_KEYCTL" --socket "$COLCRYPT_KEYD_SOCKET" create "$key" >/dev/null
done

rm -f "$src/regression.diffs" "$src/regression.out"
make -C "$src" --no-print-directory installcheck
