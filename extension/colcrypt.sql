-- complain if script is sourced in psql, rather than via CREATE EXTENSION
\echo Use "CREATE EXTENSION colcrypt" to load this file. \quit

-- colcrypt: column encryption for PostgreSQL with keys held outside the
-- database by colcrypt-keyd. Installed into the fixed schema colcrypt.
--
-- Access: nothing here is usable by PUBLIC. The schema's USAGE and every
-- function's EXECUTE are revoked from PUBLIC; the role colcrypt_user (NOLOGIN,
-- created below if missing, never dropped with the extension because roles
-- are cluster-wide) gets USAGE on the schema and EXECUTE on the SQL functions.
-- Let a role encrypt and decrypt with
--     GRANT colcrypt_user TO app_role;
-- Type I/O needs no grant: printing or loading a colcrypt.encrypted value
-- shows or takes the ciphertext only and never reaches a key.

--------------------------------------------------------------------------------
-- The type: a varlena holding the raw envelope (docs/format.md). Its text form
-- is "colcrypt:" followed by base64; its binary form is the envelope itself.
-- Input and receive validate the envelope's structure; no I/O function
-- decrypts or talks to colcrypt-keyd, so all are IMMUTABLE.

CREATE TYPE colcrypt.encrypted;

-- Key-bound columns: colcrypt.encrypted('key_name' [, 'binding']) has a type
-- modifier that names an entry of this catalog. The id is 31 bits of an HMAC
-- of (key_name, binding), so a restore or pg_upgrade computes the same number;
-- the typmod input function makes missing entries, so the catalog needs no
-- dump of its own (docs/columns.md). Values stored in the column are bound
-- (AAD) to the binding: "colcrypt.column:" || binding.
CREATE TABLE colcrypt.column_keys (
    id integer PRIMARY KEY CHECK (id >= 0),
    key_name text NOT NULL,
    binding text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    UNIQUE (key_name, binding)
);
COMMENT ON TABLE colcrypt.column_keys IS
    'the key and binding of each key-bound column type colcrypt.encrypted(key, binding)';

-- Per key and per role: who may encrypt, decrypt or compute blind indexes.
-- Checked by the extension on every use of a key (superusers pass). Dumped
-- with the database (pg_extension_config_dump); roles are kept by name.
-- role_name is the role's name when granted: a row counts only while the
-- role (OID) still has that name, so a role that one day receives a dropped
-- role's OID does not inherit its grants (Postgres records no dependency of
-- this table on roles, and event triggers do not see DROP ROLE).
CREATE TABLE colcrypt.key_grants (
    key_name text NOT NULL,
    role regrole NOT NULL,
    role_name name NOT NULL,
    privilege text NOT NULL CHECK (privilege IN ('encrypt', 'decrypt', 'blind_index')),
    granted_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (key_name, role, privilege)
);
COMMENT ON TABLE colcrypt.key_grants IS
    'which role may encrypt, decrypt or compute blind indexes with which colcrypt key';
SELECT pg_catalog.pg_extension_config_dump('colcrypt.key_grants', '');

CREATE FUNCTION colcrypt.encrypted_in(cstring, oid, integer) RETURNS colcrypt.encrypted
    AS 'MODULE_PATHNAME', 'colcrypt_encrypted_in'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

CREATE FUNCTION colcrypt.encrypted_out(colcrypt.encrypted) RETURNS cstring
    AS 'MODULE_PATHNAME', 'colcrypt_encrypted_out'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

CREATE FUNCTION colcrypt.encrypted_recv(internal, oid, integer) RETURNS colcrypt.encrypted
    AS 'MODULE_PATHNAME', 'colcrypt_encrypted_recv'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

CREATE FUNCTION colcrypt.encrypted_send(colcrypt.encrypted) RETURNS bytea
    AS 'MODULE_PATHNAME', 'colcrypt_encrypted_send'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

-- The type modifier: ('key_name') or ('key_name', 'binding'). Without a
-- binding the input function draws a random one (a new column identity);
-- the output function prints both, so dumps keep the identity. Postgres
-- requires both to be IMMUTABLE; the input function does record a new
-- (key, binding) in colcrypt.column_keys, which is why it is not
-- "immutable" in the strict sense (it is deterministic for a given binding).
CREATE FUNCTION colcrypt.encrypted_typmod_in(cstring[]) RETURNS integer
    AS 'MODULE_PATHNAME', 'colcrypt_encrypted_typmod_in'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

CREATE FUNCTION colcrypt.encrypted_typmod_out(integer) RETURNS cstring
    AS 'MODULE_PATHNAME', 'colcrypt_encrypted_typmod_out'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

CREATE TYPE colcrypt.encrypted (
    INPUT = colcrypt.encrypted_in,
    OUTPUT = colcrypt.encrypted_out,
    RECEIVE = colcrypt.encrypted_recv,
    SEND = colcrypt.encrypted_send,
    TYPMOD_IN = colcrypt.encrypted_typmod_in,
    TYPMOD_OUT = colcrypt.encrypted_typmod_out,
    INTERNALLENGTH = VARIABLE,
    ALIGNMENT = int4,
    -- Ciphertext does not compress: store large values out of line without
    -- spending time on a compression attempt.
    STORAGE = external
);

COMMENT ON TYPE colcrypt.encrypted IS
    'a value encrypted with AES-256-GCM under a key held by colcrypt-keyd';

--------------------------------------------------------------------------------
-- Encryption draws a random nonce per call: VOLATILE (never constant-folded).
-- Decryption depends on keyd's keys: STABLE. The header inspectors key_id and
-- key_version read the value alone: IMMUTABLE. Every function is STRICT (NULL
-- in, NULL out) and PARALLEL SAFE: each parallel worker fetches its own keys.

CREATE FUNCTION colcrypt.encrypt_field(value text, key_name text) RETURNS colcrypt.encrypted
    AS 'MODULE_PATHNAME', 'colcrypt_encrypt_text'
    LANGUAGE C VOLATILE STRICT PARALLEL SAFE;

CREATE FUNCTION colcrypt.encrypt_field(value text, key_name text, context text)
    RETURNS colcrypt.encrypted
    AS 'MODULE_PATHNAME', 'colcrypt_encrypt_text'
    LANGUAGE C VOLATILE STRICT PARALLEL SAFE;

CREATE FUNCTION colcrypt.encrypt_field(value bytea, key_name text) RETURNS colcrypt.encrypted
    AS 'MODULE_PATHNAME', 'colcrypt_encrypt_bytea'
    LANGUAGE C VOLATILE STRICT PARALLEL SAFE;

CREATE FUNCTION colcrypt.encrypt_field(value bytea, key_name text, context text)
    RETURNS colcrypt.encrypted
    AS 'MODULE_PATHNAME', 'colcrypt_encrypt_bytea'
    LANGUAGE C VOLATILE STRICT PARALLEL SAFE;

CREATE FUNCTION colcrypt.decrypt_field(value colcrypt.encrypted) RETURNS text
    AS 'MODULE_PATHNAME', 'colcrypt_decrypt_text'
    LANGUAGE C STABLE STRICT PARALLEL SAFE;

CREATE FUNCTION colcrypt.decrypt_field(value colcrypt.encrypted, context text) RETURNS text
    AS 'MODULE_PATHNAME', 'colcrypt_decrypt_text'
    LANGUAGE C STABLE STRICT PARALLEL SAFE;

CREATE FUNCTION colcrypt.decrypt_field_bytea(value colcrypt.encrypted) RETURNS bytea
    AS 'MODULE_PATHNAME', 'colcrypt_decrypt_bytea'
    LANGUAGE C STABLE STRICT PARALLEL SAFE;

CREATE FUNCTION colcrypt.decrypt_field_bytea(value colcrypt.encrypted, context text)
    RETURNS bytea
    AS 'MODULE_PATHNAME', 'colcrypt_decrypt_bytea'
    LANGUAGE C STABLE STRICT PARALLEL SAFE;

CREATE FUNCTION colcrypt.key_id(value colcrypt.encrypted) RETURNS uuid
    AS 'MODULE_PATHNAME', 'colcrypt_key_id'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

CREATE FUNCTION colcrypt.key_version(value colcrypt.encrypted) RETURNS integer
    AS 'MODULE_PATHNAME', 'colcrypt_key_version'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

CREATE FUNCTION colcrypt.key_name(value colcrypt.encrypted) RETURNS text
    AS 'MODULE_PATHNAME', 'colcrypt_key_name'
    LANGUAGE C STABLE STRICT PARALLEL SAFE;

COMMENT ON FUNCTION colcrypt.encrypt_field(text, text) IS
    'encrypts a text under the primary version of the named key';
COMMENT ON FUNCTION colcrypt.encrypt_field(text, text, text) IS
    'encrypts a text under the primary version of the named key, bound to a context';
COMMENT ON FUNCTION colcrypt.encrypt_field(bytea, text) IS
    'encrypts a bytea under the primary version of the named key';
COMMENT ON FUNCTION colcrypt.encrypt_field(bytea, text, text) IS
    'encrypts a bytea under the primary version of the named key, bound to a context';
COMMENT ON FUNCTION colcrypt.decrypt_field(colcrypt.encrypted) IS
    'decrypts a value encrypted from text';
COMMENT ON FUNCTION colcrypt.decrypt_field(colcrypt.encrypted, text) IS
    'decrypts a value encrypted from text with the context it was bound to';
COMMENT ON FUNCTION colcrypt.decrypt_field_bytea(colcrypt.encrypted) IS
    'decrypts a value to bytea';
COMMENT ON FUNCTION colcrypt.decrypt_field_bytea(colcrypt.encrypted, text) IS
    'decrypts a value to bytea with the context it was bound to';
COMMENT ON FUNCTION colcrypt.key_id(colcrypt.encrypted) IS
    'the id of the key a value was encrypted with';
COMMENT ON FUNCTION colcrypt.key_version(colcrypt.encrypted) IS
    'the version of the key a value was encrypted with';
COMMENT ON FUNCTION colcrypt.key_name(colcrypt.encrypted) IS
    'the name of the key a value was encrypted with (asks colcrypt-keyd)';

--------------------------------------------------------------------------------
-- Writes into key-bound columns (docs/columns.md). Text that does not start
-- with "colcrypt:" is plaintext: the input function turns it into a pending
-- plaintext, and the typmod coercion below seals it under the column's key.
-- A sealed value is accepted only when it was sealed for the column (its key
-- and binding); any other is refused, never re-encrypted silently.

CREATE FUNCTION colcrypt.encrypted(colcrypt.encrypted, integer, boolean)
    RETURNS colcrypt.encrypted
    AS 'MODULE_PATHNAME', 'colcrypt_encrypted_coerce'
    LANGUAGE C VOLATILE STRICT PARALLEL RESTRICTED;

CREATE FUNCTION colcrypt.encrypted(text, integer, boolean) RETURNS colcrypt.encrypted
    AS 'MODULE_PATHNAME', 'colcrypt_text_to_encrypted'
    LANGUAGE C VOLATILE STRICT PARALLEL RESTRICTED;

CREATE CAST (colcrypt.encrypted AS colcrypt.encrypted)
    WITH FUNCTION colcrypt.encrypted(colcrypt.encrypted, integer, boolean) AS IMPLICIT;
CREATE CAST (text AS colcrypt.encrypted)
    WITH FUNCTION colcrypt.encrypted(text, integer, boolean) AS ASSIGNMENT;
CREATE CAST (varchar AS colcrypt.encrypted)
    WITH FUNCTION colcrypt.encrypted(text, integer, boolean) AS ASSIGNMENT;
-- Reads: an explicit cast to text decrypts (privilege checked); the output
-- function and colcrypt.ciphertext() give the ciphertext.
CREATE CAST (colcrypt.encrypted AS text)
    WITH FUNCTION colcrypt.decrypt_field(colcrypt.encrypted);

-- Wrapped by the extension's planner hook around every value stored in a
-- colcrypt.encrypted column without a key: refuses a pending plaintext.
-- Reads nothing but its argument, so PUBLIC may run it.
CREATE FUNCTION colcrypt.require_sealed(colcrypt.encrypted) RETURNS colcrypt.encrypted
    AS 'MODULE_PATHNAME', 'colcrypt_require_sealed'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

-- Every table column whose type holds colcrypt.encrypted (directly, through a
-- domain, in an array, composite or range) gets CHECK (colcrypt.sealed(col)),
-- named colcrypt_sealed_<column>, added by the event trigger below after
-- CREATE TABLE, CREATE TABLE AS, SELECT INTO, ALTER TABLE and ALTER TYPE
-- (typed tables changed by ALTER TYPE ... CASCADE) (a dropped one
-- comes back). Postgres checks it on every stored row after BEFORE triggers,
-- in COPY and in ALTER TABLE rewrites: no pending plaintext reaches a table,
-- whatever path wrote it. Reads nothing but its argument: PUBLIC may run it.
CREATE FUNCTION colcrypt.sealed(anyelement) RETURNS boolean
    AS 'MODULE_PATHNAME', 'colcrypt_sealed'
    LANGUAGE C IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION colcrypt.sealed(anyelement) IS
    'true, or an error when a colcrypt.encrypted inside the value is a plaintext never encrypted';

CREATE FUNCTION colcrypt._ddl_start() RETURNS event_trigger
    AS 'MODULE_PATHNAME', 'colcrypt_ddl_start'
    LANGUAGE C;
CREATE FUNCTION colcrypt._ddl_end() RETURNS event_trigger
    AS 'MODULE_PATHNAME', 'colcrypt_ddl_end'
    LANGUAGE C;
CREATE FUNCTION colcrypt._table_rewrite() RETURNS event_trigger
    AS 'MODULE_PATHNAME', 'colcrypt_table_rewrite'
    LANGUAGE C;
-- Refuses ALTER COLUMN ... TYPE colcrypt.encrypted on a key-bound column
-- (it would drop the key and the binding), and the same through ALTER TYPE
-- ... ALTER ATTRIBUTE ... CASCADE on the typed tables of a composite type.
-- On CREATE TABLE AS / SELECT INTO it loads the library, so that the rows
-- are checked as they are stored even in a session that had not loaded it
-- (then the sealed checks need no scan of the new table).
CREATE EVENT TRIGGER colcrypt_ddl_start ON ddl_command_start
    WHEN TAG IN ('ALTER TABLE', 'ALTER TYPE', 'CREATE TABLE AS', 'SELECT INTO')
    EXECUTE FUNCTION colcrypt._ddl_start();
CREATE EVENT TRIGGER colcrypt_ddl_end ON ddl_command_end
    WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'ALTER TABLE', 'ALTER TYPE')
    EXECUTE FUNCTION colcrypt._ddl_end();
-- Notes the tables an ALTER TABLE rewrites: after a rewrite the checks are
-- added validated (every row was written anew); after an ALTER TABLE that
-- rewrote nothing (ADD COLUMN: the online migration) they are added NOT
-- VALID, without a scan under the lock, once the new columns' stored default
-- has been checked.
CREATE EVENT TRIGGER colcrypt_table_rewrite ON table_rewrite
    EXECUTE FUNCTION colcrypt._table_rewrite();

CREATE FUNCTION colcrypt.ciphertext(value colcrypt.encrypted) RETURNS text
    AS 'MODULE_PATHNAME', 'colcrypt_ciphertext'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION colcrypt.ciphertext(colcrypt.encrypted) IS
    'the text form of a value ("colcrypt:" + base64), as the output function prints it';

--------------------------------------------------------------------------------
-- Blind indexes: HMAC-SHA256 of the plaintext (Unicode NFC in a UTF-8
-- database) under a key derived from the named key for this purpose only.
-- STABLE (keyd's keys): store it in a column of its own and index that.

CREATE FUNCTION colcrypt.blind_index(value text, key_name text) RETURNS bytea
    AS 'MODULE_PATHNAME', 'colcrypt_blind_index'
    LANGUAGE C STABLE STRICT PARALLEL SAFE;
CREATE FUNCTION colcrypt.blind_index(value text, key_name text, context text) RETURNS bytea
    AS 'MODULE_PATHNAME', 'colcrypt_blind_index'
    LANGUAGE C STABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION colcrypt.blind_index(text, text) IS
    'keyed HMAC of a value for equality search without decryption (equal values give equal indexes)';
COMMENT ON FUNCTION colcrypt.blind_index(text, text, text) IS
    'keyed HMAC of a value within a context (a column name, a tenant)';

--------------------------------------------------------------------------------
-- Deterministic encryption (AES-256-SIV): equal plaintexts under one key and
-- context give equal bytea values, for equality joins and unique indexes on
-- the ciphertext itself. Leaks equality by design (docs/columns.md). STABLE:
-- no randomness, but keyd's keys.

CREATE FUNCTION colcrypt.encrypt_deterministic(value text, key_name text) RETURNS bytea
    AS 'MODULE_PATHNAME', 'colcrypt_encrypt_deterministic'
    LANGUAGE C STABLE STRICT PARALLEL SAFE;
CREATE FUNCTION colcrypt.encrypt_deterministic(value text, key_name text, context text)
    RETURNS bytea
    AS 'MODULE_PATHNAME', 'colcrypt_encrypt_deterministic'
    LANGUAGE C STABLE STRICT PARALLEL SAFE;
CREATE FUNCTION colcrypt.decrypt_deterministic(value bytea) RETURNS text
    AS 'MODULE_PATHNAME', 'colcrypt_decrypt_deterministic'
    LANGUAGE C STABLE STRICT PARALLEL SAFE;
CREATE FUNCTION colcrypt.decrypt_deterministic(value bytea, context text) RETURNS text
    AS 'MODULE_PATHNAME', 'colcrypt_decrypt_deterministic'
    LANGUAGE C STABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION colcrypt.encrypt_deterministic(text, text) IS
    'deterministic AES-256-SIV encryption: equal plaintexts give equal values';
COMMENT ON FUNCTION colcrypt.encrypt_deterministic(text, text, text) IS
    'deterministic AES-256-SIV encryption bound to a context';
COMMENT ON FUNCTION colcrypt.decrypt_deterministic(bytea) IS
    'decrypts a value of encrypt_deterministic';
COMMENT ON FUNCTION colcrypt.decrypt_deterministic(bytea, text) IS
    'decrypts a value of encrypt_deterministic with its context';

--------------------------------------------------------------------------------
-- Key privileges. grant_key / revoke_key are for superusers (EXECUTE is not
-- granted to anyone); privilege is encrypt, decrypt, blind_index or all.

CREATE FUNCTION colcrypt._reset_privilege_cache() RETURNS void
    AS 'MODULE_PATHNAME', 'colcrypt_reset_privilege_cache'
    LANGUAGE C VOLATILE PARALLEL UNSAFE;

-- Backends cache privileges until a grant or a role changes: any change to
-- key_grants (grant_key, revoke_key, or plain DML) makes every backend forget
-- them (src/pg/columns.cpp).
CREATE FUNCTION colcrypt._key_grants_changed() RETURNS trigger
    AS 'MODULE_PATHNAME', 'colcrypt_key_grants_changed'
    LANGUAGE C VOLATILE PARALLEL UNSAFE;
CREATE TRIGGER key_grants_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON colcrypt.key_grants
    FOR EACH STATEMENT EXECUTE FUNCTION colcrypt._key_grants_changed();

CREATE FUNCTION colcrypt._privileges(privilege text) RETURNS text[]
    LANGUAGE plpgsql IMMUTABLE STRICT
    SET search_path = pg_catalog, pg_temp
    AS $$
BEGIN
    IF privilege = 'all' THEN
        RETURN ARRAY['encrypt', 'decrypt', 'blind_index'];
    ELSIF privilege IN ('encrypt', 'decrypt', 'blind_index') THEN
        RETURN ARRAY[privilege];
    END IF;
    RAISE EXCEPTION 'unknown colcrypt key privilege "%"', privilege
        USING ERRCODE = '22023', HINT = 'Use encrypt, decrypt, blind_index or all.';
END
$$;

CREATE FUNCTION colcrypt.grant_key(key_name text, grantee regrole, privilege text DEFAULT 'all')
    RETURNS void
    LANGUAGE plpgsql VOLATILE STRICT
    SET search_path = pg_catalog, pg_temp
    AS $$
BEGIN
    IF grant_key.key_name !~ '^[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}$' THEN
        RAISE EXCEPTION 'invalid colcrypt key name' USING ERRCODE = '22023';
    END IF;
    INSERT INTO colcrypt.key_grants AS g (key_name, role, role_name, privilege)
        SELECT grant_key.key_name, grant_key.grantee, r.rolname, p
          FROM unnest(colcrypt._privileges(grant_key.privilege)) AS p,
               pg_roles AS r
         WHERE r.oid = grant_key.grantee
        ON CONFLICT ON CONSTRAINT key_grants_pkey
        DO UPDATE SET role_name = excluded.role_name, granted_at = excluded.granted_at
         WHERE g.role_name <> excluded.role_name;
    PERFORM colcrypt._reset_privilege_cache();
END
$$;

CREATE FUNCTION colcrypt.revoke_key(key_name text, grantee regrole, privilege text DEFAULT 'all')
    RETURNS void
    LANGUAGE plpgsql VOLATILE STRICT
    SET search_path = pg_catalog, pg_temp
    AS $$
BEGIN
    DELETE FROM colcrypt.key_grants AS g
     WHERE g.key_name = revoke_key.key_name AND g.role = revoke_key.grantee
       AND g.privilege = ANY (colcrypt._privileges(revoke_key.privilege));
    PERFORM colcrypt._reset_privilege_cache();
END
$$;
COMMENT ON FUNCTION colcrypt.grant_key(text, regrole, text) IS
    'lets a role (and its members) encrypt, decrypt or compute blind indexes with a key';
COMMENT ON FUNCTION colcrypt.revoke_key(text, regrole, text) IS
    'takes back what grant_key gave';

--------------------------------------------------------------------------------
-- JSON documents: encrypt / decrypt the values at dot-separated paths
-- ("customer.ssn"); arrays on the way are walked element by element; a path
-- that is missing is skipped. Each value becomes the JSON string
-- "colcrypt:..." of its JSON text, bound (AAD) to its path, and optionally to
-- a row binding (a primary key):
--   "colcrypt.json:" || path                                       no row binding
--   "colcrypt.json.row:" || length(path) || ':' || path || ':' || row_binding
-- A value already encrypted at a path is kept only when it is under the
-- given key and opens with this path's context (and row binding): anything
-- else is an error, so a client cannot plant a ciphertext copied from
-- another path, key or (with a row binding) row.

CREATE FUNCTION colcrypt._verify_sealed(value colcrypt.encrypted, key_name text, context text,
                                        path text)
    RETURNS void
    AS 'MODULE_PATHNAME', 'colcrypt_verify_sealed'
    LANGUAGE C STABLE STRICT PARALLEL SAFE;

CREATE FUNCTION colcrypt._json_walk(node jsonb, steps text[], encrypting boolean,
                                    key_name text, context text, path text)
    RETURNS jsonb
    LANGUAGE plpgsql VOLATILE PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    result jsonb;
    step text;
    s text;
BEGIN
    IF node IS NULL THEN
        RETURN NULL;
    END IF;
    IF cardinality(steps) = 0 THEN
        IF jsonb_typeof(node) = 'string' AND (node #>> '{}') ~* '^\s*colcrypt:' THEN
            s := node #>> '{}';
            IF encrypting THEN
                -- already encrypted: kept only when sealed for this key and path
                PERFORM colcrypt._verify_sealed(s::colcrypt.encrypted, key_name, context, path);
                RETURN node;
            END IF;
            RETURN colcrypt.decrypt_field(s::colcrypt.encrypted, context)::jsonb;
        END IF;
        IF NOT encrypting OR jsonb_typeof(node) = 'null' THEN
            RETURN node;
        END IF;
        RETURN to_jsonb(colcrypt.ciphertext(colcrypt.encrypt_field(node::text, key_name, context)));
    END IF;
    IF jsonb_typeof(node) = 'array' THEN
        SELECT coalesce(jsonb_agg(colcrypt._json_walk(e, steps, encrypting, key_name, context, path)
                                  ORDER BY i), '[]'::jsonb)
          INTO result
          FROM jsonb_array_elements(node) WITH ORDINALITY AS t(e, i);
        RETURN result;
    END IF;
    step := regexp_replace(steps[1], '\[\*\]$', '');
    IF jsonb_typeof(node) <> 'object' OR NOT node ? step THEN
        RETURN node;
    END IF;
    RETURN jsonb_set(node, ARRAY[step],
                     colcrypt._json_walk(node -> step, steps[2:], encrypting, key_name, context,
                                         path));
END
$$;

CREATE FUNCTION colcrypt._json_apply(doc jsonb, paths text[], encrypting boolean, key_name text,
                                     row_binding text)
    RETURNS jsonb
    LANGUAGE plpgsql VOLATILE PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    path text;
BEGIN
    FOREACH path IN ARRAY paths LOOP
        CONTINUE WHEN path IS NULL OR path = '';
        doc := colcrypt._json_walk(doc, string_to_array(path, '.'), encrypting, key_name,
                                   CASE WHEN row_binding IS NULL THEN 'colcrypt.json:' || path
                                        ELSE 'colcrypt.json.row:' || length(path) || ':' || path
                                             || ':' || row_binding END,
                                   path);
    END LOOP;
    RETURN doc;
END
$$;

CREATE FUNCTION colcrypt.encrypt_json(doc jsonb, key_name text, paths text[]) RETURNS jsonb
    LANGUAGE sql VOLATILE STRICT PARALLEL SAFE
    RETURN colcrypt._json_apply(doc, paths, true, key_name, NULL);

CREATE FUNCTION colcrypt.encrypt_json(doc jsonb, key_name text, paths text[], row_binding text)
    RETURNS jsonb
    LANGUAGE sql VOLATILE STRICT PARALLEL SAFE
    RETURN colcrypt._json_apply(doc, paths, true, key_name, row_binding);

CREATE FUNCTION colcrypt.decrypt_json(doc jsonb, paths text[]) RETURNS jsonb
    LANGUAGE sql STABLE STRICT PARALLEL SAFE
    RETURN colcrypt._json_apply(doc, paths, false, NULL, NULL);

CREATE FUNCTION colcrypt.decrypt_json(doc jsonb, paths text[], row_binding text) RETURNS jsonb
    LANGUAGE sql STABLE STRICT PARALLEL SAFE
    RETURN colcrypt._json_apply(doc, paths, false, NULL, row_binding);

COMMENT ON FUNCTION colcrypt.encrypt_json(jsonb, text, text[]) IS
    'encrypts the values at the listed paths of a JSON document';
COMMENT ON FUNCTION colcrypt.encrypt_json(jsonb, text, text[], text) IS
    'encrypts the values at the listed paths of a JSON document, bound to a row';
COMMENT ON FUNCTION colcrypt.decrypt_json(jsonb, text[]) IS
    'decrypts the values at the listed paths of a JSON document';
COMMENT ON FUNCTION colcrypt.decrypt_json(jsonb, text[], text) IS
    'decrypts the values at the listed paths of a JSON document bound to a row';

--------------------------------------------------------------------------------
-- Online migration of a plaintext column into a key-bound one, in batches of
-- their own transactions (no lock on the table for the whole rewrite):
--   ALTER TABLE t ADD COLUMN ssn_enc colcrypt.encrypted('k');
--   CALL colcrypt.encrypt_column('t', 'ssn', 'ssn_enc');   -- repeatable
--   then, in one short transaction: a last CALL, drop or rename the old
--   column, rename the new one (docs/columns.md).
-- Fills target from source where target IS NULL and source IS NOT NULL.

CREATE PROCEDURE colcrypt.encrypt_column(tab regclass, source_column name, target_column name,
                                         batch_size integer DEFAULT 10000)
    LANGUAGE plpgsql
    AS $$
DECLARE
    done bigint;
BEGIN
    IF batch_size IS NULL OR batch_size < 1 THEN
        RAISE EXCEPTION 'batch_size must be at least 1' USING ERRCODE = '22023';
    END IF;
    LOOP
        EXECUTE pg_catalog.format(
            'UPDATE %s SET %I = %I WHERE ctid OPERATOR(pg_catalog.=) ANY (ARRAY('
            'SELECT ctid FROM %s WHERE %I IS NULL AND %I IS NOT NULL LIMIT %s FOR UPDATE SKIP LOCKED))',
            tab, target_column, source_column, tab, target_column, source_column, batch_size);
        GET DIAGNOSTICS done = ROW_COUNT;
        COMMIT;
        EXIT WHEN done = 0;
    END LOOP;
END
$$;
COMMENT ON PROCEDURE colcrypt.encrypt_column(regclass, name, name, integer) IS
    'fills a key-bound column from a plaintext column in batches, committing after each';

--------------------------------------------------------------------------------
-- Access (see the top of this file).

REVOKE ALL ON SCHEMA colcrypt FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION
    colcrypt.encrypted_in(cstring, oid, integer),
    colcrypt.encrypted_out(colcrypt.encrypted),
    colcrypt.encrypted_recv(internal, oid, integer),
    colcrypt.encrypted_send(colcrypt.encrypted),
    colcrypt.encrypt_field(text, text),
    colcrypt.encrypt_field(text, text, text),
    colcrypt.encrypt_field(bytea, text),
    colcrypt.encrypt_field(bytea, text, text),
    colcrypt.decrypt_field(colcrypt.encrypted),
    colcrypt.decrypt_field(colcrypt.encrypted, text),
    colcrypt.decrypt_field_bytea(colcrypt.encrypted),
    colcrypt.decrypt_field_bytea(colcrypt.encrypted, text),
    colcrypt.key_id(colcrypt.encrypted),
    colcrypt.key_version(colcrypt.encrypted),
    colcrypt.key_name(colcrypt.encrypted),
    colcrypt.encrypted_typmod_in(cstring[]),
    colcrypt.encrypted_typmod_out(integer),
    colcrypt.encrypted(colcrypt.encrypted, integer, boolean),
    colcrypt.encrypted(text, integer, boolean),
    colcrypt.ciphertext(colcrypt.encrypted),
    colcrypt.blind_index(text, text),
    colcrypt.blind_index(text, text, text),
    colcrypt.encrypt_deterministic(text, text),
    colcrypt.encrypt_deterministic(text, text, text),
    colcrypt.decrypt_deterministic(bytea),
    colcrypt.decrypt_deterministic(bytea, text),
    colcrypt._reset_privilege_cache(),
    colcrypt._key_grants_changed(),
    colcrypt._privileges(text),
    colcrypt._ddl_start(),
    colcrypt._ddl_end(),
    colcrypt._table_rewrite(),
    colcrypt.grant_key(text, regrole, text),
    colcrypt.revoke_key(text, regrole, text),
    colcrypt._verify_sealed(colcrypt.encrypted, text, text, text),
    colcrypt._json_walk(jsonb, text[], boolean, text, text, text),
    colcrypt._json_apply(jsonb, text[], boolean, text, text),
    colcrypt.encrypt_json(jsonb, text, text[]),
    colcrypt.encrypt_json(jsonb, text, text[], text),
    colcrypt.decrypt_json(jsonb, text[]),
    colcrypt.decrypt_json(jsonb, text[], text)
    FROM PUBLIC;
REVOKE EXECUTE ON PROCEDURE colcrypt.encrypt_column(regclass, name, name, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION colcrypt.require_sealed(colcrypt.encrypted), colcrypt.sealed(anyelement)
    TO PUBLIC;

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'colcrypt_user') THEN
        CREATE ROLE colcrypt_user NOLOGIN;
    END IF;
END
$$;

GRANT USAGE ON SCHEMA colcrypt TO colcrypt_user;
GRANT EXECUTE ON FUNCTION
    colcrypt.encrypt_field(text, text),
    colcrypt.encrypt_field(text, text, text),
    colcrypt.encrypt_field(bytea, text),
    colcrypt.encrypt_field(bytea, text, text),
    colcrypt.decrypt_field(colcrypt.encrypted),
    colcrypt.decrypt_field(colcrypt.encrypted, text),
    colcrypt.decrypt_field_bytea(colcrypt.encrypted),
    colcrypt.decrypt_field_bytea(colcrypt.encrypted, text),
    colcrypt.key_id(colcrypt.encrypted),
    colcrypt.key_version(colcrypt.encrypted),
    colcrypt.key_name(colcrypt.encrypted),
    colcrypt.encrypted(colcrypt.encrypted, integer, boolean),
    colcrypt.encrypted(text, integer, boolean),
    colcrypt.ciphertext(colcrypt.encrypted),
    colcrypt.blind_index(text, text),
    colcrypt.blind_index(text, text, text),
    colcrypt.encrypt_deterministic(text, text),
    colcrypt.encrypt_deterministic(text, text, text),
    colcrypt.decrypt_deterministic(bytea),
    colcrypt.decrypt_deterministic(bytea, text),
    colcrypt._verify_sealed(colcrypt.encrypted, text, text, text),
    colcrypt._json_walk(jsonb, text[], boolean, text, text, text),
    colcrypt._json_apply(jsonb, text[], boolean, text, text),
    colcrypt.encrypt_json(jsonb, text, text[]),
    colcrypt.encrypt_json(jsonb, text, text[], text),
    colcrypt.decrypt_json(jsonb, text[]),
    colcrypt.decrypt_json(jsonb, text[], text)
    TO colcrypt_user;
GRANT EXECUTE ON PROCEDURE colcrypt.encrypt_column(regclass, name, name, integer) TO colcrypt_user;

-- ===========================================================================
-- Key lifecycle and rotation jobs (issue 3; docs/rotation.md). This section
-- belongs to the lifecycle work: keep it last, keep other objects above it.
-- ===========================================================================

-- colcrypt.rewrap(value [, context]): the value re-sealed under the primary
-- version of its own key, inside the backend (the plaintext never leaves it);
-- unchanged when it already is under the primary. Without a context: the
-- binding of the argument's key-bound column, else the empty context.
CREATE FUNCTION colcrypt.rewrap(colcrypt.encrypted)
    RETURNS colcrypt.encrypted
    AS 'MODULE_PATHNAME', 'colcrypt_rewrap'
    LANGUAGE C VOLATILE STRICT PARALLEL SAFE;
CREATE FUNCTION colcrypt.rewrap(colcrypt.encrypted, text)
    RETURNS colcrypt.encrypted
    AS 'MODULE_PATHNAME', 'colcrypt_rewrap'
    LANGUAGE C VOLATILE STRICT PARALLEL SAFE;

-- colcrypt.rotate_key(name): asks colcrypt-keyd for a new primary version
-- (keyd must run with --sql-rotate); returns it. No one but the owner may
-- call it until granted (GRANT EXECUTE ... TO a key-admin role).
CREATE FUNCTION colcrypt.rotate_key(text)
    RETURNS integer
    AS 'MODULE_PATHNAME', 'colcrypt_rotate_key'
    LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;

-- colcrypt.rewrap_array(values encrypted[] [, context]): each element
-- rewrapped as above (NULL elements stay NULL), the dimensions and bounds
-- kept. A name of its own: an overload would make rewrap(NULL) ambiguous.
CREATE FUNCTION colcrypt.rewrap_array(colcrypt.encrypted[])
    RETURNS colcrypt.encrypted[]
    AS 'MODULE_PATHNAME', 'colcrypt_rewrap_array'
    LANGUAGE C VOLATILE STRICT PARALLEL SAFE;
CREATE FUNCTION colcrypt.rewrap_array(colcrypt.encrypted[], text)
    RETURNS colcrypt.encrypted[]
    AS 'MODULE_PATHNAME', 'colcrypt_rewrap_array'
    LANGUAGE C VOLATILE STRICT PARALLEL SAFE;

-- colcrypt.try_ciphertext(text): the value whose text form ("colcrypt:...")
-- this is, or NULL when it is not one (never an error): how counts and jobs
-- read the strings encrypt_json leaves in JSON documents.
CREATE FUNCTION colcrypt.try_ciphertext(text)
    RETURNS colcrypt.encrypted
    AS 'MODULE_PATHNAME', 'colcrypt_try_ciphertext'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

-- Runs a command (a job's UPDATE) as the owner of a table, in a
-- security-restricted operation like REFRESH MATERIALIZED VIEW: the owner's
-- triggers and policies never run as the caller's role. Only members of the
-- owner's role (superusers) may call it.
CREATE FUNCTION colcrypt._as_table_owner(regclass, text)
    RETURNS bigint
    AS 'MODULE_PATHNAME', 'colcrypt_as_table_owner'
    LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;

-- The AAD context of the values of a key-bound column type (its typmod):
-- what rewrap uses when it knows the column.
CREATE FUNCTION colcrypt._column_context(integer)
    RETURNS text
    AS 'MODULE_PATHNAME', 'colcrypt_column_context'
    LANGUAGE C STABLE STRICT PARALLEL SAFE;

-- How colcrypt values live in a type: 'value' (colcrypt.encrypted or a
-- domain over it, at any depth), 'array' (an array of those), 'json' (json,
-- jsonb, domains and arrays of them: encrypt_json's "colcrypt:..." strings),
-- 'composite' (a composite type holding any of these, at any depth: neither
-- counted nor re-encrypted), or NULL (no colcrypt value can be in it).
CREATE FUNCTION colcrypt._value_shape(typ oid)
    RETURNS text
    LANGUAGE plpgsql STABLE STRICT
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    t record;
    inner_shape text;
BEGIN
    IF typ = 'colcrypt.encrypted'::regtype THEN
        RETURN 'value';
    ELSIF typ IN ('json'::regtype, 'jsonb'::regtype) THEN
        RETURN 'json';
    END IF;
    SELECT typtype, typbasetype, typelem, typrelid, typsubscript INTO t
      FROM pg_type WHERE oid = typ;
    IF NOT FOUND THEN
        RETURN NULL;
    ELSIF t.typtype = 'd' THEN
        RETURN colcrypt._value_shape(t.typbasetype);
    ELSIF t.typsubscript = 'array_subscript_handler'::regproc THEN
        inner_shape := colcrypt._value_shape(t.typelem);
        RETURN CASE inner_shape WHEN 'value' THEN 'array' ELSE inner_shape END;
    ELSIF t.typtype = 'c' AND EXISTS (
            SELECT FROM pg_attribute a
             WHERE a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped
               AND colcrypt._value_shape(a.atttypid) IS NOT NULL) THEN
        RETURN 'composite';
    END IF;
    RETURN NULL;
END
$$;

-- The typmod (key and binding) of the colcrypt.encrypted values in a column:
-- the column's own, else the innermost domain's.
CREATE FUNCTION colcrypt._value_typmod(typ oid, typmod integer)
    RETURNS integer
    LANGUAGE plpgsql STABLE STRICT
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    t record;
BEGIN
    WHILE typmod < 0 LOOP
        SELECT typtype, typbasetype, typtypmod, typelem, typsubscript INTO t
          FROM pg_type WHERE oid = typ;
        EXIT WHEN NOT FOUND;
        IF t.typtype = 'd' THEN
            typ := t.typbasetype;
            typmod := t.typtypmod;
        ELSIF t.typsubscript = 'array_subscript_handler'::regproc THEN
            typ := t.typelem;
        ELSE
            EXIT;
        END IF;
    END LOOP;
    RETURN typmod;
END
$$;

-- Every column where values of colcrypt keys can live, one row per column of
-- each table, partition, inheritance child, materialized view and foreign
-- table (not views or partitioned parents: they store nothing; not temporary
-- tables: other sessions' cannot be read). shape is _value_shape's, or
-- 'foreign' for a foreign table (its rows live elsewhere); typmod and context
-- are the key-bound type's for 'value' and 'array'.
CREATE FUNCTION colcrypt.value_columns()
    RETURNS TABLE (relid oid, attnum smallint, schema_name name, table_name name,
                   column_name name, relkind "char", shape text, typmod integer,
                   context text)
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, pg_temp
    BEGIN ATOMIC
        SELECT s.relid, s.attnum, s.schema_name, s.table_name, s.column_name, s.relkind,
               CASE WHEN s.relkind = 'f' THEN 'foreign' ELSE s.shape END,
               s.typmod,
               CASE WHEN s.shape IN ('value', 'array')
                    THEN coalesce(colcrypt._column_context(s.typmod), '') END
          FROM (SELECT c.oid AS relid, a.attnum, n.nspname AS schema_name,
                       c.relname AS table_name, a.attname AS column_name, c.relkind,
                       colcrypt._value_shape(a.atttypid) AS shape,
                       colcrypt._value_typmod(a.atttypid, a.atttypmod) AS typmod
                  FROM pg_attribute a
                  JOIN pg_class c ON c.oid = a.attrelid
                  JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE a.attnum > 0 AND NOT a.attisdropped
                   AND c.relkind IN ('r', 'm', 'f') AND c.relpersistence <> 't'
                   AND n.nspname NOT IN ('colcrypt', 'pg_catalog', 'information_schema')) s
         WHERE s.shape IS NOT NULL
         ORDER BY 3, 4, 5;
    END;

-- The jsonpath of the strings in a document that claim to be colcrypt values
-- (as encrypt_json leaves them: "colcrypt:..." at any depth).
CREATE FUNCTION colcrypt._json_value_path()
    RETURNS jsonpath
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN 'strict $.** ? (@.type() == "string" && @ like_regex "^\\s*colcrypt:" flag "i")'::jsonpath;

-- How many values of a key each column holds, per version. Materialized
-- views are counted (a job cannot re-encrypt them: REFRESH them). A column
-- whose values cannot be counted (a composite type holding colcrypt values, a
-- foreign table) is an error naming it: keyd then refuses to disable or
-- destroy unless --force. Inheritance children and partitions are each
-- counted once (ONLY). Row-level security never filters the count: a table
-- whose policies would apply to the caller is an error (42501).
CREATE FUNCTION colcrypt.key_references(key_id uuid)
    RETURNS TABLE (column_name text, shape text, version integer, values_count bigint)
    LANGUAGE plpgsql STABLE STRICT
    SET search_path = pg_catalog, pg_temp
    SET row_security = off
    AS $$
DECLARE
    c record;
    source text;
BEGIN
    FOR c IN SELECT * FROM colcrypt.value_columns() LOOP
        column_name := format('%s.%s.%s', c.schema_name, c.table_name, c.column_name);
        shape := c.shape;
        IF c.shape IN ('composite', 'foreign') THEN
            RAISE EXCEPTION 'cannot count the colcrypt values of %', column_name
                USING ERRCODE = '0A000',
                      DETAIL = CASE c.shape
                          WHEN 'composite' THEN 'Its type is a composite type that holds colcrypt values.'
                          ELSE 'It is a column of a foreign table.' END,
                      HINT = 'Count them by hand, then pass --force to disable or destroy.';
        END IF;
        CONTINUE WHEN c.relkind = 'm'
            AND NOT (SELECT relispopulated FROM pg_class WHERE oid = c.relid);
        source := CASE c.shape
            WHEN 'value' THEN format('SELECT t.%I AS colcrypt_value FROM ONLY %I.%I AS t',
                                     c.column_name, c.schema_name, c.table_name)
            WHEN 'array' THEN format('SELECT u.u AS colcrypt_value FROM ONLY %I.%I AS t,'
                                     ' unnest(t.%I::colcrypt.encrypted[]) AS u',
                                     c.schema_name, c.table_name, c.column_name)
            ELSE format('SELECT colcrypt.try_ciphertext(s.s #>> ''{}'') AS colcrypt_value'
                        ' FROM ONLY %I.%I AS t, jsonb_path_query(to_jsonb(t.%I), %L) AS s',
                        c.schema_name, c.table_name, c.column_name,
                        colcrypt._json_value_path()) END;
        RETURN QUERY EXECUTE format(
            'SELECT %L::text, %L::text, colcrypt.key_version(v.colcrypt_value), count(*)'
            ' FROM (%s) v WHERE colcrypt.key_id(v.colcrypt_value) = $1 GROUP BY 3 ORDER BY 3',
            column_name, c.shape, source) USING key_id;
    END LOOP;
END
$$;

-- Re-encryption jobs: colcrypt-keyd (run with --database for this database)
-- picks up pending jobs and runs them in batches of heap blocks, each batch
-- its own transaction together with its progress row, so a job resumes where
-- it stopped after kill -9 of keyd or a restart of Postgres.
CREATE TABLE colcrypt.rotation_jobs (
    job_id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key_name        text NOT NULL,
    key_id          uuid,          -- filled by keyd when it starts the job
    target_version  integer,       -- the primary version when the job started
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'running', 'done', 'failed', 'cancelled')),
    batch_blocks    integer NOT NULL DEFAULT 64 CHECK (batch_blocks BETWEEN 1 AND 65536),
    throttle_ms     integer NOT NULL DEFAULT 0 CHECK (throttle_ms BETWEEN 0 AND 600000),
    requested_by    text NOT NULL DEFAULT current_user,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    updated_at      timestamptz,
    finished_at     timestamptz,
    rows_total      bigint NOT NULL DEFAULT 0,
    rows_done       bigint NOT NULL DEFAULT 0,
    passes          integer NOT NULL DEFAULT 0,
    errors          integer NOT NULL DEFAULT 0,
    last_error      text
);

-- One row per column of the job, by the table's OID and the column's attnum
-- (a rename during the job changes only the names shown; a dropped table or
-- column is done). kind is value_columns' shape, or 'matview'; a job
-- re-encrypts 'value' and 'array' columns and reports the others (note).
-- rows_skipped: rows of the current (or last) pass that could not be
-- re-encrypted and still use an older version.
CREATE TABLE colcrypt.rotation_job_columns (
    job_id          bigint NOT NULL REFERENCES colcrypt.rotation_jobs ON DELETE CASCADE,
    relid           oid NOT NULL,
    attnum          smallint NOT NULL,
    schema_name     name NOT NULL,
    table_name      name NOT NULL,
    column_name     name NOT NULL,
    kind            text NOT NULL DEFAULT 'value'
                    CHECK (kind IN ('value', 'array', 'json', 'matview', 'composite', 'foreign')),
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'running', 'done')),
    next_block      bigint NOT NULL DEFAULT 0,   -- where the current pass resumes
    pass            integer NOT NULL DEFAULT 1,
    rows_total      bigint NOT NULL DEFAULT 0,
    rows_done       bigint NOT NULL DEFAULT 0,
    pass_done       bigint NOT NULL DEFAULT 0,   -- rows re-encrypted in the current pass
    rows_skipped    bigint NOT NULL DEFAULT 0,
    note            text,                        -- the first cause of a skip, or why not re-encrypted
    PRIMARY KEY (job_id, relid, attnum)
);

CREATE FUNCTION colcrypt.start_rotation_job(key_name text, batch_blocks integer DEFAULT 64,
                                            throttle_ms integer DEFAULT 0)
    RETURNS bigint
    LANGUAGE sql VOLATILE STRICT
    SET search_path = pg_catalog, pg_temp
    BEGIN ATOMIC
        INSERT INTO colcrypt.rotation_jobs (key_name, batch_blocks, throttle_ms)
        VALUES (key_name, batch_blocks, throttle_ms)
        RETURNING job_id;
    END;

CREATE FUNCTION colcrypt.cancel_rotation_job(job bigint)
    RETURNS boolean
    LANGUAGE sql VOLATILE STRICT
    SET search_path = pg_catalog, pg_temp
    BEGIN ATOMIC
        UPDATE colcrypt.rotation_jobs SET state = 'cancelled', finished_at = now()
         WHERE job_id = job AND state IN ('pending', 'running')
        RETURNING true;
    END;

-- last_error can carry what a table owner's trigger or constraint said about
-- a row (its message's first line): it is shown only to roles that may read
-- colcrypt.rotation_jobs.last_error themselves, the key administrators
-- (superusers, and roles granted SELECT on colcrypt.rotation_jobs), and is
-- NULL for everyone else (colcrypt_user).
CREATE VIEW colcrypt.rotation_progress AS
SELECT j.job_id, j.key_name, j.target_version, j.state,
       j.rows_done, j.rows_total,
       CASE WHEN j.state = 'done' THEN 100.0
            WHEN j.rows_total > 0 THEN round(least(100.0, 100.0 * j.rows_done / j.rows_total), 1)
            ELSE 0.0 END AS percent,
       CASE WHEN j.started_at IS NOT NULL AND coalesce(j.finished_at, j.updated_at) > j.started_at
            THEN round((j.rows_done / extract(epoch FROM coalesce(j.finished_at, j.updated_at)
                                                        - j.started_at))::numeric, 1)
       END AS rows_per_second,
       j.passes, j.errors,
       CASE WHEN pg_catalog.has_column_privilege('colcrypt.rotation_jobs'::pg_catalog.regclass,
                                                 'last_error', 'SELECT')
            THEN j.last_error END AS last_error,
       j.created_at, j.started_at, j.updated_at, j.finished_at, j.requested_by,
       coalesce((SELECT sum(c.rows_skipped) FROM colcrypt.rotation_job_columns c
                  WHERE c.job_id = j.job_id), 0)::bigint AS rows_skipped
  FROM colcrypt.rotation_jobs j;

REVOKE ALL ON colcrypt.rotation_jobs, colcrypt.rotation_job_columns, colcrypt.rotation_progress
    FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION
    colcrypt.rewrap(colcrypt.encrypted),
    colcrypt.rewrap(colcrypt.encrypted, text),
    colcrypt.rewrap_array(colcrypt.encrypted[]),
    colcrypt.rewrap_array(colcrypt.encrypted[], text),
    colcrypt.try_ciphertext(text),
    colcrypt._column_context(integer),
    colcrypt._as_table_owner(regclass, text),
    colcrypt._value_shape(oid),
    colcrypt._value_typmod(oid, integer),
    colcrypt.value_columns(),
    colcrypt._json_value_path(),
    colcrypt.key_references(uuid),
    colcrypt.rotate_key(text),
    colcrypt.start_rotation_job(text, integer, integer),
    colcrypt.cancel_rotation_job(bigint)
    FROM PUBLIC;
-- rewrap checks the decrypt and encrypt privileges on the value's key itself.
GRANT EXECUTE ON FUNCTION
    colcrypt.rewrap(colcrypt.encrypted),
    colcrypt.rewrap(colcrypt.encrypted, text),
    colcrypt.rewrap_array(colcrypt.encrypted[]),
    colcrypt.rewrap_array(colcrypt.encrypted[], text),
    colcrypt.try_ciphertext(text)
    TO colcrypt_user;
GRANT SELECT ON colcrypt.rotation_progress TO colcrypt_user;

-- Derived keys: colcrypt.encrypt_derived(value, key_name, context) seals under
-- a key derived with HKDF from the key's primary version for this context
-- alone (a tenant, an application). colcrypt.decrypt_field(value, context)
-- opens it; rotation of the named key rotates every derived key.
CREATE FUNCTION colcrypt.encrypt_derived(text, text, text)
    RETURNS colcrypt.encrypted
    AS 'MODULE_PATHNAME', 'colcrypt_encrypt_derived_text'
    LANGUAGE C VOLATILE STRICT PARALLEL SAFE;
CREATE FUNCTION colcrypt.encrypt_derived(bytea, text, text)
    RETURNS colcrypt.encrypted
    AS 'MODULE_PATHNAME', 'colcrypt_encrypt_derived_bytea'
    LANGUAGE C VOLATILE STRICT PARALLEL SAFE;
REVOKE EXECUTE ON FUNCTION
    colcrypt.encrypt_derived(text, text, text),
    colcrypt.encrypt_derived(bytea, text, text)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    colcrypt.encrypt_derived(text, text, text),
    colcrypt.encrypt_derived(bytea, text, text)
    TO colcrypt_user;
