// keyd's database role (--database) need not be a superuser: a role with
// exactly the privileges docs/rotation.md lists counts references (status,
// the destroy check) and runs a re-encryption job to completion.
#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "harness.hpp"

using namespace colcrypt::test;
using nlohmann::json;

namespace {

json keyctl_json(const Sandbox& sandbox, const std::vector<std::string>& args) {
  std::vector<std::string> argv = {"--json"};
  argv.insert(argv.end(), args.begin(), args.end());
  CommandResult r = sandbox.keyctl(argv);
  INFO("keyctl " << args.front() << ": " << r.output);
  REQUIRE(r.exit_code == 0);
  return json::parse(r.output);
}

// The grants of docs/rotation.md ("keyd runs jobs in every database given
// with --database"), and nothing more, to role keyd_jobs for key `key`.
void grant_documented_privileges(PgConn& conn, const std::string& key) {
  conn.value("CREATE ROLE keyd_jobs LOGIN NOSUPERUSER BYPASSRLS");
  // Membership (with INHERIT) in every table owner's role.
  conn.value("GRANT app_owner TO keyd_jobs");
  conn.value("GRANT USAGE ON SCHEMA colcrypt TO keyd_jobs");
  // EXECUTE on the functions jobs and counts call (every overload).
  conn.value(
      "DO $$ DECLARE f regprocedure; BEGIN "
      "FOR f IN SELECT p.oid::regprocedure FROM pg_proc p WHERE p.pronamespace = "
      "'colcrypt'::regnamespace AND p.proname IN ('value_columns', 'key_references', "
      "'_as_table_owner', '_value_shape', '_value_typmod', '_column_context', "
      "'_json_value_path', 'try_ciphertext', 'rewrap', 'rewrap_array', 'key_id', "
      "'key_version') LOOP EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO keyd_jobs', f); "
      "END LOOP; END $$");
  conn.value(
      "GRANT SELECT, INSERT, UPDATE ON colcrypt.rotation_jobs, colcrypt.rotation_job_columns "
      "TO keyd_jobs");
  // (keyctl jobs and reencrypt --wait read the view; docs/rotation.md did not
  // list it before this test)
  conn.value("GRANT SELECT ON colcrypt.rotation_progress TO keyd_jobs");
  conn.value("GRANT TEMPORARY ON DATABASE postgres TO keyd_jobs");
  conn.value("SELECT colcrypt.grant_key('" + key + "', 'keyd_jobs', 'encrypt')");
  conn.value("SELECT colcrypt.grant_key('" + key + "', 'keyd_jobs', 'decrypt')");
}

}  // namespace

TEST_CASE("keyd's database role need not be a superuser", "[lifecycle][jobs][keyd_role]") {
  Sandbox sandbox;
  sandbox.create_extension();
  sandbox.create_key("rk");
  PgConn conn(sandbox.conninfo());

  // The application's table, owned by a role of its own, with a trigger and
  // row-level security as an application has them.
  conn.value("CREATE ROLE app_owner NOLOGIN");
  conn.value("CREATE TABLE app_data (id int PRIMARY KEY, v colcrypt.encrypted, note text)");
  conn.value(
      "INSERT INTO app_data SELECT g, colcrypt.encrypt_field('v' || g, 'rk'), 'n' FROM "
      "generate_series(1, 500) g");
  conn.value("ALTER TABLE app_data OWNER TO app_owner");
  conn.value("ALTER TABLE app_data ENABLE ROW LEVEL SECURITY");
  conn.value("CREATE POLICY only_some ON app_data USING (id < 10)");
  grant_documented_privileges(conn, "rk");
  REQUIRE(conn.value("SELECT rolsuper FROM pg_roles WHERE rolname = 'keyd_jobs'") == "f");

  // keyd with --database as that role.
  sandbox.must("keyd-stop");
  const std::string database = "postgresql:///postgres?host=" + sandbox.dir() +
                               "/pgsock&port=" + std::to_string(sandbox.port()) + "&user=keyd_jobs";
  sandbox.must("keyd-start", {{"SANDBOX_KEYD_ARGS", "--database " + database +
                                                        " --job-poll-interval-ms 200"
                                                        " --retire-grace-seconds 0"}});

  // Reference counts: status, and the destroy check refuses while rows use
  // the version.
  json status = keyctl_json(sandbox, {"status"});
  INFO("status: " << status.dump());
  REQUIRE(status["keys"].size() == 1);
  CHECK_FALSE(status["keys"][0].contains("references_error"));
  CHECK(status["keys"][0]["references"]["1"] == 500);
  REQUIRE(sandbox.keyctl({"rotate", "rk"}).exit_code == 0);
  CommandResult refused = sandbox.keyctl({"destroy", "rk", "--version", "1"});
  INFO("destroy: " << refused.output);
  CHECK(refused.exit_code == 1);
  CHECK(refused.output.find("still used by 500 rows") != std::string::npos);

  // A job to completion: every row moves to version 2, nothing skipped.
  CommandResult job = sandbox.keyctl({"reencrypt", "rk", "--wait"});
  INFO("reencrypt: " << job.output << "\nkeyd log: " << sandbox.keyd_log());
  REQUIRE(job.exit_code == 0);
  json jobs = keyctl_json(sandbox, {"jobs"})["jobs"];
  REQUIRE(jobs.size() == 1);
  CHECK(jobs[0]["state"] == "done");
  CHECK(jobs[0]["rows_done"] == 500);
  CHECK(jobs[0].value("rows_skipped", 0) == 0);
  CHECK(conn.value("SELECT count(*) FROM app_data WHERE colcrypt.key_version(v) = 2 AND "
                   "colcrypt.decrypt_field(v) = 'v' || id") == "500");

  // Counted again: version 1 is unused now, and may go.
  status = keyctl_json(sandbox, {"status"});
  CHECK(status["keys"][0]["references"].value("1", 0) == 0);
  CommandResult destroyed = sandbox.keyctl({"destroy", "rk", "--version", "1"});
  INFO("destroy: " << destroyed.output);
  CHECK(destroyed.exit_code == 0);
}
