-- rotation_progress.last_error (0.2.0) can carry what a table owner's trigger
-- or constraint said about a row: only roles that may read
-- colcrypt.rotation_jobs.last_error (superusers, key administrators) see it;
-- colcrypt_user sees NULL there and every other column as before.
\set VERBOSITY terse
SELECT colcrypt.start_rotation_job('regress_key') AS job \gset
UPDATE colcrypt.rotation_jobs
   SET state = 'done', errors = 1, rows_total = 10, rows_done = 9,
       last_error = 'P0001: row of customer Alice Example refused by trigger audit_guard'
 WHERE job_id = :job;

CREATE ROLE regress_progress_app IN ROLE colcrypt_user;
-- A key administrator: may read the jobs table (and so its last_error).
CREATE ROLE regress_progress_admin IN ROLE colcrypt_user;
GRANT SELECT ON colcrypt.rotation_jobs TO regress_progress_admin;
-- Column privileges count column by column: job_id alone shows no last_error.
CREATE ROLE regress_progress_ids IN ROLE colcrypt_user;
GRANT SELECT (job_id, state) ON colcrypt.rotation_jobs TO regress_progress_ids;

-- superuser
SELECT state, errors, rows_done, rows_total, percent, last_error
  FROM colcrypt.rotation_progress WHERE job_id = :job;

SET ROLE regress_progress_app;
SELECT state, errors, rows_done, rows_total, percent, last_error IS NULL AS last_error_hidden
  FROM colcrypt.rotation_progress WHERE job_id = :job;
SELECT count(*) FROM colcrypt.rotation_progress WHERE last_error IS NOT NULL;
-- the tables behind the view stay closed
SELECT last_error FROM colcrypt.rotation_jobs WHERE job_id = :job;
SELECT note FROM colcrypt.rotation_job_columns;
RESET ROLE;

SET ROLE regress_progress_ids;
SELECT state, last_error IS NULL AS last_error_hidden
  FROM colcrypt.rotation_progress WHERE job_id = :job;
RESET ROLE;

SET ROLE regress_progress_admin;
SELECT state, errors, last_error FROM colcrypt.rotation_progress WHERE job_id = :job;
RESET ROLE;

-- A member of the administrator role inherits what it may see.
CREATE ROLE regress_progress_member IN ROLE regress_progress_admin;
SET ROLE regress_progress_member;
SELECT last_error IS NOT NULL AS last_error_shown FROM colcrypt.rotation_progress WHERE job_id = :job;
RESET ROLE;

-- The view keeps its columns, names and types in order.
SELECT attnum, attname, atttypid::regtype
  FROM pg_attribute WHERE attrelid = 'colcrypt.rotation_progress'::regclass AND attnum > 0
 ORDER BY attnum;

REVOKE SELECT ON colcrypt.rotation_jobs FROM regress_progress_admin;
REVOKE SELECT (job_id, state) ON colcrypt.rotation_jobs FROM regress_progress_ids;
DROP ROLE regress_progress_member, regress_progress_admin, regress_progress_ids,
          regress_progress_app;
DELETE FROM colcrypt.rotation_jobs WHERE job_id = :job;
