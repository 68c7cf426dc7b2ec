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
DROP TABLE lc;
