#!/usr/bin/env bash
# ctest `deb`: the Debian packages, end to end, on this machine.
#  1. builds them (scripts/deb.sh with DEB_BUILD_OPTIONS=noddebs nocheck and
#     no lintian, which `make deb` runs; the content of every file of the tree
#     outside build/ must be the same afterwards) and installs both with
#     `apt-get install ./*.deb` from a directory of their own;
#  2. checks that the files in use are the packages' own (dpkg --verify, the
#     extension files `make install` had put there are removed first, keyd's
#     executable and the backend's mapped colcrypt.so are the packaged ones,
#     no process maps a file of the source tree) and what postinst set up
#     (user colcrypt, /etc/colcrypt, /var/lib/colcrypt, no invented password);
#  3. runs the unit's ExecStart line (/usr/bin/colcrypt-keyd --config
#     /etc/colcrypt/keyd.conf ...) as user colcrypt with group postgres, as
#     systemd would (credential directory, runtime directory), creates a key,
#     and in a fresh cluster runs CREATE EXTENSION colcrypt and an
#     encrypt/decrypt round trip;
#  4. purges both packages and checks that nothing of theirs remains but the
#     key store and the master password, which purge keeps.
# The packages replace the extension files `make install` installs: once the
# packages are built (which changes nothing outside build/), the test holds
# /tmp/colcrypt-install.lock to the end (unless a process it runs under already
# holds it, as in `flock /tmp/colcrypt-install.lock make test`; it waits at
# most COLCRYPT_DEB_TEST_LOCK_WAIT seconds, default 600, for it), sets those
# files aside and puts them back at the end, whatever happened.
# A run killed with SIGKILL (a ctest timeout) cannot clean up after itself:
# its temporary directory is recorded in /var/tmp/colcrypt-deb-test.state, and
# the next run, once it holds the lock, first undoes what the killed one left
# (keyd and the cluster stopped, packages purged, /etc/colcrypt,
# /var/lib/colcrypt and a user colcrypt it created removed, the set-aside
# extension files put back).
# Needs root and a machine without colcrypt packages, /etc/colcrypt or
# /var/lib/colcrypt (it refuses to touch an installation).
#   COLCRYPT_DEB_DIR   where the packages are built (default: build/deb, as make deb)
set -euo pipefail

src=$(cd "$(dirname "$0")/.." && pwd)
debdir=${COLCRYPT_DEB_DIR:-$src/build/deb}
lockfile=/tmp/colcrypt-install.lock
statefile=/var/tmp/colcrypt-deb-test.state
PG_BIN=/usr/lib/postgresql/15/bin
packages=(postgresql-15-colcrypt colcrypt-keyd)

say() { printf 'deb-test: %s\n' "$*"; }
fail() { printf 'deb-test: FAILED: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "run as root: it installs packages and starts postgres as user postgres"

# ---------------------------------------------------------------- build
# Before the lock: building changes nothing outside build/ (or COLCRYPT_DEB_DIR).
if [ -z "${COLCRYPT_DEB_TEST_BUILT:-}" ]; then
  say "building the packages (scripts/deb.sh, noddebs, no lintian)"
  start=$(date +%s)
  log=$(mktemp /tmp/colcrypt-deb-build.XXXXXX)
  # Name and content of every file of the tree (tracked, untracked, ignored)
  # but those in build directories and .git.
  case $debdir in "$src"/*) debdir_rel=./${debdir#"$src"/} ;; *) debdir_rel=./build ;; esac
  tree_state() {
    (cd "$src" && find . \( -path ./.git -o -path ./build -o -path './build-*' -o -path "$debdir_rel" \) \
      -prune -o \( -type f -o -type l \) -print0 | sort -z | xargs -0r sha256sum -- 2>&1) || true
  }
  before=$(tree_state)
  COLCRYPT_DEB_DIR=$debdir COLCRYPT_DEB_LINTIAN=0 \
    DEB_BUILD_OPTIONS="noddebs nocheck ${DEB_BUILD_OPTIONS:-}" "$src/scripts/deb.sh" >"$log" 2>&1 ||
    { tail -n 40 "$log" >&2; rm -f "$log"; fail "make deb failed"; }
  rm -f "$log"
  after=$(tree_state)
  [ "$before" = "$after" ] ||
    fail "make deb changed the source tree outside build/: $(diff <(echo "$before") <(echo "$after"))"
  say "built in $(($(date +%s) - start))s"
  export COLCRYPT_DEB_TEST_BUILT=1
fi

# True when this process or an ancestor holds the flock on $lockfile.
lock_held_by_ancestor() {
  local ino holders pid=$$
  ino=$(stat -c %i "$lockfile" 2>/dev/null) || return 1
  holders=$(awk -v ino="$ino" '$2 == "FLOCK" { n = split($6, a, ":"); if (a[n] == ino) print $5 }' /proc/locks)
  [ -n "$holders" ] || return 1
  while [ "$pid" -gt 1 ]; do
    grep -qx "$pid" <<<"$holders" && return 0
    pid=$(sed 's/.*) //' "/proc/$pid/stat" | cut -d' ' -f2)
  done
  return 1
}
if [ -z "${COLCRYPT_DEB_TEST_LOCKED:-}" ] && ! lock_held_by_ancestor; then
  wait_s=${COLCRYPT_DEB_TEST_LOCK_WAIT:-600}
  say "waiting for $lockfile (at most ${wait_s}s)"
  rc=0
  COLCRYPT_DEB_TEST_LOCKED=1 flock -E 75 -w "$wait_s" "$lockfile" "$0" "$@" || rc=$?
  [ $rc -ne 75 ] || fail "$lockfile still held by another process after ${wait_s}s"
  exit $rc
fi

# ---------------------------------------------------------------- cleanup
# Undoes, on this machine, whatever a run with temporary directory $1 did,
# however far it got; each step looks at what is there. Returns 1 when
# something could not be undone.
undo_run() {
  local dir=$1 ok=0 p f pid pids
  if [ -f "$dir/data/postmaster.pid" ]; then
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1
  fi
  # The keyd of that run, and only it: its command line names the run's socket.
  pids=$(pgrep -f -- "--socket $dir/run/keyd.sock" || true)
  for pid in $pids; do
    kill -TERM "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null  # this shell's child: reaped here; another's: returns at once
    for _ in $(seq 1 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
  done
  for p in "${packages[@]}"; do
    if dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qv not-installed; then
      DEBIAN_FRONTEND=noninteractive apt-get purge -y -o DPkg::Lock::Timeout=300 "$p" >/dev/null 2>&1 ||
        { echo "deb-test: could not purge $p" >&2; ok=1; }
    fi
  done
  # The run started on a machine without a colcrypt installation: leave none.
  rm -rf /etc/colcrypt /var/lib/colcrypt
  if [ "$(cat "$dir/user-existed" 2>/dev/null)" = 0 ] && getent passwd colcrypt >/dev/null; then
    deluser --quiet --system colcrypt >/dev/null 2>&1 || { echo "deb-test: could not remove user colcrypt" >&2; ok=1; }
  fi
  # Set aside by copy to NAME.part, then rename: a NAME is complete.
  if [ -d "$dir/saved" ]; then
    while IFS= read -r -d '' f; do
      f=${f#"$dir/saved"}
      cp -p "$dir/saved$f" "$f" || { echo "deb-test: could not restore $f (a copy is in $dir/saved)" >&2; ok=1; }
    done < <(find "$dir/saved" -type f ! -name '*.part' -print0)
  fi
  return $ok
}

# What a killed earlier run left behind.
if [ -e "$statefile" ]; then
  old=$(cat "$statefile")
  case $old in
    /tmp/colcrypt-deb-test.?*) ;;
    *) fail "$statefile names no directory of this test: '$old'; check the machine by hand, then remove it" ;;
  esac
  say "an earlier run was killed (temporary directory $old): undoing what it left"
  [ -d "$old" ] || say "$old is gone: cannot restore set-aside extension files or tell whether it created user colcrypt"
  undo_run "$old" || fail "could not undo the earlier run; $statefile and $old kept"
  rm -rf "$old" "$statefile"
fi

# ---------------------------------------------------------------- preconditions
for p in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
  case $status in '' | not-installed) ;; *)
    fail "package $p is $status here; the test installs and purges it (apt-get purge ${packages[*]})" ;;
  esac
done
for d in /etc/colcrypt /var/lib/colcrypt; do
  [ ! -e "$d" ] || fail "$d exists: this machine has a colcrypt installation the test must not touch (a failed earlier run? then remove it)"
done

tmp=$(mktemp -d /tmp/colcrypt-deb-test.XXXXXX)
chmod 0755 "$tmp"
# From here on, a killed run is undone by the next one.
printf '%s\n' "$tmp" >"$statefile.new" && mv "$statefile.new" "$statefile"
if getent passwd colcrypt >/dev/null; then echo 1; else echo 0; fi >"$tmp/user-existed"
pkglib=$("$PG_BIN/pg_config" --pkglibdir)
extdir=$("$PG_BIN/pg_config" --sharedir)/extension
port=$((57000 + RANDOM % 1000))
keyd_pid=

finish() {
  local rc=$? log
  set +e
  if [ $rc -ne 0 ]; then
    for log in "$tmp/postgres.log" "$tmp/keyd.log" "$tmp/apt-install.log" "$tmp/apt-purge.log"; do
      [ -s "$log" ] && { echo "--- last 30 lines of $log ---" >&2; tail -n 30 "$log" >&2; }
    done
  fi
  if undo_run "$tmp"; then
    rm -rf "$tmp" "$statefile"
  else
    echo "deb-test: $tmp and $statefile kept: the next run tries again" >&2
    rc=1
  fi
  [ $rc -eq 0 ] && say "passed" || echo "deb-test: FAILED (exit $rc)" >&2
  exit $rc
}
saved=$tmp/saved
trap finish EXIT

# What `make install` put in the Postgres directories, set aside (and put back
# by undo_run) so that only the packages' files can be found while they are installed.
mkdir -p "$saved"
for f in "$pkglib/colcrypt.so" "$extdir/colcrypt.control" "$extdir"/colcrypt--*.sql; do
  [ -e "$f" ] || continue
  mkdir -p "$saved$(dirname "$f")"
  cp -p "$f" "$saved$f.part"
  mv "$saved$f.part" "$saved$f"
  rm -f "$f"
done

# ---------------------------------------------------------------- install
mkdir "$tmp/debs"
cp "$debdir"/postgresql-15-colcrypt_*.deb "$debdir"/colcrypt-keyd_*.deb "$tmp/debs/"
[ "$(ls "$tmp/debs" | wc -l)" -eq 2 ] || fail "expected two packages, got: $(ls "$tmp/debs")"

say "apt-get install ./*.deb"
(cd "$tmp/debs" && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
  -o DPkg::Lock::Timeout=300 ./*.deb) >"$tmp/apt-install.log" 2>&1 || fail "apt-get install failed"
grep -q 'master password (root, 0600)' "$tmp/apt-install.log" ||
  fail "postinst did not tell the admin to write /etc/colcrypt/master-password"

# ---------------------------------------------------------------- installed files
dpkg --verify "${packages[@]}" || fail "dpkg --verify: installed files differ from the packages"
for p in "${packages[@]}"; do dpkg -L "$p"; done | sort -u >"$tmp/files"
installed_files=()
while IFS= read -r f; do [ -f "$f" ] && installed_files+=("$f"); done <"$tmp/files"
default_version=$(sed -n "s/^default_version = '\(.*\)'/\1/p" "$extdir/colcrypt.control")
for f in /usr/bin/colcrypt-keyd /usr/bin/colcrypt-keyctl /etc/colcrypt/keyd.conf \
  /lib/systemd/system/colcrypt-keyd.service /usr/share/man/man8/colcrypt-keyd.8.gz \
  /usr/share/man/man8/colcrypt-keyctl.8.gz /usr/bin/colcrypt-file \
  /usr/share/man/man1/colcrypt-file.1.gz "$pkglib/colcrypt.so" "$extdir/colcrypt.control" \
  "$extdir/colcrypt--$default_version.sql"; do
  grep -qx "$f" "$tmp/files" || fail "$f is not in the packages"
  [ -f "$f" ] || fail "$f is missing"
done
check_stat() {  # path expected-"owner:group mode"
  local got
  got=$(stat -c '%U:%G %a' "$1")
  [ "$got" = "$2" ] || fail "$1 is $got, expected $2"
}
getent passwd colcrypt | grep -q ':/usr/sbin/nologin$' || fail "no system user colcrypt with shell nologin"
check_stat /etc/colcrypt "root:colcrypt 750"
check_stat /etc/colcrypt/keyd.conf "root:colcrypt 640"
check_stat /var/lib/colcrypt "colcrypt:colcrypt 700"
[ ! -e /etc/colcrypt/master-password ] || fail "postinst made a master password"
grep -qx /etc/colcrypt/keyd.conf /var/lib/dpkg/info/colcrypt-keyd.conffiles || fail "keyd.conf is no conffile"

unit=/lib/systemd/system/colcrypt-keyd.service
if command -v systemd-analyze >/dev/null; then
  out=$(cd "$tmp" && systemd-analyze verify --man=no "$unit" 2>&1) && [ -z "$out" ] ||
    fail "systemd-analyze verify $unit: $out"
fi

# ---------------------------------------------------------------- keyd as the unit runs it
# ExecStart, continuation lines joined; the credential and runtime directories
# are what systemd would make of LoadCredential= and RuntimeDirectory=.
execstart=$(sed -n '/^ExecStart=/,/[^\\]$/p' "$unit" | sed 's/\\$//' | tr '\n' ' ' | sed 's/^ExecStart=//')
case $execstart in
  /usr/bin/colcrypt-keyd\ --config\ /etc/colcrypt/keyd.conf\ *) ;;
  *) fail "unexpected ExecStart: $execstart" ;;
esac
case $execstart in *[\"\']*) fail "quotes in ExecStart: the test cannot split $execstart" ;; esac
credential=$(sed -n 's/^LoadCredential=master-password:\(.*\)$/\1/p' "$unit")
[ "$credential" = /etc/colcrypt/master-password ] || fail "LoadCredential of the unit: $credential"
# What the admin does (README.Debian).
(umask 077 && printf '%s\n' 'deb-test master password' >/etc/colcrypt/master-password)
install -d -o colcrypt -g colcrypt -m 0500 "$tmp/credentials"
install -o colcrypt -g colcrypt -m 0400 /etc/colcrypt/master-password "$tmp/credentials/master-password"
install -d -o colcrypt -g postgres -m 0750 "$tmp/run"
socket=$tmp/run/keyd.sock
execstart=${execstart//'${CREDENTIALS_DIRECTORY}'/$tmp/credentials}
execstart=${execstart//\/run\/colcrypt\//$tmp/run/}
read -r -a keyd_cmd <<<"$execstart"
# A throwaway store: 1000 PBKDF2 iterations (keyd refuses fewer than 100000 without the flag).
keyd_cmd+=(--insecure-fast-kdf --pbkdf2-iterations 1000)
say "keyd: ${keyd_cmd[*]} (as colcrypt, group postgres)"
setpriv --reuid=colcrypt --regid=colcrypt --groups=postgres -- "${keyd_cmd[@]}" \
  </dev/null >"$tmp/keyd.log" 2>&1 &
keyd_pid=$!
for _ in $(seq 1 300); do
  grep -q 'INFO: ready on' "$tmp/keyd.log" && break
  kill -0 "$keyd_pid" 2>/dev/null || fail "keyd exited during startup"
  sleep 0.1
done
grep -q "INFO: ready on $socket" "$tmp/keyd.log" || fail "keyd not ready after 30s"
[ "$(readlink "/proc/$keyd_pid/exe")" = /usr/bin/colcrypt-keyd ] || fail "keyd runs $(readlink "/proc/$keyd_pid/exe")"
[ "$(awk '/^Uid:/ { print $2 }' "/proc/$keyd_pid/status")" = "$(id -u colcrypt)" ] ||
  fail "keyd does not run as colcrypt"
check_stat "$socket" "colcrypt:postgres 660"
check_stat /var/lib/colcrypt/keystore.json "colcrypt:colcrypt 600"
/usr/bin/colcrypt-keyctl --socket "$socket" --keyd-uid colcrypt create deb_test_key >/dev/null ||
  fail "colcrypt-keyctl create (as root, the admin of keyd.conf)"
# As postgres, on keyd.conf's fetch list (root administers, it fetches no key).
[ "$(echo deb-file-test |
  runuser -u postgres -- /usr/bin/colcrypt-file --socket "$socket" --keyd-uid colcrypt \
    encrypt --key deb_test_key - - |
  runuser -u postgres -- /usr/bin/colcrypt-file --socket "$socket" --keyd-uid colcrypt \
    decrypt - -)" = deb-file-test ] ||
  fail "colcrypt-file round trip through the packaged keyd"

# ---------------------------------------------------------------- a fresh cluster
say "cluster on port $port"
install -d -o postgres -g postgres -m 0700 "$tmp/data" "$tmp/pgsock"
runuser -u postgres -- "$PG_BIN/initdb" -D "$tmp/data" -U postgres --auth=trust -E UTF8 \
  --locale=C.UTF-8 --no-sync >"$tmp/initdb.log" 2>&1 || { cat "$tmp/initdb.log" >&2; fail "initdb"; }
cat >>"$tmp/data/postgresql.conf" <<CONF
port = $port
listen_addresses = ''
unix_socket_directories = '$tmp/pgsock'
colcrypt.keyd_socket = '$socket'
colcrypt.keyd_uid = 'colcrypt'
fsync = off
CONF
install -o postgres -g postgres -m 0600 /dev/null "$tmp/postgres.log"
runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$tmp/data" -l "$tmp/postgres.log" -w -t 60 start >/dev/null ||
  fail "postgres did not start"

sql() { runuser -u postgres -- "$PG_BIN/psql" -h "$tmp/pgsock" -p "$port" -d postgres -X -q -t -A -v ON_ERROR_STOP=1; }
out=$(sql <<'SQL'
CREATE EXTENSION colcrypt;
CREATE TABLE t (id int, secret colcrypt.encrypted);
INSERT INTO t VALUES (1, colcrypt.encrypt_field('deb round trip', 'deb_test_key'));
SELECT colcrypt.decrypt_field(secret) FROM t;
SELECT left(format('%s', secret), 9), position('deb round trip' IN format('%s', secret)) FROM t;
SELECT extversion FROM pg_extension WHERE extname = 'colcrypt';
SELECT string_agg(DISTINCT split_part(line, ' ', -1), ',')
  FROM regexp_split_to_table(pg_read_file('/proc/' || pg_backend_pid() || '/maps'), E'\n') AS line
  WHERE line LIKE '%colcrypt%';
SQL
) || fail "CREATE EXTENSION colcrypt and the round trip"
expected=$(printf '%s\n' 'deb round trip' 'colcrypt:|0' "$default_version" "$pkglib/colcrypt.so")
[ "$out" = "$expected" ] || fail "round trip: expected
$expected
got
$out"
dpkg -S "$pkglib/colcrypt.so" | grep -q '^postgresql-15-colcrypt:' || fail "colcrypt.so is not the package's"
backend_pids=$(pgrep -u postgres -f "$tmp/data" || true)
for pid in $keyd_pid $backend_pids; do
  ! grep -qF "$src/" "/proc/$pid/maps" 2>/dev/null || fail "process $pid maps a file of the source tree"
done
say "CREATE EXTENSION colcrypt $default_version and a round trip through the packaged keyd: ok"

runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$tmp/data" -m fast -w stop >/dev/null
kill -TERM "$keyd_pid"
wait "$keyd_pid" || fail "keyd exited with $? on SIGTERM"
keyd_pid=

# ---------------------------------------------------------------- purge
say "apt-get purge ${packages[*]}"
DEBIAN_FRONTEND=noninteractive apt-get purge -y -o DPkg::Lock::Timeout=300 "${packages[@]}" \
  >"$tmp/apt-purge.log" 2>&1 || fail "apt-get purge failed"
for p in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
  case $status in '' | not-installed) ;; *) fail "$p is $status after purge" ;; esac
done
for f in "${installed_files[@]}"; do
  [ ! -e "$f" ] || fail "$f remains after purge"
done
grep -q 'Kept: the key store /var/lib/colcrypt' "$tmp/apt-purge.log" || fail "purge did not say what it keeps"
[ -s /var/lib/colcrypt/keystore.json ] || fail "purge deleted the key store"
[ -s /etc/colcrypt/master-password ] || fail "purge deleted the master password"
left=$(ls -A /etc/colcrypt)
[ "$left" = master-password ] || fail "/etc/colcrypt holds more than master-password after purge: $left"
say "purge removed every packaged file and kept /var/lib/colcrypt and /etc/colcrypt/master-password"
