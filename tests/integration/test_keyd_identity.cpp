// Who serves keyd's socket: colcrypt.keyd_uid in the extension and
// colcrypt-keyctl --keyd-uid refuse a socket served by another uid (SO_PEERCRED).
// The sandboxes' keyd runs as root, which both trust by default. The unit
// tests (test_keystore_client.cpp) cover the client's rules with fake keyds of
// other uids and check that nothing is sent to a refused one.
#include <catch2/catch.hpp>
#include <string>

#include "harness.hpp"

using namespace colcrypt::test;

TEST_CASE("colcrypt.keyd_uid: keyd must run as the configured uid", "[keyd][peer][keyd_uid]") {
  Sandbox& sandbox = shared_sandbox();
  PgConn conn(sandbox.conninfo());
  conn.value("SET colcrypt.key_cache_ttl = 0");  // every call asks keyd
  const std::string roundtrip =
      "SELECT colcrypt.decrypt_field(colcrypt.encrypt_field('x', 'shared_key'))";

  // Unset: root (the sandbox's keyd) is trusted.
  CHECK(conn.value(roundtrip) == "x");
  CHECK(conn.value("SHOW colcrypt.keyd_uid").empty());  // (known once the library is loaded)

  // keyd runs as root, not as postgres: refused, 58000 as for a keyd that is
  // not there.
  conn.value("SET colcrypt.keyd_uid = '" + postgres_uid() + "'");
  PgConn::Outcome refused = conn.exec("SELECT colcrypt.encrypt_field('x', 'shared_key')");
  CHECK(refused.sqlstate == "58000");
  CHECK(refused.message == "refusing colcrypt-keyd at \"" + sandbox.keyd_socket() +
                               "\": it runs as an unexpected user");
  // The detail names both uids.
  PgConn::Outcome detail = conn.exec(
      "DO $$ BEGIN PERFORM colcrypt.encrypt_field('x', 'shared_key'); EXCEPTION WHEN OTHERS THEN "
      "DECLARE d text; BEGIN GET STACKED DIAGNOSTICS d = PG_EXCEPTION_DETAIL; "
      "RAISE EXCEPTION '%', d; END; END $$");
  CHECK(detail.message == "colcrypt-keyd's socket " + sandbox.keyd_socket() +
                              " is served by uid 0, not by the expected keyd uid " +
                              postgres_uid());

  // keyd's real uid, by number or by name.
  conn.value("SET colcrypt.keyd_uid = '0'");
  CHECK(conn.value(roundtrip) == "x");
  conn.value("SET colcrypt.keyd_uid = 'root'");
  CHECK(conn.value("SHOW colcrypt.keyd_uid") == "root");
  CHECK(conn.value(roundtrip) == "x");
  conn.value("RESET colcrypt.keyd_uid");
  CHECK(conn.value(roundtrip) == "x");

  // Values that are no uid: refused when set.
  CHECK(conn.exec("SET colcrypt.keyd_uid = 'no_such_user_colcrypt'").sqlstate == "22023");
  CHECK(conn.exec("SET colcrypt.keyd_uid = '4294967295'").sqlstate == "22023");
  CHECK(conn.exec("SET colcrypt.keyd_uid = '12x'").sqlstate == "22023");

  // Only a superuser sets it.
  conn.value("DROP ROLE IF EXISTS keyd_uid_tester");
  conn.value("CREATE ROLE keyd_uid_tester");
  conn.value("SET ROLE keyd_uid_tester");
  CHECK(conn.exec("SET colcrypt.keyd_uid = '0'").sqlstate == "42501");
  conn.value("RESET ROLE");
  conn.value("DROP ROLE keyd_uid_tester");
}

TEST_CASE("keyctl --keyd-uid: keyd must run as that uid", "[keyd][peer][keyd_uid][keyctl]") {
  Sandbox& sandbox = shared_sandbox();
  CommandResult wrong = sandbox.keyctl({"--keyd-uid", postgres_uid(), "list"});
  INFO("keyctl: " << wrong.output);
  CHECK(wrong.exit_code == 3);  // cannot reach the keyd it may talk to
  CHECK(wrong.output.find("is served by uid 0, not by the expected keyd uid " + postgres_uid()) !=
        std::string::npos);
  CHECK(sandbox.keyctl({"--keyd-uid", "root", "list"}).exit_code == 0);
  CHECK(sandbox.keyctl({"--keyd-uid", "0", "list"}).exit_code == 0);
  CHECK(sandbox.keyctl({"--keyd-uid", "no_such_user_colcrypt", "list"}).exit_code == 2);
}
