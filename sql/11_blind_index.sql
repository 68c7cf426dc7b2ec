-- Blind indexes: equality search on encrypted values without decrypting.
-- blind_index(value, key [, context]) is HMAC-SHA256 of the value (Unicode
-- NFC) under a key derived from the named key for this purpose: equal values
-- give equal indexes (that is the leakage), different keys or contexts give
-- unrelated ones. STABLE: the application stores it in a column of its own.

SELECT octet_length(colcrypt.blind_index('123-45-6789', 'regress_key')) AS bytes,
       colcrypt.blind_index('123-45-6789', 'regress_key')
       = colcrypt.blind_index('123-45-6789', 'regress_key') AS deterministic,
       colcrypt.blind_index('123-45-6789', 'regress_key')
       <> colcrypt.blind_index('123-45-6780', 'regress_key') AS differs_by_value,
       colcrypt.blind_index('123-45-6789', 'regress_key')
       <> colcrypt.blind_index('123-45-6789', 'regress_other') AS differs_by_key,
       colcrypt.blind_index('123-45-6789', 'regress_key')
       <> colcrypt.blind_index('123-45-6789', 'regress_key', 'people.ssn') AS differs_by_context,
       colcrypt.blind_index('123-45-6789', 'regress_key', '')
       = colcrypt.blind_index('123-45-6789', 'regress_key') AS empty_context_is_none;
-- never the encryption key: the index is not a MAC under the data key, and
-- does not reveal the plaintext's length
SELECT octet_length(colcrypt.blind_index('', 'regress_key')) AS empty,
       octet_length(colcrypt.blind_index(repeat('x', 10000), 'regress_key')) AS long;
-- Unicode NFC: composed and decomposed spellings match; case does not (normalize it yourself)
SELECT colcrypt.blind_index(U&'caf\00E9', 'regress_key')
       = colcrypt.blind_index(U&'cafe\0301', 'regress_key') AS nfc,
       colcrypt.blind_index('ADA', 'regress_key') = colcrypt.blind_index('ada', 'regress_key') AS case_folded,
       colcrypt.blind_index(lower('ADA'), 'regress_key') = colcrypt.blind_index('ada', 'regress_key')
       AS lowered_by_caller;
SELECT p.provolatile FROM pg_proc p WHERE p.oid = 'colcrypt.blind_index(text,text)'::regprocedure;
-- STABLE functions cannot be in an index expression or a generated column
CREATE TABLE bi_bad (v text, b bytea GENERATED ALWAYS AS (colcrypt.blind_index(v, 'regress_key')) STORED);
\echo :SQLSTATE

-- the pattern: the value in a key-bound column, its blind index beside it,
-- written by the application, indexed, searched with the same function
CREATE TABLE customers (id int PRIMARY KEY,
                        ssn colcrypt.encrypted('regress_key', 'customers.ssn'),
                        ssn_bidx bytea NOT NULL);
CREATE INDEX customers_ssn_bidx ON customers (ssn_bidx);
INSERT INTO customers
    SELECT i, lpad(i::text, 9, '0'), colcrypt.blind_index(lpad(i::text, 9, '0'), 'regress_key', 'customers.ssn')
      FROM generate_series(1, 2000) i;
ANALYZE customers;
EXPLAIN (COSTS OFF)
SELECT id FROM customers WHERE ssn_bidx = colcrypt.blind_index('000001234', 'regress_key', 'customers.ssn');
SELECT id, ssn::text FROM customers
 WHERE ssn_bidx = colcrypt.blind_index('000001234', 'regress_key', 'customers.ssn');
-- a hash index works as well
CREATE INDEX customers_ssn_bidx_hash ON customers USING hash (ssn_bidx);
SELECT count(*) FROM customers
 WHERE ssn_bidx = colcrypt.blind_index('000000042', 'regress_key', 'customers.ssn');
-- the blind index survives key rotation (it is derived from the key's first
-- version); a key of its own for this, since rotating changes it for good
\! "$COLCRYPT_KEYCTL" --socket "$COLCRYPT_KEYD_SOCKET" create regress_bidx_rotated > /dev/null 2>&1
SELECT colcrypt.blind_index('000001234', 'regress_bidx_rotated') AS before_rotation \gset
\! "$COLCRYPT_KEYCTL" --socket "$COLCRYPT_KEYD_SOCKET" rotate regress_bidx_rotated > /dev/null
SET colcrypt.key_cache_ttl = 0;
SELECT colcrypt.key_version(colcrypt.encrypt_field('x', 'regress_bidx_rotated')) > 1 AS rotated,
       colcrypt.blind_index('000001234', 'regress_bidx_rotated') = :'before_rotation'::bytea
       AS same_blind_index;
RESET colcrypt.key_cache_ttl;
DROP TABLE customers;
