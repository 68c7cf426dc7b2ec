#!/usr/bin/env bash
# The README's test command (`make test`) and what .ci/run calls: installs what
# is missing, builds everything with warnings as errors, installs the extension
# and the daemon, then runs every test through ctest: unit, wycheproof (skipped
# when the vectors are absent), integration and pg_regress; then a smoke run of
# every fuzz target (build-fuzz/, ctest fuzz-smoke).
set -euo pipefail

src=$(cd "$(dirname "$0")/.." && pwd)
cd "$src"
build=${CMAKE_BUILD_DIR:-build}
jobs=$(nproc 2>/dev/null || echo 2)
[ "$jobs" -le 2 ] || jobs=2

step() { printf '\n==> %s\n' "$*"; }

[ "$(id -u)" -eq 0 ] || { echo "test: run as root (sudo make test): the tests install the extension and start postgres as the postgres user" >&2; exit 1; }

step "dependencies"
./scripts/install-deps.sh

# ccache, where installed (it is no dependency), makes builds in several work
# trees cheap.
pgxs_cxx=()
if command -v ccache >/dev/null; then
  pgxs_cxx=(CXX="ccache g++")
  export CMAKE_CXX_COMPILER_LAUNCHER=ccache
fi

step "extension (PGXS, warnings are errors)"
make -j"$jobs" COLCRYPT_WERROR=1 "${pgxs_cxx[@]}"
step "install extension, colcrypt-keyd and colcrypt-keyctl"
make COLCRYPT_WERROR=1 CMAKE_BUILD_DIR="$build" "${pgxs_cxx[@]}" install

step "tools and tests (CMake, warnings are errors)"
cmake -S . -B "$build" -DCOLCRYPT_WERROR=ON
cmake --build "$build" -j"$jobs"

step "ctest"
(cd "$build" && ctest --output-on-failure)

# The fuzz targets (clang, libFuzzer, ASan+UBSan) in their own build
# directory, and a few seconds of each (ctest fuzz-smoke), so none can rot.
step "fuzz targets: build and smoke run (build-fuzz)"
CXX=clang++ cmake -S . -B build-fuzz -DCOLCRYPT_FUZZ=ON >/dev/null
cmake --build build-fuzz -j"$jobs"
(cd build-fuzz && ctest --output-on-failure -R '^fuzz-smoke$')
