// The database backend of the key store (colcrypt-keyd --store-db): the same
// records as keystore.json, in tables of the schema colcrypt_keyd of a
// Postgres database, so that streaming replication carries every key version
// to the standbys in WAL order. docs/operations.md, "--store-db", and
// docs/threat-model.md, "The database superuser".
//
// Tables: meta (KEK parameters and check, a generation counter, the manifest:
// the MAC of every row keyd last wrote), keys (one row per key), versions
// (one per key version: state, wrapped key bytes exactly as the file store
// wraps them). Every row carries an HMAC under a key derived from the KEK
// over all its fields, key id and version included; the meta row's MAC covers
// the generation and the manifest, so a row edited, moved, deleted or
// restored from an older copy is refused, and keyd remembers the highest
// generation it has seen, with the database's timeline when it saw it, in a
// local state file, so a rollback of all tables at once is refused too. A
// lower generation is taken only on a higher timeline: a promotion happened
// in the database's history (a failover that lost the old primary's last
// writes, or a point-in-time restore), which is a new term, not a rollback.
// Each save is one transaction.
#pragma once
#include <chrono>
#include <map>
#include <memory>
#include <optional>
#include <pqxx/connection>
#include <string>
#include <utility>
#include <vector>

#include "keyd/store_backend.hpp"

namespace colcrypt::keyd {

constexpr const char* kStoreDbSchema = "colcrypt_keyd";
constexpr const char* kStoreGenerationFileName = "store-generation";

// The key database cannot be reached (colcrypt-keyd exits 75 at start).
class StoreUnreachable : public Error {
 public:
  explicit StoreUnreachable(const std::string& message) : Error(Errc::Io, message) {}
};

class DbStoreBackend : public StoreBackend {
 public:
  // Connects (StoreUnreachable when it cannot) and reads the database's role.
  // state_file: where this keyd keeps the highest generation it has seen
  // (empty: none; colcrypt-keyctl store migrate).
  // timeout_ms: connect_timeout and statement_timeout of its session.
  static std::unique_ptr<DbStoreBackend> connect(const std::string& conninfo,
                                                 const std::string& state_file, int timeout_ms);
  ~DbStoreBackend() override;

  // True when the database holds a key store (the table colcrypt_keyd.meta).
  bool has_store();
  // True when the database is in recovery (a standby).
  bool in_recovery() const { return in_recovery_; }
  bool connected() const { return conn_ != nullptr; }

  std::string location() const override { return location_; }
  KekParams read_params() override;
  std::vector<KeyRecord> read_keys(ByteView kek) override;
  void initialize(const KekParams& params, const std::vector<KeyRecord>& keys,
                  ByteView kek) override;
  void save(const KekParams& params, const std::vector<KeyRecord>& keys, bool exact_usage,
            ByteView kek) override;
  bool read_only() const override { return !conn_ || in_recovery_; }
  std::string read_only_reason() const override;
  StorePoll poll(ByteView kek, bool force_reload) override;
  std::optional<StoreRewind> take_rewind() override {
    return std::exchange(rewound_, std::nullopt);
  }

 private:
  DbStoreBackend() = default;
  struct Row {
    std::string key_id;
    uint32_t version = 0;  // 0: the key row
    std::string name;      // key rows
    std::string state;     // version rows
    std::string wrapped;   // version rows: hex, empty once destroyed
    bool has_wrapped = false;
    std::string body;
    std::string mac;  // hex
  };
  struct Snapshot {
    bool in_recovery = false;
    int format_version = 0;
    std::string kek_source;
    uint32_t iterations = 0;
    std::string salt, check;  // hex
    int64_t generation = 0;
    int64_t timeline = 0;
    std::string manifest;
    std::string mac;  // hex
    std::vector<Row> rows;
  };
  void reconnect();
  void lost(const std::string& why);
  void refresh_role();  // in_recovery_ and primary_ from the open session
  Snapshot read_snapshot();
  std::vector<KeyRecord> verify(const Snapshot& s, ByteView kek);
  struct Recorded {
    int64_t timeline = 0;  // 0: unknown (a state file from before timelines)
    int64_t generation = 0;
  };
  Recorded recorded() const;
  void record(Recorded seen);

  std::string conninfo_;  // with the timeouts
  std::string location_;  // no password
  std::string state_file_;
  std::unique_ptr<pqxx::connection> conn_;
  bool in_recovery_ = false;
  std::string primary_;  // "host:port" of the primary while in recovery, when visible
  int64_t generation_ = 0;
  int64_t timeline_ = 0;                // of the database when keyd last read or wrote it
  std::optional<StoreRewind> rewound_;  // set by verify(), taken by take_rewind()
  std::map<std::pair<std::string, uint32_t>, std::string> saved_macs_;  // as last read/written
  std::unique_ptr<Snapshot> pending_;  // read by read_params for read_keys
  // A reload refused at this generation and timeline is not retried.
  int64_t refused_generation_ = -1;
  int64_t refused_timeline_ = -1;
  bool creating_ = false;  // the next save creates the schema first (initialize)
  std::chrono::steady_clock::time_point next_connect_{};
  int backoff_ms_ = 500;
  std::chrono::steady_clock::time_point last_role_check_{};
};

}  // namespace colcrypt::keyd
