#include <catch2/catch.hpp>
#include <cstring>
#include <set>
#include <string>

#include "core/error.hpp"
#include "core/secure_memory.hpp"
#include "support.hpp"

using namespace colcrypt;

TEST_CASE("SecretBytes construction", "[secure_memory]") {
  SecretBytes empty;
  REQUIRE(empty.empty());
  REQUIRE(empty.data() == nullptr);

  SecretBytes zeros(100);
  REQUIRE(zeros.size() == 100);
  for (size_t i = 0; i < zeros.size(); ++i) REQUIRE(zeros.data()[i] == 0);

  const uint8_t src[5] = {1, 2, 3, 4, 5};
  SecretBytes copy(src, sizeof src);
  REQUIRE(copy.size() == 5);
  REQUIRE(std::memcmp(copy.data(), src, 5) == 0);
  REQUIRE(constant_time_equal(copy.view(), ByteView(src, 5)));

  SecretBytes from_view(ByteView(src, 3));
  REQUIRE(from_view.size() == 3);
  REQUIRE(from_view.data()[2] == 3);

  REQUIRE_ERRC(SecretBytes(nullptr, 4), Errc::InvalidArgument);
  REQUIRE(SecretBytes(nullptr, 0).empty());
}

TEST_CASE("SecretBytes moves leave the source empty", "[secure_memory]") {
  const uint8_t src[4] = {9, 8, 7, 6};
  SecretBytes a(src, 4);
  const uint8_t* storage = a.data();
  SecretBytes b(std::move(a));
  REQUIRE(a.empty());  // NOLINT(bugprone-use-after-move)
  REQUIRE(a.data() == nullptr);
  REQUIRE(b.data() == storage);
  REQUIRE(b.size() == 4);

  SecretBytes c(10);
  c = std::move(b);
  REQUIRE(b.empty());  // NOLINT(bugprone-use-after-move)
  REQUIRE(c.size() == 4);
  REQUIRE(c.data()[0] == 9);
  c = SecretBytes();
  REQUIRE(c.empty());
}

TEST_CASE("random bytes", "[secure_memory]") {
  std::set<std::string> seen;
  for (int i = 0; i < 8; ++i) {
    SecretBytes r = SecretBytes::random(32);
    REQUIRE(r.size() == 32);
    seen.insert(std::string(reinterpret_cast<const char*>(r.data()), r.size()));
  }
  REQUIRE(seen.size() == 8);
  random_bytes(nullptr, 0);  // nothing to do, must not fail
  REQUIRE(SecretBytes::random(0).empty());
}

TEST_CASE("constant_time_equal and secure_zero", "[secure_memory]") {
  const uint8_t a[3] = {1, 2, 3}, b[3] = {1, 2, 4};
  REQUIRE(constant_time_equal(ByteView(a, 3), ByteView(a, 3)));
  REQUIRE_FALSE(constant_time_equal(ByteView(a, 3), ByteView(b, 3)));
  REQUIRE_FALSE(constant_time_equal(ByteView(a, 3), ByteView(a, 2)));
  REQUIRE(constant_time_equal(ByteView(), ByteView()));
  uint8_t buf[16];
  std::memset(buf, 0xFF, sizeof buf);
  secure_zero(buf, sizeof buf);
  for (uint8_t x : buf) REQUIRE(x == 0);
  secure_zero(nullptr, 0);
}

TEST_CASE("every Errc has a distinct name", "[error]") {
  const Errc all[] = {
      Errc::InvalidArgument, Errc::MalformedValue, Errc::DecryptionFailed,    Errc::CryptoFailure,
      Errc::KeyNotFound,     Errc::KeyUnavailable, Errc::PermissionDenied,    Errc::KeydUnavailable,
      Errc::KeydTimeout,     Errc::Cancelled,      Errc::ProtocolError,       Errc::AlreadyExists,
      Errc::StoreCorrupt,    Errc::WrongMasterKey, Errc::InsecurePermissions, Errc::Io,
      Errc::Internal};
  std::set<std::string> names;
  for (Errc e : all) {
    const std::string name = errc_name(e);
    REQUIRE_FALSE(name.empty());
    REQUIRE(name != "unknown error");
    names.insert(name);
  }
  REQUIRE(names.size() == sizeof all / sizeof all[0]);
  const Error err(Errc::KeyNotFound, "key 'x' not found");
  REQUIRE(err.code() == Errc::KeyNotFound);
  REQUIRE(std::string(err.what()) == "key 'x' not found");
}
