-- Binary I/O: send gives the envelope, receive takes it back and treats it as
-- hostile (22P03 on anything that does not parse). Exercised through binary
-- COPY, the same path as the binary protocol; the files live in results/.

CREATE TABLE binary_src (id int, v colcrypt.encrypted);
INSERT INTO binary_src
    SELECT i, CASE WHEN i % 2 = 0 THEN colcrypt.encrypt_field(repeat('x', i * 100), 'regress_key')
                   ELSE colcrypt.encrypt_field(convert_to(repeat('y', i), 'UTF8'), 'regress_other', 'bin')
              END
      FROM generate_series(1, 20) i;
INSERT INTO binary_src VALUES (21, NULL);

\copy binary_src TO 'results/colcrypt_binary.copy' WITH (FORMAT binary)
CREATE TABLE binary_dst (LIKE binary_src);
\copy binary_dst FROM 'results/colcrypt_binary.copy' WITH (FORMAT binary)
SELECT count(*) AS rows,
       count(*) FILTER (WHERE colcrypt.ciphertext(s.v) = colcrypt.ciphertext(d.v)) AS identical,
       count(*) FILTER (WHERE d.v IS NULL) AS nulls
  FROM binary_src s JOIN binary_dst d USING (id);
SELECT count(*) FILTER (WHERE id % 2 = 0 AND colcrypt.decrypt_field(v) = repeat('x', id * 100))
       + count(*) FILTER (WHERE id % 2 = 1 AND colcrypt.decrypt_field_bytea(v, 'bin') = convert_to(repeat('y', id), 'UTF8'))
       AS decrypted
  FROM binary_dst;

-- text COPY round trip
\copy binary_src TO 'results/colcrypt_text.copy'
TRUNCATE binary_dst;
\copy binary_dst FROM 'results/colcrypt_text.copy'
SELECT count(*) FILTER (WHERE colcrypt.ciphertext(s.v) = colcrypt.ciphertext(d.v)) AS identical
  FROM binary_src s JOIN binary_dst d USING (id);

-- hostile binary input: bytes that are not an envelope, written by binary
-- COPY of a bytea column (its binary form is the raw bytes, like ours)
CREATE TABLE hostile (v bytea);
INSERT INTO hostile VALUES ('\x');
\copy hostile TO 'results/colcrypt_hostile1.copy' WITH (FORMAT binary)
TRUNCATE hostile;
INSERT INTO hostile VALUES ('\x0101010000');
\copy hostile TO 'results/colcrypt_hostile2.copy' WITH (FORMAT binary)
TRUNCATE hostile;
-- a full-size envelope claiming format version 9
INSERT INTO hostile SELECT set_byte(colcrypt.encrypted_send(v), 0, 9) FROM binary_src WHERE id = 2;
\copy hostile TO 'results/colcrypt_hostile3.copy' WITH (FORMAT binary)
TRUNCATE hostile;
-- a full-size envelope with the reserved byte set
INSERT INTO hostile SELECT set_byte(colcrypt.encrypted_send(v), 3, 128) FROM binary_src WHERE id = 2;
\copy hostile TO 'results/colcrypt_hostile4.copy' WITH (FORMAT binary)
TRUNCATE hostile;
-- structurally valid but altered (a ciphertext bit): accepted by receive,
-- caught by decryption
INSERT INTO hostile SELECT set_byte(b, 40, get_byte(b, 40) # 4)
  FROM (SELECT colcrypt.encrypted_send(v) AS b FROM binary_src WHERE id = 2) s;
\copy hostile TO 'results/colcrypt_hostile5.copy' WITH (FORMAT binary)

CREATE TABLE received (v colcrypt.encrypted);
\copy received FROM 'results/colcrypt_hostile1.copy' WITH (FORMAT binary)
\copy received FROM 'results/colcrypt_hostile2.copy' WITH (FORMAT binary)
\copy received FROM 'results/colcrypt_hostile3.copy' WITH (FORMAT binary)
\copy received FROM 'results/colcrypt_hostile4.copy' WITH (FORMAT binary)
-- \copy sets no SQLSTATE variable: the same four once more, showing their SQLSTATE
\set VERBOSITY sqlstate
\copy received FROM 'results/colcrypt_hostile1.copy' WITH (FORMAT binary)
\copy received FROM 'results/colcrypt_hostile2.copy' WITH (FORMAT binary)
\copy received FROM 'results/colcrypt_hostile3.copy' WITH (FORMAT binary)
\copy received FROM 'results/colcrypt_hostile4.copy' WITH (FORMAT binary)
\set VERBOSITY default
SELECT count(*) AS received FROM received;
\copy received FROM 'results/colcrypt_hostile5.copy' WITH (FORMAT binary)
SELECT colcrypt.decrypt_field(v) FROM received;
\echo :SQLSTATE

DROP TABLE binary_src, binary_dst, hostile, received;
