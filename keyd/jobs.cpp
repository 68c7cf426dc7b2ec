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

std::unique_ptr<pqxx::connection> connect(const std::string& conninfo) {
  auto conn = std::make_unique<pqxx::connection>(conninfo);
  pqxx::nontransaction t(*conn);
  // Row-level security never filters what keyd counts or selects: a table
  // whose policies would apply to keyd's role is an error instead (42501),
  // and no policy function runs as keyd's role.
  // Only pg_catalog on the search path: no function or operator of a table
  // owner's schema can stand in for a built-in one in keyd's statements.
  t.exec(
      "SET application_name = 'colcrypt-keyd'; SET row_security = off;"
      " SET search_path = pg_catalog, pg_temp; SET client_min_messages = warning");
  return conn;
}

bool has_extension(pqxx::transaction_base& t) {
  return t.exec("SELECT to_regclass('colcrypt.rotation_jobs') IS NOT NULL")[0][0].as<bool>();
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

// Runs fn(connection, dbname) in every database; a failure names the
// database and what was being done ("count references", ...).
template <typename Fn>
void for_each_database(const std::vector<std::string>& databases, const std::string& what,
                       Fn&& fn) {
  for (const auto& conninfo : databases) {
    std::string dbname = "?";
    try {
      auto conn = connect(conninfo);
      dbname = conn->dbname();
      fn(*conn, dbname);
    } catch (const std::exception& e) {
      throw Error(Errc::Io, "cannot " + what + " in database " + dbname + ": " + short_error(e));
    }
  }
}

// Errors worth retrying the whole batch for: keyd unreachable or too slow
// (58000, 58030), lock and serialization conflicts (libpqxx throws those as
// transaction_rollback, not sql_error: never skipped), cancellations and
// shutdowns, lack of resources. Anything else that one row raises (a value
// that does not decrypt, a malformed value, a constraint or trigger of the
// table, a trigger naming a missing table or column: 42P01, 42703) is that
// row's: it is skipped. A table or column renamed or dropped between the
// catalog lookup and a batch's statement (42P01, 42703 too) is not a row's:
// the batch is then done again row by row, which looks the table up anew and
// locks the rows before any statement of the owner's code can run.
bool transient(const std::string& sqlstate) {
  const std::string cls = sqlstate.substr(0, 2);
  return sqlstate.empty() || cls == "58" || cls == "40" || cls == "57" || cls == "08" ||
         cls == "53" || sqlstate == "55P03";
}

// The SQLSTATE of an error. libpqxx 6 keeps it only for errors it has no
// class for; the class tells the others (by its class's code when it stands
// for several).
std::string sqlstate_of(const pqxx::sql_error& e) {
  if (!e.sqlstate().empty()) return e.sqlstate();
  if (dynamic_cast<const pqxx::insufficient_privilege*>(&e)) return "42501";
  if (dynamic_cast<const pqxx::undefined_table*>(&e)) return "42P01";
  if (dynamic_cast<const pqxx::undefined_column*>(&e)) return "42703";
  if (dynamic_cast<const pqxx::undefined_function*>(&e)) return "42883";
  if (dynamic_cast<const pqxx::syntax_error*>(&e)) return "42601";
  if (dynamic_cast<const pqxx::insufficient_resources*>(&e)) return "53000";
  if (dynamic_cast<const pqxx::integrity_constraint_violation*>(&e)) return "23000";
  if (dynamic_cast<const pqxx::data_exception*>(&e)) return "22000";
  if (dynamic_cast<const pqxx::feature_not_supported*>(&e)) return "0A000";
  if (dynamic_cast<const pqxx::plpgsql_raise*>(&e)) return "P0001";
  if (dynamic_cast<const pqxx::plpgsql_error*>(&e)) return "P0000";
  return "";  // unknown: retried as if transient
}

// The place of a job's column right now, looked up by OID and attnum.
struct Place {
  std::string schema, table, column, shape, context, batch_type;
  std::string column_type;  // the column's own type (a domain, say)
  int64_t type_oid = 0;
  int typmod = -1;
  bool keyd_owns = false;  // the table's owner is keyd's own role
  int64_t blocks = 0;
  std::string qualified(pqxx::transaction_base& t) const {
    return t.quote_name(schema) + "." + t.quote_name(table);
  }
  std::string display() const { return schema + "." + table + "." + column; }
};

// Values of the key under a version older than the target in column c of
// the given shape ($1 key id, $2 target version).
std::string old_predicate(const std::string& shape, const std::string& c) {
  const std::string old = "colcrypt.key_id(e) = $1::uuid AND colcrypt.key_version(e) < $2";
  if (shape == "value")
    return "colcrypt.key_id(" + c + ") = $1::uuid AND colcrypt.key_version(" + c + ") < $2";
  if (shape == "array")
    return "EXISTS (SELECT FROM unnest(" + c + "::colcrypt.encrypted[]) AS e WHERE " + old + ")";
  return "EXISTS (SELECT FROM jsonb_path_query(to_jsonb(" + c +
         "), colcrypt._json_value_path()) AS s, colcrypt.try_ciphertext(s #>> '{}') AS e"
         " WHERE " +
         old + ")";
}

int64_t count_old(pqxx::transaction_base& t, const std::string& table, const std::string& shape,
                  const std::string& column, const std::string& key_id, int target) {
  return t
      .exec_params("SELECT count(*) FROM ONLY " + table + " WHERE " +
                       old_predicate(shape, t.quote_name(column)),
                   key_id, target)[0][0]
      .as<int64_t>();
}

std::string tid(int64_t block) { return "(" + std::to_string(block) + ",0)"; }

class Job {
 public:
  Job(pqxx::connection& conn, int64_t id, const std::atomic<bool>& stop, JobRunner& runner)
      : conn_(conn), id_(id), stop_(stop), runner_(runner) {}

  // Returns when the job is done, failed, cancelled or keyd stops.
  void run(const std::map<std::string, KeySnapshot>& keys) {
    if (!load()) return;
    // Counted as running for as long as this call works on it.
    struct Running {
      JobRunner& runner;
      const std::string& key;
      Running(JobRunner& r, const std::string& k) : runner(r), key(k) {
        runner.record(key, [](JobKeyStats& s) { ++s.running; });
      }
      ~Running() {
        runner.record(key, [](JobKeyStats& s) { --s.running; });
      }
    } running(runner_, key_name_);
    int consecutive_errors = 0;
    bool row_by_row = false;
    for (;;) {
      if (stop_) return;
      try {
        if (state_ == "pending") {
          if (!begin(keys)) return;
          continue;
        }
        if (!step(row_by_row)) return;
        consecutive_errors = 0;
        row_by_row = false;
      } catch (const pqxx::broken_connection&) {
        throw;  // the runner reconnects; the job resumes from its progress rows
      } catch (const pqxx::sql_error& e) {
        // A batch that fails for one of its rows is done again row by row.
        if (!row_by_row && !transient(sqlstate_of(e))) {
          row_by_row = true;
          continue;
        }
        row_by_row = false;
        if (!failed(short_error(e), consecutive_errors)) return;
      } catch (const std::exception& e) {
        row_by_row = false;
        if (!failed(short_error(e), consecutive_errors)) return;
      }
    }
  }

 private:
  // Records an error; false when the job gives up.
  bool failed(const std::string& message, int& consecutive_errors) {
    ++consecutive_errors;
    const bool give_up = consecutive_errors >= kMaxConsecutiveErrors;
    record_error(message, give_up);
    runner_.record(key_name_, [give_up](JobKeyStats& s) {
      ++s.errors;
      if (give_up) ++s.jobs_failed;
    });
    if (give_up) return false;
    sleep_ms(std::min(30000, 500 * consecutive_errors));
    return true;
  }

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
  // (colcrypt.value_columns) and counts their rows under older versions; one
  // transaction. Columns a job cannot re-encrypt (materialized views, JSON
  // values, composite types, foreign tables) are done at once, with their
  // rows counted as skipped and a note saying what to do.
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
    pqxx::result columns = t.exec(
        "SELECT v.relid, v.attnum, v.schema_name, v.table_name, v.column_name, v.relkind,"
        "       v.shape, c.relispopulated"
        "  FROM colcrypt.value_columns() v JOIN pg_catalog.pg_class c ON c.oid = v.relid");
    for (const auto& c : columns) {
      const std::string schema = c[2].as<std::string>(), table = c[3].as<std::string>(),
                        column = c[4].as<std::string>(), shape = c[6].as<std::string>();
      const bool matview = c[5].as<std::string>() == "m";
      const bool countable = shape == "value" || shape == "array" || shape == "json";
      const bool populated = c[7].as<bool>();
      const int64_t rows = countable && populated
                               ? count_old(t, t.quote_name(schema) + "." + t.quote_name(table),
                                           shape, column, key_id_, target_)
                               : 0;
      std::string kind = matview ? "matview" : shape, note;
      if (matview) {
        note = "materialized view: REFRESH MATERIALIZED VIEW once its base tables are done";
      } else if (shape == "json") {
        note =
            "JSON values of colcrypt.encrypt_json are not re-encrypted by jobs:"
            " re-encrypt them with colcrypt.decrypt_json and colcrypt.encrypt_json";
      } else if (shape == "composite") {
        note = "a composite type holding colcrypt values: neither counted nor re-encrypted";
      } else if (shape == "foreign") {
        note = "a foreign table: re-encrypt in the database that stores its rows";
      }
      const bool reported = !note.empty();
      if (!reported) total += rows;
      if (reported && rows == 0 && (shape == "json" || matview)) continue;  // nothing to say
      t.exec_params(
          "INSERT INTO colcrypt.rotation_job_columns"
          " (job_id, relid, attnum, schema_name, table_name, column_name, kind, rows_total,"
          "  rows_skipped, note, state)"
          " VALUES ($1, $2, $3, $4, $5, $6, $7, $8::bigint, $9::bigint, $10::text,"
          "         CASE WHEN $8::bigint = 0 OR $10::text IS NOT NULL"
          "              THEN 'done' ELSE 'pending' END)"
          " ON CONFLICT DO NOTHING",
          id_, c[0].as<int64_t>(), c[1].as<int>(), schema, table, column, kind, reported ? 0 : rows,
          reported ? rows : 0, reported ? std::optional<std::string>(note) : std::nullopt);
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

  // The column's table and column now (by OID and attnum), or nothing when
  // either was dropped or the column no longer holds colcrypt values.
  std::optional<Place> place_of(pqxx::transaction_base& t, int64_t relid, int attnum) {
    pqxx::result r = t.exec_params(
        "SELECT n.nspname, c.relname, a.attname, colcrypt._value_shape(a.atttypid),"
        "       x.typmod, colcrypt._column_context(x.typmod),"
        "       c.relowner = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = current_user),"
        "       pg_catalog.format_type(CASE WHEN colcrypt._value_shape(a.atttypid) = 'array'"
        "                                   THEN 'colcrypt.encrypted[]'::regtype"
        "                                   ELSE 'colcrypt.encrypted'::regtype END, x.typmod),"
        "       pg_catalog.pg_relation_size(c.oid) / current_setting('block_size')::bigint,"
        "       pg_catalog.format_type(a.atttypid, a.atttypmod), a.atttypid"
        "  FROM pg_catalog.pg_class c"
        "  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
        "  JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum = $2"
        "  CROSS JOIN LATERAL (SELECT colcrypt._value_typmod(a.atttypid, a.atttypmod)"
        "                      AS typmod) x"
        " WHERE c.oid = $1 AND NOT a.attisdropped",
        relid, attnum);
    if (r.empty()) return std::nullopt;
    Place p;
    p.schema = r[0][0].as<std::string>();
    p.table = r[0][1].as<std::string>();
    p.column = r[0][2].as<std::string>();
    p.shape = r[0][3].is_null() ? "" : r[0][3].as<std::string>();
    if (p.shape != "value" && p.shape != "array") return std::nullopt;
    p.typmod = r[0][4].as<int>();
    p.context = r[0][5].is_null() ? "" : r[0][5].as<std::string>();
    p.keyd_owns = r[0][6].as<bool>();
    p.batch_type = r[0][7].as<std::string>();
    p.blocks = r[0][8].as<int64_t>();
    p.column_type = r[0][9].as<std::string>();
    p.type_oid = r[0][10].as<int64_t>();
    return p;
  }

  // The session's temporary table that carries one batch's new values from
  // keyd's role to the owner's UPDATE, typed as the column's values (so the
  // UPDATE needs no coercion that would check key privileges as the owner),
  // with each row's old value in the column's own type (copied, never
  // coerced: no domain check runs as keyd's role) to tell afterwards which
  // rows the UPDATE really changed.
  std::string batch_table(pqxx::transaction_base& t, const Place& p) {
    const std::string name = "colcrypt_batch_" + std::to_string(p.type_oid) + "_" +
                             (p.typmod < 0 ? "n" : std::to_string(p.typmod));
    if (t.exec_params("SELECT to_regclass($1) IS NULL", "pg_temp." + name)[0][0].as<bool>()) {
      // Only this session sees its temporary tables; the owner's role must
      // read this one for its UPDATE.
      t.exec("CREATE TEMPORARY TABLE " + name + " (tid tid, v " + p.batch_type + ", old " +
             p.column_type + ") ON COMMIT DELETE ROWS");
      t.exec("GRANT SELECT ON pg_temp." + name + " TO PUBLIC");
    }
    return "pg_temp." + name;
  }

  // Runs sql as the table's owner, in a security-restricted operation
  // (colcrypt._as_table_owner): its triggers, index expressions and
  // row-level security policies never run as keyd's role. Returns the rows
  // it changed.
  int64_t as_owner(pqxx::transaction_base& t, int64_t relid, const std::string& sql) {
    return t.exec_params("SELECT colcrypt._as_table_owner($1::oid::regclass, $2)", relid, sql)[0][0]
        .as<int64_t>();
  }

  struct BatchResult {
    int64_t done = 0, skipped = 0;
    std::string first_error;
  };

  // One batch: as keyd's role, lock the block range's rows under older
  // versions (SKIP LOCKED) and rewrap their values into the batch table
  // inside the backend; then, as the owner, UPDATE the rows from it. When
  // keyd's role is the owner, one UPDATE does both.
  BatchResult batch(pqxx::transaction_base& t, int64_t relid, const Place& p, int64_t block,
                    int64_t end, bool row_by_row) {
    const std::string table = p.qualified(t);
    const std::string col = t.quote_name(p.column);
    // The value of expression x rewrapped with the context in parameter $n.
    auto rewrap = [&](const std::string& x, int n) {
      return (p.shape == "array" ? "colcrypt.rewrap_array(" + x + "::colcrypt.encrypted[], $"
                                 : "colcrypt.rewrap(" + x + ", $") +
             std::to_string(n) + ")";
    };
    const std::string range = "ctid >= $3::tid AND ctid < $4::tid";
    const std::string select_old = "SELECT ctid AS tid, " + col + " AS v FROM ONLY " + table +
                                   " WHERE " + range + " AND " + old_predicate(p.shape, col);
    // keyd's role owns the table: its code runs as its owner anyway, so one
    // statement rewraps and updates, without a batch table.
    const bool direct = p.keyd_owns;
    const std::string batch = direct ? "" : batch_table(t, p);
    // A row counts as re-encrypted only when the UPDATE really changed it:
    // an owner's BEFORE trigger may put the old value back (NEW.v := OLD.v),
    // and counting such a row as done made every pass "re-encrypt" it again,
    // without end. The owner's statement compares binary images with the
    // old value (*=: no colcrypt function, the owner needs no privilege on
    // the extension); keyd's own checks the version.
    auto update = [&](const std::string& rows) {
      return "WITH u AS (UPDATE ONLY " + table + " AS t SET " + col + " = b.v FROM " + batch +
             " AS b WHERE t.ctid = b.tid AND " + rows + " RETURNING NOT (ROW(t." + col +
             ")::record *= ROW(b.old)::record) AS ours) SELECT FROM u WHERE ours";
    };
    const std::string not_old = "coalesce(NOT (" + old_predicate(p.shape, col) + "), true)";
    BatchResult out;
    if (!row_by_row && direct) {
      pqxx::result r = t.exec_params(
          "WITH locked AS (" + select_old + " FOR UPDATE SKIP LOCKED), updated AS (UPDATE ONLY " +
              table + " SET " + col + " = " + rewrap(col, 5) +
              " WHERE ctid = ANY(ARRAY(SELECT tid FROM locked)) RETURNING " + not_old +
              " AS ours) SELECT (SELECT count(*) FROM locked),"
              " (SELECT count(*) FROM updated WHERE ours)",
          key_id_, target_, tid(block), tid(end), p.context);
      out.done = r[0][1].as<int64_t>();
      out.skipped = r[0][0].as<int64_t>() - out.done;
      if (out.skipped > 0) out.first_error = "the table's triggers or policies kept rows unchanged";
      return out;
    }
    if (!row_by_row) {
      pqxx::result rewrapped =
          t.exec_params("WITH locked AS (" + select_old + " FOR UPDATE SKIP LOCKED) INSERT INTO " +
                            batch + " SELECT tid, " + rewrap("v", 5) + ", v FROM locked",
                        key_id_, target_, tid(block), tid(end), p.context);
      const int64_t n = static_cast<int64_t>(rewrapped.affected_rows());
      if (n == 0) return out;
      // A TID scan of the batch's rows (a row locked after a concurrent
      // update may have moved out of the block range).
      out.done = as_owner(t, relid, update("t.ctid = ANY(ARRAY(SELECT tid FROM " + batch + "))"));
      out.skipped = n - out.done;
      if (out.skipped > 0) out.first_error = "the table's triggers or policies kept rows unchanged";
      return out;
    }
    // Row by row, each in a subtransaction: a row that fails is skipped.
    pqxx::result rows = t.exec_params(select_old + " FOR UPDATE SKIP LOCKED", key_id_, target_,
                                      tid(block), tid(end));
    for (const auto& row : rows) {
      const std::string at = row[0].as<std::string>();
      // A savepoint per row: a row that fails rolls back alone.
      t.exec("SAVEPOINT colcrypt_row");
      try {
        int64_t updated = 0;
        if (direct) {
          updated = t.exec_params("WITH u AS (UPDATE ONLY " + table + " SET " + col + " = " +
                                      rewrap(col, 3) + " WHERE ctid = $4::tid RETURNING " +
                                      not_old + " AS ours) SELECT count(*) FROM u WHERE ours",
                                  key_id_, target_, p.context, at)[0][0]
                        .as<int64_t>();
        } else {
          t.exec_params("INSERT INTO " + batch + " SELECT ctid, " + rewrap(col, 1) + ", " + col +
                            " FROM ONLY " + table + " WHERE ctid = $2::tid",
                        p.context, at);
          updated = as_owner(
              t, relid,
              update("t.ctid = " + t.quote(at) + "::tid AND b.tid = " + t.quote(at) + "::tid"));
        }
        t.exec("RELEASE SAVEPOINT colcrypt_row");
        if (updated == 1) {
          ++out.done;
        } else {
          ++out.skipped;
          if (out.first_error.empty())
            out.first_error = "the table's triggers or policies kept rows unchanged";
        }
      } catch (const pqxx::sql_error& e) {
        const std::string sqlstate = sqlstate_of(e);
        if (transient(sqlstate)) throw;
        t.exec("ROLLBACK TO SAVEPOINT colcrypt_row; RELEASE SAVEPOINT colcrypt_row");
        ++out.skipped;
        if (out.first_error.empty()) out.first_error = sqlstate + ": " + short_error(e);
      }
    }
    return out;
  }

  // One batch (or one end-of-pass check) of the first column not done.
  // Returns false when the job is finished or no longer running.
  bool step(bool row_by_row) {
    pqxx::work t(conn_);
    pqxx::result job =
        t.exec_params("SELECT state FROM colcrypt.rotation_jobs WHERE job_id = $1 FOR UPDATE", id_);
    if (job.empty() || job[0][0].as<std::string>() != "running") return false;
    pqxx::result next = t.exec_params(
        "SELECT relid, attnum, next_block, pass, pass_done, rows_skipped, schema_name,"
        "       table_name, column_name"
        "  FROM colcrypt.rotation_job_columns WHERE job_id = $1 AND state <> 'done'"
        " ORDER BY schema_name, table_name, column_name, relid, attnum LIMIT 1",
        id_);
    if (next.empty()) return finish(t);
    const int64_t relid = next[0][0].as<int64_t>();
    const int attnum = next[0][1].as<int>();
    const int64_t block = next[0][2].as<int64_t>();
    const int pass = next[0][3].as<int>();
    const int64_t pass_done = next[0][4].as<int64_t>();
    const int64_t skipped = next[0][5].as<int64_t>();
    const std::string key_args = "job_id = $1 AND relid = $2 AND attnum = $3";
    const std::optional<Place> place = place_of(t, relid, attnum);
    if (!place) {
      // Dropped (or no longer encrypted): nothing of it is left to do.
      t.exec_params(
          "UPDATE colcrypt.rotation_job_columns SET state = 'done', rows_skipped = 0"
          " WHERE " +
              key_args,
          id_, relid, attnum);
      t.commit();
      return true;
    }
    const Place& p = *place;
    if (p.schema != next[0][6].as<std::string>() || p.table != next[0][7].as<std::string>() ||
        p.column != next[0][8].as<std::string>()) {
      t.exec_params(
          "UPDATE colcrypt.rotation_job_columns SET schema_name = $4, table_name = $5,"
          " column_name = $6 WHERE " +
              key_args,
          id_, relid, attnum, p.schema, p.table, p.column);
    }
    if (block >= p.blocks) {
      // End of a pass: rows skipped as locked, or written meanwhile by a
      // backend whose cache still had the old primary, get another pass;
      // rows that failed are left once a pass does nothing but fail on them.
      const int64_t left = count_old(t, p.qualified(t), p.shape, p.column, key_id_, target_);
      if (left == 0 || (pass_done == 0 && skipped > 0 && left <= skipped)) {
        t.exec_params(
            "UPDATE colcrypt.rotation_job_columns SET state = 'done', rows_skipped = $4"
            " WHERE " +
                key_args,
            id_, relid, attnum, left);
        t.commit();
        return true;
      }
      t.exec_params(
          "UPDATE colcrypt.rotation_job_columns SET next_block = 0, pass = pass + 1,"
          " pass_done = 0, rows_skipped = 0 WHERE " +
              key_args,
          id_, relid, attnum);
      t.exec_params(
          "UPDATE colcrypt.rotation_jobs SET passes = greatest(passes, $2), updated_at = now()"
          " WHERE job_id = $1",
          id_, pass + 1);
      t.commit();
      sleep_ms(500);
      return true;
    }
    const int64_t end = std::min(p.blocks, block + batch_blocks_);
    const BatchResult r = batch(t, relid, p, block, end, row_by_row);
    t.exec_params(
        "UPDATE colcrypt.rotation_job_columns SET next_block = $4, state = 'running',"
        " rows_done = rows_done + $5, pass_done = pass_done + $5,"
        " rows_skipped = rows_skipped + $6, note = coalesce(note, $7) WHERE " +
            key_args,
        id_, relid, attnum, end, r.done, r.skipped,
        r.first_error.empty() ? std::nullopt : std::optional<std::string>(r.first_error));
    t.exec_params(
        "UPDATE colcrypt.rotation_jobs SET rows_done = rows_done + $2, updated_at = now()"
        " WHERE job_id = $1",
        id_, r.done);
    t.commit();
    runner_.record(key_name_, [&r](JobKeyStats& s) {
      s.rows_reencrypted += static_cast<uint64_t>(r.done);
      s.rows_skipped += static_cast<uint64_t>(r.skipped);
    });
    if (throttle_ms_ > 0) sleep_ms(throttle_ms_);
    return true;
  }

  // Every column done: the job is done. When rows still use older versions
  // (skipped, or in columns a job cannot re-encrypt), last_error says how
  // many and names the first cause.
  bool finish(pqxx::work& t) {
    pqxx::result left = t.exec_params(
        "SELECT coalesce(sum(rows_skipped), 0)::bigint,"
        "       (SELECT schema_name || '.' || table_name || '.' || column_name || ': ' || note"
        "          FROM colcrypt.rotation_job_columns"
        "         WHERE job_id = $1 AND note IS NOT NULL AND (rows_skipped > 0 OR kind = ANY("
        "               '{composite,foreign}'))"
        "         ORDER BY schema_name, table_name, column_name LIMIT 1),"
        "       count(*) FILTER (WHERE note IS NOT NULL AND (rows_skipped > 0"
        "                        OR kind IN ('composite', 'foreign')))"
        "  FROM colcrypt.rotation_job_columns WHERE job_id = $1",
        id_);
    const int64_t skipped = left[0][0].as<int64_t>();
    const int64_t columns = left[0][2].as<int64_t>();
    std::optional<std::string> summary;
    if (columns > 0) {
      summary = std::to_string(skipped) + " rows in " + std::to_string(columns) +
                " columns were not re-encrypted and still use older versions (see"
                " colcrypt.rotation_job_columns); first: " +
                left[0][1].as<std::string>();
      if (summary->size() > 1000) summary->resize(1000);
    }
    t.exec_params(
        "UPDATE colcrypt.rotation_jobs SET state = 'done', finished_at = now(),"
        " updated_at = now(), last_error = coalesce($2, last_error) WHERE job_id = $1",
        id_, summary);
    t.commit();
    runner_.record(key_name_, [skipped](JobKeyStats& s) {
      ++s.jobs_done;
      s.rows_left = skipped;
    });
    log_info("rotation job " + std::to_string(id_) + " in database " + conn_.dbname() + " is done" +
             (summary ? ": " + *summary : ""));
    return false;
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
  JobRunner& runner_;
};

}  // namespace

std::vector<ReferenceCount> count_references(const std::vector<std::string>& databases,
                                             const std::string& key_id) {
  std::vector<ReferenceCount> out;
  for_each_database(
      databases, "count references", [&](pqxx::connection& conn, const std::string& dbname) {
        pqxx::read_transaction t(conn);
        if (!t.exec("SELECT to_regtype('colcrypt.encrypted') IS NOT NULL")[0][0].as<bool>()) return;
        pqxx::result r = t.exec_params(
            "SELECT column_name, version, values_count FROM colcrypt.key_references($1::uuid)",
            key_id);
        for (const auto& row : r) {
          out.push_back(
              {dbname, row[0].as<std::string>(), row[1].as<uint32_t>(), row[2].as<int64_t>()});
        }
      });
  return out;
}

json create_jobs(const std::vector<std::string>& databases, const std::string& key_name,
                 int batch_blocks, int throttle_ms) {
  json out = json::array();
  for_each_database(
      databases, "create a rotation job", [&](pqxx::connection& conn, const std::string& dbname) {
        pqxx::work t(conn);
        if (!has_extension(t)) return;
        pqxx::result r = t.exec_params(
            "INSERT INTO colcrypt.rotation_jobs (key_name, batch_blocks, throttle_ms, requested_by)"
            " VALUES ($1, $2, $3, 'colcrypt-keyctl') RETURNING job_id",
            key_name, batch_blocks, throttle_ms);
        t.commit();
        out.push_back({{"database", dbname}, {"job_id", r[0][0].as<int64_t>()}});
      });
  return out;
}

json list_jobs(const std::vector<std::string>& databases) {
  json out = json::array();
  for_each_database(
      databases, "read rotation jobs", [&](pqxx::connection& conn, const std::string& dbname) {
        pqxx::read_transaction t(conn);
        if (!has_extension(t)) return;
        pqxx::result r = t.exec(
            "SELECT job_id, key_name, target_version, state, rows_done, rows_total, percent,"
            "       rows_per_second, passes, errors, last_error, rows_skipped"
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
               {"last_error", opt(10)},
               {"rows_skipped", row[11].as<int64_t>()}});
        }
      });
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

std::map<std::string, JobKeyStats> JobRunner::stats() const {
  std::lock_guard<std::mutex> lock(stats_mutex_);
  return stats_;
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
      if (stop_ || paused_) break;
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
  std::vector<int64_t> ids;
  {
    auto conn = connect(conninfo);
    pqxx::read_transaction t(*conn);
    if (!has_extension(t)) return false;
    for (const auto& row : t.exec("SELECT job_id FROM colcrypt.rotation_jobs"
                                  " WHERE state IN ('pending', 'running') ORDER BY job_id")) {
      ids.push_back(row[0].as<int64_t>());
    }
  }
  for (int64_t id : ids) {
    if (stop_) break;
    // A fresh connection (a fresh backend, an empty key cache) per job: a
    // backend that cached an older primary (an earlier job of this round,
    // before a rotation) would "rewrap" values to it, that is leave them
    // unchanged, and the rows would be skipped.
    auto conn = connect(conninfo);
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
    Job(*conn, id, stop_, *this).run(keys);
    if (conn->is_open()) {
      pqxx::nontransaction t(*conn);
      t.exec_params("SELECT pg_advisory_unlock($1, $2::int)", kLockClass, id);
    }
  }
  return !ids.empty();
}

}  // namespace colcrypt::keyd
