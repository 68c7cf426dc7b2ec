// colcrypt-keyd's audit trail: an append-only file of JSON lines, one per
// event (every key fetch, every admin action, every refused peer, every
// failed unlock, automatic rotations), never key bytes or plaintext.
//
// Tamper evidence (docs/rotation.md, "Audit trail"): entry n carries
//   "seq": n (1, 2, 3, ...) and
//   "mac": hex HMAC-SHA256(K, mac(n-1) || "\n" || canonical JSON of the entry without "mac")
// with mac(0) = "" and K = HKDF-SHA256(KEK, info "colcrypt-audit-mac-v1"), so
// only a holder of the master secret can write or check a chain. A sidecar
// file PATH.head holds the last seq and mac, itself MACed, replaced
// atomically after every append: it exposes a truncated tail (a removed last
// entry re-chains nothing, but the head still names it).
//
// A failed unlock happens before keyd has K: it is written, unauthenticated,
// to PATH.pending and moved into the chain by the next successful start.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include "core/secure_memory.hpp"

namespace colcrypt::keyd {

constexpr const char* kAuditFileName = "audit.log";

struct AuditVerdict {
  bool ok = false;
  uint64_t entries = 0;  // entries whose MAC verified before the first problem
  std::string problem;   // empty when ok
};

class AuditLog {
 public:
  // Opens (creating 0600 if missing) the log at path. When the log's last
  // entry and the head disagree (a truncated or edited log, or a crash
  // between the two writes), the problem is logged and recorded in the
  // chain as an "audit-chain-break" entry, which verify() reports.
  // Imports PATH.pending. Throws Error(Io) when the file cannot be opened.
  AuditLog(std::string path, SecretBytes mac_key);
  ~AuditLog();
  AuditLog(const AuditLog&) = delete;
  AuditLog& operator=(const AuditLog&) = delete;

  // Appends one event: `event` is an object; "seq", "time" and "mac" are set
  // here. Failures to write are logged, never thrown (keyd keeps serving),
  // and counted in write_failures().
  void append(nlohmann::json event);
  // fdatasync of the log (after admin actions and on the flush tick).
  void sync();

  const std::string& path() const { return path_; }
  uint64_t last_seq() const { return seq_; }
  uint64_t write_failures() const { return write_failures_; }

  // Checks the whole chain and the head. Needs K (the KEK's HKDF).
  static AuditVerdict verify(const std::string& path, ByteView mac_key);

  // For a failed unlock: appends an unauthenticated line to path + ".pending".
  static void record_pending(const std::string& path, nlohmann::json event);

 private:
  void write_head();
  void import_pending();

  std::string path_;
  SecretBytes key_;
  int fd_ = -1;
  uint64_t seq_ = 0;
  std::string last_mac_;
  uint64_t write_failures_ = 0;
};

// The entry MAC, exposed for the unit tests.
std::string audit_entry_mac(ByteView key, const std::string& previous_mac,
                            const nlohmann::json& entry_without_mac);

}  // namespace colcrypt::keyd
