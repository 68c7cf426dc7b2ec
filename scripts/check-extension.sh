#!/usr/bin/env bash
# Checks the extension's SQL scripts against each other and against the
# library, without a database (ctest "extension-scripts"; docs/upgrading.md):
#   - the Makefile's EXTVERSION is the control file's default_version;
#   - every install script starts with the CREATE EXTENSION guard and every
#     upgrade script with the ALTER EXTENSION ... UPDATE guard;
#   - every released version (a committed colcrypt--X.sql) reaches
#     EXTVERSION through upgrade scripts;
#   - released scripts (install scripts of released versions, upgrade scripts
#     to them) are unchanged: extension/released.sha256 lists each one's
#     SHA-256, and a release adds its scripts there (never edit a line);
#   - every C symbol any script names (AS 'MODULE_PATHNAME', 'symbol') is
#     exported by the library, with its pg_finfo_ record: between installing
#     a new colcrypt.so and ALTER EXTENSION colcrypt UPDATE, databases still
#     run an older version's SQL against the new library.
#
#   check-extension.sh LIBRARY [EXTENSION_DIR]
# LIBRARY is colcrypt.so (the PGXS build's); EXTENSION_DIR defaults to the
# source tree's extension/ (another directory lets the check be tested).
set -euo pipefail

[ $# -ge 1 ] && [ $# -le 2 ] || { echo "usage: $0 LIBRARY [EXTENSION_DIR]" >&2; exit 2; }
src=$(cd "$(dirname "$0")/.." && pwd)
lib=$1
dir=${2:-$src/extension}
failures=0
fail() { printf 'check-extension: %s\n' "$*" >&2; failures=$((failures + 1)); }

[ -f "$lib" ] || { echo "check-extension: no library at $lib (build it with make)" >&2; exit 1; }
command -v nm >/dev/null || { echo "check-extension: nm (binutils) is missing" >&2; exit 1; }

extversion=$(sed -n 's/^EXTVERSION *= *\([^ ]*\) *$/\1/p' "$src/Makefile")
default_version=$(sed -n "s/^default_version *= *'\\([^']*\\)'.*/\\1/p" "$dir/colcrypt.control")
[ -n "$extversion" ] || fail "no EXTVERSION in $src/Makefile"
[ "$extversion" = "$default_version" ] ||
  fail "Makefile EXTVERSION ($extversion) differs from default_version in colcrypt.control ($default_version)"

# The committed scripts: colcrypt.sql (the current version) and every
# colcrypt--*.sql but the build's copy of colcrypt.sql.
scripts=("$dir/colcrypt.sql")
installs=()
upgrades=()
for f in "$dir"/colcrypt--*.sql; do
  [ -e "$f" ] || continue
  name=$(basename "$f" .sql)
  case $name in
    "colcrypt--$extversion") continue ;;
    colcrypt--*--*) upgrades+=("$name") ;;
    *) installs+=("$name") ;;
  esac
  scripts+=("$f")
done

first_command() { grep -v -e '^--' -e '^[[:space:]]*$' "$1" | head -n 1; }
for f in "${scripts[@]}"; do
  case $(basename "$f") in
    colcrypt--*--*.sql) want='\echo Use "ALTER EXTENSION colcrypt UPDATE" to load this file. \quit' ;;
    *) want='\echo Use "CREATE EXTENSION colcrypt" to load this file. \quit' ;;
  esac
  [ "$(first_command "$f")" = "$want" ] || fail "$(basename "$f") does not start with: $want"
done

# Each released version must reach EXTVERSION along upgrade scripts.
reaches() {  # version [seen...]
  local from=$1 u to
  shift
  [ "$from" = "$extversion" ] && return 0
  for u in "${upgrades[@]}"; do
    [ "${u#colcrypt--"$from"--}" != "$u" ] || continue
    to=${u#colcrypt--"$from"--}
    case " $* " in *" $to "*) continue ;; esac
    reaches "$to" "$from" "$@" && return 0
  done
  return 1
}
for i in "${installs[@]}"; do
  v=${i#colcrypt--}
  reaches "$v" || fail "no chain of upgrade scripts from released version $v to $extversion"
done

# Released scripts: every install script but the current version's, and
# every upgrade script to a version other than the current one.
sums=$dir/released.sha256
if [ ! -f "$sums" ]; then
  fail "no $sums: the checksums of the released scripts"
else
  for f in "${scripts[@]}"; do
    name=$(basename "$f")
    case $name in
      colcrypt.sql | colcrypt--*--"$extversion".sql) continue ;;
    esac
    want=$(awk -v n="$name" '$2 == n {print $1}' "$sums")
    have=$(sha256sum "$f" | awk '{print $1}')
    if [ -z "$want" ]; then
      fail "$name is a released script but not in $(basename "$sums")"
    elif [ "$want" != "$have" ]; then
      fail "$name differs from the released script (sha256 $want): never edit a released script; put the change in colcrypt.sql and the newest upgrade script"
    fi
  done
fi

exported=$(nm -D --defined-only "$lib" | awk 'NF == 3 {print $3}' | sort -u)
for f in "${scripts[@]}"; do
  references=$(grep -c "MODULE_PATHNAME" "$f" || true)
  symbols=$(grep -oE "'MODULE_PATHNAME'[[:space:]]*,[[:space:]]*'[A-Za-z0-9_]+'" "$f" |
            sed -E "s/.*'([A-Za-z0-9_]+)'$/\1/" || true)
  found=$(printf '%s\n' "$symbols" | grep -c . || true)
  [ "$references" -eq "$found" ] ||
    fail "$(basename "$f"): $references uses of MODULE_PATHNAME, but only $found in the form AS 'MODULE_PATHNAME', 'symbol' on one line"
  for sym in $(printf '%s\n' "$symbols" | sort -u); do
    for want in "$sym" "pg_finfo_$sym"; do
      grep -qxF "$want" <<<"$exported" || fail "$(basename "$f") names $sym, but $(basename "$lib") does not export $want"
    done
  done
done

if [ "$failures" -gt 0 ]; then
  echo "check-extension: $failures problem(s)" >&2
  exit 1
fi
echo "check-extension: ${#scripts[@]} scripts, versions ${installs[*]#colcrypt--} -> $extversion, every C symbol exported"
