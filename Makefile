# colcrypt — PGXS build and install of the extension, and the project's entry
# points. The Postgres-free parts (keyd, keyctl, tests) build with CMake into
# build/; `make install` installs both.

EXTVERSION = 0.1.0

MODULE_big = colcrypt
OBJS = $(patsubst %.cpp,%.o,$(sort $(wildcard src/pg/*.cpp src/client/*.cpp src/core/*.cpp)))
DATA_built = extension/colcrypt--$(EXTVERSION).sql
DATA = extension/colcrypt.control $(wildcard extension/colcrypt--*--*.sql)
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
EXTRA_CLEAN = $(OBJS:.o=.d)
SHLIB_LINK = -lcrypto -lstdc++
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

.PHONY: deps tools install-tools demo demo-stop test bench bench-file deb load
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

# The benchmark suite (bench/run.sh): its own cluster and keyd, report in bench/RESULTS.md.
bench:
	./bench/run.sh

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
