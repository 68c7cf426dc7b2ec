#include "keyd/store_db.hpp"

#include <fcntl.h>
#include <libpq-fe.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <pqxx/pqxx>
#include <set>
#include <sstream>

#include "core/kdf.hpp"
#include "keyd/log.hpp"
#include "keyd/server.hpp"
#include "keyd/store_format.hpp"

namespace colcrypt::keyd {
namespace {

using nlohmann::json;
using namespace store_format;
using Clock = std::chrono::steady_clock;

constexpr int kDbFormatVersion = 1;
constexpr std::string_view kRowMacInfo = "colcrypt-keyd-db-row-mac-v1";
constexpr int kMaxBackoffMs = 5000;

// Read-only transactions see one snapshot of all three tables (a standby's
// replay never shows half a save).
using SnapshotTx = pqxx::transaction<pqxx::repeatable_read, pqxx::read_only>;

// The timeline of the database state a session reads: the term of the store's
// generation (docs/operations.md, "Replicas and failover"). On a primary, the
// WAL insertion timeline, from the name of the current WAL segment (its first
// 8 hex digits; PG 15 names it by the insertion timeline, right after a
// promotion too, whereas pg_control_checkpoint().timeline_id keeps the old one
// until the next checkpoint). pg_walfile_name() refuses to run in recovery, so
// on a standby it is the higher of the last restartpoint's timeline and the
// minimum recovery point's: a hot standby accepts sessions only once replay
// has passed its minimum recovery point, so both are at or below the timeline
// of what it has replayed, and pg_rewind sets the latter to its source's
// timeline. Not pg_stat_wal_receiver.received_tli: WAL received may be ahead
// of WAL replayed (and the view hides it from roles without pg_read_all_stats).
// A lagging value errs towards refusing an older generation (fail closed).
// All these functions are executable by PUBLIC in PG 15.
constexpr const char* kTimelineSql =
    "CASE WHEN pg_is_in_recovery() THEN GREATEST((pg_control_checkpoint()).timeline_id, "
    "(pg_control_recovery()).min_recovery_end_timeline)::bigint "
    "ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int::bigint END";

SecretBytes row_mac_key(ByteView kek) {
  return hkdf_sha256(kek, {}, ByteView::of(kRowMacInfo), 32);
}

std::string mac_hex(ByteView key, const json& fields) {
  return to_hex(ByteView(hmac_sha256(key, ByteView::of(fields.dump()))));
}

bool mac_equal(const std::string& a_hex, const std::string& b_hex) {
  auto a = from_hex(a_hex);
  auto b = from_hex(b_hex);
  return a && b && a->size() == 32 && b->size() == 32 &&
         constant_time_equal(ByteView(*a), ByteView(*b));
}

json key_row_fields(const std::string& key_id, const std::string& name, const std::string& body) {
  return json::array({"key", key_id, name, body});
}

json version_row_fields(const std::string& key_id, uint32_t version, const std::string& state,
                        const std::string& wrapped, bool has_wrapped, const std::string& body) {
  return json::array(
      {"version", key_id, version, state, has_wrapped ? json(wrapped) : json(nullptr), body});
}

json meta_fields(int format_version, const std::string& source, uint32_t iterations,
                 const std::string& salt, const std::string& check, int64_t generation,
                 const std::string& manifest) {
  return json::array(
      {"meta", format_version, source, iterations, salt, check, generation, manifest});
}

std::string describe(const std::string& conninfo) {
  char* err = nullptr;
  PQconninfoOption* parsed = PQconninfoParse(conninfo.c_str(), &err);
  if (!parsed) {
    if (err) PQfreemem(err);
    return "database (unparsable connection string)";
  }
  std::string out = "database";
  for (PQconninfoOption* o = parsed; o->keyword; ++o) {
    if (!o->val || !*o->val) continue;
    const std::string k = o->keyword;
    if (k == "dbname" || k == "host" || k == "port" || k == "user") out += " " + k + "=" + o->val;
  }
  PQconninfoFree(parsed);
  return out;
}

std::string version_label(const std::string& name, const std::string& key_id, uint32_t version) {
  const std::string key = name.empty() ? "key " + key_id : "key '" + name + "'";
  return version == 0 ? key : "version " + std::to_string(version) + " of " + key;
}

}  // namespace

std::unique_ptr<DbStoreBackend> DbStoreBackend::connect(const std::string& conninfo,
                                                        const std::string& state_file,
                                                        int timeout_ms) {
  std::unique_ptr<DbStoreBackend> b(new DbStoreBackend());
  b->conninfo_ = with_statement_timeout(conninfo, timeout_ms);
  b->location_ = describe(conninfo);
  b->state_file_ = state_file;
  try {
    b->conn_ = std::make_unique<pqxx::connection>(b->conninfo_);
    b->refresh_role();
  } catch (const pqxx::broken_connection& e) {
    std::string why = e.what();
    while (!why.empty() && (why.back() == '\n' || why.back() == ' ')) why.pop_back();
    throw StoreUnreachable("cannot reach the key " + b->location_ + ": " + why);
  } catch (const std::exception& e) {
    throw StoreUnreachable("cannot use the key " + b->location_ + ": " + e.what());
  }
  return b;
}

DbStoreBackend::~DbStoreBackend() = default;

void DbStoreBackend::refresh_role() {
  pqxx::nontransaction t(*conn_);
  pqxx::result r = t.exec("SELECT pg_is_in_recovery()");
  in_recovery_ = r[0][0].as<bool>();
  primary_.clear();
  if (in_recovery_) {
    // Visible to superusers and members of pg_read_all_stats (pg_monitor).
    pqxx::result w = t.exec("SELECT sender_host, sender_port FROM pg_stat_wal_receiver");
    if (!w.empty() && !w[0][0].is_null()) {
      primary_ = w[0][0].as<std::string>();
      if (!w[0][1].is_null()) primary_ += ":" + w[0][1].as<std::string>();
    }
  }
  last_role_check_ = Clock::now();
}

std::string DbStoreBackend::read_only_reason() const {
  if (!conn_) {
    return "the key " + location_ +
           " is unreachable: keyd serves the keys it has loaded and changes nothing until it "
           "is back";
  }
  return "this keyd's " + location_ +
         " is a standby (in recovery): it is read-only; send admin requests to the keyd of the "
         "primary (" +
         (primary_.empty() ? std::string("its address is not visible: grant pg_monitor to keyd's "
                                         "role to have it named here")
                           : "at " + primary_) +
         ")";
}

void DbStoreBackend::lost(const std::string& why) {
  if (conn_) log_error("lost the key " + location_ + ": " + why + " (reconnecting)");
  conn_.reset();
  next_connect_ = Clock::now() + std::chrono::milliseconds(backoff_ms_);
}

void DbStoreBackend::reconnect() {
  if (Clock::now() < next_connect_) return;
  try {
    conn_ = std::make_unique<pqxx::connection>(conninfo_);
    refresh_role();
    backoff_ms_ = 500;
    log_info("the key " + location_ + " is reachable again");
  } catch (const std::exception& e) {
    conn_.reset();
    backoff_ms_ = std::min(kMaxBackoffMs, backoff_ms_ * 2);
    next_connect_ = Clock::now() + std::chrono::milliseconds(backoff_ms_);
    log_debug(std::string("key database still unreachable: ") + e.what());
  }
}

bool DbStoreBackend::has_store() {
  if (!conn_) throw StoreUnreachable("the key " + location_ + " is unreachable");
  pqxx::nontransaction t(*conn_);
  pqxx::result r = t.exec(
      "SELECT to_regclass('colcrypt_keyd.meta') IS NOT NULL, "
      "to_regnamespace('colcrypt_keyd') IS NOT NULL");
  const bool meta = r[0][0].as<bool>();
  if (!meta && r[0][1].as<bool>()) {
    throw Error(Errc::InvalidArgument, "the " + location_ +
                                           " has a schema colcrypt_keyd without its table meta; "
                                           "refusing to initialize a key store there");
  }
  return meta;
}

DbStoreBackend::Snapshot DbStoreBackend::read_snapshot() {
  if (!conn_) throw Error(Errc::Io, "the key " + location_ + " is unreachable");
  Snapshot s;
  try {
    SnapshotTx t(*conn_);
    pqxx::result role = t.exec(std::string("SELECT pg_is_in_recovery(), ") + kTimelineSql);
    s.in_recovery = role[0][0].as<bool>();
    s.timeline = role[0][1].is_null() ? 0 : role[0][1].as<int64_t>();
    pqxx::result m = t.exec(
        "SELECT format_version, kek_source, pbkdf2_iterations, encode(salt, 'hex'), "
        "encode(kek_check, 'hex'), generation, manifest, encode(mac, 'hex') "
        "FROM colcrypt_keyd.meta");
    if (m.size() != 1)
      corrupt(location_, "its table meta has " + std::to_string(m.size()) + " rows");
    for (int i = 0; i < 8; ++i) {
      if (m[0][i].is_null()) corrupt(location_, "a field of its meta row is null");
    }
    s.format_version = m[0][0].as<int>();
    s.kek_source = m[0][1].as<std::string>();
    s.iterations = m[0][2].as<uint32_t>();
    s.salt = m[0][3].as<std::string>();
    s.check = m[0][4].as<std::string>();
    s.generation = m[0][5].as<int64_t>();
    s.manifest = m[0][6].as<std::string>();
    s.mac = m[0][7].as<std::string>();
    for (const auto& r : t.exec("SELECT key_id, name, body, encode(mac, 'hex') FROM "
                                "colcrypt_keyd.keys ORDER BY key_id")) {
      Row row;
      if (r[0].is_null() || r[1].is_null() || r[2].is_null() || r[3].is_null()) {
        corrupt(location_, "a field of a key row is null");
      }
      row.key_id = r[0].as<std::string>();
      row.name = r[1].as<std::string>();
      row.body = r[2].as<std::string>();
      row.mac = r[3].as<std::string>();
      s.rows.push_back(std::move(row));
    }
    for (const auto& r :
         t.exec("SELECT key_id, version, state, encode(wrapped, 'hex'), body, encode(mac, 'hex') "
                "FROM colcrypt_keyd.versions ORDER BY key_id, version")) {
      Row row;
      if (r[0].is_null() || r[1].is_null() || r[2].is_null() || r[4].is_null() || r[5].is_null()) {
        corrupt(location_, "a field of a version row is null");
      }
      row.key_id = r[0].as<std::string>();
      const int64_t v = r[1].as<int64_t>();
      if (v < 1 || v > 0xffffffffLL)
        corrupt(location_, "a version row has version " + std::to_string(v));
      row.version = static_cast<uint32_t>(v);
      row.state = r[2].as<std::string>();
      row.has_wrapped = !r[3].is_null();
      if (row.has_wrapped) row.wrapped = r[3].as<std::string>();
      row.body = r[4].as<std::string>();
      row.mac = r[5].as<std::string>();
      s.rows.push_back(std::move(row));
    }
    t.commit();
  } catch (const pqxx::broken_connection& e) {
    lost(e.what());
    throw Error(Errc::Io, "lost the key " + location_ + " while reading it");
  } catch (const pqxx::sql_error& e) {
    throw Error(Errc::StoreCorrupt, "cannot read the key store in the " + location_ + ": " +
                                        e.what() + " (its tables were changed?)");
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    throw Error(Errc::StoreCorrupt,
                "cannot read the key store in the " + location_ + ": " + e.what());
  }
  in_recovery_ = s.in_recovery;
  return s;
}

KekParams DbStoreBackend::read_params() {
  pending_ = std::make_unique<Snapshot>(read_snapshot());
  const Snapshot& s = *pending_;
  if (s.format_version != kDbFormatVersion) {
    corrupt(location_, "unsupported format version " + std::to_string(s.format_version));
  }
  KekParams params;
  if (s.kek_source == "password") {
    params.source = MasterSecret::Kind::Password;
    params.iterations = s.iterations;
    auto salt = from_hex(s.salt);
    if (!salt || salt->size() != kSaltSize || params.iterations == 0) {
      corrupt(location_, "invalid PBKDF2 parameters");
    }
    params.salt = std::move(*salt);
  } else if (s.kek_source == "keyfile") {
    params.source = MasterSecret::Kind::KeyFile;
  } else {
    corrupt(location_, "unknown KEK source");
  }
  auto check = from_hex(s.check);
  if (!check) corrupt(location_, "invalid KEK check value");
  params.check = std::move(*check);
  return params;
}

std::vector<KeyRecord> DbStoreBackend::read_keys(ByteView kek) {
  if (!pending_) pending_ = std::make_unique<Snapshot>(read_snapshot());
  std::unique_ptr<Snapshot> s = std::move(pending_);
  return verify(*s, kek);
}

std::vector<KeyRecord> DbStoreBackend::verify(const Snapshot& s, ByteView kek) {
  const SecretBytes mac_key = row_mac_key(kek);
  if (!mac_equal(s.mac,
                 mac_hex(mac_key.view(), meta_fields(s.format_version, s.kek_source, s.iterations,
                                                     s.salt, s.check, s.generation, s.manifest)))) {
    corrupt(location_, "the MAC of its meta row does not verify (the row was edited)");
  }
  const Recorded seen = recorded();
  // A lower generation is a rollback unless the database moved to a higher
  // timeline since: then its history forked at a promotion (a failover that
  // lost the old primary's last writes, or a point-in-time restore), and the
  // store is what that history holds. A state file from before timelines
  // (timeline 0) proves no promotion: an older generation stays refused.
  const bool rewound = s.generation < seen.generation;
  if (rewound && (seen.timeline == 0 || s.timeline <= seen.timeline)) {
    corrupt(location_, "it is at generation " + std::to_string(s.generation) + " (timeline " +
                           std::to_string(s.timeline) + "), older than generation " +
                           std::to_string(seen.generation) + " (timeline " +
                           std::to_string(seen.timeline) + ") this keyd has seen (" + state_file_ +
                           "): the key tables were rolled back to an older copy");
  }
  // Names for messages, from the key rows whose MAC verifies.
  std::map<std::string, std::string> names;
  std::map<std::pair<std::string, uint32_t>, const Row*> rows;
  for (const Row& r : s.rows) {
    const json fields = r.version == 0 ? key_row_fields(r.key_id, r.name, r.body)
                                       : version_row_fields(r.key_id, r.version, r.state, r.wrapped,
                                                            r.has_wrapped, r.body);
    if (r.version == 0 && mac_equal(r.mac, mac_hex(mac_key.view(), fields))) {
      names[r.key_id] = r.name;
    }
    rows[{r.key_id, r.version}] = &r;
  }
  for (const Row& r : s.rows) {
    const json fields = r.version == 0 ? key_row_fields(r.key_id, r.name, r.body)
                                       : version_row_fields(r.key_id, r.version, r.state, r.wrapped,
                                                            r.has_wrapped, r.body);
    if (!mac_equal(r.mac, mac_hex(mac_key.view(), fields))) {
      corrupt(location_, "the row of " + version_label(names[r.key_id], r.key_id, r.version) +
                             " does not verify: it was edited, or moved from another key or "
                             "version");
    }
  }
  json manifest = json::parse(s.manifest, nullptr, false);
  if (!manifest.is_array()) corrupt(location_, "its manifest is not a JSON array");
  std::map<std::pair<std::string, uint32_t>, std::string> macs;
  json keys = json::array();
  try {
    for (const auto& entry : manifest) {
      const std::string key_id = entry.at(0).get<std::string>();
      const uint32_t version = entry.at(1).get<uint32_t>();
      const std::string mac = entry.at(2).get<std::string>();
      auto it = rows.find({key_id, version});
      const std::string what = version_label(names[key_id], key_id, version);
      if (it == rows.end()) corrupt(location_, "the row of " + what + " is missing (deleted)");
      if (!mac_equal(it->second->mac, mac)) {
        corrupt(location_, "the row of " + what +
                               " is not the one keyd last wrote (restored from an older copy)");
      }
      macs[{key_id, version}] = mac;
      const Row& r = *it->second;
      if (version == 0) {
        json k = json::parse(r.body);
        if (k.at("id").get<std::string>() != key_id || k.at("name").get<std::string>() != r.name) {
          corrupt(location_, "the row of " + what + " does not match its columns");
        }
        k["versions"] = json::array();
        keys.push_back(std::move(k));
      } else {
        if (keys.empty() || keys.back().at("id").get<std::string>() != key_id) {
          corrupt(location_, "its manifest lists " + what + " out of order");
        }
        json v = json::parse(r.body);
        if (v.at("version").get<uint32_t>() != version) {
          corrupt(location_, "the row of " + what + " does not match its columns");
        }
        v["state"] = r.state;
        v["wrapped"] = r.has_wrapped ? json(r.wrapped) : json(nullptr);
        keys.back()["versions"].push_back(std::move(v));
      }
    }
  } catch (const json::exception&) {
    corrupt(location_, "a row or its manifest entry is malformed");
  }
  for (const auto& [id, row] : rows) {
    if (!macs.count(id)) {
      corrupt(location_, "it has a row for " + version_label(names[id.first], id.first, id.second) +
                             " that keyd never wrote (inserted behind its back)");
    }
  }
  std::vector<KeyRecord> records;
  try {
    for (const auto& jk : keys) records.push_back(parse_key(location_, jk));
  } catch (const json::exception&) {
    corrupt(location_, "a field is missing or has the wrong type");
  }
  // Recorded before the records are taken: a state file that cannot be
  // written must not leave this backend believing it holds a generation
  // whose records keyd never adopted (a later save would write them back).
  try {
    record({std::max(s.timeline, seen.timeline), s.generation});
  } catch (const Error& e) {
    log_warning(std::string("cannot record the store generation: ") + e.what());
  }
  generation_ = s.generation;
  timeline_ = s.timeline;
  saved_macs_ = std::move(macs);
  refused_generation_ = -1;
  if (rewound) {
    rewound_ = StoreRewind{seen.timeline, seen.generation, s.timeline, s.generation};
    log_warning("the key " + location_ + " moved to timeline " + std::to_string(s.timeline) +
                " (from " + std::to_string(seen.timeline) + ") at generation " +
                std::to_string(s.generation) + ", older than generation " +
                std::to_string(seen.generation) +
                " this keyd had seen: a failover or a point-in-time restore dropped the key "
                "changes after the fork; keyd now follows the database");
  }
  return records;
}

void DbStoreBackend::initialize(const KekParams& params, const std::vector<KeyRecord>& keys,
                                ByteView kek) {
  if (!conn_) throw StoreUnreachable("the key " + location_ + " is unreachable");
  if (in_recovery_) {
    throw Error(Errc::PermissionDenied,
                "cannot create a key store in the " + location_ +
                    ": it is a standby (in recovery); start keyd on the primary first, the "
                    "standby receives the store by replication");
  }
  // A database whose key tables were dropped is not a new store: the keys
  // and every value sealed under them would be gone for good.
  const Recorded seen = recorded();
  if (seen.generation > 0) {
    corrupt(location_, "it holds no key store, but this keyd has seen one at generation " +
                           std::to_string(seen.generation) + " (" + state_file_ +
                           "): the key tables were dropped; restore them, or remove that file "
                           "to start a new, empty store");
  }
  // One transaction creates the schema and writes the records (save()).
  creating_ = true;
  generation_ = seen.generation + 1;
  saved_macs_.clear();
  try {
    save(params, keys, false, kek);
  } catch (...) {
    creating_ = false;
    generation_ = 0;
    throw;
  }
  creating_ = false;
}

namespace {

// The schema, its tables and a placeholder meta row at `generation` (the
// save in the same transaction replaces it). Only keyd's role may use them.
void create_schema(pqxx::work& t, int64_t generation) {
  t.exec("CREATE SCHEMA colcrypt_keyd");
  t.exec("REVOKE ALL ON SCHEMA colcrypt_keyd FROM PUBLIC");
  t.exec(
      "CREATE TABLE colcrypt_keyd.meta ("
      " id int PRIMARY KEY CHECK (id = 1),"
      " format_version int NOT NULL,"
      " kek_source text NOT NULL,"
      " pbkdf2_iterations bigint NOT NULL,"
      " salt bytea NOT NULL,"
      " kek_check bytea NOT NULL,"
      " generation bigint NOT NULL,"
      " manifest text NOT NULL,"
      " mac bytea NOT NULL)");
  t.exec(
      "CREATE TABLE colcrypt_keyd.keys ("
      " key_id text PRIMARY KEY,"
      " name text NOT NULL UNIQUE,"
      " body text NOT NULL,"
      " mac bytea NOT NULL)");
  t.exec(
      "CREATE TABLE colcrypt_keyd.versions ("
      " key_id text NOT NULL,"
      " version bigint NOT NULL,"
      " state text NOT NULL,"
      " wrapped bytea,"
      " body text NOT NULL,"
      " mac bytea NOT NULL,"
      " PRIMARY KEY (key_id, version))");
  t.exec("REVOKE ALL ON ALL TABLES IN SCHEMA colcrypt_keyd FROM PUBLIC");
  t.exec_params("INSERT INTO colcrypt_keyd.meta VALUES (1, $1, '', 0, '', '', $2, '[]', '')",
                kDbFormatVersion, generation);
}

}  // namespace

void DbStoreBackend::save(const KekParams& params, const std::vector<KeyRecord>& keys,
                          bool exact_usage, ByteView kek) {
  if (!conn_) throw Error(Errc::Io, read_only_reason());
  if (in_recovery_) throw Error(Errc::PermissionDenied, read_only_reason());
  const SecretBytes mac_key = row_mac_key(kek);
  std::vector<Row> rows;
  json manifest = json::array();
  for (const KeyRecord& k : keys) {
    json kj = key_to_json(k, exact_usage);
    json versions = std::move(kj["versions"]);
    kj.erase("versions");
    Row key_row;
    key_row.key_id = format_key_id(k.id);
    key_row.name = k.name;
    key_row.body = kj.dump();
    key_row.mac =
        mac_hex(mac_key.view(), key_row_fields(key_row.key_id, key_row.name, key_row.body));
    manifest.push_back(json::array({key_row.key_id, 0, key_row.mac}));
    rows.push_back(std::move(key_row));
    for (auto& vj : versions) {
      Row r;
      r.key_id = format_key_id(k.id);
      r.version = vj.at("version").get<uint32_t>();
      r.state = vj.at("state").get<std::string>();
      r.has_wrapped = !vj.at("wrapped").is_null();
      if (r.has_wrapped) r.wrapped = vj.at("wrapped").get<std::string>();
      vj.erase("state");
      vj.erase("wrapped");
      r.body = vj.dump();
      r.mac = mac_hex(mac_key.view(), version_row_fields(r.key_id, r.version, r.state, r.wrapped,
                                                         r.has_wrapped, r.body));
      manifest.push_back(json::array({r.key_id, r.version, r.mac}));
      rows.push_back(std::move(r));
    }
  }
  const std::string source = params.source == MasterSecret::Kind::Password ? "password" : "keyfile";
  const std::string salt = to_hex(ByteView(params.salt));
  const std::string check = to_hex(ByteView(params.check));
  const std::string manifest_text = manifest.dump();
  const int64_t generation = generation_ + 1;
  const std::string meta_mac =
      mac_hex(mac_key.view(), meta_fields(kDbFormatVersion, source, params.iterations, salt, check,
                                          generation, manifest_text));
  std::set<std::pair<std::string, uint32_t>> kept;
  try {
    pqxx::work t(*conn_);
    // Re-checked in the transaction that writes: a demoted database refuses
    // the write anyway, and keyd answers with the standby's refusal.
    pqxx::result role = t.exec(std::string("SELECT pg_is_in_recovery(), ") + kTimelineSql);
    if (role[0][0].as<bool>()) {
      t.abort();
      in_recovery_ = true;
      throw Error(Errc::PermissionDenied, read_only_reason());
    }
    if (!role[0][1].is_null()) timeline_ = role[0][1].as<int64_t>();
    if (creating_) create_schema(t, generation_);
    pqxx::result updated = t.exec_params(
        "UPDATE colcrypt_keyd.meta SET generation = $1, manifest = $2, mac = decode($3, 'hex'), "
        "format_version = $5, kek_source = $6, pbkdf2_iterations = $7, salt = decode($8, 'hex'), "
        "kek_check = decode($9, 'hex') WHERE id = 1 AND generation = $4",
        generation, manifest_text, meta_mac, generation_, kDbFormatVersion, source,
        static_cast<int64_t>(params.iterations), salt, check);
    if (updated.affected_rows() != 1) {
      const int64_t expected = generation_;
      generation_ = -1;  // the next poll re-reads (and verifies) what is there
      throw Error(Errc::Io, "the key store in the " + location_ + " is no longer at generation " +
                                std::to_string(expected) +
                                ": another process wrote it (a second keyd on the same "
                                "database?); nothing was changed, keyd re-reads the store");
    }
    for (const Row& r : rows) {
      kept.insert({r.key_id, r.version});
      auto old = saved_macs_.find({r.key_id, r.version});
      if (old != saved_macs_.end() && old->second == r.mac) continue;
      if (r.version == 0) {
        t.exec_params(
            "INSERT INTO colcrypt_keyd.keys VALUES ($1, $2, $3, decode($4, 'hex')) "
            "ON CONFLICT (key_id) DO UPDATE SET name = EXCLUDED.name, body = EXCLUDED.body, "
            "mac = EXCLUDED.mac",
            r.key_id, r.name, r.body, r.mac);
      } else {
        t.exec_params(
            "INSERT INTO colcrypt_keyd.versions VALUES ($1, $2, $3, decode(nullif($4, ''), "
            "'hex'), $5, decode($6, 'hex')) ON CONFLICT (key_id, version) DO UPDATE SET "
            "state = EXCLUDED.state, wrapped = EXCLUDED.wrapped, body = EXCLUDED.body, "
            "mac = EXCLUDED.mac",
            r.key_id, static_cast<int64_t>(r.version), r.state, r.has_wrapped ? r.wrapped : "",
            r.body, r.mac);
      }
    }
    for (const auto& [id, mac] : saved_macs_) {
      if (kept.count(id)) continue;
      if (id.second == 0) {
        t.exec_params("DELETE FROM colcrypt_keyd.keys WHERE key_id = $1", id.first);
      } else {
        t.exec_params("DELETE FROM colcrypt_keyd.versions WHERE key_id = $1 AND version = $2",
                      id.first, static_cast<int64_t>(id.second));
      }
    }
    t.commit();
  } catch (const pqxx::in_doubt_error& e) {
    // The commit may or may not have happened: the next poll re-reads whatever is there.
    lost(e.what());
    throw Error(Errc::Io, "lost the key " + location_ +
                              " during a commit; keyd re-reads the store once it is back");
  } catch (const pqxx::broken_connection& e) {
    lost(e.what());
    throw Error(Errc::Io, "lost the key " + location_ + "; nothing was changed");
  } catch (const pqxx::sql_error& e) {
    if (e.sqlstate() == "25006") {  // read_only_sql_transaction: demoted meanwhile
      in_recovery_ = true;
      throw Error(Errc::PermissionDenied, read_only_reason());
    }
    throw Error(Errc::Io, "cannot write the key store in the " + location_ + ": " + e.what() +
                              "; nothing was changed");
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    throw Error(Errc::Io, "cannot write the key store in the " + location_ + ": " + e.what() +
                              "; nothing was changed");
  }
  generation_ = generation;
  saved_macs_.clear();
  for (const Row& r : rows) saved_macs_[{r.key_id, r.version}] = r.mac;
  try {
    const Recorded seen = recorded();
    record({std::max(timeline_, seen.timeline), generation});
  } catch (const Error& e) {
    log_warning(std::string("cannot record the store generation: ") + e.what());
  }
}

StorePoll DbStoreBackend::poll(ByteView kek, bool force_reload) {
  StorePoll out;
  // Unreachable, standby, primary: a database back as a standby after an
  // outage is a role change too (read-only for another reason).
  const auto role = [this] { return !conn_ ? 0 : in_recovery_ ? 1 : 2; };
  const int old_role = role();
  if (!conn_) {
    reconnect();
    if (!conn_) return out;
    force_reload = true;
  }
  int64_t generation = -1;
  int64_t timeline = timeline_;
  try {
    bool recovery = false;
    {
      pqxx::nontransaction t(*conn_);
      pqxx::result r = t.exec(
          std::string("SELECT pg_is_in_recovery(), (SELECT generation FROM colcrypt_keyd.meta "
                      "WHERE id = 1), ") +
          kTimelineSql);
      recovery = r[0][0].as<bool>();
      if (!r[0][1].is_null()) generation = r[0][1].as<int64_t>();
      if (!r[0][2].is_null()) timeline = r[0][2].as<int64_t>();
    }
    if (recovery != in_recovery_ || (recovery && primary_.empty() &&
                                     Clock::now() - last_role_check_ > std::chrono::seconds(10))) {
      refresh_role();
    }
    in_recovery_ = recovery;
  } catch (const pqxx::broken_connection& e) {
    lost(e.what());
  } catch (const std::exception& e) {
    log_warning(std::string("cannot look at the key database: ") + e.what());
  }
  out.role_changed = role() != old_role;
  // A new timeline is re-read even at the same generation: the same number
  // may now stand for other records (the new primary's own changes).
  const bool changed = generation != generation_ || timeline != timeline_;
  const bool refused = generation == refused_generation_ && timeline == refused_timeline_;
  if (conn_ && generation >= 0 && ((changed && !refused) || force_reload)) {
    try {
      out.keys = verify(read_snapshot(), kek);
      out.reloaded = true;
    } catch (const Error& e) {
      if (e.code() == Errc::StoreCorrupt) {
        refused_generation_ = generation;
        refused_timeline_ = timeline;
      }
      throw;
    }
  }
  return out;
}

// The state file: "generation N" (before timelines: read as timeline 0) or
// "timeline T generation N".
DbStoreBackend::Recorded DbStoreBackend::recorded() const {
  Recorded out;
  if (state_file_.empty()) return out;
  std::ifstream in(state_file_);
  if (!in) return out;
  std::string word;
  bool ok = static_cast<bool>(in >> word);
  if (ok && word == "timeline") {
    ok = (in >> out.timeline >> word) && out.timeline >= 0;
  }
  ok = ok && word == "generation" && (in >> out.generation) && out.generation >= 0;
  if (ok && in >> word) ok = false;  // trailing text
  if (!ok) {
    throw Error(Errc::StoreCorrupt, "the store state file " + state_file_ +
                                        " is damaged (expected \"timeline T generation N\")");
  }
  return out;
}

void DbStoreBackend::record(Recorded seen) {
  if (state_file_.empty()) return;
  const Recorded old = recorded();
  if (seen.timeline == old.timeline && seen.generation == old.generation) return;
  const std::string tmp = state_file_ + ".tmp";
  const std::string text = "timeline " + std::to_string(seen.timeline) + " generation " +
                           std::to_string(seen.generation) + "\n";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) {
    int err = errno;
    throw Error(Errc::Io, "cannot write " + tmp + ": " + std::strerror(err));
  }
  const bool ok = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size()) &&
                  ::fsync(fd) == 0;
  const int err = errno;
  ::close(fd);
  if (!ok || ::rename(tmp.c_str(), state_file_.c_str()) != 0) {
    ::unlink(tmp.c_str());
    throw Error(Errc::Io, "cannot write " + state_file_ + ": " + std::strerror(ok ? errno : err));
  }
}

}  // namespace colcrypt::keyd
