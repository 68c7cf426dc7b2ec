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

CREATE TYPE colcrypt.encrypted (
    INPUT = colcrypt.encrypted_in,
    OUTPUT = colcrypt.encrypted_out,
    RECEIVE = colcrypt.encrypted_recv,
    SEND = colcrypt.encrypted_send,
    INTERNALLENGTH = VARIABLE,
    ALIGNMENT = int4,
    STORAGE = extended
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
    colcrypt.key_name(colcrypt.encrypted)
    FROM PUBLIC;

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
    colcrypt.key_name(colcrypt.encrypted)
    TO colcrypt_user;
