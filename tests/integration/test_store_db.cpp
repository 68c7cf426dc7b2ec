// keyd's database store backend (issue 14, colcrypt-keyd --store-db): the
// lifecycle on the database, tampering by the database superuser (a row
// edited, wrapped keys swapped, a row restored from an older copy, the whole
// schema rolled back), the database down at start and while running, kill -9
// during rotations, and colcrypt-keyctl store migrate both ways. Primary,
// standby and failover: test_replica.cpp.
#include <signal.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "harness.hpp"

using namespace colcrypt::test;
using nlohmann::json;

namespace {

// keyd-start flags of every sandbox here (keyd-start must repeat them).
Env store_db_env(bool with_db = true) {
  Env env = {{"SANDBOX_KEYD_ARGS",
              "--database @DATABASE@ --job-poll-interval-ms 200 --retire-grace-seconds 0"}};
  if (with_db) env.push_back({"SANDBOX_KEYD_STORE_DB", "dbname=postgres user=postgres"});
  return env;
}

// A sandbox whose keyd keeps its store in the sandbox's own database.
void switch_to_store_db(Sandbox& s) {
  s.must("keyd-stop");
  s.must("keyd-start", store_db_env());
}

json keyctl_json(const Sandbox& s, const std::vector<std::string>& args) {
  std::vector<std::string> argv = {"--json"};
  argv.insert(argv.end(), args.begin(), args.end());
  CommandResult r = s.keyctl(argv);
  INFO("keyctl " << args.front() << ": " << r.output);
  REQUIRE(r.exit_code == 0);
  return json::parse(r.output);
}

void keyctl_ok(const Sandbox& s, const std::vector<std::string>& args) {
  CommandResult r = s.keyctl(args);
  INFO("keyctl " << args.front() << ": " << r.output);
  REQUIRE(r.exit_code == 0);
}

std::string audit_log(const Sandbox& s) { return read_file(s.dir() + "/keyd-state/audit.log"); }

// Restarts keyd on the database store; returns sandbox.sh's outcome.
CommandResult restart_keyd(const Sandbox& s) {
  s.run("keyd-stop");
  return s.run("keyd-start", store_db_env());
}

std::string store_db_conninfo(const Sandbox& s) {
  return "host=" + s.dir() + "/pgsock port=" + std::to_string(s.port()) +
         " dbname=postgres user=postgres";
}

}  // namespace

TEST_CASE("store-db: the whole lifecycle on the database, across restarts", "[storedb]") {
  Sandbox s(Sandbox::Options{true, store_db_env(false)});
  switch_to_store_db(s);
  CHECK(s.keyd_log().find("initialized a new key store in database") != std::string::npos);
  s.create_extension();
  PgConn pg(s.conninfo());

  // Only keyd's role (here the superuser) may use the schema.
  CHECK(pg.value("SELECT has_schema_privilege('public', 'colcrypt_keyd', 'USAGE')") == "f");
  CHECK(pg.value("SELECT count(*) FROM pg_tables WHERE schemaname = 'colcrypt_keyd'") == "3");

  keyctl_ok(s, {"create", "dbkey"});
  pg.value("CREATE TABLE t (id int PRIMARY KEY, v colcrypt.encrypted NOT NULL)");
  pg.value(
      "INSERT INTO t SELECT g, colcrypt.encrypt_field('v' || g, 'dbkey') FROM "
      "generate_series(1, 200) g");
  keyctl_ok(s, {"rotate", "dbkey"});
  CHECK(pg.value("SELECT count(*) FROM colcrypt_keyd.versions") == "2");
  CHECK(pg.value("SELECT state FROM colcrypt_keyd.versions WHERE version = 2") == "active");
  // The wrapped key bytes are exactly the file store's: nonce, key, tag.
  CHECK(pg.value("SELECT min(length(wrapped)) FROM colcrypt_keyd.versions") == "60");

  // A re-encryption job moves every row to version 2; then v1 can go.
  keyctl_ok(s, {"reencrypt", "dbkey", "--wait"});
  keyctl_ok(s, {"disable", "dbkey", "--version", "1"});
  CHECK(pg.value("SELECT state FROM colcrypt_keyd.versions WHERE version = 1") == "disabled");
  keyctl_ok(s, {"enable", "dbkey", "--version", "1"});
  keyctl_ok(s, {"destroy", "dbkey", "--version", "1"});
  CHECK(pg.value("SELECT wrapped IS NULL FROM colcrypt_keyd.versions WHERE version = 1") == "t");
  CHECK(pg.value("SELECT count(*) FROM t WHERE colcrypt.decrypt_field(v) <> 'v' || id") == "0");

  // Usage leases are in the database before a key goes out.
  const std::string before = pg.value(
      "SELECT (body::json->>'usage_count')::bigint FROM colcrypt_keyd.versions WHERE version = 2");
  pg.value("INSERT INTO t VALUES (1000, colcrypt.encrypt_field('x', 'dbkey'))");
  pg.value("DISCARD ALL");
  const std::string after = pg.value(
      "SELECT (body::json->>'usage_count')::bigint FROM colcrypt_keyd.versions WHERE version = 2");
  CHECK(std::stoll(after) >= std::stoll(before));

  // A restart reads it all back from the tables, verified.
  REQUIRE(restart_keyd(s).exit_code == 0);
  json shown = keyctl_json(s, {"show", "dbkey"});
  CHECK(shown["primary_version"] == 2);
  CHECK(shown["versions"][0]["state"] == "destroyed");
  CHECK(pg.value("SELECT count(*) FROM t WHERE colcrypt.decrypt_field(v) <> 'v' || id AND id < "
                 "1000") == "0");
  json status = keyctl_json(s, {"status"});
  CHECK(status["read_only"] == false);
  CHECK(status["store"].get<std::string>().find("database") == 0);
  // (timeline, generation): the sandbox's database never left timeline 1.
  CHECK(read_file(s.dir() + "/keyd-state/store-generation")
            .rfind("timeline 1 generation " + pg.value("SELECT generation FROM colcrypt_keyd.meta"),
                   0) == 0);

  // Key tables dropped: not a new, empty store (the keys would be gone for
  // good), but a refusal naming the generation this keyd has seen.
  s.run("keyd-stop");
  pg.value("DROP SCHEMA colcrypt_keyd CASCADE");
  CommandResult dropped = s.run("keyd-start", store_db_env());
  INFO(dropped.output);
  CHECK(dropped.exit_code == 65);
  CHECK(dropped.output.find("the key tables were dropped") != std::string::npos);
  CHECK(pg.value("SELECT count(*) FROM pg_namespace WHERE nspname = 'colcrypt_keyd'") == "0");
}

TEST_CASE("store-db: rows tampered by the database superuser are refused and audited",
          "[storedb][tamper]") {
  Sandbox s(Sandbox::Options{true, store_db_env(false)});
  switch_to_store_db(s);
  PgConn pg(s.conninfo());
  keyctl_ok(s, {"create", "tk"});
  keyctl_ok(s, {"rotate", "tk"});
  const std::string id = pg.value("SELECT key_id FROM colcrypt_keyd.keys");

  auto refused_with = [&](const std::string& expected) {
    CommandResult r = restart_keyd(s);
    INFO(r.output);
    CHECK(r.exit_code == 65);
    CHECK(r.output.find(expected) != std::string::npos);
  };
  auto accepted_again = [&] {
    CommandResult r = restart_keyd(s);
    INFO(r.output);
    REQUIRE(r.exit_code == 0);
    // The refused start is in the audit log (chained at the next unlock).
    CHECK(audit_log(s).find("store-corrupt") != std::string::npos);
  };

  SECTION("a state flipped by UPDATE") {
    pg.value("UPDATE colcrypt_keyd.versions SET state = 'active' WHERE version = 1");
    refused_with("the row of version 1 of key 'tk' does not verify");
    pg.value("UPDATE colcrypt_keyd.versions SET state = 'decrypt-only' WHERE version = 1");
    accepted_again();
  }
  SECTION("wrapped key bytes swapped between two versions") {
    pg.value(
        "UPDATE colcrypt_keyd.versions a SET wrapped = b.wrapped FROM colcrypt_keyd.versions b "
        "WHERE a.version = 1 AND b.version = 2");
    refused_with("the row of version 1 of key 'tk' does not verify");
  }
  SECTION("a version row deleted and re-inserted from an older copy") {
    pg.value("CREATE TABLE old_row AS SELECT * FROM colcrypt_keyd.versions WHERE version = 1");
    keyctl_ok(s, {"disable", "tk", "--version", "1"});
    pg.value("DELETE FROM colcrypt_keyd.versions WHERE version = 1");
    pg.value("INSERT INTO colcrypt_keyd.versions SELECT * FROM old_row");
    refused_with("the row of version 1 of key 'tk' is not the one keyd last wrote");
  }
  SECTION("a version row deleted") {
    pg.value("DELETE FROM colcrypt_keyd.versions WHERE version = 2");
    refused_with("the row of version 2 of key 'tk' is missing");
  }
  SECTION("a row moved to another key id") {
    keyctl_ok(s, {"create", "other"});
    pg.value(
        "UPDATE colcrypt_keyd.versions SET key_id = (SELECT key_id FROM colcrypt_keyd.keys "
        "WHERE name = 'other') WHERE key_id = '" +
        id + "' AND version = 2");
    refused_with("does not verify");
  }
  SECTION("the whole schema rolled back to an older pg_dump") {
    const std::string dump = s.dir() + "/pgsock/keys.sql";  // postgres writes it
    CommandResult d =
        run_command({"su", "postgres", "-c",
                     "/usr/lib/postgresql/15/bin/pg_dump -h " + s.dir() + "/pgsock -p " +
                         std::to_string(s.port()) + " -n colcrypt_keyd -f " + dump + " postgres"});
    INFO(d.output);
    REQUIRE(d.exit_code == 0);
    keyctl_ok(s, {"rotate", "tk"});
    pg.value("DROP SCHEMA colcrypt_keyd CASCADE");
    CommandResult restore =
        run_command({"su", "postgres", "-c",
                     "/usr/lib/postgresql/15/bin/psql -q -v ON_ERROR_STOP=1 -h " + s.dir() +
                         "/pgsock -p " + std::to_string(s.port()) + " -f " + dump + " postgres"});
    INFO(restore.output);
    REQUIRE(restore.exit_code == 0);
    // On the same timeline (no promotion in between): a rollback.
    refused_with("the key tables were rolled back to an older copy");
    CHECK(read_file(s.dir() + "/keyd-state/store-generation").rfind("timeline 1 ", 0) == 0);
  }
  SECTION("a state file from before timelines (\"generation N\")") {
    const std::string state = s.dir() + "/keyd-state/store-generation";
    const auto write_file = [](const std::string& path, const std::string& text) {
      std::ofstream(path, std::ios::trunc) << text;  // keeps keyd's ownership of the file
    };
    const int64_t generation = std::stoll(pg.value("SELECT generation FROM colcrypt_keyd.meta"));
    // An unknown timeline is no proof of a promotion: an older generation stays refused.
    write_file(state, "generation " + std::to_string(generation + 1) + "\n");
    refused_with("the key tables were rolled back to an older copy");
    write_file(state, "generation " + std::to_string(generation) + "\n");
    accepted_again();
    CHECK(read_file(state) == "timeline 1 generation " + std::to_string(generation) + "\n");
  }
}

TEST_CASE("store-db: the database down at start, and lost while keyd runs", "[storedb][down]") {
  Sandbox s(Sandbox::Options{true, store_db_env(false)});
  switch_to_store_db(s);
  keyctl_ok(s, {"create", "dk"});
  s.must("keyd-stop");
  s.must("pg-stop");
  {
    CommandResult r = s.run("keyd-start", store_db_env());
    INFO(r.output);
    CHECK(r.exit_code == 75);
    CHECK(r.output.find("cannot reach the key database") != std::string::npos);
  }
  s.must("pg-start");
  s.must("keyd-start", store_db_env());
  s.must("pg-stop");
  // Admin requests fail clearly while the database is away; loaded keys stay listed.
  CommandResult r = s.keyctl({"create", "dk2"});
  INFO(r.output);
  CHECK(r.exit_code != 0);
  CHECK(r.output.find("key database") != std::string::npos);
  CHECK(keyctl_json(s, {"show", "dk"})["primary_version"] == 1);
  s.must("pg-start");
  // keyd reconnects with a bounded backoff (at most 5 s between attempts).
  bool created = false;
  for (int i = 0; i < 100 && !created; ++i) {
    created = s.keyctl({"create", "dk2"}).exit_code == 0;
    if (!created) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  CHECK(created);
}

TEST_CASE("store-db: kill -9 of keyd during rotations leaves a consistent store",
          "[storedb][kill9]") {
  Sandbox s(Sandbox::Options{true, store_db_env(false)});
  switch_to_store_db(s);
  keyctl_ok(s, {"create", "ck"});
  PgConn pg(s.conninfo());
  for (int round = 0; round < 6; ++round) {
    const int before = keyctl_json(s, {"show", "ck"})["primary_version"].get<int>();
    const pid_t pid = s.keyd_pid();
    std::thread rotate([&] { s.keyctl({"rotate", "ck"}); });
    std::this_thread::sleep_for(std::chrono::milliseconds(round * 3));
    ::kill(pid, SIGKILL);
    rotate.join();
    s.run("keyd-stop");  // reaps the pid file
    CommandResult r = s.run("keyd-start", store_db_env());
    INFO("round " << round << ": " << r.output);
    REQUIRE(r.exit_code == 0);
    json shown = keyctl_json(s, {"show", "ck"});
    const int after = shown["primary_version"].get<int>();
    CHECK((after == before || after == before + 1));
    // A version published but not yet primary is decrypt-only: never lost.
    CHECK(pg.value("SELECT count(*) FROM colcrypt_keyd.versions") ==
          std::to_string(shown["versions"].size()));
  }
}

TEST_CASE("store migrate: file store to database and back", "[storedb][migrate]") {
  Sandbox s(Sandbox::Options{true, store_db_env(false)});
  s.create_extension();
  keyctl_ok(s, {"create", "mk"});
  keyctl_ok(s, {"rotate", "mk"});
  PgConn pg(s.conninfo());
  pg.value("CREATE TABLE m (id int, v colcrypt.encrypted)");
  pg.value("INSERT INTO m VALUES (1, colcrypt.encrypt_field('secret one', 'mk'))");
  const std::string password = s.dir() + "/master-password";
  const std::string db = store_db_conninfo(s);
  const Env no_env_password = {{"ENCRYPTION_MASTER_PASSWORD", std::nullopt}};

  // Refused while a keyd holds the file store.
  CommandResult busy = run_command({COLCRYPT_KEYCTL_BIN, "store", "migrate", "--from",
                                    s.store_dir(), "--to-db", db, "--password-file", password},
                                   no_env_password);
  INFO(busy.output);
  CHECK(busy.exit_code != 0);
  CHECK(busy.output.find("in use by another colcrypt-keyd") != std::string::npos);
  CHECK(pg.value("SELECT to_regnamespace('colcrypt_keyd') IS NULL") == "t");

  s.must("keyd-stop");
  CommandResult to_db = run_command({COLCRYPT_KEYCTL_BIN, "store", "migrate", "--from",
                                     s.store_dir(), "--to-db", db, "--password-file", password},
                                    no_env_password);
  INFO(to_db.output);
  REQUIRE(to_db.exit_code == 0);
  CHECK(to_db.output.find("copied 1 keys") != std::string::npos);
  // A second copy into the same database is refused.
  CommandResult again = run_command({COLCRYPT_KEYCTL_BIN, "store", "migrate", "--from",
                                     s.store_dir(), "--to-db", db, "--password-file", password},
                                    no_env_password);
  CHECK(again.exit_code == 2);
  CHECK(again.output.find("already holds a key store") != std::string::npos);

  s.must("keyd-start", store_db_env());
  pg.value("DISCARD ALL");
  CHECK(pg.value("SELECT colcrypt.decrypt_field(v) FROM m") == "secret one");
  pg.value("INSERT INTO m VALUES (2, colcrypt.encrypt_field('secret two', 'mk'))");
  s.must("keyd-stop");

  const std::string back = s.dir() + "/store-back";
  CommandResult to_dir = run_command({COLCRYPT_KEYCTL_BIN, "store", "migrate", "--from-db", db,
                                      "--to", back, "--password-file", password},
                                     no_env_password);
  INFO(to_dir.output);
  REQUIRE(to_dir.exit_code == 0);
  // The copy is a file store keyd opens: put it in the sandbox's place.
  REQUIRE(run_command({"mv", s.store_dir(), s.dir() + "/store-orig"}).exit_code == 0);
  REQUIRE(run_command({"mv", back, s.store_dir()}).exit_code == 0);
  s.must("keyd-start", store_db_env(false));
  pg.value("DISCARD ALL");
  CHECK(pg.value("SELECT string_agg(colcrypt.decrypt_field(v), ',' ORDER BY id) FROM m") ==
        "secret one,secret two");
  CHECK(keyctl_json(s, {"show", "mk"})["primary_version"] == 2);
}
