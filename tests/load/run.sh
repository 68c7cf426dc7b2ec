#!/usr/bin/env bash
# keyd under hostile and heavy load, and Postgres sessions while keyd is
# killed and restarted (issue 10; docs/reliability.md has the figures).
#
#   tests/load/run.sh KEYD KEYCTL LOAD_KEYD_BIN LOAD_PG_BIN [SECONDS [PG_SECONDS]]
#
# `make load` runs it for 60 s each; ctest's load-smoke for a few seconds.
# 1. keyd alone (sandbox.sh keyd-start, --max-connections 1100):
#    colcrypt-load-keyd holds 992 hostile connections (half slow, the rest
#    oversized frames, garbage, half frames) while 8 clients fetch.
# 2. a cluster and keyd (sandbox.sh up): colcrypt-load-pg runs 32 sessions
#    encrypting and decrypting while keyd is killed and started every 3 s;
#    then the server log must hold no "terminated by signal".
# The Postgres part uses the installed extension (on a shared machine, hold
# the install lock). Runs as root. Exits 1 when a part fails its checks.
# Environment: LOAD_HOSTILE (992), LOAD_CLIENTS (8), LOAD_SESSIONS (32),
# LOAD_PORT (random), LOAD_KEEP=1 keeps the work directory, PG_BIN (the
# Postgres binaries, default /usr/lib/postgresql/15/bin; also sandbox.sh's).
set -euo pipefail

[ $# -ge 4 ] && [ $# -le 6 ] || {
  echo "usage: $0 KEYD KEYCTL LOAD_KEYD_BIN LOAD_PG_BIN [SECONDS [PG_SECONDS]]" >&2
  exit 2
}
src=$(cd "$(dirname "$0")/../.." && pwd)
sandbox=$src/scripts/sandbox.sh
export COLCRYPT_KEYD=$1 COLCRYPT_KEYCTL=$2 COLCRYPT_FAST_KDF=1
load_keyd=$3
load_pg=$4
seconds=${5:-60}
pg_seconds=${6:-$seconds}
hostile=${LOAD_HOSTILE:-992}
clients=${LOAD_CLIENTS:-8}
sessions=${LOAD_SESSIONS:-32}
port=${LOAD_PORT:-$((57000 + RANDOM % 1000))}
unset ENCRYPTION_MASTER_PASSWORD SANDBOX_KEYD_ARGS SANDBOX_KEYD_ALLOW_UID
[ "$(id -u)" -eq 0 ] || { echo "load: run as root" >&2; exit 1; }

dir=$(mktemp -d /tmp/colcrypt-load.XXXXXX)
chmod 0755 "$dir"  # postgres must reach the sandbox inside it
cleanup() {
  local rc=$?
  if [ $rc -ne 0 ]; then
    for log in "$dir"/*/keyd.log "$dir"/pg/postgres.log; do
      [ -s "$log" ] && { echo "--- last 20 lines of $log ---" >&2; tail -n 20 "$log" >&2; }
    done
  fi
  for box in "$dir/keyd" "$dir/pg"; do "$sandbox" destroy "$box" >/dev/null 2>&1 || true; done
  [ "${LOAD_KEEP:-0}" = 1 ] || rm -rf "$dir"
  exit $rc
}
trap cleanup EXIT
say() { printf '\n==> %s\n' "$*"; }
rc=0

say "machine: $(nproc) cores, $(uptime | sed 's/.*load average/load average/')"

say "keyd: $hostile hostile connections and $clients well-behaved clients for ${seconds}s"
# The load program fetches as root: root is on the fetch allowlist here.
SANDBOX_KEYD_ALLOW_UID=0 SANDBOX_KEYD_ARGS="--max-connections 1100 --max-uses-per-version 2147483648" \
  "$sandbox" keyd-start "$dir/keyd" >/dev/null
"$COLCRYPT_KEYCTL" --socket "$dir/keyd/run/keyd.sock" create load_key >/dev/null
"$load_keyd" "$dir/keyd/run/keyd.sock" load_key "$(cat "$dir/keyd/keyd.pid")" "$seconds" \
  "$hostile" "$clients" || { echo "load: keyd part FAILED" >&2; rc=1; }
"$sandbox" keyd-stop "$dir/keyd" >/dev/null
echo "keyd_log_errors=$(grep -c ': ERROR: ' "$dir/keyd/keyd.log" || true)"

say "postgres: $sessions sessions for ${pg_seconds}s, keyd killed and started every 3 s"
"$sandbox" up "$dir/pg" "$port" >/dev/null
eval "$("$sandbox" env "$dir/pg")"
"$COLCRYPT_KEYCTL" --socket "$COLCRYPT_KEYD_SOCKET" create load_key >/dev/null
"${PG_BIN:-/usr/lib/postgresql/15/bin}/psql" -X -q -v ON_ERROR_STOP=1 -d postgres <<'SQL'
CREATE EXTENSION colcrypt;
CREATE TABLE load_values (id int PRIMARY KEY, plain text NOT NULL,
                          v colcrypt.encrypted('load_key') NOT NULL);
INSERT INTO load_values SELECT i, 'stored-' || i, 'stored-' || i FROM generate_series(1, 100) i;
SQL
conninfo="host=$PGHOST port=$PGPORT user=postgres dbname=postgres"
"$load_pg" "$conninfo" load_key "$pg_seconds" "$sessions" \
  "'$sandbox' keyd-kill '$dir/pg' >/dev/null" "'$sandbox' keyd-start '$dir/pg' >/dev/null" ||
  { echo "load: postgres part FAILED" >&2; rc=1; }
crashes=$(grep -c 'terminated by signal' "$dir/pg/postgres.log" || true)
echo "backend_crashes=$crashes"
[ "$crashes" -eq 0 ] || { grep 'terminated by signal' "$dir/pg/postgres.log" >&2; rc=1; }

say "machine after: $(uptime | sed 's/.*load average/load average/')"
exit $rc
