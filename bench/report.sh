#!/usr/bin/env bash
# The benchmark's report generator: raw repetitions (metric<TAB>value lines,
# from bench/run.sh) and run metadata in, RESULTS.md and a PNG chart out.
# Medians of the repetitions; every comparison is a ratio of two medians from
# the same run. bench/ANALYSIS.md, when present, is appended as the analysis
# of what limits each target.
#
#   report.sh RAW.tsv META.tsv OUT.md CHART.png
# Exits 1 when a figure the report needs is missing from RAW.tsv.
set -euo pipefail

[ $# -eq 4 ] || { echo "usage: $0 RAW.tsv META.tsv OUT.md CHART.png" >&2; exit 2; }
raw=$1 meta=$2 out=$3 chart=$4
here=$(cd "$(dirname "$0")" && pwd)

declare -A M      # metric -> median
declare -A N      # metric -> repetitions
while IFS=$'\t' read -r metric median count; do
  M[$metric]=$median
  N[$metric]=$count
done < <(sort -t$'\t' -k1,1 -k2,2g "$raw" | awk -F'\t' '
  function flush() {
    if (name == "") return
    if (n % 2) m = v[(n + 1) / 2]; else m = (v[n / 2] + v[n / 2 + 1]) / 2
    printf "%s\t%.6g\t%d\n", name, m, n
  }
  $1 != name { flush(); name = $1; n = 0 }
  { v[++n] = $2 }
  END { flush() }')

declare -A META
while IFS=$'\t' read -r k v; do META[$k]=$v; done <"$meta"

missing=()
need() { for m in "$@"; do [ -n "${M[$m]:-}" ] || missing+=("$m"); done; }
for ds in short long; do
  need bulk.$ds.{plain,colcrypt,pgc_encrypt,pgc_encrypt_iv,pgp}
  for mode in serial par2; do need scan.$ds.$mode.{plain,colcrypt,pgc_decrypt,pgc_decrypt_iv,pgp}; done
  need reads.$ds.{plain,colcrypt,plainfn} writes.$ds.{plain,colcrypt} rewrap.$ds.{baseline,colcrypt}
done
need keyd.{primary,version}.{kept,new}.{p50_us,p99_us,max_us,per_s}
for op in Seal Open; do
  for size in 16 1024 65536; do need core.BM_Evp$op.$size core.BM_Envelope$op.$size; done
done
for size in 16 1024 65536; do need core.BM_EnvelopeSealRandPerValue.$size; done
if [ ${#missing[@]} -gt 0 ]; then
  echo "report: missing figures: ${missing[*]}" >&2
  exit 1
fi

# Arithmetic on medians.
calc() { awk "BEGIN { printf \"%.${2:-2}f\", $1 }"; }
ratio() { calc "${M[$1]} / ${M[$2]}" "${3:-2}"; }
ms() { calc "${M[$1]}" 0; }
# "met" / "**missed**" for a comparison expression.
verdict() { if awk "BEGIN { exit !($1) }"; then echo "met"; else echo "**missed**"; fi; }

label_short="1,000,000 × 9 chars"
[ "${META[sizes]:-}" = "" ] || label_short="$(sed -n 's/.*short=\([0-9]*\).*/\1/p' <<<"${META[sizes]}") × 9 chars"
label_long="$(sed -n 's/.*long=\([0-9]*\).*/\1/p' <<<"${META[sizes]:-long=100000}") × 1 KB"
dslabel() { if [ "$1" = short ]; then echo "$label_short"; else echo "$label_long"; fi; }

# Added time of a decrypt over the plaintext scan, and its ratio to pgcrypto's.
added() { calc "${M[scan.$1.$2.$3]} - ${M[scan.$1.$2.plain]}" 0; }
added_ratio() { calc "(${M[scan.$1.$2.colcrypt]} - ${M[scan.$1.$2.plain]}) / (${M[scan.$1.$2.pgc_decrypt]} - ${M[scan.$1.$2.plain]})"; }

targets_table() {
  echo "| target | workload | measured | verdict |"
  echo "|---|---|---|---|"
  local r
  for ds in short long; do
    r=$(added_ratio $ds serial)
    echo "| decrypt scan adds ≤ 0.5× what pgcrypto \`decrypt()\` adds | $(dslabel $ds), serial | $r× | $(verdict "$r <= 0.5") |"
  done
  for ds in short long; do
    r=$(ratio bulk.$ds.colcrypt bulk.$ds.plain)
    echo "| bulk encrypt ≤ 1.5× plaintext | $(dslabel $ds) | $r× | $(verdict "$r <= 1.5") |"
  done
  for ds in short long; do
    r=$(ratio bulk.$ds.pgc_encrypt_iv bulk.$ds.colcrypt)
    echo "| bulk encrypt ≥ 3× faster than \`encrypt_iv\` + \`gen_random_bytes\` | $(dslabel $ds) | $r× faster | $(verdict "$r >= 3") |"
  done
  for op in Seal Open; do
    for size in 16 1024 65536; do
      r=$(ratio core.BM_Envelope$op.$size core.BM_Evp$op.$size)
      echo "| core ≤ 1.3× raw EVP | envelope $(tr '[:upper:]' '[:lower:]' <<<"$op") $size B | $r× | $(verdict "$r <= 1.3") |"
    done
  done
  for ds in short long; do
    r=$(ratio scan.$ds.serial.colcrypt scan.$ds.par2.colcrypt)
    echo "| parallel decrypt scan (2 workers) ≥ 1.6× faster | $(dslabel $ds) | $r× | $(verdict "$r >= 1.6") |"
  done
  for ds in short long; do
    r=$(ratio reads.$ds.colcrypt reads.$ds.plain)
    echo "| point reads ≥ 0.9× plaintext tps | $(dslabel $ds) | $r× | $(verdict "$r >= 0.9") |"
  done
  for ds in short long; do
    r=$(ratio rewrap.$ds.colcrypt rewrap.$ds.baseline)
    echo "| re-encryption ≤ 2.5× \`UPDATE t SET c = c\` | $(dslabel $ds) | $r× | $(verdict "$r <= 2.5") |"
  done
  for conn in kept new; do
    for op in primary version; do
      r=$(calc "${M[keyd.$op.$conn.p99_us]} / 1000" 3)
      echo "| keyd cold fetch p99 < 1 ms, ${META[keyd_clients]:-64} concurrent clients | fetch $op, $conn connection | $r ms | $(verdict "$r < 1") |"
    done
  done
}

bulk_table() {
  local ds=$1
  echo "| statement stores | median ms | vs plaintext | vs colcrypt |"
  echo "|---|---:|---:|---:|"
  for v in plain colcrypt sealed_copy pgc_encrypt pgc_encrypt_iv pgp; do
    [ -n "${M[bulk.$ds.$v]:-}" ] || continue  # sealed_copy: runs before it lacked it
    local name
    case $v in
      plain) name="plaintext \`v\`" ;;
      colcrypt) name="\`colcrypt.encrypt_field(v, key)\`" ;;
      sealed_copy) name="the colcrypt variant's envelopes, copied (\`SELECT id, c FROM\` its table: storing them without encrypting)" ;;
      pgc_encrypt) name="pgcrypto \`encrypt(v, key, 'aes')\` (CBC, zero IV, unauthenticated)" ;;
      pgc_encrypt_iv) name="pgcrypto \`iv \|\| encrypt_iv(v, key, iv, 'aes')\`, \`iv = gen_random_bytes(16)\`" ;;
      pgp) name="pgcrypto \`pgp_sym_encrypt(v, password)\` (scaled from ${META[pgp_rows]:-fewer} rows)" ;;
    esac
    local faster="—"
    [ $v = plain ] || [ $v = colcrypt ] || [ $v = sealed_copy ] || faster="$(ratio bulk.$ds.$v bulk.$ds.colcrypt)×"
    echo "| $name | $(ms bulk.$ds.$v) | $(ratio bulk.$ds.$v bulk.$ds.plain)× | $faster |"
  done
}

scan_table() {
  local ds=$1
  echo "| scan computes | serial ms | added over plaintext | 2 workers ms | added over plaintext | speed-up |"
  echo "|---|---:|---:|---:|---:|---:|"
  for v in plain colcrypt pgc_decrypt pgc_decrypt_iv pgp; do
    local name
    case $v in
      plain) name="\`sum(length(c))\` on plaintext" ;;
      colcrypt) name="\`sum(length(colcrypt.decrypt_field(c)))\`" ;;
      pgc_decrypt) name="pgcrypto \`decrypt(c, key, 'aes')\`" ;;
      pgc_decrypt_iv) name="pgcrypto \`decrypt_iv(…)\` with the stored IV" ;;
      pgp) name="pgcrypto \`pgp_sym_decrypt\` (scaled)" ;;
    esac
    local a1="—" a2="—"
    [ $v = plain ] || { a1="+$(added $ds serial $v)"; a2="+$(added $ds par2 $v)"; }
    echo "| $name | $(ms scan.$ds.serial.$v) | $a1 | $(ms scan.$ds.par2.$v) | $a2 | $(ratio scan.$ds.serial.$v scan.$ds.par2.$v)× |"
  done
}

core_table() {
  echo "| operation | size | raw EVP ns | envelope ns | ratio | old nonce source (RAND_bytes per value) ns | ratio |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
  for op in Seal Open; do
    for size in 16 1024 65536; do
      local old="—" oldr="—"
      if [ $op = Seal ]; then
        old=$(calc "${M[core.BM_EnvelopeSealRandPerValue.$size]}" 0)
        oldr="$(ratio core.BM_EnvelopeSealRandPerValue.$size core.BM_EvpSeal.$size)×"
      fi
      echo "| $(tr '[:upper:]' '[:lower:]' <<<"$op") | $size | $(calc "${M[core.BM_Evp$op.$size]}" 0) | $(calc "${M[core.BM_Envelope$op.$size]}" 0) | $(ratio core.BM_Envelope$op.$size core.BM_Evp$op.$size)× | $old | $oldr |"
    done
  done
}

tmp=$(mktemp)
trap 'rm -f "$tmp" "$tmp.dat" "$tmp.gp"' EXIT
{
  echo "# colcrypt benchmark results"
  echo
  echo "Written by \`bench/report.sh\` from the run of ${META[started]:-?} (\`make bench\`, \`bench/run.sh\`)."
  echo "Every figure is the median of ${N[bulk.short.plain]} repetitions; every ratio compares two"
  echo "medians measured in this same run on the same server (repetitions interleaved)."
  echo "Absolute times depend on the machine and its load; the ratios are the result."
  echo
  echo "## Machine, versions, command"
  echo
  echo "| | |"
  echo "|---|---|"
  echo "| machine | ${META[machine]:-?} |"
  echo "| kernel | ${META[kernel]:-?} |"
  echo "| PostgreSQL | ${META[postgres]:-?} (extension installed in \`${META[pg_config]:-?}\`) |"
  echo "| OpenSSL | ${META[openssl]:-?} |"
  echo "| compiler | ${META[compiler]:-?} |"
  echo "| colcrypt | ${META[commit]:-?} |"
  echo "| load average (1/5/15 min) | at start ${META[load_start]:-?}, at end ${META[load_end]:-?} |"
  echo "| duration | ${META[duration]:-?} |"
  echo "| command | \`${META[command]:-make bench}\` |"
  echo "| sizes | ${META[sizes]:-?} |"
  echo "| keyd usage cap per key version | ${META[keyd_max_uses]:-?} (key versions in the short encrypted table after the bulk load: ${META[versions_after_bulk]:-?}) |"
  echo
  echo "Cluster: \`scripts/sandbox.sh\` (fsync off, synchronous_commit off), plus"
  echo "shared_buffers 1GB, jit off, autovacuum off. Each timed statement runs in a fresh"
  echo "session, so it pays its own key fetches from keyd (a cold key cache)."
  echo
  echo "## Targets"
  echo
  targets_table
  echo
  echo "![main ratios](results.png)"
  echo
  for ds in short long; do
    echo "## Bulk encrypt: $(dslabel $ds)"
    echo
    echo "\`CREATE TABLE t AS SELECT id, <expression> AS c FROM src\`, parallel query off."
    echo
    bulk_table $ds
    echo
  done
  for ds in short long; do
    echo "## Scan and decrypt: $(dslabel $ds)"
    echo
    echo "Serial: \`max_parallel_workers_per_gather = 0\`. Parallel: 2 workers (plus the"
    echo "leader) on a table with \`parallel_workers = 2\`, costs set so the planner uses them"
    echo "(${META[parallel_plan]:-?})."
    echo
    scan_table $ds
    echo
    echo "colcrypt's added time is $(added_ratio $ds serial)× pgcrypto \`decrypt()\`'s serially and"
    echo "$(added_ratio $ds par2)× with 2 workers."
    echo
  done
  echo "## Point reads and writes under load (pgbench)"
  echo
  echo "\`pgbench -n -M prepared -j 2\`, clients and duration in *sizes* above. Reads select one"
  echo "row by primary key (\`decrypt_field(c)\` vs the plaintext column); writes insert one row"
  echo "(\`encrypt_field(value, key)\` vs the plaintext value) into a table with a bigserial key."
  echo "Both sides connect as the role ${META[pgbench_role]:-postgres (a superuser, which skips key privilege checks)}."
  echo "The \`nullif(c, '')\` rows read the plaintext through one built-in function call per row"
  echo "(\`texteq\`) that returns the value itself: what any function in the select list costs a point"
  echo "read (executor set-up, EXECUTE check, the call), with the same reply."
  echo
  echo "| workload | plaintext tps | colcrypt tps | ratio |"
  echo "|---|---:|---:|---:|"
  for ds in short long; do
    echo "| point reads, $(dslabel $ds) | $(ms reads.$ds.plain) | $(ms reads.$ds.colcrypt) | $(ratio reads.$ds.colcrypt reads.$ds.plain)× |"
  done
  for ds in short long; do
    echo "| point reads, $(dslabel $ds): plaintext through \`nullif(c, '')\` | $(ms reads.$ds.plain) | $(ms reads.$ds.plainfn) | $(ratio reads.$ds.plainfn reads.$ds.plain)× |"
  done
  for ds in short long; do
    echo "| writes, $(dslabel $ds) | $(ms writes.$ds.plain) | $(ms writes.$ds.colcrypt) | $(ratio writes.$ds.colcrypt writes.$ds.plain)× |"
  done
  echo
  echo "## Re-encryption"
  echo
  echo "After \`colcrypt-keyctl rotate\`, every row re-encrypted under the new primary version with"
  echo "${META[rewrap_mode]:-?}, against the plain \`UPDATE t SET c = c\` on the same table"
  echo "(VACUUM between statements; key versions in the table at the end: ${META[rewrap_versions]:-?})."
  echo "The rotation job runner (batching, resumption) is not measured here: this is the statement"
  echo "it would run, on the whole table at once."
  echo
  echo "| table | \`SET c = c\` ms | re-encrypt ms | ratio |"
  echo "|---|---:|---:|---:|"
  for ds in short long; do
    echo "| $(dslabel $ds) | $(ms rewrap.$ds.baseline) | $(ms rewrap.$ds.colcrypt) | $(ratio rewrap.$ds.colcrypt rewrap.$ds.baseline)× |"
  done
  echo
  echo "## keyd cold key fetch"
  echo
  echo "\`colcrypt-bench-keyd\`: ${META[keyd_clients]:-?} concurrent clients, each asking again as soon as"
  echo "it has its key (a closed loop), run as the postgres uid. A fetch is what a backend pays for a"
  echo "key its cache does not hold. *kept*: each client keeps its connection between fetches, as a"
  echo "backend does; *new*: a connection per fetch, what a new backend's first fetch pays. *primary*"
  echo "is what encryption fetches (keyd charges the use to the key version); *version* is what"
  echo "decryption fetches. Medians over repetitions of each run's figures."
  echo
  echo "| fetch | connection | p50 µs | p99 µs | max µs | fetches/s |"
  echo "|---|---|---:|---:|---:|---:|"
  for op in primary version; do
    for conn in kept new; do
      echo "| $op | $conn | $(calc "${M[keyd.$op.$conn.p50_us]}" 0) | $(calc "${M[keyd.$op.$conn.p99_us]}" 0) | $(calc "${M[keyd.$op.$conn.max_us]}" 0) | $(calc "${M[keyd.$op.$conn.per_s]}" 0) |"
    done
  done
  echo
  echo "## Core (Google Benchmark, CPU time per operation)"
  echo
  echo "Raw EVP: one AES-256-GCM context keyed once, per value the IV (from a counter), the"
  echo "same 36 bytes of AAD an envelope authenticates, the data and the tag. Envelope: \`seal\`"
  echo "/ \`open\` from src/core/envelope.hpp on an \`AeadKey\`."
  echo
  core_table
  echo
  if [ -f "$here/ANALYSIS.md" ]; then
    cat "$here/ANALYSIS.md"
  fi
} >"$tmp"

# The chart: time relative to each workload's baseline (lower is better);
# colcrypt next to the closest pgcrypto equivalent where there is one.
{
  for ds in short long; do
    tag=$([ $ds = short ] && echo "9 B" || echo "1 KB")
    echo "\"bulk encrypt $tag\" $(ratio bulk.$ds.colcrypt bulk.$ds.plain) $(ratio bulk.$ds.pgc_encrypt_iv bulk.$ds.plain)"
    echo "\"scan+decrypt $tag\" $(ratio scan.$ds.serial.colcrypt scan.$ds.serial.plain) $(ratio scan.$ds.serial.pgc_decrypt scan.$ds.serial.plain)"
    echo "\"point read $tag (1/tps)\" $(ratio reads.$ds.plain reads.$ds.colcrypt) -"
    echo "\"insert $tag (1/tps)\" $(ratio writes.$ds.plain writes.$ds.colcrypt) -"
    echo "\"re-encrypt $tag\" $(ratio rewrap.$ds.colcrypt rewrap.$ds.baseline) -"
  done
  for size in 16 1024 65536; do
    echo "\"core seal $size B\" $(ratio core.BM_EnvelopeSeal.$size core.BM_EvpSeal.$size) -"
  done
} >"$tmp.dat"
cat >"$tmp.gp" <<GP
set terminal pngcairo size 1100,600 noenhanced font ",10"
set output "$chart.tmp"
set title "colcrypt: time relative to each workload's baseline (plaintext, SET c = c, raw EVP); lower is better"
set style data histogram
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set datafile missing "-"
set logscale y 2
set yrange [0.5:*]
set ylabel "ratio (log scale)"
set xtics rotate by 30 right
set grid ytics
set key top right
set arrow from graph 0, first 1 to graph 1, first 1 nohead dashtype 2 lc rgb "#555555"
plot "$tmp.dat" using 2:xtic(1) title "colcrypt" lc rgb "#2b6cb0", \
     "" using 3 title "pgcrypto (encrypt_iv + gen_random_bytes / decrypt)" lc rgb "#dd6b20"
GP
gnuplot "$tmp.gp"
mv "$chart.tmp" "$chart"
mv "$tmp" "$out"
chmod 0644 "$out"  # mktemp made it 0600
echo "report: wrote $out and $chart"
