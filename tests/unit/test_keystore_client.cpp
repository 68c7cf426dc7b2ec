// The keyd client against scripted fake keyds: error mapping, deadlines,
// cancellation and the connect error message.
#include <poll.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "core/error.hpp"
#include "core/wire.hpp"
#include "keyd/client.hpp"

using namespace colcrypt;
using colcrypt::keyd::Client;
using colcrypt::keyd::ClientOptions;

namespace {

// A one-connection fake keyd: accepts, reads one request frame, hands it to
// `respond`, writes what it returns (nothing: stay silent until stopped).
class FakeKeyd {
 public:
  using Responder = std::function<std::vector<uint8_t>(const wire::Frame&)>;

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
    ::close(listen_fd_);
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  const std::string& path() const { return path_; }
  wire::MsgType request_type() const { return request_type_; }

 private:
  bool wait_readable(int fd) {
    while (!stop_) {
      pollfd p{fd, POLLIN, 0};
      if (::poll(&p, 1, 20) > 0) return true;
    }
    return false;
  }
  void serve() {
    if (!wait_readable(listen_fd_)) return;
    int fd = ::accept(listen_fd_, nullptr, nullptr);
    wire::FrameReader reader;
    std::optional<wire::Frame> frame;
    while (!frame && wait_readable(fd)) {
      uint8_t buf[512];
      ssize_t n = ::read(fd, buf, sizeof buf);
      if (n <= 0) break;
      reader.feed(buf, static_cast<size_t>(n));
      frame = reader.next();
    }
    if (frame) {
      request_type_ = frame->type;
      std::vector<uint8_t> reply = respond_(*frame);
      if (!reply.empty()) {
        ssize_t ignored = ::write(fd, reply.data(), reply.size());
        (void)ignored;
      }
    }
    while (!stop_) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    ::close(fd);
  }

  Responder respond_;
  std::string dir_, path_;
  int listen_fd_ = -1;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::atomic<wire::MsgType> request_type_{wire::MsgType::Failure};
};

ClientOptions options_for(const std::string& path, int timeout_ms = 2000) {
  ClientOptions o;
  o.socket_path = path;
  o.timeout_ms = timeout_ms;
  return o;
}

Errc error_of(const std::function<void()>& f, std::string* message = nullptr) {
  try {
    f();
  } catch (const Error& e) {
    if (message) *message = e.what();
    return e.code();
  }
  FAIL("no error");
  return Errc::Internal;
}

}  // namespace

TEST_CASE("keyd client: connect failure names the socket", "[keystore][client]") {
  Client client(options_for("/nonexistent/colcrypt/keyd.sock"));
  std::string message;
  CHECK(error_of([&] { client.fetch_primary("k"); }, &message) == Errc::KeydUnavailable);
  CHECK(message ==
        "cannot connect to colcrypt-keyd at /nonexistent/colcrypt/keyd.sock: No such file or "
        "directory");
}

TEST_CASE("keyd client: key replies", "[keystore][client]") {
  KeyId id = new_key_id();
  FakeKeyd keyd([&](const wire::Frame&) {
    wire::KeyReply r;
    r.id = id;
    r.version = 7;
    r.state = wire::KeyState::DecryptOnly;
    r.name = "ssn";
    r.key = SecretBytes(32);
    std::memset(r.key.data(), 0xAB, 32);
    SecretBytes frame = wire::encode_key_reply(r);
    return std::vector<uint8_t>(frame.data(), frame.data() + frame.size());
  });
  Client client(options_for(keyd.path()));
  wire::KeyReply r = client.fetch_version(id, 7);
  CHECK(keyd.request_type() == wire::MsgType::FetchVersion);
  CHECK(r.id == id);
  CHECK(r.version == 7);
  CHECK(r.state == wire::KeyState::DecryptOnly);
  CHECK(r.name == "ssn");
  REQUIRE(r.key.size() == 32);
  CHECK(r.key.data()[31] == 0xAB);
}

TEST_CASE("keyd client: a reply for another key is a protocol error", "[keystore][client]") {
  FakeKeyd keyd([&](const wire::Frame&) {
    wire::KeyReply r;
    r.id = new_key_id();
    r.version = 1;
    r.name = "other";
    r.key = SecretBytes(32);
    SecretBytes frame = wire::encode_key_reply(r);
    return std::vector<uint8_t>(frame.data(), frame.data() + frame.size());
  });
  Client client(options_for(keyd.path()));
  CHECK(error_of([&] { client.fetch_primary("ssn"); }) == Errc::ProtocolError);
}

TEST_CASE("keyd client: failure replies map to error codes", "[keystore][client]") {
  const std::vector<std::pair<wire::FailureCode, Errc>> cases = {
      {wire::FailureCode::NotFound, Errc::KeyNotFound},
      {wire::FailureCode::Denied, Errc::PermissionDenied},
      {wire::FailureCode::KeyUnavailable, Errc::KeyUnavailable},
      {wire::FailureCode::AlreadyExists, Errc::AlreadyExists},
      {wire::FailureCode::BadRequest, Errc::InvalidArgument},
      {wire::FailureCode::Unavailable, Errc::Io},
      {wire::FailureCode::Internal, Errc::Internal},
  };
  for (const auto& [code, errc] : cases) {
    FakeKeyd keyd([code = code](const wire::Frame&) {
      return wire::encode_failure(code, "key 'ssn' says no");
    });
    Client client(options_for(keyd.path()));
    std::string message;
    CHECK(error_of([&] { client.admin("{\"op\":\"list\"}"); }, &message) == errc);
    CHECK(message == "key 'ssn' says no");
    CHECK(keyd.request_type() == wire::MsgType::Admin);
  }
}

TEST_CASE("keyd client: admin replies", "[keystore][client]") {
  FakeKeyd keyd([](const wire::Frame& f) {
    CHECK(std::string(f.body.begin(), f.body.end()) == "{\"op\":\"status\"}");
    return wire::encode_admin_result("{\"locked\":false}");
  });
  Client client(options_for(keyd.path()));
  CHECK(client.admin("{\"op\":\"status\"}") == "{\"locked\":false}");
}

TEST_CASE("keyd client: a silent keyd times out", "[keystore][client]") {
  FakeKeyd keyd([](const wire::Frame&) { return std::vector<uint8_t>{}; });
  ClientOptions o = options_for(keyd.path(), 300);
  int calls = 0;
  o.interrupted = [&] {
    ++calls;
    return false;
  };
  Client client(o);
  auto start = std::chrono::steady_clock::now();
  std::string message;
  CHECK(error_of([&] { client.fetch_primary("k"); }, &message) == Errc::KeydTimeout);
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() -
                                                                  start)
                .count();
  CHECK(ms >= 290);
  CHECK(ms < 2000);
  CHECK(calls >= 3);  // polled in slices of at most 100 ms
  CHECK_THAT(message, Catch::Contains(keyd.path()));
}

TEST_CASE("keyd client: the interrupt callback cancels a wait", "[keystore][client]") {
  FakeKeyd keyd([](const wire::Frame&) { return std::vector<uint8_t>{}; });
  ClientOptions o = options_for(keyd.path(), 10000);
  auto start = std::chrono::steady_clock::now();
  o.interrupted = [&] {
    return std::chrono::steady_clock::now() - start > std::chrono::milliseconds(150);
  };
  Client client(o);
  CHECK(error_of([&] { client.fetch_primary("k"); }) == Errc::Cancelled);
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::milliseconds(1000));
}

TEST_CASE("keyd client: a malformed reply frame", "[keystore][client]") {
  FakeKeyd keyd([](const wire::Frame&) {
    return std::vector<uint8_t>{0, 0, 0, 0};  // a frame of length 0: malformed
  });
  Client client(options_for(keyd.path()));
  CHECK(error_of([&] { client.fetch_primary("k"); }) == Errc::ProtocolError);
}
