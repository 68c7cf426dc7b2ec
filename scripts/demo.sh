#!/usr/bin/env bash
# `make demo`: installs what is missing, builds and installs colcrypt, starts a
# private throwaway cluster and keyd in /tmp/colcrypt-demo, and walks through
# encrypting a column. Re-running starts over with a fresh cluster and store.
# `make demo-stop` (scripts/demo.sh stop) stops everything and removes the directory.
set -euo pipefail

src=$(cd "$(dirname "$0")/.." && pwd)
DIR=${COLCRYPT_DEMO_DIR:-/tmp/colcrypt-demo}
PORT=${COLCRYPT_DEMO_PORT:-54329}
sandbox=$src/scripts/sandbox.sh

if [ "$(id -u)" -ne 0 ]; then
  echo "demo: run as root (sudo make demo): it installs packages and the extension," >&2
  echo "      and runs postgres as the postgres user" >&2
  exit 1
fi

if [ "${1:-}" = stop ]; then
  "$sandbox" destroy "$DIR"
  exit 0
fi
[ $# -eq 0 ] || { echo "usage: $0 [stop]" >&2; exit 2; }

if [ -t 1 ]; then bold=$'\033[1m' cyan=$'\033[36m' plain=$'\033[0m'; else bold='' cyan='' plain=''; fi
banner() { printf '\n%s==> %s%s\n' "$bold" "$*" "$plain"; }

cd "$src"
banner "Installing missing packages"
./scripts/install-deps.sh

banner "Building and installing the extension, colcrypt-keyd and colcrypt-keyctl"
jobs=$(nproc 2>/dev/null || echo 2)
make -j"$jobs" >/dev/null
make install >/dev/null
KEYCTL=${COLCRYPT_KEYCTL:-colcrypt-keyctl}
command -v colcrypt-keyd >/dev/null || export PATH=/usr/local/bin:$PATH

banner "Starting a throwaway cluster and keyd in $DIR"
"$sandbox" destroy "$DIR" >/dev/null
# keyd connects to the demo database to run re-encryption jobs.
SANDBOX_KEYD_ARGS="--database @DATABASE@" "$sandbox" up "$DIR" "$PORT"
eval "$("$sandbox" env "$DIR")"

psql_demo() { psql -X -q -v ON_ERROR_STOP=1 -P pager=off -d postgres "$@"; }
show() {  # prints a statement, then runs it
  printf '\n%s%s%s\n' "$cyan" "$1" "$plain"
  psql_demo -c "$1"
}

banner "Creating the key 'customer_data' in keyd (the key never enters the database)"
echo "\$ colcrypt-keyctl --socket $COLCRYPT_KEYD_SOCKET create customer_data"
"$KEYCTL" --socket "$COLCRYPT_KEYD_SOCKET" create customer_data
"$KEYCTL" --socket "$COLCRYPT_KEYD_SOCKET" list

banner "A table with an encrypted column"
show "CREATE EXTENSION colcrypt"
show "CREATE TABLE customers (id serial PRIMARY KEY, name text, ssn colcrypt.encrypted)"
show "INSERT INTO customers (name, ssn) VALUES
  ('Alice', colcrypt.encrypt_field('123-45-6789', 'customer_data')),
  ('Bob',   colcrypt.encrypt_field('987-65-4321', 'customer_data'))"

banner "What is stored: an authenticated envelope, never the plaintext"
show "SELECT id, name, left(colcrypt.ciphertext(ssn), 60) || '...' AS stored_ssn FROM customers ORDER BY id"

count_in() { { grep -a -o -F -- "$2" "$1" || true; } | wc -l; }
psql_demo -c "CHECKPOINT"
relfile=$DIR/data/$(psql_demo -At -c "SELECT pg_relation_filepath('customers')")
printf '\nThe table file %s contains "Alice" %s time(s) and "123-45-6789" %s time(s).\n' \
  "$relfile" "$(count_in "$relfile" Alice)" "$(count_in "$relfile" 123-45-6789)"

banner "Decrypting (keys come from keyd, cached per backend)"
show "SELECT id, name, colcrypt.decrypt_field(ssn) AS ssn, colcrypt.key_version(ssn) FROM customers ORDER BY id"

banner "Rotating the key: new values use version 2, old values still decrypt"
echo "\$ colcrypt-keyctl --socket $COLCRYPT_KEYD_SOCKET rotate customer_data"
"$KEYCTL" --socket "$COLCRYPT_KEYD_SOCKET" rotate customer_data
show "INSERT INTO customers (name, ssn) VALUES ('Carol', colcrypt.encrypt_field('555-12-3456', 'customer_data'))"
show "SELECT id, name, colcrypt.decrypt_field(ssn) AS ssn, colcrypt.key_name(ssn),
       colcrypt.key_version(ssn) FROM customers ORDER BY id"

banner "Re-encrypting the old rows under version 2 (online, in batches, inside the database)"
echo "\$ colcrypt-keyctl --socket $COLCRYPT_KEYD_SOCKET reencrypt customer_data --wait"
"$KEYCTL" --socket "$COLCRYPT_KEYD_SOCKET" reencrypt customer_data --wait
show "SELECT job_id, key_name, target_version, state, rows_done, rows_total, rows_skipped
  FROM colcrypt.rotation_progress"
show "SELECT id, name, colcrypt.decrypt_field(ssn) AS ssn, colcrypt.key_version(ssn) FROM customers ORDER BY id"
echo
echo "No row uses version 1 any more: it may now be disabled, and later destroyed (crypto-shredding):"
echo "\$ colcrypt-keyctl --socket $COLCRYPT_KEYD_SOCKET status"
"$KEYCTL" --socket "$COLCRYPT_KEYD_SOCKET" status

banner "Your turn"
cat <<EOF
The cluster and keyd keep running. Connect with:

  psql -h $DIR/pgsock -p $PORT -U postgres

and try for example:

  SELECT colcrypt.decrypt_field(ssn) FROM customers;
  SELECT colcrypt.encrypt_field('secret', 'customer_data', 'tenant-42');

Administer keys with:

  colcrypt-keyctl --socket $COLCRYPT_KEYD_SOCKET list

Logs: $DIR/postgres.log and $DIR/keyd.log
Stop and remove everything with:

  make demo-stop
EOF
