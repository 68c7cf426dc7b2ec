-- CREATE TABLE AS, SELECT INTO and CREATE TABLE ... AS EXECUTE check every
-- row as they store it (what colcrypt.sealed() checks), so the sealed checks
-- the event trigger adds to the new table are valid without a scan of it.
-- pg_stat_user_tables.seq_scan of the new table shows the scan is gone (it
-- was 1: the validation scan). docs/columns.md, "Sealed checks".

-- This session has not loaded the library yet: the first CREATE TABLE AS
-- loads it through its own ddl_command_start trigger, and is checked as well.
CREATE TABLE ct_first AS
  SELECT g AS id, colcrypt.encrypt_field('first-' || g, 'regress_key') AS c
    FROM generate_series(1, 100) g;
CREATE TABLE ct_src AS
  SELECT g AS id, 'value-' || g AS v, colcrypt.encrypt_field('value-' || g, 'regress_key') AS c
    FROM generate_series(1, 100) g;
CREATE TYPE ct_pair AS (n int, e colcrypt.encrypted);
CREATE DOMAIN ct_dom AS colcrypt.encrypted;
-- sealed values: key-bound and keyless columns, arrays, composites, domains
CREATE TABLE ct_kinds AS
  SELECT id, c, ARRAY[c, c] AS arr, ROW(id, c)::ct_pair AS pair, c::ct_dom AS dom,
         ARRAY[ROW(id, c)::ct_pair] AS pairs,
         v::colcrypt.encrypted('regress_key', 'ct_kinds.k') AS k
    FROM ct_src;
SELECT g AS id, colcrypt.encrypt_field('into-' || g, 'regress_key') AS c
  INTO ct_select_into FROM generate_series(1, 10) g;
PREPARE ct_rows AS SELECT id, c, ARRAY[c] AS arr FROM ct_src;
CREATE TABLE ct_execute AS EXECUTE ct_rows;
-- column names given: the checks are named after them
CREATE TABLE ct_renamed (i, sealed_value) AS SELECT id, c FROM ct_src;
SELECT conrelid::regclass AS "table", conname, convalidated, pg_get_constraintdef(oid)
  FROM pg_constraint
 WHERE conrelid::regclass::text LIKE 'ct\_%' AND contype = 'c'
 ORDER BY 1, 2;
SELECT pg_stat_force_next_flush();
SELECT relname, seq_scan FROM pg_stat_user_tables
 WHERE relname LIKE 'ct\_%' AND relname <> 'ct_src' ORDER BY 1;
SELECT count(*) FILTER (WHERE colcrypt.decrypt_field(c) = 'value-' || id
                          AND colcrypt.decrypt_field((pair).e) = 'value-' || id
                          AND k::text = 'value-' || id) AS decrypted
  FROM ct_kinds;

-- a CREATE TABLE AS in a function called by another: each is checked, and
-- each gets its checks without a scan; one that fails inside an exception
-- block leaves the outer one's result intact
CREATE FUNCTION ct_inner(n int) RETURNS int LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('CREATE TABLE ct_nested_%s AS SELECT id, c FROM ct_src', n);
    BEGIN
        CREATE TABLE ct_nested_bad AS SELECT '{plaintext}'::colcrypt.encrypted[] AS v;
    EXCEPTION WHEN invalid_text_representation THEN
        RAISE NOTICE 'inner CREATE TABLE AS refused: %', SQLERRM;
    END;
    RETURN n;
END $$;
CREATE TABLE ct_outer AS SELECT ct_inner(1) AS n, c FROM ct_src WHERE id = 1;
SELECT relname FROM pg_class WHERE relname LIKE 'ct\_nested%' ORDER BY 1;
SELECT conrelid::regclass AS "table", conname, convalidated FROM pg_constraint
 WHERE conrelid IN ('ct_outer'::regclass, 'ct_nested_1'::regclass) ORDER BY 1, 2;
SELECT pg_stat_force_next_flush();
SELECT relname, seq_scan FROM pg_stat_user_tables
 WHERE relname IN ('ct_outer', 'ct_nested_1') ORDER BY 1;

-- a plaintext that was never encrypted is refused before the row is stored,
-- with the error of colcrypt.sealed(), naming the check and the new table;
-- no table is made
CREATE TABLE ct_bad AS SELECT id, ARRAY[c, 'plaintext'::colcrypt.encrypted] AS arr FROM ct_src;
\echo :SQLSTATE
CREATE TABLE ct_bad (x, y) AS SELECT 1, ROW(1, 'plaintext')::ct_pair;
\echo :SQLSTATE
SELECT '{plaintext}'::colcrypt.encrypted[] AS arr INTO ct_bad;
\echo :SQLSTATE
-- (a value too large to stay in the row: the validation scan skipped it,
-- since it reads values stored out of line as checked)
CREATE TABLE ct_bad AS
  SELECT ('{' || string_agg('plaintext-' || g, ',') || '}')::colcrypt.encrypted[] AS arr
    FROM generate_series(1, 300) g;
\echo :SQLSTATE
-- (CREATE TABLE ... AS EXECUTE of a plan cached before: 08_columns)
SELECT count(*) AS tables_made FROM pg_class WHERE relname = 'ct_bad';

-- unchanged: WITH NO DATA (validated: an empty table), materialized views
-- (no constraints)
CREATE TABLE ct_empty AS SELECT id, c FROM ct_src WITH NO DATA;
SELECT conname, convalidated FROM pg_constraint WHERE conrelid = 'ct_empty'::regclass;
CREATE MATERIALIZED VIEW ct_mv AS SELECT id, c, ARRAY[c] AS arr FROM ct_src;
SELECT count(*) AS mv_rows FROM ct_mv;
DROP MATERIALIZED VIEW ct_mv;

-- EXPLAIN fires no event triggers: EXPLAIN ANALYZE would make a table
-- without sealed checks, so it is refused when the table would hold
-- colcrypt.encrypted; EXPLAIN alone makes no table
EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF)
  CREATE TABLE ct_explained AS SELECT id, c FROM ct_src;
\echo :SQLSTATE
EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF)
  SELECT id, ARRAY[c] AS arr INTO ct_explained FROM ct_src;
\echo :SQLSTATE
-- (also in a session whose EXPLAIN loads the library only as the query starts)
\c -
EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF)
  CREATE TABLE ct_explained AS SELECT id, colcrypt.encrypt_field(v, 'regress_key') AS c FROM ct_src;
\echo :SQLSTATE
EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF)
  CREATE TABLE ct_explained AS SELECT id, c FROM ct_src WITH NO DATA;
\echo :SQLSTATE
EXPLAIN (COSTS OFF) CREATE TABLE ct_explained AS SELECT id, c FROM ct_src;
SELECT count(*) AS tables_made FROM pg_class WHERE relname = 'ct_explained';
EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF)
  CREATE TABLE ct_explained AS SELECT id, v FROM ct_src;
SELECT count(*) AS plain_rows FROM ct_explained;

DROP FUNCTION ct_inner(int);
DROP TABLE ct_first, ct_src, ct_kinds, ct_select_into, ct_execute, ct_renamed, ct_outer,
           ct_nested_1, ct_empty, ct_explained;
DROP DOMAIN ct_dom;
DROP TYPE ct_pair;
