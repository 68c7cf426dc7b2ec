// colcrypt-keyd's admin requests (JSON ops from colcrypt-keyctl and, for
// "rotate", from the SQL function), the rotations they and the scheduler make,
// and the hand-off of row counts and jobs to the database thread.
#include <algorithm>
#include <optional>

#include "keyd/log.hpp"
#include "keyd/server_internal.hpp"

namespace colcrypt::keyd {

using nlohmann::json;

void Server::publish_keys() {
  unwrapped_.clear();  // a rotation (or any key change): serve nothing unwrapped before it
  std::map<std::string, KeySnapshot> keys;
  for (const auto& k : store_.keys()) keys[k.name] = {format_key_id(k.id), k.primary_version};
  jobs_->publish_keys(std::move(keys));
}

// {"versions": {"1": rows, ...}, "columns": [{"database","column","version","rows"}]}
// Throws the counting error (clear text for a timeout: InvalidArgument, which
// reaches the admin client; Io for anything else, whose details go to the log).
json Server::references_of(const KeyRecord& key, const DatabaseResults& counts) const {
  const std::string id = format_key_id(key.id);
  if (auto e = counts.errors.find(id); e != counts.errors.end()) {
    throw Error(e->second.rfind("counting the rows", 0) == 0 ? Errc::InvalidArgument : Errc::Io,
                e->second);
  }
  auto found = counts.rows.find(id);
  if (found == counts.rows.end()) {
    throw Error(Errc::InvalidArgument,
                "key '" + key.name + "' was created while rows were counted; ask again");
  }
  json versions = json::object();
  json columns = json::array();
  for (const auto& r : found->second) {
    const std::string v = std::to_string(r.version);
    versions[v] = versions.value(v, int64_t{0}) + r.rows;
    columns.push_back(
        {{"database", r.database}, {"column", r.column}, {"version", r.version}, {"rows", r.rows}});
  }
  return {{"versions", std::move(versions)}, {"columns", std::move(columns)}};
}

json Server::rotate_and_audit(const std::string& name, const std::string& reason, uid_t uid,
                              pid_t pid) {
  json entry = {{"event", "admin"}, {"op", "rotate"}, {"key", name}, {"reason", reason}};
  if (reason == "manual" || reason == "sql") {
    entry["uid"] = uid;
    entry["pid"] = pid;
  }
  try {
    const KeyRecord& key = store_.rotate_key(name);
    publish_keys();
    entry["result"] = "ok";
    entry["version"] = key.primary_version;
    audit(entry);
    sync_audit();
    log_info("rotated key '" + key.name + "' to version " + std::to_string(key.primary_version) +
             " (" + reason + ")");
    return key_metadata_json(key);
  } catch (const Error& e) {
    entry["result"] = errc_name(e.code());
    audit(entry);
    throw;
  }
}

void Server::run_scheduler(bool force) {
  if (store_.read_only()) return;  // a standby: the primary's keyd rotates
  auto now_steady = Clock::now();
  if (!force &&
      now_steady - last_schedule_ < std::chrono::seconds(config_.rotation_check_interval_s)) {
    return;
  }
  last_schedule_ = now_steady;
  const int64_t now = now_seconds();
  std::vector<std::pair<std::string, RotationReason>> due;
  for (const auto& k : store_.keys()) {
    if (k.expires_at && *k.expires_at <= now) continue;  // expired keys no longer encrypt
    RotationReason reason = store_.rotation_due(k, now, config_.day_seconds);
    // The usage cap is a safety limit and applies even with automatic rotation off.
    if (reason == RotationReason::UsageCap ||
        (reason == RotationReason::Interval && config_.auto_rotation)) {
      due.emplace_back(k.name, reason);
    }
  }
  for (const auto& [name, reason] : due) {
    try {
      rotate_and_audit(name, reason == RotationReason::UsageCap ? "usage-cap" : "interval", 0, 0);
    } catch (const Error& e) {
      log_error("automatic rotation of key '" + name + "' failed: " + e.what());
    }
  }
}

void Server::handle_admin(Connection& c, const std::vector<uint8_t>& body,
                          const DatabaseResults* counts) {
  // Disable, enable, destroy, rotate...: no unwrapped key outlives a change.
  unwrapped_.clear();
  const std::string peer = peer_text(c.uid, c.pid);
  json request;
  try {
    request = json::parse(body.begin(), body.end());
  } catch (const json::exception&) {
    queue(c, wire::encode_failure(wire::FailureCode::BadRequest, "admin request is not JSON"));
    return;
  }
  json result;
  std::string op;
  bool logged = false;  // rotate_and_audit writes its own entry
  // Hands the request to the counting thread; it is handled again, from the
  // start, once the counts are in (finish_database_work).
  auto defer = [&](const std::vector<const KeyRecord*>& keys, DatabaseWorker::Task task = nullptr) {
    std::vector<std::pair<std::string, std::string>> ids;
    for (const KeyRecord* k : keys) ids.emplace_back(format_key_id(k->id), k->name);
    c.waiting = true;
    c.waiting_body = body;
    db_worker_->submit(c.serial, std::move(ids), std::move(task));
    log_debug("admin " + op + " from peer " + peer + " waits for the databases");
  };
  // The task's value on the second pass; its failure as Error(Io) (logged,
  // the peer is told to look at the log, as before).
  auto task_value = [&]() -> json {
    if (!counts->error.empty()) throw Error(Errc::Io, counts->error);
    return counts->value;
  };
  auto audit_admin = [&](const std::string& outcome) {
    if (logged || op == "list" || op == "show" || op == "status" || op == "jobs" ||
        op == "references" || op == "metrics") {
      return;
    }
    json entry = {
        {"event", "admin"}, {"op", op}, {"uid", c.uid}, {"pid", c.pid}, {"result", outcome}};
    for (const char* field : {"name", "version", "force"}) {
      if (request.is_object() && request.contains(field)) entry[field] = request[field];
    }
    audit(std::move(entry));
    sync_audit();
  };
  try {
    if (!request.is_object() || !request.contains("op") || !request["op"].is_string()) {
      throw Error(Errc::InvalidArgument, "admin request needs a string \"op\"");
    }
    op = request["op"].get<std::string>();
    if (store_.read_only() && (op == "create" || op == "rotate" || op == "disable" ||
                               op == "enable" || op == "destroy" || op == "reencrypt")) {
      throw Error(Errc::PermissionDenied, store_.read_only_reason());
    }
    auto name_arg = [&]() {
      if (!request.contains("name") || !request["name"].is_string()) {
        throw Error(Errc::InvalidArgument, "\"" + op + "\" needs a string \"name\"");
      }
      return request["name"].get<std::string>();
    };
    if (op == "create") {
      std::string name = name_arg();
      NewKeyOptions options;
      if (request.contains("rotation_interval_days") &&
          !request["rotation_interval_days"].is_null()) {
        const json& days = request["rotation_interval_days"];
        if (!days.is_number_integer() || days.get<int64_t>() < 1 ||
            days.get<int64_t>() > kMaxRotationIntervalDays) {
          throw Error(Errc::InvalidArgument,
                      "rotation_interval_days must be an integer from 1 to " +
                          std::to_string(kMaxRotationIntervalDays));
        }
        options.rotation_interval_days = days.get<uint32_t>();
      }
      if (request.contains("max_uses_per_version") && !request["max_uses_per_version"].is_null()) {
        const json& uses = request["max_uses_per_version"];
        if (!uses.is_number_unsigned() || uses.get<uint64_t>() < 1 ||
            uses.get<uint64_t>() > kMaxMaxUsesPerVersion) {
          throw Error(Errc::InvalidArgument, "max_uses_per_version must be an integer from 1 to " +
                                                 std::to_string(kMaxMaxUsesPerVersion));
        }
        options.max_uses_per_version = uses.get<uint64_t>();
      }
      if (request.contains("expires_at") && !request["expires_at"].is_null()) {
        const json& expires = request["expires_at"];
        std::optional<int64_t> t;
        if (expires.is_string()) t = parse_timestamp(expires.get<std::string>());
        if (!t) {
          throw Error(Errc::InvalidArgument,
                      "expires_at must be an ISO 8601 timestamp such as 2027-01-31T00:00:00Z");
        }
        options.expires_at = t;
      }
      const KeyRecord& key = store_.create_key(name, options);
      publish_keys();  // rotation jobs may name it before its first rotation
      log_info("peer " + peer + " created key '" + key.name + "' (id " + format_key_id(key.id) +
               ")");
      result = key_metadata_json(key);
    } else if (op == "list") {
      std::vector<const KeyRecord*> keys;
      for (const auto& k : store_.keys()) keys.push_back(&k);
      std::sort(keys.begin(), keys.end(),
                [](const KeyRecord* a, const KeyRecord* b) { return a->name < b->name; });
      json list = json::array();
      for (const KeyRecord* k : keys) list.push_back(key_metadata_json(*k));
      result = {{"keys", std::move(list)}};
    } else if (op == "show") {
      std::string name = name_arg();
      const KeyRecord* key = store_.find(name);
      if (!key) throw Error(Errc::KeyNotFound, "key '" + name + "' not found");
      result = key_metadata_json(*key);
    } else if (op == "rotate") {
      std::string name = name_arg();
      result = rotate_and_audit(name, is_admin(c.uid) ? "manual" : "sql", c.uid, c.pid);
      logged = true;
    } else if (op == "disable" || op == "enable" || op == "destroy") {
      std::string name = name_arg();
      if (!request.contains("version") || !request["version"].is_number_unsigned() ||
          request["version"].get<uint64_t>() == 0 ||
          request["version"].get<uint64_t>() > UINT32_MAX) {
        throw Error(Errc::InvalidArgument, "\"" + op + "\" needs a positive integer \"version\"");
      }
      const uint32_t version = request["version"].get<uint32_t>();
      const bool force = request.value("force", false);
      if (op != "enable" && !force) {
        // Refuse to make rows unreadable: count them first (docs/rotation.md).
        const KeyRecord* current = store_.find(name);
        if (!current) throw Error(Errc::KeyNotFound, "key '" + name + "' not found");
        if (config_.databases.empty()) {
          throw Error(Errc::InvalidArgument,
                      "colcrypt-keyd has no --database to check whether rows still use version " +
                          std::to_string(version) + " of key '" + name + "'; pass --force to " +
                          op + " it anyway");
        }
        // A pinned version is refused before counting (and checked again after).
        KeyStore::check_derivation_pin(*current, version, op, false);
        if (!counts) return defer({current});
        int64_t rows = 0;
        std::string where;
        const json references = references_of(*current, *counts);
        for (const auto& r : references["columns"]) {
          if (r["version"].get<uint32_t>() != version) continue;
          rows += r["rows"].get<int64_t>();
          where += std::string(where.empty() ? "" : ", ") + r["database"].get<std::string>() + ":" +
                   r["column"].get<std::string>() + " (" +
                   std::to_string(r["rows"].get<int64_t>()) + ")";
        }
        if (rows > 0) {
          throw Error(Errc::InvalidArgument,
                      "version " + std::to_string(version) + " of key '" + name +
                          "' is still used by " + std::to_string(rows) + " rows: " + where +
                          "; re-encrypt them first (colcrypt-keyctl reencrypt " + name +
                          ") or pass --force");
        }
      }
      // rows = 0 is not enough: a backend may still encrypt under a version
      // it cached as primary (the retirement grace, checked by the store).
      const RetireGrace grace{now_seconds(), config_.retire_grace_s, force};
      const KeyRecord& key = op == "disable"  ? store_.disable_version(name, version, grace)
                             : op == "enable" ? store_.enable_version(name, version)
                                              : store_.destroy_version(name, version, grace);
      log_info("peer " + peer + " " + (op == "destroy" ? "destroyed" : op + "d") + " version " +
               std::to_string(version) + " of key '" + key.name + "'");
      result = key_metadata_json(key);
    } else if (op == "reencrypt") {
      std::string name = name_arg();
      if (!store_.find(name)) throw Error(Errc::KeyNotFound, "key '" + name + "' not found");
      if (config_.databases.empty()) {
        throw Error(Errc::InvalidArgument,
                    "colcrypt-keyd has no --database: it cannot run re-encryption jobs");
      }
      const int batch_blocks = request.value("batch_blocks", 64);
      const int throttle_ms = request.value("throttle_ms", 0);
      if (batch_blocks < 1 || batch_blocks > 65536 || throttle_ms < 0 || throttle_ms > 600000) {
        throw Error(Errc::InvalidArgument,
                    "batch_blocks must be 1 to 65536 and throttle_ms 0 to 600000");
      }
      if (!counts) {
        return defer({}, [name, batch_blocks, throttle_ms](const std::vector<std::string>& dbs) {
          return create_jobs(dbs, name, batch_blocks, throttle_ms);
        });
      }
      result = {{"jobs", task_value()}};
      jobs_->wake();
    } else if (op == "jobs") {
      if (!counts) {
        return defer({}, [](const std::vector<std::string>& dbs) { return list_jobs(dbs); });
      }
      result = {{"jobs", task_value()}};
    } else if (op == "references") {
      std::string name = name_arg();
      const KeyRecord* key = store_.find(name);
      if (!key) throw Error(Errc::KeyNotFound, "key '" + name + "' not found");
      if (!config_.databases.empty() && !counts) return defer({key});
      result = config_.databases.empty()
                   ? json{{"versions", json::object()}, {"columns", json::array()}}
                   : references_of(*key, *counts);
      result["name"] = name;
      result["pinned"] = json::object();
      for (const auto& v : key->versions) {
        if (v.keys_derived_values()) {
          result["pinned"][std::to_string(v.version)] = {
              {"deterministic", v.deterministic.first_used.has_value()},
              {"blind_index", v.blind_index.first_used.has_value()}};
        }
      }
    } else if (op == "audit-verify") {
      sync_audit();
      AuditVerdict verdict = AuditLog::verify(config_.audit_log_path, store_.audit_mac_key().view(),
                                              store_.audit_mark());
      result = audit_verdict_json(verdict, config_.audit_log_path);
    } else if (op == "status") {
      auto uptime =
          std::chrono::duration_cast<std::chrono::seconds>(Clock::now() - started_).count();
      result = {{"version", kKeydVersion},
                {"uptime_seconds", uptime},
                {"key_count", store_.keys().size()},
                {"store", store_.dir().empty() ? store_.location() : store_.dir()},
                {"read_only", store_.read_only()},
                {"socket", config_.socket_path},
                {"locked", false},
                {"auto_rotation", config_.auto_rotation},
                {"rotation_check_interval_s", config_.rotation_check_interval_s},
                {"audit_log", config_.audit_log_path},
                {"audit_entries", audit_ ? audit_->last_seq() : 0},
                {"audit_sync", config_.audit_sync == AuditSyncMode::Always ? "always" : "batch"}};
      std::vector<const KeyRecord*> keys;
      for (const auto& k : store_.keys()) keys.push_back(&k);
      std::sort(keys.begin(), keys.end(),
                [](const KeyRecord* a, const KeyRecord* b) { return a->name < b->name; });
      const bool count = !config_.databases.empty() && request.value("references", true);
      if (count && !counts && !keys.empty()) return defer(keys);
      result["audit_writable"] = audit_ ? audit_->writable() : true;
      result["audit_lost_entries"] = audit_ ? audit_->lost_entries() : 0;
      json list = json::array();
      for (const KeyRecord* k : keys) {
        json kj = key_metadata_json(*k);
        if (count) {
          try {
            kj["references"] = references_of(*k, *counts)["versions"];
          } catch (const Error& e) {
            kj["references_error"] = e.what();
          }
        }
        list.push_back(std::move(kj));
      }
      result["keys"] = std::move(list);
      result["databases"] = config_.databases.size();
    } else if (op == "metrics") {
      result = {{"text", metrics_text()}};
    } else {
      throw Error(Errc::InvalidArgument, "unknown admin op \"" + op + "\"");
    }
  } catch (const Error& e) {
    audit_admin(errc_name(e.code()));
    wire::FailureCode code = failure_code(e.code());
    if (code == wire::FailureCode::Internal) {
      log_error("admin " + op + " from peer " + peer + " failed: " + e.what());
      // An admin is told why a write failed (a full disk: paths and errno
      // text, no secrets); the change was not applied.
      queue(c, wire::encode_failure(
                   code, "colcrypt-keyd could not complete \"" + op + "\"" +
                             (e.code() == Errc::Io
                                  ? std::string(": ") + e.what() + "; nothing was changed"
                                  : std::string(" (see its log)"))));
    } else {
      log_info("admin " + op + " from peer " + peer + " refused: " + e.what());
      queue(c, wire::encode_failure(code, e.what()));
    }
    return;
  }
  audit_admin("ok");
  queue(c, wire::encode_admin_result(result.dump(-1, ' ', false, json::error_handler_t::replace)));
}

void Server::finish_database_work() {
  for (auto& [serial, counts] : db_worker_->take_done()) {
    auto it = std::find_if(connections_.begin(), connections_.end(),
                           [serial = serial](const auto& c) { return c->serial == serial; });
    if (it == connections_.end() || !(*it)->waiting) continue;
    Connection& c = **it;
    c.waiting = false;
    const std::vector<uint8_t> body = std::move(c.waiting_body);
    c.waiting_body.clear();
    if (c.dead || c.read_closed) {
      // The peer gave up waiting (keyctl's --timeout-ms): nothing is done for it.
      json request = json::parse(body.begin(), body.end(), nullptr, false);
      json entry = {{"event", "admin"},
                    {"op", request.is_object() ? request.value("op", "?") : "?"},
                    {"uid", c.uid},
                    {"pid", c.pid},
                    {"result", "abandoned"}};
      for (const char* field : {"name", "version", "force"}) {
        if (request.is_object() && request.contains(field)) entry[field] = request[field];
      }
      if (entry["op"] == "reencrypt" && counts.error.empty()) {
        // The jobs exist now: they run, and the log says so.
        entry["result"] = "ok";
        entry["peer_gone"] = true;
        jobs_->wake();
      }
      if (entry["op"] != "status" && entry["op"] != "references" && entry["op"] != "jobs") {
        audit(std::move(entry));
      }
      log_info("peer " + peer_text(c.uid, c.pid) +
               " left before its row counts arrived; its request was dropped");
      c.dead = true;
      continue;
    }
    handle_admin(c, body, &counts);
    process_frames(c);  // what the peer sent meanwhile
  }
}

}  // namespace colcrypt::keyd
