// colcrypt-keyd: the key daemon. Runs in the foreground (systemd style);
// docs/operations.md documents flags, environment, exit codes and files.
#include <grp.h>
#include <pwd.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include "core/error.hpp"
#include "core/kdf.hpp"
#include "keyd/audit.hpp"
#include "keyd/log.hpp"
#include "keyd/master_secret.hpp"
#include "keyd/metrics_http.hpp"
#include "keyd/server.hpp"
#include "keyd/store.hpp"
#include "keyd/store_db.hpp"

#ifdef COLCRYPT_HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#endif

namespace {

using namespace colcrypt;
using namespace colcrypt::keyd;

// Exit codes (sysexits.h values; the contract fixes them).
constexpr int kExitOk = 0;
constexpr int kExitUsage = 64;
constexpr int kExitCorrupt = 65;
constexpr int kExitUnavailable = 69;
constexpr int kExitSoftware = 70;
constexpr int kExitOsError = 71;
constexpr int kExitStoreUnreachable = 75;  // EX_TEMPFAIL: --store-db's database is down
constexpr int kExitWrongKey = 77;
constexpr int kExitPermissions = 78;

constexpr const char* kDefaultSocket = "/run/colcrypt/keyd.sock";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

int exit_code_for(Errc code) {
  switch (code) {
    case Errc::InvalidArgument:
      return kExitUsage;
    case Errc::StoreCorrupt:
    case Errc::MalformedValue:
      return kExitCorrupt;
    case Errc::WrongMasterKey:
      return kExitWrongKey;
    case Errc::InsecurePermissions:
      return kExitPermissions;
    case Errc::Io:
      return kExitOsError;
    default:
      return kExitSoftware;
  }
}

void harden_process() {
  // No core dumps and no ptrace by other processes of the same user: the
  // process holds the KEK and unwrapped keys.
  ::prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
  struct rlimit no_core {
    0, 0
  };
  ::setrlimit(RLIMIT_CORE, &no_core);
  ::umask(0077);
}

std::optional<long long> parse_integer(const std::string& text) {
  if (text.empty()) return std::nullopt;
  char* end = nullptr;
  errno = 0;
  long long v = std::strtoll(text.c_str(), &end, 10);
  if (errno != 0 || *end != '\0') return std::nullopt;
  return v;
}

uid_t resolve_uid(const std::string& text) {
  if (auto v = parse_integer(text)) {
    if (*v < 0 || *v > 0x7fffffff) throw UsageError("invalid uid " + text);
    return static_cast<uid_t>(*v);
  }
  struct passwd* pw = ::getpwnam(text.c_str());
  if (!pw) throw UsageError("unknown user " + text);
  return pw->pw_uid;
}

gid_t resolve_gid(const std::string& text) {
  if (auto v = parse_integer(text)) {
    if (*v < 0 || *v > 0x7fffffff) throw UsageError("invalid gid " + text);
    return static_cast<gid_t>(*v);
  }
  struct group* gr = ::getgrnam(text.c_str());
  if (!gr) throw UsageError("unknown group " + text);
  return gr->gr_gid;
}

std::string env_or(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::string(v) : fallback;
}

struct Options {
  std::string store;
  std::string store_db;
  int replay_wait_ms = 2000;
  std::string socket;
  std::string password_file;
  std::string master_key_file;
  std::vector<std::string> allow_uids;
  std::vector<std::string> admin_uids;
  std::string socket_group;
  std::optional<uint32_t> pbkdf2_iterations;
  bool insecure_fast_kdf = false;
  std::string log_level = "info";
  std::string audit_log;
  std::string auto_rotation;  // "on"/"off"; default $ENCRYPTION_AUTO_ROTATION, else on
  int rotation_check_interval_s = 60;
  int64_t day_seconds = 86400;
  std::optional<uint64_t> max_uses_per_version;
  uint32_t max_block_uses = kDefaultMaxBlockUses;
  bool sql_rotate = false;
  std::vector<std::string> databases;
  int job_poll_interval_ms = 2000;
  int64_t retire_grace_s = wire::kMaxKeyCacheTtlSeconds;
  int count_timeout_ms = 30000;
  std::string audit_failure = "refuse";
  std::string audit_sync = "batch";
  std::string metrics_listen;
  std::string log_file;
  size_t max_connections = 256;
};

// Every connection is an fd: the soft RLIMIT_NOFILE (often 1024) is raised
// toward the hard limit so that --max-connections fits with room for the
// store, the log, the socket and the database connections.
void raise_fd_limit(size_t max_connections) {
  constexpr rlim_t kSpareFds = 64;
  struct rlimit limit {};
  if (::getrlimit(RLIMIT_NOFILE, &limit) != 0) return;
  const rlim_t wanted = static_cast<rlim_t>(max_connections) + kSpareFds;
  if (limit.rlim_cur >= wanted) return;
  const rlim_t before = limit.rlim_cur;
  limit.rlim_cur = limit.rlim_max == RLIM_INFINITY ? wanted : std::min(wanted, limit.rlim_max);
  const rlim_t now = ::setrlimit(RLIMIT_NOFILE, &limit) == 0 ? limit.rlim_cur : before;
  if (now < wanted) {
    log_warning("--max-connections " + std::to_string(max_connections) + " needs " +
                std::to_string(wanted) + " file descriptors but the limit is " +
                std::to_string(now) + " (raise LimitNOFILE or ulimit -n)");
  }
}

// Every option of colcrypt-keyd, for the start and for each SIGHUP.
void define_options(CLI::App& app, Options& o) {
  app.set_version_flag("--version", std::string("colcrypt-keyd ") + kKeydVersion);
  // The packaged unit reads /etc/colcrypt/keyd.conf: one `long-option-name = value`
  // a line (TOML as CLI11 reads it; a repeatable option takes ["a", "b"]).
  app.set_config("--config", "",
                 "read options from this file (name = value, the long option "
                 "names without --); flags on the command line win");
  app.allow_config_extras(CLI::config_extras_mode::error);
  app.add_option("--store", o.store, "key store directory (default: $ENCRYPTION_KEY_PATH)");
  app.add_option("--store-db", o.store_db,
                 "keep the key store in this Postgres database instead (libpq connection "
                 "string; schema colcrypt_keyd; needs --audit-log): standbys' keyds serve "
                 "it read-only (docs/operations.md, \"--store-db\")");
  app.add_option("--replay-wait-ms", o.replay_wait_ms,
                 "with --store-db on a standby: how long a fetch of a key or version keyd "
                 "has not loaded waits for replay before \"not found\" (default 2000)")
      ->check(CLI::Range(0, 60000));
  app.add_option("--socket", o.socket,
                 std::string("Unix socket path (default: $COLCRYPT_KEYD_SOCKET, else ") +
                     kDefaultSocket + ")");
  app.add_option("--password-file", o.password_file,
                 "read the master password from this file (mode 0600/0400)");
  app.add_option("--master-key-file", o.master_key_file,
                 "use this file's 32 raw bytes as the master key (mode 0600/0400)");
  app.add_option("--allow-uid", o.allow_uids,
                 "uid or user name allowed to fetch keys (repeatable; default: postgres)");
  app.add_option("--admin-uid", o.admin_uids,
                 "uid or user name allowed to administer, not to fetch keys unless also on "
                 "--allow-uid (repeatable; default: keyd's euid)");
  app.add_option("--socket-group", o.socket_group,
                 "make the socket 0660 and its new directory 0750, owned by this group");
  app.add_option("--pbkdf2-iterations", o.pbkdf2_iterations,
                 "PBKDF2 iterations for a new password-protected store (default 600000)");
  app.add_flag("--insecure-fast-kdf", o.insecure_fast_kdf,
               "allow --pbkdf2-iterations down to 1000 (tests only)");
  app.add_option("--log-level", o.log_level,
                 "error, warning, info (default) or debug (SIGHUP rereads it)");
  app.add_option("--log-file", o.log_file,
                 "append the log to this file instead of stderr; SIGHUP reopens it "
                 "(logrotate)");
  app.add_option("--audit-log", o.audit_log,
                 "append-only, MAC-chained audit log (default: STORE/audit.log)");
  app.add_option("--auto-rotation", o.auto_rotation,
                 "on/off: rotate keys when their interval passes (default: "
                 "$ENCRYPTION_AUTO_ROTATION, else on)");
  app.add_option("--rotation-check-interval", o.rotation_check_interval_s,
                 "seconds between rotation checks (default 60)")
      ->check(CLI::Range(1, 86400));
  app.add_option("--insecure-day-seconds", o.day_seconds,
                 "length of a rotation-interval day in seconds (tests only; default 86400)")
      ->check(CLI::Range(int64_t{1}, int64_t{86400}));
  app.add_option("--max-uses-per-version", o.max_uses_per_version,
                 "encryptions per key version before rotation, for new keys (default: "
                 "$ENCRYPTION_MAX_USES_PER_VERSION, else 10000)");
  app.add_option("--max-block-uses", o.max_block_uses,
                 "most encryptions one backend fetch is granted (default 65536; a block "
                 "is also cut to max(1024, the key's cap / 64))")
      ->check(CLI::Range(1, 1 << 24));
  app.add_option("--database", o.databases,
                 "libpq connection string of a database whose encrypted columns keyd "
                 "re-encrypts and counts (repeatable)");
  app.add_option("--job-poll-interval-ms", o.job_poll_interval_ms,
                 "how often keyd looks for new re-encryption jobs (default 2000)")
      ->check(CLI::Range(50, 3600000));
  app.add_option("--retire-grace-seconds", o.retire_grace_s,
                 "seconds after a rotation before the retired version may be disabled or "
                 "destroyed without --force (default 86400, the largest "
                 "colcrypt.key_cache_ttl; never set it below the TTL in use)")
      ->check(CLI::Range(int64_t{0}, int64_t{10} * 365 * 86400));
  app.add_option("--count-timeout-ms", o.count_timeout_ms,
                 "longest a count of the rows using a key may take (disable/destroy checks, "
                 "references, status); a locked table makes it fail clearly (default 30000)")
      ->check(CLI::Range(100, 3600000));
  app.add_option("--audit-failure", o.audit_failure,
                 "refuse (default): while the audit log cannot be written, key fetches get an "
                 "error instead of a key; serve: hand keys out anyway (the loss is recorded "
                 "as an audit_gap entry once the log is writable)");
  app.add_option("--audit-sync", o.audit_sync,
                 "batch (default): a key goes out once its audit entry is written to the log "
                 "(a crash or kill -9 of keyd keeps it) while the disk completes fdatasyncs "
                 "(a sync thread runs them back to back); always: only once the entry is "
                 "fdatasynced (survives a power loss; slower). See docs/operations.md");
  app.add_option("--metrics-listen", o.metrics_listen,
                 "serve Prometheus metrics over HTTP at HOST:PORT, a loopback address "
                 "(127.0.0.1:9187, [::1]:9187); default: off (colcrypt-keyctl metrics "
                 "prints them either way)");
  app.add_option("--max-connections", o.max_connections,
                 "connections keyd keeps open at once (default 256); at the limit the "
                 "idlest kept connection makes room, and keyd raises its file descriptor "
                 "limit to fit")
      ->check(CLI::Range(size_t{1}, size_t{1000000}));
  app.add_flag("--sql-rotate", o.sql_rotate,
               "let fetch-allowed peers (the database) ask for a rotation "
               "(colcrypt.rotate_key); nothing else");
}

bool parse_on_off(const std::string& text, const char* what) {
  if (text == "on" || text == "true" || text == "1" || text == "yes") return true;
  if (text == "off" || text == "false" || text == "0" || text == "no") return false;
  throw UsageError(std::string(what) + " must be on or off");
}

// The settings SIGHUP may change, from the options (resolving user names).
ReloadableSettings reloadable_settings(const Options& o) {
  ReloadableSettings s;
  auto level = parse_log_level(o.log_level);
  if (!level) throw UsageError("--log-level must be error, warning, info or debug");
  s.log_level = *level;
  for (const auto& u : o.allow_uids) s.allow_uids.push_back(resolve_uid(u));
  if (o.allow_uids.empty()) {
    if (struct passwd* pw = ::getpwnam("postgres")) {
      s.allow_uids.push_back(pw->pw_uid);
    } else {
      log_warning("no user \"postgres\" and no --allow-uid: no uid may fetch keys");
    }
  }
  for (const auto& u : o.admin_uids) s.admin_uids.push_back(resolve_uid(u));
  if (o.admin_uids.empty()) s.admin_uids.push_back(::geteuid());
  return s;
}

// The options that differ between a and b and that only a restart applies.
std::vector<std::string> restart_settings_changed(const Options& a, const Options& b) {
  std::vector<std::string> changed;
  auto check = [&](const char* name, bool same) {
    if (!same) changed.push_back(name);
  };
  check("store", a.store == b.store);
  check("store-db", a.store_db == b.store_db);
  check("replay-wait-ms", a.replay_wait_ms == b.replay_wait_ms);
  check("socket", a.socket == b.socket);
  check("password-file", a.password_file == b.password_file);
  check("master-key-file", a.master_key_file == b.master_key_file);
  check("socket-group", a.socket_group == b.socket_group);
  check("pbkdf2-iterations", a.pbkdf2_iterations == b.pbkdf2_iterations);
  check("insecure-fast-kdf", a.insecure_fast_kdf == b.insecure_fast_kdf);
  check("log-file", a.log_file == b.log_file);
  check("audit-log", a.audit_log == b.audit_log);
  check("auto-rotation", a.auto_rotation == b.auto_rotation);
  check("rotation-check-interval", a.rotation_check_interval_s == b.rotation_check_interval_s);
  check("insecure-day-seconds", a.day_seconds == b.day_seconds);
  check("max-uses-per-version", a.max_uses_per_version == b.max_uses_per_version);
  check("max-block-uses", a.max_block_uses == b.max_block_uses);
  check("sql-rotate", a.sql_rotate == b.sql_rotate);
  check("database", a.databases == b.databases);
  check("job-poll-interval-ms", a.job_poll_interval_ms == b.job_poll_interval_ms);
  check("retire-grace-seconds", a.retire_grace_s == b.retire_grace_s);
  check("count-timeout-ms", a.count_timeout_ms == b.count_timeout_ms);
  check("audit-failure", a.audit_failure == b.audit_failure);
  check("audit-sync", a.audit_sync == b.audit_sync);
  check("metrics-listen", a.metrics_listen == b.metrics_listen);
  return changed;
}

// SIGHUP: the command line and the --config file read again, as at start.
ReloadableSettings reread_config(int argc, char** argv, const Options& started,
                                 const std::string& config_file) {
  Options o;
  CLI::App app{"colcrypt-keyd", "colcrypt-keyd"};
  define_options(app, o);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    throw UsageError(e.what());
  }
  ReloadableSettings s = reloadable_settings(o);
  for (const auto& name : restart_settings_changed(started, o)) {
    log_warning("SIGHUP: " + name + " changed in " + config_file +
                "; it needs a restart to take effect (keyd keeps the value it started with)");
  }
  return s;
}

int run(const Options& o, std::optional<MasterSecret>& env_password, int argc, char** argv,
        const std::string& config_file) {
  if (!o.log_file.empty()) set_log_file(o.log_file);  // before any thread logs
  const ReloadableSettings access = reloadable_settings(o);
  set_log_level(access.log_level);

  if (!o.store.empty() && !o.store_db.empty()) {
    throw UsageError("--store and --store-db exclude each other: pass one of them");
  }
  const std::string store_dir = !o.store_db.empty() ? std::string()
                                : o.store.empty()   ? env_or("ENCRYPTION_KEY_PATH", "")
                                                    : o.store;
  if (store_dir.empty() && o.store_db.empty()) {
    throw UsageError(
        "no key store: pass --store DIR, --store-db CONNINFO or set "
        "ENCRYPTION_KEY_PATH");
  }
  if (!o.store_db.empty() && o.audit_log.empty()) {
    throw UsageError(
        "--store-db needs --audit-log FILE (keyd keeps its audit log, and the "
        "store generation it has seen, on this host)");
  }
  ServerConfig config;
  config.socket_path = o.socket.empty() ? env_or("COLCRYPT_KEYD_SOCKET", kDefaultSocket) : o.socket;
  config.allow_uids = access.allow_uids;
  config.admin_uids = access.admin_uids;
  if (!o.socket_group.empty()) config.socket_group = resolve_gid(o.socket_group);

  uint32_t iterations = o.pbkdf2_iterations.value_or(kPbkdf2DefaultIterations);
  const uint32_t min_iterations =
      o.insecure_fast_kdf ? kMinInsecurePbkdf2Iterations : kMinPbkdf2Iterations;
  if (iterations < min_iterations) {
    throw UsageError("--pbkdf2-iterations must be at least " + std::to_string(min_iterations) +
                     (o.insecure_fast_kdf ? "" : " (--insecure-fast-kdf allows 1000, for tests)"));
  }
  uint32_t rotation_days = kDefaultRotationIntervalDays;
  if (const char* env = std::getenv("ENCRYPTION_ROTATION_INTERVAL_DAYS"); env && *env) {
    auto v = parse_integer(env);
    if (!v || *v < 1 || *v > kMaxRotationIntervalDays) {
      throw UsageError("ENCRYPTION_ROTATION_INTERVAL_DAYS must be an integer from 1 to " +
                       std::to_string(kMaxRotationIntervalDays));
    }
    rotation_days = static_cast<uint32_t>(*v);
  }

  config.audit_log_path = o.audit_log;
  config.auto_rotation = parse_on_off(
      o.auto_rotation.empty() ? env_or("ENCRYPTION_AUTO_ROTATION", "on") : o.auto_rotation,
      "--auto-rotation / ENCRYPTION_AUTO_ROTATION");
  config.rotation_check_interval_s = o.rotation_check_interval_s;
  config.day_seconds = o.day_seconds;
  config.max_block_uses = o.max_block_uses;
  config.sql_rotate = o.sql_rotate;
  config.databases = o.databases;
  config.job_poll_interval_ms = o.job_poll_interval_ms;
  config.retire_grace_s = o.retire_grace_s;
  config.count_timeout_ms = o.count_timeout_ms;
  config.replay_wait_ms = o.replay_wait_ms;
  if (o.max_connections < 1) throw UsageError("--max-connections must be at least 1");
  config.max_connections = o.max_connections;
  raise_fd_limit(o.max_connections);
  if (o.audit_failure != "refuse" && o.audit_failure != "serve") {
    throw UsageError("--audit-failure must be refuse or serve");
  }
  config.audit_fail_closed = o.audit_failure == "refuse";
  if (o.audit_sync != "batch" && o.audit_sync != "always") {
    throw UsageError("--audit-sync must be batch or always");
  }
  config.audit_sync = o.audit_sync == "always" ? AuditSyncMode::Always : AuditSyncMode::Batch;
  if (!config_file.empty()) {
    config.reload_source = config_file;
    config.reload = [argc, argv, o, config_file] {
      return reread_config(argc, argv, o, config_file);
    };
  }
  if (!o.metrics_listen.empty()) {
    try {
      MetricsHttp::check_address(o.metrics_listen);
    } catch (const Error& e) {
      throw UsageError(e.what());
    }
    config.metrics_listen = o.metrics_listen;
  }
  for (const auto& d : config.databases) with_statement_timeout(d, config.count_timeout_ms);
  uint64_t max_uses = kDefaultMaxUsesPerVersion;
  if (o.max_uses_per_version) {
    max_uses = *o.max_uses_per_version;
  } else if (const char* env = std::getenv("ENCRYPTION_MAX_USES_PER_VERSION"); env && *env) {
    auto v = parse_integer(env);
    if (!v || *v < 1)
      throw UsageError("ENCRYPTION_MAX_USES_PER_VERSION must be a positive integer");
    max_uses = static_cast<uint64_t>(*v);
  }
  if (max_uses < 1 || max_uses > kMaxMaxUsesPerVersion) {
    throw UsageError("the maximum uses per version must be from 1 to " +
                     std::to_string(kMaxMaxUsesPerVersion));
  }

  // Fail fast, before a slow key derivation, when another keyd owns the socket.
  claim_socket_path(config.socket_path);

  std::unique_ptr<DbStoreBackend> db;
  std::string where = store_dir;
  if (!o.store_db.empty()) {
    std::string audit_dir = o.audit_log.substr(0, o.audit_log.find_last_of('/') + 1);
    if (audit_dir.empty()) audit_dir = "./";
    db = DbStoreBackend::connect(o.store_db, audit_dir + kStoreGenerationFileName,
                                 std::min(config.count_timeout_ms, 5000));
    where = db->location();
  }
  const bool existing = db ? db->has_store() : KeyStore::exists(store_dir);
  MasterSecret secret = choose_master_secret(
      o.master_key_file, o.password_file, env_password,
      (existing ? "Master password for key store " : "New master password for key store ") + where +
          ": ",
      !existing);
  std::optional<KeyStore> store;
  if (existing) {
    try {
      store.emplace(db ? KeyStore::open(std::move(db), secret) : KeyStore::open(store_dir, secret));
    } catch (const Error& e) {
      if (e.code() == Errc::WrongMasterKey || e.code() == Errc::StoreCorrupt) {
        // Recorded unauthenticated; the next successful start chains it.
        const std::string audit_path =
            o.audit_log.empty() ? store_dir + "/" + kAuditFileName : o.audit_log;
        AuditLog::record_pending(
            audit_path,
            {{"event", e.code() == Errc::WrongMasterKey ? "unlock-failed" : "store-corrupt"},
             {"uid", ::getuid()},
             {"pid", ::getpid()},
             {"reason", e.what()}});
      }
      throw;
    }
    // A store made for tests must not quietly guard production keys.
    if (store->kek_source() == MasterSecret::Kind::Password &&
        store->pbkdf2_iterations() < kMinPbkdf2Iterations && !o.insecure_fast_kdf) {
      throw UsageError("key store " + where + " uses only " +
                       std::to_string(store->pbkdf2_iterations()) +
                       " PBKDF2 iterations (a test setting); open it with --insecure-fast-kdf, "
                       "or move its keys to a store with at least " +
                       std::to_string(kMinPbkdf2Iterations));
    }
    if (o.pbkdf2_iterations && store->kek_source() == MasterSecret::Kind::Password &&
        store->pbkdf2_iterations() != iterations) {
      log_info("--pbkdf2-iterations only applies to new stores; this one uses " +
               std::to_string(store->pbkdf2_iterations()));
    }
    log_info("opened key store " + where + " (" + std::to_string(store->keys().size()) + " keys" +
             (store->read_only() ? "; read-only: the database is a standby" : "") + ")");
  } else {
    store.emplace(db ? KeyStore::create(std::move(db), secret, iterations)
                     : KeyStore::create(store_dir, secret, iterations));
    if (secret.kind == MasterSecret::Kind::Password) {
      log_info("initialized a new key store in " + where + " (PBKDF2-HMAC-SHA256, " +
               std::to_string(iterations) + " iterations)");
    } else {
      log_info("initialized a new key store in " + where + " (master key file)");
    }
  }
  // The KEK is derived: the password is no longer needed.
  secret = MasterSecret{};
  env_password.reset();
  store->set_default_rotation_interval_days(rotation_days);
  store->set_default_max_uses_per_version(max_uses);
  if (shutdown_requested()) {
    log_info("stop requested during startup");
    return kExitOk;
  }

  const std::string socket_path = config.socket_path;
  Server server(std::move(config), std::move(*store));
  server.listen();
  log_info("ready on " + socket_path);
#ifdef COLCRYPT_HAVE_SYSTEMD
  sd_notify(0, "READY=1");
#endif
  return server.run();
}

// Logs a startup failure and maps it to the exit code.
int report_failure(const std::exception& failure) {
  try {
    throw;
  } catch (const UsageError& e) {
    log_error(e.what());
    return kExitUsage;
  } catch (const SocketUnavailable& e) {
    log_error(e.what());
    return kExitUnavailable;
  } catch (const StoreInUse& e) {
    log_error(e.what());
    return kExitUnavailable;
  } catch (const StoreUnreachable& e) {
    log_error(e.what());
    return kExitStoreUnreachable;
  } catch (const Error& e) {
    log_error(e.what());
    return exit_code_for(e.code());
  } catch (...) {
    log_error(std::string("internal error: ") + failure.what());
    return kExitSoftware;
  }
}

}  // namespace

int main(int argc, char** argv) {
  harden_process();
  // Take the password out of the environment before anything else can fail
  // (or fork): the variable's value is wiped in place and the variable removed.
  std::optional<MasterSecret> env_password;
  try {
    env_password = take_password_from_env();
  } catch (const Error& e) {
    log_error(e.what());
    return kExitUsage;
  }
  Options o;
  CLI::App app{"colcrypt-keyd: the colcrypt key daemon (runs in the foreground)", "colcrypt-keyd"};
  define_options(app, o);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help, --version
    log_error(std::string(e.what()) + " (see colcrypt-keyd --help)");
    return kExitUsage;
  }
  try {
    install_signal_handlers();
    CLI::Option* config_option = app.get_option("--config");
    const std::string config_file =
        config_option->count() > 0 ? config_option->as<std::string>() : std::string();
    return run(o, env_password, argc, argv, config_file);
  } catch (const std::exception& e) {
    if (!shutdown_requested()) return report_failure(e);
    log_info("stop requested during startup");
    return kExitOk;
  }
}
