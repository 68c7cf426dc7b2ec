// Failover driven by pg_auto_failover (Debian's pg-auto-failover-cli and
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
#include <signal.h>
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

std::string rows_decrypting(const std::string& conninfo) {
  PgConn conn(conninfo);
  PgConn::Outcome o =
      conn.exec("SELECT count(*) FROM t WHERE colcrypt.decrypt_field(v) = 'v' || id");
  INFO(o.sqlstate << " " << o.message);
  CHECK(o.sqlstate.empty());
  return o.sqlstate.empty() ? *o.rows.at(0).at(0) : "error";
}

}  // namespace

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
  CHECK(rows_decrypting(cluster.conninfo(2)) == "20");
  CommandResult refused = keyd2.keyctl({"rotate", "pk"});
  CHECK(refused.exit_code != 0);
  CHECK(refused.output.find("primary") != std::string::npos);

  // pg_autoctl promotes node2 and rewinds node1 into a secondary.
  size_t mark1 = keyd1.keyd_log().size();
  size_t mark2 = keyd2.keyd_log().size();
  cluster.failover();
  cluster.wait_stable(2, 2);
  keyd2.wait_keyd_log(mark2, "now writable");
  keyd1.wait_keyd_log(mark1, "now read-only");
  cluster.point_at_keyd(1, keyd1);

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
  CHECK(rows_decrypting(cluster.conninfo(1)) == "30");
  PgConn node1(cluster.conninfo(1));
  CHECK(node1.value("SELECT count(*) FROM t WHERE colcrypt.key_version(v) = 2") == "30");
}
