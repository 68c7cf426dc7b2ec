// colcrypt-keyd's audit trail: an append-only file of JSON lines, one per
// event (every key fetch, every admin action, every refused peer, every
// failed unlock, automatic rotations), never key bytes or plaintext.
//
// Tamper evidence (docs/rotation.md, "Audit trail"): entry n carries
//   "seq": n (1, 2, 3, ...) and
//   "mac": hex HMAC-SHA256(K, mac(n-1) || "\n" || canonical JSON of the entry without "mac")
// with mac(0) = "" and K = HKDF-SHA256(KEK, info "colcrypt-audit-mac-v1"), so
// only a holder of the master secret can write or check a chain. A sidecar
// file PATH.head holds the last seq and mac, itself MACed, rewritten in place
// (one pwrite of a fixed-size record, padded with spaces) after every batch
// of appends and fdatasynced at sync(): it exposes a truncated tail (a
// removed last entry re-chains nothing, but the head still names it).
//
// Group commit: append() chains an entry in memory; commit() writes every
// entry appended since the last commit with one write() and replaces the
// head once. Without a sync thread, commit() then fdatasyncs the log itself.
// keyd starts a sync thread (start_sync_thread): commit() only hands the
// written entries to it, and the thread fdatasyncs whatever was written
// while its previous fdatasync ran (pipelined group commit), so keyd's poll
// loop never waits for the disk. keyd's poll loop commits once per
// iteration, before it sends any reply; which key replies then go out is
// decided by --audit-sync (docs/operations.md, "Audit durability").
//
// A batch that cannot be written (disk full, EIO, EFBIG) is dropped and the
// file cut back to its last whole entry, so the chain stays verifiable; the
// loss is then recorded IN the chain: the first entry of the next batch is
//   {"event":"audit_gap","lost":N,"after_seq":S,"reason":"...","since":"..."}
// (N entries that would have followed entry S were never written), retried
// on every commit until it lands. verify() reports gaps apart from tampering.
//
// A failed unlock happens before keyd has K: it is written, unauthenticated,
// to PATH.pending and moved into the chain by the next successful start.
#pragma once
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "core/kdf.hpp"
#include "core/secure_memory.hpp"
#include "keyd/metrics.hpp"
#include "keyd/store.hpp"

namespace colcrypt::keyd {

constexpr const char* kAuditFileName = "audit.log";

// keyd's --audit-sync: when a key reply may go out (docs/operations.md).
enum class AuditSyncMode { Batch, Always };
// A key reply whose audit entry is written but not yet fdatasynced is held
// (--audit-sync batch) while an fdatasync has run longer than this: a disk
// that stops completing syncs stops keyd from handing out keys within it.
constexpr int kAuditSyncStallMs = 100;
// After a failed fdatasync the sync thread retries this much later.
constexpr int kAuditSyncRetryMs = 50;

// Size of PATH.head: one JSON object padded with spaces, then a newline.
constexpr size_t kHeadRecordSize = 256;

struct AuditVerdict {
  bool ok = false;       // the chain and the head verify (gaps or not)
  uint64_t entries = 0;  // entries whose MAC verified before the first problem
  std::string problem;   // empty when ok
  // audit_gap entries in the (authentic) chain: keyd lost entries it could
  // not write. Their descriptions and the total lost.
  std::vector<std::string> gaps;
  uint64_t lost = 0;
  // Entries written after the head's last update (keyd stopped between the
  // two writes): they chain on from the entry the head names, so the chain
  // is whole; keyd's next start records an "audit-head-behind" entry.
  uint64_t head_behind = 0;
};

// The admin protocol's "audit-verify" reply: {"ok","entries","log","problem",
// "gaps":[...],"lost","head_behind"}.
nlohmann::json audit_verdict_json(const AuditVerdict& verdict, const std::string& path);

// What the log's writes and fdatasyncs took and how often they failed (keyd's
// metrics): batch writes by commit()/sync(), fdatasyncs by either thread.
struct AuditStats {
  LatencyHistogram write_latency;
  LatencyHistogram sync_latency;
  uint64_t write_failures = 0;  // batches not written
  uint64_t sync_failures = 0;   // fdatasyncs that failed
};

class AuditLog {
 public:
  // Opens (creating 0600 if missing) the log at path. When the log's last
  // entry and the head disagree (a truncated or edited log), the problem is
  // logged and recorded in the chain as an "audit-chain-break" entry, which
  // verify() reports. A head behind the log whose later entries chain on from
  // the one it names (keyd stopped between a batch's write and the head's
  // update) is no break: logged, recorded as "audit-head-behind", updated.
  // With `mark` (the key store's AuditMark), the log must still hold the
  // entry it names at its offset and the head must not name an earlier
  // entry: else (a log cut back, with or without an old copy of its head
  // restored, or replaced) that is recorded as a chain break too.
  // Imports PATH.pending. Throws Error(Io) when the file cannot be opened.
  AuditLog(std::string path, SecretBytes mac_key, AuditMark mark = {});
  ~AuditLog();
  AuditLog(const AuditLog&) = delete;
  AuditLog& operator=(const AuditLog&) = delete;

  // Appends one event to the current batch: `event` is an object; "seq",
  // "time" and "mac" are set here. Nothing reaches the file before commit().
  void append(nlohmann::json event);
  // Starts the sync thread (see the top of this file); on_synced runs on it
  // after every fdatasync attempt (keyd wakes its poll loop). Once started,
  // commit() no longer fdatasyncs: synced_seq() tells what is durable.
  void start_sync_thread(std::function<void()> on_synced);
  // Writes the batch with one write(), then replaces the head once, then
  // fdatasyncs the log (or, with the sync thread, hands it the entries).
  // Does nothing when no entry is pending. Failures are logged,
  // never thrown (keyd keeps serving), and counted in write_failures(); a
  // batch that could not be written is dropped from the chain (the file is
  // cut back to its last whole entry) so that later entries still chain.
  // Returns false when the batch is not known to be on disk (write or, without
  // the sync thread, fdatasync failed); a failed head replacement is logged
  // and counted but does not make it false (the entries are durable).
  bool commit();
  // commit(), then the log and the head are made durable (the head with a
  // synced temp file and directory): after admin actions, on the flush tick
  // and at stop.
  void sync();
  // Entries appended but not yet committed.
  size_t pending() const { return pending_entries_; }

  const std::string& path() const { return path_; }
  // Where the last successful sync() left the log: its entries and its head
  // on disk (fdatasynced). keyd keeps it in the key store (KeyStore::
  // set_audit_mark). seq 0 before any entry.
  const AuditMark& durable_mark() const { return durable_mark_; }
  uint64_t last_seq() const { return seq_; }
  // Last entry written to the file (by commit() or sync()): it survives a
  // crash or kill -9 of keyd (the kernel has it), not yet a power loss.
  uint64_t written_seq() const { return committed_seq_; }
  // Last entry known to be fdatasynced (survives a power loss).
  uint64_t synced_seq() const { return synced_seq_.load(std::memory_order_acquire); }
  // The sync thread's last fdatasync failed (it retries; cleared by the next
  // one that succeeds).
  bool sync_failing() const { return sync_failing_.load(std::memory_order_acquire); }
  // An fdatasync of the sync thread has been running for kAuditSyncStallMs or more.
  bool sync_stalled() const;
  uint64_t write_failures() const { return write_failures_; }
  // Batches that were not written or not synced, since the start: keyd's
  // poll loop withholds key replies when this moved (fail closed). Read
  // synced_seq() first: a failed sync counts here before anything else moves.
  uint64_t loss_events() const { return loss_events_.load(std::memory_order_acquire); }
  // False from a failed write until its audit_gap entry is in the file.
  bool writable() const { return !gap_open_; }
  uint64_t lost_entries() const { return gap_lost_; }  // in the open gap
  std::string last_failure() const {
    std::lock_guard<std::mutex> lock(sync_mutex_);
    return last_failure_;
  }

  AuditStats stats() const {
    std::lock_guard<std::mutex> lock(stats_mutex_);
    return stats_;
  }

  // Tests only: what the log's fdatasync calls instead of ::fdatasync (to fail
  // or stall it). Set before start_sync_thread.
  void set_fdatasync_for_tests(std::function<int(int)> f) { fdatasync_ = std::move(f); }

  // Checks the whole chain and the head. Needs K (the KEK's HKDF). With
  // `mark` (the key store's), also that the log still holds the entry it
  // names at its offset and that the head names no earlier entry.
  static AuditVerdict verify(const std::string& path, ByteView mac_key, const AuditMark& mark = {});

  // For a failed unlock: appends an unauthenticated line to path + ".pending".
  static void record_pending(const std::string& path, nlohmann::json event);

 private:
  bool write_batch();  // write of batch_; false on failure
  bool sync_inline();  // fdatasync on the calling thread; false on failure
  void sync_loop(std::function<void()> on_synced);
  void stop_sync_thread();
  int timed_fdatasync();  // fdatasync_(fd_), its duration and failure in stats_
  bool write_head(bool durable);
  void import_pending();

  std::string path_;
  HmacSha256 mac_;  // under the audit key
  int fd_ = -1;
  int head_fd_ = -1;  // PATH.head, opened by the first write_head()
  bool head_dir_synced_ = false;
  uint64_t seq_ = 0;            // last entry chained (committed or pending)
  std::string last_mac_;        // its mac
  uint64_t committed_seq_ = 0;  // last entry written by commit()
  std::string committed_mac_;
  AuditMark durable_mark_;
  std::string batch_;  // lines appended since the last commit
  size_t pending_entries_ = 0;
  std::atomic<uint64_t> write_failures_{0};
  std::atomic<uint64_t> loss_events_{0};
  std::string last_failure_;  // guarded by sync_mutex_
  // The sync thread. written_for_sync_ is what commit() handed it.
  mutable std::mutex sync_mutex_;
  std::condition_variable sync_wake_;
  std::thread sync_thread_;
  bool sync_stop_ = false;
  uint64_t written_for_sync_ = 0;
  std::atomic<uint64_t> synced_seq_{0};
  std::atomic<bool> sync_failing_{false};
  std::atomic<int64_t> sync_started_ns_{0};  // steady clock; 0: no fdatasync running
  std::function<int(int)> fdatasync_ = ::fdatasync;
  mutable std::mutex stats_mutex_;  // the sync thread and the loop both record
  AuditStats stats_;
  // The open gap: entries lost since the last successful write.
  bool gap_open_ = false;
  bool gap_entry_pending_ = false;  // batch_ starts with its audit_gap entry
  uint64_t gap_lost_ = 0;
  uint64_t gap_after_seq_ = 0;
  int64_t gap_since_ = 0;
};

}  // namespace colcrypt::keyd
