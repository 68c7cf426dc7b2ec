// Values through a real server: text and bytea round trips over libpqxx
// parameters, NULL, empty and 100 MB values, the binary protocol, contexts,
// the plaintext-literal write path and a parallel query.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cstring>
#include <string>
#include <vector>

#include "core/bytes.hpp"
#include "core/envelope.hpp"
#include "harness.hpp"

using namespace colcrypt::test;

namespace {

// A table of its own in the shared sandbox, dropped and recreated per case.
void fresh_table(pqxx::connection& conn, const std::string& name) {
  pqxx::work tx{conn};
  tx.exec0("DROP TABLE IF EXISTS " + name);
  tx.exec0("CREATE TABLE " + name + " (id int PRIMARY KEY, v colcrypt.encrypted)");
  tx.commit();
}

}  // namespace

TEST_CASE("text values round trip through libpqxx parameters", "[values]") {
  Sandbox& sandbox = shared_sandbox();
  auto conn = sandbox.connect();
  fresh_table(conn, "text_values");
  const std::vector<std::string> values = {"123-45-6789", "", u8"ünïcødé ✓ 日本語",
                                           "quote ' backslash \\ newline \n tab \t",
                                           std::string(100000, 'x')};

  {
    pqxx::work tx{conn};
    for (size_t i = 0; i < values.size(); ++i) {
      tx.exec_params0(
          "INSERT INTO text_values VALUES ($1, colcrypt.encrypt_field($2::text, 'shared_key'))",
          int(i), values[i]);
    }
    tx.commit();
  }

  pqxx::work tx{conn};
  auto rows = tx.exec(
      "SELECT id, colcrypt.decrypt_field(v), colcrypt.ciphertext(v), colcrypt.key_version(v) "
      "FROM text_values ORDER BY id");
  REQUIRE(rows.size() == values.size());
  for (size_t i = 0; i < values.size(); ++i) {
    INFO("value " << i);
    REQUIRE_FALSE(rows[i][1].is_null());  // the empty string stays an empty string
    CHECK(rows[i][1].as<std::string>() == values[i]);
    const std::string stored = rows[i][2].as<std::string>();
    CHECK(stored.rfind("colcrypt:", 0) == 0);
    if (!values[i].empty()) CHECK(stored.find(values[i]) == std::string::npos);
    CHECK(rows[i][3].as<int>() == 1);
  }
  // Two encryptions of one value differ (fresh nonce each time: VOLATILE, not folded).
  auto twice = tx.exec1(
      "SELECT colcrypt.ciphertext(colcrypt.encrypt_field('same', 'shared_key')) <> "
      "colcrypt.ciphertext(colcrypt.encrypt_field('same', 'shared_key'))");
  CHECK(twice[0].as<bool>());
}

TEST_CASE("bytea values round trip, including every byte value and the empty value", "[values]") {
  Sandbox& sandbox = shared_sandbox();
  auto conn = sandbox.connect();
  fresh_table(conn, "bytea_values");
  std::string all_bytes;
  for (int b = 0; b < 256; ++b) all_bytes.push_back(char(b));
  const std::vector<std::string> values = {all_bytes, std::string(), std::string(1, '\0'),
                                           std::string(70000, '\xff')};
  {
    pqxx::work tx{conn};
    for (size_t i = 0; i < values.size(); ++i) {
      tx.exec_params0(
          "INSERT INTO bytea_values VALUES ($1, colcrypt.encrypt_field($2::bytea, 'shared_key'))",
          int(i), pqxx::binarystring(values[i]));
    }
    tx.commit();
  }
  pqxx::work tx{conn};
  auto rows = tx.exec("SELECT id, colcrypt.decrypt_field_bytea(v) FROM bytea_values ORDER BY id");
  REQUIRE(rows.size() == values.size());
  for (size_t i = 0; i < values.size(); ++i) {
    INFO("value " << i);
    REQUIRE_FALSE(rows[i][1].is_null());
    CHECK(pqxx::binarystring(rows[i][1]).str() == values[i]);
  }
}

TEST_CASE("NULL in gives NULL out", "[values]") {
  Sandbox& sandbox = shared_sandbox();
  auto conn = sandbox.connect();
  pqxx::work tx{conn};
  auto row = tx.exec_params1(
      "SELECT colcrypt.encrypt_field($1::text, 'shared_key') IS NULL, "
      "colcrypt.encrypt_field($1::bytea, 'shared_key') IS NULL, "
      "colcrypt.decrypt_field(NULL::colcrypt.encrypted) IS NULL, "
      "colcrypt.decrypt_field_bytea(NULL::colcrypt.encrypted) IS NULL, "
      "colcrypt.key_version(NULL::colcrypt.encrypted) IS NULL",
      nullptr);
  for (int col = 0; col < 5; ++col) {
    INFO("column " << col);
    CHECK(row[col].as<bool>());
  }
}

TEST_CASE("a 100 MB value round trips through libpqxx parameters", "[values][large]") {
  Sandbox& sandbox = shared_sandbox();
  auto conn = sandbox.connect();
  fresh_table(conn, "large_values");
  std::string big(100u << 20, '\0');
  for (size_t i = 0; i < big.size(); ++i) big[i] = char('a' + (i * 7919 + i / 4099) % 26);
  {
    pqxx::work tx{conn};
    tx.exec_params0(
        "INSERT INTO large_values VALUES (1, colcrypt.encrypt_field($1::text, 'shared_key'))", big);
    tx.commit();
  }
  pqxx::work tx{conn};
  auto row = tx.exec1(
      "SELECT colcrypt.decrypt_field(v), octet_length(colcrypt.ciphertext(v)) FROM large_values "
      "WHERE id = 1");
  const pqxx::field plain = row[0];
  REQUIRE(plain.size() == big.size());
  CHECK(std::memcmp(plain.c_str(), big.data(), big.size()) == 0);
  // The stored text form is the base64 of header + ciphertext + tag.
  CHECK(row[1].as<size_t>() == colcrypt::text_size(colcrypt::sealed_size(big.size())));
}

TEST_CASE("the binary protocol round trips an encrypted value", "[values][binary]") {
  Sandbox& sandbox = shared_sandbox();
  PgConn conn(sandbox.conninfo());
  conn.value("DROP TABLE IF EXISTS binary_values");
  conn.value("CREATE TABLE binary_values (id int PRIMARY KEY, v colcrypt.encrypted)");
  conn.value(
      "INSERT INTO binary_values VALUES (1, colcrypt.encrypt_field('binary round trip', "
      "'shared_key'))");
  const Oid type_oid = Oid(std::stoul(conn.value("SELECT 'colcrypt.encrypted'::regtype::oid")));

  // Fetch the value in binary format (typsend).
  std::unique_ptr<PGresult, decltype(&PQclear)> fetched(
      PQexecParams(conn.get(), "SELECT v FROM binary_values WHERE id = 1", 0, nullptr, nullptr,
                   nullptr, nullptr, 1),
      &PQclear);
  REQUIRE(PQresultStatus(fetched.get()) == PGRES_TUPLES_OK);
  REQUIRE(PQfformat(fetched.get(), 0) == 1);
  const std::string wire(PQgetvalue(fetched.get(), 0, 0), size_t(PQgetlength(fetched.get(), 0, 0)));
  REQUIRE(wire.size() == colcrypt::sealed_size(std::strlen("binary round trip")));

  // Send bytes back in binary format (typreceive) and report the outcome.
  auto insert_binary = [&](int id, const std::string& bytes) {
    const std::string id_text = std::to_string(id);
    const char* values[2] = {id_text.c_str(), bytes.data()};
    const int lengths[2] = {0, int(bytes.size())};
    const int formats[2] = {0, 1};
    const Oid types[2] = {23 /* int4 */, type_oid};
    std::unique_ptr<PGresult, decltype(&PQclear)> res(
        PQexecParams(conn.get(), "INSERT INTO binary_values VALUES ($1, $2)", 2, types, values,
                     lengths, formats, 0),
        &PQclear);
    if (PQresultStatus(res.get()) == PGRES_COMMAND_OK) return std::string();
    const char* state = PQresultErrorField(res.get(), PG_DIAG_SQLSTATE);
    return std::string(state ? state : "?????");
  };

  REQUIRE(insert_binary(2, wire).empty());
  CHECK(conn.value("SELECT colcrypt.decrypt_field(v) FROM binary_values WHERE id = 2") ==
        "binary round trip");
  CHECK(conn.value("SELECT (SELECT colcrypt.ciphertext(v) FROM binary_values WHERE id = 1) = "
                   "(SELECT colcrypt.ciphertext(v) FROM binary_values WHERE id = 2)") == "t");

  SECTION("recv rejects a malformed header") {
    std::string bad = wire;
    bad[0] = char(0x7f);  // unknown format version
    CHECK(insert_binary(3, bad) == "22P03");
    CHECK(insert_binary(4, wire.substr(0, 20)) == "22P03");  // truncated
  }
  SECTION("a tampered tag is accepted by recv but never decrypts") {
    std::string bad = wire;
    bad.back() = char(bad.back() ^ 0x01);
    REQUIRE(insert_binary(5, bad).empty());
    auto outcome = conn.exec("SELECT colcrypt.decrypt_field(v) FROM binary_values WHERE id = 5");
    CHECK(outcome.sqlstate == "39000");
    CHECK(outcome.message.find("binary round trip") == std::string::npos);
  }
}

TEST_CASE("the context is authenticated", "[values]") {
  Sandbox& sandbox = shared_sandbox();
  PgConn conn(sandbox.conninfo());
  conn.value("DROP TABLE IF EXISTS context_values");
  conn.value(
      "CREATE TABLE context_values AS SELECT colcrypt.encrypt_field('tenant secret', "
      "'shared_key', 'tenant-a') AS v");
  CHECK(conn.value("SELECT colcrypt.decrypt_field(v, 'tenant-a') FROM context_values") ==
        "tenant secret");
  for (const char* sql : {"SELECT colcrypt.decrypt_field(v, 'tenant-b') FROM context_values",
                          "SELECT colcrypt.decrypt_field(v) FROM context_values"}) {
    INFO(sql);
    auto outcome = conn.exec(sql);
    CHECK(outcome.sqlstate == "39000");
    CHECK(outcome.message == "decryption failed");
  }
}

TEST_CASE("plaintext never reaches an encrypted column", "[values]") {
  Sandbox& sandbox = shared_sandbox();
  PgConn conn(sandbox.conninfo());
  conn.value("DROP TABLE IF EXISTS literal_values");
  conn.value("CREATE TABLE literal_values (v colcrypt.encrypted)");
  auto literal = conn.exec("INSERT INTO literal_values VALUES ('123-45-6789')");
  CHECK(literal.sqlstate == "22P02");
  auto cast =
      conn.exec("INSERT INTO literal_values VALUES ('123-45-6789'::text::colcrypt.encrypted)");
  CHECK_FALSE(cast.sqlstate.empty());
  CHECK(conn.value("SELECT count(*) FROM literal_values") == "0");
}

TEST_CASE("a parallel query with 2 workers decrypts every row", "[values][parallel]") {
  Sandbox& sandbox = shared_sandbox();
  PgConn conn(sandbox.conninfo());
  conn.value("DROP TABLE IF EXISTS parallel_values");
  conn.value(
      "CREATE TABLE parallel_values AS SELECT g AS id, "
      "colcrypt.encrypt_field('value-' || g, 'shared_key') AS v FROM generate_series(1, 20000) g");
  conn.value("ANALYZE parallel_values");
  // Workers do all the scanning (the leader does not participate), so every
  // row is decrypted by a worker that fetched the key from keyd itself.
  conn.value(
      "SET max_parallel_workers_per_gather = 2; SET parallel_setup_cost = 0; "
      "SET parallel_tuple_cost = 0; SET min_parallel_table_scan_size = 0; "
      "SET parallel_leader_participation = off");
  const std::string query =
      "SELECT count(*) FROM parallel_values WHERE colcrypt.decrypt_field(v) = 'value-' || id";
  auto plan = conn.exec("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) " + query);
  REQUIRE(plan.sqlstate.empty());
  std::string plan_text;
  for (const auto& row : plan.rows) plan_text += row[0].value_or("") + "\n";
  INFO(plan_text);
  CHECK(plan_text.find("Parallel Seq Scan") != std::string::npos);
  CHECK(plan_text.find("Workers Launched: 2") != std::string::npos);
  CHECK(conn.value(query) == "20000");
}
