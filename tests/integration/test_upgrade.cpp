// Upgrades of the extension's SQL (docs/upgrading.md). A database created at
// 0.1.0 runs that version's SQL against the current library until someone
// runs ALTER EXTENSION colcrypt UPDATE: values of every kind, grants, sealed
// checks, DDL triggers and jobs must work there, keep working after the
// update, and the updated schema must equal a fresh install's, compared with
// pg_dump --schema-only and with the catalog of the extension's members
// (pg_dump leaves those out).
#include <algorithm>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "harness.hpp"

using namespace colcrypt::test;

namespace {

const std::string kFirstRelease = "0.1.0";

// keyd runs the jobs of the sandbox's "postgres" database.
Env jobs_env() {
  return {{"SANDBOX_KEYD_ARGS", "--database @DATABASE@ --job-poll-interval-ms 200"}};
}

std::string pg_bin() {
  const char* dir = std::getenv("PG_BIN");
  return dir != nullptr ? dir : "/usr/lib/postgresql/15/bin";
}

std::string db_conninfo(const Sandbox& sandbox, const std::string& db) {
  return "host=" + sandbox.dir() + "/pgsock port=" + std::to_string(sandbox.port()) +
         " user=postgres dbname=" + db + " options='-c client_min_messages=warning'";
}

// Runs sql, which must fail with sqlstate; returns the message.
std::string refused(PgConn& conn, const std::string& sql, const std::string& sqlstate) {
  PgConn::Outcome outcome = conn.exec(sql);
  INFO(sql << " -> " << outcome.sqlstate << " " << outcome.message);
  CHECK(outcome.sqlstate == sqlstate);
  return outcome.message;
}

// The released versions: the committed install scripts colcrypt--X.sql but
// the current version's (the build's copy of colcrypt.sql).
std::vector<std::string> released_versions(const std::string& current) {
  std::vector<std::string> versions;
  const std::regex install_script("colcrypt--([0-9][0-9A-Za-z.]*)\\.sql");
  for (const auto& entry :
       std::filesystem::directory_iterator(std::string(COLCRYPT_SOURCE_DIR) + "/extension")) {
    std::smatch m;
    const std::string name = entry.path().filename().string();
    if (std::regex_match(name, m, install_script) && m[1] != current) versions.push_back(m[1]);
  }
  std::sort(versions.begin(), versions.end());
  return versions;
}

// The user's side of a database: keys, roles, tables and domains with every
// kind of colcrypt column, the DDL the event triggers act on (CREATE TABLE,
// CREATE TABLE AS, ALTER TABLE ADD COLUMN), a trigger that smuggles a plaintext past the
// planner. The same in the updated and the fresh database.
void create_user_schema(PgConn& conn) {
  conn.value(
      "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'upgrade_reader') THEN"
      " CREATE ROLE upgrade_reader IN ROLE colcrypt_user; END IF; END $$");
  conn.value("CREATE DOMAIN card_number AS colcrypt.encrypted('up_key', 'card_number')");
  conn.value(
      "CREATE TABLE people ("
      " id int PRIMARY KEY,"
      " ssn colcrypt.encrypted('up_key', 'people.ssn'),"            // key-bound
      " card card_number,"                                          // key-bound through a domain
      " aliases colcrypt.encrypted('up_key', 'people.aliases')[],"  // key-bound array
      " loose colcrypt.encrypted,"                                  // encrypt_field, no key binding
      " raw colcrypt.encrypted,"                                    // encrypt_field of bytea
      " tenant_note colcrypt.encrypted,"  // sealed with a context of its own
      " derived colcrypt.encrypted,"      // encrypt_derived
      " email_det bytea UNIQUE,"          // encrypt_deterministic
      " email_bidx bytea,"                // blind_index
      " doc jsonb)");                     // encrypt_json
  conn.value("CREATE INDEX people_email_bidx ON people (email_bidx)");
  conn.value("CREATE TABLE people_copy AS SELECT id, loose FROM people");  // CREATE TABLE AS
  conn.value("GRANT SELECT ON people TO upgrade_reader");
  // The online migration: ADD COLUMN gets its sealed check NOT VALID.
  conn.value("CREATE TABLE legacy (id int PRIMARY KEY, ssn text)");
  conn.value("ALTER TABLE legacy ADD COLUMN ssn_enc colcrypt.encrypted('up_key', 'legacy.ssn')");
  conn.value("CREATE TABLE guarded (id int, v colcrypt.encrypted)");
  conn.value(
      "CREATE FUNCTION smuggle() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
      " IF NEW.id < 0 THEN NEW.v := 'smuggled plaintext'::colcrypt.encrypted; END IF;"
      " RETURN NEW; END $$");
  conn.value(
      "CREATE TRIGGER smuggle BEFORE INSERT ON guarded FOR EACH ROW EXECUTE FUNCTION smuggle()");
}

void fill_people(PgConn& conn, int from, int to) {
  conn.value(
      "INSERT INTO people (id, ssn, card, aliases, loose, raw, tenant_note, derived, email_det,"
      "                    email_bidx, doc)"
      " SELECT g, 'ssn-' || g, 'card-' || g, ARRAY['a-' || g, 'b-' || g],"
      "  colcrypt.encrypt_field('loose-' || g, 'up_other'),"
      "  colcrypt.encrypt_field(convert_to('raw-' || g, 'UTF8'), 'up_other'),"
      "  colcrypt.encrypt_field('tenant-' || g, 'up_key', 'tenant:' || g),"
      "  colcrypt.encrypt_derived('derived-' || g, 'up_other', 'app:' || g),"
      "  colcrypt.encrypt_deterministic('user' || g || '@example.com', 'up_other'),"
      "  colcrypt.blind_index('user' || g || '@example.com', 'up_other'),"
      "  colcrypt.encrypt_json(jsonb_build_object('name', 'n' || g, 'secret',"
      "                        jsonb_build_object('pin', g)), 'up_other', ARRAY['secret.pin'])"
      " FROM generate_series(" +
      std::to_string(from) + ", " + std::to_string(to) + ") g");
}

// How many rows of people decrypt to their plaintexts in every column, and
// are found by their deterministic value and their blind index.
std::string rows_that_decrypt(PgConn& conn) {
  return conn.value(
      "SELECT count(*) FROM people WHERE"
      " ssn::text = 'ssn-' || id"
      " AND colcrypt.decrypt_field(card, 'colcrypt.column:card_number') = 'card-' || id"
      " AND colcrypt.decrypt_field(aliases[1]) = 'a-' || id"
      " AND colcrypt.decrypt_field(aliases[2]) = 'b-' || id"
      " AND colcrypt.decrypt_field(loose) = 'loose-' || id"
      " AND colcrypt.decrypt_field_bytea(raw) = convert_to('raw-' || id, 'UTF8')"
      " AND colcrypt.decrypt_field(tenant_note, 'tenant:' || id) = 'tenant-' || id"
      " AND colcrypt.decrypt_field(derived, 'app:' || id) = 'derived-' || id"
      " AND colcrypt.decrypt_deterministic(email_det) = 'user' || id || '@example.com'"
      " AND email_det = colcrypt.encrypt_deterministic('user' || id || '@example.com', 'up_other')"
      " AND email_bidx = colcrypt.blind_index('user' || id || '@example.com', 'up_other')"
      " AND colcrypt.decrypt_json(doc, ARRAY['secret.pin']) ="
      "     jsonb_build_object('name', 'n' || id, 'secret', jsonb_build_object('pin', id))"
      " AND doc -> 'secret' ->> 'pin' LIKE 'colcrypt:%'");
}

// Everything the update must leave as it is, as text: the stored values (as
// ciphertext), the extension's configuration and job tables.
std::string stored_state(PgConn& conn) {
  std::string state;
  for (const char* table :
       {"public.people", "public.legacy", "colcrypt.key_grants", "colcrypt.column_keys",
        "colcrypt.rotation_jobs", "colcrypt.rotation_job_columns"}) {
    state += std::string(table) + ":\n" +
             conn.value(std::string("SELECT string_agg(t::text, E'\\n' ORDER BY t::text) FROM ") +
                        table + " t") +
             "\n";
  }
  return state;
}

// Plaintext written by a BEFORE trigger reaches no planner hook: the sealed
// CHECK constraint must refuse it. A plaintext in an INSERT is refused too.
void check_sealed_writes(PgConn& conn) {
  CHECK(refused(conn, "INSERT INTO guarded VALUES (-1, NULL)", "22P02")
            .find("plaintext that was not encrypted") != std::string::npos);
  refused(conn, "INSERT INTO people (id, loose) VALUES (100000, 'plaintext')", "22P02");
  CHECK(conn.value("SELECT count(*) FROM guarded") == "0");
  CHECK(conn.value("SELECT count(*) FROM people WHERE id = 100000") == "0");
}

// The sealed checks the event triggers added to the user's tables.
std::string sealed_constraints(PgConn& conn) {
  return conn.value(
      "SELECT string_agg(conrelid::regclass || '.' || conname || ' ' || pg_get_constraintdef(oid),"
      "                  E'\\n' ORDER BY 1)"
      "  FROM pg_constraint WHERE conname LIKE 'colcrypt_sealed_%'");
}

void wait_for_jobs(PgConn& conn, double timeout_s) {
  const auto start = std::chrono::steady_clock::now();
  while (conn.value("SELECT count(*) FROM colcrypt.rotation_jobs"
                    " WHERE state IN ('pending', 'running')") != "0") {
    if (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() >
        timeout_s) {
      FAIL("jobs still active after " << timeout_s << " s: "
                                      << conn.value("SELECT string_agg(j::text, E'\\n')"
                                                    " FROM colcrypt.rotation_jobs j"));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
}

// The extension's members and what Postgres keeps about each, one entry per
// object: identities, function definitions, view definitions, columns,
// constraints, indexes, triggers, types, casts, operators, event triggers,
// comments, ACLs and the initial privileges pg_dump compares them with. No
// OIDs: only names and definitions.
const char* const kExtensionCatalog = R"SQL(
WITH ext AS (SELECT * FROM pg_extension WHERE extname = 'colcrypt'),
m AS (SELECT d.classid, d.objid, d.objsubid FROM pg_depend d JOIN ext ON d.refobjid = ext.oid
       WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'),
rels AS (SELECT c.* FROM pg_class c JOIN m ON m.classid = 'pg_class'::regclass AND c.oid = m.objid),
types AS (SELECT t.* FROM pg_type t JOIN m ON m.classid = 'pg_type'::regclass AND t.oid = m.objid)
SELECT 'extension version=' || extversion || ' relocatable=' || extrelocatable
       || ' schema=' || extnamespace::regnamespace || ' owner=' || extowner::regrole
       || ' config=' || coalesce((SELECT string_agg(c::regclass || ' ' || coalesce(w, ''), ', ' ORDER BY 1)
                                    FROM unnest(extconfig, extcondition) AS u(c, w)), '')
  FROM ext
UNION ALL
SELECT 'member ' || pg_describe_object(classid, objid, objsubid) FROM m
UNION ALL
SELECT 'in schema colcrypt: ' || pg_describe_object(o.classid, o.objid, 0)
  FROM (SELECT 'pg_class'::regclass AS classid, oid AS objid FROM pg_class
         WHERE relnamespace = 'colcrypt'::regnamespace
        UNION ALL SELECT 'pg_type'::regclass, oid FROM pg_type WHERE typnamespace = 'colcrypt'::regnamespace
        UNION ALL SELECT 'pg_proc'::regclass, oid FROM pg_proc WHERE pronamespace = 'colcrypt'::regnamespace
        UNION ALL SELECT 'pg_operator'::regclass, oid FROM pg_operator
                   WHERE oprnamespace = 'colcrypt'::regnamespace) o
UNION ALL
SELECT 'schema ' || nspname || ' owner=' || nspowner::regrole || ' acl=' || coalesce(nspacl::text, '-')
  FROM pg_namespace WHERE nspname = 'colcrypt'
UNION ALL
SELECT 'function ' || p.oid::regprocedure || ' owner=' || p.proowner::regrole
       || ' acl=' || coalesce(p.proacl::text, '-') || ' kind=' || p.prokind::text || E'\n'
       || CASE WHEN p.prokind::text IN ('f', 'p') THEN pg_get_functiondef(p.oid) ELSE '' END
  FROM pg_proc p JOIN m ON m.classid = 'pg_proc'::regclass AND p.oid = m.objid
UNION ALL
SELECT 'relation ' || c.oid::regclass || ' kind=' || c.relkind::text || ' persistence=' || c.relpersistence::text
       || ' owner=' || c.relowner::regrole || ' acl=' || coalesce(c.relacl::text, '-')
       || ' options=' || coalesce(c.reloptions::text, '-')
       || ' rls=' || c.relrowsecurity || '/' || c.relforcerowsecurity || ' replident=' || c.relreplident::text
       || CASE WHEN c.relkind::text IN ('v', 'm') THEN E'\n' || pg_get_viewdef(c.oid) ELSE '' END
  FROM rels c
UNION ALL
SELECT 'column ' || a.attrelid::regclass || ' position ' || a.pos || ': ' || quote_ident(a.attname)
       || ' ' || format_type(a.atttypid, a.atttypmod) || ' notnull=' || a.attnotnull
       || ' default=' || coalesce(pg_get_expr(ad.adbin, ad.adrelid), '-')
       || ' identity=' || a.attidentity::text || ' generated=' || a.attgenerated::text
       || ' collation=' || a.attcollation::regcollation || ' storage=' || a.attstorage::text
       || ' acl=' || coalesce(a.attacl::text, '-')
  FROM (SELECT a.*, row_number() OVER (PARTITION BY a.attrelid ORDER BY a.attnum) AS pos
          FROM pg_attribute a JOIN rels c ON a.attrelid = c.oid
         WHERE a.attnum > 0 AND NOT a.attisdropped) a
  LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
UNION ALL
SELECT 'constraint ' || CASE WHEN co.conrelid <> 0 THEN co.conrelid::regclass::text
                             ELSE co.contypid::regtype::text END
       || ' ' || quote_ident(co.conname) || ': ' || pg_get_constraintdef(co.oid)
  FROM pg_constraint co
 WHERE co.conrelid IN (SELECT oid FROM rels) OR co.contypid IN (SELECT oid FROM types)
UNION ALL
SELECT 'index ' || pg_get_indexdef(i.indexrelid)
  FROM pg_index i WHERE i.indrelid IN (SELECT oid FROM rels)
UNION ALL
SELECT 'trigger ' || pg_get_triggerdef(t.oid) || ' enabled=' || t.tgenabled::text
  FROM pg_trigger t WHERE t.tgrelid IN (SELECT oid FROM rels) AND NOT t.tgisinternal
UNION ALL
SELECT 'rule ' || pg_get_ruledef(r.oid)
  FROM pg_rewrite r WHERE r.ev_class IN (SELECT oid FROM rels) AND r.rulename <> '_RETURN'
UNION ALL
SELECT 'policy ' || pol.polrelid::regclass || ' ' || pol.polname || ' cmd=' || pol.polcmd::text
       || ' permissive=' || pol.polpermissive || ' roles=' || pol.polroles::regrole[]::text
       || ' using=' || coalesce(pg_get_expr(pol.polqual, pol.polrelid), '-')
       || ' check=' || coalesce(pg_get_expr(pol.polwithcheck, pol.polrelid), '-')
  FROM pg_policy pol WHERE pol.polrelid IN (SELECT oid FROM rels)
UNION ALL
SELECT 'sequence ' || s.seqrelid::regclass || ' type=' || s.seqtypid::regtype || ' start=' || s.seqstart
       || ' increment=' || s.seqincrement || ' range=' || s.seqmin || '..' || s.seqmax
       || ' cache=' || s.seqcache || ' cycle=' || s.seqcycle
       || ' acl=' || coalesce(c.relacl::text, '-')
  FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid
 WHERE c.relnamespace = 'colcrypt'::regnamespace
UNION ALL
SELECT 'type ' || t.oid::regtype || ' typtype=' || t.typtype::text || ' len=' || t.typlen
       || ' byval=' || t.typbyval || ' align=' || t.typalign::text || ' storage=' || t.typstorage::text
       || ' category=' || t.typcategory::text || ' preferred=' || t.typispreferred
       || ' io=' || concat_ws(' ', t.typinput::regprocedure, t.typoutput::regprocedure,
                              t.typreceive::regprocedure, t.typsend::regprocedure,
                              t.typmodin::regprocedure, t.typmodout::regprocedure,
                              t.typanalyze::regprocedure, t.typsubscript::regprocedure)
       || ' elem=' || t.typelem::regtype || ' array=' || t.typarray::regtype
       || ' base=' || t.typbasetype::regtype || ' typmod=' || t.typtypmod
       || ' notnull=' || t.typnotnull || ' default=' || coalesce(t.typdefault, '-')
       || ' collation=' || t.typcollation::regcollation || ' owner=' || t.typowner::regrole
       || ' acl=' || coalesce(t.typacl::text, '-')
       || ' array acl=' || coalesce((SELECT a.typacl::text FROM pg_type a WHERE a.oid = t.typarray), '-')
  FROM types t
UNION ALL
SELECT 'cast ' || format_type(ca.castsource, NULL) || ' -> ' || format_type(ca.casttarget, NULL)
       || ' function=' || ca.castfunc::regprocedure || ' context=' || ca.castcontext::text
       || ' method=' || ca.castmethod::text
  FROM pg_cast ca JOIN m ON m.classid = 'pg_cast'::regclass AND ca.oid = m.objid
UNION ALL
SELECT 'operator ' || o.oid::regoperator || ' result=' || o.oprresult::regtype
       || ' code=' || o.oprcode::oid::regprocedure || ' commutator=' || o.oprcom::regoperator
       || ' negator=' || o.oprnegate::regoperator || ' restrict=' || o.oprrest::oid::regprocedure
       || ' join=' || o.oprjoin::oid::regprocedure || ' merges=' || o.oprcanmerge
       || ' hashes=' || o.oprcanhash
  FROM pg_operator o JOIN m ON m.classid = 'pg_operator'::regclass AND o.oid = m.objid
UNION ALL
SELECT 'opclass ' || pg_describe_object('pg_opclass'::regclass, oc.oid, 0) || ' default=' || oc.opcdefault
       || ' type=' || oc.opcintype::regtype || ' storage=' || oc.opckeytype::regtype
  FROM pg_opclass oc JOIN m ON m.classid = 'pg_opclass'::regclass AND oc.oid = m.objid
UNION ALL
SELECT 'amop ' || pg_describe_object('pg_amop'::regclass, ao.oid, 0) || ' purpose=' || ao.amoppurpose::text
  FROM pg_amop ao JOIN m ON m.classid = 'pg_opfamily'::regclass AND ao.amopfamily = m.objid
UNION ALL
SELECT 'amproc ' || pg_describe_object('pg_amproc'::regclass, ap.oid, 0)
  FROM pg_amproc ap JOIN m ON m.classid = 'pg_opfamily'::regclass AND ap.amprocfamily = m.objid
UNION ALL
SELECT 'event trigger ' || e.evtname || ' on ' || e.evtevent || ' function=' || e.evtfoid::regprocedure
       || ' enabled=' || e.evtenabled::text || ' tags=' || coalesce(e.evttags::text, '-')
       || ' owner=' || e.evtowner::regrole
  FROM pg_event_trigger e JOIN m ON m.classid = 'pg_event_trigger'::regclass AND e.oid = m.objid
UNION ALL
SELECT 'comment on ' || pg_describe_object(d.classoid, d.objoid, d.objsubid) || ': ' || d.description
  FROM pg_description d
 WHERE (d.classoid, d.objoid) IN (SELECT classid, objid FROM m)
    OR (d.classoid = 'pg_constraint'::regclass AND d.objoid IN (
          SELECT oid FROM pg_constraint WHERE conrelid IN (SELECT oid FROM rels)))
UNION ALL
SELECT 'initial privileges of ' || pg_describe_object(ip.classoid, ip.objoid, ip.objsubid)
       || ' (' || ip.privtype::text || '): ' || ip.initprivs::text
  FROM pg_init_privs ip
 WHERE (ip.classoid, ip.objoid) IN (SELECT classid, objid FROM m)
    OR (ip.classoid = 'pg_namespace'::regclass AND ip.objoid = 'colcrypt'::regnamespace)
)SQL";

std::vector<std::string> extension_catalog(const std::string& conninfo) {
  PgConn conn(conninfo);
  PgConn::Outcome outcome = conn.exec(kExtensionCatalog);
  INFO(outcome.sqlstate << " " << outcome.message);
  REQUIRE(outcome.sqlstate.empty());
  std::vector<std::string> entries;
  for (const auto& row : outcome.rows) entries.push_back(row[0].value_or("(null)"));
  std::sort(entries.begin(), entries.end());
  return entries;
}

// pg_dump --schema-only, without what differs between any two dumps: the
// \restrict key of pg_dump 15.14+ and the version comments.
std::string schema_dump(const std::string& conninfo) {
  CommandResult r = run_command({pg_bin() + "/pg_dump", "--schema-only", "--dbname", conninfo});
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  std::istringstream in(r.output);
  std::string line, kept;
  while (std::getline(in, line)) {
    if (line.rfind("\\restrict ", 0) == 0 || line.rfind("\\unrestrict ", 0) == 0 ||
        line.rfind("-- Dumped from database version", 0) == 0 ||
        line.rfind("-- Dumped by pg_dump version", 0) == 0) {
      continue;
    }
    kept += line + "\n";
  }
  return kept;
}

// What differs between the schemas of two databases ("" when nothing): the
// catalog entries only one has, then diff -u of their dumps.
std::string schema_difference(const Sandbox& sandbox, const std::string& updated_db,
                              const std::string& fresh_db) {
  const std::vector<std::string> updated = extension_catalog(db_conninfo(sandbox, updated_db));
  const std::vector<std::string> fresh = extension_catalog(db_conninfo(sandbox, fresh_db));
  REQUIRE(updated.size() > 100);  // the query sees the extension at all
  std::vector<std::string> only_updated, only_fresh;
  std::set_difference(updated.begin(), updated.end(), fresh.begin(), fresh.end(),
                      std::back_inserter(only_updated));
  std::set_difference(fresh.begin(), fresh.end(), updated.begin(), updated.end(),
                      std::back_inserter(only_fresh));
  std::string report;
  for (const auto& e : only_updated) report += "only in " + updated_db + ": " + e + "\n";
  for (const auto& e : only_fresh) report += "only in " + fresh_db + ": " + e + "\n";

  const std::string updated_dump = schema_dump(db_conninfo(sandbox, updated_db));
  const std::string fresh_dump = schema_dump(db_conninfo(sandbox, fresh_db));
  REQUIRE(updated_dump.find("CREATE EXTENSION IF NOT EXISTS colcrypt") != std::string::npos);
  if (updated_dump != fresh_dump) {
    const std::string a = sandbox.dir() + "/" + updated_db + ".sql";
    const std::string b = sandbox.dir() + "/" + fresh_db + ".sql";
    std::ofstream(a) << updated_dump;
    std::ofstream(b) << fresh_dump;
    report += "pg_dump --schema-only differs:\n" + run_command({"diff", "-u", a, b}).output;
  }
  return report;
}

// A database created with CREATE EXTENSION colcrypt (the current version)
// and the same user schema, to compare an updated one with.
void create_fresh_database(const Sandbox& sandbox, PgConn& admin, const std::string& db) {
  admin.value("CREATE DATABASE " + db);
  PgConn conn(db_conninfo(sandbox, db));
  conn.value("CREATE EXTENSION colcrypt");
  create_user_schema(conn);
}

}  // namespace

TEST_CASE(
    "0.1.0 runs on the current library, and ALTER EXTENSION UPDATE keeps values, grants "
    "and jobs and gives a fresh install's schema",
    "[upgrade]") {
  Sandbox::Options options;
  options.env = jobs_env();
  Sandbox sandbox(options);
  sandbox.create_key("up_key");
  sandbox.create_key("up_other");
  PgConn conn(sandbox.conninfo());
  conn.value("CREATE EXTENSION colcrypt VERSION '" + kFirstRelease + "'");
  const std::string current =
      conn.value("SELECT default_version FROM pg_available_extensions WHERE name = 'colcrypt'");
  REQUIRE(current != kFirstRelease);
  REQUIRE(conn.value("SELECT extversion FROM pg_extension WHERE extname = 'colcrypt'") ==
          kFirstRelease);

  // 0.1.0's SQL against the current library: every kind of value, the DDL
  // triggers, the sealed checks, grants, the online migration and jobs.
  create_user_schema(conn);
  fill_people(conn, 1, 50);
  CHECK(rows_that_decrypt(conn) == "50");
  const std::string constraints = sealed_constraints(conn);
  for (const char* check : {"people.colcrypt_sealed_ssn CHECK (colcrypt.sealed(ssn))",
                            "people.colcrypt_sealed_card", "people.colcrypt_sealed_aliases",
                            "people.colcrypt_sealed_loose", "people_copy.colcrypt_sealed_loose",
                            "legacy.colcrypt_sealed_ssn_enc CHECK (colcrypt.sealed(ssn_enc))",
                            "guarded.colcrypt_sealed_v"}) {
    INFO(constraints);
    CHECK(constraints.find(check) != std::string::npos);
  }
  check_sealed_writes(conn);
  conn.value("INSERT INTO legacy SELECT g, 'L' || g FROM generate_series(1, 30) g");
  conn.value("CALL colcrypt.encrypt_column('legacy', 'ssn', 'ssn_enc', 7)");
  CHECK(conn.value("SELECT count(*) FROM legacy WHERE ssn_enc::text = ssn") == "30");
  conn.value("SELECT colcrypt.grant_key('up_key', 'upgrade_reader', 'decrypt')");
  conn.value("SELECT colcrypt.grant_key('up_other', 'upgrade_reader', 'all')");

  // Job 1 runs under 0.1.0: tenant_note's values have a context the job
  // cannot know, so it ends done with skipped rows and a last_error.
  REQUIRE(sandbox.keyctl({"rotate", "up_key"}).exit_code == 0);
  conn.value("SELECT colcrypt.start_rotation_job('up_key')");
  wait_for_jobs(conn, 120);
  CHECK(conn.value("SELECT state || ' ' || rows_skipped FROM colcrypt.rotation_progress"
                   " WHERE job_id = 1") == "done 50");
  CHECK(
      conn.value("SELECT count(*) FROM people WHERE colcrypt.key_version(ssn) = 2"
                 " AND colcrypt.key_version(card) = 2 AND colcrypt.key_version(aliases[2]) = 2") ==
      "50");
  CHECK(conn.value("SELECT count(*) FROM legacy WHERE colcrypt.key_version(ssn_enc) = 2") == "30");
  CHECK(rows_that_decrypt(conn) == "50");
  // 0.1.0 shows last_error to every colcrypt_user: what 0.2.0 changes.
  conn.value("SET ROLE upgrade_reader");
  CHECK(conn.value(
            "SELECT last_error IS NOT NULL FROM colcrypt.rotation_progress WHERE job_id = 1") ==
        "t");
  conn.value("RESET ROLE");

  // Job 2 is pending across the update: keyd is down.
  REQUIRE(sandbox.keyctl({"rotate", "up_other"}).exit_code == 0);
  sandbox.must("keyd-stop");
  conn.value("SELECT colcrypt.start_rotation_job('up_other', 1)");

  const std::string before = stored_state(conn);
  conn.value("ALTER EXTENSION colcrypt UPDATE");
  CHECK(conn.value("SELECT extversion FROM pg_extension WHERE extname = 'colcrypt'") == current);
  CHECK(stored_state(conn) == before);

  // The current version: keyd picks up the pending job and finishes it.
  sandbox.must("keyd-start", jobs_env());
  PgConn after(sandbox.conninfo());  // a new session: no key cached from before
  wait_for_jobs(after, 120);
  CHECK(after.value("SELECT state FROM colcrypt.rotation_jobs WHERE job_id = 2") == "done");
  CHECK(after.value("SELECT count(*) FROM people WHERE colcrypt.key_version(loose) = 2"
                    " AND colcrypt.key_version(raw) = 2") == "50");
  CHECK(after.value("SELECT count(*) FROM colcrypt.rotation_job_columns WHERE job_id = 2"
                    " AND kind = 'json'") == "1");
  CHECK(rows_that_decrypt(after) == "50");
  fill_people(after, 51, 60);
  CHECK(rows_that_decrypt(after) == "60");
  check_sealed_writes(after);
  CHECK(sealed_constraints(after) == constraints);
  after.value("CREATE TABLE after_update (v colcrypt.encrypted('up_key'))");
  CHECK(after.value("SELECT count(*) FROM pg_constraint WHERE conrelid = 'after_update'::regclass"
                    " AND conname = 'colcrypt_sealed_v'") == "1");
  after.value("DROP TABLE after_update");

  // Grants kept, and enforced; last_error now only for key administrators.
  after.value("SET ROLE upgrade_reader");
  CHECK(after.value("SELECT string_agg(ssn::text, ',' ORDER BY id) FROM people WHERE id <= 2") ==
        "ssn-1,ssn-2");
  refused(after, "SELECT colcrypt.encrypt_field('x', 'up_key')", "42501");
  CHECK(after.value("SELECT colcrypt.decrypt_field(colcrypt.encrypt_field('y', 'up_other'))") ==
        "y");
  CHECK(after.value("SELECT count(*) FROM colcrypt.rotation_progress WHERE last_error IS NULL") ==
        "2");
  CHECK(after.value("SELECT rows_skipped FROM colcrypt.rotation_progress WHERE job_id = 1") ==
        "50");
  after.value("RESET ROLE");
  CHECK(after.value(
            "SELECT last_error IS NOT NULL FROM colcrypt.rotation_progress WHERE job_id = 1") ==
        "t");

  // The updated schema is a fresh install's.
  create_fresh_database(sandbox, after, "fresh");
  const std::string difference = schema_difference(sandbox, "postgres", "fresh");
  INFO(difference);
  CHECK(difference.empty());

  // The comparison sees a function's property and a grant on a member (both
  // are left out of pg_dump's CREATE EXTENSION, so only a comparison of the
  // catalog, and of pg_dump's privilege records, finds them).
  after.value("ALTER FUNCTION colcrypt.key_id(colcrypt.encrypted) COST 2");
  const std::string changed_function = schema_difference(sandbox, "postgres", "fresh");
  CHECK(changed_function.find("colcrypt.key_id(colcrypt.encrypted)") != std::string::npos);
  after.value("ALTER FUNCTION colcrypt.key_id(colcrypt.encrypted) COST 1");
  after.value("GRANT SELECT ON colcrypt.rotation_jobs TO colcrypt_user");
  const std::string changed_grant = schema_difference(sandbox, "postgres", "fresh");
  CHECK(changed_grant.find("only in postgres: relation colcrypt.rotation_jobs") !=
        std::string::npos);
  CHECK(changed_grant.find("+GRANT SELECT ON TABLE colcrypt.rotation_jobs TO colcrypt_user") ==
        std::string::npos);
  CHECK(changed_grant.find("-GRANT SELECT ON TABLE colcrypt.rotation_jobs TO colcrypt_user") !=
        std::string::npos);
  after.value("REVOKE SELECT ON colcrypt.rotation_jobs FROM colcrypt_user");
  CHECK(schema_difference(sandbox, "postgres", "fresh").empty());
}

TEST_CASE("every released version updates to a fresh install's schema", "[upgrade]") {
  Sandbox sandbox;
  sandbox.create_key("up_key");
  sandbox.create_key("up_other");
  PgConn admin(sandbox.conninfo());
  const std::string current =
      admin.value("SELECT default_version FROM pg_available_extensions WHERE name = 'colcrypt'");
  const std::vector<std::string> released = released_versions(current);
  REQUIRE(std::find(released.begin(), released.end(), kFirstRelease) != released.end());
  create_fresh_database(sandbox, admin, "fresh");
  for (const std::string& version : released) {
    INFO("from " << version);
    // Every released version is installed (the Makefile's DATA) and offers a path.
    CHECK(admin.value("SELECT count(*) FROM pg_extension_update_paths('colcrypt')"
                      " WHERE source = '" +
                      version + "' AND target = '" + current + "' AND path IS NOT NULL") == "1");
    std::string db = "from_" + std::regex_replace(version, std::regex("[^0-9A-Za-z]"), "_");
    admin.value("CREATE DATABASE " + db);
    {
      PgConn conn(db_conninfo(sandbox, db));
      conn.value("CREATE EXTENSION colcrypt VERSION '" + version + "'");
      create_user_schema(conn);
      conn.value("ALTER EXTENSION colcrypt UPDATE");
      CHECK(conn.value("SELECT extversion FROM pg_extension WHERE extname = 'colcrypt'") ==
            current);
    }
    const std::string difference = schema_difference(sandbox, db, "fresh");
    INFO(difference);
    CHECK(difference.empty());
  }
}
