#!/usr/bin/env bash
# `make test-sanitize` (docs/reliability.md): the test suites against builds
# under AddressSanitizer (leak checks on) and UndefinedBehaviorSanitizer
# (every report fatal), in build-asan/:
#   1. the unit and Wycheproof tests, and the integration tests with the ASan
#      colcrypt-keyd and colcrypt-keyctl;
#   2. pg_regress against an ASan+UBSan build of the extension (clang,
#      -shared-libasan), loaded by a postmaster that is not ASan-built
#      through LD_PRELOAD of clang's ASan runtime (COLCRYPT_ASAN_EXTENSION=0
#      skips it);
#   3. valgrind memcheck of a (normal) keyd serving a scripted session.
# Like `make test` it installs the extension into the system Postgres, which
# every work tree shares: run it under the install lock
#   flock /tmp/colcrypt-install.lock make test-sanitize
# It is not part of `make test` (docs/reliability.md says why).
set -euo pipefail

src=$(cd "$(dirname "$0")/.." && pwd)
cd "$src"
build=${CMAKE_BUILD_DIR:-build}
asan_build=${COLCRYPT_ASAN_BUILD_DIR:-build-asan}
jobs=$(nproc 2>/dev/null || echo 2)
[ "$jobs" -le 2 ] || jobs=2

step() { printf '\n==> %s\n' "$*"; }

[ "$(id -u)" -eq 0 ] || { echo "test-sanitize: run as root (sudo make test-sanitize)" >&2; exit 1; }
./scripts/install-deps.sh
pgxs_cxx=()
if command -v ccache >/dev/null; then
  pgxs_cxx=(CXX="ccache g++")
  export CMAKE_CXX_COMPILER_LAUNCHER=ccache
fi
started=$(date +%s)

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

step "normal build (the extension to install, keyd for valgrind)"
make -j"$jobs" COLCRYPT_WERROR=1 "${pgxs_cxx[@]}"
make COLCRYPT_WERROR=1 CMAKE_BUILD_DIR="$build" "${pgxs_cxx[@]}" install
cmake -S . -B "$build" -DCOLCRYPT_WERROR=ON >/dev/null
cmake --build "$build" -j"$jobs" --target colcrypt-keyd colcrypt-keyctl colcrypt-bench-keyd

step "ASan+UBSan build of keyd, keyctl and the tests ($asan_build)"
cmake -S . -B "$asan_build" -DCOLCRYPT_WERROR=ON -DCOLCRYPT_SANITIZE=ON
cmake --build "$asan_build" -j"$jobs" --target colcrypt-keyd colcrypt-keyctl colcrypt-unit-tests \
  colcrypt-integration-tests

step "unit, Wycheproof and integration tests under ASan+UBSan"
# Only the suites: pg_regress runs below with the extension under ASan too,
# valgrind wants the normal build, the packaging tests have nothing to sanitize.
(cd "$asan_build" && ctest --output-on-failure -R '^(unit|wycheproof|integration)$')

if [ "${COLCRYPT_ASAN_EXTENSION:-1}" != 1 ]; then
  step "pg_regress with an ASan colcrypt.so: skipped (COLCRYPT_ASAN_EXTENSION=0)"
else
  step "pg_regress with an ASan+UBSan colcrypt.so in a postmaster preloading clang's ASan runtime"
  ext=$(mktemp -d /tmp/colcrypt-asan-ext.XXXXXX)
  libs=$(mktemp -d /tmp/colcrypt-asan-libs.XXXXXX)
  reports=$(mktemp -d /tmp/colcrypt-asan-reports.XXXXXX)
  chmod 0755 "$libs"
  chmod 0777 "$reports"
  pkglibdir=$(pg_config --pkglibdir)
  restore() {
    # Put back the ordinary build installed above, whatever happened.
    install -m 0755 "$src/colcrypt.so" "$pkglibdir/colcrypt.so"
    rm -rf "$ext" "$libs"
  }
  trap restore EXIT
  tar -C "$src" --exclude='./build*' --exclude='*.o' --exclude='*.d' --exclude='*.so' \
    --exclude=./.git --exclude='./results' -cf - . | tar -C "$ext" -xf -
  clang_cxx=clang++
  command -v ccache >/dev/null && clang_cxx="ccache clang++"
  # clang, not GCC: -shared-libasan makes colcrypt.so need the runtime the
  # postmaster preloads. No -Werror: PGXS passes GCC-only warning options,
  # which clang reports (the GCC build above is the warnings gate).
  make -C "$ext" -j"$jobs" CC=clang CXX="$clang_cxx" COLCRYPT_SANITIZE=1 \
    COLCRYPT_SANITIZE_LINK=-shared-libasan >/dev/null
  install -m 0755 "$ext/colcrypt.so" "$pkglibdir/colcrypt.so"
  runtime=$(clang++ -print-file-name=libclang_rt.asan-x86_64.so)
  # The runtime initializes in its own constructor, which ld.so runs after
  # those of every library it does not depend on; a library constructor that
  # mallocs inside a glibc lock (libgpg-error's bindtextdomain, libp11-kit's
  # newlocale) then initializes ASan there, and ASan's dlerror() takes the
  # same lock: the postmaster hangs before main() (docs/reliability.md). So
  # the postmaster gets copies of its libraries that have constructors, each
  # made to need the runtime: it initializes before all of them.
  skip=" $(ldd "$runtime" | awk '/=>/ {print $1}' | tr '\n' ' ') "
  pg_bin=$(pg_config --bindir)
  while read -r name path; do
    case "$skip" in *" $name "*) continue ;; esac
    case "$name" in libc.so.*) continue ;; esac
    readelf -d "$path" | grep -qE '\((INIT|INIT_ARRAY)\)' || continue
    cp "$path" "$libs/$name"
    patchelf --add-needed "$runtime" "$libs/$name"
  done < <(ldd "$pg_bin/postgres" | awk '/=> \// {print $1, $3}')
  # Postgres itself is not instrumented and frees its memory contexts wholesale:
  # leak checks would report the server, not colcrypt. Reports go to files.
  SANDBOX_PG_ENV="LD_PRELOAD=$runtime LD_LIBRARY_PATH=$libs"
  SANDBOX_PG_ENV+=" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:log_path=$reports/asan"
  SANDBOX_PG_ENV+=" UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:log_path=$reports/ubsan"
  export SANDBOX_PG_ENV
  rc=0
  ./scripts/regress.sh "$asan_build/colcrypt-keyd" "$asan_build/colcrypt-keyctl" || rc=$?
  if compgen -G "$reports/*" >/dev/null; then
    echo "test-sanitize: sanitizer reports from the server:" >&2
    cat "$reports"/* >&2
    rc=1
  fi
  rm -rf "$reports"
  [ "$rc" -eq 0 ] || exit "$rc"
  restore
  trap - EXIT
fi

step "valgrind memcheck of colcrypt-keyd"
./scripts/valgrind-keyd.sh "$build"

echo "test-sanitize: passed in $(($(date +%s) - started))s"
