#!/usr/bin/env bash
# `make deb`: builds the Debian packages postgresql-15-colcrypt and
# colcrypt-keyd (debian/) from a copy of the source tree in build/deb/src, so
# that dpkg-buildpackage writes nothing into the tree itself, then collects
# them in build/deb/ (debug symbols in build/deb/dbgsym/) and runs lintian on
# them (errors fail the build).
#   COLCRYPT_DEB_DIR      where the packages go (default: build/deb)
#   COLCRYPT_DEB_LINTIAN  0: no lintian (ctest `deb` leaves it to `make deb`)
#   DEB_BUILD_OPTIONS     passed on, after parallel=2 (e.g. noddebs nocheck)
set -euo pipefail

src=$(cd "$(dirname "$0")/.." && pwd)
out=${COLCRYPT_DEB_DIR:-$src/build/deb}
jobs=$(nproc 2>/dev/null || echo 2)
[ "$jobs" -le 2 ] || jobs=2

say() { printf 'deb: %s\n' "$*"; }
die() { printf 'deb: error: %s\n' "$*" >&2; exit 1; }

"$src/scripts/install-deps.sh" >/dev/null
version=$(dpkg-parsechangelog -l "$src/debian/changelog" -S Version)
stage=$out/src/colcrypt-$version

# Only what belongs to the source: tracked and new files, not build outputs.
rm -rf "$out/src" "$out/dbgsym"
rm -f "$out"/*.deb "$out"/*.buildinfo "$out"/*.changes
mkdir -p "$stage" "$out/dbgsym"
if git -C "$src" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git -C "$src" ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do
      # A deleted tracked file is listed too: skip it (an if, so that the
      # loop's status stays 0 under pipefail).
      if [ -e "$src/$f" ]; then printf '%s\0' "$f"; fi
    done |
    tar -C "$src" --null -T - -cf - | tar -xf - -C "$stage"
else
  tar -C "$src" --exclude-vcs --exclude=./build --exclude='./build-*' --exclude='*.o' \
    --exclude='*.so' --exclude='*.d' -cf - . | tar -xf - -C "$stage"
fi

# ccache, where installed, makes rebuilds cheap (rules passes it to PGXS).
command -v ccache >/dev/null && export CMAKE_CXX_COMPILER_LAUNCHER=ccache
say "building $version in $stage"
(cd "$stage" && DEB_BUILD_OPTIONS="parallel=$jobs ${DEB_BUILD_OPTIONS:-}" \
  dpkg-buildpackage -b -us -uc >"$out/build.log" 2>&1) ||
  { tail -n 40 "$out/build.log" >&2; die "dpkg-buildpackage failed; log: $out/build.log"; }
# `apt-get install ./build/deb/*.deb` installs the two packages, not their symbols.
mv "$out/src"/*-dbgsym_*.deb "$out/dbgsym/" 2>/dev/null || true
mv "$out/src"/*.deb "$out/src"/*.buildinfo "$out/src"/*.changes "$out/"
rm -rf "$out/src"

if [ "${COLCRYPT_DEB_LINTIAN:-1}" = 0 ]; then
  say "lintian skipped (COLCRYPT_DEB_LINTIAN=0)"
elif command -v lintian >/dev/null; then
  say "lintian"
  shopt -s nullglob
  lintian --fail-on error "$out"/*.deb "$out"/dbgsym/*.deb ||
    die "lintian found errors in the packages"
fi
say "packages in $out:"
ls -1 "$out"/*.deb
