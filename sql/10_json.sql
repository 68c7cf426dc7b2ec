-- JSON documents: encrypt_json / decrypt_json encrypt and decrypt the values
-- at dot-separated paths, walking arrays on the way; missing paths are
-- skipped; values that are already encrypted are left alone. Each value is
-- bound (AAD) to its path.

\set doc '{"name": "Ada", "ssn": "123-45-6789", "age": 36, "tags": ["a", "b"], "address": {"street": "1 Main St", "zip": "12345"}, "cards": [{"number": "4111111111111111", "exp": "12/30"}, {"number": "5500000000000004", "exp": "01/29"}, {"exp": "none"}], "empty": null}'
SELECT colcrypt.encrypt_json(:'doc', 'regress_key',
                             '{ssn,age,tags,address.zip,cards.number,missing,address.missing.deeper}')
       AS enc \gset
-- what stays, what is encrypted (each encrypted value is a "colcrypt:" string)
SELECT key, regexp_replace(value::text, '"colcrypt:[A-Za-z0-9+/=]+"', '(encrypted)', 'g') AS value
  FROM jsonb_each(:'enc') ORDER BY key;
SELECT jsonb_path_query_array(:'enc', '$.cards[*].number') @? '$[*] ? (@ like_regex "^colcrypt:")'
       AS card_numbers_encrypted,
       :'enc'::jsonb #>> '{cards,0,exp}' AS exp_left_alone,
       :'enc'::jsonb #>> '{address,street}' AS street_left_alone;
-- no plaintext of an encrypted path in the document
SELECT position('123-45-6789' IN :'enc') AS ssn_at, position('4111111111111111' IN :'enc') AS card_at;
-- decrypt_json restores the document exactly (types included)
SELECT colcrypt.decrypt_json(:'enc', '{ssn,age,tags,address.zip,cards.number,missing}') = :'doc'::jsonb
       AS restored;
-- decrypting only some paths leaves the others encrypted
SELECT colcrypt.decrypt_json(:'enc', '{ssn}') ->> 'ssn' AS ssn,
       colcrypt.decrypt_json(:'enc', '{ssn}') ->> 'age' LIKE 'colcrypt:%' AS age_still_encrypted;
-- encrypting again leaves encrypted values alone (no double encryption)
SELECT colcrypt.encrypt_json(:'enc', 'regress_key', '{ssn,age,cards.number}') = :'enc'::jsonb
       AS unchanged;
-- a "colcrypt:" string that is not a value is an error, not a guess
SELECT colcrypt.encrypt_json('{"a": "colcrypt:nope"}', 'regress_key', '{a}');
\echo :SQLSTATE
-- values are bound to their path: moved to another path, they do not decrypt
SELECT colcrypt.decrypt_json(jsonb_build_object('other', :'enc'::jsonb -> 'ssn'), '{other}');
\echo :SQLSTATE
-- a value already encrypted at a path is kept only when it is under the given
-- key and opens with this path's context: a client cannot plant a ciphertext
-- copied from another key or another path (22023, nothing is decrypted)
SELECT colcrypt.encrypt_json(jsonb_build_object('ssn', colcrypt.ciphertext(
           colcrypt.encrypt_field('"planted"', 'regress_other', 'colcrypt.json:ssn'))),
       'regress_key', '{ssn}');
\echo :SQLSTATE
SELECT colcrypt.encrypt_json(jsonb_build_object('ssn', :'enc'::jsonb -> 'age'), 'regress_key', '{ssn}');
\echo :SQLSTATE
SELECT colcrypt.encrypt_json(jsonb_build_object('ssn', colcrypt.ciphertext(
           colcrypt.encrypt_field('"planted"', 'regress_key'))), 'regress_key', '{ssn}');
\echo :SQLSTATE
-- optional row binding: values are also bound to a row (its primary key)
SELECT colcrypt.encrypt_json('{"ssn": "111-11-1111"}', 'regress_key', '{ssn}', 'customers:1') AS row1 \gset
SELECT colcrypt.decrypt_json(:'row1', '{ssn}', 'customers:1') AS row1_plain;
SELECT colcrypt.encrypt_json(:'row1', 'regress_key', '{ssn}', 'customers:1') = :'row1'::jsonb
       AS unchanged;
-- row 1's value copied into row 2's document: refused on write, and does not decrypt as row 2
SELECT colcrypt.encrypt_json(:'row1', 'regress_key', '{ssn}', 'customers:2');
\echo :SQLSTATE
SELECT colcrypt.decrypt_json(:'row1', '{ssn}', 'customers:2');
\echo :SQLSTATE
SELECT colcrypt.decrypt_json(:'row1', '{ssn}');
\echo :SQLSTATE
-- without a row binding, a copy from another row at the same path and key
-- is indistinguishable (documented): use the row binding to prevent it
SELECT colcrypt.decrypt_json(colcrypt.encrypt_json(jsonb_build_object('ssn', :'enc'::jsonb -> 'ssn'),
                                                   'regress_key', '{ssn}'), '{ssn}') ->> 'ssn' AS copied;
-- '[*]' after a step is accepted (arrays are walked anyway); a top-level array
SELECT colcrypt.decrypt_json(colcrypt.encrypt_json('[{"k": 1}, {"k": 2}]', 'regress_key', '{k}'), '{k}')
       AS top_level_array;
SELECT colcrypt.decrypt_json(colcrypt.encrypt_json(:'doc', 'regress_key', '{cards[*].number}'),
                             '{cards[*].number}') = :'doc'::jsonb AS star_path;
-- NULL arguments: STRICT
SELECT colcrypt.encrypt_json(NULL, 'regress_key', '{a}') IS NULL AS a,
       colcrypt.encrypt_json('{}', 'regress_key', NULL) IS NULL AS b;

-- access: decrypt_json needs the decrypt privilege on the values' key
CREATE ROLE regress_cc_json IN ROLE colcrypt_user;
SELECT colcrypt.grant_key('regress_key', 'regress_cc_json', 'encrypt');
SET ROLE regress_cc_json;
SELECT colcrypt.encrypt_json('{"a": "x"}', 'regress_key', '{a}') ->> 'a' LIKE 'colcrypt:%' AS encrypted;
SELECT colcrypt.decrypt_json(:'enc', '{ssn}');
\echo :SQLSTATE
RESET ROLE;
SELECT colcrypt.revoke_key('regress_key', 'regress_cc_json');
DROP ROLE regress_cc_json;
