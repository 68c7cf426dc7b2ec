// colcrypt-keyd's socket server: one thread, one poll() loop, non-blocking
// sockets, SO_PEERCRED checks, per-connection idle timeouts.
#pragma once
#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "core/error.hpp"
#include "keyd/audit.hpp"
#include "keyd/jobs.hpp"
#include "keyd/log.hpp"
#include "keyd/metrics.hpp"
#include "keyd/store.hpp"
#include "keyd/unwrapped_keys.hpp"

namespace colcrypt::keyd {

// The socket is served by another process, or cannot be bound (exit 69).
class SocketUnavailable : public Error {
 public:
  explicit SocketUnavailable(const std::string& message) : Error(Errc::Io, message) {}
};

constexpr uint32_t kDefaultMaxBlockUses = 65536;
constexpr uint32_t kMinBlockCeiling = 1024;

// What SIGHUP changes without a restart (docs/operations.md, "Configuration
// file and reloading").
struct ReloadableSettings {
  std::vector<uid_t> allow_uids;
  std::vector<uid_t> admin_uids;
  LogLevel log_level = LogLevel::Info;
};

struct ServerConfig {
  std::string socket_path;
  std::vector<uid_t> allow_uids;  // may fetch keys
  // May administer; fetches keys only when on allow_uids as well (an admin
  // uid is refused keys, audited as "fetch-denied").
  std::vector<uid_t> admin_uids;
  std::optional<gid_t> socket_group;
  int idle_timeout_ms = 10000;
  // A frame must arrive whole within this long of its first byte.
  int frame_timeout_ms = 5000;
  size_t max_connections = 256;
  int usage_flush_interval_s = 10;

  // Lifecycle (docs/rotation.md).
  std::string audit_log_path;          // empty: <store>/audit.log
  bool auto_rotation = true;           // ENCRYPTION_AUTO_ROTATION
  int rotation_check_interval_s = 60;  // how often the scheduler looks
  int64_t day_seconds = 86400;         // length of a rotation "day" (tests shorten it)
  // Largest block one FetchPrimaryBlock gets; keyd also cuts a block to
  // max(kMinBlockCeiling, the key's max_uses_per_version / 64).
  uint32_t max_block_uses = kDefaultMaxBlockUses;
  // Peers on the fetch allowlist may also ask for "rotate" (the SQL function
  // colcrypt.rotate_key); nothing else of the admin protocol.
  bool sql_rotate = false;
  // libpq connection strings of the databases whose encrypted columns keyd
  // re-encrypts (rotation jobs) and counts (destroy/disable checks).
  std::vector<std::string> databases;
  int job_poll_interval_ms = 2000;
  // A retired version may be disabled or destroyed (without --force) only this
  // long after it stopped being primary: backends may encrypt under a cached
  // primary for up to colcrypt.key_cache_ttl seconds (whose maximum is the
  // default). docs/rotation.md.
  int64_t retire_grace_s = wire::kMaxKeyCacheTtlSeconds;
  // Bound on counting the rows that use a key (disable/destroy checks,
  // "references", "status"): statement_timeout of the counting connections.
  // Counting runs on a worker thread; the poll loop keeps serving meanwhile.
  int count_timeout_ms = 30000;
  // --store-db on a standby: how long a fetch of a key or version not loaded
  // waits for replay (re-reading the store) before it is answered NotFound.
  int replay_wait_ms = 2000;
  // Fail closed: a key reply whose audit entry could not be written is not
  // sent; the peer gets a Failure instead (docs/operations.md, "Audit log").
  // false (--audit-failure serve): keys go out, the loss is recorded later as
  // an audit_gap entry.
  bool audit_fail_closed = true;
  // When a key reply may go out (docs/operations.md, "Audit durability"):
  // Batch once its audit entry is written to the file (a kill -9 of keyd
  // keeps it) and the disk completes fdatasyncs (none has run for
  // kAuditSyncStallMs, none failed); Always once the entry is fdatasynced.
  AuditSyncMode audit_sync = AuditSyncMode::Batch;
  // "HOST:PORT" (loopback only) for HTTP GET /metrics; empty: no endpoint.
  // The same text is the admin op "metrics" (colcrypt-keyctl metrics).
  std::string metrics_listen;
  // SIGHUP reads the configuration again through this (colcrypt-keyd: the
  // command line and --config FILE, as at start). It throws when the
  // configuration is bad; keyd then keeps its settings. Unset (no --config):
  // SIGHUP only reopens the log file.
  std::function<ReloadableSettings()> reload;
  std::string reload_source;  // what reload reads, for the log (the --config path)
};

// conninfo (key=value or URI) as a key=value string whose sessions have
// statement_timeout = timeout_ms (added to any "options" given) and, unless
// given, a connect_timeout. Throws InvalidArgument when conninfo does not parse.
std::string with_statement_timeout(const std::string& conninfo, int timeout_ms);

// What the database thread found for an admin op: row counts for the keys it
// asked about (key id -> counts) or why counting failed (key id -> message);
// or the value of another database task (jobs, reencrypt) or its error.
struct DatabaseResults {
  std::map<std::string, std::vector<ReferenceCount>> rows;
  std::map<std::string, std::string> errors;
  nlohmann::json value;
  std::string error;  // the task failed (empty: it did not)
};

// Installs SIGTERM/SIGINT/SIGHUP handlers that only write to a self-pipe and
// set a flag; ignores SIGPIPE. Call once, before Server::run.
void install_signal_handlers();
// True once SIGTERM or SIGINT arrived (checked during startup too).
bool shutdown_requested();
// What SIGTERM does, for callers without signals (tests): the running
// Server::run() stops as soon as it sees it. Safe from any thread.
void request_shutdown();

// Throws SocketUnavailable when a colcrypt-keyd answers at path or when path
// exists and is not a socket; removes a stale socket file (logged).
void claim_socket_path(const std::string& path);

class MetricsHttp;

class Server {
 public:
  Server(ServerConfig config, KeyStore store);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Creates the socket's directory if needed, binds and listens. Throws
  // SocketUnavailable (in use / bind failed) or Error(Io).
  void listen();
  // Serves until SIGTERM/SIGINT, then flushes the store and removes the
  // socket. Returns the process exit code (0).
  int run();

  // The metrics in the Prometheus text format (docs/operations.md, "Metrics").
  std::string metrics_text() const;

 private:
  struct Connection;
  void accept_all();
  void handle_readable(Connection& c);
  void handle_writable(Connection& c);
  void handle_frame(Connection& c, uint8_t type, std::vector<uint8_t>& body);
  // counts: null on the first pass; an op that needs the databases (row
  // counts, jobs, reencrypt) then hands the work to the database thread and
  // returns without a reply. When the results arrive the request is handled
  // again from the start (re-validated against the store as it is then)
  // with counts set, and the work is not repeated.
  void handle_admin(Connection& c, const std::vector<uint8_t>& body,
                    const DatabaseResults* counts = nullptr);
  void process_frames(Connection& c);
  void finish_database_work();
  // After each commit: key replies go out, or (failing closed) are replaced
  // by Failures when an audit write failed since the last release.
  void release_key_replies();
  size_t live_connections() const;
  bool close_idlest();  // false: every connection is busy
  uint64_t audit_losses_seen_ = 0;
  // After the last release: replies still waiting for the disk (read by the sync thread).
  std::atomic<size_t> held_replies_{0};
  void queue(Connection& c, SecretBytes frame);
  void queue(Connection& c, const std::vector<uint8_t>& frame);
  void drain_signals();
  // SIGHUP: reopens the log file, then runs config_.reload on a thread of
  // its own (it resolves user names: NSS may block for as long as its
  // server takes) and applies its settings when they are ready
  // (finish_reload, on the loop). A SIGHUP during a reload runs another after it.
  void reload();
  void finish_reload();
  void apply_reload(const ReloadableSettings& settings);
  void flush_store(bool force);
  void remove_socket();
  bool may_connect(uid_t uid) const;  // on either list
  bool may_fetch(uid_t uid) const;    // on allow_uids
  bool is_admin(uid_t uid) const;
  // A key request from a peer not on allow_uids: Denied, audited and logged.
  void refuse_fetch(Connection& c, uint8_t type, const std::vector<uint8_t>& body);
  void audit(nlohmann::json event);
  // Makes the audit log and its head durable and hands their mark to the
  // store (AuditMark): after admin actions, on the flush tick, at stop.
  void sync_audit();
  void audit_rewind();  // a store-rewound entry when the store took a new timeline
  void run_scheduler(bool force);
  // --store-db: the database's role and new records (about once a second).
  void poll_store(bool force);
  // A fetch names something not loaded: with --store-db, re-read at once
  // (at most every 200 ms: a peer naming unknown keys in a loop cannot make
  // keyd re-read without end) and, for a version on a standby (replay_wait),
  // wait up to replay_wait_ms for replay; after a wait that found nothing, no
  // other wait until the store is re-read with new records. True once present().
  bool await_store(const std::function<bool()>& present, bool replay_wait);
  std::chrono::steady_clock::time_point last_store_poll_;
  std::chrono::steady_clock::time_point last_forced_read_{};
  bool replay_wait_spent_ = false;
  nlohmann::json rotate_and_audit(const std::string& name, const std::string& reason, uid_t uid,
                                  pid_t pid);

  ServerConfig config_;
  KeyStore store_;
  // Unwrapped keys of recently served versions (keyd/unwrapped_keys.hpp);
  // cleared on every admin request, key publication and reload.
  UnwrappedKeys unwrapped_;
  SecretBytes unwrap_cached(const KeyRecord& key, uint32_t version);
  int listen_fd_ = -1;
  dev_t socket_dev_ = 0;
  ino_t socket_ino_ = 0;
  bool stopping_ = false;
  std::vector<std::unique_ptr<Connection>> connections_;
  std::chrono::steady_clock::time_point started_;
  std::chrono::steady_clock::time_point last_flush_;
  std::chrono::steady_clock::time_point last_schedule_;
  std::unique_ptr<AuditLog> audit_;
  std::unique_ptr<JobRunner> jobs_;
  void publish_keys();
  nlohmann::json references_of(const KeyRecord& key, const DatabaseResults& counts) const;
  class DatabaseWorker;
  std::unique_ptr<DatabaseWorker> db_worker_;
  uint64_t next_serial_ = 1;
  LoopMetrics metrics_;
  int64_t started_unix_ = 0;
  std::unique_ptr<MetricsHttp> metrics_http_;  // with --metrics-listen
  // The reload thread and what it hands over (guarded by reload_->mutex).
  struct ReloadResult;
  std::shared_ptr<ReloadResult> reload_;
  std::thread reload_thread_;
  bool reload_again_ = false;
  // The key name for a metric label: the name when the store has such a key,
  // else kUnknownKeyLabel (peers choose the names they ask for).
  std::string key_label(const std::string& name) const;
};

}  // namespace colcrypt::keyd
