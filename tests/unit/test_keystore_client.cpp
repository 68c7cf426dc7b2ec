// The keyd client against scripted fake keyds: error mapping, deadlines,
// cancellation and the connect error message.
#include <poll.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "client/client.hpp"
#include "core/error.hpp"
#include "core/wire.hpp"
#include "fake_keyd.hpp"

using namespace colcrypt;
using colcrypt::client::Client;
using colcrypt::client::ClientOptions;
using colcrypt::test::Answer;
using colcrypt::test::FakeKeyd;

namespace {

// A key reply for whatever version a FetchVersion asked for.
std::vector<uint8_t> echo_version(const wire::Frame& request) {
  wire::KeyReply r;
  wire::decode_fetch_version(ByteView(request.body), r.id, r.version);
  r.state = wire::KeyState::Active;
  r.name = "k";
  r.key = SecretBytes(32);
  SecretBytes frame = wire::encode_key_reply(r);
  return std::vector<uint8_t>(frame.data(), frame.data() + frame.size());
}

std::vector<uint8_t> admin_ok(const wire::Frame&) {
  return wire::encode_frame(wire::MsgType::AdminResult, ByteView::of("{}"));
}

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

TEST_CASE("keyd client: exchanges share one connection", "[keystore][client]") {
  FakeKeyd keyd(echo_version);
  Client client(options_for(keyd.path()));
  const KeyId id = new_key_id();
  for (uint32_t v = 1; v <= 3; ++v) CHECK(client.fetch_version(id, v).version == v);
  CHECK(keyd.requests() == 3);
  CHECK(keyd.connections() == 1);
  client.disconnect();
  CHECK(client.fetch_version(id, 4).version == 4);
  CHECK(keyd.connections() == 2);
}

TEST_CASE("keyd client: a connection keyd closed is replaced", "[keystore][client]") {
  // keyd closes after each reply (as after its idle timeout): the next
  // exchange finds the connection closed, before or after sending on it.
  FakeKeyd keyd([](const wire::Frame& f) {
    return Answer(f.type == wire::MsgType::Admin ? admin_ok(f) : echo_version(f), true);
  });
  Client client(options_for(keyd.path()));
  const KeyId id = new_key_id();
  for (uint32_t v = 1; v <= 5; ++v) CHECK(client.fetch_version(id, v).version == v);
  CHECK(client.admin("{\"op\":\"status\"}") == "{}");
  CHECK(keyd.connections() == 6);
}

TEST_CASE("keyd client: a fetch is sent again when keyd closes without a reply; admin is not",
          "[keystore][client]") {
  // The second request is dropped unanswered (for a fetch: keyd's idle
  // timeout closing the kept connection just as the request arrived).
  std::atomic<int> seen{0};
  auto dropping_second = [&](std::vector<uint8_t> (*reply)(const wire::Frame&)) {
    return [&seen, reply](const wire::Frame& f) {
      return ++seen == 2 ? Answer({}, true) : Answer(reply(f));
    };
  };
  const KeyId id = new_key_id();
  SECTION("fetch") {
    FakeKeyd keyd(dropping_second(echo_version));
    Client client(options_for(keyd.path()));
    CHECK(client.fetch_version(id, 1).version == 1);
    CHECK(client.fetch_version(id, 2).version == 2);
    CHECK(keyd.requests() == 3);
    CHECK(keyd.connections() == 2);
  }
  SECTION("admin") {
    FakeKeyd keyd(dropping_second(admin_ok));
    Client client(options_for(keyd.path()));
    CHECK(client.admin("{\"op\":\"rotate\",\"name\":\"k\"}") == "{}");
    std::string message;
    CHECK(error_of([&] { client.admin("{\"op\":\"rotate\",\"name\":\"k\"}"); }, &message) ==
          Errc::ProtocolError);
    CHECK_THAT(message, Catch::Contains("closed the connection without a reply"));
    CHECK(keyd.requests() == 2);  // never sent twice
    CHECK(client.admin("{\"op\":\"status\"}") == "{}");
    CHECK(keyd.connections() == 3);  // each admin request on a new connection
  }
}

TEST_CASE("keyd client: after a timeout the late reply is never taken for the next one",
          "[keystore][client]") {
  FakeKeyd keyd([](const wire::Frame& f) {
    wire::KeyReply r;
    wire::decode_fetch_version(ByteView(f.body), r.id, r.version);
    if (r.version == 1) std::this_thread::sleep_for(std::chrono::milliseconds(400));
    return Answer(echo_version(f));
  });
  Client client(options_for(keyd.path(), 150));
  const KeyId id = new_key_id();
  CHECK(error_of([&] { client.fetch_version(id, 1); }) == Errc::KeydTimeout);
  client.set_options(options_for(keyd.path(), 2000));  // same socket: the options only
  CHECK(client.fetch_version(id, 2).version == 2);
  CHECK(keyd.connections() == 2);
}

TEST_CASE("keyd client: a forked child opens its own connection", "[keystore][client]") {
  FakeKeyd keyd(echo_version);
  Client client(options_for(keyd.path()));
  const KeyId id = new_key_id();
  CHECK(client.fetch_version(id, 1).version == 1);
  pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    bool ok = false;
    try {
      ok = client.fetch_version(id, 2).version == 2;
    } catch (...) {
    }
    ::_exit(ok ? 0 : 1);
  }
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  CHECK((WIFEXITED(status) && WEXITSTATUS(status) == 0));
  CHECK(client.fetch_version(id, 3).version == 3);  // the parent's connection still works
  CHECK(keyd.requests() == 3);
  CHECK(keyd.connections() == 2);
}

namespace {

constexpr uid_t kNobody = 65534;

// The message of the UntrustedKeyd that f throws ("" and a failed check if it
// throws none or another error).
std::string untrusted_message(const std::function<void()>& f) {
  try {
    f();
  } catch (const client::UntrustedKeyd& e) {
    CHECK(e.code() == Errc::KeydUnavailable);
    return e.what();
  } catch (const Error& e) {
    FAIL("another error: " << e.what());
  }
  FAIL("no error");
  return "";
}

}  // namespace

TEST_CASE("keyd client: a socket served by another uid than keyd_uid is refused, nothing sent",
          "[keystore][client][peer]") {
  FakeKeyd keyd(admin_ok);
  const uid_t self = ::geteuid();
  ClientOptions options = options_for(keyd.path());
  options.keyd_uid = self + 1;
  Client client(options);
  CHECK(untrusted_message([&] { client.admin("{}"); }) ==
        "colcrypt-keyd's socket " + keyd.path() + " is served by uid " + std::to_string(self) +
            ", not by the expected keyd uid " + std::to_string(self + 1));
  options.keyd_uid = self;
  client.set_options(options);
  CHECK(client.admin("{}") == "{}");
  CHECK(keyd.requests() == 1);  // the refused connection sent nothing
  CHECK(keyd.connections() == 2);
}

TEST_CASE("keyd client: without keyd_uid, only root or the client's own uid may serve",
          "[keystore][client][peer]") {
  if (::geteuid() != 0) {
    WARN("not root: cannot run a fake keyd as another uid");
    return;
  }
  // A keyd listening as uid nobody (the kernel records the uid at listen()).
  REQUIRE(::seteuid(kNobody) == 0);
  std::optional<FakeKeyd> keyd;
  try {
    keyd.emplace(admin_ok);
  } catch (...) {
    REQUIRE(::seteuid(0) == 0);
    throw;
  }
  REQUIRE(::seteuid(0) == 0);

  Client client(options_for(keyd->path()));
  CHECK(untrusted_message([&] { client.admin("{}"); }) ==
        "colcrypt-keyd's socket " + keyd->path() +
            " is served by uid 65534, neither root nor this process's uid 0, and no keyd uid is "
            "configured");
  ClientOptions expected = options_for(keyd->path());
  expected.keyd_uid = kNobody;  // configured: that uid is keyd's
  client.set_options(expected);
  CHECK(client.admin("{}") == "{}");
  CHECK(keyd->requests() == 1);
}

TEST_CASE("keyd client: without keyd_uid, the uid of the first connection may not change",
          "[keystore][client][peer]") {
  if (::geteuid() != 0) {
    WARN("not root: cannot switch uids");
    return;
  }
  // In a child running as nobody (root is trusted too, and nobody is its own
  // uid): first a keyd of uid nobody, then one of root on the same path.
  pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    int result = 10;
    try {
      if (::seteuid(kNobody) != 0) ::_exit(2);
      std::string path;
      std::string dir;
      std::optional<Client> client;
      {
        FakeKeyd keyd(admin_ok);
        path = keyd.path();
        dir = path.substr(0, path.rfind('/'));
        client.emplace(options_for(path));
        if (client->admin("{}") != "{}") ::_exit(3);
      }  // keyd gone, its directory too
      if (::seteuid(0) != 0) ::_exit(4);
      if (::mkdir(dir.c_str(), 0755) != 0) ::_exit(5);
      const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
      sockaddr_un addr{};
      addr.sun_family = AF_UNIX;
      std::strncpy(addr.sun_path, path.c_str(), sizeof addr.sun_path - 1);
      if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
          ::listen(fd, 4) != 0 || ::chmod(path.c_str(), 0666) != 0)
        ::_exit(6);
      if (::seteuid(kNobody) != 0) ::_exit(7);
      try {
        client->admin("{}");
        result = 8;  // accepted
      } catch (const client::UntrustedKeyd& e) {
        const std::string expected = "colcrypt-keyd's socket " + path +
                                     " is served by uid 0, but by uid 65534 at this client's "
                                     "first connection";
        result = e.what() == expected ? 0 : 9;
        if (result != 0) std::fprintf(stderr, "unexpected message: %s\n", e.what());
      }
      if (::seteuid(0) != 0) ::_exit(11);
      ::close(fd);
      ::unlink(path.c_str());
      ::rmdir(dir.c_str());
    } catch (const std::exception& e) {
      std::fprintf(stderr, "child failed: %s\n", e.what());
      result = 12;
    }
    ::_exit(result);
  }
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
}
