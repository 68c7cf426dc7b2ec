-- Installation: the extension lives in the fixed schema colcrypt, and every
-- function has the volatility, strictness and parallel safety it promises.
CREATE EXTENSION colcrypt;

SELECT extname, extversion, extnamespace::regnamespace AS schema, extrelocatable
  FROM pg_extension WHERE extname = 'colcrypt';

-- a second schema is refused: the schema is fixed
CREATE SCHEMA regress_elsewhere;
ALTER EXTENSION colcrypt SET SCHEMA regress_elsewhere;
DROP SCHEMA regress_elsewhere;

-- encrypt: VOLATILE (fresh nonce per call); decrypt and key_name: STABLE
-- (keyd's keys); header inspectors and type I/O: IMMUTABLE. All STRICT and
-- PARALLEL SAFE.
SELECT p.oid::regprocedure AS function, p.provolatile AS volatility,
       p.proisstrict AS strict, p.proparallel AS parallel, p.prorettype::regtype AS returns
  FROM pg_proc p
 WHERE p.pronamespace = 'colcrypt'::regnamespace
 ORDER BY p.oid::regprocedure::text;

SELECT t.typname, t.typlen, t.typstorage, t.typalign,
       t.typinput::regproc, t.typoutput::regproc, t.typreceive::regproc, t.typsend::regproc
  FROM pg_type t
 WHERE t.typnamespace = 'colcrypt'::regnamespace AND t.typtype = 'b'
   AND t.typname IN ('encrypted', '_encrypted');

-- settings and their defaults (the test setup points colcrypt.keyd_socket at its keyd)
SELECT name, unit, context, vartype, boot_val, min_val, max_val
  FROM pg_settings WHERE name LIKE 'colcrypt.%' ORDER BY name;

-- the prefix is reserved: a typo is an error, not a silent placeholder
SET colcrypt.keyd_sockt = '/tmp/x';
SET colcrypt.keyd_socket = '';
SET colcrypt.key_cache_ttl = -1;
SET colcrypt.keyd_timeout = 0;
