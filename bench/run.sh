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
#   BENCH_READ_REPS [5]          pgbench runs of each point-read script (median, min, max)
#   BENCH_CALLGRIND_FEW [200] BENCH_CALLGRIND_MANY [1200]  point-read transactions of the two
#                                callgrind runs; their difference gives instructions per transaction
#   BENCH_KEYD_CLIENTS [64]      concurrent keyd clients (the high closed-loop figure, open loop)
#   BENCH_KEYD_LOW_CLIENTS [16]  concurrent keyd clients of the closed-loop target
#   BENCH_KEYD_REQUESTS [50]     cold fetches per keyd client and repetition (new connections)
#   BENCH_KEYD_FETCHES [20000]   fetches of one closed-loop run on kept connections, all clients
#   BENCH_KEYD_RATE [20000]      open loop: fetches per second over BENCH_KEYD_CLIENTS clients
#   BENCH_KEYD_OPEN_SECONDS [2]  open loop: length of one run
#   BENCH_SCALE [default]        "large" adds 10,000,000 rows to the scale figures
#   BENCH_SCALE_ROWS [100000 1000000]  sizes of the scale figures (9-byte values)
#   BENCH_MEM_KEYS [1 100 1000]  key versions in use in one backend for the key cache's memory
#   BENCH_MEM_TOOL_KEYS [1 100 1000 10000]  the same with the cache's code outside Postgres
#                                (colcrypt-bench-keycache: keyd cannot make 10,000 versions quickly)
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
#     COLCRYPT_KEYD, COLCRYPT_KEYCTL, BENCH_CORE_BIN, BENCH_KEYD_BIN, BENCH_KEYCACHE_BIN (bench/smoke.sh)
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
READ_REPS=${BENCH_READ_REPS:-5}
CG_FEW=${BENCH_CALLGRIND_FEW:-200}
CG_MANY=${BENCH_CALLGRIND_MANY:-1200}
KEYD_LOW_CLIENTS=${BENCH_KEYD_LOW_CLIENTS:-16}
KEYD_FETCHES=${BENCH_KEYD_FETCHES:-20000}
KEYD_RATE=${BENCH_KEYD_RATE:-20000}
KEYD_OPEN_SECONDS=${BENCH_KEYD_OPEN_SECONDS:-2}
SCALE=${BENCH_SCALE:-default}
SCALE_ROWS=${BENCH_SCALE_ROWS:-100000 1000000}
[ "$SCALE" != large ] || SCALE_ROWS="$SCALE_ROWS 10000000"
MEM_KEYS=${BENCH_MEM_KEYS:-1 100 1000}
MEM_TOOL_KEYS=${BENCH_MEM_TOOL_KEYS:-1 100 1000 10000}
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
  "$KEYD_CLIENTS" "$KEYD_REQUESTS" "$KEYD_MAX_USES" "$READ_REPS" "$CG_FEW" "$CG_MANY" \
  "$KEYD_LOW_CLIENTS" "$KEYD_FETCHES" "$KEYD_RATE" "$KEYD_OPEN_SECONDS" $SCALE_ROWS $MEM_KEYS $MEM_TOOL_KEYS; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || die "sizes must be positive integers (got '$n')"
done
[ "$CG_MANY" -gt "$CG_FEW" ] || die "BENCH_CALLGRIND_MANY must exceed BENCH_CALLGRIND_FEW"
case $SCALE in default | large) ;; *) die "BENCH_SCALE is default or large (got '$SCALE')" ;; esac
started_at=$(date -u +%s)

# ------------------------------------------------------------------ build

if [ "${BENCH_SKIP_BUILD:-0}" = 1 ]; then
  : "${COLCRYPT_KEYD:?}" "${COLCRYPT_KEYCTL:?}" "${BENCH_CORE_BIN:?}" "${BENCH_KEYD_BIN:?}" "${BENCH_KEYCACHE_BIN:?}"
  core_bin=$BENCH_CORE_BIN
  keyd_bench_bin=$BENCH_KEYD_BIN
  keycache_bin=$BENCH_KEYCACHE_BIN
else
  say "build and install the extension into $("$PG_CONFIG" --pkglibdir); build keyd and the benchmarks"
  jobs=$(nproc 2>/dev/null || echo 2)
  make -C "$src" --no-print-directory -j"$jobs" PG_CONFIG="$PG_CONFIG"
  # PREFIX: keyd and keyctl go to a scratch directory, not /usr/local.
  make -C "$src" --no-print-directory PG_CONFIG="$PG_CONFIG" CMAKE_BUILD_DIR="$build" \
    PREFIX="$WORK/prefix" install
  cmake --build "$build" -j"$jobs" --target colcrypt-keyd colcrypt-keyctl colcrypt-bench-keyd colcrypt-bench-keycache
  cmake --build "$build" -j"$jobs" --target colcrypt-bench-core ||
    die "colcrypt-bench-core was not built: install libbenchmark-dev (scripts/install-deps.sh)"
  export COLCRYPT_KEYD=$build/colcrypt-keyd COLCRYPT_KEYCTL=$build/colcrypt-keyctl
  core_bin=$build/colcrypt-bench-core
  keyd_bench_bin=$build/colcrypt-bench-keyd
  keycache_bin=$build/colcrypt-bench-keycache
fi
command -v gnuplot >/dev/null || die "gnuplot is missing: apt-get install gnuplot-nox (scripts/install-deps.sh)"
command -v valgrind >/dev/null || die "valgrind is missing: apt-get install valgrind (scripts/install-deps.sh)"

# ------------------------------------------------------------------ sandbox

say "sandbox in $box (port $PORT)"
[ ! -e "$box" ] || "$sandbox" destroy "$box" >/dev/null
mkdir -p "$WORK"
chmod 0755 "$WORK"
rm -f "$raw" "$meta"
export COLCRYPT_FAST_KDF=1 PG_BIN
export ENCRYPTION_MAX_USES_PER_VERSION=$KEYD_MAX_USES
# colcrypt.rotate_key() from SQL: the key-cache memory figures rotate a key
# thousands of times from one session.
export SANDBOX_KEYD_ARGS="--sql-rotate"
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
# The machine is shared: every timed section notes the load average it met.
note_load() { note "load_$1" "$(cut -d' ' -f1-3 /proc/loadavg)"; }

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
note command "$(printf '%s ' PG_CONFIG="$PG_CONFIG" BENCH_SHORT_ROWS="$SHORT_ROWS" BENCH_LONG_ROWS="$LONG_ROWS" BENCH_PGP_ROWS="$PGP_ROWS" BENCH_REPS="$REPS" BENCH_PGBENCH_SECONDS="$PGB_SECONDS" BENCH_PGBENCH_CLIENTS="$PGB_CLIENTS" BENCH_KEYD_CLIENTS="$KEYD_CLIENTS" BENCH_KEYD_REQUESTS="$KEYD_REQUESTS" BENCH_KEYD_MAX_USES="$KEYD_MAX_USES" BENCH_READ_REPS="$READ_REPS" BENCH_SCALE="$SCALE")make bench"
note pgp_rows "$PGP_ROWS"
note keyd_clients "$KEYD_CLIENTS"
note keyd_max_uses "$KEYD_MAX_USES$([ "$KEYD_MAX_USES" = 268435456 ] && echo ' (2^28, the production value of docs/rotation.md; BENCH_KEYD_MAX_USES)')"
note sizes "short=$SHORT_ROWS long=$LONG_ROWS pgp=$PGP_ROWS reps=$REPS read_reps=$READ_REPS pgbench=${PGB_SECONDS}s/${PGB_CLIENTS}c keyd=${KEYD_LOW_CLIENTS}/${KEYD_CLIENTS}c,${KEYD_FETCHES}f,${KEYD_RATE}/s callgrind=${CG_FEW}/${CG_MANY}tx scale=$(tr ' ' , <<<"$SCALE_ROWS") mem_keys=$(tr ' ' , <<<"$MEM_KEYS")"
note short_rows "$SHORT_ROWS"
note long_rows "$LONG_ROWS"
note keyd_low_clients "$KEYD_LOW_CLIENTS"
note keyd_rate "$KEYD_RATE"
note scale_rows "$SCALE_ROWS"
note mem_keys "$MEM_KEYS"

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
  note_load bulk_$ds
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
# A benchmark of wrong answers measures nothing: every value decrypts to its source.
for ds in short long; do
  wrong=$(psql_q -c "SELECT count(*) FROM src_$ds s LEFT JOIN t_colcrypt_$ds t USING (id) WHERE t.c IS NULL OR colcrypt.decrypt_field(t.c) IS DISTINCT FROM s.v")
  [ "$wrong" = 0 ] || die "$wrong $ds values do not decrypt to what was encrypted"
done

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
    note_load scan_${ds}_$mode
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

  say "point reads, $ds values: pgbench ${PGB_CLIENTS} clients x ${PGB_SECONDS}s ($READ_REPS repetitions)"
  note_load reads_$ds
  for rep in $(seq "$READ_REPS"); do
    for v in plain colcrypt plainfn; do
      tps=$(pgbench_tps "$pgb_dir/read_${v}_$ds.sql")
      record "reads.$ds.$v" "$tps"
      printf '  rep %s %-16s %10.1f tps\n' "$rep" "$v" "$tps"
      eval "tps_$v=\$tps"
    done
    # The ratio of each repetition's pair (run back to back): its spread over
    # the repetitions is the report's figure.
    record "reads.$ds.ratio" "$(awk -v a="$tps_colcrypt" -v b="$tps_plain" 'BEGIN { printf "%.4f", a / b }')"
  done
  say "writes under load, $ds values: pgbench ${PGB_CLIENTS} clients x ${PGB_SECONDS}s ($REPS repetitions)"
  note_load writes_$ds
  for rep in $(seq "$REPS"); do
    for v in plain colcrypt; do
      tps=$(pgbench_tps "$pgb_dir/write_${v}_$ds.sql")
      record "writes.$ds.$v" "$tps"
      printf '  rep %s %-16s %10.1f tps\n' "$rep" "$v" "$tps"
    done
  done
done

# ------------------------------------------------------------------ point reads under callgrind

# Instructions per point-read transaction, counted by callgrind in the one
# backend that serves pgbench (one client, prepared statements, a fixed
# random seed): deterministic where the tps ratio above is the VM's
# scheduling. The postmaster runs under valgrind, so its forked backends do;
# each backend writes its counts when it exits. Two runs of each script,
# CG_FEW and CG_MANY transactions: their difference divided by
# CG_MANY - CG_FEW is the cost of one transaction without the backend's
# start-up and first planning.
cg_dir=$WORK/callgrind
cg_total() {  # file -> instructions (Ir) of the whole process
  sed -n 's/^\(summary\|totals\): *\([0-9]*\).*/\2/p' "$1" | head -n 1
}
# The counts of the backend that served one pgbench run: the largest file
# that appeared meanwhile (pgbench's own short connection has its file too).
cg_run() {  # script transactions [name to keep the backend's counts under]
  local n=0 file best=0 best_file= count=0 stable=0 last=-1 ir
  "$PG_BIN/pgbench" -n -M prepared -U "$PGB_ROLE" -c 1 -j 1 -t "$2" --random-seed=1 -f "$1" postgres \
    >"$cg_dir/pgbench.log" 2>&1 || { cat "$cg_dir/pgbench.log" >&2; die "pgbench under callgrind failed"; }
  # Backends write their file as they exit, after pgbench returned.
  while [ $n -lt 600 ]; do
    count=$( (grep -l '^totals:' "$cg_dir"/cg.* 2>/dev/null || true) | wc -l)
    if [ "$count" -gt 0 ] && [ "$count" = "$last" ]; then
      stable=$((stable + 1))
      [ $stable -lt 5 ] || break
    else
      stable=0
    fi
    last=$count
    sleep 0.2
    n=$((n + 1))
  done
  for file in $(grep -l '^totals:' "$cg_dir"/cg.* 2>/dev/null || true); do
    ir=$(cg_total "$file")
    if [ -n "$ir" ] && [ "$ir" -gt "$best" ]; then best=$ir best_file=$file; fi
  done
  [ "$best" -gt 0 ] || die "no callgrind counts for $1"
  [ -z "${3:-}" ] || mv "$best_file" "$cg_dir/$3.callgrind"
  rm -f "$cg_dir"/cg.*
  echo "$best"
}
say "point reads under callgrind: instructions per transaction ($CG_FEW and $CG_MANY transactions, 1 client)"
note_load callgrind
rm -rf "$cg_dir"
install -d -o postgres -g postgres -m 0755 "$cg_dir"
"$sandbox" pg-stop "$box" >/dev/null
runuser -u postgres -- valgrind --tool=callgrind --callgrind-out-file="$cg_dir/cg.%p" \
  "$PG_BIN/postgres" -D "$box/data" >"$cg_dir/postmaster.log" 2>&1 &
cg_postmaster=$!
for i in $(seq 600); do
  "$PG_BIN/pg_isready" -q -d postgres && break
  kill -0 "$cg_postmaster" 2>/dev/null || { tail -n 20 "$cg_dir/postmaster.log" >&2; die "postgres under valgrind did not start"; }
  sleep 0.2
done
"$PG_BIN/pg_isready" -q -d postgres || die "postgres under valgrind not ready after 120 s"
# The first backends after a start build the relation cache's init files:
# one run of each script first, not counted.
for ds in short long; do
  for v in plain colcrypt; do cg_run "$pgb_dir/read_${v}_$ds.sql" 1 >/dev/null; done
done
for ds in short long; do
  for v in plain colcrypt; do
    few=$(cg_run "$pgb_dir/read_${v}_$ds.sql" "$CG_FEW" "$ds.$v.few")
    many=$(cg_run "$pgb_dir/read_${v}_$ds.sql" "$CG_MANY" "$ds.$v.many")
    per_tx=$(awk -v a="$few" -v b="$many" -v n="$((CG_MANY - CG_FEW))" 'BEGIN { printf "%.0f", (b - a) / n }')
    record "callgrind.$ds.$v" "$per_tx"
    printf '  %-6s %-10s %12s instructions per transaction (%s and %s in all)\n' "$ds" "$v" "$per_tx" "$few" "$many"
  done
done
runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$box/data" -m fast -w -t 300 stop >/dev/null ||
  die "postgres under valgrind did not stop"
wait "$cg_postmaster" || true
rm -f "$cg_dir"/cg.*  # the backends' counts stay for callgrind_annotate (bench/ANALYSIS.md)
"$sandbox" pg-start "$box" >/dev/null

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
  note_load rewrap_$ds
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

# ------------------------------------------------------------------ scale

# How the costs grow with the table: bulk encrypt, decrypt scan and
# re-encryption of 9-byte values at each size of SCALE_ROWS, one table at a
# time, and what each table takes on disk (heap + TOAST + primary key index).
scale_reps() { if [ "$1" -le 1000000 ]; then echo "$REPS"; else echo 1; fi; }
for n in $SCALE_ROWS; do
  reps=$(scale_reps "$n")
  say "scale: $n rows of 9-byte values ($reps repetitions)"
  note_load scale_$n
  psql_q -c "DROP TABLE IF EXISTS sc_src; CREATE TABLE sc_src AS SELECT i AS id, lpad(((i::bigint * 7919 + 12345) % 1000000000)::text, 9, '0') AS v FROM generate_series(1, $n) i;" \
    -c "VACUUM ANALYZE sc_src"
  for rep in $(seq "$reps"); do
    for v in plain colcrypt pgcrypto; do
      case $v in
        plain) sel="SELECT id, v AS c FROM sc_src" ;;
        colcrypt) sel="SELECT id, colcrypt.encrypt_field(v, '$KEY') AS c FROM sc_src" ;;
        pgcrypto) sel="SELECT id, iv || encrypt_iv(convert_to(v, 'UTF8'), $PGC_KEY, iv, 'aes') AS c FROM (SELECT id, v, gen_random_bytes(16) AS iv FROM sc_src) s" ;;
      esac
      ms=$(time_sql "DROP TABLE IF EXISTS sc_$v; CREATE TABLE sc_$v AS $sel;")
      record "scale.$n.bulk.$v" "$ms"
      printf '  rep %s bulk %-10s %10.1f ms\n' "$rep" "$v" "$ms"
    done
  done
  for v in plain colcrypt pgcrypto; do
    psql_q -c "ALTER TABLE sc_$v ADD PRIMARY KEY (id)" -c "VACUUM ANALYZE sc_$v"
    record "scale.$n.bytes.$v" "$(psql_q -c "SELECT pg_total_relation_size('sc_$v')")"
    record "scale.$n.index_bytes.$v" "$(psql_q -c "SELECT pg_indexes_size('sc_$v')")"
    record "scale.$n.value_bytes.$v" "$(psql_q -c "SELECT round(avg(pg_column_size(c)), 2) FROM sc_$v")"
  done
  for rep in $(seq "$reps"); do
    for v in plain colcrypt; do
      if [ $v = plain ]; then sql="SELECT sum(length(c)) FROM sc_plain"; else sql="SELECT sum(length(colcrypt.decrypt_field(c))) FROM sc_colcrypt"; fi
      ms=$(time_sql "$serial_settings $sql;")
      record "scale.$n.scan.$v" "$ms"
      printf '  rep %s scan %-10s %10.1f ms\n' "$rep" "$v" "$ms"
    done
    "$COLCRYPT_KEYCTL" --socket "$COLCRYPT_KEYD_SOCKET" rotate "$KEY" >/dev/null
    for v in baseline colcrypt; do
      if [ $v = baseline ]; then expr=c; else expr=$rewrap_expr; fi
      ms=$(time_sql "UPDATE sc_colcrypt SET c = $expr;")
      record "scale.$n.rewrap.$v" "$ms"
      printf '  rep %s rewrap %-8s %10.1f ms\n' "$rep" "$v" "$ms"
      psql_q -c "VACUUM sc_colcrypt"
    done
  done
  psql_q -c "DROP TABLE sc_src, sc_plain, sc_colcrypt, sc_pgcrypto"
done

# ------------------------------------------------------------------ backend key cache memory

# What the per-backend key cache holds with 1, 100 and 10,000 keys in use:
# one key rotated until it has that many versions, one value under each, and
# one backend that decrypts the values of the first N versions (each version
# is a key of its own to the cache: its own entry, schedule and secrets).
# Measured by the kernel, not guessed: the backend's anonymous resident
# memory (RssAnon: malloc'd and locked pages; the cache lives outside
# Postgres' memory contexts) and its locked memory (VmLck), read from
# /proc/self/status by the backend itself, after each step, against the same
# backend before it used any key.
mem_key=bench_mem_key
mem_max=$(tr ' ' '\n' <<<"$MEM_KEYS" | sort -n | tail -n 1)
say "backend key cache memory: $mem_max versions of $mem_key"
note_load memory
"$COLCRYPT_KEYCTL" --socket "$COLCRYPT_KEYD_SOCKET" create "$mem_key" >/dev/null
t0=$(date +%s)
psql_q <<SQL
SET colcrypt.key_cache_ttl = 0;
CREATE TABLE m_vals (ver int PRIMARY KEY, c colcrypt.encrypted);
INSERT INTO m_vals VALUES (1, colcrypt.encrypt_field('x', '$mem_key'));
DO \$\$ BEGIN
  FOR i IN 2..$mem_max LOOP
    PERFORM colcrypt.rotate_key('$mem_key');
    INSERT INTO m_vals VALUES (i, colcrypt.encrypt_field('x', '$mem_key'));
  END LOOP;
END \$\$;
SQL
note mem_setup "$mem_max versions made in $(($(date +%s) - t0)) s"
[ "$(psql_q -c "SELECT count(DISTINCT colcrypt.key_version(c)) FROM m_vals")" = "$mem_max" ] ||
  die "the memory table does not hold $mem_max key versions"
status_sql="SELECT (regexp_match(s, 'RssAnon:\\s+(\\d+) kB'))[1] || ' ' || (regexp_match(s, 'VmLck:\\s+(\\d+) kB'))[1] FROM pg_read_file('/proc/self/status') s"
{
  echo "SET colcrypt.key_cache_ttl = 3600;"
  echo "SELECT count(colcrypt.key_version(c)) FROM m_vals WHERE ver = 1;"  # loads the library, no key
  echo "SELECT 'mem 0 ' || ($status_sql);"
  for k in $(tr ' ' '\n' <<<"$MEM_KEYS" | sort -n); do
    echo "SELECT sum(length(colcrypt.decrypt_field(c))) FROM m_vals WHERE ver <= $k;"
    echo "SELECT 'mem $k ' || ($status_sql);"
  done
} | psql_q >"$WORK/memory.out"
read -r _ _ anon0 lck0 < <(grep '^mem 0 ' "$WORK/memory.out")
for k in $MEM_KEYS; do
  read -r _ _ anon lck < <(grep "^mem $k " "$WORK/memory.out")
  record "memory.$k.anon_kb" "$((anon - anon0))"
  record "memory.$k.locked_kb" "$((lck - lck0))"
  printf '  %6s keys: +%s kB resident (anonymous), +%s kB locked\n' "$k" "$((anon - anon0))" "$((lck - lck0))"
done
# The same cache code outside Postgres, to 10,000 versions, as the postgres
# user (the limits a backend has).
install -d -m 0755 "$WORK/bin"
install -m 0755 "$keycache_bin" "$WORK/bin/colcrypt-bench-keycache"
runuser -u postgres -- "$WORK/bin/colcrypt-bench-keycache" $MEM_TOOL_KEYS >"$WORK/memory_tool.out" ||
  die "colcrypt-bench-keycache failed"
while read -r line; do
  k=$(sed -n 's/^keys=\([0-9]*\).*/\1/p' <<<"$line")
  for f in heap_kb anon_kb locked_kb; do
    record "memory_tool.$k.$f" "$(sed -n "s/.* $f=\(-\{0,1\}[0-9]*\).*/\1/p" <<<"$line")"
  done
  echo "  cache code alone: $line"
done <"$WORK/memory_tool.out"
note mem_tool_keys "$MEM_TOOL_KEYS"
note mem_rlimit "$(psql_q -c "SELECT (regexp_match(pg_read_file('/proc/self/limits'), 'Max locked memory\s+(\S+)'))[1]") bytes"

# ------------------------------------------------------------------ keyd

# keyd serves keys to the postgres uid only: run the client as postgres.
install -d -m 0755 "$WORK/bin"
install -m 0755 "$keyd_bench_bin" "$WORK/bin/colcrypt-bench-keyd"
keyd_bench() {  # metric-prefix fields-to-record args...
  local prefix=$1 fields=$2 line f
  shift 2
  line=$(runuser -u postgres -- "$WORK/bin/colcrypt-bench-keyd" "$COLCRYPT_KEYD_SOCKET" "$KEY" "$@") ||
    die "colcrypt-bench-keyd $* failed"
  echo "  $prefix: $line"
  for f in $fields; do
    record "$prefix.$f" "$(printf '%s\n' "$line" | sed -n "s/.*$f=\([0-9.]*\).*/\1/p")"
  done
}
closed_requests() { local r=$((KEYD_FETCHES / $1)); [ $r -ge "$KEYD_REQUESTS" ] && echo $r || echo "$KEYD_REQUESTS"; }
open_requests=$(awk -v r="$KEYD_RATE" -v s="$KEYD_OPEN_SECONDS" -v c="$KEYD_CLIENTS" 'BEGIN { n = int(r * s / c); print (n < 1 ? 1 : n) }')
say "keyd cold fetch: closed loop at $KEYD_LOW_CLIENTS and $KEYD_CLIENTS clients, open loop at $KEYD_RATE/s over $KEYD_CLIENTS clients ($REPS repetitions)"
note_load keyd
all="p50_us p99_us max_us per_s"
for rep in $(seq "$REPS"); do
  for op in primary version; do
    # Closed loop on kept connections: each client asks again as soon as it
    # has its key, as backends missing keys at once do; per_s at the most
    # clients is keyd's maximum rate.
    for c in "$KEYD_LOW_CLIENTS" "$KEYD_CLIENTS"; do
      keyd_bench "keyd.$op.closed$c" "$all" "$c" "$(closed_requests "$c")" "$op" kept
    done
    # Open loop: a fixed rate, as backends with warm caches ask (rarely, independently).
    keyd_bench "keyd.$op.open" "$all" "$KEYD_CLIENTS" "$open_requests" "$op" kept "$KEYD_RATE"
    # A new connection per fetch: what a new backend's first fetch pays.
    keyd_bench "keyd.$op.new" "$all" "$KEYD_CLIENTS" "$KEYD_REQUESTS" "$op" new
    # One at a time: keyd's service time.
    keyd_bench "keyd.$op.single" "p50_us p99_us" 1 "$KEYD_REQUESTS" "$op" new
  done
done
# keyd's CPU per fetch (user + system, /proc/PID/stat), over a closed-loop run
# of 2 x BENCH_KEYD_FETCHES fetches at the most clients.
keyd_pid=$(cat "$box/keyd.pid")
keyd_cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$keyd_pid/stat"; }
for op in primary version; do
  before=$(keyd_cpu_ticks)
  keyd_bench "keyd.$op.cpu_run" "requests" "$KEYD_CLIENTS" "$((2 * $(closed_requests "$KEYD_CLIENTS")))" "$op" kept
  after=$(keyd_cpu_ticks)
  fetches=$(grep "^keyd.$op.cpu_run.requests" "$raw" | tail -n 1 | cut -f2)
  record "keyd.$op.cpu_us" "$(awk -v t="$((after - before))" -v hz="$(getconf CLK_TCK)" -v n="$fetches" 'BEGIN { printf "%.2f", t / hz * 1e6 / n }')"
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
