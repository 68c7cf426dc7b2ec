-- Deterministic encryption (AES-256-SIV): equal plaintexts under one key and
-- context give equal values, so the ciphertext itself can be joined, compared
-- and indexed. It leaks equality (and length) by design; the randomized
-- encrypted type is the default for everything else.

SELECT colcrypt.encrypt_deterministic('123-45-6789', 'regress_key')
       = colcrypt.encrypt_deterministic('123-45-6789', 'regress_key') AS equal,
       colcrypt.encrypt_deterministic('123-45-6789', 'regress_key')
       <> colcrypt.encrypt_deterministic('123-45-6780', 'regress_key') AS differs_by_value,
       colcrypt.encrypt_deterministic('123-45-6789', 'regress_key')
       <> colcrypt.encrypt_deterministic('123-45-6789', 'regress_other') AS differs_by_key,
       colcrypt.encrypt_deterministic('123-45-6789', 'regress_key', 'a.b')
       <> colcrypt.encrypt_deterministic('123-45-6789', 'regress_key') AS differs_by_context;
-- layout: format 1, algorithm 2 (AES-256-SIV), payload 1 (text), reserved 0,
-- key id, key version 1, SIV (16), then the plaintext's length + 1
SELECT substr(v, 1, 4) AS head, substr(v, 5, 16) = uuid_send(colcrypt.key_id(colcrypt.encrypt_field('x', 'regress_key'))) AS key_id,
       substr(v, 21, 4) AS key_version, octet_length(v) - length('123-45-6789') AS overhead
  FROM (SELECT colcrypt.encrypt_deterministic('123-45-6789', 'regress_key') AS v) s;
-- round trips, the empty string and multibyte text included
SELECT colcrypt.decrypt_deterministic(colcrypt.encrypt_deterministic('123-45-6789', 'regress_key'));
SELECT colcrypt.decrypt_deterministic(colcrypt.encrypt_deterministic('', 'regress_key')) = '' AS empty;
SELECT colcrypt.decrypt_deterministic(colcrypt.encrypt_deterministic('grüße ✓', 'regress_key', 'c'), 'c');
-- the context is authenticated; any altered byte fails with the one message
SELECT colcrypt.decrypt_deterministic(colcrypt.encrypt_deterministic('x', 'regress_key', 'c'), 'd');
\echo :SQLSTATE
-- every single-bit flip is caught: the structure (XX001), the payload type
-- (42804), an altered key id or version finds no key (42704, on a key of its
-- own that is never rotated), everything else fails authentication (39000)
\! "$COLCRYPT_KEYCTL" --socket "$COLCRYPT_KEYD_SOCKET" create regress_det_flip > /dev/null 2>&1
CREATE FUNCTION pg_temp.det_flip_outcomes() RETURNS TABLE (outcome text, flips bigint)
    LANGUAGE plpgsql AS $$
DECLARE
    v bytea := colcrypt.encrypt_deterministic('flip me', 'regress_det_flip');
    i int;
    b int;
    o text;
    outcomes text[] := '{}';
BEGIN
    FOR i IN 0 .. octet_length(v) - 1 LOOP
        FOR b IN 0 .. 7 LOOP
            BEGIN
                PERFORM colcrypt.decrypt_deterministic(set_byte(v, i, get_byte(v, i) # (1 << b)));
                o := 'decrypted';
            EXCEPTION WHEN OTHERS THEN
                o := SQLSTATE;
            END;
            outcomes := outcomes || o;
        END LOOP;
    END LOOP;
    RETURN QUERY SELECT x, count(*) FROM unnest(outcomes) x GROUP BY x ORDER BY x;
END $$;
SELECT * FROM pg_temp.det_flip_outcomes();
-- malformed values
SELECT colcrypt.decrypt_deterministic('\x0102'::bytea);
\echo :SQLSTATE
-- stable across key rotation: derived from the key's first version
\! "$COLCRYPT_KEYCTL" --socket "$COLCRYPT_KEYD_SOCKET" create regress_det_rotated > /dev/null 2>&1
SELECT colcrypt.encrypt_deterministic('abc', 'regress_det_rotated') AS before_rotation \gset
\! "$COLCRYPT_KEYCTL" --socket "$COLCRYPT_KEYD_SOCKET" rotate regress_det_rotated > /dev/null
SET colcrypt.key_cache_ttl = 0;
SELECT colcrypt.encrypt_deterministic('abc', 'regress_det_rotated') = :'before_rotation'::bytea
       AS same_after_rotation;
RESET colcrypt.key_cache_ttl;

-- equality joins and a unique index on the ciphertext
CREATE TABLE det_a (id int, ssn bytea UNIQUE);
CREATE TABLE det_b (id int, ssn bytea);
INSERT INTO det_a SELECT i, colcrypt.encrypt_deterministic('ssn-' || i, 'regress_key', 'ssn')
  FROM generate_series(1, 100) i;
INSERT INTO det_b SELECT i, colcrypt.encrypt_deterministic('ssn-' || (i * 2), 'regress_key', 'ssn')
  FROM generate_series(1, 100) i;
SELECT count(*) AS joined FROM det_a JOIN det_b USING (ssn);
\set VERBOSITY terse
INSERT INTO det_a VALUES (101, colcrypt.encrypt_deterministic('ssn-7', 'regress_key', 'ssn'));
\set VERBOSITY default
\echo :SQLSTATE
SELECT id, colcrypt.decrypt_deterministic(ssn, 'ssn') FROM det_a
 WHERE ssn = colcrypt.encrypt_deterministic('ssn-42', 'regress_key', 'ssn');

-- privileges: encrypt and decrypt, as for every other use of a key
CREATE ROLE regress_cc_det IN ROLE colcrypt_user;
GRANT SELECT ON det_a TO regress_cc_det;
SET ROLE regress_cc_det;
SELECT colcrypt.encrypt_deterministic('x', 'regress_key');
\echo :SQLSTATE
SELECT colcrypt.decrypt_deterministic(ssn, 'ssn') FROM det_a WHERE id = 1;
\echo :SQLSTATE
RESET ROLE;
DROP TABLE det_a, det_b;
DROP ROLE regress_cc_det;
