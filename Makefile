# colcrypt — PGXS build and install of the extension, and the project's entry
# points. The Postgres-free parts (keyd, keyctl, tests) build with CMake into
# build/; `make install` installs both.

# The extension's SQL version: extension/colcrypt.sql is its install script,
# copied to colcrypt--$(EXTVERSION).sql at build. Released versions keep their
# committed install script (colcrypt--X.sql, never edited again), and every
# release has an upgrade script from the one before (colcrypt--X--Y.sql):
# docs/upgrading.md. Keep default_version in extension/colcrypt.control equal.
EXTVERSION = 0.2.0

MODULE_big = colcrypt
OBJS = $(patsubst %.cpp,%.o,$(sort $(wildcard src/pg/*.cpp src/client/*.cpp src/core/*.cpp)))
DATA_built = extension/colcrypt--$(EXTVERSION).sql
# Every committed script: released install scripts and all upgrade scripts.
DATA = extension/colcrypt.control \
	$(filter-out $(DATA_built),$(sort $(wildcard extension/colcrypt--*.sql)))
# Without EXTENSION (the control file is not at the top level), PGXS would install DATA into contrib/.
MODULEDIR = extension
REGRESS = $(patsubst sql/%.sql,%,$(sort $(wildcard sql/*.sql)))
REGRESS_OPTS = --inputdir=. --dbname=colcrypt_regression

PG_CPPFLAGS = -I$(CURDIR)/src -I$(CURDIR)
PG_CXXFLAGS = -std=c++17 -Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers
ifeq ($(COLCRYPT_WERROR),1)
PG_CXXFLAGS += -Werror
endif
# PGXS tracks no header dependencies for C++: let the compiler write them, or a
# changed header leaves objects built against the old struct layouts.
PG_CXXFLAGS += -MMD -MP
# An ASan+UBSan build of the extension (scripts/test-sanitize.sh builds it in
# a copy of the tree and runs it in a postmaster that preloads libasan).
ifeq ($(COLCRYPT_SANITIZE),1)
PG_CXXFLAGS += -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer
# GCC's false positives under the sanitizers (see CMakeLists.txt).
PG_CXXFLAGS += -Wno-maybe-uninitialized
endif
EXTRA_CLEAN = $(OBJS:.o=.d)
SHLIB_LINK = -lcrypto -lstdc++
ifeq ($(COLCRYPT_SANITIZE),1)
# COLCRYPT_SANITIZE_LINK: -shared-libasan with clang (scripts/test-sanitize.sh).
SHLIB_LINK += -fsanitize=address,undefined $(COLCRYPT_SANITIZE_LINK)
endif
# Debian's PG 15 would build LLVM bitcode with clang, which ignores PG_CXXFLAGS;
# the extension gains nothing from JIT inlining, so skip it. `override`: PGXS's
# Makefile.global would reset a plain assignment (its `with_llvm = yes`).
override with_llvm = no

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs 2>/dev/null)
ifneq ($(wildcard $(PGXS)),)
include $(PGXS)
else
all:
	@echo "postgresql-server-dev-15 is missing: run 'make deps' (or 'make demo' / 'make test')" >&2; exit 1
endif

-include $(OBJS:.o=.d)

extension/colcrypt--$(EXTVERSION).sql: extension/colcrypt.sql
	cp $< $@

CMAKE_BUILD_DIR ?= build
PREFIX ?= /usr/local

.PHONY: deps tools install-tools demo demo-stop test test-sanitize fuzz bench bench-file deb load crash
deps:
	./scripts/install-deps.sh

# Only what `make install` ships; the tests are built by scripts/test.sh.
tools:
	cmake -S . -B $(CMAKE_BUILD_DIR) -DCOLCRYPT_WERROR=$(if $(COLCRYPT_WERROR),ON,OFF)
	cmake --build $(CMAKE_BUILD_DIR) -j$$(nproc) --target colcrypt-keyd colcrypt-keyctl colcrypt-file

install: install-tools
install-tools: tools
	install -d $(DESTDIR)$(PREFIX)/bin
	install -m 0755 $(CMAKE_BUILD_DIR)/colcrypt-keyd $(CMAKE_BUILD_DIR)/colcrypt-keyctl $(CMAKE_BUILD_DIR)/colcrypt-file $(DESTDIR)$(PREFIX)/bin/

# The README's two commands.
demo:
	./scripts/demo.sh

demo-stop:
	./scripts/demo.sh stop

test:
	./scripts/test.sh

# Debian packages postgresql-15-colcrypt and colcrypt-keyd, built by
# scripts/deb.sh in build/deb/ (debian/ holds the packaging).
deb:
	./scripts/deb.sh

# The unit, Wycheproof and integration tests, pg_regress and a valgrind run of
# keyd against ASan+UBSan builds in build-asan/ (docs/reliability.md).
test-sanitize:
	./scripts/test-sanitize.sh

# Every libFuzzer target of fuzz/ for FUZZ_SECONDS each, under ASan+UBSan,
# built with clang in build-fuzz/ (docs/reliability.md).
FUZZ_SECONDS ?= 60
FUZZ_BUILD_DIR ?= build-fuzz
fuzz:
	CXX=clang++ cmake -S . -B $(FUZZ_BUILD_DIR) -DCOLCRYPT_FUZZ=ON
	cmake --build $(FUZZ_BUILD_DIR) -j2
	./fuzz/run.sh $(FUZZ_BUILD_DIR) $(FUZZ_SECONDS)

# The benchmark suite (bench/run.sh): its own cluster and keyd, report in bench/RESULTS.md.
bench:
	./bench/run.sh

# Crash consistency at every write point of keyd's store and audit log, in
# every fault mode (make test takes every 8th point); docs/reliability.md.
crash:
	cmake -S . -B $(CMAKE_BUILD_DIR) -DCOLCRYPT_WERROR=$(if $(COLCRYPT_WERROR),ON,OFF)
	cmake --build $(CMAKE_BUILD_DIR) -j2 --target colcrypt-integration-tests colcrypt-keyd colcrypt-keyctl
	COLCRYPT_CRASH_STRIDE=1 $(CMAKE_BUILD_DIR)/colcrypt-integration-tests "[crash]"

# keyd under hostile load and Postgres sessions while keyd is killed
# (tests/load/run.sh, LOAD_SECONDS each, default 60; docs/reliability.md).
# Installs the extension (keyd and keyctl only into the build directory).
LOAD_SECONDS ?= 60
load:
	$(MAKE) --no-print-directory
	$(MAKE) --no-print-directory PREFIX=$(abspath $(CMAKE_BUILD_DIR))/load-prefix install
	cmake --build $(CMAKE_BUILD_DIR) -j2 --target colcrypt-load-keyd colcrypt-load-pg
	./tests/load/run.sh $(CMAKE_BUILD_DIR)/colcrypt-keyd $(CMAKE_BUILD_DIR)/colcrypt-keyctl \
	  $(CMAKE_BUILD_DIR)/colcrypt-load-keyd $(CMAKE_BUILD_DIR)/colcrypt-load-pg $(LOAD_SECONDS)

# colcrypt-file against openssl speed, age and gpg, and its memory (bench/FILE_RESULTS.md).
bench-file: tools
	./bench/file.sh $(CMAKE_BUILD_DIR)/colcrypt-file $(CMAKE_BUILD_DIR)/colcrypt-keyd $(CMAKE_BUILD_DIR)/colcrypt-keyctl
