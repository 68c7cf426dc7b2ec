#!/usr/bin/env bash
# Installs the Debian 12 packages colcrypt needs to build, test and run.
# A no-op (no apt-get update, no root needed) when everything is present.
set -euo pipefail

packages=(
  postgresql-15              # server, client and contrib (Debian ships contrib in it)
  postgresql-server-dev-15   # PGXS, server headers
  libssl-dev                 # OpenSSL 3 (libcrypto)
  libpqxx-dev                # integration tests (pulls in libpq-dev)
  catch2                     # unit and integration tests (v2)
  nlohmann-json3-dev         # keyd admin protocol, keyctl --json
  libcli11-dev               # command lines of keyd and keyctl
  libsystemd-dev             # sd_notify for keyd
  libbenchmark-dev           # benchmarks (colcrypt-bench-core)
  gnuplot-nox                # the benchmark chart (bench/report.sh)
  debhelper dpkg-dev help2man  # make deb (debian/; help2man: the manual pages)
  lintian                    # make deb checks the packages
  binutils                   # nm, for the exported-symbol check (scripts/check-extension.sh)
  clang libclang-rt-14-dev   # fuzz targets: clang++ with libFuzzer and ASan/UBSan runtimes
  valgrind                   # memcheck of keyd (ctest valgrind-keyd, make test-sanitize)
  patchelf                   # make test-sanitize: the postmaster's libraries made to need ASan
  openssl                    # the AES-GCM baseline of the colcrypt-file bench (openssl speed)
  python3-cryptography       # the colcrypt-file interop test (an independent decryptor)
  time                       # /usr/bin/time -v: colcrypt-file's memory in its test and bench
  cmake g++ make pkg-config
  pg-auto-failover-cli postgresql-15-auto-failover  # the failover test driven by pg_autoctl (ctest replica-paf)
)

missing=()
for pkg in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
  [ "$status" = installed ] || missing+=("$pkg")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages are installed"
  exit 0
fi

echo "install-deps: missing: ${missing[*]}"
if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: installing packages needs root; run: sudo $0" >&2
  echo "  (or: sudo apt-get install ${missing[*]})" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# Wait up to 2 minutes for a dpkg/apt lock another apt run holds, rather than fail.
apt-get -o DPkg::Lock::Timeout=120 update
apt-get -o DPkg::Lock::Timeout=120 install -y --no-install-recommends "${missing[@]}"
echo "install-deps: done"
