#!/usr/bin/env bash
# The colcrypt benchmark (`make bench`): builds, installs the extension into
# the Postgres named by PG_CONFIG, starts its own cluster and keyd
# (scripts/sandbox.sh), runs every workload against its baselines in the same
# run, and writes bench/RESULTS.md and bench/results.png (bench/report.sh).
# Every figure is the median of BENCH_REPS repetitions; every comparison is a
# ratio of two figures measured in this run, repetitions interleaved.
#
# Run as root (sandbox.sh starts postgres as the postgres user).
# Environment (defaults in brackets):
#   PG_CONFIG [pg_config]  PG_BIN [$(PG_CONFIG --bindir)]
#   BENCH_SHORT_ROWS [1000000]   rows of 9-character SSN-like values
#   BENCH_LONG_ROWS [100000]     rows of 1 KB values
#   BENCH_PGP_ROWS [2000]        rows for pgp_sym_encrypt/decrypt, scaled up
#   BENCH_REPS [3]               repetitions of every measurement
#   BENCH_PGBENCH_SECONDS [8]    length of one pgbench run
#   BENCH_PGBENCH_CLIENTS [8]    pgbench clients (point reads and writes)
#   BENCH_KEYD_CLIENTS [64]      concurrent keyd clients
#   BENCH_KEYD_REQUESTS [50]     cold fetches per keyd client and repetition
#   BENCH_CORE_MIN_TIME [0.2]    seconds per Google Benchmark measurement
#   BENCH_KEYD_MAX_USES [268435456]  encryptions per key version before keyd
#                                rotates (ENCRYPTION_MAX_USES_PER_VERSION for the sandbox
#                                keyd). The default is docs/rotation.md's production value,
#                                2^28, not keyd's demo default of 10,000, which would rotate
#                                the key ~100 times in a 1,000,000-row load
#   BENCH_DIR [/tmp/colcrypt-bench]   scratch directory (the sandbox lives in it)
#   BENCH_PORT [54391]
#   BENCH_OUT [bench/RESULTS.md]  BENCH_CHART [bench/results.png]
#   CMAKE_BUILD_DIR [build]
#   BENCH_SKIP_BUILD=1  use prebuilt binaries and the installed extension:
#     COLCRYPT_KEYD, COLCRYPT_KEYCTL, BENCH_CORE_BIN, BENCH_KEYD_BIN (bench/smoke.sh)
set -euo pipefail

src=$(cd "$(dirname "$0")/.." && pwd)
PG_CONFIG=${PG_CONFIG:-pg_config}
PG_BIN=${PG_BIN:-$("$PG_CONFIG" --bindir)}
SHORT_ROWS=${BENCH_SHORT_ROWS:-1000000}
LONG_ROWS=${BENCH_LONG_ROWS:-100000}
PGP_ROWS=${BENCH_PGP_ROWS:-2000}
REPS=${BENCH_REPS:-3}
PGB_SECONDS=${BENCH_PGBENCH_SECONDS:-8}
PGB_CLIENTS=${BENCH_PGBENCH_CLIENTS:-8}
KEYD_CLIENTS=${BENCH_KEYD_CLIENTS:-64}
KEYD_REQUESTS=${BENCH_KEYD_REQUESTS:-50}
KEYD_MAX_USES=${BENCH_KEYD_MAX_USES:-268435456}
CORE_MIN_TIME=${BENCH_CORE_MIN_TIME:-0.2}
WORK=${BENCH_DIR:-/tmp/colcrypt-bench}
PORT=${BENCH_PORT:-54391}
OUT=${BENCH_OUT:-$src/bench/RESULTS.md}
CHART=${BENCH_CHART:-$src/bench/results.png}
build=${CMAKE_BUILD_DIR:-build}
case $build in /*) ;; *) build=$src/$build ;; esac

sandbox=$src/scripts/sandbox.sh
box=$WORK/sandbox
raw=$WORK/raw.tsv
meta=$WORK/meta.tsv
KEY=bench_key
PGC_KEY="'\\x000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f'::bytea"

say() { printf '\n==> %s\n' "$*"; }
die() { printf 'bench: error: %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "run as root (sudo make bench): the sandbox starts postgres as the postgres user"
for n in "$SHORT_ROWS" "$LONG_ROWS" "$PGP_ROWS" "$REPS" "$PGB_SECONDS" "$PGB_CLIENTS" \
  "$KEYD_CLIENTS" "$KEYD_REQUESTS" "$KEYD_MAX_USES"; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || die "sizes must be positive integers (got '$n')"
done
started_at=$(date -u +%s)

# ------------------------------------------------------------------ build

if [ "${BENCH_SKIP_BUILD:-0}" = 1 ]; then
  : "${COLCRYPT_KEYD:?}" "${COLCRYPT_KEYCTL:?}" "${BENCH_CORE_BIN:?}" "${BENCH_KEYD_BIN:?}"
  core_bin=$BENCH_CORE_BIN
  keyd_bench_bin=$BENCH_KEYD_BIN
else
  say "build and install the extension into $("$PG_CONFIG" --pkglibdir); build keyd and the benchmarks"
  jobs=$(nproc 2>/dev/null || echo 2)
  make -C "$src" --no-print-directory -j"$jobs" PG_CONFIG="$PG_CONFIG"
  # PREFIX: keyd and keyctl go to a scratch directory, not /usr/local.
  make -C "$src" --no-print-directory PG_CONFIG="$PG_CONFIG" CMAKE_BUILD_DIR="$build" \
    PREFIX="$WORK/prefix" install
  cmake --build "$build" -j"$jobs" --target colcrypt-keyd colcrypt-keyctl colcrypt-bench-keyd
  cmake --build "$build" -j"$jobs" --target colcrypt-bench-core ||
    die "colcrypt-bench-core was not built: install libbenchmark-dev (scripts/install-deps.sh)"
  export COLCRYPT_KEYD=$build/colcrypt-keyd COLCRYPT_KEYCTL=$build/colcrypt-keyctl
  core_bin=$build/colcrypt-bench-core
  keyd_bench_bin=$build/colcrypt-bench-keyd
fi
command -v gnuplot >/dev/null || die "gnuplot is missing: apt-get install gnuplot-nox (scripts/install-deps.sh)"

# ------------------------------------------------------------------ sandbox

say "sandbox in $box (port $PORT)"
[ ! -e "$box" ] || "$sandbox" destroy "$box" >/dev/null
mkdir -p "$WORK"
chmod 0755 "$WORK"
rm -f "$raw" "$meta"
export COLCRYPT_FAST_KDF=1 PG_BIN
export ENCRYPTION_MAX_USES_PER_VERSION=$KEYD_MAX_USES
cleanup() {
  local rc=$?
  if [ $rc -ne 0 ]; then
    for log in "$box/postgres.log" "$box/keyd.log"; do
      [ -s "$log" ] && { echo "--- last 20 lines of $log ---" >&2; tail -n 20 "$log" >&2; }
    done
  fi
  "$sandbox" destroy "$box" >/dev/null 2>&1 || echo "bench: could not remove $box" >&2
  exit $rc
}
trap cleanup EXIT
"$sandbox" up "$box" "$PORT" >/dev/null
eval "$("$sandbox" env "$box")"
cat >>"$box/data/postgresql.conf" <<'CONF'
# --- colcrypt benchmark ---
shared_buffers = 1GB
jit = off
max_parallel_workers_per_gather = 0
max_connections = 100
autovacuum = off
CONF
"$sandbox" pg-restart "$box" >/dev/null
"$COLCRYPT_KEYCTL" --socket "$COLCRYPT_KEYD_SOCKET" create "$KEY" >/dev/null

psql_q() { "$PG_BIN/psql" -X -q -At -v ON_ERROR_STOP=1 -d postgres "$@"; }
record() { printf '%s\t%s\n' "$1" "$2" >>"$raw"; }
note() { printf '%s\t%s\n' "$1" "$2" >>"$meta"; }

# Runs SQL (setup statements first, the measured statement last) in a fresh
# session and prints the last statement's time in ms. A fresh session means
# a cold key cache: the measured statement pays its key fetches.
time_sql() {
  local out
  out=$(printf '\\timing on\n%s\n' "$1" | psql_q 2>&1) || { printf '%s\n' "$out" >&2; die "SQL failed"; }
  printf '%s\n' "$out" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' | tail -n 1
}

# time_sql, scaled by a factor (for workloads run on fewer rows).
time_sql_scaled() {  # factor sql
  local ms
  ms=$(time_sql "$2")
  awk -v ms="$ms" -v f="$1" 'BEGIN { printf "%.3f", ms * f }'
}

psql_q -c "CREATE EXTENSION colcrypt; CREATE EXTENSION pgcrypto;"

note machine "$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n 1), $(nproc) CPUs, $(free -g | awk '/^Mem:/ {print $2}') GB RAM"
note kernel "$(uname -sr)"
note postgres "$(psql_q -c 'SHOW server_version')"
note pg_config "$("$PG_CONFIG" --pkglibdir)"
note openssl "$(openssl version 2>/dev/null || echo unknown)"
note compiler "$(${CXX:-c++} --version 2>/dev/null | head -n 1)"
note commit "$(git -C "$src" rev-parse --short HEAD 2>/dev/null || echo none)$(git -C "$src" diff --quiet HEAD 2>/dev/null || echo ' + uncommitted changes')"
note load_start "$(cut -d' ' -f1-3 /proc/loadavg)"
note started "$(date -u '+%Y-%m-%d %H:%M UTC')"
note command "$(printf '%s ' PG_CONFIG="$PG_CONFIG" BENCH_SHORT_ROWS="$SHORT_ROWS" BENCH_LONG_ROWS="$LONG_ROWS" BENCH_PGP_ROWS="$PGP_ROWS" BENCH_REPS="$REPS" BENCH_PGBENCH_SECONDS="$PGB_SECONDS" BENCH_PGBENCH_CLIENTS="$PGB_CLIENTS" BENCH_KEYD_CLIENTS="$KEYD_CLIENTS" BENCH_KEYD_REQUESTS="$KEYD_REQUESTS" BENCH_KEYD_MAX_USES="$KEYD_MAX_USES")make bench"
note pgp_rows "$PGP_ROWS"
note keyd_clients "$KEYD_CLIENTS"
note keyd_max_uses "$KEYD_MAX_USES$([ "$KEYD_MAX_USES" = 268435456 ] && echo ' (2^28, the production value of docs/rotation.md; BENCH_KEYD_MAX_USES)')"
note sizes "short=$SHORT_ROWS long=$LONG_ROWS pgp=$PGP_ROWS reps=$REPS pgbench=${PGB_SECONDS}s/${PGB_CLIENTS}c keyd=${KEYD_CLIENTS}x${KEYD_REQUESTS}"

# ------------------------------------------------------------------ data

say "source data: $SHORT_ROWS short values, $LONG_ROWS values of 1 KB"
psql_q <<SQL
CREATE TABLE src_short AS
  SELECT i AS id, lpad(((i::bigint * 7919 + 12345) % 1000000000)::text, 9, '0') AS v
  FROM generate_series(1, $SHORT_ROWS) i;
CREATE TABLE src_long AS
  SELECT i AS id, repeat(md5(i::text), 32) AS v FROM generate_series(1, $LONG_ROWS) i;
VACUUM ANALYZE src_short, src_long;
SQL

rows_of() { if [ "$1" = short ]; then echo "$SHORT_ROWS"; else echo "$LONG_ROWS"; fi; }
pgp_rows_of() { local n; n=$(rows_of "$1"); [ "$PGP_ROWS" -lt "$n" ] && echo "$PGP_ROWS" || echo "$n"; }

# ------------------------------------------------------------------ bulk encrypt

# The statements differ only in the expression stored. pgcrypto's encrypt_iv
# variant stores the IV with the ciphertext, as colcrypt's envelope does.
bulk_sql() {  # variant dataset -> the SELECT list
  case $1 in
    plain) echo "SELECT id, v AS c FROM src_$2" ;;
    colcrypt) echo "SELECT id, colcrypt.encrypt_field(v, '$KEY') AS c FROM src_$2" ;;
    sealed_copy) echo "SELECT id, c FROM t_colcrypt_$2" ;;
    pgc_encrypt) echo "SELECT id, encrypt(convert_to(v, 'UTF8'), $PGC_KEY, 'aes') AS c FROM src_$2" ;;
    pgc_encrypt_iv) echo "SELECT id, iv || encrypt_iv(convert_to(v, 'UTF8'), $PGC_KEY, iv, 'aes') AS c FROM (SELECT id, v, gen_random_bytes(16) AS iv FROM src_$2) s" ;;
    pgp) echo "SELECT id, pgp_sym_encrypt(v, 'bench-password') AS c FROM src_$2 WHERE id <= $(pgp_rows_of "$2")" ;;
  esac
}
# sealed_copy stores the envelopes the colcrypt variant made, without
# computing them: what storing values of that size costs, the floor below
# which no encryption with a stored header can go.
bulk_variants="plain colcrypt sealed_copy pgc_encrypt pgc_encrypt_iv pgp"

for ds in short long; do
  say "bulk encrypt, $ds values ($REPS repetitions)"
  pgp_factor=$(awk -v a="$(rows_of $ds)" -v b="$(pgp_rows_of $ds)" 'BEGIN { printf "%.6f", a / b }')
  for rep in $(seq "$REPS"); do
    for v in $bulk_variants; do
      sql="DROP TABLE IF EXISTS t_${v}_$ds; CREATE TABLE t_${v}_$ds AS $(bulk_sql $v $ds);"
      if [ $v = pgp ]; then ms=$(time_sql_scaled "$pgp_factor" "$sql"); else ms=$(time_sql "$sql"); fi
      record "bulk.$ds.$v" "$ms"
      printf '  rep %s %-16s %10.1f ms\n' "$rep" "$v" "$ms"
    done
  done
  psql_q -c "ALTER TABLE t_plain_$ds ADD PRIMARY KEY (id); ALTER TABLE t_colcrypt_$ds ADD PRIMARY KEY (id);"
  for v in $bulk_variants; do
    psql_q -c "ALTER TABLE t_${v}_$ds SET (parallel_workers = 2)" -c "VACUUM ANALYZE t_${v}_$ds"
  done
done

versions_after_bulk=$(psql_q -c "SELECT count(DISTINCT colcrypt.key_version(c)) FROM t_colcrypt_short")

# ------------------------------------------------------------------ scan and decrypt

scan_sql() {  # variant dataset
  case $1 in
    plain) echo "SELECT sum(length(c)) FROM t_plain_$2" ;;
    colcrypt) echo "SELECT sum(length(colcrypt.decrypt_field(c))) FROM t_colcrypt_$2" ;;
    pgc_decrypt) echo "SELECT sum(length(convert_from(decrypt(c, $PGC_KEY, 'aes'), 'UTF8'))) FROM t_pgc_encrypt_$2" ;;
    pgc_decrypt_iv) echo "SELECT sum(length(convert_from(decrypt_iv(substring(c FROM 17), $PGC_KEY, substring(c FOR 16), 'aes'), 'UTF8'))) FROM t_pgc_encrypt_iv_$2" ;;
    pgp) echo "SELECT sum(length(pgp_sym_decrypt(c, 'bench-password'))) FROM t_pgp_$2" ;;
  esac
}
serial_settings="SET max_parallel_workers_per_gather = 0;"
parallel_settings="SET max_parallel_workers_per_gather = 2; SET parallel_setup_cost = 0; SET parallel_tuple_cost = 0; SET min_parallel_table_scan_size = 0;"

plan=$(printf '%s\nEXPLAIN %s;\n' "$parallel_settings" "$(scan_sql colcrypt short)" | psql_q)
note parallel_plan "$(printf '%s\n' "$plan" | grep -o 'Workers Planned: [0-9]*' | head -n 1 || echo 'no parallel plan')"

for ds in short long; do
  pgp_factor=$(awk -v a="$(rows_of $ds)" -v b="$(pgp_rows_of $ds)" 'BEGIN { printf "%.6f", a / b }')
  for mode in serial par2; do
    say "scan and decrypt, $ds values, $mode ($REPS repetitions)"
    if [ $mode = serial ]; then settings=$serial_settings; else settings=$parallel_settings; fi
    for rep in $(seq "$REPS"); do
      for v in plain colcrypt pgc_decrypt pgc_decrypt_iv pgp; do
        sql="$settings $(scan_sql $v $ds);"
        if [ $v = pgp ]; then ms=$(time_sql_scaled "$pgp_factor" "$sql"); else ms=$(time_sql "$sql"); fi
        record "scan.$ds.$mode.$v" "$ms"
        printf '  rep %s %-16s %10.1f ms\n' "$rep" "$v" "$ms"
      done
    done
  done
done

# ------------------------------------------------------------------ pgbench

# pgbench connects as an application role, not as a superuser: superusers
# skip the per-key privilege check, which an application always pays.
PGB_ROLE=bench_app
pgb_dir=$WORK/pgbench
mkdir -p "$pgb_dir"
pgbench_tps() {  # script-file
  local out
  out=$("$PG_BIN/pgbench" -n -M prepared -U "$PGB_ROLE" -c "$PGB_CLIENTS" -j 2 -T "$PGB_SECONDS" -f "$1" postgres 2>&1) ||
    { printf '%s\n' "$out" >&2; die "pgbench failed"; }
  printf '%s\n' "$out" | sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p'
}
value_expr() {  # dataset -> SQL expression of :n
  if [ "$1" = short ]; then echo "lpad(:n::text, 9, '0')"; else echo "repeat(md5(:n::text), 32)"; fi
}

psql_q -c "CREATE ROLE $PGB_ROLE LOGIN IN ROLE colcrypt_user; SELECT colcrypt.grant_key('$KEY', '$PGB_ROLE', 'all');" >/dev/null
note pgbench_role "$PGB_ROLE (not a superuser: member of colcrypt_user, granted all on $KEY)"
for ds in short long; do
  rows=$(rows_of $ds)
  printf '\\set id random(1, %s)\nSELECT c FROM t_plain_%s WHERE id = :id;\n' "$rows" "$ds" >"$pgb_dir/read_plain_$ds.sql"
  printf '\\set id random(1, %s)\nSELECT colcrypt.decrypt_field(c) FROM t_colcrypt_%s WHERE id = :id;\n' "$rows" "$ds" >"$pgb_dir/read_colcrypt_$ds.sql"
  # The plaintext read through one built-in function call per row that returns
  # the value itself (nullif calls texteq): what calling any function in the
  # select list costs (executor set-up, EXECUTE check, the call), same reply.
  printf '\\set id random(1, %s)\nSELECT nullif(c, '"''"') FROM t_plain_%s WHERE id = :id;\n' "$rows" "$ds" >"$pgb_dir/read_plainfn_$ds.sql"
  printf '\\set n random(0, 999999999)\nINSERT INTO w_plain_%s (c) VALUES (%s);\n' "$ds" "$(value_expr $ds)" >"$pgb_dir/write_plain_$ds.sql"
  printf '\\set n random(0, 999999999)\nINSERT INTO w_colcrypt_%s (c) VALUES (colcrypt.encrypt_field(%s, '"'"'%s'"'"'));\n' "$ds" "$(value_expr $ds)" "$KEY" >"$pgb_dir/write_colcrypt_$ds.sql"
  psql_q -c "CREATE TABLE w_plain_$ds (id bigserial PRIMARY KEY, c text); CREATE TABLE w_colcrypt_$ds (id bigserial PRIMARY KEY, c colcrypt.encrypted);"
  psql_q -c "GRANT SELECT ON t_plain_$ds, t_colcrypt_$ds TO $PGB_ROLE; GRANT INSERT ON w_plain_$ds, w_colcrypt_$ds TO $PGB_ROLE; GRANT USAGE ON SEQUENCE w_plain_${ds}_id_seq, w_colcrypt_${ds}_id_seq TO $PGB_ROLE;"

  say "point reads, $ds values: pgbench ${PGB_CLIENTS} clients x ${PGB_SECONDS}s ($REPS repetitions)"
  for rep in $(seq "$REPS"); do
    for v in plain colcrypt plainfn; do
      tps=$(pgbench_tps "$pgb_dir/read_${v}_$ds.sql")
      record "reads.$ds.$v" "$tps"
      printf '  rep %s %-16s %10.1f tps\n' "$rep" "$v" "$tps"
    done
  done
  say "writes under load, $ds values: pgbench ${PGB_CLIENTS} clients x ${PGB_SECONDS}s ($REPS repetitions)"
  for rep in $(seq "$REPS"); do
    for v in plain colcrypt; do
      tps=$(pgbench_tps "$pgb_dir/write_${v}_$ds.sql")
      record "writes.$ds.$v" "$tps"
      printf '  rep %s %-16s %10.1f tps\n' "$rep" "$v" "$tps"
    done
  done
done

# ------------------------------------------------------------------ re-encryption

# colcrypt.rewrap() (the rotation jobs' re-encryption) when the extension has
# it; otherwise decrypt + encrypt under the new primary version, the closest
# statement available.
rewrap_expr="colcrypt.encrypt_field(colcrypt.decrypt_field(c), '$KEY')"
rewrap_mode="decrypt_field + encrypt_field (colcrypt.rewrap() not available)"
if [ "$(psql_q -c "SELECT count(*) FROM pg_proc WHERE proname = 'rewrap' AND pronamespace = 'colcrypt'::regnamespace")" != 0 ] &&
  psql_q -c "SELECT colcrypt.rewrap(c) FROM t_colcrypt_short LIMIT 1" >/dev/null 2>&1; then
  rewrap_expr="colcrypt.rewrap(c)"
  rewrap_mode="colcrypt.rewrap()"
fi
note rewrap_mode "$rewrap_mode"
for ds in short long; do
  say "re-encryption, $ds values: UPDATE ... SET c = $rewrap_expr vs SET c = c ($REPS repetitions)"
  for rep in $(seq "$REPS"); do
    "$COLCRYPT_KEYCTL" --socket "$COLCRYPT_KEYD_SOCKET" rotate "$KEY" >/dev/null
    for v in baseline colcrypt; do
      if [ $v = baseline ]; then expr=c; else expr=$rewrap_expr; fi
      ms=$(time_sql "UPDATE t_colcrypt_$ds SET c = $expr;")
      record "rewrap.$ds.$v" "$ms"
      printf '  rep %s %-16s %10.1f ms\n' "$rep" "$v" "$ms"
      psql_q -c "VACUUM t_colcrypt_$ds"
    done
  done
done
note versions_after_bulk "$versions_after_bulk"
note rewrap_versions "$(psql_q -c "SELECT count(DISTINCT v) || ' (versions ' || min(v) || ' to ' || max(v) || ')' FROM (SELECT colcrypt.key_version(c) AS v FROM t_colcrypt_short) s")"

# ------------------------------------------------------------------ keyd

say "keyd cold fetch: $KEYD_CLIENTS concurrent clients x $KEYD_REQUESTS fetches ($REPS repetitions)"
# keyd serves keys to the postgres uid only: run the client as postgres.
install -d -m 0755 "$WORK/bin"
install -m 0755 "$keyd_bench_bin" "$WORK/bin/colcrypt-bench-keyd"
for rep in $(seq "$REPS"); do
  for op in primary version; do
    # kept: each client keeps its connection, as a backend does between its
    # fetches; new: a connection per fetch, a new backend's first fetch.
    for conn in kept new; do
      line=$(runuser -u postgres -- "$WORK/bin/colcrypt-bench-keyd" "$COLCRYPT_KEYD_SOCKET" "$KEY" \
        "$KEYD_CLIENTS" "$KEYD_REQUESTS" "$op" "$conn")
      echo "  rep $rep $op, $conn connections: $line"
      for f in p50_us p99_us max_us per_s; do
        record "keyd.$op.$conn.$f" "$(printf '%s\n' "$line" | sed -n "s/.*$f=\([0-9.]*\).*/\1/p")"
      done
    done
    # The same fetches one at a time: keyd's service time. With 64 clients in
    # a closed loop the latency is 64 / per_s (bench/keyd_fetch.cpp).
    line=$(runuser -u postgres -- "$WORK/bin/colcrypt-bench-keyd" "$COLCRYPT_KEYD_SOCKET" "$KEY" \
      1 "$KEYD_REQUESTS" "$op" new)
    echo "  rep $rep $op, 1 client: $line"
    for f in p50_us p99_us; do
      record "keyd.$op.single_$f" "$(printf '%s\n' "$line" | sed -n "s/.*$f=\([0-9.]*\).*/\1/p")"
    done
  done
done

# ------------------------------------------------------------------ core

say "core micro-benchmarks (Google Benchmark, $REPS repetitions of ${CORE_MIN_TIME}s)"
"$core_bin" --benchmark_repetitions="$REPS" --benchmark_min_time="$CORE_MIN_TIME" \
  --benchmark_report_aggregates_only=true --benchmark_format=csv >"$WORK/core.csv" 2>"$WORK/core.err" ||
  { cat "$WORK/core.err" >&2; die "colcrypt-bench-core failed"; }
# name,iterations,real_time,cpu_time,time_unit,...: "BM_EvpSeal/16_median" with
# repetitions, "BM_EvpSeal/16" with one; CPU time, in ns.
awk -F, 'NR > 1 {
    name = $1; gsub(/"/, "", name); unit = $5; gsub(/"/, "", unit)
    t = $4; if (unit == "us") t *= 1000; else if (unit == "ms") t *= 1000000
    if (name ~ /_median$/) { sub(/_median$/, "", name); median[name] = t }
    else if (name !~ /_(mean|stddev|cv)$/) single[name] = t
  }
  END {
    for (name in single) if (!(name in median)) median[name] = single[name]
    for (name in median) { split(name, p, "/"); printf "core.%s.%s\t%.2f\n", p[1], p[2], median[name] }
  }' "$WORK/core.csv" | sort >>"$raw"
grep '^core\.' "$raw" | sed 's/^/  /'

note load_end "$(cut -d' ' -f1-3 /proc/loadavg)"
note duration "$(( $(date -u +%s) - started_at )) s"

say "report"
"$src/bench/report.sh" "$raw" "$meta" "$OUT" "$CHART"
