// colcrypt-keyctl: the admin client of colcrypt-keyd.
// Exit codes: 0 ok, 1 keyd answered with an error (or the audit log failed
// verification), 2 usage, 3 cannot reach keyd, 4 the audit log verified but
// records lost entries (audit_gap). docs/operations.md.
#include <pwd.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "client/client.hpp"
#include "core/error.hpp"
#include "keyd/audit.hpp"
#include "keyd/master_secret.hpp"
#include "keyd/store.hpp"
#include "keyd/store_db.hpp"
#include "keyd/store_file.hpp"

namespace {

using nlohmann::json;

constexpr int kExitOk = 0;
constexpr int kExitKeydError = 1;
constexpr int kExitUsage = 2;
constexpr int kExitUnreachable = 3;
constexpr int kExitAuditGaps = 4;
// disable, destroy, status, jobs and reencrypt wait for keyd's database
// thread (at most its --count-timeout-ms per request, default 30 s): a longer
// default wait.
constexpr int kCountingTimeoutMs = 60000;
constexpr const char* kDefaultSocket = "/run/colcrypt/keyd.sock";

std::string text_or(const json& j, const char* field, const char* if_null = "never") {
  if (!j.contains(field) || j[field].is_null()) return if_null;
  if (j[field].is_string()) return j[field].get<std::string>();
  return j[field].dump();
}

void print_key(const json& k) {
  const std::vector<std::pair<const char*, std::string>> rows = {
      {"name", text_or(k, "name")},
      {"id", text_or(k, "id")},
      {"algorithm", text_or(k, "algorithm")},
      {"created_at", text_or(k, "created_at")},
      {"expires_at", text_or(k, "expires_at")},
      {"rotation_interval_days", text_or(k, "rotation_interval_days")},
      {"last_used", text_or(k, "last_used")},
      {"usage_count", text_or(k, "usage_count")},
      {"primary_version", text_or(k, "primary_version")},
  };
  for (const auto& [label, value] : rows)
    std::printf("%-24s%s\n", (std::string(label) + ":").c_str(), value.c_str());
  std::printf("%-24s%s\n", "max_uses_per_version:", text_or(k, "max_uses_per_version").c_str());
  std::printf("versions:\n");
  for (const auto& v : k.value("versions", json::array())) {
    std::printf("  %-6s%-14s%-22s%s uses\n", text_or(v, "version").c_str(),
                text_or(v, "state").c_str(), text_or(v, "created_at").c_str(),
                text_or(v, "usage_count", "0").c_str());
    for (const auto& [field, what] : {std::pair{"deterministic", "deterministic values"},
                                      std::pair{"blind_index", "blind indexes"}}) {
      if (!v.contains(field)) continue;
      std::printf("        keys %s (first %s, last %s): disable/destroy need --force\n", what,
                  text_or(v[field], "first_used").c_str(), text_or(v[field], "last_used").c_str());
    }
  }
}

// "det+blind", "det", "blind" or "-": what a version keys besides rows.
std::string pins_of(const json& v) {
  std::string out;
  if (v.contains("deterministic")) out = "det";
  if (v.contains("blind_index")) out += out.empty() ? "blind" : "+blind";
  return out.empty() ? "-" : out;
}

// Prints a verdict (keyd's or the offline one) and returns the exit code.
int report_verdict(const json& reply) {
  if (!reply.value("ok", false)) {
    std::fprintf(stderr, "colcrypt-keyctl: error: audit log %s FAILED verification: %s\n",
                 text_or(reply, "log").c_str(), text_or(reply, "problem", "?").c_str());
    return kExitKeydError;
  }
  const json gaps = reply.value("gaps", json::array());
  if (!gaps.empty()) {
    std::printf(
        "audit log %s verified (%s entries, chain and head intact) but it records %s "
        "lost entries:\n",
        text_or(reply, "log").c_str(), text_or(reply, "entries").c_str(),
        text_or(reply, "lost", "?").c_str());
    for (const auto& g : gaps) std::printf("  gap at %s\n", g.get<std::string>().c_str());
    return kExitAuditGaps;
  }
  std::printf("audit log %s verified: %s entries, chain and head intact\n",
              text_or(reply, "log").c_str(), text_or(reply, "entries").c_str());
  return kExitOk;
}

void print_table(const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> widths;
  for (const auto& row : rows) {
    if (widths.size() < row.size()) widths.resize(row.size(), 0);
    for (size_t i = 0; i < row.size(); ++i) widths[i] = std::max(widths[i], row[i].size());
  }
  for (const auto& row : rows) {
    std::string line;
    for (size_t i = 0; i < row.size(); ++i) {
      line += row[i];
      if (i + 1 < row.size()) line += std::string(widths[i] - row[i].size() + 2, ' ');
    }
    std::printf("%s\n", line.c_str());
  }
}

void print_list(const json& reply) {
  const json keys = reply.value("keys", json::array());
  if (keys.empty()) {
    std::printf("no keys (create one with: colcrypt-keyctl create NAME)\n");
    return;
  }
  std::vector<std::vector<std::string>> rows = {{"NAME", "ID", "VERSION", "VERSIONS", "CREATED",
                                                 "EXPIRES", "ROTATE (DAYS)", "LAST USED", "USES"}};
  for (const auto& k : keys) {
    rows.push_back({text_or(k, "name"), text_or(k, "id"), text_or(k, "primary_version"),
                    std::to_string(k.value("versions", json::array()).size()),
                    text_or(k, "created_at"), text_or(k, "expires_at"),
                    text_or(k, "rotation_interval_days"), text_or(k, "last_used"),
                    text_or(k, "usage_count")});
  }
  print_table(rows);
}

void print_status(const json& s) {
  for (const char* field : {"version", "uptime_seconds", "key_count", "store", "socket", "locked",
                            "auto_rotation", "audit_log", "audit_entries"}) {
    std::printf("%-16s%s\n", (std::string(field) + ":").c_str(), text_or(s, field, "-").c_str());
  }
  const json keys = s.value("keys", json::array());
  if (keys.empty()) return;
  const bool counted = s.value("databases", 0) > 0;
  if (!s.value("audit_writable", true)) {
    std::printf("AUDIT LOG NOT WRITABLE: %s entries lost so far (see keyd's log)\n",
                text_or(s, "audit_lost_entries", "?").c_str());
  }
  std::vector<std::vector<std::string>> rows = {
      {"KEY", "VERSION", "STATE", "USES", "CREATED", "KEYS", counted ? "ROWS" : ""}};
  for (const auto& k : keys) {
    for (const auto& v : k.value("versions", json::array())) {
      std::string referenced;
      if (k.contains("references_error")) {
        referenced = "?";
      } else if (counted) {
        referenced = std::to_string(
            k.value("references", json::object()).value(text_or(v, "version"), int64_t{0}));
      }
      rows.push_back({text_or(k, "name"), text_or(v, "version"), text_or(v, "state"),
                      text_or(v, "usage_count", "0"), text_or(v, "created_at"), pins_of(v),
                      referenced});
    }
  }
  std::printf("\n");
  print_table(rows);
}

std::string progress_bar(double percent, int width) {
  const int filled = static_cast<int>(percent / 100.0 * width + 0.5);
  std::string bar = "[";
  for (int i = 0; i < width; ++i) bar += i < filled ? '#' : '.';
  return bar + "]";
}

void print_jobs(const json& jobs) {
  if (jobs.empty()) {
    std::printf("no rotation jobs\n");
    return;
  }
  std::vector<std::vector<std::string>> rows = {{"DATABASE", "JOB", "KEY", "TARGET", "STATE",
                                                 "DONE", "TOTAL", "SKIPPED", "%", "ROWS/S",
                                                 "LAST ERROR"}};
  for (const auto& j : jobs) {
    rows.push_back({text_or(j, "database"), text_or(j, "job_id"), text_or(j, "key"),
                    text_or(j, "target_version", "-"), text_or(j, "state"), text_or(j, "rows_done"),
                    text_or(j, "rows_total"), text_or(j, "rows_skipped", "0"),
                    text_or(j, "percent"), text_or(j, "rows_per_second", "-"),
                    text_or(j, "last_error", "")});
  }
  print_table(rows);
}

// A job is (database, job_id): every database numbers its own jobs.
using JobRef = std::pair<std::string, int64_t>;
JobRef job_ref(const json& j) { return {text_or(j, "database"), j.value("job_id", int64_t{-1})}; }

// Whether j is one of `only` (every job when `only` is empty).
bool selected(const json& j, const std::vector<JobRef>& only) {
  return only.empty() || std::find(only.begin(), only.end(), job_ref(j)) != only.end();
}

bool jobs_active(const json& jobs, const std::vector<JobRef>& only) {
  for (const auto& j : jobs) {
    if (!selected(j, only)) continue;
    const std::string state = j.value("state", "");
    if (state == "pending" || state == "running") return true;
  }
  return false;
}

int fail(int code, const std::string& message) {
  std::fprintf(stderr, "colcrypt-keyctl: error: %s\n", message.c_str());
  return code;
}

}  // namespace

// colcrypt-keyctl store migrate: the source opened and verified as keyd
// opens it (a file store's lock taken: refused while a keyd runs on it), the
// records written to the new destination in one atomic step, then the
// destination opened and verified the same way and compared.
int migrate_store(const std::string& from_dir, const std::string& from_db,
                  const std::string& to_dir, const std::string& to_db,
                  const std::string& master_key_file, const std::string& password_file) {
  namespace k = colcrypt::keyd;
  if (from_dir.empty() == from_db.empty() || to_dir.empty() == to_db.empty() ||
      !from_dir.empty() == !to_dir.empty()) {
    return fail(kExitUsage,
                "store migrate needs --from DIR --to-db CONNINFO, or --from-db CONNINFO --to DIR");
  }
  constexpr int kTimeoutMs = 30000;
  try {
    std::optional<k::MasterSecret> env_password = k::take_password_from_env();
    std::unique_ptr<k::DbStoreBackend> db =
        k::DbStoreBackend::connect(from_db.empty() ? to_db : from_db, "", kTimeoutMs);
    if (!to_db.empty()) {
      if (db->in_recovery()) {
        return fail(kExitUsage, "the destination " + db->location() +
                                    " is a standby (in recovery): migrate into the primary");
      }
      if (db->has_store()) {
        return fail(kExitUsage, "the destination " + db->location() +
                                    " already holds a key store (schema colcrypt_keyd); "
                                    "refusing to overwrite it");
      }
    } else if (colcrypt::keyd::KeyStore::exists(to_dir)) {
      return fail(kExitUsage, "the destination " + to_dir + " already holds a key store");
    }
    const std::string source = from_dir.empty() ? db->location() : from_dir;
    k::MasterSecret secret =
        k::choose_master_secret(master_key_file, password_file, env_password,
                                "Master password for key store " + source + ": ", false);
    std::unique_ptr<k::FileStoreBackend> dir_backend =
        from_dir.empty() ? k::FileStoreBackend::create(to_dir)
                         : k::FileStoreBackend::open(from_dir, false);
    std::string expected;
    size_t keys = 0;
    std::string destination;
    if (!from_dir.empty()) {
      const k::KeyStore from = k::KeyStore::open(std::move(dir_backend), secret);
      from.copy_to(*db);
      expected = from.records_text();
      keys = from.keys().size();
      destination = db->location();
      const k::KeyStore copy = k::KeyStore::open(std::move(db), secret);
      if (copy.records_text() != expected) {
        return fail(kExitKeydError, "the copy in " + destination + " differs from the source");
      }
    } else {
      const k::KeyStore from = k::KeyStore::open(std::move(db), secret);
      from.copy_to(*dir_backend);
      expected = from.records_text();
      keys = from.keys().size();
      destination = to_dir;
      dir_backend.reset();  // its lock
      const k::KeyStore copy = k::KeyStore::open(to_dir, secret);
      if (copy.records_text() != expected) {
        return fail(kExitKeydError, "the copy in " + destination + " differs from the source");
      }
    }
    std::printf("copied %zu keys from %s to %s (verified)\n", keys, source.c_str(),
                destination.c_str());
    return kExitOk;
  } catch (const colcrypt::Error& e) {
    if (e.code() == colcrypt::Errc::InvalidArgument) return fail(kExitUsage, e.what());
    return fail(kExitKeydError, std::string("cannot migrate: ") + e.what());
  }
}

int main(int argc, char** argv) {
  std::string socket;
  bool raw_json = false;
  int timeout_ms = 5000;
  std::string name;
  std::optional<int64_t> rotation_days;
  std::optional<int64_t> max_uses;
  std::string expires_at;
  int64_t version = 0;
  bool force = false;
  int batch_blocks = 64;
  int throttle_ms = 0;
  bool wait = false;

  CLI::App app{"colcrypt-keyctl: administer colcrypt-keyd (keys: create, list, show, rotate)",
               "colcrypt-keyctl"};
  app.add_option("--socket", socket,
                 std::string("colcrypt-keyd socket (default: $COLCRYPT_KEYD_SOCKET, else ") +
                     kDefaultSocket + ")");
  std::string keyd_uid;
  app.add_option("--keyd-uid", keyd_uid,
                 "uid or user name colcrypt-keyd runs as; keyctl refuses a socket served by "
                 "any other (default: $COLCRYPT_KEYD_UID, else root or keyctl's own uid)");
  app.add_flag("--json", raw_json, "print keyd's JSON reply instead of text");
  app.add_option("--timeout-ms", timeout_ms, "how long to wait for keyd (default 5000)")
      ->check(CLI::Range(1, 3600 * 1000));
  app.require_subcommand(1);
  auto* create = app.add_subcommand("create", "create a key with a random version 1");
  create->add_option("name", name, "key name")->required();
  create->add_option("--rotation-days", rotation_days, "rotation interval in days")
      ->check(CLI::Range(1, 36500));
  create->add_option("--max-uses", max_uses, "encryptions per version before rotation")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 31));
  create->add_option("--expires-at", expires_at,
                     "expiry, ISO 8601 (2027-01-31 or 2027-01-31T12:00:00Z)");
  app.add_subcommand("list", "list all keys");
  auto* show = app.add_subcommand("show", "show one key and its versions");
  show->add_option("name", name, "key name")->required();
  auto* rotate = app.add_subcommand("rotate", "make a new random version the primary one");
  rotate->add_option("name", name, "key name")->required();
  app.add_subcommand("status", "show keyd's status and every key version's state and uses");
  app.add_subcommand("metrics", "print keyd's metrics (Prometheus text format)");
  auto* disable = app.add_subcommand("disable", "disable an old version (reversible)");
  auto* enable = app.add_subcommand("enable", "re-enable a disabled version");
  auto* destroy = app.add_subcommand(
      "destroy", "erase an old version's key bytes (crypto-shredding; irreversible)");
  for (auto* sub : {disable, enable, destroy}) {
    sub->add_option("name", name, "key name")->required();
    sub->add_option("--version", version, "version number")
        ->required()
        ->check(CLI::Range(int64_t{1}, int64_t{UINT32_MAX}));
  }
  destroy->add_flag("--force", force, "destroy even if rows may still use the version");
  disable->add_flag("--force", force, "disable even if rows may still use the version");
  auto* reencrypt = app.add_subcommand(
      "reencrypt", "start a job re-encrypting every row under an old version of a key");
  reencrypt->add_option("name", name, "key name")->required();
  reencrypt->add_option("--batch-blocks", batch_blocks, "heap blocks per batch (default 64)")
      ->check(CLI::Range(1, 65536));
  reencrypt->add_option("--throttle-ms", throttle_ms, "pause between batches (default 0)")
      ->check(CLI::Range(0, 600000));
  reencrypt->add_flag("--wait", wait, "wait for the job, showing its progress");
  auto* jobs = app.add_subcommand("jobs", "show the re-encryption jobs and their progress");
  jobs->add_flag("--wait", wait, "wait until no job is pending or running");
  auto* audit = app.add_subcommand("audit", "audit log");
  audit->require_subcommand(1);
  auto* verify = audit->add_subcommand(
      "verify",
      "verify the audit log's MAC chain: by keyd, or offline with --store (keyd not needed)");
  std::string store_dir;
  std::string audit_log;
  std::string master_key_file;
  std::string password_file;
  verify->add_option("--store", store_dir,
                     "verify offline: read this key store with the master secret instead of "
                     "asking keyd");
  verify->add_option("--audit-log", audit_log, "with --store: the log (default: STORE/audit.log)");
  verify->add_option("--master-key-file", master_key_file,
                     "with --store: the store's 32-byte master key file");
  verify->add_option("--password-file", password_file,
                     "with --store: a file holding the master password (else "
                     "$ENCRYPTION_MASTER_PASSWORD, else asked on the terminal)");

  auto* store_cmd = app.add_subcommand("store", "key store maintenance (offline: keyd not needed)");
  store_cmd->require_subcommand(1);
  auto* migrate = store_cmd->add_subcommand(
      "migrate",
      "copy a key store between a directory and a database (--store-db), verified, wrapped "
      "keys copied as they are; the destination must be empty");
  std::string from_dir, from_db, to_dir, to_db;
  migrate->add_option("--from", from_dir, "the file store's directory to copy");
  migrate->add_option("--from-db", from_db, "the database store to copy (libpq connection string)");
  migrate->add_option("--to", to_dir, "a new file store's directory (missing or empty)");
  migrate->add_option("--to-db", to_db,
                      "the database to hold the copy (libpq connection string; no schema "
                      "colcrypt_keyd yet)");
  migrate->add_option("--master-key-file", master_key_file, "the store's 32-byte master key file");
  migrate->add_option("--password-file", password_file,
                      "a file holding the master password (else $ENCRYPTION_MASTER_PASSWORD, "
                      "else asked on the terminal)");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help
    return fail(kExitUsage, std::string(e.what()) + " (see colcrypt-keyctl --help)");
  }

  if (migrate->parsed())
    return migrate_store(from_dir, from_db, to_dir, to_db, master_key_file, password_file);

  if (!store_dir.empty() || !audit_log.empty() || !master_key_file.empty() ||
      !password_file.empty()) {
    if (store_dir.empty()) {
      return fail(kExitUsage, "--audit-log, --master-key-file and --password-file need --store");
    }
    // Offline: the audit MAC key derived from the store exactly as keyd does.
    try {
      std::optional<colcrypt::keyd::MasterSecret> env_password =
          colcrypt::keyd::take_password_from_env();
      colcrypt::keyd::MasterSecret secret = colcrypt::keyd::choose_master_secret(
          master_key_file, password_file, env_password,
          "Master password for key store " + store_dir + ": ", false);
      const colcrypt::keyd::KeyStore store =
          colcrypt::keyd::KeyStore::open_read_only(store_dir, secret);
      const std::string path =
          audit_log.empty() ? store_dir + "/" + colcrypt::keyd::kAuditFileName : audit_log;
      const json reply = colcrypt::keyd::audit_verdict_json(
          colcrypt::keyd::AuditLog::verify(path, store.audit_mac_key().view(), store.audit_mark()),
          path);
      if (raw_json) {
        std::printf("%s\n", reply.dump(2).c_str());
        return reply.value("ok", false) ? (reply["gaps"].empty() ? kExitOk : kExitAuditGaps)
                                        : kExitKeydError;
      }
      return report_verdict(reply);
    } catch (const colcrypt::Error& e) {
      if (e.code() == colcrypt::Errc::InvalidArgument) return fail(kExitUsage, e.what());
      return fail(kExitKeydError, std::string("cannot verify offline: ") + e.what());
    }
  }

  if (socket.empty()) {
    const char* env = std::getenv("COLCRYPT_KEYD_SOCKET");
    socket = env && *env ? env : kDefaultSocket;
  }
  std::string command = app.get_subcommands().front()->get_name();
  if (command == "audit") command = "audit-verify";
  json request = {{"op", command}};
  if (command == "create" || command == "show" || command == "rotate" || command == "disable" ||
      command == "enable" || command == "destroy") {
    request["name"] = name;
  }
  if (command == "disable" || command == "enable" || command == "destroy") {
    request["version"] = version;
  }
  if (command == "destroy" || command == "disable") request["force"] = force;
  if (command == "reencrypt") {
    request["name"] = name;
    request["batch_blocks"] = batch_blocks;
    request["throttle_ms"] = throttle_ms;
  }
  if (command == "create") {
    if (max_uses) request["max_uses_per_version"] = *max_uses;
    if (rotation_days) request["rotation_interval_days"] = *rotation_days;
    if (!expires_at.empty()) request["expires_at"] = expires_at;
  }

  colcrypt::client::ClientOptions options;
  options.socket_path = socket;
  options.timeout_ms = timeout_ms;
  try {
    options.keyd_uid = colcrypt::client::keyd_uid_from(keyd_uid);
  } catch (const colcrypt::Error& e) {
    return fail(kExitUsage, e.what());
  }
  if (app.get_option("--timeout-ms")->count() == 0 &&
      ((command == "disable" || command == "destroy") && !force)) {
    options.timeout_ms = kCountingTimeoutMs;
  }
  if (app.get_option("--timeout-ms")->count() == 0 &&
      (command == "status" || command == "jobs" || command == "reencrypt")) {
    options.timeout_ms = kCountingTimeoutMs;
  }
  std::string reply_text;
  try {
    colcrypt::client::Client client(options);
    reply_text = client.admin(request.dump());
  } catch (const colcrypt::Error& e) {
    switch (e.code()) {
      case colcrypt::Errc::KeydUnavailable:
      case colcrypt::Errc::KeydTimeout:
      case colcrypt::Errc::Io:
        return fail(kExitUnreachable, e.what());
      default:
        return fail(kExitKeydError, e.what());
    }
  }

  json reply;
  try {
    reply = json::parse(reply_text);
  } catch (const json::exception&) {
    return fail(kExitKeydError, "colcrypt-keyd sent a reply that is not JSON");
  }
  if (raw_json) {
    std::printf("%s\n", reply.dump(2).c_str());
    if (command == "audit-verify") {
      return reply.value("ok", false)
                 ? (reply.value("gaps", json::array()).empty() ? kExitOk : kExitAuditGaps)
                 : kExitKeydError;
    }
    return kExitOk;
  }
  if (command == "metrics") {
    std::fputs(reply.value("text", "").c_str(), stdout);
  } else if (command == "create") {
    std::printf("created key '%s'\n", text_or(reply, "name").c_str());
    print_key(reply);
  } else if (command == "rotate") {
    std::printf("rotated key '%s': version %s is now primary\n", text_or(reply, "name").c_str(),
                text_or(reply, "primary_version").c_str());
    print_key(reply);
  } else if (command == "show") {
    print_key(reply);
  } else if (command == "disable" || command == "enable" || command == "destroy") {
    std::printf("%s version %lld of key '%s'\n",
                command == "destroy" ? "destroyed" : (command + "d").c_str(),
                static_cast<long long>(version), text_or(reply, "name").c_str());
    print_key(reply);
  } else if (command == "reencrypt" || command == "jobs") {
    std::vector<JobRef> started;
    if (command == "reencrypt") {
      for (const auto& j : reply.value("jobs", json::array())) {
        started.push_back(job_ref(j));
        std::printf("started job %s in database %s\n", text_or(j, "job_id").c_str(),
                    text_or(j, "database").c_str());
      }
      if (started.empty()) {
        std::printf("no configured database has the colcrypt extension: nothing to do\n");
        return kExitOk;
      }
      if (!wait) return kExitOk;
    }
    const bool tty = ::isatty(STDOUT_FILENO);
    json list = command == "jobs" ? reply.value("jobs", json::array()) : json::array();
    for (;;) {
      if (wait || command == "reencrypt") {
        try {
          colcrypt::client::Client client(options);
          list =
              json::parse(client.admin(json{{"op", "jobs"}}.dump())).value("jobs", json::array());
        } catch (const colcrypt::Error& e) {
          return fail(kExitKeydError, e.what());
        }
      }
      if (!wait) break;
      const bool active = jobs_active(list, started);
      if (tty) {
        for (const auto& j : list) {
          if (!selected(j, started)) continue;
          std::printf("\rjob %s %-8s %s %5.1f%% %s/%s rows ", text_or(j, "job_id").c_str(),
                      text_or(j, "state").c_str(),
                      progress_bar(j.value("percent", 0.0), 30).c_str(), j.value("percent", 0.0),
                      text_or(j, "rows_done").c_str(), text_or(j, "rows_total").c_str());
        }
        std::fflush(stdout);
      }
      if (!active) break;
      ::usleep(500 * 1000);
    }
    if (tty && wait) std::printf("\n");
    print_jobs(list);
    for (const auto& j : list) {
      if (!selected(j, started)) continue;
      if (wait && j.value("state", "") == "failed") return fail(kExitKeydError, "a job failed");
    }
  } else if (command == "audit-verify") {
    return report_verdict(reply);
  } else if (command == "list") {
    print_list(reply);
  } else {
    print_status(reply);
  }
  return kExitOk;
}
