// The DenialReport message (docs/protocol.md): the extension tells keyd that
// it refused a role the use of a key. Codec byte for byte, and keyd's answer.
#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <future>
#include <string>

#include "core/wire.hpp"
#include "client/client.hpp"
#include "keyd/log.hpp"
#include "keyd/server.hpp"
#include "keyd/store.hpp"
#include "support.hpp"

using namespace colcrypt;
using namespace colcrypt::wire;
using colcrypt::test::hex;

TEST_CASE("denial report encodes byte for byte", "[wire]") {
  const DenialReport report{"k1", "decrypt", "app", "db"};
  const auto frame = encode_denial_report(report);
  REQUIRE(hex(frame) ==
          "00000017"
          "30"
          "0002"
          "6b31"
          "0007"
          "64656372797074"
          "0003"
          "617070"
          "0002"
          "6462");
  FrameReader reader;
  reader.feed(frame.data(), frame.size());
  auto f = reader.next();
  REQUIRE(f.has_value());
  REQUIRE(f->type == MsgType::DenialReport);
  const DenialReport back = decode_denial_report(ByteView(f->body));
  CHECK(back.key_name == "k1");
  CHECK(back.privilege == "decrypt");
  CHECK(back.role == "app");
  CHECK(back.database == "db");
  for (size_t len = 0; len < f->body.size(); ++len) {
    INFO("truncated to " << len);
    REQUIRE_ERRC(decode_denial_report(ByteView(f->body.data(), len)), Errc::ProtocolError);
  }
  auto longer = f->body;
  longer.push_back(0);
  REQUIRE_ERRC(decode_denial_report(ByteView(longer)), Errc::ProtocolError);
  REQUIRE(hex(encode_ack()) == "00000001b0");
}

TEST_CASE("keyd acknowledges a denial report", "[keystore][server]") {
  char pattern[] = "/tmp/colcrypt-denial-test-XXXXXX";
  REQUIRE(::mkdtemp(pattern) != nullptr);
  const std::string dir = pattern;
  keyd::set_log_level(keyd::LogLevel::Error);
  keyd::MasterSecret secret;
  secret.bytes = SecretBytes(ByteView::of("denial test password"));
  keyd::ServerConfig config;
  config.socket_path = dir + "/run/keyd.sock";
  config.allow_uids = {::geteuid()};
  auto server = std::make_unique<keyd::Server>(
      std::move(config), keyd::KeyStore::create(dir + "/store", secret, 1000));
  server->listen();
  auto result = std::async(std::launch::async, [&] { return server->run(); });

  client::ClientOptions options;
  options.socket_path = dir + "/run/keyd.sock";
  options.timeout_ms = 3000;
  client::Client client(options);
  CHECK_NOTHROW(client.report_denial({"customer_data", "decrypt", "app\nforged line", "shop"}));

  keyd::request_shutdown();
  CHECK(result.get() == 0);
  server.reset();
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
}
