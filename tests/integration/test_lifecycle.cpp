// Key lifecycle (issue 3): rotation across restarts, usage caps under
// concurrent backends, time-based rotation, destroy refused while referenced
// and crypto-shredding, online re-encryption jobs under concurrent writers and
// kill -9, SQL rotation, and the audit trail.
//
// The re-encryption test runs on the 1 million rows (about 30 s on 2
// cores); COLCRYPT_LIFECYCLE_ROWS changes the size.
#include <signal.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "harness.hpp"

using namespace colcrypt::test;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

// Flags every lifecycle sandbox's keyd gets (keyd-start must repeat them).
Env lifecycle_env(const std::string& extra = "") {
  return {{"SANDBOX_KEYD_ARGS", "--database @DATABASE@ --job-poll-interval-ms 200 " + extra}};
}

// keyd flag for tests that disable or destroy a version right after its
// rotation (the default grace is a day: docs/rotation.md).
const std::string kNoRetireGrace = "--retire-grace-seconds 0";

Sandbox::Options lifecycle_options(const std::string& extra = "") {
  Sandbox::Options o;
  o.env = lifecycle_env(extra);
  return o;
}

json keyctl_json(const Sandbox& sandbox, const std::vector<std::string>& args) {
  std::vector<std::string> argv = {"--json"};
  argv.insert(argv.end(), args.begin(), args.end());
  CommandResult r = sandbox.keyctl(argv);
  INFO("keyctl " << args.front() << ": " << r.output);
  REQUIRE(r.exit_code == 0);
  return json::parse(r.output);
}

void create_key(const Sandbox& sandbox, const std::string& name,
                const std::vector<std::string>& options = {}) {
  std::vector<std::string> args = {"create", name};
  args.insert(args.end(), options.begin(), options.end());
  CommandResult r = sandbox.keyctl(args);
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
}

int primary_version(const Sandbox& sandbox, const std::string& name) {
  return keyctl_json(sandbox, {"show", name})["primary_version"].get<int>();
}

int64_t as_int(const std::string& text) { return text.empty() ? 0 : std::stoll(text); }

// Waits until every job is finished; returns the jobs' final rows.
json wait_for_jobs(const Sandbox& sandbox, double timeout_s) {
  const auto start = Clock::now();
  for (;;) {
    json jobs = keyctl_json(sandbox, {"jobs"})["jobs"];
    bool active = false;
    for (const auto& j : jobs) {
      const std::string state = j["state"];
      active = active || state == "pending" || state == "running";
    }
    if (!active) return jobs;
    if (std::chrono::duration<double>(Clock::now() - start).count() > timeout_s) {
      FAIL("jobs still running after " << timeout_s << " s: " << jobs.dump());
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
}

// Fills t(id, v) with n values 'v<id>' under key; returns the checksum of the plaintexts.
std::string fill_table(PgConn& conn, const std::string& key, int64_t n) {
  conn.value("CREATE TABLE t (id bigint PRIMARY KEY, v colcrypt.encrypted NOT NULL)");
  conn.value("INSERT INTO t SELECT g, colcrypt.encrypt_field('v' || g, '" + key +
             "') FROM generate_series(1, " + std::to_string(n) + ") g");
  return conn.value(
      "SELECT md5(string_agg(colcrypt.decrypt_field(v), ',' ORDER BY id)) FROM t WHERE id <= " +
      std::to_string(n));
}

// Every row decrypts to its own plaintext, the original rows' checksum is
// unchanged, and no row is left under a version older than target.
void check_rows(PgConn& conn, int64_t n, const std::string& checksum, int target) {
  CHECK(conn.value("SELECT count(*) FROM t WHERE colcrypt.decrypt_field(v) <> 'v' || id") == "0");
  CHECK(conn.value("SELECT md5(string_agg(colcrypt.decrypt_field(v), ',' ORDER BY id)) FROM t "
                   "WHERE id <= " +
                   std::to_string(n)) == checksum);
  CHECK(conn.value("SELECT count(*) FROM t WHERE id <= " + std::to_string(n)) == std::to_string(n));
  CHECK(conn.value("SELECT count(*) FROM t WHERE colcrypt.key_version(v) < " +
                   std::to_string(target)) == "0");
}

// Writers: insert new rows and re-encrypt existing ones (same plaintext)
// until stopped; count their errors.
class Writers {
 public:
  Writers(const Sandbox& sandbox, const std::string& key, int64_t existing, int threads) {
    for (int w = 0; w < threads; ++w) {
      threads_.emplace_back([this, &sandbox, key, existing, w] {
        try {
          pqxx::connection conn{sandbox.conninfo()};
          // Backends learn of a new primary within the cache TTL; keep it short.
          pqxx::nontransaction(conn).exec("SET colcrypt.key_cache_ttl = 2");
          int64_t next_id = existing + 1000000000LL * (w + 1);
          unsigned seed = 12345u + static_cast<unsigned>(w);
          while (!stop_) {
            try {
              pqxx::work tx(conn);
              tx.exec_params(
                  "INSERT INTO t VALUES ($1::bigint,"
                  " colcrypt.encrypt_field('v' || $1::bigint::text, $2))",
                  next_id++, key);
              const int64_t id = 1 + static_cast<int64_t>(rand_r(&seed)) % existing;
              tx.exec_params(
                  "UPDATE t SET v = colcrypt.encrypt_field('v' || id::text, $2) WHERE id = "
                  "$1::bigint",
                  id, key);
              tx.commit();
              ++writes_;
            } catch (const pqxx::broken_connection&) {
              throw;
            } catch (const std::exception& e) {
              ++errors_;
              last_error_ = e.what();
            }
          }
        } catch (const std::exception& e) {
          ++errors_;
          last_error_ = e.what();
        }
      });
    }
  }
  ~Writers() { stop(); }
  void stop() {
    stop_ = true;
    for (auto& t : threads_) {
      if (t.joinable()) t.join();
    }
  }
  int64_t writes() const { return writes_; }
  int64_t errors() const { return errors_; }
  std::string last_error() const { return last_error_; }

 private:
  std::vector<std::thread> threads_;
  std::atomic<bool> stop_{false};
  std::atomic<int64_t> writes_{0};
  std::atomic<int64_t> errors_{0};
  std::string last_error_;
};

int64_t rows_from_env(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::stoll(v) : fallback;
}

void reencrypt_under_writers(int64_t n) {
  Sandbox sandbox(lifecycle_options());
  sandbox.create_extension();
  create_key(sandbox, "bulk", {"--max-uses", "2147483648"});
  PgConn conn(sandbox.conninfo());
  const auto t0 = Clock::now();
  const std::string checksum = fill_table(conn, "bulk", n);
  WARN("filled " << n << " rows in " << std::chrono::duration<double>(Clock::now() - t0).count()
                 << " s");
  REQUIRE(sandbox.keyctl({"rotate", "bulk"}).exit_code == 0);

  Writers writers(sandbox, "bulk", n, 2);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const auto t1 = Clock::now();
  CommandResult started = sandbox.keyctl({"reencrypt", "bulk", "--batch-blocks", "128"});
  INFO(started.output);
  REQUIRE(started.exit_code == 0);
  json jobs = wait_for_jobs(sandbox, 600);
  writers.stop();
  WARN("re-encrypted " << n << " rows in "
                       << std::chrono::duration<double>(Clock::now() - t1).count()
                       << " s while writers made " << writers.writes() << " writes");
  REQUIRE(jobs.size() == 1);
  CHECK(jobs[0]["state"] == "done");
  // Rows the writers re-encrypted first are not the job's to do.
  CHECK(jobs[0]["rows_done"].get<int64_t>() > 0);
  CHECK(jobs[0]["rows_done"].get<int64_t>() <= n + writers.writes());
  INFO("last writer error: " << writers.last_error());
  CHECK(writers.errors() == 0);
  CHECK(writers.writes() > 0);
  check_rows(conn, n, checksum, 2);
}

}  // namespace

TEST_CASE("rotation survives restarts of keyd and of Postgres", "[lifecycle][rotation]") {
  Sandbox sandbox(lifecycle_options());
  sandbox.create_extension();
  create_key(sandbox, "rk");
  PgConn conn(sandbox.conninfo());
  conn.value("CREATE TABLE r (id int, v colcrypt.encrypted)");
  conn.value("INSERT INTO r VALUES (1, colcrypt.encrypt_field('one', 'rk'))");
  REQUIRE(sandbox.keyctl({"rotate", "rk"}).exit_code == 0);
  // A new connection (empty cache) encrypts under version 2.
  {
    PgConn fresh(sandbox.conninfo());
    fresh.value("INSERT INTO r VALUES (2, colcrypt.encrypt_field('two', 'rk'))");
  }
  // The old connection learns the new primary within its cache TTL; with a
  // TTL of 0 immediately.
  conn.value("SET colcrypt.key_cache_ttl = 0");
  conn.value("INSERT INTO r VALUES (3, colcrypt.encrypt_field('three', 'rk'))");
  CHECK(conn.value("SELECT string_agg(colcrypt.key_version(v)::text, ',' ORDER BY id) FROM r") ==
        "1,2,2");

  sandbox.must("keyd-stop");
  sandbox.must("keyd-start", lifecycle_env());
  sandbox.must("pg-restart");
  PgConn after(sandbox.conninfo());
  CHECK(after.value("SELECT string_agg(colcrypt.decrypt_field(v), ',' ORDER BY id) FROM r") ==
        "one,two,three");
  after.value("INSERT INTO r VALUES (4, colcrypt.encrypt_field('four', 'rk'))");
  CHECK(after.value("SELECT colcrypt.key_version(v) FROM r WHERE id = 4") == "2");

  // Rotate again while Postgres is down, restart both in the other order.
  sandbox.must("pg-stop");
  REQUIRE(sandbox.keyctl({"rotate", "rk"}).exit_code == 0);
  sandbox.must("keyd-kill");
  sandbox.must("keyd-start", lifecycle_env());
  sandbox.must("pg-start");
  PgConn third(sandbox.conninfo());
  third.value("INSERT INTO r VALUES (5, colcrypt.encrypt_field('five', 'rk'))");
  CHECK(third.value("SELECT string_agg(colcrypt.decrypt_field(v), ',' ORDER BY id) FROM r") ==
        "one,two,three,four,five");
  CHECK(third.value("SELECT colcrypt.key_version(v) FROM r WHERE id = 5") == "3");
}

TEST_CASE("usage cap: several backends at once, no version above its cap", "[lifecycle][usage]") {
  Sandbox sandbox(lifecycle_options());
  sandbox.create_extension();
  // The seed's demo default: 10,000 encryptions per version.
  create_key(sandbox, "capped", {"--max-uses", "10000"});
  {
    PgConn conn(sandbox.conninfo());
    conn.value("CREATE TABLE u (w int, i int, v colcrypt.encrypted)");
  }
  constexpr int kBackends = 4;
  constexpr int kPerBackend = 7000;  // 28,000 encryptions: at least two rotations
  std::vector<std::thread> threads;
  std::atomic<int> errors{0};
  for (int w = 0; w < kBackends; ++w) {
    threads.emplace_back([&, w] {
      try {
        pqxx::connection c{sandbox.conninfo()};
        for (int batch = 0; batch < kPerBackend / 500; ++batch) {
          pqxx::work tx(c);
          tx.exec_params(
              "INSERT INTO u SELECT $1, g, colcrypt.encrypt_field('x' || g, 'capped')"
              " FROM generate_series($2::int, $2::int + 499) g",
              w, batch * 500);
          tx.commit();
        }
      } catch (const std::exception&) {
        ++errors;
      }
    });
  }
  for (auto& t : threads) t.join();
  CHECK(errors == 0);
  json key = keyctl_json(sandbox, {"show", "capped"});
  CHECK(key["primary_version"].get<int>() >= 3);
  PgConn conn(sandbox.conninfo());
  CHECK(conn.value("SELECT count(*) FROM u") == std::to_string(kBackends * kPerBackend));
  for (const auto& v : key["versions"]) {
    INFO("version " << v.dump());
    CHECK(v["usage_count"].get<int64_t>() <= 10000);
    // The cap, not something earlier, retired every older version: each was
    // used up to exactly its cap before the next became primary.
    if (v["version"] != key["primary_version"]) CHECK(v["usage_count"].get<int64_t>() == 10000);
    // Rows under a version never exceed what keyd charged to it.
    const int64_t rows =
        as_int(conn.value("SELECT count(*) FROM u WHERE colcrypt.key_version(v) = " +
                          std::to_string(v["version"].get<int>())));
    CHECK(rows <= v["usage_count"].get<int64_t>());
  }
  // usage_count is the sum of what was charged; it covers every encryption.
  CHECK(key["usage_count"].get<int64_t>() >= kBackends * kPerBackend);
  CHECK_FALSE(key["last_used"].is_null());
  CHECK(sandbox.keyd_log().find("usage cap reached") != std::string::npos);
  CHECK(conn.value("SELECT count(*) FROM u WHERE colcrypt.decrypt_field(v) <> 'x' || i") == "0");
}

TEST_CASE("usage cap: lookups that never encrypt charge nothing", "[lifecycle][usage]") {
  Sandbox sandbox(lifecycle_options());
  sandbox.create_extension();
  create_key(sandbox, "looked", {"--max-uses", "10000"});
  auto usage = [&] {
    return keyctl_json(sandbox, {"show", "looked"})["usage_count"].get<int64_t>();
  };
  const std::string lookups =
      "SELECT count(DISTINCT colcrypt.blind_index('v' || g, 'looked'))"
      " + count(DISTINCT colcrypt.decrypt_deterministic("
      "colcrypt.encrypt_deterministic('v' || g, 'looked')))"
      " FROM generate_series(1, 200) g";
  // Many backends, each fetching the primary once, and one with no cache at
  // all (a fetch per call): before issue 3's fix each fetch charged a block.
  for (int i = 0; i < 20; ++i) {
    PgConn conn(sandbox.conninfo());
    CHECK(conn.value(lookups) == "400");
  }
  {
    PgConn conn(sandbox.conninfo());
    conn.value("SET colcrypt.key_cache_ttl = 0");
    CHECK(conn.value(lookups) == "400");
  }
  CHECK(usage() == 0);
  json key = keyctl_json(sandbox, {"show", "looked"});
  CHECK(key["primary_version"].get<int>() == 1);
  CHECK(key["versions"][0]["usage_count"].get<int64_t>() == 0);

  // A backend that looked the key up first still gets a real block for its
  // encryptions; rewrap of a current value is a lookup, of an old one an
  // encryption.
  PgConn conn(sandbox.conninfo());
  CHECK(conn.value("SELECT octet_length(colcrypt.blind_index('a', 'looked'))") != "");
  conn.value("CREATE TABLE lk (id int, v colcrypt.encrypted)");
  conn.value(
      "INSERT INTO lk SELECT g, colcrypt.encrypt_field('x' || g, 'looked')"
      " FROM generate_series(1, 10) g");
  const int64_t charged = usage();
  CHECK(charged >= 10);
  CHECK(charged <= 1024);
  CHECK(conn.value("SELECT count(*) FROM lk"
                   " WHERE colcrypt.ciphertext(colcrypt.rewrap(v)) = colcrypt.ciphertext(v)") ==
        "10");
  CHECK(usage() == charged);
  CommandResult r = sandbox.keyctl({"rotate", "looked"});
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  PgConn fresh(sandbox.conninfo());
  CHECK(fresh.value("SELECT count(*) FROM lk WHERE colcrypt.key_version(colcrypt.rewrap(v)) = 2") ==
        "10");
  key = keyctl_json(sandbox, {"show", "looked"});
  CHECK(key["versions"][1]["usage_count"].get<int64_t>() >= 10);
  CHECK(fresh.value("SELECT count(*) FROM lk WHERE colcrypt.decrypt_field(v) <> 'x' || id") == "0");
}

TEST_CASE("time-based rotation with a short interval", "[lifecycle][time]") {
  // A rotation "day" of 1 second, checked every second.
  Sandbox sandbox(lifecycle_options("--insecure-day-seconds 1 --rotation-check-interval 1"));
  create_key(sandbox, "timed", {"--rotation-days", "2"});
  create_key(sandbox, "slow", {"--rotation-days", "3650"});
  const auto start = Clock::now();
  while (primary_version(sandbox, "timed") < 2 &&
         std::chrono::duration<double>(Clock::now() - start).count() < 15) {
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
  }
  CHECK(primary_version(sandbox, "timed") >= 2);
  CHECK(primary_version(sandbox, "slow") == 1);
  CHECK(sandbox.keyd_log().find("(interval)") != std::string::npos);

  // ENCRYPTION_AUTO_ROTATION=off stops the scheduler.
  sandbox.must("keyd-stop");
  Env off = lifecycle_env("--insecure-day-seconds 1 --rotation-check-interval 1");
  off.push_back({"ENCRYPTION_AUTO_ROTATION", "off"});
  sandbox.must("keyd-start", off);
  const int before = primary_version(sandbox, "timed");
  std::this_thread::sleep_for(std::chrono::seconds(4));
  CHECK(primary_version(sandbox, "timed") == before);
}

TEST_CASE("destroy is refused while referenced; after destroy old values fail clearly",
          "[lifecycle][destroy]") {
  Sandbox sandbox(lifecycle_options());
  sandbox.create_extension();
  create_key(sandbox, "dk");
  PgConn conn(sandbox.conninfo());
  conn.value("CREATE TABLE d (id int, v colcrypt.encrypted)");
  conn.value("CREATE TABLE d2 (id int, w colcrypt.encrypted)");
  conn.value(
      "INSERT INTO d SELECT g, colcrypt.encrypt_field('d' || g, 'dk') FROM generate_series(1, 5) "
      "g");
  conn.value("INSERT INTO d2 VALUES (1, colcrypt.encrypt_field('x', 'dk'))");
  REQUIRE(sandbox.keyctl({"rotate", "dk"}).exit_code == 0);

  // No row uses version 1 of "gk", but it was primary a moment ago: a backend
  // may still encrypt under it from its cache, so keyd (default grace: a day)
  // refuses to destroy or disable it, and says how long to wait and why.
  create_key(sandbox, "gk");
  REQUIRE(sandbox.keyctl({"rotate", "gk"}).exit_code == 0);
  CommandResult early = sandbox.keyctl({"destroy", "gk", "--version", "1"});
  CHECK(early.exit_code == 1);
  CHECK(early.output.find("less than the retirement grace of 86400 s ago") != std::string::npos);
  CHECK(early.output.find("colcrypt.key_cache_ttl") != std::string::npos);
  CHECK(early.output.find("destroy it after") != std::string::npos);
  CHECK(sandbox.keyctl({"disable", "gk", "--version", "1"}).exit_code == 1);
  CHECK(sandbox.keyctl({"destroy", "gk", "--version", "1", "--force"}).exit_code == 0);

  CommandResult refused = sandbox.keyctl({"destroy", "dk", "--version", "1"});
  CHECK(refused.exit_code == 1);
  CHECK(refused.output.find("still used by 6 rows") != std::string::npos);
  CHECK(refused.output.find("public.d.v (5)") != std::string::npos);
  CHECK(refused.output.find("public.d2.w (1)") != std::string::npos);
  CommandResult disable = sandbox.keyctl({"disable", "dk", "--version", "1"});
  CHECK(disable.exit_code == 1);
  CHECK(disable.output.find("still used by 6 rows") != std::string::npos);
  // The primary can never be destroyed.
  CHECK(sandbox.keyctl({"destroy", "dk", "--version", "2", "--force"}).exit_code == 1);

  // status lists, per version, how many rows still use it.
  json status = keyctl_json(sandbox, {"status"});
  CHECK(status["keys"][0]["references"]["1"] == 6);

  // Disabled (forced) is reversible: values fail with 55000, then work again.
  REQUIRE(sandbox.keyctl({"disable", "dk", "--version", "1", "--force"}).exit_code == 0);
  {
    PgConn fresh(sandbox.conninfo());
    PgConn::Outcome o = fresh.exec("SELECT colcrypt.decrypt_field(v) FROM d WHERE id = 1");
    CHECK(o.sqlstate == "55000");
  }
  REQUIRE(sandbox.keyctl({"enable", "dk", "--version", "1"}).exit_code == 0);
  {
    PgConn fresh(sandbox.conninfo());
    CHECK(fresh.value("SELECT colcrypt.decrypt_field(v) FROM d WHERE id = 1") == "d1");
  }

  // Re-encrypt the first table only, then force-destroy: the other row is lost (shredded).
  // rewrap re-seals under the primary this backend knows: a fresh session
  // (or one whose colcrypt.key_cache_ttl passed) knows version 2.
  {
    PgConn fresh(sandbox.conninfo());
    fresh.value("UPDATE d SET v = colcrypt.rewrap(v)");
    // Idempotent: a second run changes nothing.
    const std::string before =
        fresh.value("SELECT string_agg(colcrypt.ciphertext(v), ',' ORDER BY id) FROM d");
    fresh.value("UPDATE d SET v = colcrypt.rewrap(v)");
    CHECK(fresh.value("SELECT string_agg(colcrypt.ciphertext(v), ',' ORDER BY id) FROM d") ==
          before);
  }
  CHECK(conn.value("SELECT count(*) FROM d WHERE colcrypt.key_version(v) = 2") == "5");
  CommandResult still = sandbox.keyctl({"destroy", "dk", "--version", "1"});
  CHECK(still.output.find("still used by 1 rows") != std::string::npos);
  REQUIRE(sandbox.keyctl({"destroy", "dk", "--version", "1", "--force"}).exit_code == 0);
  sandbox.must("pg-restart");  // no cache may hide it (nor does one survive a restart)
  PgConn after(sandbox.conninfo());
  PgConn::Outcome lost = after.exec("SELECT colcrypt.decrypt_field(w) FROM d2");
  CHECK(lost.sqlstate == "55000");
  CHECK(lost.message.find("not available") != std::string::npos);
  CHECK(after.value("SELECT string_agg(colcrypt.decrypt_field(v), ',' ORDER BY id) FROM d") ==
        "d1,d2,d3,d4,d5");
  after.value("INSERT INTO d VALUES (6, colcrypt.encrypt_field('d6', 'dk'))");
  CHECK(after.value("SELECT colcrypt.decrypt_field(v) FROM d WHERE id = 6") == "d6");
  // The key bytes are gone from the store file, and destroy cannot be undone.
  json store = json::parse(read_file(sandbox.store_file()));
  CHECK(store["keys"][0]["versions"][0]["wrapped"].is_null());
  CHECK(sandbox.keyctl({"enable", "dk", "--version", "1"}).exit_code == 1);
  // A keyd restart keeps it destroyed.
  sandbox.must("keyd-stop");
  sandbox.must("keyd-start", lifecycle_env());
  PgConn again(sandbox.conninfo());
  CHECK(again.exec("SELECT colcrypt.decrypt_field(w) FROM d2").sqlstate == "55000");
}

TEST_CASE("rotation from SQL needs keyd's --sql-rotate and EXECUTE", "[lifecycle][sql]") {
  Sandbox sandbox(lifecycle_options());
  sandbox.create_extension();
  create_key(sandbox, "sk");
  PgConn conn(sandbox.conninfo());
  PgConn::Outcome denied = conn.exec("SELECT colcrypt.rotate_key('sk')");
  CHECK(denied.sqlstate == "42501");
  sandbox.must("keyd-stop");
  sandbox.must("keyd-start", lifecycle_env("--sql-rotate"));
  conn.value("CREATE TABLE tenants (tenant text, v colcrypt.encrypted)");
  conn.value(
      "INSERT INTO tenants VALUES ('a', colcrypt.encrypt_derived('for a', 'sk', 'tenant:a')),"
      " ('b', colcrypt.encrypt_derived('for b', 'sk', 'tenant:b'))");
  CHECK(conn.value("SELECT colcrypt.rotate_key('sk')") == "2");
  // This backend encrypts under the new version at once.
  CHECK(conn.value("SELECT colcrypt.key_version(colcrypt.encrypt_field('a', 'sk'))") == "2");
  // Rotating the parent rotates every derived key: rewrap moves the tenants'
  // values to version 2, still derived (algorithm 3), still per tenant.
  conn.value("UPDATE tenants SET v = colcrypt.rewrap(v, 'tenant:' || tenant)");
  CHECK(conn.value("SELECT string_agg(colcrypt.key_version(v)::text || ':' ||"
                   " get_byte(decode(substring(colcrypt.ciphertext(v) FROM 10), 'base64'), 1),"
                   " ',' ORDER BY tenant) FROM tenants") == "2:3,2:3");
  CHECK(conn.value("SELECT string_agg(colcrypt.decrypt_field(v, 'tenant:' || tenant), ','"
                   " ORDER BY tenant) FROM tenants") == "for a,for b");
  CHECK(conn.exec("SELECT colcrypt.decrypt_field(v, 'tenant:a') FROM tenants WHERE tenant = 'b'")
            .sqlstate == "39000");
  // Nobody else may call it unless granted.
  conn.value("CREATE ROLE plain LOGIN");
  conn.value("GRANT colcrypt_user TO plain");
  conn.value("SET ROLE plain");
  CHECK(conn.exec("SELECT colcrypt.rotate_key('sk')").sqlstate == "42501");
  conn.value("RESET ROLE");
  // The audit log names the database peer.
  CHECK(read_file(sandbox.store_dir() + "/audit.log").find("\"reason\":\"sql\"") !=
        std::string::npos);
}

TEST_CASE("re-encryption job with concurrent writers (1 million rows)", "[lifecycle][jobs]") {
  reencrypt_under_writers(rows_from_env("COLCRYPT_LIFECYCLE_ROWS", 1000000));
}

TEST_CASE("re-encryption job: kill -9 of keyd and a Postgres restart, then resume",
          "[lifecycle][jobs][kill]") {
  const int64_t n = rows_from_env("COLCRYPT_LIFECYCLE_KILL_ROWS", 100000);
  Sandbox sandbox(lifecycle_options(kNoRetireGrace));
  sandbox.create_extension();
  create_key(sandbox, "kk", {"--max-uses", "2147483648"});
  PgConn conn(sandbox.conninfo());
  const std::string checksum = fill_table(conn, "kk", n);
  REQUIRE(sandbox.keyctl({"rotate", "kk"}).exit_code == 0);
  // Small, throttled batches so that the job is still running at each kill.
  REQUIRE(sandbox.keyctl({"reencrypt", "kk", "--batch-blocks", "16", "--throttle-ms", "20"})
              .exit_code == 0);
  int64_t last_done = -1;
  int interruptions = 0;
  for (int round = 0; round < 4; ++round) {
    // Wait for progress beyond the previous interruption.
    const auto start = Clock::now();
    int64_t done = 0;
    std::string state;
    for (;;) {
      PgConn p(sandbox.conninfo());
      done = as_int(p.value("SELECT rows_done FROM colcrypt.rotation_progress"));
      state = p.value("SELECT state FROM colcrypt.rotation_progress");
      if ((done > last_done && done > 0) || state == "done") break;
      REQUIRE(std::chrono::duration<double>(Clock::now() - start).count() < 60);
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    if (state == "done") break;
    last_done = done;
    ++interruptions;
    if (round == 2) {
      sandbox.must("pg-restart");  // the job's batch rolls back; keyd reconnects
    } else {
      sandbox.must("keyd-kill");
      // Progress is in the database: after the kill nothing moves.
      PgConn p(sandbox.conninfo());
      const int64_t frozen = as_int(p.value("SELECT rows_done FROM colcrypt.rotation_progress"));
      CHECK(frozen >= done);
      CHECK(p.value("SELECT state FROM colcrypt.rotation_progress") == "running");
      sandbox.must("keyd-start", lifecycle_env(kNoRetireGrace));
      // Between the kills every row still decrypts (half old, half new version).
      CHECK(p.value("SELECT count(*) FROM t WHERE colcrypt.decrypt_field(v) <> 'v' || id") == "0");
    }
  }
  CHECK(interruptions == 4);  // the job was still running at every kill and the restart
  json jobs = wait_for_jobs(sandbox, 300);
  REQUIRE(jobs.size() == 1);
  CHECK(jobs[0]["state"] == "done");
  // Nothing was re-encrypted twice: rows_done counts each re-encrypted row once.
  CHECK(jobs[0]["rows_done"].get<int64_t>() == n);
  PgConn after(sandbox.conninfo());
  check_rows(after, n, checksum, 2);
  // Idempotent: a second job finds nothing to do.
  REQUIRE(sandbox.keyctl({"reencrypt", "kk", "--wait"}).exit_code == 0);
  CHECK(after.value(
            "SELECT rows_total FROM colcrypt.rotation_progress ORDER BY job_id DESC LIMIT 1") ==
        "0");
  // And then the old version can go.
  CHECK(sandbox.keyctl({"destroy", "kk", "--version", "1"}).exit_code == 0);
}

TEST_CASE("audit log: verify passes on a real log and fails after tampering",
          "[lifecycle][audit]") {
  Sandbox sandbox(lifecycle_options());
  sandbox.create_extension();
  create_key(sandbox, "ak");
  {
    PgConn conn(sandbox.conninfo());
    conn.value("SELECT colcrypt.decrypt_field(colcrypt.encrypt_field('a', 'ak'))");
  }
  REQUIRE(sandbox.keyctl({"rotate", "ak"}).exit_code == 0);
  // A failed unlock, recorded at the next successful start.
  CommandResult wrong = sandbox.run("keyd-stop");
  REQUIRE(wrong.exit_code == 0);
  Env bad = lifecycle_env();
  bad.push_back({"ENCRYPTION_MASTER_PASSWORD", "not the password"});
  CHECK(sandbox.run("keyd-start", bad).exit_code == 77);
  sandbox.must("keyd-start", lifecycle_env());

  CommandResult ok = sandbox.keyctl({"audit", "verify"});
  INFO(ok.output);
  CHECK(ok.exit_code == 0);
  const std::string path = sandbox.store_dir() + "/audit.log";
  const std::string log = read_file(path);
  for (const char* event : {"\"event\":\"fetch\"", "\"op\":\"create\"", "\"op\":\"rotate\"",
                            "\"event\":\"unlock-failed\"", "\"event\":\"unlock\""}) {
    CHECK(log.find(event) != std::string::npos);
  }
  CHECK(log.find("\"uid\":") != std::string::npos);

  sandbox.must("keyd-stop");
  const std::string good = read_file(path);
  const std::string good_head = read_file(path + ".head");
  // The key store keeps where the log stood (its audit mark): a keyd started
  // on a tampered log records the break and moves the mark, so each case, and
  // the restore at the end, puts back the store of the good state as well.
  const std::string good_store = read_file(sandbox.store_file());
  std::vector<std::string> lines;
  for (size_t pos = 0; pos < good.size();) {
    size_t nl = good.find('\n', pos);
    lines.push_back(good.substr(pos, nl - pos));
    pos = nl + 1;
  }
  REQUIRE(lines.size() > 6);
  auto write = [](const std::string& p, const std::string& text) {
    std::ofstream out(p, std::ios::trunc | std::ios::binary);
    out << text;
  };
  auto joined = [](const std::vector<std::string>& ls) {
    std::string out;
    for (const auto& l : ls) out += l + "\n";
    return out;
  };
  auto verify_after = [&](const std::string& what, const std::string& text) {
    write(path, text);
    write(path + ".head", good_head);
    write(sandbox.store_file(), good_store);
    sandbox.must("keyd-start", lifecycle_env());
    CommandResult r = sandbox.keyctl({"audit", "verify"});
    INFO(what << ": " << r.output);
    CHECK(r.exit_code == 1);
    CHECK(r.output.find("FAILED") != std::string::npos);
    sandbox.must("keyd-stop");
  };
  {
    auto l = lines;
    json e = json::parse(l[3]);
    e["uid"] = 4242;
    l[3] = e.dump();
    verify_after("modified", joined(l));
  }
  {
    auto l = lines;
    l.erase(l.begin() + 2);
    verify_after("removed", joined(l));
  }
  {
    auto l = lines;
    std::swap(l[2], l[3]);
    verify_after("reordered", joined(l));
  }
  {
    auto l = lines;
    l.pop_back();
    verify_after("truncated", joined(l));
  }
  // Restored (log, head and the store's mark together), it verifies again.
  write(path, good);
  write(path + ".head", good_head);
  write(sandbox.store_file(), good_store);
  sandbox.must("keyd-start", lifecycle_env());
  CHECK(sandbox.keyctl({"audit", "verify"}).exit_code == 0);
  // No key bytes: the log never holds the store's wrapped keys or any 64-hex key.
  json store = json::parse(read_file(sandbox.store_file()));
  for (const auto& v : store["keys"][0]["versions"]) {
    CHECK(read_file(path).find(v["wrapped"].get<std::string>()) == std::string::npos);
  }
}

TEST_CASE("re-encryption job: key-bound columns keep their binding", "[lifecycle][jobs]") {
  Sandbox sandbox(lifecycle_options());
  sandbox.create_extension();
  create_key(sandbox, "bound");
  PgConn conn(sandbox.conninfo());
  conn.value(
      "CREATE TABLE kb (id int PRIMARY KEY, ssn colcrypt.encrypted('bound'),"
      " other colcrypt.encrypted('bound', 'my_binding'), loose colcrypt.encrypted)");
  conn.value(
      "INSERT INTO kb SELECT g, 'ssn' || g, 'o' || g, colcrypt.encrypt_field('l' || g, 'bound')"
      " FROM generate_series(1, 3000) g");
  REQUIRE(sandbox.keyctl({"rotate", "bound"}).exit_code == 0);
  CommandResult r = sandbox.keyctl({"reencrypt", "bound", "--wait"});
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  CHECK(conn.value("SELECT count(*) FROM kb WHERE colcrypt.key_version(ssn) = 2 AND"
                   " colcrypt.key_version(other) = 2 AND colcrypt.key_version(loose) = 2") ==
        "3000");
  CHECK(conn.value("SELECT count(*) FROM kb WHERE colcrypt.decrypt_field(ssn) = 'ssn' || id AND"
                   " colcrypt.decrypt_field(other) = 'o' || id AND"
                   " colcrypt.decrypt_field(loose) = 'l' || id") == "3000");
  json jobs = keyctl_json(sandbox, {"jobs"})["jobs"];
  REQUIRE(jobs.size() == 1);
  CHECK(jobs[0]["rows_done"] == 9000);
  CHECK(jobs[0]["rows_total"] == 9000);
}

namespace {

// The one job of a sandbox, once it is finished.
json finished_job(const Sandbox& sandbox) {
  json jobs = wait_for_jobs(sandbox, 120);
  REQUIRE(jobs.size() == 1);
  return jobs[0];
}

}  // namespace

TEST_CASE("references and jobs see domains, arrays, JSON values and materialized views",
          "[lifecycle][references]") {
  Sandbox sandbox(lifecycle_options(kNoRetireGrace));
  sandbox.create_extension();
  create_key(sandbox, "wide");
  PgConn conn(sandbox.conninfo());
  conn.value("CREATE DOMAIN d1 AS colcrypt.encrypted('wide', 'dom_binding')");
  conn.value("CREATE DOMAIN d2 AS d1");
  conn.value("CREATE TABLE plain (id int, v colcrypt.encrypted)");
  conn.value("CREATE TABLE dom (id int, v d2)");
  conn.value("CREATE TABLE arr (id int, v colcrypt.encrypted[])");
  conn.value("CREATE TABLE arrdom (id int, v d1[])");
  conn.value("CREATE TABLE docs (id int, doc jsonb)");
  conn.value("CREATE TABLE parent (id int, v colcrypt.encrypted)");
  conn.value("CREATE TABLE child () INHERITS (parent)");
  conn.value(
      "INSERT INTO plain VALUES (1, colcrypt.encrypt_field('p1', 'wide')),"
      " (2, colcrypt.encrypt_field('p2', 'wide'))");
  conn.value("INSERT INTO dom VALUES (1, 'secret-d')");
  conn.value(
      "INSERT INTO arr VALUES (1, ARRAY[[colcrypt.encrypt_field('a', 'wide'), NULL],"
      " [colcrypt.encrypt_field('b', 'wide'), colcrypt.encrypt_field('c', 'wide')]])");
  conn.value("INSERT INTO arrdom VALUES (1, ARRAY['x1', 'x2']::d1[])");
  conn.value(
      "INSERT INTO docs VALUES (1, colcrypt.encrypt_json("
      "'{\"a\": {\"ssn\": \"1\"}, \"list\": [{\"ssn\": \"2\"}, {\"ssn\": \"3\"}], \"n\": "
      "\"colcrypt:x\"}',"
      " 'wide', ARRAY['a.ssn', 'list.ssn']))");
  conn.value("INSERT INTO parent VALUES (1, colcrypt.encrypt_field('pa', 'wide'))");
  conn.value("INSERT INTO child VALUES (2, colcrypt.encrypt_field('ch', 'wide'))");
  conn.value("CREATE MATERIALIZED VIEW mv AS SELECT id, v FROM plain");
  // Tables of another owner take the job's batch-table path (the others, of
  // keyd's own role, one UPDATE each).
  conn.value("CREATE ROLE other_owner");
  for (const char* table : {"dom", "arr", "arrdom"}) {
    conn.value(std::string("ALTER TABLE ") + table + " OWNER TO other_owner");
  }
  // Other sessions' temporary tables are not seen (nor counted).
  PgConn other(sandbox.conninfo());
  other.value("CREATE TEMP TABLE tmp (v colcrypt.encrypted)");
  other.value("INSERT INTO tmp VALUES (colcrypt.encrypt_field('t', 'wide'))");
  REQUIRE(sandbox.keyctl({"rotate", "wide"}).exit_code == 0);

  // plain 2 + dom 1 + arr 3 + arrdom 2 + docs 3 + parent 1 + child 1 + mv 2
  json status = keyctl_json(sandbox, {"status"});
  INFO(status.dump());
  CHECK(status["keys"][0]["references"]["1"] == 15);
  CommandResult refused = sandbox.keyctl({"destroy", "wide", "--version", "1"});
  INFO(refused.output);
  CHECK(refused.exit_code == 1);
  CHECK(refused.output.find("still used by 15 rows") != std::string::npos);
  for (const char* column :
       {"public.dom.v (1)", "public.arr.v (3)", "public.arrdom.v (2)", "public.docs.doc (3)",
        "public.parent.v (1)", "public.child.v (1)", "public.mv.v (2)"}) {
    CHECK(refused.output.find(column) != std::string::npos);
  }

  // The job re-encrypts the tables (arrays element by element, keeping their
  // shape; domains with their binding) and reports what it cannot do.
  CommandResult r = sandbox.keyctl({"reencrypt", "wide", "--wait"});
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  json job = finished_job(sandbox);
  INFO(job.dump());
  CHECK(job["state"] == "done");
  CHECK(job["rows_done"] == 7);     // plain 2, dom 1, arr 1, arrdom 1, parent 1, child 1
  CHECK(job["rows_skipped"] == 3);  // docs 1 row, mv 2 rows
  const std::string last_error = job["last_error"].get<std::string>();
  CHECK(last_error.find("3 rows in 2 columns") != std::string::npos);
  CHECK(last_error.find("public.docs.doc") != std::string::npos);
  CHECK(conn.value("SELECT note FROM colcrypt.rotation_job_columns WHERE table_name = 'mv'")
            .find("REFRESH MATERIALIZED VIEW") != std::string::npos);
  PgConn fresh(sandbox.conninfo());
  // Values of a key-bound domain open with its binding's context.
  const std::string dom_context =
      "(SELECT colcrypt._column_context(typtypmod) FROM pg_type WHERE typname = 'd1')";
  CHECK(fresh.value("SELECT colcrypt.decrypt_field(v, " + dom_context +
                    ") || colcrypt.key_version(v) FROM dom") == "secret-d2");
  CHECK(fresh.value("SELECT array_dims(v) || ':' || (SELECT string_agg(coalesce("
                    "colcrypt.decrypt_field(e) || colcrypt.key_version(e), 'NULL'), ',')"
                    " FROM unnest(v) e) FROM arr") == "[1:2][1:2]:a2,NULL,b2,c2");
  CHECK(fresh.value("SELECT string_agg(colcrypt.decrypt_field(e, " + dom_context +
                    ") || colcrypt.key_version(e), ',') FROM arrdom, unnest(v) e") == "x12,x22");
  CHECK(fresh.value("SELECT string_agg(colcrypt.key_version(v)::text, ',' ORDER BY id)"
                    " FROM parent") == "2,2");
  // What is left: the JSON values, and the view until it is refreshed.
  status = keyctl_json(sandbox, {"status"});
  CHECK(status["keys"][0]["references"]["1"] == 5);
  fresh.value("REFRESH MATERIALIZED VIEW mv");
  status = keyctl_json(sandbox, {"status"});
  CHECK(status["keys"][0]["references"]["1"] == 3);

  // A composite type holding colcrypt values cannot be counted: status says
  // so, disable and destroy refuse (fail closed) unless --force.
  fresh.value("CREATE TYPE pair AS (a int, b colcrypt.encrypted)");
  fresh.value("CREATE TABLE comp (id int, p pair)");
  status = keyctl_json(sandbox, {"status"});
  CHECK(status["keys"][0]["references_error"].get<std::string>().find("public.comp.p") !=
        std::string::npos);
  fresh.value("DELETE FROM docs");
  CommandResult closed = sandbox.keyctl({"destroy", "wide", "--version", "1"});
  INFO(closed.output);
  CHECK(closed.exit_code != 0);
  CHECK(sandbox.keyd_log().find("cannot count the colcrypt values of public.comp.p") !=
        std::string::npos);
  fresh.value("DROP TABLE comp");
  CHECK(sandbox.keyctl({"destroy", "wide", "--version", "1"}).exit_code == 0);
}

TEST_CASE("re-encryption job: the owner's code runs as the owner, never as keyd's role",
          "[lifecycle][jobs][owner]") {
  Sandbox sandbox(lifecycle_options());
  sandbox.create_extension();
  create_key(sandbox, "own");
  PgConn conn(sandbox.conninfo());
  // app owns the tables and has no grant on the key (nor colcrypt_user).
  conn.value("CREATE ROLE app");
  conn.value("CREATE TABLE seen (who text, what text)");
  conn.value("ALTER TABLE seen OWNER TO app");
  conn.value(
      "CREATE TABLE owned (id int PRIMARY KEY, v colcrypt.encrypted('own'),"
      " w colcrypt.encrypted)");
  conn.value(
      "INSERT INTO owned SELECT g, 'o' || g, colcrypt.encrypt_field('w' || g, 'own')"
      " FROM generate_series(1, 50) g");
  conn.value("ALTER TABLE owned OWNER TO app");
  conn.value(
      "CREATE FUNCTION record_user() RETURNS trigger LANGUAGE plpgsql AS $$"
      " BEGIN INSERT INTO seen VALUES (current_user, 'trigger'); RETURN NEW; END $$");
  conn.value("ALTER FUNCTION record_user() OWNER TO app");
  conn.value(
      "CREATE TRIGGER rec BEFORE UPDATE ON owned FOR EACH ROW EXECUTE FUNCTION record_user()");
  // A deferred constraint trigger fires at the end of the batch, still as the owner.
  conn.value(
      "CREATE CONSTRAINT TRIGGER rec_deferred AFTER UPDATE ON owned DEFERRABLE INITIALLY DEFERRED"
      " FOR EACH ROW EXECUTE FUNCTION record_user()");
  // An owner that tries to take keyd's role back: refused, the row is skipped.
  conn.value("CREATE TABLE grabby (id int, v colcrypt.encrypted)");
  conn.value("INSERT INTO grabby VALUES (1, colcrypt.encrypt_field('g', 'own'))");
  conn.value("ALTER TABLE grabby OWNER TO app");
  conn.value(
      "CREATE FUNCTION grab() RETURNS trigger LANGUAGE plpgsql AS $$"
      " BEGIN RESET ROLE; INSERT INTO seen VALUES (current_user, 'grab'); RETURN NEW; END $$");
  conn.value("ALTER FUNCTION grab() OWNER TO app");
  conn.value("CREATE TRIGGER grab BEFORE UPDATE ON grabby FOR EACH ROW EXECUTE FUNCTION grab()");
  // An owner's trigger that keeps a row unchanged: the row is skipped, the
  // job still ends.
  conn.value("CREATE TABLE kept (id int, v colcrypt.encrypted)");
  conn.value(
      "INSERT INTO kept SELECT g, colcrypt.encrypt_field('k' || g, 'own')"
      " FROM generate_series(1, 5) g");
  conn.value("ALTER TABLE kept OWNER TO app");
  conn.value(
      "CREATE FUNCTION keep3() RETURNS trigger LANGUAGE plpgsql AS $$"
      " BEGIN IF OLD.id = 3 THEN RETURN NULL; END IF; RETURN NEW; END $$");
  conn.value("ALTER FUNCTION keep3() OWNER TO app");
  conn.value("CREATE TRIGGER keep3 BEFORE UPDATE ON kept FOR EACH ROW EXECUTE FUNCTION keep3()");
  REQUIRE(sandbox.keyctl({"rotate", "own"}).exit_code == 0);
  CommandResult r = sandbox.keyctl({"reencrypt", "own", "--wait"});
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  json job = finished_job(sandbox);
  INFO(job.dump());
  CHECK(job["state"] == "done");
  CHECK(job["rows_done"] == 104);
  CHECK(job["rows_skipped"] == 2);
  CHECK(job["last_error"].get<std::string>().find("2 rows in 2 columns") != std::string::npos);
  CHECK(job["last_error"].get<std::string>().find("public.grabby.v") != std::string::npos);
  CHECK(conn.value("SELECT rows_skipped || ': ' || note FROM colcrypt.rotation_job_columns"
                   " WHERE table_name = 'kept'") ==
        "1: the table's triggers or policies kept rows unchanged");
  CHECK(conn.value("SELECT string_agg(id::text, ',' ORDER BY id) FROM kept"
                   " WHERE colcrypt.key_version(v) = 1") == "3");
  CHECK(conn.value("SELECT string_agg(DISTINCT who, ',') FROM seen") == "app");
  CHECK(conn.value("SELECT count(*) FROM seen WHERE what = 'trigger'") == "200");
  CHECK(conn.value("SELECT count(*) FROM seen WHERE what = 'grab'") == "0");
  CHECK(conn.value("SELECT count(*) FROM owned WHERE colcrypt.key_version(v) = 2 AND"
                   " colcrypt.key_version(w) = 2 AND colcrypt.decrypt_field(v) = 'o' || id AND"
                   " colcrypt.decrypt_field(w) = 'w' || id") == "50");
  CHECK(conn.value("SELECT colcrypt.key_version(v) FROM grabby") == "1");
}

TEST_CASE("re-encryption job: rows that cannot be re-encrypted are skipped and reported",
          "[lifecycle][jobs][skip]") {
  Sandbox sandbox(lifecycle_options(kNoRetireGrace));
  sandbox.create_extension();
  create_key(sandbox, "sk");
  PgConn conn(sandbox.conninfo());
  conn.value("CREATE TABLE s (id int PRIMARY KEY, v colcrypt.encrypted)");
  conn.value(
      "INSERT INTO s SELECT g, colcrypt.encrypt_field('s' || g, 'sk') FROM generate_series(1, 200) "
      "g");
  // Two rows sealed with a context the job cannot know: rewrap fails (39000).
  conn.value(
      "UPDATE s SET v = colcrypt.encrypt_field('ctx' || id, 'sk', 'tenant:' || id)"
      " WHERE id IN (17, 150)");
  REQUIRE(sandbox.keyctl({"rotate", "sk"}).exit_code == 0);
  CommandResult r = sandbox.keyctl({"reencrypt", "sk", "--wait"});
  INFO(r.output);
  json job = finished_job(sandbox);
  INFO(job.dump());
  CHECK(job["state"] == "done");
  CHECK(job["rows_done"] == 198);
  CHECK(job["rows_skipped"] == 2);
  const std::string last_error = job["last_error"].get<std::string>();
  CHECK(last_error.find("2 rows in 1 columns") != std::string::npos);
  CHECK(last_error.find("39000") != std::string::npos);
  CHECK(last_error.find("ctx") == std::string::npos);  // no row contents
  CHECK(conn.value("SELECT rows_skipped FROM colcrypt.rotation_progress") == "2");
  CHECK(conn.value("SELECT count(*) FROM s WHERE colcrypt.key_version(v) = 2") == "198");
  // The text listing shows them too.
  CommandResult listing = sandbox.keyctl({"jobs"});
  CHECK(listing.output.find("SKIPPED") != std::string::npos);
  // Those rows still use version 1: destroy stays refused.
  CommandResult refused = sandbox.keyctl({"destroy", "sk", "--version", "1"});
  CHECK(refused.exit_code == 1);
  CHECK(refused.output.find("still used by 2 rows") != std::string::npos);
}

TEST_CASE("re-encryption job: tables are followed by OID through renames and drops",
          "[lifecycle][jobs][rename]") {
  Sandbox sandbox(lifecycle_options());
  sandbox.create_extension();
  create_key(sandbox, "rn");
  PgConn conn(sandbox.conninfo());
  for (const char* table : {"m1", "m2"}) {
    conn.value(std::string("CREATE TABLE ") + table + " (id int, v colcrypt.encrypted)");
    conn.value(std::string("INSERT INTO ") + table +
               " SELECT g, colcrypt.encrypt_field(repeat('x', 200) || g, 'rn')"
               " FROM generate_series(1, 3000) g");
  }
  REQUIRE(sandbox.keyctl({"rotate", "rn"}).exit_code == 0);
  REQUIRE(sandbox.keyctl({"reencrypt", "rn", "--batch-blocks", "2", "--throttle-ms", "100"})
              .exit_code == 0);
  const auto start = Clock::now();
  while (as_int(conn.value("SELECT coalesce(max(rows_done), 0) FROM colcrypt.rotation_job_columns"
                           " WHERE table_name = 'm1'")) == 0) {
    REQUIRE(std::chrono::duration<double>(Clock::now() - start).count() < 60);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  conn.value("ALTER TABLE m1 RENAME TO m1_renamed");
  conn.value("ALTER TABLE m1_renamed RENAME COLUMN v TO v_renamed");
  conn.value("DROP TABLE m2");
  json job = finished_job(sandbox);
  INFO(job.dump());
  CHECK(job["state"] == "done");
  CHECK(job["last_error"].is_null());
  CHECK(conn.value("SELECT count(*) FROM m1_renamed WHERE colcrypt.key_version(v_renamed) = 2") ==
        "3000");
  CHECK(conn.value("SELECT string_agg(table_name || '.' || column_name || ':' || state, ','"
                   " ORDER BY relid) FROM colcrypt.rotation_job_columns") ==
        "m1_renamed.v_renamed:done,m2.v:done");
}

TEST_CASE("re-encryption job: an owner's trigger naming a missing table skips its row",
          "[lifecycle][jobs][skip]") {
  // 42P01 and 42703 raised by the owner's code, once the batch's rows are
  // locked, are the row's: the row is skipped and the job ends (before the
  // fix they were taken for a rename racing the batch, retried 10 times, and
  // the job failed).
  Sandbox sandbox(lifecycle_options());
  sandbox.create_extension();
  create_key(sandbox, "mt");
  PgConn conn(sandbox.conninfo());
  conn.value("CREATE ROLE app2");
  conn.value("CREATE TABLE broken (id int, v colcrypt.encrypted)");
  conn.value(
      "INSERT INTO broken SELECT g, colcrypt.encrypt_field('b' || g, 'mt')"
      " FROM generate_series(1, 20) g");
  conn.value(
      "CREATE FUNCTION missing_table() RETURNS trigger LANGUAGE plpgsql AS $$"
      " BEGIN IF OLD.id = 7 THEN INSERT INTO no_such_table VALUES (1); END IF;"
      " IF OLD.id = 9 THEN PERFORM no_such_column FROM broken LIMIT 1; END IF;"
      " RETURN NEW; END $$");
  conn.value(
      "CREATE TRIGGER missing BEFORE UPDATE ON broken FOR EACH ROW"
      " EXECUTE FUNCTION missing_table()");
  // The same trigger on a table keyd's role owns (one-statement path) and on
  // one another role owns (the owner's UPDATE).
  conn.value("CREATE TABLE broken_app (LIKE broken)");
  conn.value("INSERT INTO broken_app SELECT * FROM broken");
  conn.value("ALTER TABLE broken_app OWNER TO app2");
  conn.value("ALTER FUNCTION missing_table() OWNER TO app2");
  conn.value(
      "CREATE TRIGGER missing BEFORE UPDATE ON broken_app FOR EACH ROW"
      " EXECUTE FUNCTION missing_table()");
  REQUIRE(sandbox.keyctl({"rotate", "mt"}).exit_code == 0);
  REQUIRE(sandbox.keyctl({"reencrypt", "mt"}).exit_code == 0);
  json job = finished_job(sandbox);
  INFO(job.dump());
  CHECK(job["state"] == "done");
  CHECK(job["errors"] == 0);
  CHECK(job["rows_done"] == 36);
  CHECK(job["rows_skipped"] == 4);
  CHECK(conn.value("SELECT string_agg(table_name || ':' || rows_skipped || ':' || left(note, 5),"
                   " ',' ORDER BY table_name) FROM colcrypt.rotation_job_columns") ==
        "broken:2:42P01,broken_app:2:42P01");
  CHECK(conn.value("SELECT string_agg(id::text, ',' ORDER BY id) FROM broken"
                   " WHERE colcrypt.key_version(v) = 1") == "7,9");
  CHECK(conn.value("SELECT string_agg(id::text, ',' ORDER BY id) FROM broken_app"
                   " WHERE colcrypt.key_version(v) = 1") == "7,9");
}

TEST_CASE("reencrypt --wait follows its own jobs in each database", "[lifecycle][jobs][keyctl]") {
  // Every database numbers its jobs from 1: a job is (database, job_id).
  // Before the fix keyctl matched job ids alone, so another database's old
  // failed job with the same id made `reencrypt --wait` report a failure.
  Sandbox sandbox(lifecycle_options());
  sandbox.create_extension();
  create_key(sandbox, "two");
  PgConn conn(sandbox.conninfo());
  conn.value("CREATE DATABASE other");
  const std::string other_uri = "postgresql:///other?host=" + sandbox.dir() +
                                "/pgsock&port=" + std::to_string(sandbox.port()) + "&user=postgres";
  {
    PgConn other("host=" + sandbox.dir() + "/pgsock port=" + std::to_string(sandbox.port()) +
                 " user=postgres dbname=other");
    other.value("CREATE EXTENSION colcrypt");
    // Job 1 of "other": a key keyd does not have, so it fails.
    CHECK(other.value("SELECT colcrypt.start_rotation_job('no_such_key')") == "1");
  }
  sandbox.must("keyd-stop");
  sandbox.must("keyd-start", lifecycle_env("--database " + other_uri));
  for (int i = 0; i < 100; ++i) {
    PgConn other("host=" + sandbox.dir() + "/pgsock port=" + std::to_string(sandbox.port()) +
                 " user=postgres dbname=other");
    if (other.value("SELECT state FROM colcrypt.rotation_jobs WHERE job_id = 1") == "failed") break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  conn.value("CREATE TABLE tw (v colcrypt.encrypted)");
  conn.value("INSERT INTO tw VALUES (colcrypt.encrypt_field('x', 'two'))");
  REQUIRE(sandbox.keyctl({"rotate", "two"}).exit_code == 0);
  // Job 1 of "postgres" and job 2 of "other".
  CommandResult r = sandbox.keyctl({"reencrypt", "two", "--wait"});
  INFO(r.output);
  CHECK(r.output.find("started job 1 in database postgres") != std::string::npos);
  CHECK(r.output.find("started job 2 in database other") != std::string::npos);
  CHECK(r.exit_code == 0);
  CHECK(conn.value("SELECT colcrypt.key_version(v) FROM tw") == "2");
}

TEST_CASE("re-encryption job: a trigger that keeps the old value ends the job",
          "[lifecycle][jobs][skip]") {
  // An owner's trigger that puts the old value back (NEW.v := OLD.v) makes
  // the UPDATE report the row as changed while it stays under the old
  // version. Before the fix every pass "re-encrypted" it again: the job
  // never ended, rows_done grew without bound and each pass spent uses.
  Sandbox sandbox(lifecycle_options());
  sandbox.create_extension();
  create_key(sandbox, "kv");
  PgConn conn(sandbox.conninfo());
  conn.value("CREATE ROLE app3");
  for (const std::string table : {"frozen", "frozen_app"}) {
    conn.value("CREATE TABLE " + table + " (id int, v colcrypt.encrypted)");
    conn.value("INSERT INTO " + table +
               " SELECT g, colcrypt.encrypt_field('f' || g, 'kv') FROM generate_series(1, 5) g");
    conn.value("CREATE FUNCTION " + table +
               "_keep() RETURNS trigger LANGUAGE plpgsql AS $$"
               " BEGIN IF OLD.id = 2 THEN NEW.v := OLD.v; END IF; RETURN NEW; END $$");
    conn.value("CREATE TRIGGER keep BEFORE UPDATE ON " + table + " FOR EACH ROW EXECUTE FUNCTION " +
               table + "_keep()");
  }
  // One table keyd's role owns (one statement), one another role owns.
  conn.value("ALTER TABLE frozen_app OWNER TO app3");
  conn.value("ALTER FUNCTION frozen_app_keep() OWNER TO app3");
  REQUIRE(sandbox.keyctl({"rotate", "kv"}).exit_code == 0);
  REQUIRE(sandbox.keyctl({"reencrypt", "kv"}).exit_code == 0);
  json job = finished_job(sandbox);
  INFO(job.dump());
  CHECK(job["state"] == "done");
  CHECK(job["rows_done"] == 8);  // each row re-encrypted counted once, the kept ones never
  CHECK(job["rows_skipped"] == 2);
  CHECK(job["last_error"].get<std::string>().find("2 rows in 2 columns") != std::string::npos);
  for (const std::string table : {"frozen", "frozen_app"}) {
    CHECK(conn.value("SELECT string_agg(id::text, ',' ORDER BY id) FROM " + table +
                     " WHERE colcrypt.key_version(v) = 1") == "2");
    CHECK(conn.value("SELECT count(*) FROM " + table +
                     " WHERE colcrypt.decrypt_field(v) = 'f' || id") == "5");
  }
}

TEST_CASE("re-encryption job: a job after a rotation in the same round uses the new primary",
          "[lifecycle][jobs][round]") {
  // Job A runs while the key rotates again; job B, listed in the same round,
  // then targets the newer version. Before the fix both ran in one session,
  // whose key cache still had A's primary: B's rewraps left the values
  // unchanged (each such UPDATE moved the row further on, so B chased them)
  // until the cache entry expired, a minute later.
  Sandbox sandbox(lifecycle_options());
  sandbox.create_extension();
  create_key(sandbox, "rr");
  PgConn conn(sandbox.conninfo());
  conn.value("CREATE TABLE rr (id int, v colcrypt.encrypted)");
  conn.value(
      "INSERT INTO rr SELECT g, colcrypt.encrypt_field(repeat('r', 200) || g, 'rr')"
      " FROM generate_series(1, 300) g");
  REQUIRE(sandbox.keyctl({"rotate", "rr"}).exit_code == 0);
  // Both jobs in one transaction: keyd lists them in the same round.
  conn.value("BEGIN");
  conn.value("SELECT colcrypt.start_rotation_job('rr', 1, 300)");
  conn.value("SELECT colcrypt.start_rotation_job('rr', 1, 0)");
  conn.value("COMMIT");
  const auto start = Clock::now();
  while (as_int(conn.value("SELECT rows_done FROM colcrypt.rotation_jobs WHERE job_id = 1")) == 0) {
    REQUIRE(std::chrono::duration<double>(Clock::now() - start).count() < 60);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  REQUIRE(sandbox.keyctl({"rotate", "rr"}).exit_code == 0);
  json jobs = wait_for_jobs(sandbox, 120);
  INFO(jobs.dump());
  REQUIRE(jobs.size() == 2);
  // Well under colcrypt.key_cache_ttl (60 s): B's session knew the new primary.
  CHECK(conn.value("SELECT extract(epoch FROM finished_at - started_at) < 20"
                   " FROM colcrypt.rotation_jobs WHERE job_id = 2") == "t");
  CHECK(jobs[0]["state"] == "done");
  CHECK(jobs[0]["target_version"] == 2);
  CHECK(jobs[1]["state"] == "done");
  CHECK(jobs[1]["target_version"] == 3);
  CHECK(jobs[1]["rows_skipped"] == 0);
  CHECK(conn.value("SELECT count(*) FROM rr WHERE colcrypt.key_version(v) = 3") == "300");
}

TEST_CASE("re-encryption job: a key created after keyd started is known to jobs",
          "[lifecycle][jobs][created]") {
  // keyd publishes its keys to the job runner on start and on rotation; a key
  // created later and never rotated must be published too, else its job
  // fails for good with "colcrypt-keyd has no key named".
  Sandbox sandbox(lifecycle_options());
  sandbox.create_extension();
  create_key(sandbox, "fresh");
  PgConn conn(sandbox.conninfo());
  conn.value("CREATE TABLE fresh (id int, v colcrypt.encrypted)");
  conn.value("INSERT INTO fresh SELECT g, colcrypt.encrypt_field('f' || g, 'fresh')"
             " FROM generate_series(1, 20) g");
  conn.value("SELECT colcrypt.start_rotation_job('fresh')");
  json jobs = wait_for_jobs(sandbox, 60);
  INFO(jobs.dump());
  REQUIRE(jobs.size() == 1);
  CHECK(jobs[0]["state"] == "done");
  CHECK(jobs[0]["target_version"] == 1);
  CHECK(jobs[0]["last_error"].is_null());
}
