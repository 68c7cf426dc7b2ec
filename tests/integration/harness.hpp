// The integration tests' harness: every cluster and keyd they use is started
// by scripts/sandbox.sh (the one implementation shared with the demo and the
// pg_regress run), in a temp directory of its own. Runs as root.
#pragma once
#include <libpq-fe.h>
#include <sys/types.h>

#include <optional>
#include <pqxx/pqxx>
#include <string>
#include <utility>
#include <vector>

namespace colcrypt::test {

// Extra environment for a command: a value sets the variable, nullopt unsets it.
using EnvVar = std::pair<std::string, std::optional<std::string>>;
using Env = std::vector<EnvVar>;

struct CommandResult {
  int exit_code = -1;  // exit status, or 128 + signal number
  std::string output;  // stdout and stderr together
};

// Runs argv (argv[0] looked up on PATH) and waits for it. Output goes through a
// temp file, not a pipe, so daemons the command leaves behind cannot hold it open.
CommandResult run_command(const std::vector<std::string>& argv, const Env& env = {});

std::string read_file(const std::string& path);
bool path_exists(const std::string& path);
std::string postgres_uid();

// Called by the test runner for every failed assertion.
void record_failure();

class Sandbox {
 public:
  struct Options {
    bool with_postgres = true;  // false: keyd only (sandbox.sh keyd-start)
    Env env;                    // extra environment for starting it
    bool store_db = false;      // keyd's store in the sandbox's database "postgres" (--store-db)
    bool replication = false;   // a replication primary (SANDBOX_REPLICATION=1)
    // A hot standby of this sandbox's cluster (sandbox.sh standby), which must
    // have been made with `replication`.
    const Sandbox* standby_of = nullptr;
  };

  Sandbox();
  explicit Sandbox(Options options);
  ~Sandbox();
  Sandbox(const Sandbox&) = delete;
  Sandbox& operator=(const Sandbox&) = delete;

  const std::string& dir() const { return dir_; }
  int port() const { return port_; }
  std::string keyd_socket() const { return dir_ + "/run/keyd.sock"; }
  std::string store_dir() const { return dir_ + "/store"; }
  std::string store_file() const { return store_dir() + "/keystore.json"; }
  std::string conninfo() const;

  // scripts/sandbox.sh SUBCOMMAND DIR; run() reports, must() throws unless it exits 0.
  CommandResult run(const std::string& subcommand, const Env& env = {}) const;
  void must(const std::string& subcommand, const Env& env = {}) const;

  // colcrypt-keyctl --socket <this keyd's socket> ARGS...
  CommandResult keyctl(const std::vector<std::string>& args, const Env& env = {}) const;
  void create_key(const std::string& name) const;  // throws unless keyctl succeeds

  pid_t keyd_pid() const;  // throws when keyd is not running
  std::string keyd_log() const { return read_file(dir_ + "/keyd.log"); }
  std::string postgres_log() const { return read_file(dir_ + "/postgres.log"); }

  // A connection to the sandbox's "postgres" database as the postgres superuser.
  pqxx::connection connect() const;
  // CREATE EXTENSION colcrypt (once per sandbox).
  void create_extension() const;

  // Replication (sandbox.sh promote / rewind / pg-kill).
  void promote() const;
  void crash_postgres() const;  // pg_ctl stop -m immediate
  // Stops this cluster, pg_rewinds it from source's and starts it as a standby of source.
  void rewind_from(const Sandbox& source) const;
  bool in_recovery() const;
  // Returns once this standby has replayed primary's WAL up to primary's
  // pg_current_wal_lsn() at the call; throws after timeout_ms.
  void wait_replayed(const Sandbox& primary, int timeout_ms = 30000) const;
  // Returns once keyd's log, from byte offset on, holds text; throws after timeout_ms.
  void wait_keyd_log(size_t offset, const std::string& text, int timeout_ms = 30000) const;

 private:
  std::string dir_;
  int port_ = 0;
  int failures_at_start_ = 0;
};

// Returns once the standby (a conninfo) has replayed the primary's WAL up to the
// primary's pg_current_wal_lsn() at the call; throws after timeout_ms. Polls
// the replay position: no fixed wait.
void wait_replayed(const std::string& primary, const std::string& standby, int timeout_ms = 30000);

// A sandbox with postgres, keyd, the extension and the key "shared_key", shared
// by the test cases that neither stop nor reconfigure anything.
Sandbox& shared_sandbox();

// A raw libpq connection, for what libpqxx 6.4 hides: the SQLSTATE of some
// errors, and the binary result format.
class PgConn {
 public:
  struct Outcome {
    std::string sqlstate;                                       // "" when the statement succeeded
    std::string message;                                        // the primary error message
    std::vector<std::vector<std::optional<std::string>>> rows;  // text format
  };

  explicit PgConn(const std::string& conninfo);
  ~PgConn();
  PgConn(const PgConn&) = delete;
  PgConn& operator=(const PgConn&) = delete;

  PGconn* get() { return conn_; }
  // Runs sql (simple query protocol) and reports the outcome of the last statement.
  Outcome exec(const std::string& sql);
  // Runs sql, throws unless it succeeds, returns row 0 column 0 ("" for NULL / no rows).
  std::string value(const std::string& sql);

 private:
  PGconn* conn_ = nullptr;
};

}  // namespace colcrypt::test
