-- Failures: every one an ERROR with a fitting SQLSTATE (echoed after it), a
-- message that names the key or keyd's socket, and never key bytes or
-- plaintext.

CREATE TABLE secrets (id int, v colcrypt.encrypted);
INSERT INTO secrets VALUES
    (1, colcrypt.encrypt_field('top secret', 'regress_key', 'ctx-a')),
    (2, colcrypt.encrypt_field('\x0102'::bytea, 'regress_key'));

-- wrong context, missing context, unexpected context: one generic message
SELECT colcrypt.decrypt_field(v, 'ctx-b') FROM secrets WHERE id = 1;
\echo :SQLSTATE
SELECT colcrypt.decrypt_field(v) FROM secrets WHERE id = 1;
\echo :SQLSTATE
SELECT colcrypt.decrypt_field_bytea(v, 'ctx-a') FROM secrets WHERE id = 2;
\echo :SQLSTATE
SELECT colcrypt.decrypt_field(v, 'ctx-a') FROM secrets WHERE id = 1;

-- tampering: the value with one bit flipped, via its text form
CREATE FUNCTION pg_temp.flip(v colcrypt.encrypted, pos int) RETURNS colcrypt.encrypted
    LANGUAGE sql
    AS $$ SELECT ('colcrypt:' || translate(encode(set_byte(b, pos, get_byte(b, pos) # 1),
                                                  'base64'), E'\n', ''))::colcrypt.encrypted
            FROM (SELECT colcrypt.encrypted_send(v) AS b) s $$;
SELECT colcrypt.decrypt_field(pg_temp.flip(v, 40), 'ctx-a') FROM secrets WHERE id = 1;
\echo :SQLSTATE
-- every single-bit flip of every byte is caught: the header's structure by the
-- input function (22P02), an altered key id or version finds no key (42704),
-- everything else (payload type, nonce, ciphertext, tag) fails authentication
CREATE FUNCTION pg_temp.flip_outcome(v colcrypt.encrypted, pos int, bitno int) RETURNS text
    LANGUAGE plpgsql
    AS $$
DECLARE
    b bytea := colcrypt.encrypted_send(v);
BEGIN
    PERFORM colcrypt.decrypt_field_bytea(
        ('colcrypt:' || translate(encode(set_byte(b, pos, get_byte(b, pos) # (1 << bitno)),
                                         'base64'), E'\n', ''))::colcrypt.encrypted, 'ctx-a');
    RETURN 'decrypted';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE;
END
$$;
SELECT octet_length(colcrypt.encrypted_send(v)) AS bytes FROM secrets WHERE id = 1;
SELECT outcome, count(*) AS flips, min(pos) AS first_byte, max(pos) AS last_byte
  FROM (SELECT pos, pg_temp.flip_outcome(v, pos, bitno) AS outcome
          FROM secrets, generate_series(0, 61) pos, generate_series(0, 7) bitno
         WHERE id = 1) s
 GROUP BY outcome ORDER BY outcome;
-- a flipped format version is caught by the input function already
SELECT colcrypt.decrypt_field(pg_temp.flip(v, 0)) FROM secrets WHERE id = 1;
\echo :SQLSTATE
-- truncated or extended by a byte: structurally valid, not authentic
SELECT colcrypt.decrypt_field(('colcrypt:' || translate(encode(substr(colcrypt.encrypted_send(v), 1, 61), 'base64'), E'\n', ''))::colcrypt.encrypted, 'ctx-a')
  FROM secrets WHERE id = 1;
\echo :SQLSTATE
SELECT colcrypt.decrypt_field(('colcrypt:' || translate(encode(colcrypt.encrypted_send(v) || '\x00'::bytea, 'base64'), E'\n', ''))::colcrypt.encrypted, 'ctx-a')
  FROM secrets WHERE id = 1;
\echo :SQLSTATE

-- a bytea payload is not text
SELECT colcrypt.decrypt_field(v) FROM secrets WHERE id = 2;
\echo :SQLSTATE
SELECT colcrypt.decrypt_field_bytea(v) FROM secrets WHERE id = 2;

-- unknown key name; invalid key names are not echoed back
SELECT colcrypt.encrypt_field('x', 'regress_no_such_key');
\echo :SQLSTATE
SELECT colcrypt.encrypt_field('x', '');
\echo :SQLSTATE
SELECT colcrypt.encrypt_field('x', 'has space');
\echo :SQLSTATE
SELECT colcrypt.encrypt_field('x', '-leading-dash');
\echo :SQLSTATE
SELECT colcrypt.encrypt_field('x', repeat('k', 64));
\echo :SQLSTATE
SELECT colcrypt.encrypt_field('\x00'::bytea, repeat('k', 63));
\echo :SQLSTATE

-- a value whose key id keyd does not know (crafted, with a fixed id)
CREATE FUNCTION pg_temp.crafted(key_version text) RETURNS colcrypt.encrypted
    LANGUAGE sql
    AS $$ SELECT ('colcrypt:' || encode(decode('01010100a0eebc999c0b4ef8bb6d6bb9bd380a11'
                  || key_version || '000102030405060708090a0b0f0e0d0c0b0a09080706050403020100',
                  'hex'), 'base64'))::colcrypt.encrypted $$;
SELECT colcrypt.decrypt_field(pg_temp.crafted('00000001'));
\echo :SQLSTATE
SELECT colcrypt.key_name(pg_temp.crafted('00000002'));
\echo :SQLSTATE
-- a version of a known key that does not exist: same error (the message names
-- the key by its random id, so only the SQLSTATE is shown here)
\set VERBOSITY sqlstate
SELECT count(*) FROM secrets
 WHERE colcrypt.decrypt_field(('colcrypt:' || translate(encode(overlay(colcrypt.encrypted_send(v) placing '\x00000063'::bytea from 21 for 4), 'base64'), E'\n', ''))::colcrypt.encrypted, 'ctx-a') IS NOT NULL
   AND id = 1;
\set VERBOSITY default

-- a malformed value that got into storage (through a binary-coercible cast
-- made for this test only): XX001, data corrupted
CREATE CAST (bytea AS colcrypt.encrypted) WITHOUT FUNCTION;
SELECT colcrypt.decrypt_field('\x0101'::bytea::colcrypt.encrypted);
\echo :SQLSTATE
SELECT colcrypt.key_version(('\x02010100' || repeat('00', 48))::bytea::colcrypt.encrypted);
\echo :SQLSTATE
-- output never validates or decrypts: a dump never fails on stored bytes
SELECT format('%s', '\x0101'::bytea::colcrypt.encrypted) AS text_form;
DROP CAST (bytea AS colcrypt.encrypted);

-- keys are cached per backend: with a long TTL, a key fetched once keeps
-- working when keyd is unreachable; a key not fetched yet does not
SET colcrypt.key_cache_ttl = '1h';
SELECT colcrypt.decrypt_field(colcrypt.encrypt_field('cached', 'regress_key'));
SET colcrypt.keyd_socket = '/nonexistent/keyd.sock';
SELECT colcrypt.decrypt_field(colcrypt.encrypt_field('still cached', 'regress_key'));
SELECT colcrypt.decrypt_field(v, 'ctx-a') FROM secrets WHERE id = 1;
SELECT colcrypt.encrypt_field('x', 'regress_other');
\echo :SQLSTATE

-- keyd unreachable and no cache (TTL 0): 58000 naming the socket
SET colcrypt.key_cache_ttl = 0;
SELECT colcrypt.encrypt_field('x', 'regress_key');
\echo :SQLSTATE
SELECT colcrypt.decrypt_field(v, 'ctx-a') FROM secrets WHERE id = 1;
\echo :SQLSTATE
SELECT colcrypt.key_name(v) FROM secrets WHERE id = 1;
\echo :SQLSTATE
-- what needs no key still works
SELECT colcrypt.key_version(v), colcrypt.ciphertext(v)::colcrypt.encrypted IS NOT NULL AS io_works
  FROM secrets WHERE id = 1;
-- and work resumes when keyd is back
RESET colcrypt.keyd_socket;
SELECT colcrypt.decrypt_field(v, 'ctx-a') FROM secrets WHERE id = 1;
SELECT colcrypt.decrypt_field(colcrypt.encrypt_field('no cache', 'regress_other'));
RESET colcrypt.key_cache_ttl;

-- decrypted text must be valid in the database encoding: a value encrypted in
-- a LATIN1 database holds LATIN1 bytes
\set regress_db :DBNAME
CREATE DATABASE regress_colcrypt_latin1 TEMPLATE template0 ENCODING 'LATIN1'
    LC_COLLATE 'C' LC_CTYPE 'C';
\c regress_colcrypt_latin1
SET client_encoding = 'UTF8';
CREATE EXTENSION colcrypt;
SELECT colcrypt.encrypt_field('café', 'regress_key') AS latin1_value \gset
SELECT colcrypt.decrypt_field(:'latin1_value') AS in_latin1;
\c :regress_db
DROP DATABASE regress_colcrypt_latin1;
SELECT colcrypt.decrypt_field(:'latin1_value');
\echo :SQLSTATE
SELECT convert_from(colcrypt.decrypt_field_bytea(:'latin1_value'), 'LATIN1') AS converted;

DROP TABLE secrets;
