-- Access: nothing for PUBLIC; the role colcrypt_user (created by the
-- extension) may use the schema and the functions. The GUCs are superuser-only.

SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname = 'colcrypt_user';
SELECT has_schema_privilege('public', 'colcrypt', 'USAGE') AS public_usage,
       has_schema_privilege('colcrypt_user', 'colcrypt', 'USAGE') AS member_usage;
SELECT p.oid::regprocedure AS function,
       has_function_privilege('public', p.oid, 'EXECUTE') AS public_execute,
       has_function_privilege('colcrypt_user', p.oid, 'EXECUTE') AS member_execute
  FROM pg_proc p
 WHERE p.pronamespace = 'colcrypt'::regnamespace
 ORDER BY p.oid::regprocedure::text;

CREATE ROLE regress_colcrypt_outsider;
CREATE ROLE regress_colcrypt_app IN ROLE colcrypt_user;
CREATE TABLE access_data (id int, v colcrypt.encrypted);
INSERT INTO access_data VALUES (1, colcrypt.encrypt_field('for members only', 'regress_key'));
GRANT SELECT, INSERT ON access_data TO regress_colcrypt_outsider, regress_colcrypt_app;

-- a role without colcrypt_user: no schema, no functions
SET ROLE regress_colcrypt_outsider;
SELECT colcrypt.decrypt_field(v) FROM access_data;
\echo :SQLSTATE
SELECT colcrypt.encrypt_field('x', 'regress_key');
\echo :SQLSTATE
-- it may read the column, which is ciphertext (type I/O needs no grant)
SELECT id, format('%s', v) LIKE 'colcrypt:%' AS ciphertext FROM access_data;
-- and its own tables work as usual: colcrypt's DDL event triggers and
-- planner hook must not need the schema (a catalog lookup, no USAGE check)
CREATE TEMP TABLE outsider_own (id int, note text);
INSERT INTO outsider_own VALUES (1, 'plain');
CREATE TEMP TABLE outsider_copy AS SELECT * FROM outsider_own;
ALTER TABLE outsider_copy ADD COLUMN extra int;
UPDATE outsider_copy SET extra = 2;
SELECT * FROM outsider_copy;
-- a copy of the encrypted column needs the schema (its sealed check does)
\set VERBOSITY terse
CREATE TEMP TABLE outsider_cipher AS SELECT * FROM access_data;
\set VERBOSITY default
\echo :SQLSTATE
DROP TABLE outsider_own, outsider_copy;
RESET ROLE;

-- USAGE on the schema alone is not enough: EXECUTE is revoked from PUBLIC
GRANT USAGE ON SCHEMA colcrypt TO regress_colcrypt_outsider;
SET ROLE regress_colcrypt_outsider;
SELECT colcrypt.decrypt_field(v) FROM access_data;
\echo :SQLSTATE
SELECT colcrypt.key_version(v) FROM access_data;
\echo :SQLSTATE
RESET ROLE;
REVOKE USAGE ON SCHEMA colcrypt FROM regress_colcrypt_outsider;

-- a member of colcrypt_user may call the functions, but every key needs a
-- privilege of its own (08_grants tests them in depth): none yet
SET ROLE regress_colcrypt_app;
SELECT colcrypt.encrypt_field('x', 'regress_key');
\echo :SQLSTATE
SELECT colcrypt.decrypt_field(v) FROM access_data;
\echo :SQLSTATE
RESET ROLE;
SELECT colcrypt.grant_key('regress_key', 'regress_colcrypt_app', 'encrypt'),
       colcrypt.grant_key('regress_key', 'regress_colcrypt_app', 'decrypt');

-- with them, it encrypts and decrypts
SET ROLE regress_colcrypt_app;
INSERT INTO access_data VALUES (2, colcrypt.encrypt_field('written by the app', 'regress_key', 'app'));
SELECT id, CASE id WHEN 1 THEN colcrypt.decrypt_field(v) ELSE colcrypt.decrypt_field(v, 'app') END
       AS plaintext
  FROM access_data ORDER BY id;
SELECT colcrypt.key_name(v), colcrypt.key_version(v) FROM access_data WHERE id = 2;
-- but cannot point the backend at another keyd or change the cache
SET colcrypt.keyd_socket = '/tmp/not-keyd.sock';
\echo :SQLSTATE
SET colcrypt.key_cache_ttl = 0;
\echo :SQLSTATE
RESET ROLE;

DROP TABLE access_data;
SELECT colcrypt.revoke_key('regress_key', 'regress_colcrypt_app');
DROP ROLE regress_colcrypt_outsider, regress_colcrypt_app;
