#include "client/client.hpp"

#include <fcntl.h>
#include <poll.h>
#include <pwd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <utility>

#include "core/error.hpp"
#include "core/secure_memory.hpp"

namespace colcrypt::client {
namespace {

using Clock = std::chrono::steady_clock;
constexpr int kSliceMs = 100;

// Owns a socket until release().
class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  int release() { return std::exchange(fd_, -1); }

 private:
  int fd_;
};

// Wipes a buffer that may have held key bytes when it goes out of scope.
struct WipeOnExit {
  void* p;
  size_t n;
  ~WipeOnExit() { secure_zero(p, n); }
};

class Exchange {
 public:
  explicit Exchange(const ClientOptions& options)
      : options_(options),
        deadline_(Clock::now() + std::chrono::milliseconds(std::max(options.timeout_ms, 1))) {}

  // Waits for events on fd in slices of at most kSliceMs, checking the
  // interrupt callback between slices. Returns the revents.
  short wait(int fd, short events, const char* waiting_for) {
    for (;;) {
      if (options_.interrupted && options_.interrupted()) {
        throw Error(Errc::Cancelled, "request to colcrypt-keyd cancelled");
      }
      auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline_ - Clock::now()).count();
      if (left <= 0) {
        throw Error(Errc::KeydTimeout, std::string("colcrypt-keyd at ") + options_.socket_path +
                                           " did not answer within " +
                                           std::to_string(options_.timeout_ms) + " ms (" +
                                           waiting_for + ")");
      }
      struct pollfd pfd {
        fd, events, 0
      };
      int rc = ::poll(&pfd, 1, static_cast<int>(std::min<long long>(left, kSliceMs)));
      if (rc < 0 && errno != EINTR) {
        int err = errno;
        throw Error(Errc::Io, std::string("poll failed: ") + std::strerror(err));
      }
      if (rc > 0) return pfd.revents;
    }
  }

  // A short timed wait while keyd's listen backlog is full.
  void sleep_slice() {
    if (options_.interrupted && options_.interrupted()) {
      throw Error(Errc::Cancelled, "request to colcrypt-keyd cancelled");
    }
    if (Clock::now() >= deadline_) {
      throw Error(Errc::KeydTimeout, std::string("colcrypt-keyd at ") + options_.socket_path +
                                         " did not accept the connection within " +
                                         std::to_string(options_.timeout_ms) + " ms");
    }
    ::poll(nullptr, 0, 10);
  }

  [[noreturn]] void unavailable(int err) {
    throw Error(Errc::KeydUnavailable, "cannot connect to colcrypt-keyd at " +
                                           options_.socket_path + ": " + std::strerror(err));
  }

  // A connected socket; the caller owns it.
  int connect_socket() {
    struct sockaddr_un addr {};
    addr.sun_family = AF_UNIX;
    if (options_.socket_path.empty() || options_.socket_path.size() >= sizeof addr.sun_path) {
      throw Error(Errc::KeydUnavailable, "cannot connect to colcrypt-keyd at " +
                                             options_.socket_path +
                                             ": invalid socket path (empty or too long)");
    }
    std::memcpy(addr.sun_path, options_.socket_path.data(), options_.socket_path.size());
    Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (fd.get() < 0) {
      int err = errno;
      throw Error(Errc::Io, std::string("cannot create a socket: ") + std::strerror(err));
    }
    for (;;) {
      if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0) {
        return fd.release();
      }
      int err = errno;
      if (err == EINTR) continue;
      if (err == EISCONN) return fd.release();  // an interrupted connect completed anyway
      if (err == EAGAIN) {  // listen backlog full: keyd is busy, retry until the deadline
        sleep_slice();
        continue;
      }
      if (err == EINPROGRESS) {
        wait(fd.get(), POLLOUT, "connecting");
        int so_error = 0;
        socklen_t len = sizeof so_error;
        if (::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &so_error, &len) != 0) so_error = errno;
        if (so_error != 0) unavailable(so_error);
        return fd.release();
      }
      unavailable(err);
    }
  }

  void send_all(int fd, const std::vector<uint8_t>& data) {
    size_t done = 0;
    while (done < data.size()) {
      ssize_t n = ::send(fd, data.data() + done, data.size() - done, MSG_NOSIGNAL);
      if (n > 0) {
        done += static_cast<size_t>(n);
        continue;
      }
      int err = errno;
      if (n < 0 && err == EINTR) continue;
      if (n < 0 && (err == EAGAIN || err == EWOULDBLOCK)) {
        wait(fd, POLLOUT, "sending the request");
        continue;
      }
      if (n < 0 && (err == EPIPE || err == ECONNRESET)) {
        // keyd closed early (it refuses peers that way, and closes idle
        // connections); its reason may be queued.
        return;
      }
      throw Error(Errc::Io, std::string("cannot send to colcrypt-keyd at ") + options_.socket_path +
                                ": " + std::strerror(err));
    }
  }

  wire::Frame receive(int fd) {
    wire::FrameReader reader;
    uint8_t buf[4096];
    WipeOnExit wipe{buf, sizeof buf};
    for (;;) {
      if (auto frame = reader.next()) return std::move(*frame);
      ssize_t n = ::recv(fd, buf, sizeof buf, 0);
      if (n > 0) {
        reader.feed(buf, static_cast<size_t>(n));
        received_any_ = true;
        continue;
      }
      int err = errno;
      if (n < 0 && err == EINTR) continue;
      if (n < 0 && (err == EAGAIN || err == EWOULDBLOCK)) {
        wait(fd, POLLIN, "waiting for the reply");
        continue;
      }
      if (n == 0 || err == ECONNRESET) {
        closed_before_reply_ = !received_any_;
        throw Error(Errc::ProtocolError, "colcrypt-keyd at " + options_.socket_path +
                                             " closed the connection without a reply");
      }
      throw Error(Errc::Io, std::string("cannot read from colcrypt-keyd at ") +
                                options_.socket_path + ": " + std::strerror(err));
    }
  }

  // keyd closed the connection before sending any of the reply.
  bool closed_before_reply() const { return closed_before_reply_; }

 private:
  const ClientOptions& options_;
  Clock::time_point deadline_;
  bool received_any_ = false;
  bool closed_before_reply_ = false;
};

// A kept connection is usable if keyd has not closed it (idle timeout,
// restart) and sent nothing unasked.
bool still_open(int fd) {
  struct pollfd pfd {
    fd, POLLIN, 0
  };
  return ::poll(&pfd, 1, 0) == 0;
}

[[noreturn]] void throw_failure(const wire::Frame& frame) {
  wire::FailureReply failure = wire::decode_failure(ByteView(frame.body));
  std::string message =
      failure.message.empty() ? "colcrypt-keyd refused the request" : failure.message;
  switch (failure.code) {
    case wire::FailureCode::NotFound:
      throw Error(Errc::KeyNotFound, message);
    case wire::FailureCode::Denied:
      throw Error(Errc::PermissionDenied, message);
    case wire::FailureCode::KeyUnavailable:
      throw Error(Errc::KeyUnavailable, message);
    case wire::FailureCode::AlreadyExists:
      throw Error(Errc::AlreadyExists, message);
    case wire::FailureCode::BadRequest:
      throw Error(Errc::InvalidArgument, message);
    case wire::FailureCode::Unavailable:
      throw Error(Errc::Io, message);
    case wire::FailureCode::Internal:
      throw Error(Errc::Internal, message);
  }
  throw Error(Errc::Internal, message);  // a code newer than this client
}

wire::KeyReply expect_key(wire::Frame& frame) {
  WipeOnExit wipe{frame.body.data(), frame.body.size()};
  if (frame.type == wire::MsgType::Failure) throw_failure(frame);
  if (frame.type != wire::MsgType::Key) {
    throw Error(Errc::ProtocolError, "colcrypt-keyd sent an unexpected reply type");
  }
  return wire::decode_key_reply(ByteView(frame.body));
}

}  // namespace

Client::Client(ClientOptions options) : options_(std::move(options)) {}

Client::~Client() { disconnect(); }

void Client::set_options(ClientOptions options) {
  if (options.socket_path != options_.socket_path || options.keyd_uid != options_.keyd_uid) {
    disconnect();
    first_uid_.reset();
  }
  options_ = std::move(options);
}

// An impostor that bound the socket path (keyd down, a writable directory)
// would receive key requests and could serve chosen keys; the kernel tells
// who listens on the other end.
void Client::check_peer(int fd) {
  struct ucred cred {};
  socklen_t len = sizeof cred;
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 || len != sizeof cred) {
    const int err = errno;
    throw UntrustedKeyd("cannot tell who serves colcrypt-keyd's socket " + options_.socket_path +
                        " (SO_PEERCRED: " + std::strerror(err) + ")");
  }
  const uid_t peer = cred.uid;
  const std::string serving = "colcrypt-keyd's socket " + options_.socket_path +
                              " is served by uid " + std::to_string(peer);
  if (options_.keyd_uid) {
    if (peer != *options_.keyd_uid)
      throw UntrustedKeyd(serving + ", not by the expected keyd uid " +
                          std::to_string(*options_.keyd_uid));
    return;
  }
  const uid_t self = ::geteuid();
  if (peer != 0 && peer != self)
    throw UntrustedKeyd(serving + ", neither root nor this process's uid " + std::to_string(self) +
                        ", and no keyd uid is configured");
  if (first_uid_ && peer != *first_uid_)
    throw UntrustedKeyd(serving + ", but by uid " + std::to_string(*first_uid_) +
                        " at this client's first connection");
  first_uid_ = peer;
}

void Client::disconnect() noexcept {
  if (fd_ >= 0) ::close(fd_);  // in a forked child this leaves the parent's connection open
  fd_ = -1;
}

wire::Frame Client::exchange(const std::vector<uint8_t>& request, Retry retry) {
  // A request that must not be sent twice goes on a new connection: "closed
  // without a reply" then means keyd failed it, never an idle close racing it.
  if (fd_ >= 0 && (retry == Retry::Never || pid_ != ::getpid() || !still_open(fd_))) disconnect();
  Exchange ex(options_);
  const bool kept = fd_ >= 0;
  for (int attempt = 0;; ++attempt) {
    try {
      if (fd_ < 0) {
        fd_ = ex.connect_socket();
        pid_ = ::getpid();
        check_peer(fd_);
      }
      ex.send_all(fd_, request);
      return ex.receive(fd_);
    } catch (...) {
      // A reply may still be on its way: the connection is never used again.
      disconnect();
      if (!(kept && attempt == 0 && retry == Retry::OnStaleConnection && ex.closed_before_reply()))
        throw;
    }
  }
}

wire::KeyReply Client::fetch_primary(std::string_view name, wire::FetchPurpose purpose) {
  wire::Frame frame = exchange(wire::encode_fetch_primary(name, purpose), Retry::OnStaleConnection);
  wire::KeyReply reply = expect_key(frame);
  if (reply.name != name) {
    throw Error(Errc::ProtocolError, "colcrypt-keyd answered with a different key");
  }
  return reply;
}

wire::KeyGrantReply Client::fetch_primary_block(std::string_view name, uint32_t wanted) {
  wire::Frame frame =
      exchange(wire::encode_fetch_primary_block(name, wanted), Retry::OnStaleConnection);
  WipeOnExit wipe{frame.body.data(), frame.body.size()};
  if (frame.type == wire::MsgType::Failure) throw_failure(frame);
  if (frame.type != wire::MsgType::KeyGrant) {
    throw Error(Errc::ProtocolError, "colcrypt-keyd sent an unexpected reply type");
  }
  wire::KeyGrantReply reply = wire::decode_key_grant(ByteView(frame.body));
  if (reply.key.name != name) {
    throw Error(Errc::ProtocolError, "colcrypt-keyd answered with a different key");
  }
  // A lookup (wanted 0) is granted nothing; a block request at least one use
  // and never more than it asked for.
  if (reply.granted > wanted || (reply.granted == 0) != (wanted == 0)) {
    throw Error(Errc::ProtocolError, "colcrypt-keyd granted " + std::to_string(reply.granted) +
                                         " uses for a request of " + std::to_string(wanted));
  }
  return reply;
}

wire::KeyReply Client::fetch_version(const KeyId& id, uint32_t version,
                                     wire::FetchPurpose purpose) {
  wire::Frame frame =
      exchange(wire::encode_fetch_version(id, version, purpose), Retry::OnStaleConnection);
  wire::KeyReply reply = expect_key(frame);
  if (reply.id != id || reply.version != version) {
    throw Error(Errc::ProtocolError, "colcrypt-keyd answered with a different key");
  }
  return reply;
}

void Client::report_denial(const wire::DenialReport& report) {
  wire::Frame frame = exchange(wire::encode_denial_report(report), Retry::OnStaleConnection);
  if (frame.type == wire::MsgType::Failure) throw_failure(frame);
  if (frame.type != wire::MsgType::Ack || !frame.body.empty()) {
    throw Error(Errc::ProtocolError, "colcrypt-keyd sent an unexpected reply type");
  }
}

std::string Client::admin(std::string_view json_request) {
  wire::Frame frame = exchange(wire::encode_admin(json_request), Retry::Never);
  if (frame.type == wire::MsgType::Failure) throw_failure(frame);
  if (frame.type != wire::MsgType::AdminResult) {
    throw Error(Errc::ProtocolError, "colcrypt-keyd sent an unexpected reply type");
  }
  return std::string(frame.body.begin(), frame.body.end());
}

std::optional<uid_t> keyd_uid_from(const std::string& text) {
  std::string name = text;
  if (name.empty()) {
    const char* env = std::getenv("COLCRYPT_KEYD_UID");
    if (env != nullptr) name = env;
  }
  if (name.empty()) return std::nullopt;
  if (std::isdigit(static_cast<unsigned char>(name[0]))) {
    char* end = nullptr;
    errno = 0;
    const unsigned long n = std::strtoul(name.c_str(), &end, 10);
    if (errno != 0 || *end != '\0' || n > 0x7fffffffUL)
      throw Error(Errc::InvalidArgument, "--keyd-uid: invalid uid " + name);
    return static_cast<uid_t>(n);
  }
  if (const struct passwd* pw = ::getpwnam(name.c_str())) return pw->pw_uid;
  throw Error(Errc::InvalidArgument, "--keyd-uid: unknown user " + name);
}

}  // namespace colcrypt::client
