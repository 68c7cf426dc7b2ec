// Where a KeyStore keeps its records: the interface its two backends share.
// The lifecycle (keyd/store.cpp) computes every change as a new set of
// records and hands it to save() before it becomes visible; a backend only
// persists, reads back and verifies. The file backend (store_file.cpp) keeps
// one MACed JSON file; the database backend (store_db.cpp) keeps MACed rows
// in a schema of a Postgres database (docs/operations.md, "--store-db").
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "keyd/store.hpp"

namespace colcrypt::keyd {

// What a backend's poll() found (database backend only).
struct StorePoll {
  bool role_changed = false;  // became writable, a standby or unreachable (read_only())
  bool reloaded = false;      // the records were re-read: `keys` holds them
  std::vector<KeyRecord> keys;
};

class StoreBackend {
 public:
  virtual ~StoreBackend() = default;
  // For messages, the log and the audit log: a directory, or "database ...".
  virtual std::string location() const = 0;
  // The store directory of a file store; empty for other backends.
  virtual std::string dir() const { return {}; }
  // Reads the KEK parameters (throws StoreCorrupt, Io, ...).
  virtual KekParams read_params() = 0;
  // Once the KEK is known and its check verified: every record, verified
  // against its MAC (throws StoreCorrupt naming what is wrong).
  virtual std::vector<KeyRecord> read_keys(ByteView kek) = 0;
  // Writes a new store holding `keys` (none for a new keyd; a copy for
  // colcrypt-keyctl store migrate), atomically: all of it or nothing.
  virtual void initialize(const KekParams& params, const std::vector<KeyRecord>& keys,
                          ByteView kek) = 0;
  // Writes `keys` atomically: afterwards the store holds them, or (when this
  // throws) what it held before. exact_usage: write usage counts instead of
  // reservations (a clean stop).
  virtual void save(const KekParams& params, const std::vector<KeyRecord>& keys, bool exact_usage,
                    ByteView kek) = 0;
  // True when the store cannot be written now (a database in recovery, or
  // unreachable); read_only_reason() says why, for the peer.
  virtual bool read_only() const { return false; }
  virtual std::string read_only_reason() const { return {}; }
  // The audit log's mark (AuditMark) kept with the records. The file store
  // keeps it in its file, under the file's MAC (set_audit_mark: written by
  // the next save). The database store keeps none: its tables replicate to
  // hosts whose audit logs differ, and a standby cannot write them.
  virtual bool keeps_audit_mark() const { return false; }
  virtual AuditMark audit_mark() const { return {}; }
  virtual void set_audit_mark(const AuditMark& /*mark*/) {}
  // Called by keyd's loop about once a second (and when a fetch names a key
  // or version not loaded): looks at the database's role and generation.
  virtual StorePoll poll(ByteView /*kek*/, bool /*force_reload*/) { return {}; }
  // The last read took an older generation on a newer timeline (database
  // backend): what it dropped, once; the server audits it.
  virtual std::optional<StoreRewind> take_rewind() { return std::nullopt; }
};

}  // namespace colcrypt::keyd
