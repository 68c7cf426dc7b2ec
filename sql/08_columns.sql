-- Key-bound columns: colcrypt.encrypted('key_name' [, 'binding']). Every write
-- path either encrypts under the column's key or raises an error; no path
-- stores plaintext. Values are bound (AAD) to the column's binding.

-- the type modifier: a key name and a binding (random when not given)
CREATE TABLE people (id int PRIMARY KEY, ssn colcrypt.encrypted('regress_key', 'people.ssn'),
                     note colcrypt.encrypted('regress_other', 'people.note'),
                     free colcrypt.encrypted);
SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute
 WHERE attrelid = 'people'::regclass AND attnum > 0 ORDER BY attnum;
CREATE TABLE random_binding (v colcrypt.encrypted('regress_key'));
SELECT format_type(atttypid, atttypmod) ~ '^colcrypt\.encrypted\(''regress_key'',''[0-9a-f]{16}''\)$'
       AS random_binding
  FROM pg_attribute WHERE attrelid = 'random_binding'::regclass AND attname = 'v';
-- the typmod is a function of (key, binding): the same everywhere
SELECT 'colcrypt.encrypted(''regress_key'', ''people.ssn'')'::regtype,
       (SELECT atttypmod FROM pg_attribute WHERE attrelid = 'people'::regclass AND attname = 'ssn')
       = (SELECT id FROM colcrypt.column_keys WHERE binding = 'people.ssn') AS catalog_id;
-- bad modifiers
CREATE TABLE bad (v colcrypt.encrypted('has space'));
\echo :SQLSTATE
CREATE TABLE bad (v colcrypt.encrypted('k', 'b', 'c'));
\echo :SQLSTATE
CREATE TABLE bad (v colcrypt.encrypted('k', '-b'));
\echo :SQLSTATE

-- 1. INSERT with a string literal
INSERT INTO people (id, ssn, note) VALUES (1, '111-11-1111', 'first');
-- 2. a typed text parameter
PREPARE ins_text(int, text) AS INSERT INTO people (id, ssn) VALUES ($1, $2);
EXECUTE ins_text(2, '222-22-2222');
-- 3. an untyped parameter (its type is inferred from the column)
PREPARE ins_untyped AS INSERT INTO people (id, ssn) VALUES ($1, $2);
SELECT parameter_types FROM pg_prepared_statements WHERE name = 'ins_untyped';
EXECUTE ins_untyped(3, '333-33-3333');
-- 4. INSERT ... SELECT from a text column and from a varchar column
CREATE TABLE staging (id int, ssn text, note varchar(20));
INSERT INTO staging VALUES (4, '444-44-4444', 'from staging'), (5, '555-55-5555', NULL);
INSERT INTO people (id, ssn, note) SELECT id, ssn, note FROM staging;
-- 5. UPDATE with a literal and with a parameter; ON CONFLICT; MERGE
UPDATE people SET note = 'second' WHERE id = 2;
PREPARE upd(int, text) AS UPDATE people SET note = $2 WHERE id = $1;
EXECUTE upd(3, 'third');
INSERT INTO people (id, ssn) VALUES (1, 'ignored') ON CONFLICT (id) DO UPDATE SET note = 'upserted';
MERGE INTO people p USING (VALUES (5, 'merged'), (6, 'inserted by merge')) s(id, t) ON p.id = s.id
  WHEN MATCHED THEN UPDATE SET note = s.t
  WHEN NOT MATCHED THEN INSERT (id, ssn, note) VALUES (s.id, '666-66-6666', s.t);
-- 6. COPY FROM, text and CSV: the input function gets the column's typmod
COPY people (id, ssn, note) FROM STDIN;
7	777-77-7777	copied as text
\.
COPY people (id, ssn, note) FROM STDIN WITH (FORMAT csv);
8,888-88-8888,"copied, as csv"
\.
-- a COPY error shows no plaintext: not the field being read, nor the raw
-- line (for an error later in the row, here a duplicate key)
COPY people (id, ssn, note) FROM STDIN;
8	888-00-0000	must not be shown
\.

-- every value decrypts to what was written, under the column's key
SELECT id, ssn::text AS ssn, note::text AS note, colcrypt.key_name(ssn) AS ssn_key,
       colcrypt.key_name(note) AS note_key
  FROM people ORDER BY id;
-- the stored bytes are ciphertext: no plaintext in their text form
SELECT count(*) AS rows, count(*) FILTER (WHERE format('%s', ssn) LIKE 'colcrypt:%') AS sealed
  FROM people;
SELECT count(*) AS plaintext_in_any_envelope
  FROM people, staging
 WHERE position(convert_to(staging.ssn, 'UTF8') IN colcrypt.encrypted_send(people.ssn)) > 0;

-- the AAD binds a value to the column's binding: "colcrypt.column:" || binding
SELECT colcrypt.decrypt_field(ssn, 'colcrypt.column:people.ssn') FROM people WHERE id = 1;
SELECT colcrypt.decrypt_field(ssn, '') FROM people WHERE id = 1;
\echo :SQLSTATE
-- reads through a view or a subquery keep the column's type, and so its binding
CREATE VIEW people_plain AS SELECT id, colcrypt.decrypt_field(ssn) AS ssn FROM people;
SELECT * FROM people_plain WHERE id <= 2 ORDER BY id;
SELECT s::text FROM (SELECT ssn AS s FROM people WHERE id = 2) q;
-- where the type modifier is lost (a function argument), the binding must be given
CREATE FUNCTION pg_temp.reveal(v colcrypt.encrypted) RETURNS text
    LANGUAGE plpgsql AS $$ BEGIN RETURN colcrypt.decrypt_field(v); END $$;
SELECT pg_temp.reveal(ssn) FROM people WHERE id = 1;
\echo :SQLSTATE
CREATE FUNCTION pg_temp.reveal_column(v colcrypt.encrypted) RETURNS text
    LANGUAGE plpgsql AS $$ BEGIN RETURN colcrypt.decrypt_field(v, 'colcrypt.column:people.ssn'); END $$;
SELECT pg_temp.reveal_column(ssn) FROM people WHERE id = 1;

-- sealed values: accepted only when sealed for this column
-- a value of the same column (same typmod: no coercion, no check)
CREATE TABLE people_copy (LIKE people);
INSERT INTO people_copy SELECT * FROM people;
SELECT count(*) AS copied FROM people_copy WHERE ssn::text IS NOT NULL;
-- a sealed literal of this column's own value (what pg_dump --inserts writes)
SELECT colcrypt.ciphertext(ssn) AS sealed_1 FROM people WHERE id = 1 \gset
INSERT INTO people (id, ssn) VALUES (9, :'sealed_1');
SELECT ssn::text, colcrypt.ciphertext(ssn) = :'sealed_1' AS same_bytes FROM people WHERE id = 9;
-- encrypt_field() output (no binding), a value of another column, a value of
-- another key: refused (22023), never re-encrypted silently
INSERT INTO people (id, ssn) VALUES (10, colcrypt.encrypt_field('x', 'regress_key'));
\echo :SQLSTATE
INSERT INTO people (id, ssn) SELECT 10, v FROM (SELECT note AS v FROM people WHERE id = 1) s;
\echo :SQLSTATE
CREATE TABLE other_column (ssn colcrypt.encrypted('regress_key', 'other.ssn'));
INSERT INTO other_column SELECT ssn FROM people WHERE id = 1;
\echo :SQLSTATE
INSERT INTO people (id, ssn) VALUES (10, colcrypt.encrypt_field('x', 'regress_other', 'colcrypt.column:people.ssn'));
\echo :SQLSTATE
-- encrypt_field() with the column's key and context is the column's own kind of value: stored
INSERT INTO people (id, ssn) VALUES (10, colcrypt.encrypt_field('sealed by hand', 'regress_key', 'colcrypt.column:people.ssn'));
SELECT ssn::text FROM people WHERE id = 10;
DELETE FROM people WHERE id = 10;
-- the way to move a value between columns: decrypt it, the target encrypts
INSERT INTO other_column SELECT colcrypt.decrypt_field(ssn) FROM people WHERE id = 1;
SELECT ssn::text FROM other_column;
-- a value copied into another column by a raw byte copy does not decrypt there
CREATE CAST (colcrypt.encrypted AS bytea) WITHOUT FUNCTION;
CREATE CAST (bytea AS colcrypt.encrypted) WITHOUT FUNCTION;
UPDATE other_column SET ssn = (SELECT ssn::bytea::colcrypt.encrypted FROM people WHERE id = 2)::bytea::colcrypt.encrypted('regress_key', 'other.ssn');
\echo :SQLSTATE

-- text that starts with "colcrypt:" claims to be a sealed value: a plaintext
-- spelled that way is refused, not guessed at
INSERT INTO people (id, ssn) VALUES (11, 'colcrypt:not a value');
\echo :SQLSTATE
INSERT INTO people (id, ssn) VALUES (11, ' COLCRYPT:AAAA');
\echo :SQLSTATE
INSERT INTO people (id, ssn) SELECT 11, 'colcrypt: typed text'::text;
\echo :SQLSTATE

-- 7. migrating a plaintext column in place: ALTER COLUMN ... TYPE
CREATE TABLE legacy (id int, ssn text, card varchar(19));
INSERT INTO legacy VALUES (1, '123-45-6789', '4111111111111111'), (2, NULL, '5500000000000004');
ALTER TABLE legacy ALTER COLUMN ssn TYPE colcrypt.encrypted('regress_key', 'legacy.ssn');
ALTER TABLE legacy ALTER COLUMN card TYPE colcrypt.encrypted('regress_key', 'legacy.card')
    USING replace(card, '0', '0');
SELECT id, ssn::text, card::text, format('%s', card) LIKE 'colcrypt:%' AS sealed
  FROM legacy ORDER BY id;
-- 8. the online migration for large tables: a new column, batches that commit
CREATE TABLE big_legacy (id int PRIMARY KEY, ssn text);
INSERT INTO big_legacy SELECT i, 'ssn-' || i FROM generate_series(1, 2500) i;
UPDATE big_legacy SET ssn = NULL WHERE id % 1000 = 0;
ALTER TABLE big_legacy ADD COLUMN ssn_enc colcrypt.encrypted('regress_key', 'big_legacy.ssn');
CALL colcrypt.encrypt_column('big_legacy', 'ssn', 'ssn_enc', 1000);
SELECT count(*) AS rows, count(ssn_enc) AS encrypted,
       count(*) FILTER (WHERE ssn_enc::text = ssn) AS matching
  FROM big_legacy;
-- the swap, in one short transaction
BEGIN;
ALTER TABLE big_legacy DROP COLUMN ssn;
ALTER TABLE big_legacy RENAME COLUMN ssn_enc TO ssn;
COMMIT;
SELECT ssn::text FROM big_legacy WHERE id = 1234;
CALL colcrypt.encrypt_column('big_legacy', 'ssn', 'ssn', 0);
\echo :SQLSTATE

-- a column without a key takes sealed values only: every plaintext write
-- path fails, and nothing is stored
INSERT INTO people (id, free) VALUES (20, 'plaintext');
\echo :SQLSTATE
UPDATE people SET free = 'plaintext' WHERE id = 1;
\echo :SQLSTATE
PREPARE free_untyped AS INSERT INTO people (id, free) VALUES ($1, $2);
EXECUTE free_untyped(20, 'plaintext');
\echo :SQLSTATE
INSERT INTO people (id, free) SELECT 20, 'plaintext'::text;
\echo :SQLSTATE
WITH w AS (INSERT INTO people (id, free) VALUES (20, 'plaintext') RETURNING id) SELECT * FROM w;
\echo :SQLSTATE
INSERT INTO people (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET free = 'plaintext';
\echo :SQLSTATE
MERGE INTO people p USING (VALUES (1)) s(id) ON p.id = s.id WHEN MATCHED THEN UPDATE SET free = 'plaintext';
\echo :SQLSTATE
COPY people (id, free) FROM STDIN;
20	plaintext
\.
COPY people (id, free) FROM STDIN WITH (FORMAT csv);
20,plaintext
\.
SELECT count(*) AS rows_with_free FROM people WHERE free IS NOT NULL;
-- sealed values go in as they are
UPDATE people SET free = colcrypt.encrypt_field('free text', 'regress_other', 'row-1') WHERE id = 1;
SELECT colcrypt.decrypt_field(free, 'row-1') FROM people WHERE id = 1;
-- a plaintext never becomes a value outside a key-bound column
SELECT 'plaintext'::colcrypt.encrypted;
\echo :SQLSTATE
SELECT colcrypt.decrypt_field('plaintext');
\echo :SQLSTATE
SELECT 'plaintext'::text::colcrypt.encrypted;
\echo :SQLSTATE
-- CREATE TABLE AS, SELECT INTO, materialized views: a plaintext would make a
-- column without a key, so it is refused and no table is made
CREATE TABLE ctas AS SELECT 'secret plaintext'::colcrypt.encrypted AS v;
\echo :SQLSTATE
CREATE TABLE ctas2 AS SELECT v FROM (SELECT 'secret plaintext'::colcrypt.encrypted AS v) s;
\echo :SQLSTATE
CREATE TABLE ctas2 AS SELECT 'a'::colcrypt.encrypted AS v UNION ALL SELECT 'b'::colcrypt.encrypted;
\echo :SQLSTATE
SELECT 'secret plaintext'::colcrypt.encrypted AS v INTO ctas2;
\echo :SQLSTATE
EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF)
  CREATE TABLE ctas2 AS SELECT 'secret plaintext'::colcrypt.encrypted AS v;
\echo :SQLSTATE
DO $$ BEGIN CREATE TABLE ctas2 AS SELECT 'secret plaintext'::colcrypt.encrypted AS v; END $$;
\echo :SQLSTATE
-- (an event trigger planning its own queries first changes nothing)
CREATE FUNCTION ddl_start() RETURNS event_trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM count(*) FROM pg_class; END $$;
CREATE EVENT TRIGGER ddl_start ON ddl_command_start
  WHEN TAG IN ('CREATE TABLE AS', 'SELECT INTO', 'CREATE MATERIALIZED VIEW')
  EXECUTE FUNCTION ddl_start();
CREATE TABLE ctas2 AS SELECT 'secret plaintext'::colcrypt.encrypted AS v;
\echo :SQLSTATE
DROP EVENT TRIGGER ddl_start;
DROP FUNCTION ddl_start();
CREATE MATERIALIZED VIEW mv AS SELECT 'secret plaintext'::colcrypt.encrypted AS v;
\echo :SQLSTATE
CREATE MATERIALIZED VIEW mv AS SELECT 'secret plaintext'::colcrypt.encrypted AS v WITH NO DATA;
REFRESH MATERIALIZED VIEW mv;
\echo :SQLSTATE
SELECT ispopulated FROM pg_matviews WHERE matviewname = 'mv';
DROP MATERIALIZED VIEW mv;
SELECT count(*) AS tables_made FROM pg_class WHERE relname IN ('ctas', 'ctas2', 'mv');
-- sealed values, and a key-bound column's type modifier, pass through
CREATE TABLE ctas2 AS SELECT id, ssn, free FROM people;
SELECT format_type(atttypid, atttypmod) FROM pg_attribute
 WHERE attrelid = 'ctas2'::regclass AND attnum > 0 ORDER BY attnum;
SELECT count(*) AS same FROM people p JOIN ctas2 c USING (id)
 WHERE colcrypt.ciphertext(p.ssn) = colcrypt.ciphertext(c.ssn);
CREATE TABLE ctas3 AS SELECT 'typed'::colcrypt.encrypted('regress_key', 'people.ssn') AS v;
SELECT v::text FROM ctas3;
DROP TABLE ctas2, ctas3;

-- a domain over colcrypt.encrypted without a key is a column without a key
CREATE DOMAIN enc_free AS colcrypt.encrypted;
CREATE DOMAIN enc_keyed AS colcrypt.encrypted('regress_key', 'people.ssn');
CREATE TABLE dom (id int, f enc_free, k enc_keyed);
INSERT INTO dom (id, f) VALUES (1, 'plaintext');
\echo :SQLSTATE
UPDATE dom SET f = 'plaintext';
\echo :SQLSTATE
COPY dom (id, f) FROM STDIN;
1	plaintext
\.
CREATE TABLE ctas2 AS SELECT 'plaintext'::enc_free AS v;
\echo :SQLSTATE
SELECT count(*) AS rows_stored FROM dom;
INSERT INTO dom (id, f, k) VALUES (2, colcrypt.encrypt_field('sealed', 'regress_other', 'dom'),
                                   'keyed plaintext');
-- (reading a domain loses the type modifier: pass the column's context)
SELECT colcrypt.decrypt_field(f, 'dom') AS f,
       colcrypt.decrypt_field(k, 'colcrypt.column:people.ssn') AS k FROM dom;

-- COPY FROM run by a function or a DO block refuses plaintext as well
DO $$ BEGIN COPY people (id, free) FROM PROGRAM 'echo 20,plaintext' WITH (FORMAT csv); END $$;
\echo :SQLSTATE
CREATE FUNCTION copy_in() RETURNS void LANGUAGE plpgsql AS $$
BEGIN COPY dom (id, f) FROM PROGRAM 'echo 3,plaintext' WITH (FORMAT csv); END $$;
SELECT copy_in();
\echo :SQLSTATE
SELECT count(*) AS rows_with_free FROM people WHERE id = 20;
SELECT count(*) AS rows_stored FROM dom;
-- (into a key-bound column it encrypts)
DO $$ BEGIN COPY dom (id, k) FROM PROGRAM 'echo 4,copied in a block' WITH (FORMAT csv); END $$;
SELECT colcrypt.decrypt_field(k, 'colcrypt.column:people.ssn') FROM dom WHERE id = 4;
DROP FUNCTION copy_in();

-- ADD COLUMN with a plaintext default: the default would be stored as the
-- column's value for every existing row
ALTER TABLE dom ADD COLUMN d colcrypt.encrypted DEFAULT 'plaintext';
\echo :SQLSTATE
ALTER TABLE dom ADD COLUMN d enc_free DEFAULT 'plaintext';
\echo :SQLSTATE
SELECT count(*) AS columns_added FROM pg_attribute WHERE attrelid = 'dom'::regclass AND attname = 'd';
-- (a key-bound column's default is sealed)
ALTER TABLE dom ADD COLUMN d colcrypt.encrypted('regress_key', 'dom.d') DEFAULT 'keyed default'::text;
SELECT DISTINCT d::text FROM dom;
DROP TABLE dom;
DROP DOMAIN enc_free, enc_keyed;

-- the pending format itself: sealed under a key that lives only in the
-- backend's memory, never the plaintext
SELECT position(convert_to('secret', 'UTF8') IN v::bytea) AS plaintext_at,
       octet_length(v::bytea) > length('secret plaintext') AS longer
  FROM (SELECT 'secret plaintext'::colcrypt.encrypted AS v) s;
DROP CAST (colcrypt.encrypted AS bytea);
DROP CAST (bytea AS colcrypt.encrypted);

-- COPY carries the ciphertext byte for byte, and COPY of sealed values into a
-- key-bound column needs no keyd (what a restore does)
\copy people TO 'results/colcrypt_people.copy'
CREATE TABLE people_restored (LIKE people);
SET colcrypt.key_cache_ttl = 0;
SET colcrypt.keyd_socket = '/nonexistent/keyd.sock';
\copy people_restored FROM 'results/colcrypt_people.copy'
-- (an INSERT of a sealed literal does need keyd: the column checks the value)
INSERT INTO people_restored (id, ssn) VALUES (99, :'sealed_1');
\echo :SQLSTATE
RESET colcrypt.keyd_socket;
RESET colcrypt.key_cache_ttl;
SELECT count(*) AS rows,
       count(*) FILTER (WHERE colcrypt.ciphertext(p.ssn) = colcrypt.ciphertext(r.ssn)) AS same_ssn,
       count(*) FILTER (WHERE p.note IS NULL OR colcrypt.ciphertext(p.note) = colcrypt.ciphertext(r.note)) AS same_note
  FROM people p JOIN people_restored r USING (id);
SELECT ssn::text FROM people_restored WHERE id = 1;

-- The backstop: every table column whose type holds colcrypt.encrypted (the
-- type, a domain, an array, a composite) carries CHECK (colcrypt.sealed(col)),
-- added by an event trigger. Postgres checks it on every stored row after
-- BEFORE triggers, in COPY and in ALTER TABLE rewrites, so the paths the
-- planner hook cannot see refuse a plaintext too (22P02) instead of storing
-- bytes nobody can decrypt.
CREATE TYPE enc_pair AS (n int, e colcrypt.encrypted);
CREATE TYPE keyed_pair AS (n int, e colcrypt.encrypted('regress_key', 'keyed_pair.e'));
CREATE DOMAIN enc_free AS colcrypt.encrypted;
CREATE TABLE holders (id int, free colcrypt.encrypted, k colcrypt.encrypted('regress_key', 'holders.k'),
                      arr colcrypt.encrypted[], karr colcrypt.encrypted('regress_key', 'holders.karr')[],
                      p enc_pair, kp keyed_pair, d enc_free, n int);
SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint
 WHERE conrelid = 'holders'::regclass ORDER BY conname;
-- arrays and composites without a key: a plaintext element or field is refused
INSERT INTO holders (id, arr) VALUES (1, '{a,b}');
\echo :SQLSTATE
INSERT INTO holders (id, arr) VALUES (1, ARRAY['a']::colcrypt.encrypted[]);
\echo :SQLSTATE
INSERT INTO holders (id, p) VALUES (1, '(1,plaintext)');
\echo :SQLSTATE
INSERT INTO holders (id, p) VALUES (1, ROW(1, 'plaintext'));
\echo :SQLSTATE
SELECT count(*) AS rows_stored FROM holders;
-- sealed elements and fields go in as they are
INSERT INTO holders (id, arr, p) VALUES (1, ARRAY[colcrypt.encrypt_field('elem', 'regress_key', 'a')],
                                     ROW(1, colcrypt.encrypt_field('field', 'regress_key', 'p')));
UPDATE holders SET arr = arr || '{plaintext}'::colcrypt.encrypted[] WHERE id = 1;
\echo :SQLSTATE
SELECT colcrypt.decrypt_field(arr[1], 'a') AS elem, colcrypt.decrypt_field((p).e, 'p') AS field
  FROM holders WHERE id = 1;
-- key-bound arrays: Postgres applies the element's typmod coercion, so each
-- element is encrypted under the column's key and binding
INSERT INTO holders (id, karr) VALUES (2, '{one,two}');
INSERT INTO holders (id, karr) VALUES (3, ARRAY['three', 'four']::text[]);
UPDATE holders SET karr[2] = 'TWO' WHERE id = 2;
UPDATE holders SET karr = array_append(karr, 'five') WHERE id = 3;
SELECT id, karr[1]::text AS first, colcrypt.decrypt_field(karr[2]) AS second,
       colcrypt.decrypt_field(karr[3]) AS third,
       colcrypt.decrypt_field(karr[1], 'colcrypt.column:holders.karr') AS with_context
  FROM holders WHERE id IN (2, 3) ORDER BY id;
SELECT count(*) AS plaintext_in_any_element
  FROM holders, unnest(karr) e
 WHERE position('\x6f6e65'::bytea IN colcrypt.encrypted_send(e)) > 0;
-- (an element sealed for another column is refused, as for a plain column)
UPDATE holders SET karr[1] = (SELECT ssn FROM people WHERE id = 1) WHERE id = 2;
\echo :SQLSTATE
-- a composite type with a key-bound field encrypts the field
INSERT INTO holders (id, kp) VALUES (4, '(4,"in a record")'), (5, ROW(5, 'in a row'));
SELECT id, (kp).n, (kp).e::text FROM holders WHERE id IN (4, 5) ORDER BY id;
-- a BEFORE trigger that assigns a plaintext: refused in a column without a
-- key; encrypted in a key-bound column (PL/pgSQL applies the typmod)
CREATE FUNCTION holders_fill() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.n = 1 THEN NEW.free := 'set by a trigger'; END IF;
    IF NEW.n = 2 THEN NEW.d := 'set by a trigger'; END IF;
    IF NEW.n = 3 THEN NEW.k := 'set by a trigger'; END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER holders_fill BEFORE INSERT OR UPDATE ON holders
    FOR EACH ROW EXECUTE FUNCTION holders_fill();
INSERT INTO holders (id, n) VALUES (6, 1);
\echo :SQLSTATE
INSERT INTO holders (id, n) VALUES (6, 2);
\echo :SQLSTATE
UPDATE holders SET n = 1 WHERE id = 1;
\echo :SQLSTATE
COPY holders (id, n) FROM STDIN;
6	1
\.
INSERT INTO holders (id, n) VALUES (6, 3);
SELECT k::text FROM holders WHERE id = 6;
DROP TRIGGER holders_fill ON holders;
DROP FUNCTION holders_fill();
-- the constraint cannot be dropped for good: the event trigger adds it back
ALTER TABLE holders DROP CONSTRAINT colcrypt_sealed_free;
SELECT count(*) AS sealed_check_on_free FROM pg_constraint
 WHERE conrelid = 'holders'::regclass AND conname = 'colcrypt_sealed_free';
INSERT INTO holders (id, free) VALUES (7, 'plaintext');
\echo :SQLSTATE
-- table rewrites: ALTER COLUMN ... TYPE ... USING an expression that yields a
-- plaintext of the type, into a column without a key
CREATE TABLE rewrite (id int, v colcrypt.encrypted, t text);
INSERT INTO rewrite VALUES (1, colcrypt.encrypt_field('sealed', 'regress_key', 'r'), 'plain');
ALTER TABLE rewrite ALTER COLUMN v TYPE colcrypt.encrypted USING 'plaintext'::colcrypt.encrypted;
\echo :SQLSTATE
ALTER TABLE rewrite ALTER COLUMN t TYPE enc_free USING 'plaintext'::enc_free;
\echo :SQLSTATE
ALTER TABLE rewrite ALTER COLUMN t TYPE colcrypt.encrypted[] USING '{plaintext}';
\echo :SQLSTATE
-- ... and one too large to stay in the row: the rewrite stored it out of line
-- before the check existed, and the validation after it fetches it
CREATE FUNCTION big_plain_array() RETURNS text LANGUAGE sql
    AS $$ SELECT array_agg(md5(g::text))::text FROM generate_series(1, 300) g $$;
ALTER TABLE rewrite ALTER COLUMN t TYPE colcrypt.encrypted[] USING big_plain_array()::colcrypt.encrypted[];
\echo :SQLSTATE
DROP FUNCTION big_plain_array();
SELECT colcrypt.decrypt_field(v, 'r') AS v, t FROM rewrite;
-- CREATE TABLE AS EXECUTE of a plan cached before (the planner hook does not
-- see it): the table is made, then its new constraint refuses the rows
SET plan_cache_mode = force_generic_plan;
PREPARE make_rows AS SELECT 1 AS id, 'secret plaintext'::colcrypt.encrypted AS v;
EXPLAIN (COSTS OFF) EXECUTE make_rows;
CREATE TABLE ctas_exec AS EXECUTE make_rows;
\echo :SQLSTATE
RESET plan_cache_mode;
SELECT count(*) AS tables_made FROM pg_class WHERE relname = 'ctas_exec';
-- an ALTER TABLE that rewrites nothing (ADD COLUMN: the online migration of
-- a large table) adds the check NOT VALID, without a scan under its lock,
-- once the new column's stored default is checked; VALIDATE CONSTRAINT
-- checks the old rows later under a lock that lets writes go on. After a
-- rewrite, the check is added validated.
CREATE TABLE online (id int, ssn text, card text);
INSERT INTO online SELECT i, 'ssn-' || i, 'card-' || i FROM generate_series(1, 10) i;
ALTER TABLE online ADD COLUMN ssn_enc colcrypt.encrypted('regress_key', 'online.ssn');
ALTER TABLE online ADD COLUMN tags colcrypt.encrypted[] DEFAULT '{plaintext}';
\echo :SQLSTATE
ALTER TABLE online ALTER COLUMN card TYPE colcrypt.encrypted('regress_key', 'online.card');
SELECT conname, convalidated FROM pg_constraint WHERE conrelid = 'online'::regclass ORDER BY 1;
ALTER TABLE online VALIDATE CONSTRAINT colcrypt_sealed_ssn_enc;
SELECT conname, convalidated FROM pg_constraint WHERE conrelid = 'online'::regclass ORDER BY 1;
SELECT count(*) FILTER (WHERE card::text = 'card-' || id) AS cards FROM online;
DROP TABLE online;
-- (an empty table's check is validated, there is nothing to scan: a
-- partition made that way attaches to a parent whose check is valid)
CREATE TABLE parts (id int, x colcrypt.encrypted) PARTITION BY RANGE (id);
CREATE TABLE part_a (id int);
ALTER TABLE part_a ADD COLUMN x colcrypt.encrypted;
SELECT conname, convalidated FROM pg_constraint WHERE conrelid = 'part_a'::regclass;
ALTER TABLE parts ATTACH PARTITION part_a FOR VALUES FROM (0) TO (10);
INSERT INTO parts VALUES (1, 'plaintext'::text::colcrypt.encrypted('regress_key', 'parts.x'));
SELECT colcrypt.decrypt_field(x, 'colcrypt.column:parts.x') FROM parts;
DROP TABLE parts;
-- typed tables (CREATE TABLE ... OF) get the check when ALTER TYPE ...
-- CASCADE gives them a column of the type
CREATE TYPE row_type AS (id int, k text);
CREATE TABLE typed OF row_type;
INSERT INTO typed VALUES (1, NULL);
ALTER TYPE row_type ADD ATTRIBUTE e colcrypt.encrypted CASCADE;
ALTER TYPE row_type ALTER ATTRIBUTE k TYPE colcrypt.encrypted('regress_key', 'typed.k') CASCADE;
SELECT conname, convalidated FROM pg_constraint WHERE conrelid = 'typed'::regclass ORDER BY 1;
DROP TABLE typed;
DROP TYPE row_type;
-- a restore: pg_dump writes a check added NOT VALID (above) as an ALTER TABLE
-- of its own after the CREATE TABLE, which already got the check
CREATE TABLE restored (id int, x colcrypt.encrypted);
ALTER TABLE restored ADD CONSTRAINT colcrypt_sealed_x CHECK (colcrypt.sealed(x)) NOT VALID;
\echo :SQLSTATE
SELECT conname, convalidated FROM pg_constraint WHERE conrelid = 'restored'::regclass;
-- (another constraint of that name still collides)
ALTER TABLE restored ADD CONSTRAINT colcrypt_sealed_x CHECK (x IS NOT NULL) NOT VALID;
DROP TABLE restored;
-- the check does not fetch a value still in TOAST storage (an UPDATE of
-- other columns): it was checked when stored
CREATE TABLE toasted (id int, v colcrypt.encrypted('regress_key', 'toasted.v'), n int);
INSERT INTO toasted SELECT i, repeat('x', 5000)::text, 0 FROM generate_series(1, 50) i;
SELECT pg_stat_force_next_flush();
SELECT toast_blks_read + toast_blks_hit AS toast_before FROM pg_statio_user_tables
 WHERE relname = 'toasted' \gset
UPDATE toasted SET n = n + 1;
SELECT pg_stat_force_next_flush();
SELECT toast_blks_read + toast_blks_hit - :toast_before AS toast_blocks_read_by_update
  FROM pg_statio_user_tables WHERE relname = 'toasted';
DROP TABLE toasted;
-- a table owner who is not a superuser gets the constraints too
CREATE ROLE regress_cc_owner IN ROLE colcrypt_user;
GRANT CREATE ON SCHEMA public TO regress_cc_owner;
SET ROLE regress_cc_owner;
CREATE TABLE owned (v colcrypt.encrypted);
INSERT INTO owned VALUES ('plaintext'::enc_free);
\echo :SQLSTATE
SELECT conname FROM pg_constraint WHERE conrelid = 'owned'::regclass;
DROP TABLE owned;
RESET ROLE;
REVOKE CREATE ON SCHEMA public FROM regress_cc_owner;
DROP ROLE regress_cc_owner;

-- ALTER COLUMN ... TYPE colcrypt.encrypted (no key) on a key-bound column
-- would drop its key and binding silently: refused
ALTER TABLE holders ALTER COLUMN k TYPE colcrypt.encrypted;
\echo :SQLSTATE
ALTER TABLE holders ALTER COLUMN k TYPE enc_free;
\echo :SQLSTATE
-- (also through ALTER TYPE ... CASCADE on a typed table's attribute)
CREATE TYPE keyed_row AS (id int, k colcrypt.encrypted('regress_key', 'keyed_row.k'));
CREATE TABLE keyed_typed OF keyed_row;
ALTER TYPE keyed_row ALTER ATTRIBUTE k TYPE colcrypt.encrypted CASCADE;
\echo :SQLSTATE
SELECT format_type(atttypid, atttypmod) FROM pg_attribute
 WHERE attrelid = 'keyed_typed'::regclass AND attname = 'k';
DROP TABLE keyed_typed;
DROP TYPE keyed_row;
SELECT format_type(atttypid, atttypmod) FROM pg_attribute
 WHERE attrelid = 'holders'::regclass AND attname = 'k';
-- (restating the same key and binding is allowed and changes nothing)
ALTER TABLE holders ALTER COLUMN k TYPE colcrypt.encrypted('regress_key', 'holders.k');
SELECT k::text FROM holders WHERE id = 6;
DROP TABLE holders, rewrite;
DROP TYPE enc_pair, keyed_pair;
DROP DOMAIN enc_free;

DEALLOCATE ALL;
DROP VIEW people_plain;
DROP TABLE people, random_binding, staging, people_copy, other_column, legacy, big_legacy,
    people_restored;
