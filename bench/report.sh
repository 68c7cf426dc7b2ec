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
declare -A MIN MAX
while IFS=$'\t' read -r metric median count lo hi; do
  M[$metric]=$median
  N[$metric]=$count
  MIN[$metric]=$lo
  MAX[$metric]=$hi
done < <(sort -t$'\t' -k1,1 -k2,2g "$raw" | awk -F'\t' '
  function flush() {
    if (name == "") return
    if (n % 2) m = v[(n + 1) / 2]; else m = (v[n / 2] + v[n / 2 + 1]) / 2
    printf "%s\t%.6g\t%d\t%.6g\t%.6g\n", name, m, n, v[1], v[n]
  }
  $1 != name { flush(); name = $1; n = 0 }
  { v[++n] = $2 }
  END { flush() }')

declare -A META
while IFS=$'\t' read -r k v; do META[$k]=$v; done <"$meta"

LOW=${META[keyd_low_clients]:-16}
HIGH=${META[keyd_clients]:-64}
SCALE_ROWS=${META[scale_rows]:-}
MEM_KEYS=${META[mem_keys]:-}
missing=()
need() { for m in "$@"; do [ -n "${M[$m]:-}" ] || missing+=("$m"); done; }
for ds in short long; do
  need bulk.$ds.{plain,colcrypt,sealed_copy,pgc_encrypt,pgc_encrypt_iv,pgp}
  for mode in serial par2; do need scan.$ds.$mode.{plain,colcrypt,pgc_decrypt,pgc_decrypt_iv,pgp}; done
  need reads.$ds.{plain,colcrypt,plainfn,ratio} writes.$ds.{plain,colcrypt} rewrap.$ds.{baseline,colcrypt}
  need callgrind.$ds.{plain,colcrypt}
done
for op in primary version; do
  need keyd.$op.{closed$LOW,closed$HIGH,open,new}.{p50_us,p99_us,max_us,per_s} keyd.$op.single.{p50_us,p99_us} keyd.$op.cpu_us
done
for op in Seal Open; do
  for size in 16 1024 65536; do need core.BM_Evp$op.$size core.BM_Envelope$op.$size; done
done
for size in 16 1024 65536; do need core.BM_EnvelopeSealRandPerValue.$size; done
need core.BM_EvpSeal.9
[ -n "$SCALE_ROWS" ] || missing+=("scale_rows (meta)")
for n in $SCALE_ROWS; do
  need scale.$n.bulk.{plain,colcrypt,pgcrypto} scale.$n.scan.{plain,colcrypt} scale.$n.rewrap.{baseline,colcrypt}
  need scale.$n.{bytes,index_bytes,value_bytes}.{plain,colcrypt,pgcrypto}
done
[ -n "$MEM_KEYS" ] || missing+=("mem_keys (meta)")
for k in $MEM_KEYS; do need memory.$k.{anon_kb,locked_kb}; done
MEM_TOOL_KEYS=${META[mem_tool_keys]:-}
[ -n "$MEM_TOOL_KEYS" ] || missing+=("mem_tool_keys (meta)")
for k in $MEM_TOOL_KEYS; do need memory_tool.$k.{heap_kb,anon_kb,locked_kb}; done
if [ ${#missing[@]} -gt 0 ]; then
  echo "report: missing figures: ${missing[*]}" >&2
  exit 1
fi

# Arithmetic on medians.
calc() { awk "BEGIN { printf \"%.${2:-2}f\", $1 }"; }
ratio() { calc "${M[$1]} / ${M[$2]}" "${3:-2}"; }
ms() { calc "${M[$1]}" 0; }
rows_of() { if [ "$1" = short ]; then echo "${META[short_rows]}"; else echo "${META[long_rows]}"; fi; }
# What colcrypt adds per row over storing its own envelopes (sealed_copy), in ns,
# and that over one raw EVP AES-256-GCM seal of a 9-byte value.
floor_ns() { calc "(${M[bulk.$1.colcrypt]} - ${M[bulk.$1.sealed_copy]}) * 1000000 / $(rows_of "$1")" "${2:-1}"; }
floor_ratio() { calc "$(floor_ns "$1" 6) / ${M[core.BM_EvpSeal.9]}"; }
# Instructions colcrypt adds to a point-read transaction, in % of plaintext's.
cg_added() { calc "(${M[callgrind.$1.colcrypt]} / ${M[callgrind.$1.plain]} - 1) * 100" 1; }
load_of() { echo "${META[load_$1]:-?}"; }
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
  r=$(floor_ratio short)
  echo "| bulk encrypt: time over the stored-envelope floor ≤ 1.3× one raw EVP seal per row | $(dslabel short): $(floor_ns short) ns per row over the floor, raw seal of 9 B $(calc "${M[core.BM_EvpSeal.9]}" 0) ns | $r× | $(verdict "$r <= 1.3") |"
  r=$(ratio bulk.short.pgc_encrypt_iv bulk.short.colcrypt)
  echo "| bulk encrypt ≥ 2.5× faster than \`encrypt_iv\` + \`gen_random_bytes\` | $(dslabel short) | $r× faster | $(verdict "$r >= 2.5") |"
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
    local limit=10
    [ $ds = long ] && limit=15
    r=$(cg_added $ds)
    echo "| point read: instructions added ≤ $limit% of plaintext's (callgrind, one backend) | $(dslabel $ds) | $r % | $(verdict "$r <= $limit") |"
  done
  for ds in short long; do
    r=$(ratio rewrap.$ds.colcrypt rewrap.$ds.baseline)
    echo "| re-encryption ≤ 2.5× \`UPDATE t SET c = c\` | $(dslabel $ds) | $r× | $(verdict "$r <= 2.5") |"
  done
  for op in primary version; do
    r=$(calc "${M[keyd.$op.closed$LOW.p99_us]} / 1000" 3)
    echo "| keyd p99 < 1 ms, $LOW clients, closed loop, kept connections | fetch $op | $r ms | $(verdict "$r < 1") |"
  done
  for op in primary version; do
    r=$(calc "${M[keyd.$op.open.p99_us]} / 1000" 3)
    echo "| keyd p99 < 1 ms, open loop, ${META[keyd_rate]:-?} fetches/s over $HIGH clients | fetch $op | $r ms | $(verdict "$r < 1") |"
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
  echo
  echo "colcrypt over the stored-envelope floor: $(floor_ns $ds) ns per row; one raw EVP AES-256-GCM seal"
  echo "(Google Benchmark, this run) of 9 bytes: $(calc "${M[core.BM_EvpSeal.9]}" 0) ns, of 1 KB: $(calc "${M[core.BM_EvpSeal.1024]}" 0) ns."
  echo "Ratio to plaintext (no target): $(ratio bulk.$ds.colcrypt bulk.$ds.plain)×."
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
  echo "| load average (1/5/15 min) | at start ${META[load_start]:-?}, at end ${META[load_end]:-?}; each section's in its heading |"
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
    echo "\`CREATE TABLE t AS SELECT id, <expression> AS c FROM src\`, parallel query off (load $(load_of bulk_$ds) when it began)."
    echo
    bulk_table $ds
    echo
  done
  for ds in short long; do
    echo "## Scan and decrypt: $(dslabel $ds)"
    echo
    echo "Serial: \`max_parallel_workers_per_gather = 0\`. Parallel: 2 workers (plus the"
    echo "leader) on a table with \`parallel_workers = 2\`, costs set so the planner uses them"
    echo "(${META[parallel_plan]:-?}). Load when it began: serial $(load_of scan_${ds}_serial), parallel $(load_of scan_${ds}_par2)."
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
  echo "Point reads: ${N[reads.short.ratio]} runs of each script, plaintext and colcrypt back to back; the ratio of each"
  echo "pair, median (min–max) over the runs. No target: the instruction counts below are the measure."
  echo "Load average before the reads: $(load_of reads_short) (9 B), $(load_of reads_long) (1 KB)."
  echo
  echo "| workload | plaintext tps | colcrypt tps | ratio |"
  echo "|---|---:|---:|---:|"
  for ds in short long; do
    echo "| point reads, $(dslabel $ds) | $(ms reads.$ds.plain) | $(ms reads.$ds.colcrypt) | $(calc "${M[reads.$ds.ratio]}")× ($(calc "${MIN[reads.$ds.ratio]}")–$(calc "${MAX[reads.$ds.ratio]}")) |"
  done
  for ds in short long; do
    echo "| point reads, $(dslabel $ds): plaintext through \`nullif(c, '')\` | $(ms reads.$ds.plain) | $(ms reads.$ds.plainfn) | $(ratio reads.$ds.plainfn reads.$ds.plain)× |"
  done
  for ds in short long; do
    echo "| writes, $(dslabel $ds) | $(ms writes.$ds.plain) | $(ms writes.$ds.colcrypt) | $(ratio writes.$ds.colcrypt writes.$ds.plain)× |"
  done
  echo
  echo "## Point reads, instructions per transaction (callgrind)"
  echo
  echo "The postmaster under \`valgrind --tool=callgrind\`; \`pgbench -n -M prepared -c 1 --random-seed=1\` as"
  echo "the application role runs each point-read script for $(sed -n 's/.*callgrind=\([0-9]*\)\/\([0-9]*\)tx.*/\1 and \2/p' <<<"${META[sizes]:-}") transactions (two runs); the"
  echo "difference of the serving backend's instruction counts, divided by the difference of the"
  echo "transaction counts, is one transaction without the backend's start-up. Deterministic: the"
  echo "machine's load does not change it (load $(load_of callgrind) when it ran). valgrind's CPU model"
  echo "hides AVX-512, so OpenSSL takes its AES-NI/AVX2 path, as on most servers."
  echo
  echo "| table | plaintext instructions | colcrypt instructions | added |"
  echo "|---|---:|---:|---:|"
  for ds in short long; do
    echo "| $(dslabel $ds) | $(ms callgrind.$ds.plain) | $(ms callgrind.$ds.colcrypt) | +$(calc "${M[callgrind.$ds.colcrypt]} - ${M[callgrind.$ds.plain]}" 0) ($(cg_added $ds) %) |"
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
  echo "\`colcrypt-bench-keyd\`, run as the postgres uid (load $(load_of keyd) when the section began)."
  echo "A fetch is what a backend pays for a key its cache does not hold. *closed N*: N clients on"
  echo "kept connections, each asking again as soon as it has its key (N fetches always in flight);"
  echo "*open*: ${META[keyd_rate]:-?} fetches/s spread evenly over $HIGH clients on kept connections, each on a"
  echo "fixed schedule, latency counted from when the fetch was due; *new*: $HIGH clients, a new"
  echo "connection per fetch (a new backend's first fetch); *single*: one client, one fetch at a time"
  echo "(the service time). *primary* is what encryption fetches (keyd charges the use);"
  echo "*version* is what decryption fetches. Medians over repetitions of each run's figures."
  echo
  echo "| fetch | clients | p50 µs | p99 µs | max µs | fetches/s |"
  echo "|---|---|---:|---:|---:|---:|"
  for op in primary version; do
    for mode in closed$LOW closed$HIGH open new; do
      label=$mode
      case $mode in closed*) label="closed ${mode#closed}, kept" ;; open) label="open, ${META[keyd_rate]:-?}/s over $HIGH, kept" ;; new) label="$HIGH, new connection per fetch" ;; esac
      echo "| $op | $label | $(calc "${M[keyd.$op.$mode.p50_us]}" 0) | $(calc "${M[keyd.$op.$mode.p99_us]}" 0) | $(calc "${M[keyd.$op.$mode.max_us]}" 0) | $(calc "${M[keyd.$op.$mode.per_s]}" 0) |"
    done
    echo "| $op | single | $(calc "${M[keyd.$op.single.p50_us]}" 0) | $(calc "${M[keyd.$op.single.p99_us]}" 0) | | |"
  done
  echo
  for op in primary version; do
    echo "keyd's maximum, $op fetches: $(calc "(${M[keyd.$op.closed$LOW.per_s]} > ${M[keyd.$op.closed$HIGH.per_s]} ? ${MAX[keyd.$op.closed$LOW.per_s]} : ${MAX[keyd.$op.closed$HIGH.per_s]})" 0) fetches/s (the best closed-loop run); keyd CPU per fetch $(calc "${M[keyd.$op.cpu_us]}" 1) µs (user + system)."
    echo
  done
  echo "## Scale: 9-byte values"
  echo
  echo "Time per row (µs) of each statement at each table size, serial, each in a fresh session;"
  echo "medians of ${N[bulk.short.plain]} repetitions up to 1,000,000 rows, one run above that. Load: the"
  echo "load average when the size's section began."
  echo
  echo "| rows | load | bulk plaintext | bulk colcrypt | bulk pgcrypto \`encrypt_iv\` | scan plaintext | scan + decrypt | \`SET c = c\` | re-encrypt |"
  echo "|---:|---|---:|---:|---:|---:|---:|---:|---:|"
  last=
  for n in $SCALE_ROWS; do
    cells=()
    for m in bulk.plain bulk.colcrypt bulk.pgcrypto scan.plain scan.colcrypt rewrap.baseline rewrap.colcrypt; do
      cells+=("$(calc "${M[scale.$n.$m]} * 1000 / $n" 3)")
    done
    echo "| $n | $(load_of scale_$n) | $(IFS='|'; sed 's/|/ | /g' <<<"${cells[*]}") |"
    last=$n
  done
  echo
  echo "At the largest size, 100,000,000 rows would take: bulk encrypt $(calc "${M[scale.$last.bulk.colcrypt]} * 100000000 / $last / 60000" 1) min"
  echo "(plaintext $(calc "${M[scale.$last.bulk.plain]} * 100000000 / $last / 60000" 1) min), decrypt scan $(calc "${M[scale.$last.scan.colcrypt]} * 100000000 / $last / 60000" 1) min,"
  echo "re-encryption $(calc "${M[scale.$last.rewrap.colcrypt]} * 100000000 / $last / 60000" 1) min, serially on one core of this machine."
  echo
  echo "### Storage"
  echo
  echo "Table size with its primary key (\`pg_total_relation_size\`: heap + TOAST + index) after VACUUM; the value"
  echo "as stored (\`avg(pg_column_size(c))\`: a 9-character text is 10 bytes, colcrypt's envelope"
  echo "header + nonce + ciphertext + tag plus its varlena header, pgcrypto's IV + CBC block plus its header)."
  echo
  echo "| rows | table | total MB | bytes per row | of which index | value bytes | vs plaintext |"
  echo "|---:|---|---:|---:|---:|---:|---:|"
  for n in $SCALE_ROWS; do
    for v in plain colcrypt pgcrypto; do
      echo "| $n | $v | $(calc "${M[scale.$n.bytes.$v]} / 1048576" 1) | $(calc "${M[scale.$n.bytes.$v]} / $n" 1) | $(calc "${M[scale.$n.index_bytes.$v]} / $n" 1) | $(calc "${M[scale.$n.value_bytes.$v]}" 1) | $(ratio scale.$n.bytes.$v scale.$n.bytes.plain)× |"
    done
  done
  echo
  echo "## Backend key cache memory"
  echo
  echo "One backend decrypts one value under each of the first N versions of one key (each version is"
  echo "an entry of its own in the cache: its AES key schedule and secrets); growth of the backend's"
  echo "anonymous resident memory (RssAnon: malloc'd and locked pages, where the cache lives, outside"
  echo "Postgres' memory contexts) and of its locked memory (VmLck), both from the backend's own"
  echo "\`/proc/self/status\`, against the same backend before it used a key (${META[mem_setup]:-?};"
  echo "the backend's RLIMIT_MEMLOCK: ${META[mem_rlimit]:-?})."
  echo
  echo "| keys in use | resident kB | per key | locked kB | per key |"
  echo "|---:|---:|---:|---:|---:|"
  for k in $MEM_KEYS; do
    echo "| $k | ${M[memory.$k.anon_kb]} | $(calc "${M[memory.$k.anon_kb]} / $k" 1) kB | ${M[memory.$k.locked_kb]} | $(calc "${M[memory.$k.locked_kb]} / $k" 1) kB |"
  done
  echo
  echo "A keyd rewrites its whole store at every rotation, so a key with 10,000 versions takes most of an"
  echo "hour to make; \`colcrypt-bench-keycache\` runs the cache's own code (src/pg/key_cache.cpp is"
  echo "Postgres-free) against a fake keyd, as the postgres user, up to 10,000 versions: malloc'd bytes in"
  echo "use (\`mallinfo2\`), RssAnon and VmLck growth over the process before its first key."
  echo
  echo "| keys in use | malloc'd kB | per key | resident kB | locked kB | per key |"
  echo "|---:|---:|---:|---:|---:|---:|"
  for k in $MEM_TOOL_KEYS; do
    echo "| $k | ${M[memory_tool.$k.heap_kb]} | $(calc "${M[memory_tool.$k.heap_kb]} / $k" 1) kB | ${M[memory_tool.$k.anon_kb]} | ${M[memory_tool.$k.locked_kb]} | $(calc "${M[memory_tool.$k.locked_kb]} / $k" 1) kB |"
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
    echo "\"point read $tag (1/tps)\" $(calc "1 / ${M[reads.$ds.ratio]}") -"
    echo "\"point read $tag (instructions)\" $(ratio callgrind.$ds.colcrypt callgrind.$ds.plain 3) -"
    echo "\"insert $tag (1/tps)\" $(ratio writes.$ds.plain writes.$ds.colcrypt) -"
    echo "\"re-encrypt $tag\" $(ratio rewrap.$ds.colcrypt rewrap.$ds.baseline) -"
  done
  for size in 16 1024 65536; do
    echo "\"core seal $size B\" $(ratio core.BM_EnvelopeSeal.$size core.BM_EvpSeal.$size) -"
  done
  echo "\"bulk 9 B over floor / EVP seal\" $(floor_ratio short) -"
  for op in primary version; do
    echo "\"keyd p99 $LOW clients $op (/1 ms)\" $(calc "${M[keyd.$op.closed$LOW.p99_us]} / 1000" 3) -"
    echo "\"keyd p99 open loop $op (/1 ms)\" $(calc "${M[keyd.$op.open.p99_us]} / 1000" 3) -"
  done
} >"$tmp.dat"
cat >"$tmp.gp" <<GP
set terminal pngcairo size 1100,600 noenhanced font ",10"
set output "$chart.tmp"
set title "colcrypt relative to each workload's baseline (plaintext, SET c = c, raw EVP; keyd: p99 / 1 ms target); lower is better"
set style data histogram
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set datafile missing "-"
set logscale y 2
set yrange [0.1:*]
set ylabel "ratio (log scale)"
set xtics rotate by 30 right
set grid ytics
set key top left
set arrow from graph 0, first 1 to graph 1, first 1 nohead dashtype 2 lc rgb "#555555"
plot "$tmp.dat" using 2:xtic(1) title "colcrypt" lc rgb "#2b6cb0", \
     "" using 3 title "pgcrypto (encrypt_iv + gen_random_bytes / decrypt)" lc rgb "#dd6b20"
GP
gnuplot "$tmp.gp"
mv "$chart.tmp" "$chart"
mv "$tmp" "$out"
chmod 0644 "$out"  # mktemp made it 0600
echo "report: wrote $out and $chart"
