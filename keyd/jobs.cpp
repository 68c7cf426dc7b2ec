#include "keyd/jobs.hpp"

#include <algorithm>
#include <chrono>
#include <memory>
#include <pqxx/pqxx>

#include "core/error.hpp"
#include "keyd/log.hpp"

namespace colcrypt::keyd {
namespace {

using nlohmann::json;

// pg_try_advisory_lock(kLockClass, job_id): one runner per job across keyds.
constexpr int kLockClass = 0x63636a62;  // "ccjb"
constexpr int kMaxConsecutiveErrors = 10;

struct Column {
  std::string schema, table, column;
  std::string qualified(pqxx::transaction_base& t) const {
    return t.quote_name(schema) + "." + t.quote_name(table);
  }
  std::string display() const { return schema + "." + table + "." + column; }
};

std::unique_ptr<pqxx::connection> connect(const std::string& conninfo) {
  auto conn = std::make_unique<pqxx::connection>(conninfo);
  pqxx::nontransaction t(*conn);
  t.exec("SET application_name = 'colcrypt-keyd'");
  return conn;
}

bool has_extension(pqxx::transaction_base& t) {
  return t.exec("SELECT to_regclass('colcrypt.rotation_jobs') IS NOT NULL")[0][0].as<bool>();
}

std::vector<Column> encrypted_columns(pqxx::transaction_base& t) {
  std::vector<Column> out;
  pqxx::result r = t.exec(
      "SELECT n.nspname, c.relname, a.attname"
      "  FROM pg_catalog.pg_attribute a"
      "  JOIN pg_catalog.pg_class c ON c.oid = a.attrelid"
      "  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
      " WHERE a.atttypid = 'colcrypt.encrypted'::regtype AND a.attnum > 0"
      "   AND NOT a.attisdropped AND c.relkind = 'r' AND n.nspname <> 'colcrypt'"
      " ORDER BY 1, 2, 3");
  for (const auto& row : r) {
    out.push_back({row[0].as<std::string>(), row[1].as<std::string>(), row[2].as<std::string>()});
  }
  return out;
}

std::string where_old(pqxx::transaction_base& t, const Column& c) {
  const std::string col = t.quote_name(c.column);
  return "colcrypt.key_id(" + col + ") = $1::uuid AND colcrypt.key_version(" + col + ") < $2";
}

int64_t count_old(pqxx::transaction_base& t, const Column& c, const std::string& key_id,
                  int target) {
  return t
      .exec_params("SELECT count(*) FROM ONLY " + c.qualified(t) + " WHERE " + where_old(t, c),
                   key_id,
                   target)[0][0]
      .as<int64_t>();
}

void sleep_ms(int ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }

// The first line only: libpq's DETAIL lines can quote row contents ("Failing
// row contains ..."), which must not reach keyd's log or rotation_progress.
std::string short_error(const std::exception& e) {
  std::string text = e.what();
  text = text.substr(0, text.find('\n'));
  while (!text.empty() && text.back() == ' ') text.pop_back();
  if (text.size() > 500) text.resize(500);
  return text;
}

class Job {
 public:
  Job(pqxx::connection& conn, int64_t id, const std::atomic<bool>& stop)
      : conn_(conn), id_(id), stop_(stop) {}

  // Returns when the job is done, failed, cancelled or keyd stops.
  void run(const std::map<std::string, KeySnapshot>& keys) {
    if (!load()) return;
    int consecutive_errors = 0;
    for (;;) {
      if (stop_) return;
      try {
        if (state_ == "pending") {
          if (!begin(keys)) return;
          continue;
        }
        if (!step()) return;
        consecutive_errors = 0;
      } catch (const pqxx::broken_connection&) {
        throw;  // the runner reconnects; the job resumes from its progress rows
      } catch (const std::exception& e) {
        ++consecutive_errors;
        record_error(short_error(e), consecutive_errors >= kMaxConsecutiveErrors);
        if (consecutive_errors >= kMaxConsecutiveErrors) return;
        sleep_ms(std::min(30000, 500 * consecutive_errors));
      }
    }
  }

 private:
  bool load() {
    pqxx::work t(conn_);
    pqxx::result r = t.exec_params(
        "SELECT key_name, key_id::text, target_version, state, batch_blocks, throttle_ms"
        "  FROM colcrypt.rotation_jobs WHERE job_id = $1",
        id_);
    if (r.empty()) return false;
    key_name_ = r[0][0].as<std::string>();
    key_id_ = r[0][1].is_null() ? "" : r[0][1].as<std::string>();
    target_ = r[0][2].is_null() ? 0 : r[0][2].as<int>();
    state_ = r[0][3].as<std::string>();
    batch_blocks_ = r[0][4].as<int>();
    throttle_ms_ = r[0][5].as<int>();
    t.commit();
    return state_ == "pending" || state_ == "running";
  }

  // pending -> running: fixes key id and target version, lists the columns
  // and counts their rows under older versions; one transaction.
  bool begin(const std::map<std::string, KeySnapshot>& keys) {
    auto key = keys.find(key_name_);
    pqxx::work t(conn_);
    if (key == keys.end()) {
      t.exec_params(
          "UPDATE colcrypt.rotation_jobs SET state = 'failed', finished_at = now(),"
          " updated_at = now(), last_error = $2 WHERE job_id = $1",
          id_, "colcrypt-keyd has no key named \"" + key_name_ + "\"");
      t.commit();
      log_warning("rotation job " + std::to_string(id_) + ": unknown key '" + key_name_ + "'");
      return false;
    }
    key_id_ = key->second.id;
    target_ = static_cast<int>(key->second.primary_version);
    int64_t total = 0;
    for (const Column& c : encrypted_columns(t)) {
      const int64_t rows = count_old(t, c, key_id_, target_);
      total += rows;
      t.exec_params(
          "INSERT INTO colcrypt.rotation_job_columns"
          " (job_id, schema_name, table_name, column_name, rows_total, state)"
          " VALUES ($1, $2, $3, $4, $5::bigint,"
          "         CASE WHEN $5::bigint = 0 THEN 'done' ELSE 'pending' END)"
          " ON CONFLICT DO NOTHING",
          id_, c.schema, c.table, c.column, rows);
    }
    t.exec_params(
        "UPDATE colcrypt.rotation_jobs SET state = 'running', key_id = $2::uuid,"
        " target_version = $3, rows_total = $4, started_at = now(), updated_at = now(),"
        " passes = 1 WHERE job_id = $1",
        id_, key_id_, target_, total);
    t.commit();
    state_ = "running";
    log_info("rotation job " + std::to_string(id_) + " in database " + conn_.dbname() +
             ": re-encrypting " + std::to_string(total) + " rows of key '" + key_name_ +
             "' to version " + std::to_string(target_));
    return true;
  }

  // One batch (or one end-of-pass check) of the first column not done.
  // Returns false when the job is finished or no longer running.
  bool step() {
    pqxx::work t(conn_);
    pqxx::result job =
        t.exec_params("SELECT state FROM colcrypt.rotation_jobs WHERE job_id = $1 FOR UPDATE", id_);
    if (job.empty() || job[0][0].as<std::string>() != "running") return false;
    pqxx::result next = t.exec_params(
        "SELECT schema_name, table_name, column_name, next_block, pass"
        "  FROM colcrypt.rotation_job_columns WHERE job_id = $1 AND state <> 'done'"
        " ORDER BY schema_name, table_name, column_name LIMIT 1",
        id_);
    if (next.empty()) {
      t.exec_params(
          "UPDATE colcrypt.rotation_jobs SET state = 'done', finished_at = now(),"
          " updated_at = now() WHERE job_id = $1",
          id_);
      t.commit();
      log_info("rotation job " + std::to_string(id_) + " in database " + conn_.dbname() +
               " is done");
      return false;
    }
    Column c{next[0][0].as<std::string>(), next[0][1].as<std::string>(),
             next[0][2].as<std::string>()};
    const int64_t block = next[0][3].as<int64_t>();
    const int pass = next[0][4].as<int>();
    const std::string key_args =
        "job_id = $1 AND schema_name = $2 AND table_name = $3"
        " AND column_name = $4";
    pqxx::result rel = t.exec_params(
        "SELECT pg_relation_size(to_regclass($1)) / current_setting('block_size')::bigint,"
        "       to_regclass($1) IS NOT NULL",
        c.qualified(t));
    const bool exists = rel[0][1].as<bool>();
    const int64_t blocks = exists ? rel[0][0].as<int64_t>() : 0;
    if (!exists || block >= blocks) {
      // End of a pass: rows skipped as locked, or written meanwhile by a
      // backend whose cache still had the old primary, get another pass.
      const int64_t left = exists ? count_old(t, c, key_id_, target_) : 0;
      if (left == 0) {
        t.exec_params("UPDATE colcrypt.rotation_job_columns SET state = 'done' WHERE " + key_args,
                      id_, c.schema, c.table, c.column);
        t.commit();
        return true;
      }
      t.exec_params(
          "UPDATE colcrypt.rotation_job_columns SET next_block = 0, pass = pass + 1"
          " WHERE " +
              key_args,
          id_, c.schema, c.table, c.column);
      t.exec_params(
          "UPDATE colcrypt.rotation_jobs SET passes = greatest(passes, $2), updated_at = now()"
          " WHERE job_id = $1",
          id_, pass + 1);
      t.commit();
      sleep_ms(500);
      return true;
    }
    const int64_t end = std::min(blocks, block + batch_blocks_);
    const std::string table = c.qualified(t);
    const std::string col = t.quote_name(c.column);
    // Only this block range (a TID range scan), only rows under an older
    // version of this key, only rows nobody else holds: no table lock, no
    // waiting, and rewrap inside the backend.
    pqxx::result updated = t.exec_params(
        "UPDATE ONLY " + table + " SET " + col + " = colcrypt.rewrap(" + col + ")" +
            " WHERE ctid = ANY(ARRAY(SELECT ctid FROM ONLY " + table +
            " WHERE ctid >= $3::tid AND ctid < $4::tid AND " + where_old(t, c) +
            " FOR UPDATE SKIP LOCKED))",
        key_id_, target_, "(" + std::to_string(block) + ",0)", "(" + std::to_string(end) + ",0)");
    const int64_t n = static_cast<int64_t>(updated.affected_rows());
    t.exec_params(
        "UPDATE colcrypt.rotation_job_columns SET next_block = $5, state = 'running',"
        " rows_done = rows_done + $6 WHERE " +
            key_args,
        id_, c.schema, c.table, c.column, end, n);
    t.exec_params(
        "UPDATE colcrypt.rotation_jobs SET rows_done = rows_done + $2, updated_at = now()"
        " WHERE job_id = $1",
        id_, n);
    t.commit();
    if (throttle_ms_ > 0) sleep_ms(throttle_ms_);
    return true;
  }

  void record_error(const std::string& message, bool give_up) {
    log_error("rotation job " + std::to_string(id_) + " in database " + conn_.dbname() + ": " +
              message + (give_up ? " (giving up)" : " (will retry)"));
    try {
      pqxx::work t(conn_);
      t.exec_params(
          "UPDATE colcrypt.rotation_jobs SET errors = errors + 1, last_error = $2,"
          " updated_at = now(),"
          " state = CASE WHEN $3 THEN 'failed' ELSE state END,"
          " finished_at = CASE WHEN $3 THEN now() ELSE finished_at END"
          " WHERE job_id = $1",
          id_, message, give_up);
      t.commit();
    } catch (const std::exception& e) {
      log_error("cannot record the error of rotation job " + std::to_string(id_) + ": " +
                short_error(e));
    }
  }

  pqxx::connection& conn_;
  int64_t id_;
  const std::atomic<bool>& stop_;
  std::string key_name_, key_id_, state_;
  int target_ = 0;
  int batch_blocks_ = 64;
  int throttle_ms_ = 0;
};

}  // namespace

std::vector<ReferenceCount> count_references(const std::vector<std::string>& databases,
                                             const std::string& key_id) {
  std::vector<ReferenceCount> out;
  for (const auto& conninfo : databases) {
    std::string dbname = "?";
    try {
      auto conn = connect(conninfo);
      dbname = conn->dbname();
      pqxx::read_transaction t(*conn);
      if (!t.exec("SELECT to_regtype('colcrypt.encrypted') IS NOT NULL")[0][0].as<bool>()) {
        continue;
      }
      for (const Column& c : encrypted_columns(t)) {
        const std::string col = t.quote_name(c.column);
        pqxx::result r = t.exec_params("SELECT colcrypt.key_version(" + col + "), count(*) FROM " +
                                           c.qualified(t) + " WHERE colcrypt.key_id(" + col +
                                           ") = $1::uuid GROUP BY 1 ORDER BY 1",
                                       key_id);
        for (const auto& row : r) {
          out.push_back({dbname, c.display(), row[0].as<uint32_t>(), row[1].as<int64_t>()});
        }
      }
    } catch (const std::exception& e) {
      throw Error(Errc::Io,
                  "cannot count references in database " + dbname + ": " + short_error(e));
    }
  }
  return out;
}

json create_jobs(const std::vector<std::string>& databases, const std::string& key_name,
                 int batch_blocks, int throttle_ms) {
  json out = json::array();
  for (const auto& conninfo : databases) {
    std::string dbname = "?";
    try {
      auto conn = connect(conninfo);
      dbname = conn->dbname();
      pqxx::work t(*conn);
      if (!has_extension(t)) continue;
      pqxx::result r = t.exec_params(
          "INSERT INTO colcrypt.rotation_jobs (key_name, batch_blocks, throttle_ms, requested_by)"
          " VALUES ($1, $2, $3, 'colcrypt-keyctl') RETURNING job_id",
          key_name, batch_blocks, throttle_ms);
      t.commit();
      out.push_back({{"database", dbname}, {"job_id", r[0][0].as<int64_t>()}});
    } catch (const std::exception& e) {
      throw Error(Errc::Io,
                  "cannot create a rotation job in database " + dbname + ": " + short_error(e));
    }
  }
  return out;
}

json list_jobs(const std::vector<std::string>& databases) {
  json out = json::array();
  for (const auto& conninfo : databases) {
    std::string dbname = "?";
    try {
      auto conn = connect(conninfo);
      dbname = conn->dbname();
      pqxx::read_transaction t(*conn);
      if (!has_extension(t)) continue;
      pqxx::result r = t.exec(
          "SELECT job_id, key_name, target_version, state, rows_done, rows_total, percent,"
          "       rows_per_second, passes, errors, last_error"
          "  FROM colcrypt.rotation_progress ORDER BY job_id");
      for (const auto& row : r) {
        auto opt = [&](int i) { return row[i].is_null() ? json(nullptr) : json(row[i].c_str()); };
        out.push_back(
            {{"database", dbname},
             {"job_id", row[0].as<int64_t>()},
             {"key", row[1].as<std::string>()},
             {"target_version", row[2].is_null() ? json(nullptr) : json(row[2].as<int>())},
             {"state", row[3].as<std::string>()},
             {"rows_done", row[4].as<int64_t>()},
             {"rows_total", row[5].as<int64_t>()},
             {"percent", row[6].as<double>()},
             {"rows_per_second", row[7].is_null() ? json(nullptr) : json(row[7].as<double>())},
             {"passes", row[8].as<int>()},
             {"errors", row[9].as<int>()},
             {"last_error", opt(10)}});
      }
    } catch (const std::exception& e) {
      throw Error(Errc::Io,
                  "cannot read rotation jobs in database " + dbname + ": " + short_error(e));
    }
  }
  return out;
}

JobRunner::JobRunner(std::vector<std::string> databases, int poll_interval_ms)
    : databases_(std::move(databases)), poll_interval_ms_(poll_interval_ms) {}

JobRunner::~JobRunner() {
  stop_ = true;
  wake();
  if (thread_.joinable()) thread_.join();
}

void JobRunner::start() {
  if (databases_.empty() || thread_.joinable()) return;
  thread_ = std::thread([this] { run(); });
}

void JobRunner::publish_keys(std::map<std::string, KeySnapshot> keys) {
  std::lock_guard<std::mutex> lock(mutex_);
  keys_ = std::move(keys);
}

void JobRunner::wake() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    woken_ = true;
  }
  cv_.notify_all();
}

void JobRunner::run() {
  while (!stop_) {
    for (const auto& conninfo : databases_) {
      if (stop_) break;
      try {
        run_database(conninfo);
        last_warning_.clear();
      } catch (const std::exception& e) {
        // Once per problem (and once a minute while it lasts), not once per poll.
        const std::string text = short_error(e);
        const auto now = std::chrono::steady_clock::now();
        if (text != last_warning_ || now - last_warning_at_ > std::chrono::minutes(1)) {
          log_warning("rotation jobs: " + text + " (retrying every " +
                      std::to_string(poll_interval_ms_) + " ms)");
          last_warning_ = text;
          last_warning_at_ = now;
        }
      }
    }
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait_for(lock, std::chrono::milliseconds(poll_interval_ms_),
                 [this] { return woken_ || stop_; });
    woken_ = false;
  }
}

bool JobRunner::run_database(const std::string& conninfo) {
  // A fresh connection (a fresh backend, an empty key cache) per round: a
  // backend that cached an older primary would rewrap to it.
  auto conn = connect(conninfo);
  std::vector<int64_t> ids;
  {
    pqxx::read_transaction t(*conn);
    if (!has_extension(t)) return false;
    for (const auto& row : t.exec("SELECT job_id FROM colcrypt.rotation_jobs"
                                  " WHERE state IN ('pending', 'running') ORDER BY job_id")) {
      ids.push_back(row[0].as<int64_t>());
    }
  }
  for (int64_t id : ids) {
    if (stop_) break;
    {
      pqxx::nontransaction t(*conn);
      if (!t.exec_params("SELECT pg_try_advisory_lock($1, $2::int)", kLockClass, id)[0][0]
               .as<bool>()) {
        continue;  // another colcrypt-keyd runs it
      }
    }
    std::map<std::string, KeySnapshot> keys;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      keys = keys_;
    }
    Job(*conn, id, stop_).run(keys);
    if (conn->is_open()) {
      pqxx::nontransaction t(*conn);
      t.exec_params("SELECT pg_advisory_unlock($1, $2::int)", kLockClass, id);
    }
  }
  return !ids.empty();
}

}  // namespace colcrypt::keyd
