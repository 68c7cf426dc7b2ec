// Key-bound columns through real clients: untyped libpq parameters, psql's
// \copy (text and CSV), and pg_dump / pg_restore (plain and custom format)
// round trips that carry the ciphertext byte for byte, restore with keyd
// stopped, and leave no plaintext in the dump; the sealed checks CREATE TABLE
// AS adds without a scan are those of the scan, in the catalog and the dump.
// docs/columns.md.
#include <libpq-fe.h>

#include <catch2/catch.hpp>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "harness.hpp"

using namespace colcrypt::test;

namespace {

const std::vector<std::string> kSecrets = {"123-45-6789", "987-65-4321", u8"grüße ✓ 日本",
                                           "comma, \"quote\" and tab\there", ""};

// PQexecParams with paramTypes = NULL: every parameter is sent as text of type
// "unknown" (0), which is what libpq, psycopg and node-postgres send by default.
std::string exec_untyped(PGconn* conn, const std::string& sql,
                         const std::vector<std::string>& params) {
  std::vector<const char*> values;
  for (const auto& p : params) values.push_back(p.c_str());
  std::unique_ptr<PGresult, decltype(&PQclear)> res(
      PQexecParams(conn, sql.c_str(), int(values.size()), nullptr, values.data(), nullptr, nullptr,
                   0),
      &PQclear);
  const ExecStatusType status = PQresultStatus(res.get());
  if (status == PGRES_COMMAND_OK || status == PGRES_TUPLES_OK) return "";
  const char* state = PQresultErrorField(res.get(), PG_DIAG_SQLSTATE);
  return state ? state : "?????";
}

// Environment for the Postgres client programs (psql, pg_dump, pg_restore).
Env client_env(const Sandbox& s) {
  return {{"PGHOST", s.dir() + "/pgsock"},
          {"PGPORT", std::to_string(s.port())},
          {"PGUSER", "postgres"},
          {"PGOPTIONS", "-c client_min_messages=warning"}};
}

std::string copy_out(PgConn& conn, const std::string& table) {
  // COPY TO STDOUT through libpq: the exact bytes a dump carries.
  std::unique_ptr<PGresult, decltype(&PQclear)> res(
      PQexec(conn.get(), ("COPY " + table + " TO STDOUT").c_str()), &PQclear);
  REQUIRE(PQresultStatus(res.get()) == PGRES_COPY_OUT);
  std::string out;
  char* buffer = nullptr;
  int n;
  while ((n = PQgetCopyData(conn.get(), &buffer, 0)) > 0) {
    out.append(buffer, size_t(n));
    PQfreemem(buffer);
  }
  res.reset(PQgetResult(conn.get()));
  REQUIRE(PQresultStatus(res.get()) == PGRES_COMMAND_OK);
  while (PGresult* extra = PQgetResult(conn.get())) PQclear(extra);
  return out;
}

std::string conninfo_for(const Sandbox& s, const std::string& db) {
  return "host=" + s.dir() + "/pgsock port=" + std::to_string(s.port()) +
         " user=postgres dbname=" + db + " options='-c client_min_messages=warning'";
}

}  // namespace

TEST_CASE("untyped libpq parameters are encrypted under the column's key", "[columns]") {
  Sandbox& sandbox = shared_sandbox();
  PgConn conn(sandbox.conninfo());
  conn.value("DROP TABLE IF EXISTS untyped_params");
  conn.value(
      "CREATE TABLE untyped_params (id int PRIMARY KEY, "
      "v colcrypt.encrypted('shared_key'), free colcrypt.encrypted)");

  for (size_t i = 0; i < kSecrets.size(); ++i) {
    INFO("value " << i);
    CHECK(exec_untyped(conn.get(), "INSERT INTO untyped_params (id, v) VALUES ($1, $2)",
                       {std::to_string(i), kSecrets[i]}) == "");
  }
  CHECK(exec_untyped(conn.get(), "UPDATE untyped_params SET v = $2 WHERE id = $1",
                     {"0", "updated"}) == "");
  // a prepared statement with untyped parameters, executed twice (generic plan path too)
  PQclear(PQprepare(conn.get(), "ins", "INSERT INTO untyped_params (id, v) VALUES ($1, $2)", 2,
                    nullptr));
  for (int i = 100; i < 107; ++i) {
    const std::string id = std::to_string(i);
    const char* values[2] = {id.c_str(), "prepared"};
    std::unique_ptr<PGresult, decltype(&PQclear)> res(
        PQexecPrepared(conn.get(), "ins", 2, values, nullptr, nullptr, 0), &PQclear);
    CHECK(PQresultStatus(res.get()) == PGRES_COMMAND_OK);
  }

  auto rows = conn.exec(
      "SELECT id, v::text, colcrypt.ciphertext(v), colcrypt.key_name(v) FROM untyped_params "
      "WHERE id < 100 ORDER BY id");
  REQUIRE(rows.sqlstate == "");
  REQUIRE(rows.rows.size() == kSecrets.size());
  for (size_t i = 0; i < kSecrets.size(); ++i) {
    INFO("value " << i);
    CHECK(*rows.rows[i][1] == (i == 0 ? "updated" : kSecrets[i]));
    CHECK(rows.rows[i][2]->rfind("colcrypt:", 0) == 0);
    if (!kSecrets[i].empty()) CHECK(rows.rows[i][2]->find(kSecrets[i]) == std::string::npos);
    CHECK(*rows.rows[i][3] == "shared_key");
  }
  CHECK(conn.value(
            "SELECT count(*) FROM untyped_params WHERE id >= 100 AND v::text = 'prepared'") == "7");

  // a column without a key refuses untyped plaintext, stores nothing
  CHECK(exec_untyped(conn.get(), "INSERT INTO untyped_params (id, free) VALUES ($1, $2)",
                     {"50", "plaintext"}) == "22P02");
  CHECK(exec_untyped(conn.get(), "UPDATE untyped_params SET free = $1", {"plaintext"}) == "22P02");
  CHECK(conn.value("SELECT count(*) FROM untyped_params WHERE free IS NOT NULL") == "0");
}

TEST_CASE("psql \\copy of plaintext into a key-bound column, text and CSV", "[columns][copy]") {
  Sandbox& sandbox = shared_sandbox();
  PgConn conn(sandbox.conninfo());
  conn.value("DROP TABLE IF EXISTS copied");
  conn.value(
      "CREATE TABLE copied (id int, v colcrypt.encrypted('shared_key'), free colcrypt.encrypted)");
  const std::string text_file = sandbox.dir() + "/plain.tsv";
  const std::string csv_file = sandbox.dir() + "/plain.csv";
  {
    std::ofstream text(text_file);
    text << "1\t123-45-6789\n2\tsecond\\tvalue\n3\t\\N\n";
    std::ofstream csv(csv_file);
    csv << "4,\"comma, inside\"\n5,\"quote \"\"inside\"\"\"\n";
  }
  auto psql = [&](const std::string& command) {
    return run_command({"psql", "-X", "-v", "ON_ERROR_STOP=1", "-d", "postgres", "-c", command},
                       client_env(sandbox));
  };
  CommandResult r = psql("\\copy copied (id, v) FROM '" + text_file + "'");
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  r = psql("\\copy copied (id, v) FROM '" + csv_file + "' WITH (FORMAT csv)");
  REQUIRE(r.exit_code == 0);

  auto rows = conn.exec("SELECT id, v::text, colcrypt.ciphertext(v) FROM copied ORDER BY id");
  REQUIRE(rows.rows.size() == 5);
  CHECK(*rows.rows[0][1] == "123-45-6789");
  CHECK(*rows.rows[1][1] == "second\tvalue");
  CHECK_FALSE(rows.rows[2][1].has_value());
  CHECK(*rows.rows[3][1] == "comma, inside");
  CHECK(*rows.rows[4][1] == "quote \"inside\"");
  CHECK(rows.rows[0][2]->find("123-45-6789") == std::string::npos);

  // the same plaintext into the column without a key: refused, nothing stored
  r = psql("\\copy copied (id, free) FROM '" + text_file + "'");
  CHECK(r.exit_code != 0);
  CHECK(r.output.find("without a key") != std::string::npos);
  CHECK(conn.value("SELECT count(*) FROM copied WHERE free IS NOT NULL") == "0");
}

TEST_CASE("pg_dump and pg_restore carry the ciphertext byte for byte, without keyd",
          "[columns][dump][sealed]") {
  Sandbox sandbox;  // its own: keyd is stopped during the restores
  sandbox.create_key("dump_key");
  PgConn admin(sandbox.conninfo());
  admin.value("CREATE DATABASE dump_src");
  {
    PgConn src(conninfo_for(sandbox, "dump_src"));
    src.value("CREATE EXTENSION colcrypt");
    src.value("CREATE ROLE dump_reader");
    src.value("SELECT colcrypt.grant_key('dump_key', 'dump_reader', 'decrypt')");
    src.value(
        "CREATE TABLE customers (id int PRIMARY KEY, ssn colcrypt.encrypted('dump_key'), "
        "note colcrypt.encrypted('dump_key', 'customers.note'), free colcrypt.encrypted, "
        "ssn_bidx bytea)");
    src.value(
        "INSERT INTO customers SELECT i, 'ssn-secret-' || i, 'note-secret-' || i, "
        "colcrypt.encrypt_field('free-secret-' || i, 'dump_key', 'row-' || i), "
        "colcrypt.blind_index('ssn-secret-' || i, 'dump_key') FROM generate_series(1, 500) i");
    // the online migration: ADD COLUMN to a table with rows adds its sealed
    // check NOT VALID, which pg_dump writes as an ALTER TABLE of its own after
    // the CREATE TABLE that already got the check (the restore must not collide)
    src.value("ALTER TABLE customers ADD COLUMN card colcrypt.encrypted('dump_key', 'c.card')");
    src.value("UPDATE customers SET card = 'card-secret-' || id WHERE id <= 10");
    REQUIRE(src.value("SELECT convalidated FROM pg_constraint WHERE conname = "
                      "'colcrypt_sealed_card'") == "f");
    // CREATE TABLE AS checks its rows as it stores them and adds its sealed
    // checks valid without a scan; the catalog rows are those of the scan
    // path (taken when colcrypt_ddl_start does not load the library for a
    // session that has not: a new connection)
    src.value("CREATE TABLE ctas_copy AS SELECT id, ssn, free FROM customers");
    src.value("ALTER EVENT TRIGGER colcrypt_ddl_start DISABLE");
    {
      PgConn fresh(conninfo_for(sandbox, "dump_src"));
      fresh.value("CREATE TABLE ctas_scanned AS SELECT id, ssn, free FROM customers");
      // its statistics, before its answer (not at its exit, after ours)
      fresh.value("SELECT pg_stat_force_next_flush()");
    }
    src.value("ALTER EVENT TRIGGER colcrypt_ddl_start ENABLE");
    src.value("SELECT pg_stat_force_next_flush()");
    CHECK(src.value("SELECT string_agg(relname || '=' || seq_scan, ',' ORDER BY relname) "
                    "FROM pg_stat_user_tables WHERE relname LIKE 'ctas_%'") ==
          "ctas_copy=0,ctas_scanned=1");
    const std::string catalog_row =
        "SELECT string_agg(format('%s %s %s %s %s %s %s %s', conname, contype, condeferrable, "
        "condeferred, convalidated, conislocal, coninhcount, pg_get_constraintdef(oid)), ', ' "
        "ORDER BY conname) FROM pg_constraint WHERE conrelid = ";
    const std::string copied = src.value(catalog_row + "'ctas_copy'::regclass");
    CHECK(copied ==
          "colcrypt_sealed_free c f f t t 0 CHECK (colcrypt.sealed(free)), "
          "colcrypt_sealed_ssn c f f t t 0 CHECK (colcrypt.sealed(ssn))");
    CHECK(src.value(catalog_row + "'ctas_scanned'::regclass") == copied);
    src.value("DROP TABLE ctas_scanned");
  }
  PgConn src(conninfo_for(sandbox, "dump_src"));
  const std::string original = copy_out(src, "customers");
  REQUIRE(original.size() > 500 * 100);

  const std::string plain = sandbox.dir() + "/dump.sql";
  const std::string custom = sandbox.dir() + "/dump.custom";
  CommandResult r = run_command({"pg_dump", "-d", "dump_src", "-f", plain}, client_env(sandbox));
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  r = run_command({"pg_dump", "-Fc", "-d", "dump_src", "-f", custom}, client_env(sandbox));
  REQUIRE(r.exit_code == 0);

  // no plaintext of an encrypted column in either dump; the grants are in it
  const std::string plain_text = read_file(plain);
  CHECK(plain_text.find("ssn-secret-") == std::string::npos);
  CHECK(plain_text.find("note-secret-") == std::string::npos);
  CHECK(plain_text.find("free-secret-") == std::string::npos);
  CHECK(plain_text.find("card-secret-") == std::string::npos);
  CHECK(plain_text.find("CHECK (colcrypt.sealed(card)) NOT VALID") != std::string::npos);
  CHECK(plain_text.find("colcrypt.encrypted('dump_key','customers.note')") != std::string::npos);
  CHECK(plain_text.find("dump_reader\tdump_reader\tdecrypt") != std::string::npos);
  // the sealed checks travel with the tables (and a restore does not add twice)
  CHECK(plain_text.find("CONSTRAINT colcrypt_sealed_free CHECK (colcrypt.sealed(free))") !=
        std::string::npos);
  // a CREATE TABLE AS table's checks are valid: inside its CREATE TABLE
  const size_t copy_table = plain_text.find("CREATE TABLE public.ctas_copy (");
  REQUIRE(copy_table != std::string::npos);
  const std::string copy_ddl =
      plain_text.substr(copy_table, plain_text.find(");", copy_table) - copy_table);
  CHECK(copy_ddl.find("CONSTRAINT colcrypt_sealed_ssn CHECK (colcrypt.sealed(ssn))") !=
        std::string::npos);
  CHECK(copy_ddl.find("CONSTRAINT colcrypt_sealed_free CHECK (colcrypt.sealed(free))") !=
        std::string::npos);
  CHECK(plain_text.find("ALTER TABLE public.ctas_copy\n    ADD CONSTRAINT") == std::string::npos);
  const std::string custom_bytes = read_file(custom);
  CHECK(custom_bytes.find("ssn-secret-") == std::string::npos);  // compressed or not, never plain
  r = run_command({"pg_restore", "-f", "-", custom}, client_env(sandbox));
  REQUIRE(r.exit_code == 0);
  CHECK(r.output.find("ssn-secret-") == std::string::npos);

  // restore both with keyd stopped: a restore must not need it
  sandbox.must("keyd-stop");
  admin.value("CREATE DATABASE dump_plain");
  admin.value("CREATE DATABASE dump_custom");
  r = run_command({"psql", "-X", "-v", "ON_ERROR_STOP=1", "-q", "-d", "dump_plain", "-f", plain},
                  client_env(sandbox));
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  r = run_command({"pg_restore", "--exit-on-error", "-d", "dump_custom", custom},
                  client_env(sandbox));
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  for (const char* db : {"dump_plain", "dump_custom"}) {
    INFO(db);
    PgConn restored(conninfo_for(sandbox, db));
    CHECK(copy_out(restored, "customers") == original);  // byte for byte
    CHECK(restored.value(
              "SELECT count(*) FROM colcrypt.key_grants WHERE role = 'dump_reader'::regrole") ==
          "1");
    CHECK(restored.value("SELECT count(*) FROM pg_constraint WHERE conrelid = "
                         "'customers'::regclass AND conname LIKE 'colcrypt_sealed_%'") == "4");
    CHECK(restored.value("SELECT string_agg(conname || ' ' || convalidated, ', ' ORDER BY "
                         "conname) FROM pg_constraint WHERE conrelid = 'ctas_copy'::regclass") ==
          "colcrypt_sealed_free true, colcrypt_sealed_ssn true");
    CHECK(copy_out(restored, "ctas_copy") == copy_out(src, "ctas_copy"));
  }
  CHECK(sandbox.keyd_log().find("ERROR") == std::string::npos);

  // with keyd back, the restored values decrypt (bindings kept), and a new
  // write in the restored database lands in the same column identity
  sandbox.must("keyd-start");
  for (const char* db : {"dump_plain", "dump_custom"}) {
    INFO(db);
    PgConn restored(conninfo_for(sandbox, db));
    CHECK(restored.value("SELECT count(*) FROM customers WHERE ssn::text = 'ssn-secret-' || id "
                         "AND note::text = 'note-secret-' || id "
                         "AND colcrypt.decrypt_field(free, 'row-' || id) = 'free-secret-' || id") ==
          "500");
    CHECK(restored.value(
              "SELECT count(*) FROM customers WHERE card::text = 'card-secret-' || id") == "10");
    CHECK(restored.value("SELECT id FROM customers "
                         "WHERE ssn_bidx = colcrypt.blind_index('ssn-secret-42', 'dump_key')") ==
          "42");
    restored.value("INSERT INTO customers (id, ssn) VALUES (1000, 'after restore')");
    CHECK(restored.value("SELECT ssn::text FROM customers WHERE id = 1000") == "after restore");
    // a value of the restored column can go back into the source's column
    const std::string sealed =
        restored.value("SELECT colcrypt.ciphertext(ssn) FROM customers WHERE id = 1000");
    src.value("INSERT INTO customers (id, ssn) VALUES (1000, '" + sealed + "')");
    CHECK(src.value("SELECT ssn::text FROM customers WHERE id = 1000") == "after restore");
    src.value("DELETE FROM customers WHERE id = 1000");
  }
}

// Roles are cluster-wide and key_grants has no dependency on them: after DROP
// ROLE, Postgres may give a new role the same OID. pg_resetwal -o makes that
// happen now instead of after 4 billion OIDs; the new role must not inherit
// the dropped role's grants (they name the role by OID and by name).
TEST_CASE("a role that reuses a dropped role's OID does not inherit its key grants",
          "[columns][grants]") {
  Sandbox sandbox;  // its own: the cluster is stopped and reset
  sandbox.create_key("oid_key");
  sandbox.create_extension();
  std::string oid;
  {
    PgConn admin(sandbox.conninfo());
    admin.value("CREATE ROLE oid_old IN ROLE colcrypt_user");
    admin.value("CREATE ROLE oid_control IN ROLE colcrypt_user");
    oid = admin.value("SELECT 'oid_old'::regrole::oid");
    admin.value("SELECT colcrypt.grant_key('oid_key', 'oid_old', 'encrypt')");
    admin.value("DROP ROLE oid_old");
    // an OID stays taken while a dead row holds it: autovacuum would clear it
    admin.value("VACUUM pg_catalog.pg_authid");
  }
  sandbox.must("pg-stop");
  const char* pg_bin = std::getenv("PG_BIN");
  const std::string resetwal =
      std::string(pg_bin != nullptr ? pg_bin : "/usr/lib/postgresql/15/bin") + "/pg_resetwal";
  // a little below it: the server may take an OID or two on its way up
  CommandResult r = run_command({"runuser", "-u", "postgres", "--", resetwal, "-o",
                                 std::to_string(std::stoul(oid) - 8), sandbox.dir() + "/data"});
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  sandbox.must("pg-start");

  PgConn admin(sandbox.conninfo());
  for (int i = 0; i < 32; ++i) {
    const std::string name = "oid_try_" + std::to_string(i);
    admin.value("CREATE ROLE " + name);
    if (admin.value("SELECT '" + name + "'::regrole::oid") != oid) continue;
    admin.value("ALTER ROLE " + name + " RENAME TO oid_new");
    admin.value("GRANT colcrypt_user TO oid_new");
    break;
  }
  REQUIRE(admin.value("SELECT 'oid_new'::regrole::oid") == oid);
  // the dropped role's row is still there, and now names the new role's OID
  CHECK(admin.value("SELECT role_name FROM colcrypt.key_grants WHERE role = 'oid_new'::regrole") ==
        "oid_old");
  PgConn::Outcome o = admin.exec("SET ROLE oid_new; SELECT colcrypt.encrypt_field('x', 'oid_key')");
  CHECK(o.sqlstate == "42501");
  admin.value("RESET ROLE");
  // a grant made to the new role itself counts
  admin.value("SELECT colcrypt.grant_key('oid_key', 'oid_new', 'encrypt')");
  o = admin.exec(
      "SET ROLE oid_new; SELECT colcrypt.key_version(colcrypt.encrypt_field('x', 'oid_key'))");
  CHECK(o.sqlstate == "");
  admin.value("RESET ROLE");
  // and a role that never had one stays refused
  o = admin.exec("SET ROLE oid_control; SELECT colcrypt.encrypt_field('x', 'oid_key')");
  CHECK(o.sqlstate == "42501");
}

// Backends cache key privileges past their transaction (src/pg/key_privileges.cpp):
// a change made in another session (grant_key / revoke_key, plain DML on
// colcrypt.key_grants, role membership) must reach a backend that already
// cached the old answer, at its next transaction.
TEST_CASE("another backend's cached key privileges follow grants and roles", "[columns][grants]") {
  Sandbox& sandbox = shared_sandbox();
  PgConn admin(sandbox.conninfo());
  admin.exec("DROP TABLE IF EXISTS cached_grants; DROP ROLE IF EXISTS cache_reader, cache_group");
  admin.value("CREATE ROLE cache_reader LOGIN IN ROLE colcrypt_user");
  admin.value("CREATE ROLE cache_group");
  admin.value("CREATE TABLE cached_grants (c colcrypt.encrypted)");
  admin.value("INSERT INTO cached_grants SELECT colcrypt.encrypt_field('secret', 'shared_key')");
  admin.value("GRANT SELECT ON cached_grants TO cache_reader");
  admin.value("SELECT colcrypt.grant_key('shared_key', 'cache_reader', 'decrypt')");

  PgConn reader(sandbox.conninfo() + " user=cache_reader");
  const std::string read = "SELECT colcrypt.decrypt_field(c) FROM cached_grants";
  auto outcome = [&] { return reader.exec(read).sqlstate; };
  REQUIRE(outcome() == "");  // cached: allowed

  admin.value("SELECT colcrypt.revoke_key('shared_key', 'cache_reader', 'decrypt')");
  CHECK(outcome() == "42501");
  admin.value("SELECT colcrypt.grant_key('shared_key', 'cache_reader', 'decrypt')");
  CHECK(outcome() == "");
  admin.value("DELETE FROM colcrypt.key_grants WHERE role = 'cache_reader'::regrole");
  CHECK(outcome() == "42501");

  // through a role: the grant is the group's; membership comes and goes
  admin.value("SELECT colcrypt.grant_key('shared_key', 'cache_group', 'decrypt')");
  CHECK(outcome() == "42501");
  admin.value("GRANT cache_group TO cache_reader");
  CHECK(outcome() == "");
  admin.value("REVOKE cache_group FROM cache_reader");
  CHECK(outcome() == "42501");

  admin.value("SELECT colcrypt.revoke_key('shared_key', 'cache_group')");
  admin.value("DROP TABLE cached_grants");
}
