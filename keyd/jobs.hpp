// colcrypt-keyd's database side (docs/rotation.md): re-encryption jobs and
// reference counts, over libpqxx connections to the databases named with
// --database. keyd never links Postgres server code; the rewrap itself runs
// inside the database (colcrypt.rewrap), so plaintext never reaches keyd.
//
// Threads: JobRunner owns one worker thread with its own connections; it
// never touches the KeyStore (the poll loop publishes a snapshot of key ids
// and primary versions). count_references runs on the caller's thread with
// connections of its own.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace colcrypt::keyd {

struct KeySnapshot {
  std::string id;  // canonical UUID text
  uint32_t primary_version = 0;
};

// Values per (database, column, version) of one key.
struct ReferenceCount {
  std::string database;  // the connection string's dbname
  std::string column;    // schema.table.column
  uint32_t version = 0;
  int64_t rows = 0;  // values: a row's array elements and JSON values each count
};

// Counts, in every database, the values of key_id per version wherever
// colcrypt.key_references sees them (encrypted columns, domains, arrays,
// JSON values of encrypt_json, materialized views; each table once). Throws
// Error(Io) naming the database when one cannot be reached or queried, and
// naming the column when a column's values cannot be counted (a composite
// type, a foreign table): callers refuse what needs a count (fail closed).
std::vector<ReferenceCount> count_references(const std::vector<std::string>& databases,
                                             const std::string& key_id);

// Inserts a pending job for key_name into every database that has the
// extension; returns [{"database", "job_id"}].
nlohmann::json create_jobs(const std::vector<std::string>& databases, const std::string& key_name,
                           int batch_blocks, int throttle_ms);

// The rotation_progress view of every database.
nlohmann::json list_jobs(const std::vector<std::string>& databases);

// What the job runner did for one key since keyd started (keyd's metrics).
struct JobKeyStats {
  uint64_t rows_reencrypted = 0;
  // Rows a batch skipped (locked, or failing row by row); a later pass
  // retries them, so a row may be counted more than once.
  uint64_t rows_skipped = 0;
  uint64_t jobs_done = 0;
  uint64_t jobs_failed = 0;  // gave up after repeated errors
  uint64_t errors = 0;       // errors recorded (each retried or the last)
  // Rows the key's last finished job left under older versions.
  int64_t rows_left = 0;
  int running = 0;  // jobs of this key the runner works on now
};

class JobRunner {
 public:
  JobRunner(std::vector<std::string> databases, int poll_interval_ms);
  ~JobRunner();  // stops the worker (the current batch's transaction rolls back)
  JobRunner(const JobRunner&) = delete;
  JobRunner& operator=(const JobRunner&) = delete;

  void start();
  void publish_keys(std::map<std::string, KeySnapshot> keys);  // by name
  void wake();
  // While paused (keyd's store is read-only: a standby) no job runs; the
  // batch in progress finishes. Safe from any thread.
  void set_paused(bool paused) { paused_ = paused; }

  // Per key name; safe from any thread.
  std::map<std::string, JobKeyStats> stats() const;
  // For the worker's jobs: applies update to the key's stats.
  template <typename Update>
  void record(const std::string& key_name, Update update) {
    std::lock_guard<std::mutex> lock(stats_mutex_);
    update(stats_[key_name]);
  }

 private:
  void run();
  bool run_database(const std::string& conninfo);  // true when it did work

  std::vector<std::string> databases_;
  int poll_interval_ms_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::map<std::string, KeySnapshot> keys_;
  bool woken_ = false;
  std::atomic<bool> stop_{false};
  std::atomic<bool> paused_{false};
  std::thread thread_;
  mutable std::mutex stats_mutex_;
  std::map<std::string, JobKeyStats> stats_;
  std::string last_warning_;  // worker thread only
  std::chrono::steady_clock::time_point last_warning_at_;
};

}  // namespace colcrypt::keyd
