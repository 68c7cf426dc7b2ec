-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION colcrypt UPDATE" to load this file. \quit

-- colcrypt 0.1.0 -> 0.2.0. Every change to extension/colcrypt.sql since 0.1.0
-- is repeated here, so that an updated database equals a fresh 0.2.0 install
-- (tests/integration/test_upgrade.cpp compares the two); docs/upgrading.md.
