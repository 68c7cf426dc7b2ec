#include "harness.hpp"

#include <fcntl.h>
#include <pwd.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <exception>
#include <fstream>
#include <memory>
#include <sstream>
#include <stdexcept>

namespace colcrypt::test {
namespace {

const std::string kSandboxScript = std::string(COLCRYPT_SOURCE_DIR) + "/scripts/sandbox.sh";

std::runtime_error failure(const std::string& what, const CommandResult& result) {
  return std::runtime_error(what + " exited " + std::to_string(result.exit_code) + ":\n" +
                            result.output);
}

// The environment every sandbox.sh call gets: this build's binaries, the fast
// KDF, and no master password inherited from whoever runs the tests.
Env sandbox_env(const Env& extra) {
  Env env = {{"COLCRYPT_FAST_KDF", "1"},
             {"COLCRYPT_KEYD", COLCRYPT_KEYD_BIN},
             {"COLCRYPT_KEYCTL", COLCRYPT_KEYCTL_BIN},
             {"ENCRYPTION_MASTER_PASSWORD", std::nullopt}};
  env.insert(env.end(), extra.begin(), extra.end());
  return env;
}

int failure_count = 0;

void print_tail(const std::string& path, size_t lines) {
  const std::string text = read_file(path);
  size_t start = text.size();
  for (size_t n = 0; n <= lines && start > 0;) {
    if (text[--start] == '\n') ++n;
  }
  if (start > 0) ++start;
  std::fprintf(stderr, "--- last lines of %s ---\n%s--- end of %s ---\n", path.c_str(),
               text.substr(start).c_str(), path.c_str());
}

int next_port() {
  // Postgres listens on no TCP address in a sandbox (listen_addresses = ''), so
  // the port only names the socket in the sandbox's private directory.
  static int counter = 0;
  return 55400 + (getpid() % 100) * 5 + (counter++ % 5);
}

}  // namespace

CommandResult run_command(const std::vector<std::string>& argv, const Env& env) {
  char out_path[] = "/tmp/colcrypt-it-out.XXXXXX";
  int out_fd = mkstemp(out_path);
  if (out_fd < 0) throw std::runtime_error(std::string("mkstemp: ") + std::strerror(errno));
  unlink(out_path);

  pid_t pid = fork();
  if (pid < 0) {
    close(out_fd);
    throw std::runtime_error(std::string("fork: ") + std::strerror(errno));
  }
  if (pid == 0) {
    for (const auto& [name, value] : env) {
      if (value) {
        setenv(name.c_str(), value->c_str(), 1);
      } else {
        unsetenv(name.c_str());
      }
    }
    int null_fd = open("/dev/null", O_RDONLY);
    dup2(null_fd, 0);
    dup2(out_fd, 1);
    dup2(out_fd, 2);
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execvp(args[0], args.data());
    dprintf(2, "exec %s: %s\n", args[0], std::strerror(errno));
    _exit(127);
  }

  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  CommandResult result;
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  lseek(out_fd, 0, SEEK_SET);
  char buf[4096];
  ssize_t n;
  while ((n = read(out_fd, buf, sizeof buf)) > 0) result.output.append(buf, size_t(n));
  close(out_fd);
  return result;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

void record_failure() { ++failure_count; }

bool path_exists(const std::string& path) { return access(path.c_str(), F_OK) == 0; }

std::string postgres_uid() {
  const passwd* pw = getpwnam("postgres");
  if (!pw) throw std::runtime_error("no postgres user");
  return std::to_string(pw->pw_uid);
}

// ------------------------------------------------------------------ Sandbox

Sandbox::Sandbox() : Sandbox(Options{}) {}

Sandbox::Sandbox(Options options) {
  char dir[] = "/tmp/colcrypt-it.XXXXXX";
  if (!mkdtemp(dir)) throw std::runtime_error(std::string("mkdtemp: ") + std::strerror(errno));
  dir_ = dir;
  port_ = next_port();
  failures_at_start_ = failure_count;
  Env env = options.env;
  if (options.store_db) env.emplace_back("SANDBOX_KEYD_STORE_DB", "dbname=postgres user=postgres");
  if (options.replication) env.emplace_back("SANDBOX_REPLICATION", "1");
  CommandResult r;
  if (options.standby_of) {
    r = run_command(
        {kSandboxScript, "standby", dir_, options.standby_of->dir(), std::to_string(port_)},
        sandbox_env(env));
  } else if (options.with_postgres) {
    r = run_command({kSandboxScript, "up", dir_, std::to_string(port_)}, sandbox_env(env));
  } else {
    r = run("keyd-start", env);
  }
  if (r.exit_code != 0) {
    run("destroy");
    throw failure("sandbox.sh up " + dir_, r);
  }
}

Sandbox::~Sandbox() {
  if (failure_count > failures_at_start_ || std::uncaught_exceptions() > 0) {
    std::fprintf(stderr, "sandbox %s after a failure:\n", dir_.c_str());
    for (const char* log : {"/keyd.log", "/postgres.log"}) {
      if (path_exists(dir_ + log)) print_tail(dir_ + log, 25);
    }
  }
  const char* keep = getenv("COLCRYPT_KEEP_SANDBOX");
  if (keep && std::string(keep) == "1") return;
  try {
    run("destroy");
  } catch (...) {
  }
}

std::string Sandbox::conninfo() const {
  return "host=" + dir_ + "/pgsock port=" + std::to_string(port_) +
         " user=postgres dbname=postgres options='-c client_min_messages=warning'";
}

CommandResult Sandbox::run(const std::string& subcommand, const Env& env) const {
  return run_command({kSandboxScript, subcommand, dir_}, sandbox_env(env));
}

void Sandbox::must(const std::string& subcommand, const Env& env) const {
  CommandResult r = run(subcommand, env);
  if (r.exit_code != 0) throw failure("sandbox.sh " + subcommand + " " + dir_, r);
}

CommandResult Sandbox::keyctl(const std::vector<std::string>& args, const Env& env) const {
  std::vector<std::string> argv = {COLCRYPT_KEYCTL_BIN, "--socket", keyd_socket()};
  argv.insert(argv.end(), args.begin(), args.end());
  return run_command(argv, env);
}

void Sandbox::create_key(const std::string& name) const {
  CommandResult r = keyctl({"create", name});
  if (r.exit_code != 0) throw failure("colcrypt-keyctl create " + name, r);
}

pid_t Sandbox::keyd_pid() const {
  std::string text = read_file(dir_ + "/keyd.pid");
  pid_t pid = text.empty() ? 0 : pid_t(std::stol(text));
  if (pid <= 0 || kill(pid, 0) != 0) throw std::runtime_error("keyd is not running in " + dir_);
  return pid;
}

pqxx::connection Sandbox::connect() const { return pqxx::connection{conninfo()}; }

void Sandbox::create_extension() const {
  PgConn conn(conninfo());
  conn.value("CREATE EXTENSION IF NOT EXISTS colcrypt");
}

void Sandbox::promote() const { must("promote"); }

void Sandbox::crash_postgres() const { must("pg-kill"); }

void Sandbox::rewind_from(const Sandbox& source) const {
  CommandResult r = run_command({kSandboxScript, "rewind", dir_, source.dir()}, sandbox_env({}));
  if (r.exit_code != 0) throw failure("sandbox.sh rewind " + dir_ + " " + source.dir(), r);
}

bool Sandbox::in_recovery() const {
  PgConn conn(conninfo());
  return conn.value("SELECT pg_is_in_recovery()") == "t";
}

void Sandbox::wait_replayed(const Sandbox& primary, int timeout_ms) const {
  colcrypt::test::wait_replayed(primary.conninfo(), conninfo(), timeout_ms);
}

void Sandbox::wait_keyd_log(size_t offset, const std::string& text, int timeout_ms) const {
  for (int waited = 0;; waited += 20) {
    const std::string log = keyd_log();
    if (log.size() > offset && log.find(text, offset) != std::string::npos) return;
    if (waited >= timeout_ms) {
      throw std::runtime_error("keyd of " + dir_ + " did not log \"" + text + "\" within " +
                               std::to_string(timeout_ms) + " ms; its log since:\n" +
                               (log.size() > offset ? log.substr(offset) : ""));
    }
    usleep(20000);
  }
}

void wait_replayed(const std::string& primary, const std::string& standby, int timeout_ms) {
  const std::string target = PgConn(primary).value("SELECT pg_current_wal_lsn()");
  PgConn conn(standby);
  const std::string caught_up =
      "SELECT coalesce(pg_last_wal_replay_lsn() >= '" + target + "'::pg_lsn, false)";
  for (int waited = 0; conn.value(caught_up) != "t"; waited += 10) {
    if (waited >= timeout_ms) {
      throw std::runtime_error("no replay up to " + target + " within " +
                               std::to_string(timeout_ms) + " ms (at " +
                               conn.value("SELECT pg_last_wal_replay_lsn()") + ")");
    }
    usleep(10000);
  }
}

Sandbox& shared_sandbox() {
  static std::unique_ptr<Sandbox> sandbox = [] {
    auto s = std::make_unique<Sandbox>();
    s->create_extension();
    s->create_key("shared_key");
    return s;
  }();
  return *sandbox;
}

// ------------------------------------------------------------------ PgConn

PgConn::PgConn(const std::string& conninfo) : conn_(PQconnectdb(conninfo.c_str())) {
  if (PQstatus(conn_) != CONNECTION_OK) {
    std::string message = PQerrorMessage(conn_);
    PQfinish(conn_);
    throw std::runtime_error("cannot connect (" + conninfo + "): " + message);
  }
}

PgConn::~PgConn() { PQfinish(conn_); }

PgConn::Outcome PgConn::exec(const std::string& sql) {
  Outcome outcome;
  std::unique_ptr<PGresult, decltype(&PQclear)> res(PQexec(conn_, sql.c_str()), &PQclear);
  if (!res) {
    outcome.sqlstate = "?????";
    outcome.message = PQerrorMessage(conn_);
    return outcome;
  }
  ExecStatusType status = PQresultStatus(res.get());
  if (status == PGRES_FATAL_ERROR || status == PGRES_NONFATAL_ERROR ||
      status == PGRES_BAD_RESPONSE) {
    const char* state = PQresultErrorField(res.get(), PG_DIAG_SQLSTATE);
    const char* primary = PQresultErrorField(res.get(), PG_DIAG_MESSAGE_PRIMARY);
    outcome.sqlstate = state ? state : "?????";
    outcome.message = primary ? primary : PQresultErrorMessage(res.get());
    return outcome;
  }
  for (int row = 0; row < PQntuples(res.get()); ++row) {
    std::vector<std::optional<std::string>> values;
    for (int col = 0; col < PQnfields(res.get()); ++col) {
      if (PQgetisnull(res.get(), row, col)) {
        values.emplace_back(std::nullopt);
      } else {
        values.emplace_back(
            std::string(PQgetvalue(res.get(), row, col), size_t(PQgetlength(res.get(), row, col))));
      }
    }
    outcome.rows.push_back(std::move(values));
  }
  return outcome;
}

std::string PgConn::value(const std::string& sql) {
  Outcome outcome = exec(sql);
  if (!outcome.sqlstate.empty()) {
    throw std::runtime_error(sql + ": " + outcome.sqlstate + " " + outcome.message);
  }
  if (outcome.rows.empty() || outcome.rows[0].empty() || !outcome.rows[0][0]) return "";
  return *outcome.rows[0][0];
}

}  // namespace colcrypt::test
