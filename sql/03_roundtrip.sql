-- Round trips through keyd's keys regress_key and regress_other. Output shows
-- plaintexts, lengths and comparisons, never ciphertext or key ids.

-- text, with and without a context
SELECT colcrypt.decrypt_field(colcrypt.encrypt_field('123-45-6789', 'regress_key'));
SELECT colcrypt.decrypt_field(colcrypt.encrypt_field('123-45-6789', 'regress_key', 'patients.ssn'),
                              'patients.ssn');
-- bytea, with and without a context
SELECT colcrypt.decrypt_field_bytea(colcrypt.encrypt_field('\x00ff10'::bytea, 'regress_key'));
SELECT colcrypt.decrypt_field_bytea(colcrypt.encrypt_field('\x00ff10'::bytea, 'regress_key', 'blobs'),
                                    'blobs');
-- decrypt_field_bytea also returns a text payload's bytes
SELECT colcrypt.decrypt_field_bytea(colcrypt.encrypt_field('abc', 'regress_key'));
-- multibyte text
SELECT colcrypt.decrypt_field(colcrypt.encrypt_field('grüße, 世界 ✓', 'regress_other'));
-- an explicit empty context is the same as none
SELECT colcrypt.decrypt_field(colcrypt.encrypt_field('same', 'regress_key', ''));
SELECT colcrypt.decrypt_field(colcrypt.encrypt_field('same', 'regress_key'), '');

-- the empty string and the empty bytea: header + tag, nothing more
SELECT colcrypt.decrypt_field(colcrypt.encrypt_field('', 'regress_key')) = '' AS empty_text;
SELECT colcrypt.decrypt_field_bytea(colcrypt.encrypt_field(''::bytea, 'regress_key')) = ''::bytea
       AS empty_bytea;
SELECT octet_length(colcrypt.encrypted_send(colcrypt.encrypt_field('', 'regress_key'))) AS bytes,
       length(colcrypt.ciphertext(colcrypt.encrypt_field('', 'regress_key'))) AS text_length;
SELECT octet_length(colcrypt.encrypted_send(colcrypt.encrypt_field('abc', 'regress_key'))) AS bytes;

-- NULL in, NULL out (STRICT)
SELECT colcrypt.encrypt_field(NULL::text, 'regress_key') IS NULL AS a,
       colcrypt.encrypt_field(NULL::bytea, 'regress_key') IS NULL AS b,
       colcrypt.encrypt_field('x', NULL) IS NULL AS c,
       colcrypt.encrypt_field('x', 'regress_key', NULL) IS NULL AS d,
       colcrypt.decrypt_field(NULL) IS NULL AS e,
       colcrypt.decrypt_field(colcrypt.encrypt_field('x', 'regress_key'), NULL) IS NULL AS f,
       colcrypt.decrypt_field_bytea(NULL) IS NULL AS g,
       colcrypt.key_id(NULL) IS NULL AS h,
       colcrypt.key_version(NULL) IS NULL AS i,
       colcrypt.key_name(NULL) IS NULL AS j;

-- a fresh nonce per call: equal plaintexts give different values, also
-- within one statement (VOLATILE, never constant-folded)
SELECT colcrypt.ciphertext(colcrypt.encrypt_field('same', 'regress_key'))
       <> colcrypt.ciphertext(colcrypt.encrypt_field('same', 'regress_key')) AS differ;
SELECT count(DISTINCT colcrypt.ciphertext(v)) AS distinct_values
  FROM (SELECT colcrypt.encrypt_field('same', 'regress_key') AS v
          FROM generate_series(1, 1000)) s;

-- inspectors
SELECT colcrypt.key_name(colcrypt.encrypt_field('x', 'regress_key')) AS name,
       colcrypt.key_version(colcrypt.encrypt_field('x', 'regress_key')) AS version;
SELECT colcrypt.key_name(colcrypt.encrypt_field('\x01'::bytea, 'regress_other')) AS name;
SELECT colcrypt.key_id(colcrypt.encrypt_field('a', 'regress_key'))
       = colcrypt.key_id(colcrypt.encrypt_field('b', 'regress_key')) AS same_key,
       colcrypt.key_id(colcrypt.encrypt_field('a', 'regress_key'))
       = colcrypt.key_id(colcrypt.encrypt_field('a', 'regress_other')) AS other_key;

-- in a table: every write path (INSERT ... VALUES, INSERT ... SELECT, UPDATE,
-- a trip through the text form) keeps ciphertext; decryption needs no key name
CREATE TABLE patients (id int PRIMARY KEY, ssn colcrypt.encrypted, photo colcrypt.encrypted);
INSERT INTO patients VALUES
    (1, colcrypt.encrypt_field('111-11-1111', 'regress_key', 'ssn'), NULL),
    (2, colcrypt.encrypt_field('222-22-2222', 'regress_other', 'ssn'),
        colcrypt.encrypt_field('\xdeadbeef'::bytea, 'regress_key'));
INSERT INTO patients
    SELECT i, colcrypt.encrypt_field(format('%s%s%s-%s%s-%s%s%s%s', i, i, i, i, i, i, i, i, i), 'regress_key', 'ssn'), NULL
      FROM generate_series(3, 5) i;
UPDATE patients SET ssn = colcrypt.encrypt_field('444-44-4444', 'regress_other', 'ssn') WHERE id = 4;
SELECT id, colcrypt.decrypt_field(ssn, 'ssn') AS ssn, colcrypt.key_name(ssn) AS key,
       colcrypt.decrypt_field_bytea(photo) AS photo
  FROM patients ORDER BY id;
-- no plaintext in the stored bytes
SELECT count(*) AS leaks FROM patients
 WHERE position(convert_to('111-11-1111', 'UTF8') IN colcrypt.encrypted_send(ssn)) > 0;
CREATE TABLE patients_copy (LIKE patients);
INSERT INTO patients_copy SELECT id, colcrypt.ciphertext(ssn)::colcrypt.encrypted,
       colcrypt.ciphertext(photo)::colcrypt.encrypted
  FROM patients;
SELECT count(*) AS same_text_form FROM patients p JOIN patients_copy c USING (id)
 WHERE colcrypt.ciphertext(p.ssn) = colcrypt.ciphertext(c.ssn);
SELECT string_agg(colcrypt.decrypt_field(ssn, 'ssn'), ',' ORDER BY id) FROM patients_copy;
DROP TABLE patients_copy;

-- a large value (10 MB), stored out of line by TOAST
SELECT length(colcrypt.decrypt_field(colcrypt.encrypt_field(repeat('0123456789', 1048576), 'regress_key')))
       AS length;
CREATE TABLE large_values (v colcrypt.encrypted, b colcrypt.encrypted);
INSERT INTO large_values
    SELECT colcrypt.encrypt_field(repeat('0123456789', 1048576), 'regress_key', 'big'),
           colcrypt.encrypt_field(convert_to(repeat('€', 3495254), 'UTF8'), 'regress_other');
SELECT octet_length(colcrypt.encrypted_send(v)) AS stored_bytes,
       colcrypt.decrypt_field(v, 'big') = repeat('0123456789', 1048576) AS text_equal,
       colcrypt.decrypt_field_bytea(b) = convert_to(repeat('€', 3495254), 'UTF8') AS bytea_equal,
       octet_length(colcrypt.decrypt_field_bytea(b)) AS bytea_length
  FROM large_values;
SELECT pg_column_size(v) > 10485760 AS not_compressed FROM large_values;
DROP TABLE large_values;
