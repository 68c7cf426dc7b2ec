#!/usr/bin/env bash
# The colcrypt-file benchmark: throughput of encrypt and decrypt against the
# raw AES-256-GCM speed of this machine at the same chunk size (`openssl speed
# -evp aes-256-gcm -bytes 65536`, one core, measured in the same run), against
# age and gpg --symmetric on the same file when they are installed, and the
# maximum RSS of encrypt+decrypt for a small and a large input streamed
# through pipes (never stored). Writes a Markdown report.
#   bench/file.sh FILE_BIN KEYD_BIN KEYCTL_BIN
# Environment (defaults in brackets):
#   BENCH_FILE_MB [512]        size of the file the throughput is measured on
#   BENCH_FILE_RSS_MB [10 1024]  input sizes (MiB) whose max RSS is measured
#   BENCH_REPS [3]             repetitions; every figure is the median
#   BENCH_DIR [/tmp/colcrypt-bench-file]  scratch directory (on a disk with room
#                              for the file twice; the page cache holds it)
#   BENCH_FILE_OUT [bench/FILE_RESULTS.md]
# Timings include reading the input (from the page cache) and writing the
# output to /dev/null: what a user of the command gets, on one core. Figures
# are per CPU second (user+sys, and user only as openssl speed counts), the
# wall figure only for reference (it depends on the machine's load).
set -euo pipefail

[ $# -eq 3 ] || { echo "usage: $0 FILE_BIN KEYD_BIN KEYCTL_BIN" >&2; exit 2; }
src=$(cd "$(dirname "$0")/.." && pwd)
FILE_BIN=$1 KEYD_BIN=$2 KEYCTL_BIN=$3
MB=${BENCH_FILE_MB:-512}
RSS_SIZES=${BENCH_FILE_RSS_MB:-10 1024}
REPS=${BENCH_REPS:-3}
WORK=${BENCH_DIR:-/tmp/colcrypt-bench-file}
OUT=${BENCH_FILE_OUT:-$src/bench/FILE_RESULTS.md}
for n in "$MB" "$REPS" $RSS_SIZES; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "bench/file.sh: sizes must be positive integers" >&2; exit 2; }
done
command -v openssl >/dev/null || { echo "bench/file.sh: openssl is missing (scripts/install-deps.sh)" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "bench/file.sh: /usr/bin/time is missing (scripts/install-deps.sh)" >&2; exit 1; }

rm -rf "$WORK"
mkdir -p "$WORK"
chmod 0755 "$WORK"
box=$WORK/sandbox
cleanup() {
  COLCRYPT_KEYD=$KEYD_BIN "$src/scripts/sandbox.sh" keyd-stop "$box" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
# The bench runs as root, keyd's admin: it must be on the fetch list too.
COLCRYPT_KEYD=$KEYD_BIN COLCRYPT_KEYCTL=$KEYCTL_BIN COLCRYPT_FAST_KDF=1 SANDBOX_KEYD_ALLOW_UID=0 \
  "$src/scripts/sandbox.sh" keyd-start "$box" >/dev/null
"$KEYCTL_BIN" --socket "$box/run/keyd.sock" create bench_files >/dev/null
cc=("$FILE_BIN" --socket "$box/run/keyd.sock" --quiet)

# "wall user sys" seconds of "$@" (stdout to /dev/null): the run with the
# median user+sys time of REPS runs. CPU time, not wall time, is what is
# compared: `openssl speed` divides by CPU user time too, and on a shared
# machine the wall time mostly measures the other processes.
measure() {
  for _ in $(seq "$REPS"); do
    /usr/bin/time -f '%e %U %S' -o "$WORK/time" "$@" >/dev/null
    tail -n 1 "$WORK/time"
  done | awk '{$4 = $2 + $3; print}' | sort -n -k4 |
    awk '{l[NR] = $1 " " $2 " " $3} END {print l[int((NR + 1) / 2)]}'
}
mbps() { awk -v mb="$MB" -v s="$1" 'BEGIN {printf "%.0f", (s > 0 ? mb * 1.048576 / s : 0)}'; }
# A table row: what, MB/s per user+sys CPU second, per user second, per wall second, ratios.
row() {
  local what=$1 wall user sys
  read -r wall user sys <<<"$2"
  local cpu user_only
  cpu=$(mbps "$(awk -v u="$user" -v s="$sys" 'BEGIN {print u + s}')")
  user_only=$(mbps "$user")
  rows+=("| $what | $cpu | $(ratio "$cpu") | $user_only | $(ratio "$user_only") | $(mbps "$wall") |")
}

input=$WORK/input
head -c "${MB}M" /dev/urandom >"$input"
"${cc[@]}" encrypt --key bench_files "$input" "$WORK/input.ccf"
cat "$input" "$WORK/input.ccf" >/dev/null  # into the page cache

# The baseline: raw AES-256-GCM on one core at the chunk size, in this run.
openssl_kbps=$(openssl speed -evp aes-256-gcm -bytes 65536 -seconds 3 2>/dev/null |
  awk '/^AES-256-GCM/ {sub(/k$/, "", $2); print $2}')
raw=$(awk -v k="$openssl_kbps" 'BEGIN {printf "%.0f", k / 1000}')

ratio() { awk -v a="$1" -v b="$raw" 'BEGIN {printf "%.0f%%", 100 * a / b}'; }

rows=()
rows+=("| openssl speed -evp aes-256-gcm, 64 KiB blocks (baseline, per user second) | $raw | 100% | $raw | 100% | |")
row "colcrypt-file encrypt" "$(measure "${cc[@]}" encrypt --key bench_files "$input" -)"
row "colcrypt-file decrypt" "$(measure "${cc[@]}" decrypt "$WORK/input.ccf" -)"
if command -v age >/dev/null && command -v age-keygen >/dev/null; then
  age-keygen -o "$WORK/age.key" 2>/dev/null
  recipient=$(age-keygen -y "$WORK/age.key")
  age -r "$recipient" -o "$WORK/input.age" "$input"
  row "age (X25519, ChaCha20-Poly1305) encrypt" "$(measure age -r "$recipient" "$input")"
  row "age decrypt" "$(measure age -d -i "$WORK/age.key" "$WORK/input.age")"
else
  rows+=("| age: not installed (apt-get install age) | | | | | |")
fi
if command -v gpg >/dev/null; then
  export GNUPGHOME=$WORK/gnupg
  mkdir -m 0700 "$GNUPGHOME"
  gpg_sym=(gpg --batch --quiet --pinentry-mode loopback --passphrase bench --compress-algo none)
  "${gpg_sym[@]}" --symmetric --cipher-algo AES256 -o "$WORK/input.gpg" "$input"
  row "gpg --symmetric --cipher-algo AES256, no compression, encrypt" \
    "$(measure "${gpg_sym[@]}" --symmetric --cipher-algo AES256 -o - "$input")"
  row "gpg decrypt" "$(measure "${gpg_sym[@]}" --decrypt -o - "$WORK/input.gpg")"
else
  rows+=("| gpg: not installed (apt-get install gnupg) | | | | | |")
fi
rm -f "$input" "$WORK/input."*

# Max RSS of encrypt and of decrypt, streamed: head | encrypt | decrypt | wc.
rss_rows=()
for size in $RSS_SIZES; do
  head -c "${size}M" /dev/zero |
    /usr/bin/time -f %M -o "$WORK/rss.e" "${cc[@]}" encrypt --key bench_files - - |
    /usr/bin/time -f %M -o "$WORK/rss.d" "${cc[@]}" decrypt - - | wc -c >"$WORK/count"
  [ "$(cat "$WORK/count")" -eq $((size * 1048576)) ] || { echo "bench/file.sh: round trip lost bytes" >&2; exit 1; }
  rss_rows+=("| $size MiB | $(cat "$WORK/rss.e") KiB | $(cat "$WORK/rss.d") KiB |")
done

{
  echo "# colcrypt-file benchmark"
  echo
  echo "$(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)),"
  echo "OpenSSL $(openssl version | awk '{print $2}'). A ${MB} MiB file of random bytes from the"
  echo "page cache to /dev/null, median of $REPS runs; the baseline is measured in the same run."
  echo "Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
  echo
  echo "## Throughput (goal: colcrypt-file at least 70% of the baseline)"
  echo
  echo "| what | MB/s per CPU s (user+sys) | of baseline | MB/s per user s | of baseline | MB/s wall |"
  echo "|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
  echo
  echo "## Memory: max RSS, input streamed through pipes"
  echo
  echo "| input | encrypt | decrypt |"
  echo "|---|---|---|"
  printf '%s\n' "${rss_rows[@]}"
} >"$OUT"
cat "$OUT"
