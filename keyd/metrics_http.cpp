#include "keyd/metrics_http.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "core/error.hpp"
#include "keyd/log.hpp"
#include "keyd/server.hpp"

namespace colcrypt::keyd {
namespace {

using Clock = std::chrono::steady_clock;

// The socket address of "HOST:PORT", which must be a loopback address.
socklen_t loopback_address(const std::string& text, sockaddr_storage& out) {
  const auto bad = [&](const std::string& why) {
    return Error(Errc::InvalidArgument, "--metrics-listen " + text + ": " + why +
                                            " (use 127.0.0.1:PORT, [::1]:PORT or localhost:PORT)");
  };
  const auto colon = text.rfind(':');
  if (colon == std::string::npos || colon == 0) throw bad("not HOST:PORT");
  std::string host = text.substr(0, colon);
  const std::string port_text = text.substr(colon + 1);
  if (port_text.empty() || port_text.size() > 5 ||
      !std::all_of(port_text.begin(), port_text.end(), [](char c) { return c >= '0' && c <= '9'; }))
    throw bad("the port must be a number from 1 to 65535");
  const long port = std::stol(port_text);
  if (port < 1 || port > 65535) throw bad("the port must be a number from 1 to 65535");
  std::memset(&out, 0, sizeof out);
  if (host == "localhost") host = "127.0.0.1";
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') {
    auto* a6 = reinterpret_cast<sockaddr_in6*>(&out);
    a6->sin6_family = AF_INET6;
    a6->sin6_port = htons(static_cast<uint16_t>(port));
    if (::inet_pton(AF_INET6, host.substr(1, host.size() - 2).c_str(), &a6->sin6_addr) != 1)
      throw bad("not an IPv6 address");
    if (!IN6_IS_ADDR_LOOPBACK(&a6->sin6_addr)) throw bad("not a loopback address");
    return sizeof(sockaddr_in6);
  }
  auto* a4 = reinterpret_cast<sockaddr_in*>(&out);
  a4->sin_family = AF_INET;
  a4->sin_port = htons(static_cast<uint16_t>(port));
  if (::inet_pton(AF_INET, host.c_str(), &a4->sin_addr) != 1) throw bad("not an IP address");
  if ((ntohl(a4->sin_addr.s_addr) >> 24) != 127) throw bad("not a loopback address");
  return sizeof(sockaddr_in);
}

std::string http_reply(const char* status, const std::string& content_type,
                       const std::string& body) {
  return std::string("HTTP/1.0 ") + status + "\r\nContent-Type: " + content_type +
         "\r\nContent-Length: " + std::to_string(body.size()) +
         "\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n" + body;
}

// After the reply: ends the sending side, and reads (without waiting) what
// the scraper sent and keyd did not read: unread data would make close()
// reset the connection, and the scraper could lose the reply.
void finish(int fd) {
  ::shutdown(fd, SHUT_WR);
  char drain[2048];
  for (size_t total = 0; total < 4 * MetricsHttp::kMaxRequestBytes;) {
    ssize_t n = ::recv(fd, drain, sizeof drain, MSG_DONTWAIT);
    if (n <= 0) break;
    total += static_cast<size_t>(n);
  }
}

std::string plain(const char* status, const std::string& text) {
  return http_reply(status, "text/plain; charset=utf-8", text + "\n");
}

}  // namespace

void MetricsHttp::check_address(const std::string& text) {
  sockaddr_storage ignored{};
  loopback_address(text, ignored);
}

MetricsHttp::MetricsHttp(std::string address) : address_(std::move(address)) {}

MetricsHttp::~MetricsHttp() {
  for (auto& c : connections_) ::close(c.fd);
  if (listen_fd_ >= 0) ::close(listen_fd_);
}

void MetricsHttp::listen() {
  sockaddr_storage addr{};
  const socklen_t len = loopback_address(address_, addr);
  int fd = ::socket(addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    int err = errno;
    throw Error(Errc::Io, std::string("cannot create the metrics socket: ") + std::strerror(err));
  }
  int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (::bind(fd, reinterpret_cast<const sockaddr*>(&addr), len) != 0 || ::listen(fd, 16) != 0) {
    int err = errno;
    ::close(fd);
    throw SocketUnavailable("cannot listen for metrics on " + address_ + ": " + std::strerror(err));
  }
  listen_fd_ = fd;
  log_info("serving metrics on http://" + address_ + "/metrics");
}

void MetricsHttp::add_pollfds(std::vector<pollfd>& fds, Clock::time_point& deadline) const {
  fds.push_back({listen_fd_, POLLIN, 0});
  for (const auto& c : connections_) {
    fds.push_back({c.fd, static_cast<short>(c.replying ? POLLOUT : POLLIN), 0});
    deadline = std::min(deadline, c.started + std::chrono::milliseconds(kTimeoutMs));
  }
}

void MetricsHttp::handle(const pollfd* polled, const std::function<std::string()>& render) {
  for (size_t i = 0; i < connections_.size(); ++i) {
    Connection& c = connections_[i];
    const short revents = polled[1 + i].revents;
    if (revents & (POLLERR | POLLNVAL)) {
      c.done = true;
    } else if (c.replying && (revents & (POLLOUT | POLLHUP))) {
      write_reply(c);
    } else if (!c.replying && (revents & (POLLIN | POLLHUP))) {
      read_request(c, render);
    }
  }
  const auto now = Clock::now();
  for (auto& c : connections_) {
    if (!c.done && now - c.started >= std::chrono::milliseconds(kTimeoutMs)) {
      log_debug("metrics: dropping a scraper that took longer than " + std::to_string(kTimeoutMs) +
                " ms");
      c.done = true;
    }
  }
  connections_.erase(std::remove_if(connections_.begin(), connections_.end(),
                                    [](const Connection& c) {
                                      if (c.done) ::close(c.fd);
                                      return c.done;
                                    }),
                     connections_.end());
  if (polled[0].revents & POLLIN) accept_all();
}

void MetricsHttp::accept_all() {
  for (;;) {
    int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      int err = errno;
      if (err == EINTR || err == ECONNABORTED || err == EPROTO) continue;
      if (err != EAGAIN && err != EWOULDBLOCK) {
        log_warning(std::string("metrics: accept failed: ") + std::strerror(err));
      }
      return;
    }
    if (connections_.size() >= kMaxConnections) {
      // Best effort, never blocks: the reply fits an empty socket buffer.
      const std::string busy = plain("503 Service Unavailable", "too many metrics scrapers");
      ssize_t ignored = ::send(fd, busy.data(), busy.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
      (void)ignored;
      finish(fd);
      ::close(fd);
      log_debug("metrics: refused a scraper (" + std::to_string(kMaxConnections) +
                " already connected)");
      continue;
    }
    Connection c;
    c.fd = fd;
    c.started = Clock::now();
    connections_.push_back(std::move(c));
  }
}

void MetricsHttp::read_request(Connection& c, const std::function<std::string()>& render) {
  char buf[2048];
  for (;;) {
    ssize_t n = ::recv(c.fd, buf, sizeof buf, 0);
    if (n > 0) {
      c.request.append(buf, static_cast<size_t>(n));
      if (c.request.size() > kMaxRequestBytes) break;
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    if (c.request.find("\r\n\r\n") == std::string::npos &&
        c.request.find("\n\n") == std::string::npos) {
      c.done = true;  // closed (or failed) before a whole request
      return;
    }
    break;
  }
  const bool too_large = c.request.size() > kMaxRequestBytes;
  const bool whole = c.request.find("\r\n\r\n") != std::string::npos ||
                     c.request.find("\n\n") != std::string::npos;
  if (!too_large && !whole) return;  // more to come
  if (too_large) {
    c.reply = plain("431 Request Header Fields Too Large", "request too large");
  } else {
    // "METHOD TARGET HTTP/x.y"
    const std::string line = c.request.substr(0, c.request.find_first_of("\r\n"));
    const auto sp1 = line.find(' ');
    const auto sp2 = sp1 == std::string::npos ? sp1 : line.find(' ', sp1 + 1);
    if (sp2 == std::string::npos || line.compare(sp2 + 1, 5, "HTTP/") != 0) {
      c.reply = plain("400 Bad Request", "not an HTTP request");
    } else {
      const std::string method = line.substr(0, sp1);
      const std::string target = line.substr(sp1 + 1, sp2 - sp1 - 1);
      const std::string path = target.substr(0, target.find('?'));
      if (method != "GET") {
        c.reply = plain("405 Method Not Allowed", "only GET");
      } else if (path != "/metrics") {
        c.reply = plain("404 Not Found", "colcrypt-keyd serves /metrics only");
      } else {
        c.reply = http_reply("200 OK", "text/plain; version=0.0.4; charset=utf-8", render());
      }
    }
  }
  c.request.clear();
  c.replying = true;
  write_reply(c);
}

void MetricsHttp::write_reply(Connection& c) {
  while (c.sent < c.reply.size()) {
    ssize_t n = ::send(c.fd, c.reply.data() + c.sent, c.reply.size() - c.sent, MSG_NOSIGNAL);
    if (n > 0) {
      c.sent += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;  // POLLOUT later
    c.done = true;
    return;
  }
  finish(c.fd);
  c.done = true;
}

}  // namespace colcrypt::keyd
