#!/usr/bin/env bash
# A private, throwaway Postgres 15 cluster plus a colcrypt-keyd, all inside one
# directory. Used by the demo, the pg_regress run and the integration tests, so
# that "start a cluster and keyd" has exactly one implementation.
#
#   sandbox.sh up DIR [PORT]   create what is missing in DIR, start keyd and postgres
#   sandbox.sh down DIR        stop postgres and keyd, keep DIR
#   sandbox.sh destroy DIR     stop everything and remove DIR
#   sandbox.sh keyd-start DIR  start keyd (DIR may hold no cluster)
#   sandbox.sh keyd-stop DIR   SIGTERM keyd and wait for it to exit
#   sandbox.sh keyd-kill DIR   SIGKILL keyd
#   sandbox.sh pg-start DIR | pg-stop DIR | pg-restart DIR
#   sandbox.sh env DIR         print export lines (PGHOST, PGPORT, PGUSER, COLCRYPT_KEYD_SOCKET)
#   sandbox.sh status DIR      what runs (asks keyd with keyctl status); exit 0 only when
#                              keyd answers and postgres runs
#   sandbox.sh pg-kill DIR     stop postgres with -m immediate (a crash: no shutdown checkpoint)
#
# Replication (docs/operations.md, "Replicas and failover"; the primary is a sandbox
# made by `up` with SANDBOX_REPLICATION=1):
#   sandbox.sh standby DIR PRIMARY_DIR [PORT]
#                              a hot standby of PRIMARY_DIR's cluster in DIR (pg_basebackup -R
#                              as the role replicator), started, with a keyd of its own
#   sandbox.sh promote DIR     promote DIR's standby; returns once it accepts writes
#   sandbox.sh rewind DIR SOURCE_DIR
#                              stop DIR's cluster, pg_rewind it from SOURCE_DIR's (the new
#                              primary) and start it as a standby of SOURCE_DIR; keyd is left
#                              running as it is
#
# Layout of DIR:
#   data/ pgsock/ postgres.log   the cluster (owned by postgres), its socket directory, its log
#   store/                       keyd's key store
#   run/keyd.sock                keyd's socket (0660, group postgres; run/ is 0750)
#   keyd.log keyd.pid            keyd's stderr and pid
#   master-password              the sandbox's fixed password (0600), unless
#                                ENCRYPTION_MASTER_PASSWORD is set
#   port                         the cluster's port
#
# Runs as root: postgres runs as the postgres user, keyd as root with
# --allow-uid <postgres> --admin-uid 0 --socket-group postgres.
# Environment:
#   ENCRYPTION_MASTER_PASSWORD  keyd's master password (else DIR/master-password)
#   COLCRYPT_FAST_KDF=1         create the store with 1000 PBKDF2 iterations (tests only)
#   COLCRYPT_KEYD, COLCRYPT_KEYCTL  binaries (default: colcrypt-keyd / colcrypt-keyctl on PATH)
#   SANDBOX_KEYD_ALLOW_UID, SANDBOX_KEYD_ADMIN_UID  override keyd's allowlists
#                               (uids, comma-separated; an admin uid fetches keys
#                               only when on the allow list too, e.g. "$(id -u postgres),0")
#   SANDBOX_KEYD_CONFIG         keyd reads its options from this file (--config);
#                               the allowlists are then the file's, not the above
#   SANDBOX_TIMEOUT             seconds to wait for readiness (default 60)
#   SANDBOX_PG_ENV              NAME=VALUE words added to the postmaster's environment
#                               (scripts/test-sanitize.sh: LD_PRELOAD of libasan)
#   SANDBOX_KEYD_STORE_DB       keyd keeps its store in the sandbox cluster (--store-db
#                               "host=DIR/pgsock port=PORT " + this value, e.g.
#                               "dbname=postgres user=postgres") instead of DIR/store,
#                               its audit log in DIR/keyd-state/; `up` then starts
#                               postgres before keyd
#   SANDBOX_KEYD_ARGS           extra keyd flags, split on whitespace; the word
#                               @DATABASE@ becomes the sandbox database's libpq URI
#                               (for --database: rotation jobs, reference counts)
#   SANDBOX_REPLICATION=1       initdb for a replication primary: wal_log_hints and
#                               full_page_writes on (pg_rewind), synchronous_commit on,
#                               the role replicator (REPLICATION) and its pg_hba line
#
# When keyd exits during keyd-start (or up), this script exits with keyd's own
# exit status (64, 65, 69, 71, 77, 78, ...) after printing the tail of keyd.log.
# Its own failures exit 1; usage errors exit 2.
set -euo pipefail

PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
KEYD=${COLCRYPT_KEYD:-colcrypt-keyd}
KEYCTL=${COLCRYPT_KEYCTL:-colcrypt-keyctl}
TIMEOUT=${SANDBOX_TIMEOUT:-60}
DEFAULT_PORT=54329
# A fixed password: a sandbox is throwaway and lives in a root-owned directory.
SANDBOX_PASSWORD='colcrypt-sandbox-password'
MARKER=.colcrypt-sandbox

say() { printf 'sandbox: %s\n' "$*"; }
die() { printf 'sandbox: error: %s\n' "$*" >&2; exit 1; }
usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
  exit 2
}

as_postgres() { runuser -u postgres -- "$@"; }

tail_log() {  # file [lines]
  local f=$1 n=${2:-30}
  if [ -s "$f" ]; then
    printf -- '--- last %s lines of %s ---\n' "$n" "$f" >&2
    tail -n "$n" "$f" >&2
    printf -- '--- end of %s ---\n' "$f" >&2
  fi
}

resolve_dir() {
  [ -n "${1:-}" ] || usage
  case $1 in
    /*) DIR=$1 ;;
    *) DIR=$(pwd)/$1 ;;
  esac
  DIR=${DIR%/}
  SOCKET=$DIR/run/keyd.sock
  PGSOCK=$DIR/pgsock
  PGDATA=$DIR/data
}

port_of() {
  if [ -f "$DIR/port" ]; then cat "$DIR/port"; else echo "$DEFAULT_PORT"; fi
}

# Creates DIR (root-owned, 0755 so that postgres can reach its own parts) and
# marks it as a sandbox; refuses a non-empty directory that is not one.
ensure_dir() {
  if [ -d "$DIR" ] && [ ! -e "$DIR/$MARKER" ] && [ -n "$(ls -A "$DIR")" ]; then
    die "$DIR exists, is not empty and is not a colcrypt sandbox"
  fi
  mkdir -p "$DIR"
  chmod 0755 "$DIR"
  touch "$DIR/$MARKER"
}

# ---------------------------------------------------------------- keyd

keyd_pid() {  # prints the pid of a live keyd of this sandbox, or fails
  local pid state
  [ -f "$DIR/keyd.pid" ] || return 1
  pid=$(cat "$DIR/keyd.pid")
  [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
  # A zombie nobody reaped yet (PID 1 in a container may not) has exited.
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || echo Z)
  [ "$state" != Z ] || return 1
  # The pid may have been reused: it must be a keyd on this sandbox's socket.
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "--socket $SOCKET " || return 1
  echo "$pid"
}

keyd_start() {
  local pid allow admin uid uidargs=() pwargs=() kdfargs=() keyd_path log_start rc waited=0
  if pid=$(keyd_pid); then
    say "keyd already runs (pid $pid)"
    return 0
  fi
  ensure_dir
  keyd_path=$(command -v "$KEYD") || die "colcrypt-keyd not found (PATH or COLCRYPT_KEYD): $KEYD"
  keyd_path=$(readlink -f "$keyd_path")
  allow=${SANDBOX_KEYD_ALLOW_UID:-$(id -u postgres)}
  admin=${SANDBOX_KEYD_ADMIN_UID:-0}
  if [ -n "${SANDBOX_KEYD_CONFIG:-}" ]; then
    uidargs=(--config "$SANDBOX_KEYD_CONFIG")
  else
    for uid in ${allow//,/ }; do uidargs+=(--allow-uid "$uid"); done
    for uid in ${admin//,/ }; do uidargs+=(--admin-uid "$uid"); done
  fi

  if [ -z "${ENCRYPTION_MASTER_PASSWORD:-}" ]; then
    if [ ! -f "$DIR/master-password" ]; then
      (umask 077 && printf '%s\n' "$SANDBOX_PASSWORD" >"$DIR/master-password")
    fi
    chmod 0600 "$DIR/master-password"
    pwargs=(--password-file "$DIR/master-password")
  fi
  if [ "${COLCRYPT_FAST_KDF:-0}" = 1 ]; then
    kdfargs=(--insecure-fast-kdf --pbkdf2-iterations 1000)
  fi
  local extra=() word
  for word in ${SANDBOX_KEYD_ARGS:-}; do
    [ "$word" = @DATABASE@ ] && word="postgresql:///postgres?host=$DIR/pgsock&port=$(port_of)&user=postgres"
    extra+=("$word")
  done

  local storeargs=(--store "$DIR/store")
  if [ -n "${SANDBOX_KEYD_STORE_DB:-}" ]; then
    mkdir -p -m 0700 "$DIR/keyd-state"
    storeargs=(--store-db "host=$DIR/pgsock port=$(port_of) $SANDBOX_KEYD_STORE_DB"
      --audit-log "$DIR/keyd-state/audit.log")
  fi

  touch "$DIR/keyd.log"
  log_start=$(($(stat -c %s "$DIR/keyd.log") + 1))
  # setsid: keyd must outlive this script and its caller's process group.
  # ENCRYPTION_MASTER_PASSWORD, when set, reaches keyd through the environment.
  setsid "$keyd_path" "${storeargs[@]}" --socket "$SOCKET" \
    "${uidargs[@]}" --socket-group postgres \
    "${pwargs[@]}" "${kdfargs[@]}" "${extra[@]}" </dev/null >>"$DIR/keyd.log" 2>&1 &
  pid=$!
  echo "$pid" >"$DIR/keyd.pid"

  while :; do
    if tail -c "+$log_start" "$DIR/keyd.log" | grep -q 'colcrypt-keyd: INFO: ready'; then
      break
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      rc=0
      wait "$pid" || rc=$?
      rm -f "$DIR/keyd.pid"
      printf 'sandbox: error: colcrypt-keyd exited with status %s during startup\n' "$rc" >&2
      tail_log "$DIR/keyd.log" 20
      exit "$rc"
    fi
    if [ $waited -ge $((TIMEOUT * 10)) ]; then
      printf 'sandbox: error: colcrypt-keyd (pid %s) not ready after %ss\n' "$pid" "$TIMEOUT" >&2
      tail_log "$DIR/keyd.log" 20
      exit 1
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  [ -S "$SOCKET" ] || { tail_log "$DIR/keyd.log"; die "keyd says ready but $SOCKET is not a socket"; }
  say "keyd ready (pid $pid, socket $SOCKET)"
}

wait_gone() {  # pid seconds
  local pid=$1 i=0 state
  while [ -d "/proc/$pid" ]; do
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || echo Z)
    # A zombie leader whose other threads are still exiting still holds the
    # process's files (keyd's listening socket: a connect would succeed and
    # then be closed without a reply; seen under ASan, whose threads exit slowly).
    if [ "$state" = Z ] && [ "$(ls "/proc/$pid/task" 2>/dev/null | wc -l)" -le 1 ]; then return 0; fi
    [ $i -lt $(($2 * 10)) ] || return 1
    sleep 0.1
    i=$((i + 1))
  done
}

keyd_stop() {  # [signal]
  local sig=${1:-TERM} pid
  if ! pid=$(keyd_pid); then
    rm -f "$DIR/keyd.pid"
    say "keyd is not running"
    return 0
  fi
  # A stopped (SIGSTOP) keyd must be continued to act on SIGTERM.
  kill -"$sig" "$pid" 2>/dev/null || true
  [ "$sig" = KILL ] || kill -CONT "$pid" 2>/dev/null || true
  if ! wait_gone "$pid" 20; then
    tail_log "$DIR/keyd.log"
    die "keyd (pid $pid) did not exit within 20s of SIG$sig"
  fi
  rm -f "$DIR/keyd.pid"
  say "keyd stopped (SIG$sig)"
}

# ---------------------------------------------------------------- postgres

pg_running() {
  [ -f "$PGDATA/postmaster.pid" ] && as_postgres "$PG_BIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1
}

pg_init() {
  local port=$1
  [ -f "$PGDATA/PG_VERSION" ] && return 0
  install -d -o postgres -g postgres -m 0700 "$PGDATA" "$PGSOCK"
  install -o postgres -g postgres -m 0600 /dev/null "$DIR/postgres.log"
  say "initdb $PGDATA"
  if ! as_postgres "$PG_BIN/initdb" -D "$PGDATA" -U postgres --auth=trust -E UTF8 \
      --locale=C.UTF-8 --no-sync >"$DIR/initdb.log" 2>&1; then
    tail_log "$DIR/initdb.log"
    die "initdb failed"
  fi
  # A throwaway cluster reachable only through its private socket directory.
  cat >>"$PGDATA/postgresql.conf" <<CONF

# --- colcrypt sandbox ---
listen_addresses = ''
fsync = off
synchronous_commit = off
full_page_writes = off
max_wal_size = 2GB
max_worker_processes = 8
max_parallel_workers = 4
log_min_messages = warning
log_line_prefix = '%m [%p] %q%u@%d '
CONF
  if [ "${SANDBOX_REPLICATION:-0}" = 1 ]; then
    cat >>"$PGDATA/postgresql.conf" <<CONF

# --- colcrypt sandbox: replication primary ---
wal_level = replica
wal_log_hints = on
full_page_writes = on
synchronous_commit = on
max_wal_senders = 5
# pg_rewind reads the old primary's WAL back to the last common checkpoint:
# keep it through the checkpoints of crash recovery and promotion.
wal_keep_size = 256MB
hot_standby = on
CONF
    # Only the replication role may stream, and only over the private socket.
    { echo "local replication replicator trust"; cat "$PGDATA/pg_hba.conf"; } >"$PGDATA/pg_hba.conf.new"
    chown postgres:postgres "$PGDATA/pg_hba.conf.new"
    mv "$PGDATA/pg_hba.conf.new" "$PGDATA/pg_hba.conf"
  fi
  host_conf "$port"
}

# The settings that name this sandbox's own port, sockets and keyd. Appended
# (the last line wins): a standby's or a rewound cluster's postgresql.conf is a
# copy of another sandbox's.
host_conf() {  # port
  cat >>"$PGDATA/postgresql.conf" <<CONF

# --- colcrypt sandbox: this host ($DIR) ---
port = $1
unix_socket_directories = '$PGSOCK'
colcrypt.keyd_socket = '$SOCKET'
CONF
}

psql_at() {  # dir port sql: one statement as postgres, unaligned output
  as_postgres "$PG_BIN/psql" -X -h "$1/pgsock" -p "$2" -U postgres -d postgres -v ON_ERROR_STOP=1 \
    -Atqc "$3"
}

ensure_replication_role() {
  psql_at "$DIR" "$(port_of)" "DO \$\$BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'replicator') THEN
      CREATE ROLE replicator LOGIN REPLICATION;
    END IF; END\$\$" >/dev/null || die "cannot create the role replicator"
}

# A standby of the sandbox SRC (a directory) in DIR, from a base backup.
standby_create() {  # src port
  local src=$1 port=$2 sport
  [ -f "$src/data/PG_VERSION" ] || die "no cluster in $src/data"
  sport=$(cat "$src/port")
  ensure_dir
  [ ! -f "$PGDATA/PG_VERSION" ] || die "$DIR already holds a cluster"
  echo "$port" >"$DIR/port"
  install -d -o postgres -g postgres -m 0700 "$PGDATA" "$PGSOCK"
  install -o postgres -g postgres -m 0600 /dev/null "$DIR/postgres.log"
  say "pg_basebackup of $src into $PGDATA"
  if ! as_postgres "$PG_BIN/pg_basebackup" -h "$src/pgsock" -p "$sport" -U replicator \
      -D "$PGDATA" -R -X stream -c fast --no-sync >"$DIR/basebackup.log" 2>&1; then
    tail_log "$DIR/basebackup.log"
    die "pg_basebackup failed"
  fi
  host_conf "$port"
}

pg_promote() {
  as_postgres "$PG_BIN/pg_ctl" -D "$PGDATA" -w -t "$TIMEOUT" promote >/dev/null ||
    { tail_log "$DIR/postgres.log"; die "pg_ctl promote failed"; }
  [ "$(psql_at "$DIR" "$(port_of)" 'SELECT pg_is_in_recovery()')" = f ] ||
    die "still in recovery after pg_ctl promote"
  say "promoted: $DIR accepts writes"
}

# pg_rewind DIR's cluster from SRC's and make it a standby of SRC.
pg_rewind_from() {  # src
  local src=$1 sport
  sport=$(cat "$src/port")
  pg_stop
  # A promotion writes its new timeline into pg_control at its first
  # checkpoint; pg_rewind reads the timeline there.
  psql_at "$src" "$sport" CHECKPOINT >/dev/null || die "CHECKPOINT on $src failed"
  install -o postgres -g postgres -m 0600 /dev/null "$DIR/rewind.log"
  if ! as_postgres "$PG_BIN/pg_rewind" --target-pgdata="$PGDATA" --no-sync \
      --source-server="host=$src/pgsock port=$sport user=postgres dbname=postgres" \
      >"$DIR/rewind.log" 2>&1; then
    tail_log "$DIR/rewind.log"
    die "pg_rewind failed"
  fi
  # pg_rewind copied SRC's configuration: this host's settings again, and SRC
  # as the primary to follow.
  host_conf "$(port_of)"
  as_postgres sed -i '/^primary_conninfo/d' "$PGDATA/postgresql.auto.conf"
  echo "primary_conninfo = 'host=$src/pgsock port=$sport user=replicator'" |
    as_postgres tee -a "$PGDATA/postgresql.auto.conf" >/dev/null
  as_postgres touch "$PGDATA/standby.signal"
  say "rewound $PGDATA from $src ($(tail -n 1 "$DIR/rewind.log"))"
  pg_start
}

pg_start() {
  if pg_running; then
    say "postgres already runs"
    return 0
  fi
  [ -f "$PGDATA/PG_VERSION" ] || die "no cluster in $PGDATA (run: $0 up $DIR)"
  local pg_env=() word
  for word in ${SANDBOX_PG_ENV:-}; do pg_env+=("$word"); done
  if ! as_postgres env "${pg_env[@]}" "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$DIR/postgres.log" -w \
      -t "$TIMEOUT" start >/dev/null; then
    tail_log "$DIR/postgres.log"
    die "postgres did not start"
  fi
  say "postgres ready (port $(port_of), socket directory $PGSOCK)"
}

pg_stop() {  # [mode]
  if ! pg_running; then
    say "postgres is not running"
    return 0
  fi
  as_postgres "$PG_BIN/pg_ctl" -D "$PGDATA" -m "${1:-fast}" -w -t "$TIMEOUT" stop >/dev/null ||
    { tail_log "$DIR/postgres.log"; die "postgres did not stop"; }
  say "postgres stopped"
}

# ---------------------------------------------------------------- commands

cmd=${1:-}
[ -n "$cmd" ] || usage
shift
[ "$(id -u)" -eq 0 ] || die "run as root (postgres runs as the postgres user, keyd as root)"
id -u postgres >/dev/null 2>&1 || die "no postgres user: install postgresql-15 (scripts/install-deps.sh)"
resolve_dir "${1:-}"

case $cmd in
  up)
    port=${2:-$(port_of)}
    [[ $port =~ ^[0-9]+$ ]] || die "bad port: $port"
    ensure_dir
    if [ -f "$DIR/port" ] && [ "$(cat "$DIR/port")" != "$port" ] && [ -f "$PGDATA/PG_VERSION" ]; then
      die "$DIR already holds a cluster on port $(cat "$DIR/port")"
    fi
    echo "$port" >"$DIR/port"
    if [ -n "${SANDBOX_KEYD_STORE_DB:-}" ]; then
      pg_init "$port"
      pg_start
      [ "${SANDBOX_REPLICATION:-0}" != 1 ] || ensure_replication_role
      keyd_start
    else
      keyd_start
      pg_init "$port"
      pg_start
      [ "${SANDBOX_REPLICATION:-0}" != 1 ] || ensure_replication_role
    fi
    ;;
  standby)
    [ -n "${2:-}" ] || usage
    src=$(cd "$2" && pwd) || die "no directory $2"
    port=${3:-$DEFAULT_PORT}
    [[ $port =~ ^[0-9]+$ ]] || die "bad port: $port"
    standby_create "$src" "$port"
    pg_start
    keyd_start
    ;;
  promote) pg_promote ;;
  rewind)
    [ -n "${2:-}" ] || usage
    src=$(cd "$2" && pwd) || die "no directory $2"
    pg_rewind_from "$src"
    ;;
  down)
    pg_stop
    keyd_stop TERM
    ;;
  destroy)
    if [ -e "$DIR" ]; then
      [ -e "$DIR/$MARKER" ] || die "$DIR is not a colcrypt sandbox; not removing it"
      [ ! -d "$PGDATA" ] || pg_stop
      keyd_stop TERM
      rm -rf "$DIR"
      say "removed $DIR"
    fi
    ;;
  keyd-start) keyd_start ;;
  keyd-stop) keyd_stop TERM ;;
  keyd-kill) keyd_stop KILL ;;
  pg-start) pg_start ;;
  pg-stop) pg_stop ;;
  pg-kill) pg_stop immediate ;;
  pg-restart)
    pg_stop
    pg_start
    ;;
  env)
    printf 'export PGHOST=%q\nexport PGPORT=%q\nexport PGUSER=postgres\nexport COLCRYPT_KEYD_SOCKET=%q\n' \
      "$PGSOCK" "$(port_of)" "$SOCKET"
    ;;
  status)
    rc=0
    if ! pid=$(keyd_pid); then
      echo "keyd: stopped"
      rc=3
    elif answer=$("$KEYCTL" --socket "$SOCKET" status 2>&1); then
      echo "keyd: running (pid $pid, socket $SOCKET)"
      printf '%s\n' "$answer" | sed 's/^/  /'
    else
      echo "keyd: running (pid $pid) but not answering on $SOCKET: $answer"
      rc=3
    fi
    if pg_running; then echo "postgres: running (port $(port_of), socket directory $PGSOCK)"; else echo "postgres: stopped"; rc=3; fi
    exit $rc
    ;;
  *) usage ;;
esac
