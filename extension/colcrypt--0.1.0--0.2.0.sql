-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION colcrypt UPDATE" to load this file. \quit

-- colcrypt 0.1.0 -> 0.2.0. Every change to extension/colcrypt.sql since 0.1.0
-- is repeated here, so that an updated database equals a fresh 0.2.0 install
-- (tests/integration/test_upgrade.cpp compares the two); docs/upgrading.md.

-- rotation_progress.last_error can carry what a table owner's trigger or
-- constraint said about a row: shown only to roles that may read
-- colcrypt.rotation_jobs.last_error themselves (superusers, key
-- administrators granted SELECT on colcrypt.rotation_jobs), NULL for everyone
-- else. Same columns in the same order, so CREATE OR REPLACE keeps the view's
-- grants (SELECT to colcrypt_user).
CREATE OR REPLACE VIEW colcrypt.rotation_progress AS
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
