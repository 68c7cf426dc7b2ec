-- Parallel query: the functions are PARALLEL SAFE because every worker is its
-- own process that fetches its keys from keyd (the GUCs travel with it).

CREATE TABLE parallel_data (id int, v colcrypt.encrypted, b colcrypt.encrypted)
    WITH (parallel_workers = 2);
INSERT INTO parallel_data
    SELECT i, colcrypt.encrypt_field(i::text, 'regress_key', 'par'),
           colcrypt.encrypt_field(int4send(i), 'regress_other')
      FROM generate_series(1, 20000) i;
ANALYZE parallel_data;

SET parallel_setup_cost = 0;
SET parallel_tuple_cost = 0;
SET min_parallel_table_scan_size = 0;
SET max_parallel_workers_per_gather = 2;
-- the workers do all the decryption
SET parallel_leader_participation = off;

EXPLAIN (COSTS OFF)
SELECT sum(colcrypt.decrypt_field(v, 'par')::int) FROM parallel_data;
SELECT sum(colcrypt.decrypt_field(v, 'par')::int) AS sum, sum(id) AS expected FROM parallel_data;

-- EXPLAIN ANALYZE shows that two workers ran (row counts per worker vary)
CREATE FUNCTION pg_temp.explain_analyze(query text) RETURNS SETOF text
    LANGUAGE plpgsql
    AS $$
DECLARE
    line text;
BEGIN
    FOR line IN EXECUTE 'EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) ' || query LOOP
        RETURN NEXT regexp_replace(regexp_replace(line, 'rows=\d+ loops=\d+', 'rows=N loops=N'),
                                   'Removed by Filter: \d+', 'Removed by Filter: N');
    END LOOP;
END
$$;
SELECT * FROM pg_temp.explain_analyze(
    'SELECT count(*) FROM parallel_data WHERE colcrypt.decrypt_field(v, ''par'')::int % 7 = 0'
    || ' AND get_byte(colcrypt.decrypt_field_bytea(b), 3) >= 0');
SELECT count(*) AS multiples_of_7,
       count(*) FILTER (WHERE ('x' || encode(colcrypt.decrypt_field_bytea(b), 'hex'))::bit(32)::int = id)
       AS bytea_matches
  FROM parallel_data
 WHERE colcrypt.decrypt_field(v, 'par')::int % 7 = 0;

-- encryption in workers too
EXPLAIN (COSTS OFF)
SELECT count(*) FROM parallel_data
 WHERE colcrypt.decrypt_field(colcrypt.encrypt_field(id::text, 'regress_other', 'w'), 'w') = id::text;
SELECT count(*) AS roundtrips FROM parallel_data
 WHERE colcrypt.decrypt_field(colcrypt.encrypt_field(id::text, 'regress_other', 'w'), 'w') = id::text;

RESET parallel_leader_participation;
RESET max_parallel_workers_per_gather;
RESET min_parallel_table_scan_size;
RESET parallel_tuple_cost;
RESET parallel_setup_cost;
DROP TABLE parallel_data;
