-- Key lifecycle from SQL (issue 3): rewrap, rotate_key, rotation jobs and
-- their progress view. keyd in the regress sandbox has no --database and no
-- --sql-rotate: jobs stay pending, rotate_key is refused.
\set VERBOSITY terse
CREATE TABLE lc (id int, v colcrypt.encrypted);
INSERT INTO lc SELECT g, colcrypt.encrypt_field('lc' || g, 'regress_key')
  FROM generate_series(1, 3) g;

-- A value already under the primary version comes back unchanged (idempotent).
SELECT count(*) AS unchanged FROM lc WHERE colcrypt.ciphertext(colcrypt.rewrap(v)) = colcrypt.ciphertext(v);
SELECT colcrypt.decrypt_field(colcrypt.rewrap(v)) FROM lc ORDER BY id;
-- Context form; NULL in, NULL out.
SELECT colcrypt.decrypt_field(
         colcrypt.rewrap(colcrypt.encrypt_field('ctx', 'regress_key', 'tenant-1'), 'tenant-1'),
         'tenant-1');
SELECT colcrypt.rewrap(NULL) IS NULL AS is_null;
SELECT pg_typeof(colcrypt.rewrap(v)) FROM lc LIMIT 1;
-- Volatile: never folded into a constant.
SELECT provolatile, proparallel FROM pg_proc
 WHERE oid = 'colcrypt.rewrap(colcrypt.encrypted)'::regprocedure;

-- keyd refuses rotation from SQL unless it runs with --sql-rotate.
SELECT colcrypt.rotate_key('regress_key');
SELECT colcrypt.rotate_key('bad name');

-- Jobs: pending until a keyd with --database picks them up.
SELECT colcrypt.start_rotation_job('regress_key') AS job;
SELECT colcrypt.start_rotation_job('regress_other', 8, 50) AS job;
SELECT job_id, p.key_name, p.target_version, p.state, p.rows_done, p.rows_total, percent,
       rows_per_second, j.batch_blocks, j.throttle_ms
  FROM colcrypt.rotation_progress p JOIN colcrypt.rotation_jobs j USING (job_id)
 ORDER BY job_id;
SELECT colcrypt.cancel_rotation_job(1);
SELECT colcrypt.cancel_rotation_job(1);  -- already cancelled: NULL
SELECT job_id, state, finished_at IS NOT NULL AS finished FROM colcrypt.rotation_progress
 ORDER BY job_id;
SELECT colcrypt.start_rotation_job('regress_key', 0);
SELECT colcrypt.start_rotation_job('regress_key', 64, -1);

-- Nothing for PUBLIC; colcrypt_user may watch progress and rewrap, not start jobs.
CREATE ROLE lc_plain;
SET ROLE lc_plain;
SELECT count(*) FROM colcrypt.rotation_progress;
RESET ROLE;
SET ROLE colcrypt_user;
SELECT count(*) FROM colcrypt.rotation_progress;
SELECT colcrypt.start_rotation_job('regress_key');
SELECT colcrypt.rotate_key('regress_key');
RESET ROLE;
DROP ROLE lc_plain;

-- Derived keys: a key per context under one named key (algorithm byte 3).
CREATE TABLE lc_tenant (tenant text, v colcrypt.encrypted);
INSERT INTO lc_tenant VALUES
  ('a', colcrypt.encrypt_derived('alpha', 'regress_key', 'tenant:a')),
  ('b', colcrypt.encrypt_derived('beta', 'regress_key', 'tenant:b')),
  ('a', colcrypt.encrypt_derived('\x0102'::bytea, 'regress_key', 'tenant:a'));
SELECT tenant, get_byte(decode(substring(colcrypt.ciphertext(v) FROM 10), 'base64'), 1) AS algorithm
  FROM lc_tenant ORDER BY tenant, 2;
SELECT tenant, colcrypt.decrypt_field_bytea(v, 'tenant:' || tenant) FROM lc_tenant ORDER BY 1, 2;
SELECT colcrypt.decrypt_field(v, 'tenant:' || tenant) FROM lc_tenant WHERE tenant = 'b';
-- Another tenant's context (or none) does not open it.
SELECT colcrypt.decrypt_field(v, 'tenant:a') FROM lc_tenant WHERE tenant = 'b';
SELECT colcrypt.decrypt_field(v) FROM lc_tenant WHERE tenant = 'b';
SELECT colcrypt.encrypt_derived('x', 'regress_key', '');
SELECT colcrypt.encrypt_derived('x', 'no_such_key', 'c');
-- rewrap keeps a derived value derived.
SELECT get_byte(decode(substring(colcrypt.ciphertext(colcrypt.rewrap(v, 'tenant:b')) FROM 10), 'base64'), 1)
  FROM lc_tenant WHERE tenant = 'b';
DROP TABLE lc_tenant;

-- Where values of keys live (issue 3): domains at any depth, arrays, JSON
-- values, materialized views, inheritance children once each; composite
-- types are named as uncountable.
CREATE DOMAIN lc_d1 AS colcrypt.encrypted;
CREATE DOMAIN lc_d2 AS lc_d1;
CREATE TABLE lc_shapes (a lc_d2, b colcrypt.encrypted[], c lc_d1[], d jsonb, e json[], f text);
CREATE TABLE lc_child () INHERITS (lc_shapes);
CREATE MATERIALIZED VIEW lc_mv AS SELECT a FROM lc_shapes;
SELECT table_name, column_name, relkind, shape, typmod, context
  FROM colcrypt.value_columns() WHERE table_name LIKE 'lc%' ORDER BY 1, 2;
INSERT INTO lc_shapes VALUES (
  colcrypt.encrypt_field('a', 'regress_key'),
  ARRAY[[colcrypt.encrypt_field('b1', 'regress_key'), NULL], [colcrypt.encrypt_field('b2', 'regress_key'), colcrypt.encrypt_field('b3', 'regress_key')]],
  ARRAY[colcrypt.encrypt_field('c', 'regress_key')]::lc_d1[],
  colcrypt.encrypt_json('{"x": {"y": [1, "two"]}, "z": "colcrypt:not-a-value"}', 'regress_key', ARRAY['x.y']),
  NULL, 'colcrypt:ignored in text');
INSERT INTO lc_child (a) VALUES (colcrypt.encrypt_field('child', 'regress_key'));
REFRESH MATERIALIZED VIEW lc_mv;
SELECT column_name, shape, version, values_count
  FROM colcrypt.key_references(colcrypt.key_id(colcrypt.encrypt_field('k', 'regress_key')))
 WHERE column_name LIKE 'public.lc%' ORDER BY 1;
-- try_ciphertext: NULL for anything that is not a value, never an error.
SELECT colcrypt.try_ciphertext('colcrypt:not-a-value') IS NULL AS not_value,
       colcrypt.try_ciphertext('hello') IS NULL AS plain,
       colcrypt.key_version(colcrypt.try_ciphertext(colcrypt.ciphertext(a))) AS version
  FROM lc_shapes;
-- rewrap of an array keeps dimensions, bounds and NULLs.
SELECT array_dims(colcrypt.rewrap_array(b)) AS dims,
       (SELECT string_agg(coalesce(colcrypt.decrypt_field(x), 'NULL'), ',') FROM unnest(colcrypt.rewrap_array(b)) x) AS elements,
       cardinality(colcrypt.rewrap_array('{}'::colcrypt.encrypted[])) AS empty
  FROM lc_shapes;
SELECT colcrypt.decrypt_field((colcrypt.rewrap_array(ARRAY[colcrypt.encrypt_field('t', 'regress_key', 'ctx')], 'ctx'))[1], 'ctx');
-- A composite type that holds values cannot be counted: the error names the column.
CREATE TYPE lc_pair AS (n int, v colcrypt.encrypted);
CREATE TABLE lc_comp (p lc_pair);
SELECT count(*) FROM colcrypt.key_references(colcrypt.key_id(colcrypt.encrypt_field('k', 'regress_key')));
DROP TABLE lc_comp;
DROP TYPE lc_pair;
-- _as_table_owner runs a command as the table's owner, only for a member of that role.
CREATE ROLE lc_owner;
CREATE ROLE lc_other;
CREATE TABLE lc_owned (who text);
ALTER TABLE lc_owned OWNER TO lc_owner;
SELECT colcrypt._as_table_owner('lc_owned', 'INSERT INTO public.lc_owned VALUES (current_user)');
SELECT who FROM lc_owned;
-- The owner's code cannot take the caller's role back (security-restricted).
SELECT colcrypt._as_table_owner('lc_owned', 'RESET ROLE');
GRANT EXECUTE ON FUNCTION colcrypt._as_table_owner(regclass, text) TO lc_other;
GRANT USAGE ON SCHEMA colcrypt TO lc_other;
SET ROLE lc_other;
SELECT colcrypt._as_table_owner('lc_owned', 'SELECT 1');
RESET ROLE;
DROP TABLE lc_owned;
REVOKE ALL ON SCHEMA colcrypt FROM lc_other;
REVOKE ALL ON FUNCTION colcrypt._as_table_owner(regclass, text) FROM lc_other;
DROP ROLE lc_owner;
DROP ROLE lc_other;
DROP MATERIALIZED VIEW lc_mv;
DROP TABLE lc_child;
DROP TABLE lc_shapes;
DROP DOMAIN lc_d2;
DROP DOMAIN lc_d1;
DROP TABLE lc;
