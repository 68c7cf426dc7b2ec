#include "keyd/server.hpp"

#include <fcntl.h>
#include <libpq-fe.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <csignal>
#include <cstring>
#include <ctime>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>
#include <utility>

#include "core/wire.hpp"
#include "keyd/log.hpp"

#ifdef COLCRYPT_HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#endif

namespace colcrypt::keyd {
namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

int g_signal_pipe[2] = {-1, -1};
// Lock-free atomics: safe to set from a signal handler and from other threads.
std::atomic<bool> g_stop{false};
std::atomic<bool> g_hup{false};
static_assert(std::atomic<bool>::is_always_lock_free);

void ensure_signal_pipe() {
  if (g_signal_pipe[0] >= 0) return;
  if (::pipe2(g_signal_pipe, O_NONBLOCK | O_CLOEXEC) != 0) {
    int err = errno;
    throw Error(Errc::Io, std::string("cannot create the signal pipe: ") + std::strerror(err));
  }
}

void wake_loop(char why) {
  if (g_signal_pipe[1] >= 0) {
    ssize_t ignored = ::write(g_signal_pipe[1], &why, 1);
    (void)ignored;
  }
}

extern "C" void on_signal(int sig) {
  int saved = errno;
  if (sig == SIGHUP) {
    g_hup = true;
  } else {
    g_stop = true;
  }
  wake_loop(static_cast<char>(sig));
  errno = saved;
}

std::string errno_text(int err) { return std::strerror(err); }

std::string peer_text(uid_t uid, pid_t pid) {
  return "uid=" + std::to_string(uid) + " pid=" + std::to_string(pid);
}

sockaddr_un socket_address(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof addr.sun_path) {
    throw Error(Errc::InvalidArgument, "socket path " + path + " is empty or longer than " +
                                           std::to_string(sizeof addr.sun_path - 1) + " bytes");
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  return addr;
}

std::string parent_dir(const std::string& path) {
  auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

// Failure replies carry a short generic reason; details go to keyd's log.
wire::FailureCode failure_code(Errc code) {
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

int64_t now_seconds() { return static_cast<int64_t>(std::time(nullptr)); }

}  // namespace

struct Server::Connection {
  struct Outgoing {
    SecretBytes frame;
    // A key reply held until its audit entry is written (and, with
    // --audit-sync always, fdatasynced); failing closed, replaced by a
    // Failure when that fails. Server::release_key_replies.
    bool held = false;
    uint64_t audit_seq = 0;  // the entries it waits for: set by the commit after it was queued
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

  ~Connection() {
    if (fd >= 0) ::close(fd);
  }
};

void install_signal_handlers() {
  ensure_signal_pipe();
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = 0;  // no SA_RESTART: poll() returns EINTR and the loop looks at the pipe
  for (int sig : {SIGTERM, SIGINT, SIGHUP}) ::sigaction(sig, &sa, nullptr);
  struct sigaction ignore {};
  ignore.sa_handler = SIG_IGN;
  sigemptyset(&ignore.sa_mask);
  ::sigaction(SIGPIPE, &ignore, nullptr);
  // A file size limit makes the write fail with EFBIG (the audit log then
  // records a gap) instead of killing keyd.
  ::sigaction(SIGXFSZ, &ignore, nullptr);
}

bool shutdown_requested() { return g_stop; }

void request_shutdown() {
  g_stop = true;
  wake_loop('q');
}

void claim_socket_path(const std::string& path) {
  sockaddr_un addr = socket_address(path);
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return;
    int err = errno;
    throw SocketUnavailable("cannot check socket path " + path + ": " + errno_text(err));
  }
  if (!S_ISSOCK(st.st_mode)) {
    throw SocketUnavailable("socket path " + path + " exists and is not a socket");
  }
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) {
    int err = errno;
    throw Error(Errc::Io, "cannot create a socket: " + errno_text(err));
  }
  int rc = ::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr);
  int err = errno;
  ::close(fd);
  if (rc == 0 || err == EAGAIN || err == EINPROGRESS) {
    throw SocketUnavailable("another colcrypt-keyd is already listening on " + path);
  }
  if (err != ECONNREFUSED) {
    throw SocketUnavailable("cannot check whether " + path + " is in use: " + errno_text(err));
  }
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
    err = errno;
    throw SocketUnavailable("cannot remove stale socket " + path + ": " + errno_text(err));
  }
  log_info("removed stale socket " + path);
}

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
  return out;
}

// Talks to the databases on a thread of its own: counts rows per key
// (count_references can take seconds on big tables, and waits for as long as
// a table is locked), creates and lists rotation jobs. The poll loop keeps
// serving key fetches meanwhile. Every connection has the statement_timeout
// (and a connect_timeout). Requests are served in order; each result wakes
// the loop through the signal pipe.
class Server::DatabaseWorker {
 public:
  DatabaseWorker(const std::vector<std::string>& databases, int timeout_ms)
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
  ~DatabaseWorker() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    if (thread_.joinable()) thread_.join();  // a count in progress ends within the timeout
  }
  using Task = std::function<json(const std::vector<std::string>& databases)>;
  // Counts the rows of `keys` (id, name); or, when task is set, runs it.
  void submit(uint64_t serial, std::vector<std::pair<std::string, std::string>> keys,
              Task task = nullptr) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      requests_.push_back({serial, std::move(keys), std::move(task)});
      if (!thread_.joinable()) thread_ = std::thread([this] { work(); });
    }
    wake_.notify_all();
  }
  std::vector<std::pair<uint64_t, DatabaseResults>> take_done() {
    std::lock_guard<std::mutex> lock(mutex_);
    return std::exchange(done_, {});
  }

 private:
  struct Request {
    uint64_t serial;
    std::vector<std::pair<std::string, std::string>> keys;  // (id, name)
    Task task;
  };
  void work() {
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
          counts.errors[id] =
              timed_out ? "counting the rows that use key '" + name +
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

  std::vector<std::string> databases_;
  int timeout_ms_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<Request> requests_;
  std::vector<std::pair<uint64_t, DatabaseResults>> done_;
  bool stop_ = false;
  std::thread thread_;  // started by the first request
};

Server::Server(ServerConfig config, KeyStore store)
    : config_(std::move(config)),
      store_(std::move(store)),
      started_(Clock::now()),
      last_flush_(Clock::now()),
      last_schedule_(Clock::now()) {
  ensure_signal_pipe();
  if (config_.audit_log_path.empty()) {
    config_.audit_log_path =
        store_.dir() + (store_.dir().back() == '/' ? "" : "/") + kAuditFileName;
  }
  audit_ = std::make_unique<AuditLog>(config_.audit_log_path, store_.audit_mac_key());
  audit({{"event", "unlock"}, {"store", store_.dir()}, {"keys", store_.keys().size()}});
  jobs_ = std::make_unique<JobRunner>(config_.databases, config_.job_poll_interval_ms);
  db_worker_ = std::make_unique<DatabaseWorker>(config_.databases, config_.count_timeout_ms);
  publish_keys();
}

void Server::publish_keys() {
  std::map<std::string, KeySnapshot> keys;
  for (const auto& k : store_.keys()) keys[k.name] = {format_key_id(k.id), k.primary_version};
  jobs_->publish_keys(std::move(keys));
}

// {"versions": {"1": rows, ...}, "columns": [{"database","column","version","rows"}]}
// Throws the counting error (clear text for a timeout: InvalidArgument, which
// reaches the admin client; Io for anything else, whose details go to the log).
json Server::references_of(const KeyRecord& key, const DatabaseResults& counts) const {
  const std::string id = format_key_id(key.id);
  if (auto e = counts.errors.find(id); e != counts.errors.end()) {
    throw Error(e->second.rfind("counting the rows", 0) == 0 ? Errc::InvalidArgument : Errc::Io,
                e->second);
  }
  auto found = counts.rows.find(id);
  if (found == counts.rows.end()) {
    throw Error(Errc::InvalidArgument,
                "key '" + key.name + "' was created while rows were counted; ask again");
  }
  json versions = json::object();
  json columns = json::array();
  for (const auto& r : found->second) {
    const std::string v = std::to_string(r.version);
    versions[v] = versions.value(v, int64_t{0}) + r.rows;
    columns.push_back(
        {{"database", r.database}, {"column", r.column}, {"version", r.version}, {"rows", r.rows}});
  }
  return {{"versions", std::move(versions)}, {"columns", std::move(columns)}};
}

void Server::audit(json event) {
  if (audit_) audit_->append(std::move(event));
}

json Server::rotate_and_audit(const std::string& name, const std::string& reason, uid_t uid,
                              pid_t pid) {
  json entry = {{"event", "admin"}, {"op", "rotate"}, {"key", name}, {"reason", reason}};
  if (reason == "manual" || reason == "sql") {
    entry["uid"] = uid;
    entry["pid"] = pid;
  }
  try {
    const KeyRecord& key = store_.rotate_key(name);
    publish_keys();
    entry["result"] = "ok";
    entry["version"] = key.primary_version;
    audit(entry);
    if (audit_) audit_->sync();
    log_info("rotated key '" + key.name + "' to version " + std::to_string(key.primary_version) +
             " (" + reason + ")");
    return key_metadata_json(key);
  } catch (const Error& e) {
    entry["result"] = errc_name(e.code());
    audit(entry);
    throw;
  }
}

void Server::run_scheduler(bool force) {
  auto now_steady = Clock::now();
  if (!force &&
      now_steady - last_schedule_ < std::chrono::seconds(config_.rotation_check_interval_s)) {
    return;
  }
  last_schedule_ = now_steady;
  const int64_t now = now_seconds();
  std::vector<std::pair<std::string, RotationReason>> due;
  for (const auto& k : store_.keys()) {
    if (k.expires_at && *k.expires_at <= now) continue;  // expired keys no longer encrypt
    RotationReason reason = store_.rotation_due(k, now, config_.day_seconds);
    // The usage cap is a safety limit and applies even with automatic rotation off.
    if (reason == RotationReason::UsageCap ||
        (reason == RotationReason::Interval && config_.auto_rotation)) {
      due.emplace_back(k.name, reason);
    }
  }
  for (const auto& [name, reason] : due) {
    try {
      rotate_and_audit(name, reason == RotationReason::UsageCap ? "usage-cap" : "interval", 0, 0);
    } catch (const Error& e) {
      log_error("automatic rotation of key '" + name + "' failed: " + e.what());
    }
  }
}

Server::~Server() {
  connections_.clear();
  if (listen_fd_ >= 0) {
    ::close(listen_fd_);
    remove_socket();
  }
}

bool Server::is_admin(uid_t uid) const {
  return std::find(config_.admin_uids.begin(), config_.admin_uids.end(), uid) !=
         config_.admin_uids.end();
}

bool Server::allowed(uid_t uid) const {
  return is_admin(uid) || std::find(config_.allow_uids.begin(), config_.allow_uids.end(), uid) !=
                              config_.allow_uids.end();
}

void Server::listen() {
  const std::string& path = config_.socket_path;
  sockaddr_un addr = socket_address(path);
  const std::string dir = parent_dir(path);
  const mode_t dir_mode = config_.socket_group ? 0750 : 0700;
  if (::mkdir(dir.c_str(), dir_mode) == 0) {
    if (::chmod(dir.c_str(), dir_mode) != 0 ||
        (config_.socket_group &&
         ::chown(dir.c_str(), static_cast<uid_t>(-1), *config_.socket_group) != 0)) {
      int err = errno;
      throw Error(Errc::Io, "cannot set up socket directory " + dir + ": " + errno_text(err));
    }
    log_info("created socket directory " + dir);
  } else if (errno != EEXIST) {
    int err = errno;
    throw Error(Errc::Io, "cannot create socket directory " + dir + ": " + errno_text(err));
  } else {
    // Whoever can write the directory can put their own socket at this path
    // while keyd is down, and backends would fetch keys from it (encrypting
    // under an attacker's key). So the directory must be keyd's (or root's)
    // and writable by nobody else, like ssh-agent's.
    struct stat st {};
    if (::lstat(dir.c_str(), &st) != 0) {
      int err = errno;
      throw Error(Errc::Io, "cannot inspect socket directory " + dir + ": " + errno_text(err));
    }
    if (!S_ISDIR(st.st_mode)) {
      throw Error(Errc::InsecurePermissions, "socket directory " + dir + " is not a directory");
    }
    if (st.st_uid != ::geteuid() && st.st_uid != 0) {
      throw Error(Errc::InsecurePermissions,
                  "socket directory " + dir + " belongs to uid " + std::to_string(st.st_uid) +
                      "; it must belong to colcrypt-keyd's user or root");
    }
    if ((st.st_mode & (S_IWGRP | S_IWOTH)) != 0) {
      throw Error(Errc::InsecurePermissions,
                  "socket directory " + dir +
                      " is writable by group or others; put the socket in a private directory "
                      "(e.g. /run/colcrypt)");
    }
  }

  claim_socket_path(path);
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    int err = errno;
    throw Error(Errc::Io, "cannot create a socket: " + errno_text(err));
  }
  // The socket file is created under umask 0177: never briefly wider than 0600.
  mode_t old_umask = ::umask(0177);
  int rc = ::bind(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr);
  int err = errno;
  ::umask(old_umask);
  if (rc != 0) {
    ::close(fd);
    throw SocketUnavailable("cannot bind " + path + ": " + errno_text(err));
  }
  listen_fd_ = fd;  // from here on the destructor removes the socket file
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0) {
    socket_dev_ = st.st_dev;
    socket_ino_ = st.st_ino;
  }
  if (::listen(fd, 128) != 0) {
    err = errno;
    throw SocketUnavailable("cannot listen on " + path + ": " + errno_text(err));
  }
  if (config_.socket_group) {
    if (::chown(path.c_str(), static_cast<uid_t>(-1), *config_.socket_group) != 0 ||
        ::chmod(path.c_str(), 0660) != 0) {
      err = errno;
      throw Error(Errc::Io, "cannot give socket " + path + " to its group: " + errno_text(err));
    }
  } else if (::chmod(path.c_str(), 0600) != 0) {
    err = errno;
    throw Error(Errc::Io, "cannot chmod socket " + path + ": " + errno_text(err));
  }
}

void Server::remove_socket() {
  // Only remove the file if it is still ours (not replaced by another keyd).
  struct stat st {};
  if (::lstat(config_.socket_path.c_str(), &st) == 0 && st.st_dev == socket_dev_ &&
      st.st_ino == socket_ino_) {
    ::unlink(config_.socket_path.c_str());
  }
}

// Frames in secret memory are key replies: held until their audit entry is committed.
void Server::queue(Connection& c, SecretBytes frame) {
  c.out.push_back({std::move(frame), true, 0});
}

void Server::queue(Connection& c, const std::vector<uint8_t>& frame) {
  c.out.push_back({SecretBytes(ByteView(frame)), false, 0});
}

void Server::accept_all() {
  // Refusals are sent once their audit entries are committed (below).
  std::vector<std::pair<int, std::vector<uint8_t>>> refusals;
  const size_t first_new = connections_.size();
  for (;;) {
    int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      int err = errno;
      if (err == EINTR) continue;
      if (err == EAGAIN || err == EWOULDBLOCK) break;
      if (err == ECONNABORTED || err == EPROTO) continue;
      // EMFILE and friends: log and retry on the next loop turn.
      log_error("accept failed: " + errno_text(err));
      break;
    }
    struct ucred cred {};
    socklen_t len = sizeof cred;
    if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
      int err = errno;
      log_warning("cannot read the credentials of a peer: " + errno_text(err) + "; closing");
      ::close(fd);
      continue;
    }
    auto reject = [&](wire::FailureCode code, const std::string& message) {
      refusals.emplace_back(fd, wire::encode_failure(code, message));
    };
    if (!allowed(cred.uid)) {
      log_warning("refused peer " + peer_text(cred.uid, cred.pid));
      audit({{"event", "refused-peer"}, {"uid", cred.uid}, {"pid", cred.pid}});
      reject(wire::FailureCode::Denied,
             "colcrypt-keyd refuses uid " + std::to_string(cred.uid) + " (not on its allowlist)");
      continue;
    }
    if (live_connections() >= config_.max_connections && !close_idlest()) {
      log_warning("too many connections; refused peer " + peer_text(cred.uid, cred.pid));
      reject(wire::FailureCode::Internal, "colcrypt-keyd is busy (too many connections)");
      continue;
    }
    auto c = std::make_unique<Connection>();
    c->fd = fd;
    c->uid = cred.uid;
    c->pid = cred.pid;
    c->serial = next_serial_++;
    c->last_activity = Clock::now();
    if (log_level() >= LogLevel::Debug) log_debug("accepted peer " + peer_text(c->uid, c->pid));
    connections_.push_back(std::move(c));
  }
  if (!refusals.empty()) {
    if (audit_) audit_->commit();
    for (auto& [fd, frame] : refusals) {
      // Best effort: the reply fits an empty socket buffer, so this never blocks.
      ssize_t ignored = ::send(fd, frame.data(), frame.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
      (void)ignored;
      ::close(fd);
    }
  }
  // A new peer usually sent its request right after connecting: handle it in
  // this loop turn (its reply goes out after this turn's commit).
  for (size_t i = first_new; i < connections_.size(); ++i) handle_readable(*connections_[i]);
}

size_t Server::live_connections() const {
  return static_cast<size_t>(std::count_if(connections_.begin(), connections_.end(),
                                           [](const auto& c) { return !c->dead; }));
}

bool Server::close_idlest() {
  // Backends keep their connection between fetches (client::Client): at
  // --max-connections the one idle longest makes room; its client connects
  // again when it next needs a key. A connection in the middle of a request
  // (part of a frame read, a reply queued, row counts awaited) is never taken.
  Connection* idlest = nullptr;
  for (auto& c : connections_) {
    if (c->dead || c->waiting || !c->out.empty() || c->reader.buffered() > 0) continue;
    if (idlest == nullptr || c->last_activity < idlest->last_activity) idlest = c.get();
  }
  if (idlest == nullptr) return false;
  if (log_level() >= LogLevel::Debug)
    log_debug("closing the idlest connection (peer " + peer_text(idlest->uid, idlest->pid) +
              ") for a new peer");
  idlest->dead = true;
  return true;
}

void Server::handle_readable(Connection& c) {
  uint8_t buf[4096];
  for (;;) {
    ssize_t n = ::recv(c.fd, buf, sizeof buf, 0);
    if (n > 0) {
      c.reader.feed(buf, static_cast<size_t>(n));
      c.last_activity = Clock::now();
      if (static_cast<size_t>(n) < sizeof buf) break;
      continue;
    }
    if (n == 0) {
      c.read_closed = true;
      break;
    }
    int err = errno;
    if (err == EINTR) continue;
    if (err == EAGAIN || err == EWOULDBLOCK) break;
    log_debug("read from peer " + peer_text(c.uid, c.pid) + " failed: " + errno_text(err));
    c.dead = true;
    return;
  }
  process_frames(c);
}

void Server::process_frames(Connection& c) {
  try {
    // A request waiting for row counts holds back the frames after it.
    while (!c.waiting) {
      auto frame = c.reader.next();
      if (!frame) break;
      handle_frame(c, static_cast<uint8_t>(frame->type), frame->body);
      secure_zero(frame->body.data(), frame->body.size());
    }
  } catch (const Error& e) {
    if (e.code() != Errc::ProtocolError) throw;
    log_warning("malformed frame from peer " + peer_text(c.uid, c.pid) + " (" + e.what() +
                "); dropping the connection");
    c.dead = true;
  }
}

void Server::handle_frame(Connection& c, uint8_t type, std::vector<uint8_t>& body) {
  const std::string peer = peer_text(c.uid, c.pid);
  auto fail = [&](wire::FailureCode code, const std::string& message) {
    queue(c, wire::encode_failure(code, message));
  };
  try {
    switch (static_cast<wire::MsgType>(type)) {
      case wire::MsgType::FetchPrimary:
      case wire::MsgType::FetchPrimaryBlock: {
        const bool block = static_cast<wire::MsgType>(type) == wire::MsgType::FetchPrimaryBlock;
        uint32_t wanted = 1;  // a legacy FetchPrimary is charged one encryption
        std::string name = block ? wire::decode_fetch_primary_block(ByteView(body), wanted)
                                 : wire::decode_fetch_primary(ByteView(body));
        wanted = std::min(wanted, config_.max_block_uses);
        if (const KeyRecord* k = store_.find(name)) {
          // Blocks are charged whole: one never exceeds 1/64 of the key's cap
          // (what exiting backends take with them stays small), but 1024 is
          // always allowed (small caps).
          const uint64_t share = std::max<uint64_t>(kMinBlockCeiling, k->max_uses_per_version / 64);
          wanted = static_cast<uint32_t>(std::min<uint64_t>(wanted, share));
        }
        json entry = {{"event", "fetch"},
                      {"op", block ? "primary-block" : "primary"},
                      {"uid", c.uid},
                      {"pid", c.pid},
                      {"key", name}};
        const int64_t now = now_seconds();
        UseGrant grant;
        try {
          const uint32_t before = store_.find(name) ? store_.find(name)->primary_version : 0;
          grant = store_.charge_uses(name, wanted, now);
          if (grant.rotated) {
            publish_keys();
            const KeyRecord* k = store_.find(name);
            audit({{"event", "admin"},
                   {"op", "rotate"},
                   {"key", name},
                   {"reason", "usage-cap"},
                   {"result", "ok"},
                   {"from_version", before},
                   {"version", k->primary_version}});
            log_info("rotated key '" + name + "' to version " + std::to_string(k->primary_version) +
                     " (usage cap reached)");
          }
        } catch (const Error& e) {
          entry["result"] = errc_name(e.code());
          audit(entry);
          if (e.code() == Errc::KeyNotFound) {
            log_info("peer " + peer + " asked for unknown key '" + name + "'");
            return fail(wire::FailureCode::NotFound, "key '" + name + "' not found");
          }
          if (e.code() == Errc::KeyUnavailable) {
            log_warning("peer " + peer + " asked for unavailable key '" + name + "': " + e.what());
            return fail(wire::FailureCode::KeyUnavailable, e.what());
          }
          throw;
        }
        const KeyRecord* key = store_.find(name);
        wire::KeyReply reply;
        reply.id = key->id;
        reply.version = grant.version;
        // A grant that used up the cap was followed by a rotation: its version
        // is decrypt-only now, but the granted uses were charged to it and
        // remain valid (the version never exceeds its cap).
        reply.state = wire::KeyState::Active;
        reply.name = key->name;
        reply.key = store_.unwrap(*key, grant.version);
        if (block) {
          queue(c, wire::encode_key_grant(reply, static_cast<uint32_t>(grant.granted)));
        } else {
          queue(c, wire::encode_key_reply(reply));
        }
        entry["result"] = "ok";
        entry["key_id"] = format_key_id(key->id);
        entry["version"] = grant.version;
        entry["granted"] = grant.granted;
        audit(entry);
        if (log_level() >= LogLevel::Debug)
          log_debug("peer " + peer + " fetched key '" + name + "' version " +
                    std::to_string(reply.version) + " (" + std::to_string(grant.granted) +
                    " uses)");
        return;
      }
      case wire::MsgType::FetchVersion:
      case wire::MsgType::FetchVersionFor: {
        KeyId id{};
        uint32_t version = 0;
        auto purpose = wire::FetchPurpose::Decrypt;
        if (static_cast<wire::MsgType>(type) == wire::MsgType::FetchVersion) {
          wire::decode_fetch_version(ByteView(body), id, version);
        } else {
          wire::decode_fetch_version_for(ByteView(body), id, version, purpose);
        }
        json entry = {{"event", "fetch"},
                      {"op", "version"},
                      {"uid", c.uid},
                      {"pid", c.pid},
                      {"key_id", format_key_id(id)},
                      {"version", version}};
        if (purpose != wire::FetchPurpose::Decrypt) {
          entry["purpose"] = wire::fetch_purpose_name(purpose);
        }
        const KeyRecord* key = store_.find(id);
        if (!key) {
          entry["result"] = "KeyNotFound";
          audit(entry);
          log_info("peer " + peer + " asked for unknown key id " + format_key_id(id));
          return fail(wire::FailureCode::NotFound, "key " + format_key_id(id) + " not found");
        }
        entry["key"] = key->name;
        const KeyVersion* v = key->find_version(version);
        if (!v) {
          entry["result"] = "KeyNotFound";
          audit(entry);
          return fail(wire::FailureCode::NotFound,
                      "key '" + key->name + "' has no version " + std::to_string(version));
        }
        if (v->state == wire::KeyState::Disabled || v->state == wire::KeyState::Destroyed) {
          entry["result"] = std::string("KeyUnavailable: ") + wire::key_state_name(v->state);
          audit(entry);
          return fail(wire::FailureCode::KeyUnavailable, "key '" + key->name + "' version " +
                                                             std::to_string(version) + " is " +
                                                             wire::key_state_name(v->state));
        }
        const std::string name = key->name;
        if (purpose != wire::FetchPurpose::Decrypt) {
          // The version now keys values no row count can see: keyd must
          // remember it (on disk) before the first such key leaves.
          bool first = false;
          try {
            first = store_.record_derivation(id, version, purpose, now_seconds());
          } catch (const Error& e) {
            entry["result"] = errc_name(e.code());
            audit(entry);
            log_error("cannot record that version " + std::to_string(version) + " of key '" + name +
                      "' keys " + wire::fetch_purpose_name(purpose) + " values: " + e.what());
            return fail(
                wire::FailureCode::Internal,
                "colcrypt-keyd could not record this use of key '" + name + "' (see its log)");
          }
          if (first) {
            audit({{"event", "derivation-pinned"},
                   {"key", name},
                   {"key_id", format_key_id(id)},
                   {"version", version},
                   {"purpose", wire::fetch_purpose_name(purpose)},
                   {"uid", c.uid},
                   {"pid", c.pid}});
            log_info("version " + std::to_string(version) + " of key '" + name + "' now keys " +
                     (purpose == wire::FetchPurpose::BlindIndex ? "blind indexes"
                                                                : "deterministic values") +
                     ": disabling or destroying it needs --force");
          }
          key = store_.find(id);  // record_derivation may have replaced the records
          v = key->find_version(version);
        }
        wire::KeyReply reply;
        reply.id = key->id;
        reply.version = version;
        reply.state = v->state;
        reply.name = key->name;
        reply.key = store_.unwrap(*key, version);
        queue(c, wire::encode_key_reply(reply));
        store_.record_use(key->id, now_seconds());
        entry["result"] = "ok";
        audit(entry);
        if (log_level() >= LogLevel::Debug)
          log_debug("peer " + peer + " fetched key '" + key->name + "' version " +
                    std::to_string(version));
        return;
      }
      case wire::MsgType::DenialReport: {
        // Issue 4: the extension denied a database role the use of a key
        // (colcrypt.grant_key privileges): keep a record of the attempt.
        // Names come from the peer: no control characters into the log.
        auto printable = [](std::string s) {
          for (char& ch : s)
            if (static_cast<unsigned char>(ch) < 0x20 || ch == 0x7f) ch = '?';
          return s;
        };
        const wire::DenialReport r = wire::decode_denial_report(ByteView(body));
        audit({{"event", "sql-denied"},
               {"key", printable(r.key_name)},
               {"privilege", printable(r.privilege)},
               {"role", printable(r.role)},
               {"database", printable(r.database)},
               {"uid", c.uid},
               {"pid", c.pid}});
        log_warning("denied: database role '" + printable(r.role) + "' may not " +
                    printable(r.privilege) + " with key '" + printable(r.key_name) +
                    "' (database '" + printable(r.database) + "', reported by peer " + peer + ")");
        queue(c, wire::encode_ack());
        return;
      }
      case wire::MsgType::Admin:
        if (!is_admin(c.uid)) {
          if (config_.sql_rotate && allowed(c.uid)) {
            // The one admin op a database peer may send (colcrypt.rotate_key).
            json request = json::parse(body.begin(), body.end(), nullptr, false);
            if (request.is_object() && request.value("op", "") == "rotate") {
              return handle_admin(c, body);
            }
          }
          audit({{"event", "admin-denied"}, {"uid", c.uid}, {"pid", c.pid}});
          log_warning("denied administration to peer " + peer);
          return fail(wire::FailureCode::Denied,
                      "uid " + std::to_string(c.uid) + " may not administer colcrypt-keyd");
        }
        return handle_admin(c, body);
      default: {
        char hex[8];
        std::snprintf(hex, sizeof hex, "0x%02x", type);
        log_info("peer " + peer + " sent unknown message type " + hex);
        return fail(wire::FailureCode::BadRequest, std::string("unknown message type ") + hex);
      }
    }
  } catch (const Error& e) {
    if (e.code() == Errc::ProtocolError) {
      // A frame that parsed but whose body did not: answer, keep the connection.
      return fail(wire::FailureCode::BadRequest, std::string("malformed request: ") + e.what());
    }
    log_error("request from peer " + peer + " failed: " + e.what());
    return fail(failure_code(e.code()), "internal error in colcrypt-keyd (see its log)");
  } catch (const std::exception& e) {
    // Nothing a peer sends may take the daemon down.
    log_error("request from peer " + peer + " failed: " + e.what());
    return fail(wire::FailureCode::Internal, "internal error in colcrypt-keyd (see its log)");
  }
}

void Server::handle_admin(Connection& c, const std::vector<uint8_t>& body,
                          const DatabaseResults* counts) {
  const std::string peer = peer_text(c.uid, c.pid);
  json request;
  try {
    request = json::parse(body.begin(), body.end());
  } catch (const json::exception&) {
    queue(c, wire::encode_failure(wire::FailureCode::BadRequest, "admin request is not JSON"));
    return;
  }
  json result;
  std::string op;
  bool logged = false;  // rotate_and_audit writes its own entry
  // Hands the request to the counting thread; it is handled again, from the
  // start, once the counts are in (finish_database_work).
  auto defer = [&](const std::vector<const KeyRecord*>& keys, DatabaseWorker::Task task = nullptr) {
    std::vector<std::pair<std::string, std::string>> ids;
    for (const KeyRecord* k : keys) ids.emplace_back(format_key_id(k->id), k->name);
    c.waiting = true;
    c.waiting_body = body;
    db_worker_->submit(c.serial, std::move(ids), std::move(task));
    log_debug("admin " + op + " from peer " + peer + " waits for the databases");
  };
  // The task's value on the second pass; its failure as Error(Io) (logged,
  // the peer is told to look at the log, as before).
  auto task_value = [&]() -> json {
    if (!counts->error.empty()) throw Error(Errc::Io, counts->error);
    return counts->value;
  };
  auto audit_admin = [&](const std::string& outcome) {
    if (logged || op == "list" || op == "show" || op == "status" || op == "jobs" ||
        op == "references") {
      return;
    }
    json entry = {
        {"event", "admin"}, {"op", op}, {"uid", c.uid}, {"pid", c.pid}, {"result", outcome}};
    for (const char* field : {"name", "version", "force"}) {
      if (request.is_object() && request.contains(field)) entry[field] = request[field];
    }
    audit(std::move(entry));
    if (audit_) audit_->sync();
  };
  try {
    if (!request.is_object() || !request.contains("op") || !request["op"].is_string()) {
      throw Error(Errc::InvalidArgument, "admin request needs a string \"op\"");
    }
    op = request["op"].get<std::string>();
    auto name_arg = [&]() {
      if (!request.contains("name") || !request["name"].is_string()) {
        throw Error(Errc::InvalidArgument, "\"" + op + "\" needs a string \"name\"");
      }
      return request["name"].get<std::string>();
    };
    if (op == "create") {
      std::string name = name_arg();
      NewKeyOptions options;
      if (request.contains("rotation_interval_days") &&
          !request["rotation_interval_days"].is_null()) {
        const json& days = request["rotation_interval_days"];
        if (!days.is_number_integer() || days.get<int64_t>() < 1 ||
            days.get<int64_t>() > kMaxRotationIntervalDays) {
          throw Error(Errc::InvalidArgument,
                      "rotation_interval_days must be an integer from 1 to " +
                          std::to_string(kMaxRotationIntervalDays));
        }
        options.rotation_interval_days = days.get<uint32_t>();
      }
      if (request.contains("max_uses_per_version") && !request["max_uses_per_version"].is_null()) {
        const json& uses = request["max_uses_per_version"];
        if (!uses.is_number_unsigned() || uses.get<uint64_t>() < 1 ||
            uses.get<uint64_t>() > kMaxMaxUsesPerVersion) {
          throw Error(Errc::InvalidArgument, "max_uses_per_version must be an integer from 1 to " +
                                                 std::to_string(kMaxMaxUsesPerVersion));
        }
        options.max_uses_per_version = uses.get<uint64_t>();
      }
      if (request.contains("expires_at") && !request["expires_at"].is_null()) {
        const json& expires = request["expires_at"];
        std::optional<int64_t> t;
        if (expires.is_string()) t = parse_timestamp(expires.get<std::string>());
        if (!t) {
          throw Error(Errc::InvalidArgument,
                      "expires_at must be an ISO 8601 timestamp such as 2027-01-31T00:00:00Z");
        }
        options.expires_at = t;
      }
      const KeyRecord& key = store_.create_key(name, options);
      publish_keys();  // rotation jobs may name it before its first rotation
      log_info("peer " + peer + " created key '" + key.name + "' (id " + format_key_id(key.id) +
               ")");
      result = key_metadata_json(key);
    } else if (op == "list") {
      std::vector<const KeyRecord*> keys;
      for (const auto& k : store_.keys()) keys.push_back(&k);
      std::sort(keys.begin(), keys.end(),
                [](const KeyRecord* a, const KeyRecord* b) { return a->name < b->name; });
      json list = json::array();
      for (const KeyRecord* k : keys) list.push_back(key_metadata_json(*k));
      result = {{"keys", std::move(list)}};
    } else if (op == "show") {
      std::string name = name_arg();
      const KeyRecord* key = store_.find(name);
      if (!key) throw Error(Errc::KeyNotFound, "key '" + name + "' not found");
      result = key_metadata_json(*key);
    } else if (op == "rotate") {
      std::string name = name_arg();
      result = rotate_and_audit(name, is_admin(c.uid) ? "manual" : "sql", c.uid, c.pid);
      logged = true;
    } else if (op == "disable" || op == "enable" || op == "destroy") {
      std::string name = name_arg();
      if (!request.contains("version") || !request["version"].is_number_unsigned() ||
          request["version"].get<uint64_t>() == 0 ||
          request["version"].get<uint64_t>() > UINT32_MAX) {
        throw Error(Errc::InvalidArgument, "\"" + op + "\" needs a positive integer \"version\"");
      }
      const uint32_t version = request["version"].get<uint32_t>();
      const bool force = request.value("force", false);
      if (op != "enable" && !force) {
        // Refuse to make rows unreadable: count them first (docs/rotation.md).
        const KeyRecord* current = store_.find(name);
        if (!current) throw Error(Errc::KeyNotFound, "key '" + name + "' not found");
        if (config_.databases.empty()) {
          throw Error(Errc::InvalidArgument,
                      "colcrypt-keyd has no --database to check whether rows still use version " +
                          std::to_string(version) + " of key '" + name + "'; pass --force to " +
                          op + " it anyway");
        }
        // A pinned version is refused before counting (and checked again after).
        KeyStore::check_derivation_pin(*current, version, op, false);
        if (!counts) return defer({current});
        int64_t rows = 0;
        std::string where;
        const json references = references_of(*current, *counts);
        for (const auto& r : references["columns"]) {
          if (r["version"].get<uint32_t>() != version) continue;
          rows += r["rows"].get<int64_t>();
          where += std::string(where.empty() ? "" : ", ") + r["database"].get<std::string>() + ":" +
                   r["column"].get<std::string>() + " (" +
                   std::to_string(r["rows"].get<int64_t>()) + ")";
        }
        if (rows > 0) {
          throw Error(Errc::InvalidArgument,
                      "version " + std::to_string(version) + " of key '" + name +
                          "' is still used by " + std::to_string(rows) + " rows: " + where +
                          "; re-encrypt them first (colcrypt-keyctl reencrypt " + name +
                          ") or pass --force");
        }
      }
      // rows = 0 is not enough: a backend may still encrypt under a version
      // it cached as primary (the retirement grace, checked by the store).
      const RetireGrace grace{now_seconds(), config_.retire_grace_s, force};
      const KeyRecord& key = op == "disable"  ? store_.disable_version(name, version, grace)
                             : op == "enable" ? store_.enable_version(name, version)
                                              : store_.destroy_version(name, version, grace);
      log_info("peer " + peer + " " + (op == "destroy" ? "destroyed" : op + "d") + " version " +
               std::to_string(version) + " of key '" + key.name + "'");
      result = key_metadata_json(key);
    } else if (op == "reencrypt") {
      std::string name = name_arg();
      if (!store_.find(name)) throw Error(Errc::KeyNotFound, "key '" + name + "' not found");
      if (config_.databases.empty()) {
        throw Error(Errc::InvalidArgument,
                    "colcrypt-keyd has no --database: it cannot run re-encryption jobs");
      }
      const int batch_blocks = request.value("batch_blocks", 64);
      const int throttle_ms = request.value("throttle_ms", 0);
      if (batch_blocks < 1 || batch_blocks > 65536 || throttle_ms < 0 || throttle_ms > 600000) {
        throw Error(Errc::InvalidArgument,
                    "batch_blocks must be 1 to 65536 and throttle_ms 0 to 600000");
      }
      if (!counts) {
        return defer({}, [name, batch_blocks, throttle_ms](const std::vector<std::string>& dbs) {
          return create_jobs(dbs, name, batch_blocks, throttle_ms);
        });
      }
      result = {{"jobs", task_value()}};
      jobs_->wake();
    } else if (op == "jobs") {
      if (!counts) {
        return defer({}, [](const std::vector<std::string>& dbs) { return list_jobs(dbs); });
      }
      result = {{"jobs", task_value()}};
    } else if (op == "references") {
      std::string name = name_arg();
      const KeyRecord* key = store_.find(name);
      if (!key) throw Error(Errc::KeyNotFound, "key '" + name + "' not found");
      if (!config_.databases.empty() && !counts) return defer({key});
      result = config_.databases.empty()
                   ? json{{"versions", json::object()}, {"columns", json::array()}}
                   : references_of(*key, *counts);
      result["name"] = name;
      result["pinned"] = json::object();
      for (const auto& v : key->versions) {
        if (v.keys_derived_values()) {
          result["pinned"][std::to_string(v.version)] = {
              {"deterministic", v.deterministic.first_used.has_value()},
              {"blind_index", v.blind_index.first_used.has_value()}};
        }
      }
    } else if (op == "audit-verify") {
      if (audit_) audit_->sync();
      AuditVerdict verdict =
          AuditLog::verify(config_.audit_log_path, store_.audit_mac_key().view());
      result = audit_verdict_json(verdict, config_.audit_log_path);
    } else if (op == "status") {
      auto uptime =
          std::chrono::duration_cast<std::chrono::seconds>(Clock::now() - started_).count();
      result = {{"version", kKeydVersion},
                {"uptime_seconds", uptime},
                {"key_count", store_.keys().size()},
                {"store", store_.dir()},
                {"socket", config_.socket_path},
                {"locked", false},
                {"auto_rotation", config_.auto_rotation},
                {"rotation_check_interval_s", config_.rotation_check_interval_s},
                {"audit_log", config_.audit_log_path},
                {"audit_entries", audit_ ? audit_->last_seq() : 0},
                {"audit_sync", config_.audit_sync == AuditSyncMode::Always ? "always" : "batch"}};
      std::vector<const KeyRecord*> keys;
      for (const auto& k : store_.keys()) keys.push_back(&k);
      std::sort(keys.begin(), keys.end(),
                [](const KeyRecord* a, const KeyRecord* b) { return a->name < b->name; });
      const bool count = !config_.databases.empty() && request.value("references", true);
      if (count && !counts && !keys.empty()) return defer(keys);
      result["audit_writable"] = audit_ ? audit_->writable() : true;
      result["audit_lost_entries"] = audit_ ? audit_->lost_entries() : 0;
      json list = json::array();
      for (const KeyRecord* k : keys) {
        json kj = key_metadata_json(*k);
        if (count) {
          try {
            kj["references"] = references_of(*k, *counts)["versions"];
          } catch (const Error& e) {
            kj["references_error"] = e.what();
          }
        }
        list.push_back(std::move(kj));
      }
      result["keys"] = std::move(list);
      result["databases"] = config_.databases.size();
    } else {
      throw Error(Errc::InvalidArgument, "unknown admin op \"" + op + "\"");
    }
  } catch (const Error& e) {
    audit_admin(errc_name(e.code()));
    wire::FailureCode code = failure_code(e.code());
    if (code == wire::FailureCode::Internal) {
      log_error("admin " + op + " from peer " + peer + " failed: " + e.what());
      queue(c, wire::encode_failure(
                   code, "colcrypt-keyd could not complete \"" + op + "\" (see its log)"));
    } else {
      log_info("admin " + op + " from peer " + peer + " refused: " + e.what());
      queue(c, wire::encode_failure(code, e.what()));
    }
    return;
  }
  audit_admin("ok");
  queue(c, wire::encode_admin_result(result.dump(-1, ' ', false, json::error_handler_t::replace)));
}

void Server::finish_database_work() {
  for (auto& [serial, counts] : db_worker_->take_done()) {
    auto it = std::find_if(connections_.begin(), connections_.end(),
                           [serial = serial](const auto& c) { return c->serial == serial; });
    if (it == connections_.end() || !(*it)->waiting) continue;
    Connection& c = **it;
    c.waiting = false;
    const std::vector<uint8_t> body = std::move(c.waiting_body);
    c.waiting_body.clear();
    if (c.dead || c.read_closed) {
      // The peer gave up waiting (keyctl's --timeout-ms): nothing is done for it.
      json request = json::parse(body.begin(), body.end(), nullptr, false);
      json entry = {{"event", "admin"},
                    {"op", request.is_object() ? request.value("op", "?") : "?"},
                    {"uid", c.uid},
                    {"pid", c.pid},
                    {"result", "abandoned"}};
      for (const char* field : {"name", "version", "force"}) {
        if (request.is_object() && request.contains(field)) entry[field] = request[field];
      }
      if (entry["op"] == "reencrypt" && counts.error.empty()) {
        // The jobs exist now: they run, and the log says so.
        entry["result"] = "ok";
        entry["peer_gone"] = true;
        jobs_->wake();
      }
      if (entry["op"] != "status" && entry["op"] != "references" && entry["op"] != "jobs") {
        audit(std::move(entry));
      }
      log_info("peer " + peer_text(c.uid, c.pid) +
               " left before its row counts arrived; its request was dropped");
      c.dead = true;
      continue;
    }
    handle_admin(c, body, &counts);
    process_frames(c);  // what the peer sent meanwhile
  }
}

void Server::release_key_replies() {
  // synced_seq before loss_events: a failed fdatasync is counted before it can
  // be mistaken for progress (AuditLog::loss_events).
  const uint64_t written = audit_ ? audit_->written_seq() : 0;
  const uint64_t synced = audit_ ? audit_->synced_seq() : 0;
  const uint64_t losses = audit_ ? audit_->loss_events() : 0;
  const bool lost = losses != audit_losses_seen_;
  audit_losses_seen_ = losses;
  // --audit-sync batch: written is enough while the disk keeps syncing.
  const bool disk_ok = audit_ && !audit_->sync_failing() && !audit_->sync_stalled();
  size_t withheld = 0;
  size_t held = 0;
  for (auto& c : connections_) {
    for (auto& o : c->out) {
      if (!o.held) continue;
      // Queued since the last commit: its entries are at most written_seq.
      if (o.audit_seq == 0) o.audit_seq = written;
      if (lost && config_.audit_fail_closed) {
        o.frame = SecretBytes(ByteView(wire::encode_failure(
            wire::FailureCode::Unavailable,
            "colcrypt-keyd cannot write its audit log (" + audit_->last_failure() +
                "), so it hands out no keys until the log is writable again (see its log; "
                "--audit-failure serve would serve them unaudited)")));
        o.held = false;
        ++withheld;
        continue;
      }
      const bool durable = o.audit_seq <= synced;
      if (lost || !audit_ || durable || (config_.audit_sync == AuditSyncMode::Batch && disk_ok)) {
        o.held = false;
      } else if (!config_.audit_fail_closed && audit_->sync_failing()) {
        o.held = false;  // --audit-failure serve: keys go out while the disk fails
      } else {
        ++held;  // released when the sync thread wakes the loop
      }
    }
  }
  held_replies_.store(held, std::memory_order_relaxed);
  if (withheld > 0) {
    log_error("withheld " + std::to_string(withheld) +
              " key replies: their audit entries could not be written");
  }
}

void Server::handle_writable(Connection& c) {
  while (!c.out.empty() && !c.front_held()) {
    SecretBytes& front = c.out.front().frame;
    ssize_t n =
        ::send(c.fd, front.data() + c.out_offset, front.size() - c.out_offset, MSG_NOSIGNAL);
    if (n < 0) {
      int err = errno;
      if (err == EINTR) continue;
      if (err == EAGAIN || err == EWOULDBLOCK) return;
      log_debug("write to peer " + peer_text(c.uid, c.pid) + " failed: " + errno_text(err));
      c.dead = true;
      return;
    }
    c.last_activity = Clock::now();
    c.out_offset += static_cast<size_t>(n);
    if (c.out_offset == front.size()) {
      c.out.pop_front();  // SecretBytes wipes the frame
      c.out_offset = 0;
    }
  }
}

void Server::drain_signals() {
  char buf[64];
  while (::read(g_signal_pipe[0], buf, sizeof buf) > 0) {
  }
  if (g_hup.exchange(false)) {
    log_info("SIGHUP received; nothing to reload yet, ignored");
  }
  if (g_stop && !stopping_) {
    stopping_ = true;
    log_info("shutting down");
  }
}

void Server::flush_store(bool force) {
  if (!store_.dirty() && !stopping_) return;
  auto now = Clock::now();
  if (!force && now - last_flush_ < std::chrono::seconds(config_.usage_flush_interval_s)) return;
  last_flush_ = now;
  try {
    store_.flush(stopping_);
  } catch (const Error& e) {
    log_error(std::string("cannot save key usage: ") + e.what());
  }
  if (audit_) audit_->sync();
}

int Server::run() {
  const size_t kFixed = 2;  // the signal pipe and the listening socket
  std::vector<pollfd> fds;
  // Rotations that fell due while keyd was down happen now.
  run_scheduler(true);
  jobs_->start();
  // After each fdatasync: --audit-sync always has replies waiting for it;
  // batch has some only while the disk stalled or failed.
  if (audit_) {
    const bool always = config_.audit_sync == AuditSyncMode::Always;
    audit_->start_sync_thread([this, always] {
      if (always || held_replies_.load(std::memory_order_relaxed) > 0) wake_loop('a');
    });
  }
  while (!stopping_) {
    if (g_stop) {
      drain_signals();
      break;
    }
    fds.clear();
    fds.push_back({g_signal_pipe[0], POLLIN, 0});
    fds.push_back({listen_fd_, POLLIN, 0});
    auto now = Clock::now();
    auto next_deadline = now + std::chrono::hours(1);
    for (const auto& c : connections_) {
      short events = 0;
      if (c->out.empty() && !c->read_closed && !c->waiting) events |= POLLIN;
      if (!c->out.empty() && !c->front_held()) events |= POLLOUT;
      // A dead peer still waiting for its row counts is not polled (it hung up).
      fds.push_back({c->dead ? -1 : c->fd, events, 0});
      if (c->waiting) continue;  // no idle timeout while keyd counts
      next_deadline = std::min(
          next_deadline, c->last_activity + std::chrono::milliseconds(config_.idle_timeout_ms));
    }
    next_deadline = std::min(
        next_deadline, last_schedule_ + std::chrono::seconds(config_.rotation_check_interval_s));
    // Held key replies: the sync thread wakes the loop after its fdatasync;
    // a stalled one is looked at again (--audit-sync batch releases nothing meanwhile).
    if (held_replies_ > 0) {
      next_deadline = std::min(next_deadline, now + std::chrono::milliseconds(10));
    }
    if (store_.dirty()) {
      next_deadline = std::min(next_deadline,
                               last_flush_ + std::chrono::seconds(config_.usage_flush_interval_s));
    }
    auto wait_ms =
        std::chrono::duration_cast<std::chrono::milliseconds>(next_deadline - now).count();
    int timeout = static_cast<int>(std::clamp<long long>(wait_ms + 1, 0, 60 * 60 * 1000));
    int rc = ::poll(fds.data(), fds.size(), timeout);
    if (rc < 0 && errno != EINTR) {
      int err = errno;
      log_error("poll failed: " + errno_text(err));
      break;
    }
    if (rc > 0 && (fds[0].revents & POLLIN)) drain_signals();
    if (stopping_) break;
    if (rc > 0) {
      // Group commit (docs/rotation.md, "Audit trail"): first every ready
      // request is handled and its reply queued, ...
      const size_t polled = fds.size() - kFixed;
      for (size_t i = 0; i < polled; ++i) {
        Connection& c = *connections_[i];
        short revents = fds[kFixed + i].revents;
        if (revents & (POLLIN | POLLHUP | POLLERR)) {
          if (c.out.empty() && !c.read_closed)
            handle_readable(c);
          else if (revents & (POLLHUP | POLLERR))
            c.dead = true;
        }
      }
      if (fds[1].revents & POLLIN) accept_all();
    }
    finish_database_work();
    // ... then their audit entries are written once and the head replaced
    // once (the sync thread fdatasyncs them), and only then do the replies
    // (keys) go out: --audit-sync batch once written while the disk keeps
    // syncing, --audit-sync always once fdatasynced (docs/operations.md).
    if (audit_) audit_->commit();
    release_key_replies();
    for (auto& c : connections_) {
      if (!c->dead && !c->out.empty()) handle_writable(*c);
      if (c->read_closed && c->out.empty()) c->dead = true;
    }
    now = Clock::now();
    for (auto& c : connections_) {
      if (!c->dead && !c->waiting &&
          now - c->last_activity >= std::chrono::milliseconds(config_.idle_timeout_ms)) {
        log_debug("closing idle connection of peer " + peer_text(c->uid, c->pid));
        c->dead = true;
      }
    }
    connections_.erase(std::remove_if(connections_.begin(), connections_.end(),
                                      [](const auto& c) { return c->dead && !c->waiting; }),
                       connections_.end());
    flush_store(false);
    run_scheduler(false);
  }

#ifdef COLCRYPT_HAVE_SYSTEMD
  sd_notify(0, "STOPPING=1");
#endif
  connections_.clear();
  stopping_ = true;
  db_worker_.reset();  // a count in progress ends within --count-timeout-ms
  jobs_.reset();       // stops the worker; an unfinished batch rolls back
  flush_store(true);
  audit({{"event", "stop"}});
  if (audit_) audit_->sync();
  ::close(listen_fd_);
  listen_fd_ = -1;
  remove_socket();
  log_info("stopped");
  g_stop = false;  // the process exits now; tests may start another server
  return 0;
}

}  // namespace colcrypt::keyd
