-- Per-key privileges: encrypt, decrypt and blind_index, granted per role with
-- colcrypt.grant_key (superusers only), inherited through role membership,
-- checked on every use of a key; a denial is 42501. Superusers pass.

CREATE ROLE regress_cc_writer IN ROLE colcrypt_user;
CREATE ROLE regress_cc_reader IN ROLE colcrypt_user;
CREATE ROLE regress_cc_readers;
CREATE ROLE regress_cc_member IN ROLE colcrypt_user, regress_cc_readers;
CREATE TABLE vault (id int, secret colcrypt.encrypted('regress_key', 'vault.secret'),
                    other colcrypt.encrypted('regress_other', 'vault.other'));
GRANT SELECT, INSERT, UPDATE ON vault TO regress_cc_writer, regress_cc_reader, regress_cc_member;

SELECT colcrypt.grant_key('regress_key', 'regress_cc_writer', 'encrypt');
SELECT colcrypt.grant_key('regress_key', 'regress_cc_reader', 'decrypt');
SELECT colcrypt.grant_key('regress_key', 'regress_cc_readers', 'all');
SELECT key_name, role, privilege FROM colcrypt.key_grants ORDER BY key_name, role::text, privilege;
-- unknown privileges and bad key names are refused
SELECT colcrypt.grant_key('regress_key', 'regress_cc_writer', 'read');
\echo :SQLSTATE
SELECT colcrypt.grant_key('bad key', 'regress_cc_writer', 'encrypt');
\echo :SQLSTATE
-- only superusers manage grants
SET ROLE regress_cc_writer;
SELECT colcrypt.grant_key('regress_key', 'regress_cc_writer', 'decrypt');
\echo :SQLSTATE
SELECT count(*) FROM colcrypt.key_grants;
\echo :SQLSTATE

-- the writer encrypts (a key-bound column, encrypt_field) but cannot decrypt
INSERT INTO vault (id, secret) VALUES (1, 'written by the writer');
SELECT colcrypt.key_version(colcrypt.encrypt_field('x', 'regress_key')) >= 1 AS encrypted;
SELECT secret::text FROM vault;
\echo :SQLSTATE
SELECT colcrypt.decrypt_field(secret) FROM vault;
\echo :SQLSTATE
SELECT colcrypt.decrypt_field_bytea(secret) FROM vault;
\echo :SQLSTATE
-- nor use another key
INSERT INTO vault (id, other) VALUES (2, 'other key');
\echo :SQLSTATE
SELECT colcrypt.encrypt_field('x', 'regress_other');
\echo :SQLSTATE
-- nor compute blind indexes
SELECT colcrypt.blind_index('x', 'regress_key');
\echo :SQLSTATE
-- each denial is reported to colcrypt-keyd, whose log records it (the
-- sandbox keeps keyd.log next to run/keyd.sock)
\! grep -q "denied: database role 'regress_cc_writer' may not decrypt with key 'regress_key'" "$(dirname "$(dirname "$COLCRYPT_KEYD_SOCKET")")/keyd.log" && echo logged
\! grep -q "denied: database role 'regress_cc_writer' may not blind_index with key 'regress_key'" "$(dirname "$(dirname "$COLCRYPT_KEYD_SOCKET")")/keyd.log" && echo logged
-- COPY into a key-bound column checks the privilege too
RESET ROLE;
COPY vault (id, secret) FROM STDIN;
3	copied by a superuser
\.

-- the reader decrypts but cannot encrypt
SET ROLE regress_cc_reader;
SELECT id, secret::text FROM vault ORDER BY id;
UPDATE vault SET secret = 'changed' WHERE id = 1;
\echo :SQLSTATE
-- arguments swapped by mistake: the "key name" is a plaintext, and neither the
-- error nor the denial reported to keyd may repeat it
SELECT colcrypt.encrypt_field('regress_key', '123-45-6789 secret');
\echo :SQLSTATE
-- a sealed value of the column written back is checked with the encrypt privilege as well
UPDATE vault SET secret = (SELECT colcrypt.ciphertext(secret) FROM vault WHERE id = 1) WHERE id = 1;
\echo :SQLSTATE

-- privileges are inherited through role membership
SET ROLE regress_cc_member;
INSERT INTO vault (id, secret) VALUES (4, 'member');
SELECT id, secret::text FROM vault ORDER BY id;
SELECT octet_length(colcrypt.blind_index('x', 'regress_key')) AS blind_index_bytes;

-- a revoke takes effect at once in this session, and at the next transaction elsewhere
RESET ROLE;
SELECT colcrypt.revoke_key('regress_key', 'regress_cc_readers', 'decrypt');
SET ROLE regress_cc_member;
SELECT secret::text FROM vault WHERE id = 4;
\echo :SQLSTATE
INSERT INTO vault (id, secret) VALUES (5, 'still may encrypt');
RESET ROLE;
SELECT colcrypt.revoke_key('regress_key', 'regress_cc_readers');
SELECT key_name, role, privilege FROM colcrypt.key_grants ORDER BY key_name, role::text, privilege;

-- a superuser passes every check
SELECT id, secret::text FROM vault ORDER BY id;

-- the catalogs are the extension's: nobody else may read or change them
SELECT has_table_privilege('regress_cc_member', 'colcrypt.key_grants', 'SELECT') AS read_grants,
       has_table_privilege('regress_cc_member', 'colcrypt.column_keys', 'INSERT') AS write_keys;
-- key_grants is dumped with the database; column_keys is rebuilt by the type
SELECT c.relname, c.oid = ANY (e.extconfig) AS dumped
  FROM pg_extension e, pg_class c
 WHERE e.extname = 'colcrypt' AND c.relnamespace = 'colcrypt'::regnamespace AND c.relkind = 'r'
   AND c.relname IN ('column_keys', 'key_grants')
 ORDER BY 1;
-- no SECURITY DEFINER code; the SQL-running functions pin their search_path
-- or are SQL-standard bodies (names bound when created); the catalogs are
-- read by the C code as their owner with search_path = pg_catalog, pg_temp
SELECT p.oid::regprocedure, l.lanname, p.prosecdef, p.proconfig,
       p.prosqlbody IS NOT NULL AS body_bound_at_creation
  FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
 WHERE p.pronamespace = 'colcrypt'::regnamespace AND l.lanname <> 'c'
   AND p.proname IN ('grant_key', 'revoke_key', '_privileges', '_json_walk', '_json_apply',
                     'encrypt_json', 'decrypt_json', 'encrypt_column')
 ORDER BY p.oid::regprocedure::text;

-- a grant counts only while its role (OID) still has the name it was granted
-- under: Postgres records no dependency of key_grants on roles, so after
-- DROP ROLE a new role may one day receive the same OID. (A new role cannot
-- be made to reuse an OID here; pointing the row at another role's OID is
-- exactly what it would look like. tests/integration forces a real reuse.)
CREATE ROLE regress_cc_gone IN ROLE colcrypt_user;
CREATE ROLE regress_cc_heir IN ROLE colcrypt_user;
GRANT SELECT ON vault TO regress_cc_heir;
SELECT colcrypt.grant_key('regress_key', 'regress_cc_gone', 'decrypt');
SELECT role::text, role_name FROM colcrypt.key_grants WHERE role_name = 'regress_cc_gone';
DROP ROLE regress_cc_gone;
UPDATE colcrypt.key_grants SET role = 'regress_cc_heir' WHERE role_name = 'regress_cc_gone';
SET ROLE regress_cc_heir;
SELECT secret::text FROM vault WHERE id = 1;
\echo :SQLSTATE
RESET ROLE;
-- granting the new role refreshes the row's name, and then it counts
SELECT colcrypt.grant_key('regress_key', 'regress_cc_heir', 'decrypt');
SELECT role::text, role_name FROM colcrypt.key_grants WHERE role = 'regress_cc_heir'::regrole;
SET ROLE regress_cc_heir;
SELECT secret::text FROM vault WHERE id = 1;
RESET ROLE;
SELECT colcrypt.revoke_key('regress_key', 'regress_cc_heir');
-- (renaming a role suspends its grants until they are granted again)
ALTER ROLE regress_cc_heir RENAME TO regress_cc_renamed;
SELECT colcrypt.grant_key('regress_key', 'regress_cc_renamed', 'decrypt');
ALTER ROLE regress_cc_renamed RENAME TO regress_cc_heir;
SET ROLE regress_cc_heir;
SELECT secret::text FROM vault WHERE id = 1;
\echo :SQLSTATE
RESET ROLE;
SELECT colcrypt.revoke_key('regress_key', 'regress_cc_heir');

-- any number of grantee rows: 70 roles hold the decrypt grant, and a role
-- that is a member of the last one only (more than 64 rows in front of it)
-- may decrypt; one that is a member of all 70 may too, until every grant is
-- revoked
DO $$
BEGIN
    FOR i IN 1..70 LOOP
        EXECUTE format('CREATE ROLE regress_cc_g%s', i);
        PERFORM colcrypt.grant_key('regress_key', format('regress_cc_g%s', i)::regrole, 'decrypt');
    END LOOP;
END $$;
CREATE ROLE regress_cc_last IN ROLE colcrypt_user, regress_cc_g70;
CREATE ROLE regress_cc_many IN ROLE colcrypt_user;
DO $$ BEGIN FOR i IN 1..70 LOOP EXECUTE format('GRANT regress_cc_g%s TO regress_cc_many', i); END LOOP; END $$;
GRANT SELECT ON vault TO regress_cc_last, regress_cc_many;
SELECT count(*) AS decrypt_grants FROM colcrypt.key_grants
 WHERE key_name = 'regress_key' AND privilege = 'decrypt';
SET ROLE regress_cc_last;
SELECT secret::text FROM vault WHERE id = 1;
SET ROLE regress_cc_many;
SELECT secret::text FROM vault WHERE id = 1;
RESET ROLE;
SELECT count(*) FROM (SELECT colcrypt.revoke_key('regress_key', format('regress_cc_g%s', i)::regrole)
                        FROM generate_series(1, 69) i) r;
SET ROLE regress_cc_many;
SELECT secret::text FROM vault WHERE id = 1;
RESET ROLE;
SELECT colcrypt.revoke_key('regress_key', 'regress_cc_g70');
SET ROLE regress_cc_many;
SELECT secret::text FROM vault WHERE id = 1;
\echo :SQLSTATE
RESET ROLE;
DO $$ BEGIN FOR i IN 1..70 LOOP EXECUTE format('DROP ROLE regress_cc_g%s', i); END LOOP; END $$;
DELETE FROM colcrypt.key_grants WHERE role_name = 'regress_cc_gone';
-- privileges are cached past the transaction until a grant or a role changes:
-- each change below takes effect at the next statement, however it is made
SET ROLE regress_cc_reader;
SELECT secret::text FROM vault WHERE id = 1;
RESET ROLE;
-- plain DML on the catalog (a statement trigger tells every backend)
DELETE FROM colcrypt.key_grants WHERE role = 'regress_cc_reader'::regrole AND privilege = 'decrypt';
SET ROLE regress_cc_reader;
SELECT secret::text FROM vault WHERE id = 1;
\echo :SQLSTATE
RESET ROLE;
INSERT INTO colcrypt.key_grants (key_name, role, role_name, privilege)
    VALUES ('regress_key', 'regress_cc_reader', 'regress_cc_reader', 'decrypt');
SET ROLE regress_cc_reader;
SELECT secret::text FROM vault WHERE id = 1;
RESET ROLE;
-- role membership
SELECT colcrypt.grant_key('regress_key', 'regress_cc_readers', 'decrypt');
SET ROLE regress_cc_member;
SELECT secret::text FROM vault WHERE id = 1;
RESET ROLE;
REVOKE regress_cc_readers FROM regress_cc_member;
SET ROLE regress_cc_member;
SELECT secret::text FROM vault WHERE id = 1;
\echo :SQLSTATE
RESET ROLE;
-- within one transaction, and what a rolled back transaction granted is forgotten
BEGIN;
GRANT regress_cc_readers TO regress_cc_member;
SET ROLE regress_cc_member;
SELECT secret::text FROM vault WHERE id = 1;
ROLLBACK;
SET ROLE regress_cc_member;
SELECT secret::text FROM vault WHERE id = 1;
\echo :SQLSTATE
RESET ROLE;
SELECT colcrypt.revoke_key('regress_key', 'regress_cc_readers');

-- a check that passed is remembered for the next rows, but not past a change:
-- a superuser that stops being one is checked like any role from its next
-- statement (in a new session: its first check is a superuser's; encrypt_field,
-- since decrypting skips the check for superusers)
CREATE ROLE regress_cc_admin SUPERUSER IN ROLE colcrypt_user;
GRANT SELECT ON vault TO regress_cc_admin;
\c
SET ROLE regress_cc_admin;
SELECT count(colcrypt.encrypt_field('x', 'regress_key')) FROM generate_series(1, 3);
RESET ROLE;
ALTER ROLE regress_cc_admin NOSUPERUSER;
SET ROLE regress_cc_admin;
SELECT count(colcrypt.encrypt_field('x', 'regress_key')) FROM generate_series(1, 3);
\echo :SQLSTATE
RESET ROLE;
-- nor for another role: the reader may decrypt, the writer right after it may not
SET ROLE regress_cc_reader;
SELECT secret::text FROM vault WHERE id = 1;
SET ROLE regress_cc_writer;
SELECT secret::text FROM vault WHERE id = 1;
\echo :SQLSTATE
RESET ROLE;
-- nor past a change of the grants made behind the functions' back (the
-- statement trigger's invalidation, not revoke_key's own reset)
SELECT colcrypt.grant_key('regress_key', 'regress_cc_admin', 'all');
SET ROLE regress_cc_admin;
SELECT count(colcrypt.encrypt_field('x', 'regress_key')) FROM generate_series(1, 3);
RESET ROLE;
DELETE FROM colcrypt.key_grants WHERE role = 'regress_cc_admin'::regrole AND privilege = 'encrypt';
SET ROLE regress_cc_admin;
SELECT count(colcrypt.encrypt_field('x', 'regress_key')) FROM generate_series(1, 3);
\echo :SQLSTATE
SELECT secret::text FROM vault WHERE id = 1;
RESET ROLE;
SELECT colcrypt.revoke_key('regress_key', 'regress_cc_admin');

DROP TABLE vault;
SELECT colcrypt.revoke_key('regress_key', r) FROM unnest(ARRAY['regress_cc_writer', 'regress_cc_reader']::regrole[]) r;
DROP ROLE regress_cc_writer, regress_cc_reader, regress_cc_member, regress_cc_readers,
    regress_cc_heir, regress_cc_last, regress_cc_many, regress_cc_admin;
