// Replicas and failover (issue 14): a primary and a hot standby on this
// machine (pg_basebackup -R, scripts/sandbox.sh standby), each with its own
// keyd on --store-db to its local database and the same master secret. The
// standby's keyd sees every key version in WAL order, refuses admin requests,
// and after a failover the promoted side's keyd writes while the rewound old
// primary's keyd is read-only; no keyd is restarted or reconfigured by hand.
//
// Nothing here sleeps for a fixed time: replication is waited for on the
// standby's replay LSN (Sandbox::wait_replayed), keyd's state changes on its
// log line or on its answers, each with a bound.
#include <stdlib.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "harness.hpp"

using namespace colcrypt::test;

namespace {

// Both keyds: jobs and counts in their local database; no retirement grace,
// so the old version can be disabled right after the job.
Env replica_env() {
  return {{"SANDBOX_KEYD_ARGS",
           "--database @DATABASE@ --job-poll-interval-ms 200 --retire-grace-seconds 0"}};
}

Sandbox::Options primary_options() {
  Sandbox::Options o;
  o.store_db = true;
  o.replication = true;
  o.env = replica_env();
  return o;
}

Sandbox::Options standby_options(const Sandbox& primary) {
  Sandbox::Options o;
  o.store_db = true;
  o.standby_of = &primary;
  o.env = replica_env();
  return o;
}

void keyctl_ok(const Sandbox& sandbox, const std::vector<std::string>& args) {
  CommandResult r = sandbox.keyctl(args);
  INFO("keyctl " << args.front() << " on " << sandbox.dir() << ": " << r.output);
  REQUIRE(r.exit_code == 0);
}

// An admin request a read-only keyd must refuse, naming the primary; and the
// refusal comes from keyd, not from Postgres refusing a write.
void check_refused_as_standby(const Sandbox& sandbox, const std::vector<std::string>& args) {
  CommandResult r = sandbox.keyctl(args);
  INFO("keyctl " << args.front() << " on " << sandbox.dir() << ": " << r.output);
  CHECK(r.exit_code != 0);
  CHECK(r.output.find("standby") != std::string::npos);
  CHECK(r.output.find("primary") != std::string::npos);
  CHECK(r.output.find("read-only transaction") == std::string::npos);
}

// Rows of t whose value decrypts to 'v' || id, read in a fresh session (no
// key cached by an earlier statement); CHECKs that the query succeeds.
std::string rows_decrypting(const Sandbox& sandbox) {
  PgConn conn(sandbox.conninfo());
  PgConn::Outcome o =
      conn.exec("SELECT count(*) FROM t WHERE colcrypt.decrypt_field(v) = 'v' || id");
  INFO("decrypting t on " << sandbox.dir() << ": " << o.sqlstate << " " << o.message);
  CHECK(o.sqlstate.empty());
  return o.sqlstate.empty() ? *o.rows.at(0).at(0) : "error";
}

// Waits until keyd refuses admin requests because its database is a standby
// (not merely unreachable, as while it was down or being rewound). Asks to
// rotate a key that does not exist: that changes nothing in any state.
void wait_standby_keyd(const Sandbox& keyd) {
  CommandResult r;
  for (int waited = 0; waited <= 30000; waited += 100) {
    r = keyd.keyctl({"rotate", "no-such-key"});
    if (r.output.find("standby") != std::string::npos) return;
    usleep(100000);
  }
  FAIL("keyd of " << keyd.dir() << " does not act as a standby's: " << r.output);
}

// Rows from..to of t, (id, 'v' || id): the column encrypts under its key.
void insert_rows(const Sandbox& sandbox, int from, int to) {
  PgConn conn(sandbox.conninfo());
  conn.value("INSERT INTO t SELECT g, 'v' || g FROM generate_series(" + std::to_string(from) +
             ", " + std::to_string(to) + ") g");
}

// ---------------------------------------------------------- pg_auto_failover

const std::string kPgBin = "/usr/lib/postgresql/15/bin";

CommandResult as_postgres(const std::vector<std::string>& argv) {
  std::vector<std::string> full = {"runuser", "-u",  "postgres",
                                   "--",      "env", "PATH=" + kPgBin + ":/usr/bin:/bin"};
  full.insert(full.end(), argv.begin(), argv.end());
  return run_command(full);
}

void must(const CommandResult& r, const std::string& what) {
  if (r.exit_code != 0) {
    throw std::runtime_error(what + " exited " + std::to_string(r.exit_code) + ":\n" + r.output);
  }
}

// A monitor and up to two nodes, in one temp directory; torn down (pg_autoctl
// stop, then the directory removed) by the destructor.
class AutoFailover {
 public:
  AutoFailover() {
    char dir[] = "/tmp/colcrypt-paf.XXXXXX";
    if (!mkdtemp(dir)) throw std::runtime_error(std::string("mkdtemp: ") + std::strerror(errno));
    dir_ = dir;
    must(run_command({"chown", "postgres:postgres", dir_}), "chown");
    // Loopback TCP ports (pg_auto_failover connects nodes by host and port).
    base_port_ = 56000 + (getpid() % 300) * 3;
    must(as_postgres({"pg_autoctl", "create", "monitor", "--pgdata", pgdata("monitor"), "--pgport",
                      std::to_string(base_port_), "--hostname", "127.0.0.1", "--auth", "trust",
                      "--no-ssl"}),
         "pg_autoctl create monitor");
    start_background({"pg_autoctl", "run", "--pgdata", pgdata("monitor")}, "monitor");
  }

  ~AutoFailover() {
    for (const char* name : {"node2", "node1", "monitor"}) {
      if (path_exists(pgdata(name))) as_postgres({"pg_autoctl", "stop", "--pgdata", pgdata(name)});
    }
    for (const char* name : {"node2", "node1", "monitor"}) {
      for (int i = 0; i < 300 && path_exists(pgdata(name) + "/postmaster.pid"); ++i) usleep(100000);
    }
    const char* keep = getenv("COLCRYPT_KEEP_SANDBOX");
    if (!(keep && std::string(keep) == "1")) run_command({"rm", "-rf", dir_});
  }
  AutoFailover(const AutoFailover&) = delete;
  AutoFailover& operator=(const AutoFailover&) = delete;

  std::string pgdata(const std::string& name) const { return dir_ + "/" + name; }
  int port(int node) const { return base_port_ + node; }
  std::string uri(int node) const {
    return "postgresql://postgres@127.0.0.1:" + std::to_string(port(node)) + "/postgres";
  }
  std::string conninfo(int node) const {
    return "host=127.0.0.1 port=" + std::to_string(port(node)) +
           " user=postgres dbname=postgres options='-c client_min_messages=warning'";
  }

  // pg_autoctl create postgres --run, in the background (the keeper of node N).
  void add_node(int node) {
    const std::string name = "node" + std::to_string(node);
    start_background(
        {"pg_autoctl", "create", "postgres", "--pgdata", pgdata(name), "--pgport",
         std::to_string(port(node)), "--hostname", "127.0.0.1", "--name", name, "--monitor",
         "postgresql://autoctl_node@127.0.0.1:" + std::to_string(base_port_) +
             "/pg_auto_failover?sslmode=disable",
         "--auth", "trust", "--no-ssl", "--run"},
        name);
  }

  // Waits until the monitor reports every node in the state it assigned, and
  // node `primary` as the primary of `nodes` nodes (a lone node is "single").
  void wait_stable(int primary, int nodes, int timeout_ms = 90000) const {
    const std::string sql =
        "SELECT count(*) FILTER (WHERE reportedstate = goalstate AND "
        "reportedstate = CASE WHEN nodename = 'node" +
        std::to_string(primary) + "' THEN '" + (nodes == 1 ? "single" : "primary") +
        "' ELSE 'secondary' END::pgautofailover.replication_state) FROM pgautofailover.node";
    const std::string monitor = "host=127.0.0.1 port=" + std::to_string(base_port_) +
                                " user=autoctl_node dbname=pg_auto_failover";
    for (int waited = 0;; waited += 200) {
      try {
        PgConn conn(monitor);
        if (conn.value(sql) == std::to_string(nodes)) return;
      } catch (const std::exception&) {
        // the monitor is still starting
      }
      if (waited >= timeout_ms) {
        CommandResult state =
            as_postgres({"pg_autoctl", "show", "state", "--pgdata", pgdata("monitor")});
        throw std::runtime_error("pg_auto_failover not stable with node" + std::to_string(primary) +
                                 " as primary after " + std::to_string(timeout_ms) + " ms:\n" +
                                 state.output);
      }
      usleep(200000);  // polls the monitor's view of the nodes
    }
  }

  // This node's backends reach this node's keyd (see the file comment).
  void point_at_keyd(int node, const Sandbox& keyd) const {
    const std::string conf = pgdata("node" + std::to_string(node)) + "/postgresql.conf";
    must(as_postgres({"sh", "-c", "printf \"colcrypt.keyd_socket = '%s'\\n\" \"$1\" >>\"$2\"", "sh",
                      keyd.keyd_socket(), conf}),
         "setting colcrypt.keyd_socket");
    PgConn(conninfo(node)).value("SELECT pg_reload_conf()");
  }

  void failover() const {
    must(as_postgres({"pg_autoctl", "perform", "failover", "--pgdata", pgdata("monitor")}),
         "pg_autoctl perform failover");
  }

 private:
  void start_background(const std::vector<std::string>& argv, const std::string& name) {
    std::string command =
        "exec setsid runuser -u postgres -- env PATH=" + kPgBin + ":/usr/bin:/bin";
    for (const auto& a : argv) command += " '" + a + "'";
    command += " >>'" + dir_ + "/" + name + ".log' 2>&1 </dev/null &";
    must(run_command({"sh", "-c", command}), "starting " + name);
  }

  std::string dir_;
  int base_port_ = 0;
};

// Node N's keyd: its store and its jobs in node N's database "postgres".
Sandbox::Options node_keyd(const AutoFailover& cluster, int node) {
  Sandbox::Options o;
  o.with_postgres = false;
  o.env = {{"SANDBOX_KEYD_STORE_DB", "host=127.0.0.1 port=" + std::to_string(cluster.port(node)) +
                                         " dbname=postgres user=postgres"},
           {"SANDBOX_KEYD_ARGS", "--database " + cluster.uri(node) +
                                     " --job-poll-interval-ms 200 --retire-grace-seconds 0"}};
  return o;
}

std::string rows_decrypting_at(const std::string& conninfo) {
  PgConn conn(conninfo);
  PgConn::Outcome o =
      conn.exec("SELECT count(*) FROM t WHERE colcrypt.decrypt_field(v) = 'v' || id");
  INFO(o.sqlstate << " " << o.message);
  CHECK(o.sqlstate.empty());
  return o.sqlstate.empty() ? *o.rows.at(0).at(0) : "error";
}

}  // namespace

TEST_CASE("replica: the standby's keyd decrypts what the primary wrote, in WAL order",
          "[replica]") {
  Sandbox primary(primary_options());
  primary.create_extension();
  keyctl_ok(primary, {"create", "rk"});
  {
    PgConn conn(primary.conninfo());
    conn.value("CREATE TABLE t (id int PRIMARY KEY, v colcrypt.encrypted('rk'), copy text)");
  }
  insert_rows(primary, 1, 50);
  // A ciphertext of version 1 kept as text, where no count or job sees it: it
  // shows the standby when version 1 is disabled.
  {
    PgConn conn(primary.conninfo());
    conn.value(
        "UPDATE t SET copy = colcrypt.ciphertext(colcrypt.encrypt_field('kept', 'rk')) WHERE id = "
        "1");
  }

  Sandbox standby(standby_options(primary));
  REQUIRE(standby.in_recovery());
  standby.wait_replayed(primary);
  CHECK(rows_decrypting(standby) == "50");

  // Admin requests to the standby's keyd are refused and name the primary;
  // nothing changes.
  check_refused_as_standby(standby, {"rotate", "rk"});
  check_refused_as_standby(standby, {"create", "other"});
  check_refused_as_standby(standby, {"disable", "rk", "--version", "1", "--force"});
  check_refused_as_standby(standby, {"reencrypt", "rk"});
  // Nor does it hand out a key to encrypt with: it cannot reserve the uses in
  // its read-only database, and a usage count must never fall short.
  {
    PgConn conn(standby.conninfo());
    PgConn::Outcome o = conn.exec("SELECT colcrypt.encrypt_field('x', 'rk')");
    INFO(o.message);
    CHECK(o.sqlstate == "55000");
  }
  // Nor a file key: colcrypt-file seals every file under a random nonce, an
  // encryption to count like any other (exit 4: the key refused).
  {
    CommandResult r = as_postgres({COLCRYPT_FILE_BIN, "--socket", standby.keyd_socket(), "encrypt",
                                   "--key", "rk", "/dev/null", "-"});
    INFO(r.output);
    CHECK(r.exit_code == 4);
    CHECK(r.output.find("standby") != std::string::npos);
  }

  // A rotation on the primary: a value under version 2 decrypts on the standby
  // as soon as its row has replayed, in a session that already holds version 1
  // and from a keyd that served version 1 before (it reads version 2 on demand).
  PgConn standby_session(standby.conninfo());
  CHECK(standby_session.value("SELECT colcrypt.decrypt_field(v) FROM t WHERE id = 2") == "v2");
  keyctl_ok(primary, {"rotate", "rk"});
  insert_rows(primary, 51, 60);
  {
    PgConn conn(primary.conninfo());
    REQUIRE(conn.value("SELECT count(*) FROM t WHERE colcrypt.key_version(v) = 2") == "10");
  }
  standby.wait_replayed(primary);
  CHECK(standby_session.value("SELECT count(*) FROM t WHERE id > 50 AND "
                              "colcrypt.decrypt_field(v) = 'v' || id") == "10");
  CHECK(rows_decrypting(standby) == "60");

  // A re-encryption job and a disable of version 1 on the primary: every row
  // moved to version 2 and still decrypts on the standby, and the standby
  // refuses version 1 like the primary does.
  keyctl_ok(primary, {"reencrypt", "rk", "--wait"});
  keyctl_ok(primary, {"disable", "rk", "--version", "1"});
  standby.wait_replayed(primary);
  {
    PgConn conn(standby.conninfo());
    CHECK(conn.value("SELECT count(*) FROM t WHERE colcrypt.key_version(v) = 1") == "0");
  }
  CHECK(rows_decrypting(standby) == "60");
  {
    PgConn conn(primary.conninfo());
    CHECK(conn.exec("SELECT colcrypt.decrypt_field(copy::colcrypt.encrypted) FROM t WHERE id = 1")
              .sqlstate == "55000");
  }
  // A state change of a version keyd already holds reaches the standby's keyd
  // at its next look at the tables (about a second), like a backend's key
  // cache on the primary lags by colcrypt.key_cache_ttl: bounded, not instant.
  PgConn::Outcome disabled;
  for (int waited = 0; waited <= 10000; waited += 100) {
    disabled = PgConn(standby.conninfo())
                   .exec(
                       "SELECT colcrypt.decrypt_field(copy::colcrypt.encrypted) FROM t "
                       "WHERE id = 1");
    if (!disabled.sqlstate.empty()) break;
    usleep(100000);
  }
  INFO(disabled.message);
  CHECK(disabled.sqlstate == "55000");
  // The standby's keyd ran no job (it would have failed on a read-only database).
  CHECK(standby.keyd_log().find("read-only transaction") == std::string::npos);
}

TEST_CASE("replica: failover: the promoted side's keyd writes, the rewound old primary's reads",
          "[replica]") {
  Sandbox primary(primary_options());
  primary.create_extension();
  keyctl_ok(primary, {"create", "fk"});
  {
    PgConn conn(primary.conninfo());
    conn.value("CREATE TABLE t (id int PRIMARY KEY, v colcrypt.encrypted('fk'))");
  }
  insert_rows(primary, 1, 40);
  Sandbox standby(standby_options(primary));
  standby.wait_replayed(primary);
  CHECK(rows_decrypting(standby) == "40");
  check_refused_as_standby(standby, {"rotate", "fk"});

  // The primary's Postgres dies; the standby is promoted. Its keyd notices by
  // itself, without a restart.
  const pid_t standby_keyd = standby.keyd_pid();
  const pid_t primary_keyd = primary.keyd_pid();
  const size_t log_mark = standby.keyd_log().size();
  const size_t primary_mark = primary.keyd_log().size();
  primary.crash_postgres();
  standby.promote();
  standby.wait_keyd_log(log_mark, "now writable");
  CHECK(standby.keyd_pid() == standby_keyd);

  // It writes: a rotation, rows under the new version, a re-encryption job.
  keyctl_ok(standby, {"rotate", "fk"});
  insert_rows(standby, 41, 50);
  keyctl_ok(standby, {"reencrypt", "fk", "--wait"});
  {
    PgConn conn(standby.conninfo());
    CHECK(conn.value("SELECT count(*) FROM t WHERE colcrypt.key_version(v) = 2") == "50");
  }
  CHECK(rows_decrypting(standby) == "50");

  // The old primary, rewound and started as a standby of the new one: its keyd
  // (the same process all along) is read-only, refuses admin requests naming
  // the primary, and decrypts rows under the version created after the
  // failover.
  primary.rewind_from(standby);
  REQUIRE(primary.in_recovery());
  wait_standby_keyd(primary);
  CHECK(primary.keyd_pid() == primary_keyd);
  // Back after the outage as a standby: a role change, logged and audited
  // (not only "reachable again").
  primary.wait_keyd_log(primary_mark, "key store now read-only: this keyd's");
  CHECK(read_file(primary.dir() + "/keyd-state/audit.log").find("is a standby (in recovery)") !=
        std::string::npos);
  check_refused_as_standby(primary, {"rotate", "fk"});
  check_refused_as_standby(primary, {"reencrypt", "fk"});
  primary.wait_replayed(standby);
  CHECK(rows_decrypting(primary) == "50");
  {
    PgConn conn(primary.conninfo());
    CHECK(conn.value("SELECT count(*) FROM t WHERE colcrypt.key_version(v) = 2") == "50");
  }
}

// keyd records (timeline, generation): the rewound tables are at a lower
// generation but on a higher timeline, a new term. Without that rule the old
// primary's keyd refuses them as "rolled back", keeps its lost version 2 and
// serves it for the new primary's version 2 (the rows fail with 39000).
TEST_CASE("replica: a key change lost in a failover is forgotten by the old primary's keyd",
          "[replica]") {
  // The standby stops streaming; the primary rotates and seals a row under its
  // version 2, which the standby never receives; the primary dies and the
  // standby is promoted. pg_rewind throws the old primary's version 2 away, so
  // its tables are now older than what its keyd has seen: that is a failover,
  // not a rollback by an attacker, and keyd must follow the tables. When the
  // new primary then makes a version 2 of its own (other key bytes, the store
  // generation the lost one had), the old primary's keyd must serve that one.
  Sandbox primary(primary_options());
  primary.create_extension();
  keyctl_ok(primary, {"create", "lk"});
  {
    PgConn conn(primary.conninfo());
    conn.value("CREATE TABLE t (id int PRIMARY KEY, v colcrypt.encrypted('lk'))");
  }
  insert_rows(primary, 1, 10);
  Sandbox standby(standby_options(primary));
  standby.wait_replayed(primary);
  {
    PgConn conn(standby.conninfo());
    conn.value("ALTER SYSTEM SET primary_conninfo = ''");
    conn.value("SELECT pg_reload_conf()");
    for (int waited = 0; conn.value("SELECT count(*) FROM pg_stat_wal_receiver") != "0";
         waited += 10) {
      REQUIRE(waited < 30000);
      usleep(10000);  // polls for the WAL receiver to stop
    }
  }
  keyctl_ok(primary, {"rotate", "lk"});
  insert_rows(primary, 11, 11);  // under the old primary's version 2: lost
  {
    PgConn conn(primary.conninfo());
    REQUIRE(conn.value("SELECT colcrypt.key_version(v) FROM t WHERE id = 11") == "2");
  }
  const pid_t primary_keyd = primary.keyd_pid();
  primary.crash_postgres();
  standby.promote();
  standby.wait_keyd_log(0, "now writable");
  insert_rows(standby, 11, 15);  // under version 1

  primary.rewind_from(standby);
  wait_standby_keyd(primary);
  CHECK(primary.keyd_pid() == primary_keyd);
  primary.wait_replayed(standby);
  CHECK(rows_decrypting(primary) == "15");
  primary.wait_keyd_log(0, "moved to timeline 2 (from 1)");
  {
    const std::string audit = read_file(primary.dir() + "/keyd-state/audit.log");
    CHECK(audit.find("\"event\":\"store-rewound\"") != std::string::npos);
    CHECK(audit.find("\"new_timeline\":2") != std::string::npos);
    CHECK(audit.find("store-corrupt") == std::string::npos);
    // The state file follows the tables: a restart takes them too.
    CHECK(read_file(primary.dir() + "/keyd-state/store-generation").find("timeline 2 ") == 0);
  }

  keyctl_ok(standby, {"rotate", "lk"});
  insert_rows(standby, 16, 20);  // under the new primary's version 2
  CHECK(rows_decrypting(standby) == "20");
  primary.wait_replayed(standby);
  CHECK(rows_decrypting(primary) == "20");
  check_refused_as_standby(primary, {"rotate", "lk"});
}

// The failover driven by pg_auto_failover (Debian's pg-auto-failover-cli and
// postgresql-15-auto-failover): a monitor and two nodes on this machine, run
// by pg_autoctl as the postgres user on loopback TCP ports, each node with
// its own keyd on --store-db to the node's database. pg_autoctl performs the
// failover (promotion, then pg_rewind of the old primary and its restart as
// a secondary); nothing is done to either keyd, which follow their
// databases' recovery state by themselves.
//
// Tag [replica-paf], run by ctest as its own test (about a minute: pg_autoctl's
// state machine, not keyd, takes most of it). The one thing done by hand is a
// test artefact: both nodes share one machine, so each needs its own
// colcrypt.keyd_socket, and pg_basebackup and pg_rewind copy the other node's
// postgresql.conf; the test sets it again after each. On real hosts every node
// uses the default /run/colcrypt/keyd.sock and needs nothing.
TEST_CASE("replica: pg_auto_failover fails over and both keyds follow by themselves",
          "[replica-paf]") {
  AutoFailover cluster;
  cluster.add_node(1);
  cluster.wait_stable(1, 1);
  Sandbox keyd1(node_keyd(cluster, 1));
  cluster.point_at_keyd(1, keyd1);
  {
    PgConn conn(cluster.conninfo(1));
    conn.value("CREATE EXTENSION colcrypt");
  }
  REQUIRE(keyd1.keyctl({"create", "pk"}).exit_code == 0);
  {
    PgConn conn(cluster.conninfo(1));
    conn.value("CREATE TABLE t (id int PRIMARY KEY, v colcrypt.encrypted('pk'))");
    conn.value("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 20) g");
  }

  cluster.add_node(2);
  cluster.wait_stable(1, 2);
  Sandbox keyd2(node_keyd(cluster, 2));
  cluster.point_at_keyd(2, keyd2);
  wait_replayed(cluster.conninfo(1), cluster.conninfo(2));
  CHECK(rows_decrypting_at(cluster.conninfo(2)) == "20");
  CommandResult refused = keyd2.keyctl({"rotate", "pk"});
  CHECK(refused.exit_code != 0);
  CHECK(refused.output.find("primary") != std::string::npos);

  // pg_autoctl promotes node2 and rewinds node1 into a secondary.
  const size_t mark2 = keyd2.keyd_log().size();
  cluster.failover();
  cluster.wait_stable(2, 2);
  keyd2.wait_keyd_log(mark2, "now writable");
  cluster.point_at_keyd(1, keyd1);
  wait_standby_keyd(keyd1);

  CommandResult rotated = keyd2.keyctl({"rotate", "pk"});
  INFO(rotated.output);
  REQUIRE(rotated.exit_code == 0);
  {
    PgConn conn(cluster.conninfo(2));
    conn.value("INSERT INTO t SELECT g, 'v' || g FROM generate_series(21, 30) g");
  }
  CommandResult job = keyd2.keyctl({"reencrypt", "pk", "--wait"});
  INFO(job.output);
  REQUIRE(job.exit_code == 0);
  refused = keyd1.keyctl({"rotate", "pk"});
  CHECK(refused.exit_code != 0);
  CHECK(refused.output.find("primary") != std::string::npos);
  wait_replayed(cluster.conninfo(2), cluster.conninfo(1));
  CHECK(rows_decrypting_at(cluster.conninfo(1)) == "30");
  PgConn node1(cluster.conninfo(1));
  CHECK(node1.value("SELECT count(*) FROM t WHERE colcrypt.key_version(v) = 2") == "30");
}
