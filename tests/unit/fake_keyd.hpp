// A scripted fake keyd for unit tests of keyd's clients: the keyd client
// itself (test_keystore_client.cpp) and the extension's key cache
// (test_key_cache.cpp).
#pragma once
#include <poll.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "core/wire.hpp"

namespace colcrypt::test {

// What a fake keyd does with one request: write `reply` (if any), then keep
// the connection (close_after false) or close it. No reply and no close: stay
// silent until stopped.
struct Answer {
  Answer(std::vector<uint8_t> r, bool close = false)  // NOLINT: lambdas return the reply bytes
      : reply(std::move(r)), close_after(close) {}
  std::vector<uint8_t> reply;
  bool close_after;
};

// A scripted fake keyd: serves each connection on a thread of its own, reads
// request frames from it and hands them to `respond`.
class FakeKeyd {
 public:
  using Responder = std::function<Answer(const wire::Frame&)>;

  explicit FakeKeyd(Responder respond) : respond_(std::move(respond)) {
    char pattern[] = "/tmp/colcrypt-client-test-XXXXXX";
    if (!::mkdtemp(pattern)) throw std::runtime_error("mkdtemp failed");
    dir_ = pattern;
    path_ = dir_ + "/keyd.sock";
    listen_fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path_.c_str(), sizeof addr.sun_path - 1);
    if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
        ::listen(listen_fd_, 4) != 0) {
      throw std::runtime_error("bind/listen failed");
    }
    thread_ = std::thread([this] { serve(); });
  }
  ~FakeKeyd() {
    stop_ = true;
    thread_.join();
    for (auto& t : connection_threads_) t.join();
    ::close(listen_fd_);
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  const std::string& path() const { return path_; }
  wire::MsgType request_type() const { return request_type_; }
  int connections() const { return connections_; }
  int requests() const { return requests_; }

 private:
  bool wait_readable(int fd) {
    while (!stop_) {
      pollfd p{fd, POLLIN, 0};
      if (::poll(&p, 1, 20) > 0) return true;
    }
    return false;
  }
  void serve() {
    while (wait_readable(listen_fd_)) {
      int fd = ::accept(listen_fd_, nullptr, nullptr);
      if (fd < 0) continue;
      ++connections_;
      connection_threads_.emplace_back([this, fd] {
        serve_connection(fd);
        ::close(fd);
      });
    }
  }
  void serve_connection(int fd) {
    wire::FrameReader reader;
    for (;;) {
      std::optional<wire::Frame> frame = reader.next();
      if (!frame) {
        uint8_t buf[512];
        if (!wait_readable(fd)) return;
        ssize_t n = ::read(fd, buf, sizeof buf);
        if (n <= 0) return;
        reader.feed(buf, static_cast<size_t>(n));
        continue;
      }
      request_type_ = frame->type;
      ++requests_;
      Answer answer = respond_(*frame);
      if (!answer.reply.empty()) {
        ssize_t ignored = ::send(fd, answer.reply.data(), answer.reply.size(), MSG_NOSIGNAL);
        (void)ignored;
      }
      if (answer.close_after) return;
      if (answer.reply.empty()) {
        while (!stop_) std::this_thread::sleep_for(std::chrono::milliseconds(5));
        return;
      }
    }
  }

  Responder respond_;
  std::string dir_, path_;
  int listen_fd_ = -1;
  std::thread thread_;
  std::vector<std::thread> connection_threads_;  // used by thread_ only, joined after it
  std::atomic<bool> stop_{false};
  std::atomic<wire::MsgType> request_type_{wire::MsgType::Failure};
  std::atomic<int> connections_{0};
  std::atomic<int> requests_{0};
};

}  // namespace colcrypt::test
