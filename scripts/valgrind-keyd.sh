#!/usr/bin/env bash
# Valgrind memcheck of colcrypt-keyd serving a short scripted session: keys
# created, fetched (primary and by version, kept and new connections),
# rotated, admin requests (list, show, status, audit verify), a clean
# shutdown. Passes when memcheck reports 0 errors and 0 bytes definitely
# lost. Needs no Postgres (keyd runs without --database).
#   scripts/valgrind-keyd.sh BUILD_DIR   (a normal build: not an ASan one)
set -euo pipefail

build=${1:?usage: $0 BUILD_DIR}
keyd=$build/colcrypt-keyd
keyctl=$build/colcrypt-keyctl
fetch=$build/colcrypt-bench-keyd
for b in "$keyd" "$keyctl" "$fetch"; do [ -x "$b" ] || { echo "valgrind-keyd: $b is missing" >&2; exit 1; }; done
command -v valgrind >/dev/null || { echo "valgrind-keyd: valgrind is not installed" >&2; exit 1; }

dir=$(mktemp -d "${TMPDIR:-/tmp}/colcrypt-valgrind.XXXXXX")
pid=
finish() {
  local rc=$?
  [ -z "$pid" ] || kill -KILL "$pid" 2>/dev/null || true
  if [ $rc -ne 0 ]; then
    for f in "$dir/keyd.log" "$dir/valgrind.log"; do
      [ -s "$f" ] && { echo "--- last 60 lines of $f ---" >&2; tail -n 60 "$f" >&2; }
    done
  fi
  rm -rf "$dir"
  exit $rc
}
trap finish EXIT

(umask 077 && echo valgrind-session-password >"$dir/password")
sock=$dir/keyd.sock
start=$(date +%s)
valgrind --tool=memcheck --leak-check=full --show-leak-kinds=definite \
  --errors-for-leak-kinds=definite --error-exitcode=99 --track-fds=no \
  --log-file="$dir/valgrind.log" \
  "$keyd" --store "$dir/store" --socket "$sock" --allow-uid "$(id -u)" --admin-uid "$(id -u)" \
  --password-file "$dir/password" --insecure-fast-kdf --pbkdf2-iterations 1000 \
  </dev/null >"$dir/keyd.log" 2>&1 &
pid=$!
for _ in $(seq 1 1200); do
  grep -q 'colcrypt-keyd: INFO: ready' "$dir/keyd.log" 2>/dev/null && break
  kill -0 "$pid" 2>/dev/null || { echo "valgrind-keyd: keyd exited during startup" >&2; exit 1; }
  sleep 0.1
done
grep -q 'colcrypt-keyd: INFO: ready' "$dir/keyd.log" || { echo "valgrind-keyd: keyd not ready" >&2; exit 1; }

ctl() { "$keyctl" --socket "$sock" "$@" >/dev/null; }
ctl create customer_data
ctl create payroll
ctl list
ctl show customer_data
"$fetch" "$sock" customer_data 2 25 primary kept >/dev/null
"$fetch" "$sock" customer_data 2 10 version new >/dev/null
ctl rotate customer_data
"$fetch" "$sock" customer_data 2 25 primary kept >/dev/null
"$fetch" "$sock" payroll 1 10 primary new >/dev/null
ctl status
ctl jobs
ctl audit verify
# A fetch of a key that does not exist: a failure reply.
if "$fetch" "$sock" no_such_key 1 1 primary kept >/dev/null 2>&1; then
  echo "valgrind-keyd: a fetch of a missing key succeeded" >&2
  exit 1
fi

kill -TERM "$pid"
rc=0
wait "$pid" || rc=$?
pid=
elapsed=$(($(date +%s) - start))
errors=$(sed -n 's/.*ERROR SUMMARY: \([0-9]*\) errors.*/\1/p' "$dir/valgrind.log" | tail -n 1)
definitely=$(sed -n 's/.*definitely lost: \([0-9,]*\) bytes.*/\1/p' "$dir/valgrind.log" | tail -n 1)
definitely=${definitely:-0}
echo "valgrind-keyd: keyd exit $rc, memcheck errors ${errors:-?}, definitely lost ${definitely} bytes, session ${elapsed}s"
grep -E 'total heap usage|in use at exit|definitely lost|indirectly lost|possibly lost|ERROR SUMMARY' "$dir/valgrind.log" | sed 's/^==[0-9]*== /  /'
[ "$rc" -eq 0 ] && [ "${errors:-1}" = 0 ] && [ "${definitely//,/}" = 0 ]
