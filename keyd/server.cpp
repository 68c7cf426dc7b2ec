// colcrypt-keyd's server loop: one thread, one poll() loop over the signal
// pipe, the listening socket and the peers' connections; non-blocking reads
// and writes of whole frames, idle timeouts, the connection limit, group
// commit of the audit log before key replies go out, and signals.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <csignal>
#include <memory>

#include "keyd/log.hpp"
#include "keyd/metrics_http.hpp"
#include "keyd/server_internal.hpp"

#ifdef COLCRYPT_HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#endif

namespace colcrypt::keyd {
namespace {

using nlohmann::json;

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

}  // namespace

void wake_loop(char why) {
  if (g_signal_pipe[1] >= 0) {
    ssize_t ignored = ::write(g_signal_pipe[1], &why, 1);
    (void)ignored;
  }
}

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

Server::Server(ServerConfig config, KeyStore store)
    : config_(std::move(config)),
      store_(std::move(store)),
      started_(Clock::now()),
      last_flush_(Clock::now()),
      last_schedule_(Clock::now()),
      started_unix_(now_seconds()) {
  ensure_signal_pipe();
  if (!config_.metrics_listen.empty()) {
    metrics_http_ = std::make_unique<MetricsHttp>(config_.metrics_listen);
  }
  if (config_.audit_log_path.empty()) {
    config_.audit_log_path =
        store_.dir() + (store_.dir().back() == '/' ? "" : "/") + kAuditFileName;
  }
  audit_ = std::make_unique<AuditLog>(config_.audit_log_path, store_.audit_mac_key(),
                                      store_.audit_mark());
  store_.set_audit_mark(audit_->durable_mark());
  audit({{"event", "unlock"},
         {"store", store_.dir().empty() ? store_.location() : store_.dir()},
         {"keys", store_.keys().size()}});
  audit_rewind();  // the store was read at start, before the audit log was open
  jobs_ = std::make_unique<JobRunner>(config_.databases, config_.job_poll_interval_ms);
  jobs_->set_paused(store_.read_only());
  db_worker_ = std::make_unique<DatabaseWorker>(config_.databases, config_.count_timeout_ms);
  publish_keys();
}

void Server::audit(json event) {
  if (audit_) audit_->append(std::move(event));
}

void Server::sync_audit() {
  if (!audit_) return;
  audit_->sync();
  // Written with the store's next save (at the latest on the flush tick).
  store_.set_audit_mark(audit_->durable_mark());
}

void Server::audit_rewind() {
  // The warning is the store's own (it names the database and what changed).
  const std::optional<StoreRewind> r = store_.take_rewind();
  if (!r) return;
  audit({{"event", "store-rewound"},
         {"store", store_.location()},
         {"old_timeline", r->old_timeline},
         {"old_generation", r->old_generation},
         {"new_timeline", r->new_timeline},
         {"new_generation", r->new_generation}});
}

Server::~Server() {
  if (reload_thread_.joinable()) reload_thread_.join();
  connections_.clear();
  if (listen_fd_ >= 0) {
    ::close(listen_fd_);
    remove_socket();
  }
}

// Frames in secret memory are key replies: held until their audit entry is committed.
void Server::queue(Connection& c, SecretBytes frame) {
  c.out.push_back({std::move(frame), true, 0, c.request_started});
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
    if (!may_connect(cred.uid)) {
      ++metrics_.refused_peers;
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
    c->last_activity = c->last_request = Clock::now();
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
  // --max-connections the one whose last whole request is oldest makes room;
  // its client connects again when it next needs a key. A peer trickling a
  // frame (or sending nothing) ranks by its accept, so it goes before a
  // client that keeps asking. A connection in the middle of a frame ranks by
  // the frame's first byte: a kept connection that was idle and has just
  // begun a request is not cut off in the middle of it. A connection with a
  // reply queued or row counts awaited is never taken.
  auto rank = [](const Connection& c) {
    return c.reader.buffered() > 0 ? std::max(c.last_request, c.frame_started) : c.last_request;
  };
  Connection* idlest = nullptr;
  for (auto& c : connections_) {
    if (c->dead || c->waiting || !c->out.empty()) continue;
    if (idlest == nullptr || rank(*c) < rank(*idlest)) idlest = c.get();
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
      c.last_activity = Clock::now();
      if (c.reader.buffered() == 0) c.frame_started = c.last_activity;
      c.reader.feed(buf, static_cast<size_t>(n));
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
    bool took_frame = false;
    while (!c.waiting) {
      auto frame = c.reader.next();
      if (!frame) break;
      took_frame = true;
      c.request_started = Clock::now();
      handle_frame(c, static_cast<uint8_t>(frame->type), frame->body);
      secure_zero(frame->body.data(), frame->body.size());
      c.last_request = Clock::now();
    }
    // The read that completed a frame also began the next one: that frame's
    // time limit runs from this read, not from the first byte of the last.
    if (took_frame && c.reader.buffered() > 0) c.frame_started = c.last_activity;
  } catch (const Error& e) {
    if (e.code() != Errc::ProtocolError) throw;
    log_warning("malformed frame from peer " + peer_text(c.uid, c.pid) + " (" + e.what() +
                "); dropping the connection");
    c.dead = true;
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
        o.requested = {};  // a failure, not a fetch
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
      if (c.out.front().requested != Clock::time_point{}) {
        metrics_.fetch_latency.observe(
            std::chrono::duration<double>(Clock::now() - c.out.front().requested).count());
      }
      c.out.pop_front();  // SecretBytes wipes the frame
      c.out_offset = 0;
    }
  }
}

void Server::drain_signals() {
  char buf[64];
  while (::read(g_signal_pipe[0], buf, sizeof buf) > 0) {
  }
  if (g_hup.exchange(false)) reload();
  finish_reload();
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
  sync_audit();
}

void Server::poll_store(bool force) {
  last_store_poll_ = Clock::now();
  try {
    const KeyStore::PollResult found = store_.poll(force);
    if (found.role_changed) {
      jobs_->set_paused(store_.read_only());
      if (store_.read_only()) {
        log_warning("key store now read-only: " + store_.read_only_reason());
        audit({{"event", "store-role"},
               {"role", "read-only"},
               {"store", store_.location()},
               {"reason", store_.read_only_reason()}});
      } else {
        log_info("key store now writable: its " + store_.location() + " is a primary");
        audit({{"event", "store-role"}, {"role", "writable"}, {"store", store_.location()}});
        jobs_->wake();
      }
    }
    audit_rewind();
    if (found.reloaded) {
      replay_wait_spent_ = false;
      publish_keys();  // also empties the unwrapped-key cache: no dropped version is served
      log_debug("re-read the key store (" + std::to_string(store_.keys().size()) + " keys)");
    }
  } catch (const Error& e) {
    // keyd keeps serving the records it verified before.
    if (e.code() != Errc::StoreCorrupt) {
      log_warning(std::string("cannot re-read the key store: ") + e.what());
      return;
    }
    log_error(std::string("refusing the key store's current content: ") + e.what());
    audit({{"event", "store-corrupt"}, {"store", store_.location()}, {"reason", e.what()}});
  } catch (const std::exception& e) {
    log_warning(std::string("cannot re-read the key store: ") + e.what());
  }
}

bool Server::await_store(const std::function<bool()>& present, bool replay_wait) {
  if (present()) return true;
  if (!store_.dir().empty()) return false;  // a file store is only ever changed by this keyd
  if (Clock::now() - last_forced_read_ >= std::chrono::milliseconds(200)) {
    last_forced_read_ = Clock::now();
    poll_store(true);
    if (present()) return true;
  }
  if (!replay_wait || !store_.read_only() || replay_wait_spent_) return false;
  // A standby may not have replayed the version's row yet (WAL order: it
  // replays it before any value encrypted under it). Bounded: the loop waits.
  const auto deadline = Clock::now() + std::chrono::milliseconds(config_.replay_wait_ms);
  while (Clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    poll_store(false);
    if (present()) return true;
  }
  replay_wait_spent_ = true;
  return false;
}

int Server::run() {
  const size_t kFixed = 2;  // the signal pipe and the listening socket
  std::vector<pollfd> fds;
  last_store_poll_ = Clock::now();
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
      if (c->reader.buffered() > 0) {
        next_deadline = std::min(
            next_deadline, c->frame_started + std::chrono::milliseconds(config_.frame_timeout_ms));
      }
    }
    // Scrapers come after the peers (their own connection limit and timeouts).
    const size_t peers_end = fds.size();
    if (metrics_http_) metrics_http_->add_pollfds(fds, next_deadline);
    next_deadline = std::min(
        next_deadline, last_schedule_ + std::chrono::seconds(config_.rotation_check_interval_s));
    if (store_.dir().empty()) {
      next_deadline = std::min(next_deadline, last_store_poll_ + kStorePollInterval);
    }
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
      const size_t polled = peers_end - kFixed;
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
    if (metrics_http_) {
      metrics_http_->handle(fds.data() + peers_end, [this] { return metrics_text(); });
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
      } else if (!c->dead && !c->waiting && c->reader.buffered() > 0 &&
                 now - c->frame_started >= std::chrono::milliseconds(config_.frame_timeout_ms)) {
        // A client writes a frame at once; one trickled byte by byte holds
        // a connection for nothing (slowloris).
        log_debug("closing the connection of peer " + peer_text(c->uid, c->pid) +
                  ": its frame did not arrive within " + std::to_string(config_.frame_timeout_ms) +
                  " ms");
        c->dead = true;
      }
    }
    connections_.erase(std::remove_if(connections_.begin(), connections_.end(),
                                      [](const auto& c) { return c->dead && !c->waiting; }),
                       connections_.end());
    flush_store(false);
    if (store_.dir().empty() && Clock::now() - last_store_poll_ >= kStorePollInterval) {
      poll_store(false);
    }
    run_scheduler(false);
  }

#ifdef COLCRYPT_HAVE_SYSTEMD
  sd_notify(0, "STOPPING=1");
#endif
  connections_.clear();
  metrics_http_.reset();
  stopping_ = true;
  // A reload still resolving names is not applied; its thread ends with it.
  if (reload_thread_.joinable()) reload_thread_.join();
  reload_.reset();
  db_worker_.reset();  // a count in progress ends within --count-timeout-ms
  jobs_.reset();       // stops the worker; an unfinished batch rolls back
  // The stop entry first: the store's last save then records the log's end.
  audit({{"event", "stop"}});
  sync_audit();
  flush_store(true);
  ::close(listen_fd_);
  listen_fd_ = -1;
  remove_socket();
  log_info("stopped");
  g_stop = false;  // the process exits now; tests may start another server
  return 0;
}

}  // namespace colcrypt::keyd
