// keyd's server in-process: a real store and socket, the real client.
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <iterator>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "client/client.hpp"
#include "core/error.hpp"
#include "keyd/log.hpp"
#include "keyd/server.hpp"
#include "keyd/store.hpp"

using namespace colcrypt;
using namespace colcrypt::keyd;
using colcrypt::client::Client;
using colcrypt::client::ClientOptions;
using nlohmann::json;

namespace {

MasterSecret test_password() {
  MasterSecret s;
  s.bytes = SecretBytes(ByteView::of("server test password"));
  return s;
}

// A keyd serving a temp store on a temp socket from a background thread.
class RunningKeyd {
 public:
  RunningKeyd(std::vector<uid_t> allow, std::vector<uid_t> admin, size_t max_connections = 256,
              std::function<void(ServerConfig&)> configure = nullptr)
      : max_connections_(max_connections), configure_(std::move(configure)) {
    char pattern[] = "/tmp/colcrypt-server-test-XXXXXX";
    if (!::mkdtemp(pattern)) throw std::runtime_error("mkdtemp failed");
    dir_ = pattern;
    set_log_level(LogLevel::Error);
    start(std::move(allow), std::move(admin));
  }
  ~RunningKeyd() {
    stop();
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  void start(std::vector<uid_t> allow, std::vector<uid_t> admin) {
    KeyStore store = KeyStore::exists(store_dir())
                         ? KeyStore::open(store_dir(), test_password())
                         : KeyStore::create(store_dir(), test_password(), 1000);
    ServerConfig config;
    config.socket_path = socket_path();
    config.allow_uids = std::move(allow);
    config.admin_uids = std::move(admin);
    config.max_connections = max_connections_;
    if (configure_) configure_(config);
    server_ = std::make_unique<Server>(std::move(config), std::move(store));
    server_->listen();
    result_ = std::async(std::launch::async, [this] { return server_->run(); });
  }
  int stop() {
    if (!server_) return -1;
    request_shutdown();
    int rc = result_.get();
    server_.reset();
    return rc;
  }
  std::string store_dir() const { return dir_ + "/store"; }
  std::string socket_path() const { return dir_ + "/run/keyd.sock"; }
  Client client() const {
    ClientOptions o;
    o.socket_path = socket_path();
    o.timeout_ms = 3000;
    return Client(o);
  }
  json admin(const json& request) const { return json::parse(client().admin(request.dump())); }

 private:
  std::string dir_;
  size_t max_connections_;
  std::function<void(ServerConfig&)> configure_;
  std::unique_ptr<Server> server_;
  std::future<int> result_;
};

std::vector<uint8_t> key_bytes(const wire::KeyReply& r) {
  return std::vector<uint8_t>(r.key.data(), r.key.data() + r.key.size());
}

Errc error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.code();
  }
  FAIL("no error");
  return Errc::Internal;
}

// Sends raw bytes and returns what keyd answers before closing (or 1 s).
std::vector<uint8_t> raw_exchange(const std::string& path, const std::vector<uint8_t>& bytes) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof addr.sun_path - 1);
  REQUIRE(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
  REQUIRE(::write(fd, bytes.data(), bytes.size()) == static_cast<ssize_t>(bytes.size()));
  std::vector<uint8_t> got;
  pollfd p{fd, POLLIN, 0};
  while (::poll(&p, 1, 1000) > 0) {
    uint8_t buf[512];
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n <= 0) {
      got.push_back(0xEE);  // marks "closed by keyd"
      break;
    }
    got.insert(got.end(), buf, buf + n);
  }
  ::close(fd);
  return got;
}

// A raw connection to keyd, for frames sent in pieces.
class RawPeer {
 public:
  explicit RawPeer(const std::string& path)
      : fd_(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)) {
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path.c_str(), sizeof addr.sun_path - 1);
    REQUIRE(::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
  }
  ~RawPeer() { ::close(fd_); }
  RawPeer(const RawPeer&) = delete;
  RawPeer& operator=(const RawPeer&) = delete;
  void send(const std::vector<uint8_t>& bytes, size_t from, size_t to) {
    REQUIRE(::send(fd_, bytes.data() + from, to - from, MSG_NOSIGNAL) ==
            static_cast<ssize_t>(to - from));
  }
  // The next frame keyd sends within timeout_ms; nullopt when keyd closed
  // the connection (or sent nothing).
  std::optional<wire::Frame> next_frame(int timeout_ms) {
    for (;;) {
      if (auto frame = reader_.next()) return frame;
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, timeout_ms) != 1) return std::nullopt;
      uint8_t buf[512];
      ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
      if (n <= 0) return std::nullopt;
      reader_.feed(buf, static_cast<size_t>(n));
    }
  }

 private:
  int fd_;
  wire::FrameReader reader_;
};

}  // namespace

TEST_CASE("keyd server: create, fetch, rotate, restart", "[keystore][server]") {
  const uid_t me = ::geteuid();
  RunningKeyd keyd({me}, {me});

  struct stat st {};
  REQUIRE(::stat(keyd.socket_path().c_str(), &st) == 0);
  CHECK(S_ISSOCK(st.st_mode));
  CHECK((st.st_mode & 0777) == 0600);

  json created = keyd.admin({{"op", "create"}, {"name", "ssn"}, {"rotation_interval_days", 30}});
  CHECK(created["name"] == "ssn");
  CHECK(created["rotation_interval_days"] == 30);
  CHECK(created["primary_version"] == 1);
  CHECK(created["expires_at"].is_null());
  CHECK_FALSE(created.dump().find("wrapped") != std::string::npos);
  KeyId id{};
  REQUIRE(parse_key_id(created["id"].get<std::string>(), id));

  wire::KeyReply first = keyd.client().fetch_primary("ssn");
  CHECK(first.id == id);
  CHECK(first.version == 1);
  CHECK(first.state == wire::KeyState::Active);
  const auto v1 = key_bytes(first);
  CHECK(key_bytes(keyd.client().fetch_version(id, 1)) == v1);

  json rotated = keyd.admin({{"op", "rotate"}, {"name", "ssn"}});
  CHECK(rotated["primary_version"] == 2);
  CHECK(rotated["versions"][0]["state"] == "decrypt-only");
  wire::KeyReply second = keyd.client().fetch_primary("ssn");
  CHECK(second.version == 2);
  CHECK(key_bytes(second) != v1);
  wire::KeyReply old = keyd.client().fetch_version(id, 1);
  CHECK(old.state == wire::KeyState::DecryptOnly);
  CHECK(key_bytes(old) == v1);

  CHECK(error_of([&] { keyd.client().fetch_primary("nope"); }) == Errc::KeyNotFound);
  CHECK(error_of([&] { keyd.client().fetch_version(id, 3); }) == Errc::KeyNotFound);
  CHECK(error_of([&] { keyd.client().fetch_version(new_key_id(), 1); }) == Errc::KeyNotFound);
  CHECK(error_of([&] { keyd.admin({{"op", "create"}, {"name", "ssn"}}); }) == Errc::AlreadyExists);
  CHECK(error_of([&] {
          keyd.admin({{"op", "create"}, {"name", "bad name"}});
        }) == Errc::InvalidArgument);
  CHECK(error_of([&] { keyd.admin({{"op", "frobnicate"}}); }) == Errc::InvalidArgument);

  json list = keyd.admin({{"op", "list"}});
  REQUIRE(list["keys"].size() == 1);
  // Two primary fetches, each charged one encryption; version fetches are free.
  CHECK(list["keys"][0]["usage_count"] == 2);
  json status = keyd.admin({{"op", "status"}});
  CHECK(status["key_count"] == 1);
  CHECK(status["locked"] == false);
  CHECK(status["socket"] == keyd.socket_path());

  // A clean stop removes the socket and saves the usage counters.
  CHECK(keyd.stop() == 0);
  CHECK(::access(keyd.socket_path().c_str(), F_OK) != 0);
  keyd.start({me}, {me});
  json shown = keyd.admin({{"op", "show"}, {"name", "ssn"}});
  CHECK(shown["usage_count"] == 2);
  CHECK(shown["primary_version"] == 2);
  CHECK(key_bytes(keyd.client().fetch_version(id, 1)) == v1);
  CHECK(key_bytes(keyd.client().fetch_version(id, 2)) == key_bytes(second));
}

TEST_CASE("keyd server: malformed and unknown frames", "[keystore][server]") {
  RunningKeyd keyd({}, {::geteuid()});
  // Unknown type: a BadRequest failure, and the connection stays usable.
  std::vector<uint8_t> unknown = {0, 0, 0, 1, 0x42};
  auto status = wire::encode_admin("{\"op\":\"status\"}");
  unknown.insert(unknown.end(), status.begin(), status.end());
  auto reply = raw_exchange(keyd.socket_path(), unknown);
  wire::FrameReader reader;
  reader.feed(reply.data(), reply.size());
  auto failure = reader.next();
  REQUIRE(failure);
  CHECK(failure->type == wire::MsgType::Failure);
  CHECK(wire::decode_failure(ByteView(failure->body)).code == wire::FailureCode::BadRequest);
  auto result = reader.next();
  REQUIRE(result);
  CHECK(result->type == wire::MsgType::AdminResult);

  // Length 0 and lengths above the cap: dropped without a reply.
  CHECK(raw_exchange(keyd.socket_path(), {0, 0, 0, 0}) == std::vector<uint8_t>{0xEE});
  CHECK(raw_exchange(keyd.socket_path(), {0, 0x20, 0, 0, 0x01}) == std::vector<uint8_t>{0xEE});
  // keyd still serves others.
  CHECK(keyd.admin({{"op", "status"}})["key_count"] == 0);
}

TEST_CASE("keyd server: peers are checked by uid", "[keystore][server]") {
  const uid_t me = ::geteuid();
  const uid_t other = me + 4242;
  SECTION("a uid on neither list is refused") {
    RunningKeyd keyd({other}, {other});
    CHECK(error_of([&] { keyd.client().fetch_primary("k"); }) == Errc::PermissionDenied);
    CHECK(error_of([&] { keyd.admin({{"op", "list"}}); }) == Errc::PermissionDenied);
  }
  SECTION("a fetch-only uid may not administer") {
    RunningKeyd keyd({me}, {other});
    CHECK(error_of([&] {
            keyd.admin({{"op", "create"}, {"name", "k"}});
          }) == Errc::PermissionDenied);
    CHECK(error_of([&] { keyd.client().fetch_primary("k"); }) == Errc::KeyNotFound);
  }
  SECTION("an admin uid not on the fetch list administers but gets no key (audited)") {
    RunningKeyd keyd({other}, {me});
    const json created = keyd.admin({{"op", "create"}, {"name", "k"}});
    KeyId id{};
    REQUIRE(parse_key_id(created["id"].get<std::string>(), id));
    Client client = keyd.client();
    CHECK(error_of([&] { client.fetch_primary("k"); }) == Errc::PermissionDenied);
    CHECK(error_of([&] { client.fetch_primary_block("k", 64); }) == Errc::PermissionDenied);
    CHECK(error_of([&] { client.fetch_version(id, 1); }) == Errc::PermissionDenied);
    CHECK(error_of([&] { client.fetch_primary("k", wire::FetchPurpose::File); }) ==
          Errc::PermissionDenied);
    // Nothing was charged, and the connection still serves administration.
    CHECK(json::parse(client.admin(json{{"op", "show"}, {"name", "k"}}.dump()))["usage_count"] ==
          0);
    std::ifstream in(keyd.store_dir() + "/audit.log", std::ios::binary);
    size_t denied = 0, fetched = 0;
    for (std::string line; std::getline(in, line);) {
      const json entry = json::parse(line);
      if (entry["event"] == "fetch") ++fetched;
      if (entry["event"] != "fetch-denied") continue;
      ++denied;
      CHECK(entry["uid"] == me);
      CHECK(entry["key"] == "k");
    }
    CHECK(denied == 4);
    CHECK(fetched == 0);
    CHECK(keyd.admin({{"op", "audit-verify"}})["ok"] == true);
  }
  SECTION("a uid on both lists administers and fetches") {
    RunningKeyd keyd({me}, {me});
    keyd.admin({{"op", "create"}, {"name", "k"}});
    CHECK(keyd.client().fetch_primary("k").version == 1);
  }
}

TEST_CASE("keyd server: a second keyd on the same socket is refused", "[keystore][server]") {
  RunningKeyd keyd({}, {::geteuid()});
  CHECK_THROWS_AS(claim_socket_path(keyd.socket_path()), SocketUnavailable);
  CHECK(keyd.admin({{"op", "status"}})["locked"] == false);
}

TEST_CASE("keyd server: block grants, version states and audit over the socket",
          "[keystore][server][lifecycle]") {
  const uid_t me = ::geteuid();
  RunningKeyd keyd({me}, {me});
  keyd.admin({{"op", "create"}, {"name", "blk"}, {"max_uses_per_version", 1500}});

  // Blocks are cut at the cap; the grant that uses it up is followed by a rotation.
  wire::KeyGrantReply a = keyd.client().fetch_primary_block("blk", 1024);
  CHECK(a.key.version == 1);
  CHECK(a.granted == 1024);
  CHECK(a.key.state == wire::KeyState::Active);
  wire::KeyGrantReply b = keyd.client().fetch_primary_block("blk", 1024);
  CHECK(b.key.version == 1);
  CHECK(b.granted == 476);
  CHECK(key_bytes(b.key) == key_bytes(a.key));
  wire::KeyGrantReply c = keyd.client().fetch_primary_block("blk", 10);
  CHECK(c.key.version == 2);
  CHECK(c.granted == 10);
  // A legacy FetchPrimary is charged one use.
  CHECK(keyd.client().fetch_primary("blk").version == 2);
  json shown = keyd.admin({{"op", "show"}, {"name", "blk"}});
  CHECK(shown["versions"][0]["usage_count"] == 1500);
  CHECK(shown["versions"][1]["usage_count"] == 11);
  CHECK(shown["usage_count"] == 1511);
  CHECK(error_of([&] { keyd.client().fetch_primary_block("nope", 1); }) == Errc::KeyNotFound);

  // Without --database keyd cannot count rows: disable/destroy need force.
  CHECK(error_of([&] {
          keyd.admin({{"op", "destroy"}, {"name", "blk"}, {"version", 1}});
        }) == Errc::InvalidArgument);
  keyd.admin({{"op", "disable"}, {"name", "blk"}, {"version", 1}, {"force", true}});
  const KeyId id = a.key.id;
  CHECK(error_of([&] { keyd.client().fetch_version(id, 1); }) == Errc::KeyUnavailable);
  keyd.admin({{"op", "enable"}, {"name", "blk"}, {"version", 1}});
  CHECK(key_bytes(keyd.client().fetch_version(id, 1)) == key_bytes(a.key));
  keyd.admin({{"op", "destroy"}, {"name", "blk"}, {"version", 1}, {"force", true}});
  CHECK(error_of([&] { keyd.client().fetch_version(id, 1); }) == Errc::KeyUnavailable);
  CHECK(error_of([&] {
          keyd.admin({{"op", "destroy"}, {"name", "blk"}, {"version", 2}, {"force", true}});
        }) == Errc::InvalidArgument);  // the primary
  CHECK(error_of([&] {
          keyd.admin({{"op", "disable"}, {"name", "blk"}});
        }) == Errc::InvalidArgument);  // no version
  CHECK(error_of([&] {
          keyd.admin({{"op", "reencrypt"}, {"name", "blk"}});
        }) == Errc::InvalidArgument);  // no --database

  json verdict = keyd.admin({{"op", "audit-verify"}});
  CHECK(verdict["ok"] == true);
  CHECK(verdict["entries"].get<int>() > 8);
  json status = keyd.admin({{"op", "status"}});
  CHECK(status["auto_rotation"] == true);
  CHECK(status["keys"][0]["versions"][0]["state"] == "destroyed");

  // Destroyed survives a restart; the audit chain continues across it.
  CHECK(keyd.stop() == 0);
  keyd.start({me}, {me});
  CHECK(error_of([&] { keyd.client().fetch_version(id, 1); }) == Errc::KeyUnavailable);
  CHECK(keyd.admin({{"op", "audit-verify"}})["ok"] == true);
}

TEST_CASE("wire: FetchPrimaryBlock and KeyGrant", "[wire][lifecycle]") {
  auto frame = wire::encode_fetch_primary_block("k1", 1024);
  REQUIRE(frame.size() == 4 + 1 + 2 + 2 + 4);
  CHECK(frame[4] == 0x03);
  uint32_t wanted = 0;
  CHECK(wire::decode_fetch_primary_block(ByteView(frame.data() + 5, frame.size() - 5), wanted) ==
        "k1");
  CHECK(wanted == 1024);
  // wanted 0: a lookup that will not encrypt (issue 3).
  auto zero = wire::encode_fetch_primary_block("k1", 0);
  CHECK(wire::decode_fetch_primary_block(ByteView(zero.data() + 5, zero.size() - 5), wanted) ==
        "k1");
  CHECK(wanted == 0);
  wire::KeyReply reply;
  reply.id = new_key_id();
  reply.version = 3;
  reply.name = "k1";
  reply.key = SecretBytes::random(32);
  SecretBytes grant = wire::encode_key_grant(reply, 77);
  CHECK(grant.data()[4] == 0x82);
  wire::KeyGrantReply back = wire::decode_key_grant(ByteView(grant.data() + 5, grant.size() - 5));
  CHECK(back.granted == 77);
  CHECK(back.key.version == 3);
  CHECK(back.key.id == reply.id);
  CHECK(key_bytes(back.key) == key_bytes(reply));
  // A Key body is not a KeyGrant body (and vice versa).
  SecretBytes key = wire::encode_key_reply(reply);
  CHECK_THROWS_AS(wire::decode_key_grant(ByteView(key.data() + 5, key.size() - 5)), Error);
  CHECK_THROWS_AS(wire::decode_key_reply(ByteView(grant.data() + 5, grant.size() - 5)), Error);
  SecretBytes none = wire::encode_key_grant(reply, 0);
  CHECK(wire::decode_key_grant(ByteView(none.data() + 5, none.size() - 5)).granted == 0);
}

TEST_CASE("keyd server: a 0-use fetch returns the key and charges nothing",
          "[keystore][server][lifecycle]") {
  RunningKeyd keyd({::geteuid()}, {::geteuid()});
  keyd.admin({{"op", "create"}, {"name", "look"}, {"max_uses_per_version", 1500}});

  wire::KeyGrantReply a = keyd.client().fetch_primary_block("look", 0);
  CHECK(a.granted == 0);
  CHECK(a.key.version == 1);
  CHECK(a.key.state == wire::KeyState::Active);
  CHECK(a.key.name == "look");
  json shown = keyd.admin({{"op", "show"}, {"name", "look"}});
  CHECK(shown["versions"][0]["usage_count"] == 0);
  CHECK(shown["usage_count"] == 0);

  // A real block is charged as before; lookups after it still charge nothing.
  wire::KeyGrantReply b = keyd.client().fetch_primary_block("look", 1024);
  CHECK(b.granted == 1024);
  CHECK(key_bytes(b.key) == key_bytes(a.key));
  for (int i = 0; i < 10; ++i) CHECK(keyd.client().fetch_primary_block("look", 0).granted == 0);
  shown = keyd.admin({{"op", "show"}, {"name", "look"}});
  CHECK(shown["versions"][0]["usage_count"] == 1024);
  CHECK(shown["usage_count"] == 1024);

  // At the cap a lookup does not rotate; the next encryption does.
  CHECK(keyd.client().fetch_primary_block("look", 1024).granted == 476);  // rotates after
  wire::KeyGrantReply c = keyd.client().fetch_primary_block("look", 0);
  CHECK(c.key.version == 2);
  CHECK(c.granted == 0);
  shown = keyd.admin({{"op", "show"}, {"name", "look"}});
  REQUIRE(shown["versions"].size() == 2);
  CHECK(shown["versions"][0]["usage_count"] == 1500);
  CHECK(shown["versions"][1]["usage_count"] == 0);
  CHECK(keyd.admin({{"op", "audit-verify"}})["ok"] == true);
}

TEST_CASE("keyd server: a fetch reply leaves only once its audit entry is written",
          "[keystore][server][lifecycle][audit]") {
  const uid_t me = ::geteuid();
  RunningKeyd keyd({me}, {me});
  keyd.admin({{"op", "create"}, {"name", "gc"}});
  const wire::KeyReply primary = keyd.client().fetch_primary("gc");
  const std::string log_path = keyd.store_dir() + "/audit.log";
  auto fetch_entries = [&] {
    std::ifstream in(log_path, std::ios::binary);
    std::string line;
    size_t n = 0;
    while (std::getline(in, line)) {
      if (line.find("\"op\":\"version\"") != std::string::npos) ++n;
    }
    return n;
  };
  // Many clients at once: keyd handles them in batches and commits each
  // batch once; every reply a client holds must already be on file.
  std::atomic<size_t> replied{0};
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 16; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 5; ++i) {
        try {
          wire::KeyReply r = keyd.client().fetch_version(primary.id, primary.version);
          const size_t mine = ++replied;
          if (fetch_entries() < mine || r.key.size() != 32) ++failures;
        } catch (const std::exception&) {
          ++failures;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(failures == 0);
  CHECK(fetch_entries() == 80);
  CHECK(keyd.admin({{"op", "audit-verify"}})["ok"] == true);
}

TEST_CASE("keyd server: a block is at most 1/64 of the key's cap, never cut below 1024",
          "[keystore][server][lifecycle]") {
  const uid_t me = ::geteuid();
  RunningKeyd keyd({me}, {me});
  keyd.admin({{"op", "create"}, {"name", "big"}, {"max_uses_per_version", uint64_t{1} << 28}});
  keyd.admin({{"op", "create"}, {"name", "mid"}, {"max_uses_per_version", 1000000}});
  keyd.admin({{"op", "create"}, {"name", "demo"}, {"max_uses_per_version", 10000}});
  CHECK(keyd.client().fetch_primary_block("big", 100000).granted == kDefaultMaxBlockUses);
  CHECK(keyd.client().fetch_primary_block("big", 2048).granted == 2048);
  CHECK(keyd.client().fetch_primary_block("mid", 65536).granted == 1000000 / 64);
  CHECK(keyd.client().fetch_primary_block("demo", 65536).granted == 1024);
  json shown = keyd.admin({{"op", "show"}, {"name", "big"}});
  CHECK(shown["usage_count"] == kDefaultMaxBlockUses + 2048);
}

TEST_CASE("keyd server: at its connection limit the idlest kept connection makes room",
          "[keystore][server]") {
  const uid_t me = ::geteuid();
  RunningKeyd keyd({me}, {me}, 2);
  keyd.admin({{"op", "create"}, {"name", "k"}});
  Client a = keyd.client();
  Client b = keyd.client();
  Client c = keyd.client();
  const KeyId id = a.fetch_primary("k").id;
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  b.fetch_version(id, 1);  // keyd now holds a's and b's connections: its limit
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  // A third peer is served (a's connection, the idlest, is closed), and every
  // client goes on, reconnecting as needed.
  CHECK(c.fetch_version(id, 1).version == 1);
  for (int round = 0; round < 3; ++round) {
    CHECK(a.fetch_version(id, 1).version == 1);
    CHECK(b.fetch_version(id, 1).version == 1);
    CHECK(c.fetch_version(id, 1).version == 1);
  }
}

TEST_CASE("keyd server: file fetches are audited as such, charge the wrap, pin nothing",
          "[keystore][server][audit]") {
  RunningKeyd keyd({::geteuid()}, {::geteuid()});
  keyd.admin({{"op", "create"}, {"name", "files"}});
  const wire::KeyReply primary = keyd.client().fetch_primary("files", wire::FetchPurpose::File);
  CHECK(primary.version == 1);
  const wire::KeyReply again =
      keyd.client().fetch_version(primary.id, primary.version, wire::FetchPurpose::File);
  CHECK(key_bytes(again) == key_bytes(primary));

  std::vector<json> fetches;
  std::ifstream in(keyd.store_dir() + "/audit.log", std::ios::binary);
  for (std::string line; std::getline(in, line);) {
    json entry = json::parse(line);
    if (entry["event"] == "fetch") fetches.push_back(entry);
  }
  REQUIRE(fetches.size() == 2);
  CHECK(fetches[0]["op"] == "primary");
  CHECK(fetches[0]["purpose"] == "file");
  CHECK(fetches[0]["granted"] == 1);
  CHECK(fetches[1]["op"] == "version");
  CHECK(fetches[1]["purpose"] == "file");
  // One use (the data-key wrap); no derivation pin, so no --force is needed
  // for what files alone use.
  json shown = keyd.admin({{"op", "show"}, {"name", "files"}});
  CHECK(shown["versions"][0]["usage_count"] == 1);
  CHECK_FALSE(shown["versions"][0].contains("deterministic"));
  CHECK_FALSE(shown["versions"][0].contains("blind_index"));
  CHECK(keyd.admin({{"op", "audit-verify"}})["ok"] == true);
}

TEST_CASE("keyd server: keys served from its unwrapped-key cache follow disable and destroy",
          "[keystore][server][unwrapped]") {
  const uid_t me = ::geteuid();
  RunningKeyd keyd({me}, {me});
  keyd.admin({{"op", "create"}, {"name", "hot"}});
  const wire::KeyReply v1 = keyd.client().fetch_primary("hot");
  keyd.admin({{"op", "rotate"}, {"name", "hot"}});
  // Warm the cache for version 1 on a kept connection, as a backend does.
  Client c = keyd.client();
  for (int i = 0; i < 3; ++i) CHECK(key_bytes(c.fetch_version(v1.id, 1)) == key_bytes(v1));
  keyd.admin({{"op", "disable"}, {"name", "hot"}, {"version", 1}, {"force", true}});
  CHECK(error_of([&] { c.fetch_version(v1.id, 1); }) == Errc::KeyUnavailable);
  keyd.admin({{"op", "enable"}, {"name", "hot"}, {"version", 1}});
  CHECK(key_bytes(c.fetch_version(v1.id, 1)) == key_bytes(v1));
  CHECK(key_bytes(c.fetch_version(v1.id, 1)) == key_bytes(v1));
  keyd.admin({{"op", "destroy"}, {"name", "hot"}, {"version", 1}, {"force", true}});
  CHECK(error_of([&] { c.fetch_version(v1.id, 1); }) == Errc::KeyUnavailable);
  // The primary is served from the cache after a rotation as well: the new version's key.
  const wire::KeyReply v2 = c.fetch_primary("hot");
  CHECK(v2.version == 2);
  CHECK(key_bytes(c.fetch_primary("hot")) == key_bytes(v2));
  CHECK(key_bytes(v2) != key_bytes(v1));
  keyd.admin({{"op", "rotate"}, {"name", "hot"}});
  const wire::KeyReply v3 = c.fetch_primary("hot");
  CHECK(v3.version == 3);
  CHECK(key_bytes(v3) != key_bytes(v2));
  CHECK(key_bytes(c.fetch_version(v2.id, 2)) == key_bytes(v2));
}

TEST_CASE("keyd server: at its limit a kept connection in the middle of a frame is not evicted",
          "[keystore][server][connections]") {
  const uid_t me = ::geteuid();
  RunningKeyd keyd({me}, {me}, 2);
  keyd.admin({{"op", "create"}, {"name", "k"}});
  const auto status = wire::encode_admin("{\"op\":\"status\"}");
  // b's last whole request is older than a's ...
  RawPeer b(keyd.socket_path());
  b.send(status, 0, status.size());
  REQUIRE(b.next_frame(3000));
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  Client a = keyd.client();
  const KeyId id = a.fetch_primary("k").id;
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  // ... but b has begun its next request when a third peer arrives: a,
  // idle, makes room, not b in the middle of its frame.
  b.send(status, 0, 3);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  Client c = keyd.client();
  CHECK(c.fetch_version(id, 1).version == 1);
  b.send(status, 3, status.size());
  auto reply = b.next_frame(3000);
  REQUIRE(reply);
  CHECK(reply->type == wire::MsgType::AdminResult);
  // a reconnects when it next needs a key.
  CHECK(a.fetch_version(id, 1).version == 1);
}

TEST_CASE("keyd server: a frame's time limit runs from its own first byte",
          "[keystore][server][connections]") {
  const uid_t me = ::geteuid();
  RunningKeyd keyd({me}, {me}, 256, [](ServerConfig& config) { config.frame_timeout_ms = 800; });
  const auto status = wire::encode_admin("{\"op\":\"status\"}");
  std::vector<uint8_t> two = status;
  two.insert(two.end(), status.begin(), status.end());
  RawPeer peer(keyd.socket_path());
  // The first frame takes 500 ms to arrive; the read that completes it also
  // brings the start of the second, whose rest follows 500 ms later: each
  // frame arrives within 800 ms of its first byte, so neither is cut off.
  peer.send(two, 0, 1);
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  peer.send(two, 1, status.size() + 3);
  auto first = peer.next_frame(3000);
  REQUIRE(first);
  CHECK(first->type == wire::MsgType::AdminResult);
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  peer.send(two, status.size() + 3, two.size());
  auto second = peer.next_frame(3000);
  REQUIRE(second);
  CHECK(second->type == wire::MsgType::AdminResult);
  // A frame that does not arrive in time still costs the connection.
  peer.send(status, 0, 1);
  CHECK_FALSE(peer.next_frame(3000));
}

TEST_CASE("keyd server: SIGHUP reads the settings off the poll loop, which keeps serving",
          "[keystore][server][reload]") {
  // The reload resolves user names: NSS (LDAP, sssd) may take as long as its
  // server does. Here it waits until released, and keyd must serve meanwhile.
  const uid_t me = ::geteuid();
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  std::atomic<int> reloads{0};
  RunningKeyd keyd({me}, {me}, 256, [&](ServerConfig& config) {
    config.reload_source = "the test's settings";
    config.reload = [released, &reloads] {
      ++reloads;
      released.wait();
      ReloadableSettings settings;
      settings.admin_uids = {::geteuid()};  // no longer on the fetch list
      settings.log_level = LogLevel::Error;
      return settings;
    };
  });
  struct Releaser {  // destroyed before keyd, whose stop waits for the reload
    std::promise<void>& promise;
    bool done = false;
    void operator()() {
      if (!done) promise.set_value();
      done = true;
    }
    ~Releaser() { (*this)(); }
  } releaser{release};
  keyd.admin({{"op", "create"}, {"name", "k"}});
  Client kept = keyd.client();
  CHECK(kept.fetch_primary("k").version == 1);

  install_signal_handlers();
  REQUIRE(::kill(::getpid(), SIGHUP) == 0);
  for (int i = 0; i < 200 && reloads == 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  REQUIRE(reloads == 1);
  // The reload is stuck, keyd is not: fetches and admin ops, old settings.
  const auto started = std::chrono::steady_clock::now();
  CHECK(kept.fetch_primary("k").version == 1);
  CHECK(keyd.client().fetch_primary("k").version == 1);
  CHECK(keyd.admin({{"op", "status"}})["key_count"] == 1);
  CHECK(std::chrono::steady_clock::now() - started < std::chrono::seconds(1));
  // A second SIGHUP meanwhile runs another reload after this one.
  REQUIRE(::kill(::getpid(), SIGHUP) == 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  CHECK(reloads == 1);

  releaser();
  Errc refused = Errc::Internal;
  for (int i = 0; i < 200 && refused != Errc::PermissionDenied; ++i) {
    try {
      kept.fetch_primary("k");
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    } catch (const Error& e) {
      refused = e.code();
    }
  }
  CHECK(refused == Errc::PermissionDenied);  // the new settings apply
  for (int i = 0; i < 200 && reloads < 2; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  CHECK(reloads == 2);
  // The reload is audited as before.
  std::ifstream in(keyd.store_dir() + "/audit.log", std::ios::binary);
  size_t applied = 0;
  for (std::string line; std::getline(in, line);) {
    const json entry = json::parse(line);
    if (entry["event"] == "reload" && entry["result"] == "ok") ++applied;
  }
  CHECK(applied >= 1);
  for (int sig : {SIGHUP, SIGINT, SIGTERM}) ::signal(sig, SIG_DFL);
}

TEST_CASE("keyd server: the store keeps where keyd left its audit log; a log cut back is found",
          "[keystore][server][audit][audit-mark]") {
  const uid_t me = ::geteuid();
  RunningKeyd keyd({me}, {me});
  auto slurp = [](const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  auto spit = [](const std::string& path, const std::string& text) {
    std::ofstream(path, std::ios::binary | std::ios::trunc) << text;
  };
  const std::string log_path = keyd.store_dir() + "/audit.log";
  keyd.admin({{"op", "create"}, {"name", "k"}});
  keyd.client().fetch_primary("k");
  keyd.admin({{"op", "audit-verify"}});  // syncs the log and its head
  const std::string old_log = slurp(log_path);
  const std::string old_head = slurp(log_path + ".head");
  keyd.admin({{"op", "create"}, {"name", "k2"}});
  keyd.client().fetch_primary("k2");
  REQUIRE(keyd.stop() == 0);

  // A clean stop leaves the store's mark at the log's last entry (the stop).
  const std::string log = slurp(log_path);
  const std::string last = log.substr(log.rfind('\n', log.size() - 2) + 1);
  REQUIRE(json::parse(last)["event"] == "stop");
  {
    const KeyStore store = KeyStore::open_read_only(keyd.store_dir(), test_password());
    CHECK(store.audit_mark().seq == json::parse(last)["seq"].get<uint64_t>());
    CHECK(store.audit_mark().size == log.size());
    CHECK(AuditLog::verify(log_path, store.audit_mac_key().view(), store.audit_mark()).ok);
  }

  // The log cut back to the old copy of its head: keyd's next start finds it.
  spit(log_path, old_log);
  spit(log_path + ".head", old_head);
  keyd.start({me}, {me});
  const json verdict = keyd.admin({{"op", "audit-verify"}});
  INFO(verdict.dump());
  CHECK(verdict["ok"] == false);
  CHECK(verdict["problem"].get<std::string>().find("key store recorded") != std::string::npos);
}
