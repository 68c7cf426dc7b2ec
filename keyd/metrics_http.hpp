// colcrypt-keyd's optional Prometheus endpoint (--metrics-listen): HTTP/1.0
// "GET /metrics" on a loopback TCP address, served from keyd's poll loop
// with non-blocking sockets. A request is at most kMaxRequestBytes, at most
// kMaxConnections scrapers are served at once (more are closed at accept),
// and a scraper that neither sends its request nor reads the reply within
// kTimeoutMs is dropped: a slow or hostile scraper never holds up key
// fetches. Each connection carries one request (HTTP/1.0, Connection: close).
#pragma once
#include <poll.h>
#include <sys/socket.h>

#include <chrono>
#include <functional>
#include <string>
#include <vector>

namespace colcrypt::keyd {

class MetricsHttp {
 public:
  static constexpr size_t kMaxConnections = 8;
  static constexpr size_t kMaxRequestBytes = 8192;
  static constexpr int kTimeoutMs = 5000;

  // Checks "HOST:PORT": HOST is 127.x.y.z, [::1] or localhost, PORT 1 to
  // 65535. Throws Error(InvalidArgument) for anything else (other addresses
  // are refused: the metrics name keys and tell about their use).
  static void check_address(const std::string& text);

  explicit MetricsHttp(std::string address);
  ~MetricsHttp();
  MetricsHttp(const MetricsHttp&) = delete;
  MetricsHttp& operator=(const MetricsHttp&) = delete;

  // Binds and listens. Throws SocketUnavailable when the address cannot be
  // bound (in use), Error(InvalidArgument) when it is not allowed.
  void listen();
  const std::string& address() const { return address_; }

  // Appends the descriptors to poll (the listening socket first) and lowers
  // deadline to the next timeout of a connection.
  void add_pollfds(std::vector<pollfd>& fds, std::chrono::steady_clock::time_point& deadline) const;
  // polled: the entries add_pollfds appended, after poll(). render makes the
  // metrics text when a request for /metrics is complete.
  void handle(const pollfd* polled, const std::function<std::string()>& render);

 private:
  struct Connection {
    int fd = -1;
    std::string request;
    std::string reply;
    size_t sent = 0;
    bool replying = false;
    bool done = false;
    std::chrono::steady_clock::time_point started;
  };
  void read_request(Connection& c, const std::function<std::string()>& render);
  void write_reply(Connection& c);
  void accept_all();

  std::string address_;
  int listen_fd_ = -1;
  std::vector<Connection> connections_;
};

}  // namespace colcrypt::keyd
