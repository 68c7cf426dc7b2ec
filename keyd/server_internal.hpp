// Private to colcrypt-keyd's server: what its files share (server.cpp, the
// poll loop; server_policy.cpp, who may connect and the socket;
// server_fetch.cpp, key requests; server_admin.cpp, admin requests and
// rotation; database_worker.cpp, the database thread).
#pragma once
#include <sys/types.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <ctime>
#include <deque>
#include <functional>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "core/wire.hpp"
#include "keyd/server.hpp"

namespace colcrypt::keyd {

using Clock = std::chrono::steady_clock;

// How often keyd looks at a --store-db database's role and generation.
constexpr std::chrono::milliseconds kStorePollInterval{1000};

// Wakes the poll loop through the signal pipe (async-signal-safe; any thread).
void wake_loop(char why);

inline std::string errno_text(int err) { return std::strerror(err); }

inline std::string peer_text(uid_t uid, pid_t pid) {
  return "uid=" + std::to_string(uid) + " pid=" + std::to_string(pid);
}

// Failure replies carry a short generic reason; details go to keyd's log.
inline wire::FailureCode failure_code(Errc code) {
  switch (code) {
    case Errc::KeyNotFound:
      return wire::FailureCode::NotFound;
    case Errc::AlreadyExists:
      return wire::FailureCode::AlreadyExists;
    case Errc::InvalidArgument:
      return wire::FailureCode::BadRequest;
    case Errc::KeyUnavailable:
      return wire::FailureCode::KeyUnavailable;
    case Errc::PermissionDenied:
      return wire::FailureCode::Denied;
    default:
      return wire::FailureCode::Internal;
  }
}

inline int64_t now_seconds() { return static_cast<int64_t>(std::time(nullptr)); }

struct Server::Connection {
  struct Outgoing {
    SecretBytes frame;
    // A key reply held until its audit entry is written (and, with
    // --audit-sync always, fdatasynced); failing closed, replaced by a
    // Failure when that fails. Server::release_key_replies.
    bool held = false;
    uint64_t audit_seq = 0;  // the entries it waits for: set by the commit after it was queued
    // Key replies: when their request was read (the fetch latency metric
    // ends when the reply is written); unset for other frames.
    Clock::time_point requested{};
  };
  bool front_held() const { return !out.empty() && out.front().held; }
  int fd = -1;
  uid_t uid = 0;
  pid_t pid = 0;
  uint64_t serial = 0;  // identifies the connection to a pending count
  wire::FrameReader reader;
  std::deque<Outgoing> out;  // whole frames
  size_t out_offset = 0;     // bytes of out.front() already written
  // An admin request waits for row counts (Server::DatabaseWorker): no further
  // frame is read and no idle timeout applies until it is answered.
  std::vector<uint8_t> waiting_body;
  bool waiting = false;
  bool read_closed = false;
  bool dead = false;
  Clock::time_point last_activity;
  Clock::time_point request_started;  // of the frame being handled
  // The accept, then every whole request: close_idlest() ranks by it, so a
  // peer that never completes a request (a slowloris) makes room first.
  Clock::time_point last_request;
  Clock::time_point frame_started;  // first byte of the partial frame in `reader`

  ~Connection() {
    if (fd >= 0) ::close(fd);
  }
};

// Talks to the databases on a thread of its own: counts rows per key
// (count_references can take seconds on big tables, and waits for as long as
// a table is locked), creates and lists rotation jobs. The poll loop keeps
// serving key fetches meanwhile. Every connection has the statement_timeout
// (and a connect_timeout). Requests are served in order; each result wakes
// the loop through the signal pipe.
class Server::DatabaseWorker {
 public:
  DatabaseWorker(const std::vector<std::string>& databases, int timeout_ms);
  ~DatabaseWorker();
  using Task = std::function<nlohmann::json(const std::vector<std::string>& databases)>;
  // Counts the rows of `keys` (id, name); or, when task is set, runs it.
  void submit(uint64_t serial, std::vector<std::pair<std::string, std::string>> keys,
              Task task = nullptr);
  std::vector<std::pair<uint64_t, DatabaseResults>> take_done();

 private:
  struct Request {
    uint64_t serial;
    std::vector<std::pair<std::string, std::string>> keys;  // (id, name)
    Task task;
  };
  void work();

  std::vector<std::string> databases_;
  int timeout_ms_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<Request> requests_;
  std::vector<std::pair<uint64_t, DatabaseResults>> done_;
  bool stop_ = false;
  std::thread thread_;  // started by the first request
};

}  // namespace colcrypt::keyd
