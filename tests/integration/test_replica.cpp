// Replicas and failover (issue 14): a primary and a hot standby on this
// machine (pg_basebackup -R, scripts/sandbox.sh standby), each with its own
// keyd on --store-db to its local database and the same master secret. The
// standby's keyd sees every key version in WAL order, refuses admin requests,
// and after a failover the promoted side's keyd writes while the rewound old
// primary's keyd is read-only; no keyd is restarted or reconfigured by hand.
//
// Nothing here sleeps for a fixed time: replication is waited for on the
// standby's replay LSN (Sandbox::wait_replayed), keyd's state changes on its
// log line, each with a bound.
#include <unistd.h>

#include <catch2/catch.hpp>
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

// Rows from..to of t, (id, 'v' || id): the column encrypts under its key.
void insert_rows(const Sandbox& sandbox, int from, int to) {
  PgConn conn(sandbox.conninfo());
  conn.value("INSERT INTO t SELECT g, 'v' || g FROM generate_series(" + std::to_string(from) +
             ", " + std::to_string(to) + ") g");
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
    conn.value("UPDATE t SET copy = colcrypt.encrypt_field('kept', 'rk')::text WHERE id = 1");
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
  size_t log_mark = standby.keyd_log().size();
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
  log_mark = primary.keyd_log().size();
  primary.rewind_from(standby);
  REQUIRE(primary.in_recovery());
  primary.wait_keyd_log(log_mark, "now read-only");
  CHECK(primary.keyd_pid() == primary_keyd);
  check_refused_as_standby(primary, {"rotate", "fk"});
  check_refused_as_standby(primary, {"reencrypt", "fk"});
  primary.wait_replayed(standby);
  CHECK(rows_decrypting(primary) == "50");
  {
    PgConn conn(primary.conninfo());
    CHECK(conn.value("SELECT count(*) FROM t WHERE colcrypt.key_version(v) = 2") == "50");
  }
}

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

  size_t log_mark = primary.keyd_log().size();
  primary.rewind_from(standby);
  primary.wait_keyd_log(log_mark, "now read-only");
  CHECK(primary.keyd_pid() == primary_keyd);
  primary.wait_replayed(standby);
  CHECK(rows_decrypting(primary) == "15");

  keyctl_ok(standby, {"rotate", "lk"});
  insert_rows(standby, 16, 20);  // under the new primary's version 2
  CHECK(rows_decrypting(standby) == "20");
  primary.wait_replayed(standby);
  CHECK(rows_decrypting(primary) == "20");
  check_refused_as_standby(primary, {"rotate", "lk"});
}
