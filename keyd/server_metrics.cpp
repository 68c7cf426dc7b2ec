// colcrypt-keyd's metrics text (Prometheus format 0.0.4): what the poll loop
// counted, what the audit log and the job runner measured, and gauges read
// from the key store. Served by MetricsHttp (--metrics-listen) and by the
// admin op "metrics". docs/operations.md, "Metrics", lists every family.
#include <algorithm>
#include <set>

#include "keyd/log.hpp"
#include "keyd/server_internal.hpp"

namespace colcrypt::keyd {

std::string Server::key_label(const std::string& name) const {
  return store_.find(name) ? name : kUnknownKeyLabel;
}

std::string Server::metrics_text() const {
  MetricsText m;
  std::vector<const KeyRecord*> keys;
  for (const auto& k : store_.keys()) keys.push_back(&k);
  std::sort(keys.begin(), keys.end(),
            [](const KeyRecord* a, const KeyRecord* b) { return a->name < b->name; });

  m.family("colcrypt_keyd_build_info", "gauge", "colcrypt-keyd's version; always 1.");
  m.sample("colcrypt_keyd_build_info", {{"version", kKeydVersion}}, 1);
  m.family("colcrypt_keyd_start_time_seconds", "gauge", "When colcrypt-keyd started, Unix time.");
  m.sample("colcrypt_keyd_start_time_seconds", {}, static_cast<double>(started_unix_));
  m.family("colcrypt_keyd_connections", "gauge", "Open peer connections on the key socket.");
  m.sample("colcrypt_keyd_connections", {}, static_cast<double>(live_connections()));

  // Every key of the store has a series (0 before its first fetch).
  std::set<std::string> names;
  for (const KeyRecord* k : keys) names.insert(k->name);
  for (const auto& [name, n] : metrics_.fetches) names.insert(name);
  m.family("colcrypt_keyd_fetches_total", "counter",
           "Key replies sent (primary, block and version fetches), by key name.");
  for (const auto& name : names) {
    auto it = metrics_.fetches.find(name);
    m.sample("colcrypt_keyd_fetches_total", {{"key", name}},
             static_cast<double>(it == metrics_.fetches.end() ? 0 : it->second));
  }
  m.family("colcrypt_keyd_denials_total", "counter",
           "Key uses denied, by key name and reason: peer (a fetch from a uid not on "
           "--allow-uid), sql (the extension denied a database role the key).");
  for (const auto& [what, n] : metrics_.denials) {
    m.sample("colcrypt_keyd_denials_total", {{"key", what.first}, {"reason", what.second}},
             static_cast<double>(n));
  }
  m.family("colcrypt_keyd_refused_peers_total", "counter",
           "Connections refused at accept: the uid is on neither --allow-uid nor --admin-uid.");
  m.sample("colcrypt_keyd_refused_peers_total", {}, static_cast<double>(metrics_.refused_peers));
  m.family("colcrypt_keyd_fetch_duration_seconds", "histogram",
           "From reading a key request to writing its key reply, audit commit included.");
  m.histogram("colcrypt_keyd_fetch_duration_seconds", {}, metrics_.fetch_latency);

  const AuditStats audit = audit_ ? audit_->stats() : AuditStats{};
  m.family("colcrypt_keyd_audit_write_duration_seconds", "histogram",
           "Duration of one write of a batch of audit entries.");
  m.histogram("colcrypt_keyd_audit_write_duration_seconds", {}, audit.write_latency);
  m.family("colcrypt_keyd_audit_sync_duration_seconds", "histogram",
           "Duration of one fdatasync of the audit log.");
  m.histogram("colcrypt_keyd_audit_sync_duration_seconds", {}, audit.sync_latency);
  m.family("colcrypt_keyd_audit_write_failures_total", "counter",
           "Batches of audit entries that could not be written (their loss is an audit_gap "
           "entry).");
  m.sample("colcrypt_keyd_audit_write_failures_total", {},
           static_cast<double>(audit.write_failures));
  m.family("colcrypt_keyd_audit_sync_failures_total", "counter",
           "fdatasyncs of the audit log that failed.");
  m.sample("colcrypt_keyd_audit_sync_failures_total", {}, static_cast<double>(audit.sync_failures));
  m.family("colcrypt_keyd_audit_writable", "gauge",
           "1 while the audit log is writable, 0 from a failed write until its audit_gap entry "
           "is written.");
  m.sample("colcrypt_keyd_audit_writable", {}, audit_ && !audit_->writable() ? 0 : 1);

  const std::map<std::string, JobKeyStats> jobs = jobs_ ? jobs_->stats() : decltype(jobs){};
  struct JobFamily {
    const char* name;
    const char* type;
    const char* help;
    double (*value)(const JobKeyStats&);
  };
  static const JobFamily kJobFamilies[] = {
      {"colcrypt_keyd_job_rows_reencrypted_total", "counter",
       "Rows re-encrypted by rotation jobs, by key name.",
       [](const JobKeyStats& s) { return static_cast<double>(s.rows_reencrypted); }},
      {"colcrypt_keyd_job_rows_skipped_total", "counter",
       "Rows a rotation job's batch skipped (locked or failing); a later pass retries them.",
       [](const JobKeyStats& s) { return static_cast<double>(s.rows_skipped); }},
      {"colcrypt_keyd_job_rows_left", "gauge",
       "Rows the key's last finished rotation job left under older versions.",
       [](const JobKeyStats& s) { return static_cast<double>(s.rows_left); }},
      {"colcrypt_keyd_jobs_done_total", "counter", "Rotation jobs finished, by key name.",
       [](const JobKeyStats& s) { return static_cast<double>(s.jobs_done); }},
      {"colcrypt_keyd_jobs_failed_total", "counter",
       "Rotation jobs given up after repeated errors, by key name.",
       [](const JobKeyStats& s) { return static_cast<double>(s.jobs_failed); }},
      {"colcrypt_keyd_job_errors_total", "counter", "Errors of rotation jobs, by key name.",
       [](const JobKeyStats& s) { return static_cast<double>(s.errors); }},
      {"colcrypt_keyd_jobs_running", "gauge", "Rotation jobs keyd works on now, by key name.",
       [](const JobKeyStats& s) { return static_cast<double>(s.running); }},
  };
  for (const JobFamily& f : kJobFamilies) {
    m.family(f.name, f.type, f.help);
    for (const auto& [name, stats] : jobs) m.sample(f.name, {{"key", name}}, f.value(stats));
  }

  m.family("colcrypt_keyd_key_versions", "gauge", "Key versions by key name and state.");
  for (const KeyRecord* k : keys) {
    for (auto state : {wire::KeyState::Active, wire::KeyState::DecryptOnly,
                       wire::KeyState::Disabled, wire::KeyState::Destroyed}) {
      const auto n = std::count_if(k->versions.begin(), k->versions.end(),
                                   [state](const KeyVersion& v) { return v.state == state; });
      m.sample("colcrypt_keyd_key_versions",
               {{"key", k->name}, {"state", wire::key_state_name(state)}}, static_cast<double>(n));
    }
  }
  m.family("colcrypt_keyd_key_uses_left", "gauge",
           "Encryptions the primary version may still be charged before the usage cap "
           "rotates the key.");
  for (const KeyRecord* k : keys) {
    const uint64_t used = k->primary().usage_count;
    const uint64_t left = used >= k->max_uses_per_version ? 0 : k->max_uses_per_version - used;
    m.sample("colcrypt_keyd_key_uses_left", {{"key", k->name}}, static_cast<double>(left));
  }
  return m.text();
}

}  // namespace colcrypt::keyd
