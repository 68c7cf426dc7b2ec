-- The type colcrypt.encrypted: text form "colcrypt:" + base64 of the envelope,
-- binary form the envelope itself. Input validates the structure (it cannot
-- authenticate without the key); output never decrypts. Nothing here talks to
-- keyd: the values are crafted by hand, with a fixed key id that no keyd knows.

-- The envelope: version 1, algorithm 1 (AES-256-GCM), payload 1 (text),
-- reserved 0, key id, key version (u32 BE), nonce (12), ciphertext, tag (16).
CREATE FUNCTION pg_temp.text_form(envelope bytea) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT
    AS $$ SELECT 'colcrypt:' || translate(encode(envelope, 'base64'), E'\n', '') $$;
-- head: the first four bytes; key id, nonce and tag are fixed
CREATE FUNCTION pg_temp.envelope(head text, key_version text, ciphertext text) RETURNS bytea
    LANGUAGE sql IMMUTABLE STRICT
    AS $$ SELECT decode(head || 'a0eebc999c0b4ef8bb6d6bb9bd380a11' || key_version
                        || '000102030405060708090a0b' || ciphertext
                        || '0f0e0d0c0b0a09080706050403020100', 'hex') $$;
\set good_empty 'pg_temp.text_form(pg_temp.envelope(''01010100'', ''00000001'', ''''))'
\set good_abc 'pg_temp.text_form(pg_temp.envelope(''01010100'', ''00000001'', ''616263''))'

-- a structurally valid value goes in and comes out unchanged (canonical form)
SELECT :good_empty AS text_form;
SELECT colcrypt.ciphertext((:good_empty)::colcrypt.encrypted) = :good_empty AS canonical;
SELECT colcrypt.ciphertext((:good_abc)::colcrypt.encrypted) = :good_abc AS canonical;
SELECT length(colcrypt.ciphertext((:good_abc)::colcrypt.encrypted)) AS text_length;
-- the output function prints the same (an explicit cast to text decrypts instead)
SELECT format('%s', (:good_abc)::colcrypt.encrypted) = :good_abc AS output_is_text_form;

-- header inspectors read the header alone: no key needed
SELECT colcrypt.key_id((:good_abc)::colcrypt.encrypted) AS key_id,
       colcrypt.key_version((:good_abc)::colcrypt.encrypted) AS key_version;
SELECT colcrypt.key_version(pg_temp.text_form(pg_temp.envelope('01010100', '7fffffff', ''))::colcrypt.encrypted);
SELECT colcrypt.key_version(pg_temp.text_form(pg_temp.envelope('01010100', '80000000', ''))::colcrypt.encrypted);
\echo :SQLSTATE

-- send gives the envelope's bytes
SELECT colcrypt.encrypted_send((:good_abc)::colcrypt.encrypted)
       = pg_temp.envelope('01010100', '00000001', '616263') AS send_is_envelope;

-- stored, copied out and read back as text, arrays of the type
CREATE TABLE type_io (id int, v colcrypt.encrypted);
INSERT INTO type_io VALUES
    (1, (:good_empty)::colcrypt.encrypted), (2, (:good_abc)::colcrypt.encrypted), (3, NULL);
COPY type_io TO STDOUT;
SELECT id, colcrypt.ciphertext(v) = :good_abc AS is_abc, v IS NULL AS is_null FROM type_io ORDER BY id;
SELECT array_length(ARRAY[v, v], 1) FROM type_io WHERE id = 2;
SELECT colcrypt.ciphertext((ARRAY[:good_abc]::colcrypt.encrypted[])[1]) = :good_abc AS array_roundtrip;
DROP TABLE type_io;

-- text without the "colcrypt:" prefix is a plaintext: it becomes a value only
-- in a key-bound column (09_columns); anywhere else using it is 22P02
SELECT ''::colcrypt.encrypted;
\echo :SQLSTATE
SELECT 'hello'::colcrypt.encrypted;
\echo :SQLSTATE
-- malformed text input: a "colcrypt:" prefix (in any case, after any
-- whitespace) claims a sealed value, which must parse strictly: 22P02 with a
-- detail that says what is wrong
SELECT upper(:good_abc)::colcrypt.encrypted;
\echo :SQLSTATE
SELECT 'colcrypt:'::colcrypt.encrypted;
\echo :SQLSTATE
SELECT 'colcrypt:AQEB!AAA'::colcrypt.encrypted;
\echo :SQLSTATE
SELECT (:good_abc || E'\n')::colcrypt.encrypted;
\echo :SQLSTATE
SELECT (' ' || :good_abc)::colcrypt.encrypted;
\echo :SQLSTATE
SELECT overlay(:good_abc placing ' ' from 20 for 1)::colcrypt.encrypted;
\echo :SQLSTATE
SELECT overlay(:good_abc placing E'\n' from 20 for 1)::colcrypt.encrypted;
\echo :SQLSTATE
-- padding removed
SELECT rtrim(:good_empty, '=')::colcrypt.encrypted;
\echo :SQLSTATE
-- non-zero trailing bits before the padding: not the canonical encoding
SELECT :good_empty;
SELECT regexp_replace(:good_empty, 'A==$', 'B==')::colcrypt.encrypted;
\echo :SQLSTATE
-- truncated: one byte short of header + tag
SELECT pg_temp.text_form(substr(pg_temp.envelope('01010100', '00000001', ''), 1, 51))::colcrypt.encrypted;
\echo :SQLSTATE
SELECT 'colcrypt:AQEB'::colcrypt.encrypted;
\echo :SQLSTATE
-- unsupported format version
SELECT pg_temp.text_form(pg_temp.envelope('02010100', '00000001', ''))::colcrypt.encrypted;
\echo :SQLSTATE
SELECT pg_temp.text_form(pg_temp.envelope('00010100', '00000001', ''))::colcrypt.encrypted;
\echo :SQLSTATE
-- unsupported algorithm
SELECT pg_temp.text_form(pg_temp.envelope('01020100', '00000001', ''))::colcrypt.encrypted;
\echo :SQLSTATE
-- unknown payload type
SELECT pg_temp.text_form(pg_temp.envelope('01010200', '00000001', ''))::colcrypt.encrypted;
\echo :SQLSTATE
-- reserved byte set
SELECT pg_temp.text_form(pg_temp.envelope('01010101', '00000001', ''))::colcrypt.encrypted;
\echo :SQLSTATE
-- key version 0
SELECT pg_temp.text_form(pg_temp.envelope('01010100', '00000000', ''))::colcrypt.encrypted;
\echo :SQLSTATE
-- a plaintext INSERT literal into a column without a key is refused
CREATE TABLE type_io_bad (v colcrypt.encrypted);
INSERT INTO type_io_bad VALUES ('plaintext that is not a value');
\echo :SQLSTATE
SELECT count(*) FROM type_io_bad;
DROP TABLE type_io_bad;
