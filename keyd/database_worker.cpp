// The database thread of colcrypt-keyd (Server::DatabaseWorker) and the
// statement_timeout its connections get.
#include <libpq-fe.h>

#include <algorithm>
#include <exception>

#include "keyd/log.hpp"
#include "keyd/server_internal.hpp"

namespace colcrypt::keyd {

using nlohmann::json;

std::string with_statement_timeout(const std::string& conninfo, int timeout_ms) {
  char* err = nullptr;
  PQconninfoOption* parsed = PQconninfoParse(conninfo.c_str(), &err);
  if (!parsed) {
    std::string why = err ? err : "out of memory";
    if (err) PQfreemem(err);
    while (!why.empty() && why.back() == '\n') why.pop_back();
    throw Error(Errc::InvalidArgument, "invalid --database connection string: " + why);
  }
  auto quote = [](const std::string& v) {
    std::string q = "'";
    for (char ch : v) {
      if (ch == '\'' || ch == '\\') q += '\\';
      q += ch;
    }
    return q + "'";
  };
  const std::string timeout = "-c statement_timeout=" + std::to_string(timeout_ms);
  std::string out;
  bool options = false;
  bool connect_timeout = false;
  for (PQconninfoOption* o = parsed; o->keyword; ++o) {
    if (!o->val) continue;
    std::string value = o->val;
    const std::string keyword = o->keyword;
    if (keyword == "options") {
      value += (value.empty() ? "" : " ") + timeout;
      options = true;
    }
    connect_timeout = connect_timeout || keyword == "connect_timeout";
    out += (out.empty() ? "" : " ") + keyword + "=" + quote(value);
  }
  PQconninfoFree(parsed);
  if (!options) out += (out.empty() ? "" : " ") + std::string("options=") + quote(timeout);
  if (!connect_timeout) {
    out += " connect_timeout=" + std::to_string(std::max(2, (timeout_ms + 999) / 1000));
  }
  // A TCP peer that vanished (a host down, packets dropped) is noticed within
  // seconds, not after the kernel's retransmissions (about 15 minutes): keyd's
  // loop waits on these sessions. Unless the connection string says otherwise.
  for (const char* keepalive :
       {"keepalives=1", "keepalives_idle=5", "keepalives_interval=2", "keepalives_count=2"}) {
    const std::string name = std::string(keepalive).substr(0, std::string(keepalive).find('='));
    if (out.find(name + "=") == std::string::npos) out += std::string(" ") + keepalive;
  }
  if (out.find("tcp_user_timeout=") == std::string::npos) {
    out += " tcp_user_timeout=" + std::to_string(std::max(2000, timeout_ms));
  }
  return out;
}

Server::DatabaseWorker::DatabaseWorker(const std::vector<std::string>& databases, int timeout_ms)
    : timeout_ms_(timeout_ms) {
  for (const auto& d : databases) {
    try {
      databases_.push_back(with_statement_timeout(d, timeout_ms));
    } catch (const Error& e) {
      log_warning(std::string(e.what()) + "; counting uses it unchanged (no timeout)");
      databases_.push_back(d);
    }
  }
}

Server::DatabaseWorker::~DatabaseWorker() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();  // a count in progress ends within the timeout
}

void Server::DatabaseWorker::submit(uint64_t serial,
                                    std::vector<std::pair<std::string, std::string>> keys,
                                    Task task) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    requests_.push_back({serial, std::move(keys), std::move(task)});
    if (!thread_.joinable()) thread_ = std::thread([this] { work(); });
  }
  wake_.notify_all();
}

std::vector<std::pair<uint64_t, DatabaseResults>> Server::DatabaseWorker::take_done() {
  std::lock_guard<std::mutex> lock(mutex_);
  return std::exchange(done_, {});
}

void Server::DatabaseWorker::work() {
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    wake_.wait(lock, [this] { return stop_ || !requests_.empty(); });
    if (stop_) return;
    Request request = std::move(requests_.front());
    requests_.pop_front();
    lock.unlock();
    DatabaseResults counts;
    if (request.task) {
      try {
        counts.value = request.task(databases_);
      } catch (const std::exception& e) {
        counts.error = e.what();
      }
    }
    for (const auto& [id, name] : request.keys) {
      const auto start = Clock::now();
      try {
        counts.rows[id] = count_references(databases_, id);
      } catch (const std::exception& e) {
        const std::string what = e.what();
        const bool timed_out = what.find("statement timeout") != std::string::npos ||
                               Clock::now() - start >= std::chrono::milliseconds(timeout_ms_);
        counts.errors[id] = timed_out
                                ? "counting the rows that use key '" + name +
                                      "' did not finish within --count-timeout-ms (" +
                                      std::to_string(timeout_ms_) +
                                      " ms): a table with an encrypted column may be locked (LOCK "
                                      "TABLE, ALTER TABLE, VACUUM FULL) or very large. Try again "
                                      "later, raise --count-timeout-ms, or pass --force"
                                : what;
      }
    }
    lock.lock();
    done_.emplace_back(request.serial, std::move(counts));
    wake_loop('c');
  }
}

}  // namespace colcrypt::keyd
