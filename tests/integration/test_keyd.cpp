// colcrypt-keyd seen from Postgres and from its clients: outages and restarts,
// peer allowlists, refusals at startup (exit codes), hangs under
// statement_timeout and cancel, and keyctl's JSON output.
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <future>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>

#include "client/client.hpp"
#include "core/error.hpp"
#include "harness.hpp"

using namespace colcrypt::test;
using Clock = std::chrono::steady_clock;
using nlohmann::json;

namespace {

// The log lines written since `from` (a size of the log seen earlier).
std::string log_since(const Sandbox& sandbox, size_t from) {
  std::string log = sandbox.keyd_log();
  return from < log.size() ? log.substr(from) : std::string();
}

json keyctl_json(const Sandbox& sandbox, const std::vector<std::string>& args) {
  std::vector<std::string> argv = {"--json"};
  argv.insert(argv.end(), args.begin(), args.end());
  CommandResult r = sandbox.keyctl(argv);
  INFO("keyctl output: " << r.output);
  REQUIRE(r.exit_code == 0);
  return json::parse(r.output);
}

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// keyd flags for the tests that disable or destroy right after a rotation.
Sandbox::Options counting_options(const std::string& extra = "") {
  Sandbox::Options o;
  o.env = {{"SANDBOX_KEYD_ARGS", "--database @DATABASE@ --retire-grace-seconds 0 " + extra}};
  return o;
}

// keyd serves keys to its --allow-uid uids only, and these tests run as
// root: those that fetch from keyd's socket themselves put root on the list
// (beside postgres, for the backends).
EnvVar root_may_fetch() { return {"SANDBOX_KEYD_ALLOW_UID", postgres_uid() + ",0"}; }

// A key fetch straight from keyd's socket, as a backend's cache miss makes it.
colcrypt::client::Client keyd_client(const Sandbox& sandbox) {
  colcrypt::client::ClientOptions o;
  o.socket_path = sandbox.keyd_socket();
  o.timeout_ms = 5000;
  return colcrypt::client::Client(o);
}

// The sockets a process has open (its fds that are sockets), read as root.
int open_sockets(const std::string& pid) {
  int n = 0;
  for (const auto& entry : std::filesystem::directory_iterator("/proc/" + pid + "/fd")) {
    std::error_code ec;
    const auto target = std::filesystem::read_symlink(entry.path(), ec);
    if (!ec && target.string().rfind("socket:", 0) == 0) ++n;
  }
  return n;
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

}  // namespace

TEST_CASE("keyd stopped: a clear error naming the socket, and work resumes once it is back",
          "[keyd][outage]") {
  Sandbox sandbox;
  sandbox.create_extension();
  sandbox.create_key("before_outage");
  sandbox.create_key("during_outage");
  PgConn conn(sandbox.conninfo());
  conn.value("CREATE TABLE t (id int, v colcrypt.encrypted)");
  conn.value("INSERT INTO t VALUES (1, colcrypt.encrypt_field('one', 'before_outage'))");

  sandbox.must("keyd-stop");
  // SIGTERM is a clean stop: logged, and the socket is gone.
  CHECK_FALSE(path_exists(sandbox.keyd_socket()));
  CHECK(sandbox.keyd_log().find("colcrypt-keyd: INFO: stopped") != std::string::npos);

  // An uncached key: the backend has to ask keyd, and cannot.
  auto outage = conn.exec("SELECT colcrypt.encrypt_field('two', 'during_outage')");
  CHECK(outage.sqlstate == "58000");
  CHECK(outage.message.find(sandbox.keyd_socket()) != std::string::npos);
  // Without the cache, even the key the backend used before is unreachable.
  conn.value("SET colcrypt.key_cache_ttl = 0");
  auto uncached = conn.exec("SELECT colcrypt.decrypt_field(v) FROM t WHERE id = 1");
  CHECK(uncached.sqlstate == "58000");

  sandbox.must("keyd-start");
  // The same backend recovers; nothing was poisoned by the failures.
  conn.value("INSERT INTO t VALUES (2, colcrypt.encrypt_field('two', 'during_outage'))");
  CHECK(conn.value("SELECT string_agg(colcrypt.decrypt_field(v), ',' ORDER BY id) FROM t") ==
        "one,two");

  SECTION("after SIGKILL (a stale socket file is left behind) keyd comes back too") {
    sandbox.must("keyd-kill");
    CHECK(path_exists(sandbox.keyd_socket()));
    auto killed = conn.exec("SELECT colcrypt.encrypt_field('three', 'during_outage')");
    CHECK(killed.sqlstate == "58000");
    sandbox.must("keyd-start");
    conn.value("INSERT INTO t VALUES (3, colcrypt.encrypt_field('three', 'during_outage'))");
    CHECK(conn.value("SELECT colcrypt.decrypt_field(v) FROM t WHERE id = 3") == "three");
  }
}

TEST_CASE("a peer whose uid is not on the allowlist is refused and logged", "[keyd][peer]") {
  // keyd allows and administers only the postgres uid; these tests run as root.
  const std::string pg_uid = postgres_uid();
  Sandbox::Options options;
  options.with_postgres = false;
  options.env = {{"SANDBOX_KEYD_ALLOW_UID", pg_uid}, {"SANDBOX_KEYD_ADMIN_UID", pg_uid}};
  Sandbox sandbox(options);
  const size_t log_before = sandbox.keyd_log().size();

  colcrypt::client::ClientOptions client_options;
  client_options.socket_path = sandbox.keyd_socket();
  client_options.timeout_ms = 3000;
  colcrypt::client::Client client(client_options);
  bool refused = false;
  try {
    client.fetch_primary("any_key");
  } catch (const colcrypt::Error& e) {
    INFO("client error: " << colcrypt::errc_name(e.code()) << ": " << e.what());
    // keyd answers a refused peer with one Denied frame before closing; a keyd
    // that merely dropped the connection must not pass.
    refused = e.code() == colcrypt::Errc::PermissionDenied;
    CHECK(refused);
  }
  CHECK(refused);

  // keyctl as root is refused as well, and says so.
  CommandResult ctl = sandbox.keyctl({"create", "root_key"});
  INFO("keyctl: " << ctl.output);
  CHECK(ctl.exit_code == 1);  // keyd answered (refused), not "unreachable" (3)
  CHECK(ctl.output.find("refuses uid 0") != std::string::npos);

  // The refusals are in keyd's log, with the peer's uid.
  std::string log;
  for (int i = 0; i < 50; ++i) {
    log = log_since(sandbox, log_before);
    if (log.find("WARNING: refused peer uid=0 ") != std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  INFO("keyd log: " << log);
  CHECK(log.find("WARNING: refused peer uid=0 ") != std::string::npos);
}

TEST_CASE("keyd hides its secrets and guards its socket", "[keyd][hardening]") {
  const std::string password = "hardening-test-password";
  const Env env = {{"ENCRYPTION_MASTER_PASSWORD", password}};
  Sandbox::Options options;
  options.with_postgres = false;
  options.env = env;
  Sandbox sandbox(options);
  const std::string proc = "/proc/" + std::to_string(sandbox.keyd_pid());

  // The password is wiped even from the initial copy of keyd's environment
  // that /proc shows (the variable's name may remain there, its value not).
  const std::string keyd_environ = read_file(proc + "/environ");
  CHECK(keyd_environ.find(password) == std::string::npos);
  // No core dumps.
  const std::string limits = read_file(proc + "/limits");
  INFO(limits);
  CHECK(limits.find("Max core file size        0                    0") != std::string::npos);
  // Socket 0660 in a 0750 directory, both for the postgres group.
  const std::string run_dir = sandbox.dir() + "/run";
  struct stat st {};
  REQUIRE(stat(sandbox.keyd_socket().c_str(), &st) == 0);
  CHECK((st.st_mode & 07777) == 0660);
  REQUIRE(stat(run_dir.c_str(), &st) == 0);
  CHECK((st.st_mode & 07777) == 0750);

  sandbox.must("keyd-stop", env);
  SECTION("a socket directory that others can write is refused") {
    REQUIRE(chmod(run_dir.c_str(), 0770) == 0);
    CommandResult r = sandbox.run("keyd-start", env);
    INFO(r.output);
    CHECK(r.exit_code == 78);
    CHECK(r.output.find("writable by group or others") != std::string::npos);
    CHECK_FALSE(path_exists(sandbox.keyd_socket()));
    REQUIRE(chmod(run_dir.c_str(), 0750) == 0);
  }
  SECTION("a store made with test-strength PBKDF2 needs --insecure-fast-kdf") {
    Env without_flag = env;
    without_flag.push_back({"COLCRYPT_FAST_KDF", "0"});
    CommandResult r = sandbox.run("keyd-start", without_flag);
    INFO(r.output);
    CHECK(r.exit_code == 64);
    CHECK(r.output.find("PBKDF2 iterations") != std::string::npos);
    CHECK_FALSE(path_exists(sandbox.keyd_socket()));
  }
  sandbox.must("keyd-start", env);
}

TEST_CASE("the postgres uid may fetch keys but not administer them", "[keyd][peer]") {
  Sandbox& sandbox = shared_sandbox();
  CommandResult as_postgres =
      run_command({"runuser", "-u", "postgres", "--", COLCRYPT_KEYCTL_BIN, "--socket",
                   sandbox.keyd_socket(), "create", "made_by_postgres"});
  INFO("keyctl as postgres: " << as_postgres.output);
  CHECK(as_postgres.exit_code == 1);  // keyd answered with an error
  CHECK(sandbox.keyctl({"show", "made_by_postgres"}).exit_code == 1);
  // ...while backends, running as postgres, fetch keys (the shared sandbox works).
  PgConn conn(sandbox.conninfo());
  CHECK(conn.value("SELECT colcrypt.decrypt_field(colcrypt.encrypt_field('ok', 'shared_key'))") ==
        "ok");
}

TEST_CASE("an admin uid administers but fetches no key unless on --allow-uid", "[keyd][peer]") {
  // The shared sandbox's keyd: --allow-uid postgres --admin-uid 0; this test runs as root.
  Sandbox& sandbox = shared_sandbox();
  const std::string audit_path = sandbox.store_dir() + "/audit.log";
  const size_t audit_before = read_file(audit_path).size();
  REQUIRE(sandbox.keyctl({"show", "shared_key"}).exit_code == 0);
  bool denied = false;
  try {
    keyd_client(sandbox).fetch_primary_block("shared_key", 0);
  } catch (const colcrypt::Error& e) {
    INFO("client error: " << colcrypt::errc_name(e.code()) << ": " << e.what());
    denied = e.code() == colcrypt::Errc::PermissionDenied;
  }
  CHECK(denied);
  const std::string audited = read_file(audit_path).substr(audit_before);
  CHECK(contains(audited, "\"event\":\"fetch-denied\""));
  CHECK(contains(audited, "\"key\":\"shared_key\""));
  CHECK(contains(sandbox.keyd_log(), "denied a key fetch to peer uid=0"));
}

TEST_CASE("keyd and postgres restarts keep every key and version", "[keyd][restart]") {
  Sandbox sandbox;
  sandbox.create_extension();
  sandbox.create_key("durable");
  const json before = keyctl_json(sandbox, {"show", "durable"});
  {
    PgConn conn(sandbox.conninfo());
    conn.value("CREATE TABLE t (id int, v colcrypt.encrypted)");
    conn.value(
        "INSERT INTO t SELECT g, colcrypt.encrypt_field('v1-' || g, 'durable') "
        "FROM generate_series(1, 3) g");
  }

  sandbox.must("keyd-stop");
  sandbox.must("keyd-start");
  {
    PgConn fresh_backend(sandbox.conninfo());
    CHECK(fresh_backend.value(
              "SELECT string_agg(colcrypt.decrypt_field(v), ',' ORDER BY id) FROM t") ==
          "v1-1,v1-2,v1-3");
  }

  // Rotate, write with the new version, then restart both sides.
  REQUIRE(sandbox.keyctl({"rotate", "durable"}).exit_code == 0);
  {
    PgConn conn(sandbox.conninfo());
    conn.value("INSERT INTO t VALUES (4, colcrypt.encrypt_field('v2-4', 'durable'))");
  }
  sandbox.must("pg-restart");
  sandbox.must("keyd-stop");
  sandbox.must("keyd-start");

  PgConn conn(sandbox.conninfo());
  CHECK(conn.value("SELECT string_agg(colcrypt.decrypt_field(v) || '@' || "
                   "colcrypt.key_version(v), ',' ORDER BY id) FROM t") ==
        "v1-1@1,v1-2@1,v1-3@1,v2-4@2");
  CHECK(conn.value("SELECT count(DISTINCT colcrypt.key_id(v)) FROM t") == "1");
  CHECK(conn.value("SELECT colcrypt.key_id(v)::text FROM t LIMIT 1") == before.at("id"));
  const json after = keyctl_json(sandbox, {"show", "durable"});
  CHECK(after.at("id") == before.at("id"));
  CHECK(after.at("primary_version") == 2);
  CHECK(after.at("versions").size() == 2);
}

TEST_CASE("keyd refuses a wrong master password", "[keyd][startup]") {
  Sandbox::Options options;
  options.with_postgres = false;
  Sandbox sandbox(options);
  sandbox.create_key("guarded");
  sandbox.must("keyd-stop");
  const size_t log_before = sandbox.keyd_log().size();

  CommandResult r = sandbox.run("keyd-start", {{"ENCRYPTION_MASTER_PASSWORD", "not-the-password"}});
  INFO(r.output);
  CHECK(r.exit_code == 77);
  CHECK(log_since(sandbox, log_before).find("ERROR: wrong master password") != std::string::npos);
  CHECK_FALSE(path_exists(sandbox.keyd_socket()));

  // The right password still opens the store, with the key in it.
  sandbox.must("keyd-start");
  CHECK(sandbox.keyctl({"show", "guarded"}).exit_code == 0);
}

TEST_CASE("keyd refuses a store that others can read", "[keyd][startup]") {
  Sandbox::Options options;
  options.with_postgres = false;
  Sandbox sandbox(options);
  sandbox.create_key("private");
  sandbox.must("keyd-stop");
  REQUIRE(path_exists(sandbox.store_file()));

  SECTION("store file 0644") {
    REQUIRE(chmod(sandbox.store_file().c_str(), 0644) == 0);
    CommandResult r = sandbox.run("keyd-start");
    INFO(r.output);
    CHECK(r.exit_code == 78);
    CHECK(r.output.find(sandbox.store_dir()) != std::string::npos);
    CHECK_FALSE(path_exists(sandbox.keyd_socket()));
    REQUIRE(chmod(sandbox.store_file().c_str(), 0600) == 0);
  }
  SECTION("store directory 0755") {
    REQUIRE(chmod(sandbox.store_dir().c_str(), 0755) == 0);
    CommandResult r = sandbox.run("keyd-start");
    INFO(r.output);
    CHECK(r.exit_code == 78);
    CHECK(r.output.find(sandbox.store_dir() + " has mode 0755") != std::string::npos);
    CHECK_FALSE(path_exists(sandbox.keyd_socket()));
    REQUIRE(chmod(sandbox.store_dir().c_str(), 0700) == 0);
  }
  sandbox.must("keyd-start");
  CHECK(sandbox.keyctl({"show", "private"}).exit_code == 0);
}

TEST_CASE("keyd refuses a corrupted store", "[keyd][startup]") {
  Sandbox::Options options;
  options.with_postgres = false;
  Sandbox sandbox(options);
  sandbox.create_key("fragile_key");
  sandbox.must("keyd-stop");
  const std::string original = read_file(sandbox.store_file());
  REQUIRE(original.find("fragile_key") != std::string::npos);

  auto write_store = [&](const std::string& content) {
    std::ofstream out(sandbox.store_file(), std::ios::binary | std::ios::trunc);
    out << content;
  };

  SECTION("a renamed key (valid JSON, the MAC no longer matches)") {
    std::string tampered = original;
    tampered.replace(tampered.find("fragile_key"), 11, "fragile_kez");
    write_store(tampered);
  }
  SECTION("a truncated file") { write_store(original.substr(0, original.size() / 2)); }

  CommandResult r = sandbox.run("keyd-start");
  INFO(r.output);
  CHECK(r.exit_code == 65);
  CHECK_FALSE(path_exists(sandbox.keyd_socket()));
}

TEST_CASE("statement_timeout and pg_cancel_backend work while keyd hangs", "[keyd][hang]") {
  Sandbox sandbox;
  sandbox.create_extension();
  sandbox.create_key("slow_key");
  const pid_t keyd = sandbox.keyd_pid();
  PgConn conn(sandbox.conninfo());
  const std::string backend_pid = conn.value("SELECT pg_backend_pid()");

  REQUIRE(kill(keyd, SIGSTOP) == 0);
  struct Resume {  // keyd must never stay stopped, whatever fails below
    pid_t pid;
    ~Resume() { kill(pid, SIGCONT); }
  } resume{keyd};

  conn.value("SET statement_timeout = '1s'");
  auto start = Clock::now();
  auto timed_out = conn.exec("SELECT colcrypt.encrypt_field('x', 'slow_key')");
  const double elapsed = seconds_since(start);
  CHECK(timed_out.sqlstate == "57014");
  CHECK(elapsed >= 0.9);
  CHECK(elapsed < 3.0);  // well before colcrypt.keyd_timeout (5 s)

  conn.value("SET statement_timeout = 0");
  PgConn canceller(sandbox.conninfo());
  auto pending = std::async(std::launch::async, [&] {
    return conn.exec("SELECT colcrypt.encrypt_field('x', 'slow_key')");
  });
  // Cancel only once the backend is inside the query (a cancel that reaches an
  // idle backend is dropped).
  std::string state;
  for (int i = 0; i < 100 && state != "active"; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    state = canceller.value("SELECT state FROM pg_stat_activity WHERE pid = " + backend_pid);
  }
  REQUIRE(state == "active");
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  start = Clock::now();
  CHECK(canceller.value("SELECT pg_cancel_backend(" + backend_pid + ")") == "t");
  auto cancelled = pending.get();
  CHECK(cancelled.sqlstate == "57014");
  CHECK(seconds_since(start) < 2.0);

  kill(keyd, SIGCONT);
  CHECK(conn.value("SELECT colcrypt.decrypt_field(colcrypt.encrypt_field('x', 'slow_key'))") ==
        "x");
}

TEST_CASE("a hung keyd gives the keyd timeout error", "[keyd][hang]") {
  Sandbox sandbox;
  sandbox.create_extension();
  sandbox.create_key("hung_key");
  const pid_t keyd = sandbox.keyd_pid();
  PgConn conn(sandbox.conninfo());
  conn.value("SET colcrypt.keyd_timeout = 500");
  REQUIRE(kill(keyd, SIGSTOP) == 0);
  auto start = Clock::now();
  auto outcome = conn.exec("SELECT colcrypt.encrypt_field('x', 'hung_key')");
  const double elapsed = seconds_since(start);
  kill(keyd, SIGCONT);
  CHECK(outcome.sqlstate == "58030");
  CHECK(outcome.message.find(sandbox.keyd_socket()) != std::string::npos);
  CHECK(elapsed < 3.0);
}

TEST_CASE("keyctl --json output parses and matches what Postgres sees", "[keyd][keyctl]") {
  Sandbox& sandbox = shared_sandbox();

  const json status = keyctl_json(sandbox, {"status"});
  CHECK(status.at("locked") == false);
  CHECK(status.at("socket") == sandbox.keyd_socket());
  CHECK(status.at("key_count").get<int>() >= 1);
  CHECK(status.at("uptime_seconds").get<double>() >= 0);

  const json list = keyctl_json(sandbox, {"list"});
  const auto& keys = list.at("keys");
  auto shared = std::find_if(keys.begin(), keys.end(),
                             [](const json& k) { return k.at("name") == "shared_key"; });
  REQUIRE(shared != keys.end());
  CHECK(shared->at("algorithm") == "AES-256-GCM");

  const json show = keyctl_json(sandbox, {"show", "shared_key"});
  CHECK(show.at("id") == shared->at("id"));
  CHECK(show.at("primary_version").get<int>() >= 1);
  CHECK(show.at("created_at").get<std::string>().back() == 'Z');
  PgConn conn(sandbox.conninfo());
  CHECK(conn.value("SELECT colcrypt.key_id(colcrypt.encrypt_field('x', 'shared_key'))::text") ==
        show.at("id").get<std::string>());

  keyctl_json(sandbox, {"create", "json_rotated", "--rotation-days", "30"});
  keyctl_json(sandbox, {"rotate", "json_rotated"});
  const json shown = keyctl_json(sandbox, {"show", "json_rotated"});
  CHECK(shown.at("primary_version") == 2);
  CHECK(shown.at("rotation_interval_days") == 30);
  CHECK(shown.at("versions").size() == 2);
  CHECK(conn.value("SELECT colcrypt.key_version(colcrypt.encrypt_field('x', 'json_rotated'))") ==
        "2");

  // Exit codes: keyd's error 1, usage 2, keyd unreachable 3.
  CHECK(sandbox.keyctl({"show", "no_such_key"}).exit_code == 1);
  CHECK(sandbox.keyctl({"create", "shared_key"}).exit_code == 1);  // exists already
  CHECK(sandbox.keyctl({"no-such-command"}).exit_code == 2);
  CHECK(run_command({COLCRYPT_KEYCTL_BIN, "--socket", sandbox.dir() + "/nowhere.sock", "list"})
            .exit_code == 3);
}

TEST_CASE("a version that keyed deterministic values or blind indexes is pinned by keyd",
          "[keyd][pin]") {
  Sandbox sandbox(counting_options());
  sandbox.create_extension();
  for (const char* k : {"pk", "cached", "free"}) sandbox.create_key(k);
  {
    PgConn conn(sandbox.conninfo());
    conn.value("SELECT colcrypt.blind_index('alice', 'pk')");
    conn.value("SELECT colcrypt.encrypt_deterministic('alice', 'pk')");
    // Version 1 of "cached" is already in this backend's cache (fetched to
    // decrypt) when the blind index first needs it: keyd must still hear of it.
    CHECK(conn.value("SELECT colcrypt.decrypt_field(colcrypt.encrypt_field('x', 'cached'))") ==
          "x");
    conn.value("SELECT colcrypt.blind_index('x', 'cached')");
    conn.value("SELECT colcrypt.encrypt_field('y', 'free')");
  }
  for (const char* k : {"pk", "cached", "free"}) {
    REQUIRE(sandbox.keyctl({"rotate", k}).exit_code == 0);
  }
  sandbox.must("keyd-stop");  // the record is on disk, not only in keyd's memory
  sandbox.must("keyd-start", counting_options().env);

  CommandResult destroy = sandbox.keyctl({"destroy", "pk", "--version", "1"});
  INFO(destroy.output);
  CHECK(destroy.exit_code == 1);
  CHECK(contains(destroy.output,
                 "all deterministic values (colcrypt.encrypt_deterministic) and blind indexes "
                 "(colcrypt.blind_index) of key 'pk' unusable for ever"));
  CHECK(contains(destroy.output, "--force"));
  CommandResult disable = sandbox.keyctl({"disable", "cached", "--version", "1"});
  INFO(disable.output);
  CHECK(disable.exit_code == 1);
  CHECK(contains(disable.output,
                 "blind indexes (colcrypt.blind_index) of key 'cached' unusable until it is "
                 "enabled again"));
  // A version that only encrypted rows is not pinned.
  CHECK(sandbox.keyctl({"destroy", "free", "--version", "1"}).exit_code == 0);

  // show and status say it; the audit log recorded it.
  CommandResult show = sandbox.keyctl({"show", "pk"});
  CHECK(contains(show.output, "keys deterministic values (first "));
  CHECK(contains(show.output, "keys blind indexes (first "));
  CommandResult status = sandbox.keyctl({"status"});
  INFO(status.output);
  CHECK(contains(status.output, "det+blind"));
  const std::string audit = read_file(sandbox.store_dir() + "/audit.log");
  CHECK(contains(audit, "\"event\":\"derivation-pinned\""));
  CHECK(contains(audit, "\"purpose\":\"blind_index\""));
  CHECK(contains(audit, "\"purpose\":\"deterministic\""));

  // --force still works, and then blind indexes of the key fail clearly.
  REQUIRE(sandbox.keyctl({"destroy", "pk", "--version", "1", "--force"}).exit_code == 0);
  PgConn fresh(sandbox.conninfo());
  CHECK(fresh.exec("SELECT colcrypt.blind_index('alice', 'pk')").sqlstate == "55000");
}

TEST_CASE("row counting runs off keyd's loop: fetches are served while a table is locked",
          "[keyd][count]") {
  Sandbox::Options options = counting_options("--count-timeout-ms 4000");
  options.env.push_back(root_may_fetch());
  Sandbox sandbox(options);
  sandbox.create_extension();
  sandbox.create_key("ck");
  PgConn setup(sandbox.conninfo());
  setup.value("CREATE TABLE t (id int, v colcrypt.encrypted)");
  setup.value(
      "INSERT INTO t SELECT g, colcrypt.encrypt_field('r' || g, 'ck') "
      "FROM generate_series(1, 3) g");
  REQUIRE(sandbox.keyctl({"rotate", "ck"}).exit_code == 0);

  PgConn locker(sandbox.conninfo());
  auto hold_lock = [&] {
    locker.value("BEGIN");
    locker.value("LOCK TABLE t IN ACCESS EXCLUSIVE MODE");
  };
  // Fetches while the count waits for the lock: each within 1 s.
  auto fetches_are_prompt = [&] {
    for (int i = 0; i < 5; ++i) {
      const auto start = Clock::now();
      keyd_client(sandbox).fetch_primary_block("ck", 0);
      CHECK(seconds_since(start) < 1.0);
      const auto sql_start = Clock::now();
      PgConn backend(sandbox.conninfo());  // a new backend: a cache miss
      CHECK(backend.value("SELECT colcrypt.decrypt_field(colcrypt.encrypt_field('z', 'ck'))") ==
            "z");
      CHECK(seconds_since(sql_start) < 1.0);
    }
  };

  // A destroy that waits for its count behind the lock.
  auto pending_destroy = [&] {
    hold_lock();
    auto destroy = std::async(std::launch::async, [&] {
      return sandbox.keyctl({"destroy", "ck", "--version", "1"});
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    return destroy;
  };

  SECTION("the destroy waits for the count, then is refused with the rows") {
    const auto start = Clock::now();
    auto destroy = pending_destroy();
    fetches_are_prompt();
    CHECK(destroy.wait_for(std::chrono::milliseconds(0)) == std::future_status::timeout);
    locker.value("COMMIT");
    CommandResult r = destroy.get();
    INFO(r.output);
    CHECK(r.exit_code == 1);
    CHECK(contains(r.output, "still used by 3 rows"));
    CHECK(seconds_since(start) < 4.0);  // answered when the lock went, not at the timeout

    // Once no row uses version 1, the destroy goes through.
    PgConn fresh(sandbox.conninfo());
    fresh.value("UPDATE t SET v = colcrypt.rewrap(v)");
    CommandResult ok = sandbox.keyctl({"destroy", "ck", "--version", "1"});
    INFO(ok.output);
    CHECK(ok.exit_code == 0);
    CHECK(fresh.value("SELECT string_agg(colcrypt.decrypt_field(v), ',' ORDER BY id) FROM t") ==
          "r1,r2,r3");
  }
  SECTION("the store is checked again when the count arrives") {
    PgConn fresh(sandbox.conninfo());
    fresh.value("UPDATE t SET v = colcrypt.rewrap(v)");
    auto destroy = pending_destroy();
    // Meanwhile another admin destroys the version (forced: no count).
    REQUIRE(sandbox.keyctl({"destroy", "ck", "--version", "1", "--force"}).exit_code == 0);
    locker.value("COMMIT");
    CommandResult r = destroy.get();
    INFO(r.output);
    CHECK(r.exit_code == 1);
    CHECK(contains(r.output, "version 1 of key 'ck' is already destroyed"));
  }
  SECTION("a count that cannot finish ends at --count-timeout-ms with a clear error") {
    const auto start = Clock::now();
    auto destroy = pending_destroy();
    fetches_are_prompt();
    CommandResult r = destroy.get();
    const double waited = seconds_since(start);
    INFO(r.output);
    CHECK(r.exit_code == 1);
    CHECK(contains(r.output, "did not finish within --count-timeout-ms (4000 ms)"));
    CHECK(contains(r.output, "locked"));
    CHECK(waited >= 3.5);
    CHECK(waited < 10.0);
    locker.value("COMMIT");
    // The version is untouched.
    CHECK(keyctl_json(sandbox, {"show", "ck"})["versions"][0]["state"] == "decrypt-only");
  }
}

// RLIMIT_FSIZE set on the running keyd: its audit appends fail with EFBIG (a
// real write failure; keyd ignores SIGXFSZ). Returns false when prlimit is
// not available here.
bool limit_file_size(pid_t pid, rlim_t bytes) {
  rlimit limit{bytes, RLIM_INFINITY};
  return ::prlimit(pid, RLIMIT_FSIZE, &limit, nullptr) == 0;
}

TEST_CASE("a failed audit write: fetches refused (fail closed), then an audit_gap entry",
          "[keyd][audit-gap]") {
  Sandbox::Options options;
  options.with_postgres = false;
  options.env = {root_may_fetch()};
  Sandbox sandbox(options);
  sandbox.create_key("ak");
  for (int i = 0; i < 100; ++i) keyd_client(sandbox).fetch_primary_block("ak", 0);
  const std::string log_path = sandbox.store_dir() + "/audit.log";
  const pid_t pid = sandbox.keyd_pid();
  if (!limit_file_size(pid, read_file(log_path).size())) {
    WARN("prlimit(RLIMIT_FSIZE) is not available here: skipping the audit write failure test");
    return;
  }
  // Fail closed: no key leaves while its audit entry cannot be written.
  for (int i = 0; i < 3; ++i) {
    try {
      keyd_client(sandbox).fetch_primary_block("ak", 0);
      FAIL("keyd handed out a key it could not audit");
    } catch (const colcrypt::Error& e) {
      INFO(e.what());
      CHECK(e.code() == colcrypt::Errc::Io);  // FailureCode::Unavailable; SQL: 58030
      CHECK(contains(e.what(), "cannot write its audit log (File too large)"));
    }
  }
  CHECK(contains(sandbox.keyctl({"status"}).output, "AUDIT LOG NOT WRITABLE"));
  REQUIRE(limit_file_size(pid, RLIM_INFINITY));
  keyd_client(sandbox).fetch_primary_block("ak", 0);  // writable again: served

  CommandResult verify = sandbox.keyctl({"audit", "verify"});
  INFO(verify.output);
  CHECK(verify.exit_code == 4);  // intact chain, but entries were lost
  CHECK(contains(verify.output, "lost entries"));
  CHECK(contains(verify.output, "File too large"));
  CommandResult as_json = sandbox.keyctl({"--json", "audit", "verify"});
  CHECK(as_json.exit_code == 4);
  const json verdict = json::parse(as_json.output);
  CHECK(verdict["ok"] == true);
  CHECK(verdict["lost"].get<int>() >= 3);  // the refused fetches' entries at least
  CHECK(verdict["gaps"].size() == 1);
  // Offline, from the store and the master secret, the same verdict.
  CommandResult offline = sandbox.keyctl({"audit", "verify", "--store", sandbox.store_dir(),
                                          "--password-file", sandbox.dir() + "/master-password"});
  INFO(offline.output);
  CHECK(offline.exit_code == 4);

  // --audit-failure serve: keys go out unaudited, the gap is recorded all the same.
  sandbox.must("keyd-stop");
  sandbox.must("keyd-start", {{"SANDBOX_KEYD_ARGS", "--audit-failure serve"}, root_may_fetch()});
  const pid_t serving = sandbox.keyd_pid();
  REQUIRE(limit_file_size(serving, read_file(log_path).size()));
  keyd_client(sandbox).fetch_primary_block("ak", 0);
  REQUIRE(limit_file_size(serving, RLIM_INFINITY));
  keyd_client(sandbox).fetch_primary_block("ak", 0);
  const json served = json::parse(sandbox.keyctl({"--json", "audit", "verify"}).output);
  CHECK(served["gaps"].size() == 2);
}

TEST_CASE("a full disk during create and rotate: a clear error, nothing lost, keyd recovers",
          "[keyd][full-disk]") {
  Sandbox::Options options;
  options.with_postgres = false;
  options.env = {root_may_fetch()};
  Sandbox sandbox(options);
  sandbox.create_key("fk");
  const auto v1 = keyd_client(sandbox).fetch_primary_block("fk", 1).key;
  sandbox.keyctl({"audit", "verify"});  // a sync point: nothing is left to write
  const std::string store_before = read_file(sandbox.store_file());
  const pid_t pid = sandbox.keyd_pid();
  // Every file keyd writes is full: the store's temp file and the audit log.
  if (!limit_file_size(pid, 64)) {
    WARN("prlimit(RLIMIT_FSIZE) is not available here: skipping the full disk test");
    return;
  }
  CommandResult create = sandbox.keyctl({"create", "fk2"});
  INFO(create.output);
  CHECK(create.exit_code == 1);
  CHECK(contains(create.output, "cannot write key store"));
  CHECK(contains(create.output, "File too large"));
  CommandResult rotate = sandbox.keyctl({"rotate", "fk"});
  INFO(rotate.output);
  CHECK(rotate.exit_code == 1);
  CHECK(contains(rotate.output, "cannot write key store"));
  // Nothing changed, on disk or in keyd; no temp file is left.
  CHECK(read_file(sandbox.store_file()) == store_before);
  CHECK_FALSE(path_exists(sandbox.store_dir() + "/keystore.json.tmp"));
  json shown = keyctl_json(sandbox, {"show", "fk"});
  CHECK(shown["primary_version"] == 1);
  CHECK(shown["versions"].size() == 1);
  CHECK(keyctl_json(sandbox, {"list"})["keys"].size() == 1);

  // Space returns: the same requests succeed, without a restart.
  REQUIRE(limit_file_size(pid, RLIM_INFINITY));
  CHECK(sandbox.keyctl({"create", "fk2"}).exit_code == 0);
  CHECK(sandbox.keyctl({"rotate", "fk"}).exit_code == 0);
  sandbox.must("keyd-stop");
  sandbox.must("keyd-start", {root_may_fetch()});
  shown = keyctl_json(sandbox, {"show", "fk"});
  CHECK(shown["primary_version"] == 2);
  CHECK(keyctl_json(sandbox, {"list"})["keys"].size() == 2);
  const auto again = keyd_client(sandbox).fetch_version(v1.id, 1);
  auto bytes = [](const colcrypt::SecretBytes& b) {
    return std::string(reinterpret_cast<const char*>(b.data()), b.size());
  };
  CHECK(bytes(again.key) == bytes(v1.key));
  // The audit entries keyd could not write are a recorded gap, not a break.
  CommandResult verify = sandbox.keyctl({"audit", "verify"});
  INFO(verify.output);
  CHECK((verify.exit_code == 0 || verify.exit_code == 4));
}

TEST_CASE("peers trickling frames cannot starve a client; keyd drops them", "[keyd][slowloris]") {
  Sandbox::Options options;
  options.with_postgres = false;
  options.env = {{"SANDBOX_KEYD_ARGS", "--max-connections 8"}, root_may_fetch()};
  Sandbox sandbox(options);
  sandbox.create_key("lk");
  // Every connection keyd allows holds the start of a request, never its end.
  std::vector<int> slow;
  for (int i = 0; i < 8; ++i) {
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    REQUIRE(fd >= 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", sandbox.keyd_socket().c_str());
    REQUIRE(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    const uint8_t start[3] = {0, 0, 0};  // 3 of a length prefix's 4 bytes
    REQUIRE(::send(fd, start, sizeof start, MSG_NOSIGNAL) == 3);
    slow.push_back(fd);
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  // A client still gets its key: a trickling peer makes room, not the client.
  const auto start = Clock::now();
  CHECK_NOTHROW(keyd_client(sandbox).fetch_primary_block("lk", 1));
  CHECK(seconds_since(start) < 2.0);
  // And keyd drops every trickled frame 5 s after its first byte.
  size_t closed = 0;
  for (int fd : slow) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 8000) == 1) {
      char c;
      closed += ::recv(fd, &c, 1, 0) == 0;
    }
    ::close(fd);
  }
  CHECK(closed == slow.size());
}

TEST_CASE("keyctl audit verify offline: the store and the master secret, no keyd",
          "[keyd][offline-verify]") {
  Sandbox::Options options;
  options.with_postgres = false;
  Sandbox sandbox(options);
  sandbox.create_key("ok");
  const std::string password_file = sandbox.dir() + "/master-password";
  auto offline = [&](const std::vector<std::string>& extra, const Env& env = {}) {
    std::vector<std::string> args = {"audit", "verify", "--store", sandbox.store_dir()};
    args.insert(args.end(), extra.begin(), extra.end());
    return sandbox.keyctl(args, env);
  };
  // While keyd runs (and holds the store's lock) ...
  CommandResult running = offline({"--password-file", password_file});
  INFO(running.output);
  CHECK(running.exit_code == 0);
  CHECK(contains(running.output, "chain and head intact"));
  // ... and once it is down; the password may also come from the environment.
  sandbox.must("keyd-stop");
  CHECK(offline({"--password-file", password_file}).exit_code == 0);
  CHECK(offline({}, {{"ENCRYPTION_MASTER_PASSWORD",
                      read_file(password_file).substr(0, read_file(password_file).size() - 1)}})
            .exit_code == 0);
  // A wrong secret cannot verify anything; no secret at all is a usage error.
  const std::string wrong = sandbox.dir() + "/wrong-password";
  {
    std::ofstream out(wrong);
    out << "not the password\n";
  }
  ::chmod(wrong.c_str(), 0600);
  CommandResult bad = offline({"--password-file", wrong});
  CHECK(bad.exit_code == 1);
  CHECK(contains(bad.output, "wrong master password"));
  CHECK(offline({}).exit_code == 2);
  // Tampering is caught, exit 1 as with keyd's own verify.
  const std::string log_path = sandbox.store_dir() + "/audit.log";
  std::string log = read_file(log_path);
  const size_t at = log.find("\"event\":\"admin\"");
  REQUIRE(at != std::string::npos);
  log.replace(at, 17, "\"event\":\"admiN\"");
  {
    std::ofstream out(log_path, std::ios::trunc);
    out << log;
  }
  CommandResult tampered = offline({"--password-file", password_file});
  INFO(tampered.output);
  CHECK(tampered.exit_code == 1);
  CHECK(contains(tampered.output, "FAILED verification"));
}

TEST_CASE("a key reply goes out only once its audit entry is in the file: kill -9 loses none",
          "[keyd][audit-sync]") {
  const std::string mode = GENERATE(std::string("batch"), std::string("always"));
  INFO("--audit-sync " << mode);
  Sandbox::Options options;
  options.with_postgres = false;
  options.env = {{"SANDBOX_KEYD_ARGS", "--audit-sync " + mode}, root_may_fetch()};
  Sandbox sandbox(options);
  sandbox.create_key("sk");
  CHECK(json::parse(sandbox.keyctl({"--json", "status"}).output)["audit_sync"] == mode);
  const std::string log_path = sandbox.store_dir() + "/audit.log";
  auto fetches_in_log = [&] {
    const std::string log = read_file(log_path);
    size_t n = 0;
    for (size_t at = log.find("\"event\":\"fetch\""); at != std::string::npos;
         at = log.find("\"event\":\"fetch\"", at + 1)) {
      ++n;
    }
    return n;
  };
  // Concurrent clients, so that replies share a batch (one write, one fdatasync).
  std::atomic<int> served{0};
  std::vector<std::thread> clients;
  for (int t = 0; t < 8; ++t) {
    clients.emplace_back([&] {
      for (int i = 0; i < 25; ++i) {
        try {
          keyd_client(sandbox).fetch_primary_block("sk", 0);
          ++served;
        } catch (const std::exception&) {
        }
      }
    });
  }
  for (auto& th : clients) th.join();
  CHECK(served.load() == 200);
  // No stop entry, no final sync: whatever keyd did not write before it
  // replied is gone.
  sandbox.must("keyd-kill");
  CHECK(fetches_in_log() == static_cast<size_t>(served.load()));
  // The head was replaced with the same write batch: the chain verifies.
  sandbox.must("keyd-start");
  CommandResult verify = sandbox.keyctl({"audit", "verify"});
  INFO(verify.output);
  CHECK(verify.exit_code == 0);
}

TEST_CASE("keyd refuses an unknown --audit-sync", "[keyd][audit-sync][startup]") {
  Sandbox::Options options;
  options.with_postgres = false;
  Sandbox sandbox(options);
  sandbox.must("keyd-stop");
  CommandResult r = sandbox.run("keyd-start", {{"SANDBOX_KEYD_ARGS", "--audit-sync sometimes"}});
  INFO(r.output);
  CHECK(r.exit_code == 64);
  CHECK(contains(r.output, "--audit-sync must be batch or always"));
  CHECK_FALSE(path_exists(sandbox.keyd_socket()));
}

TEST_CASE("a backend keeps one connection to keyd across fetches and keyd restarts",
          "[keyd][kept]") {
  Sandbox sandbox;
  sandbox.create_extension();
  for (const char* k : {"kept_a", "kept_b", "kept_c"}) sandbox.create_key(k);
  PgConn conn(sandbox.conninfo());
  const std::string pid = conn.value("SELECT pg_backend_pid()");
  const int before = open_sockets(pid);
  conn.value("SELECT colcrypt.encrypt_field('x', 'kept_a')");
  CHECK(open_sockets(pid) == before + 1);
  // Two more keys (two more fetches): still the one connection.
  conn.value("SELECT colcrypt.encrypt_field('x', 'kept_b'), colcrypt.encrypt_field('x', 'kept_c')");
  CHECK(open_sockets(pid) == before + 1);
  // keyd restarted meanwhile: the kept connection is dead; the next fetch
  // connects again without an error.
  sandbox.must("keyd-stop");
  sandbox.must("keyd-start");
  conn.value("SET colcrypt.key_cache_ttl = 0");
  CHECK(conn.value("SELECT colcrypt.decrypt_field(colcrypt.encrypt_field('y', 'kept_a'))") == "y");
  CHECK(open_sockets(pid) == before + 1);
}
