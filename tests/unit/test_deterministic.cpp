// The deterministic (AES-SIV) value format of core/deterministic.hpp.
#include <catch2/catch.hpp>
#include <string>
#include <vector>

#include "core/deterministic.hpp"
#include "support.hpp"

using namespace colcrypt;

namespace {

std::vector<uint8_t> siv_key() {
  std::vector<uint8_t> k(64);
  for (size_t i = 0; i < k.size(); ++i) k[i] = static_cast<uint8_t>(i * 7 + 1);
  return k;
}

KeyId key_id() {
  KeyId id{};
  for (size_t i = 0; i < id.size(); ++i) id[i] = static_cast<uint8_t>(0xA0 + i);
  return id;
}

std::vector<uint8_t> seal(const std::string& text, const std::string& context,
                          PayloadType payload = PayloadType::Text) {
  std::vector<uint8_t> out(text.size() + kDeterministicOverhead);
  seal_deterministic(ByteView(siv_key()), key_id(), 1, payload, ByteView::of(context),
                     ByteView::of(text), out.data());
  return out;
}

std::string open(const std::vector<uint8_t>& value, const std::string& context) {
  std::string out(value.size() - kDeterministicOverhead, '\0');
  open_deterministic(ByteView(siv_key()), ByteView(value), ByteView::of(context),
                     reinterpret_cast<uint8_t*>(out.data()));
  return out;
}

}  // namespace

TEST_CASE("deterministic values: equal in, equal out; they open to the plaintext",
          "[deterministic]") {
  const auto a = seal("123-45-6789", "patients.ssn");
  CHECK(a == seal("123-45-6789", "patients.ssn"));
  CHECK(a != seal("123-45-6789", "other.ssn"));
  CHECK(a != seal("123-45-6789", "patients.ssn", PayloadType::Bytes));
  CHECK(open(a, "patients.ssn") == "123-45-6789");
  CHECK(open(seal("", "c"), "c").empty());
  const DeterministicHeader h = parse_deterministic(ByteView(a));
  CHECK(h.key_version == 1);
  CHECK(h.key_id == key_id());
  CHECK(h.payload == PayloadType::Text);
}

TEST_CASE("deterministic values: every flipped bit, a wrong context, bad headers",
          "[deterministic]") {
  const auto good = seal("secret", "ctx");
  REQUIRE_ERRC(open(good, "other"), Errc::DecryptionFailed);
  for (size_t i = 0; i < good.size(); ++i) {
    for (int bit = 0; bit < 8; ++bit) {
      auto bad = good;
      bad[i] ^= static_cast<uint8_t>(1 << bit);
      INFO("byte " << i << " bit " << bit);
      try {
        open(bad, "ctx");
        FAIL("a flipped bit opened");
      } catch (const Error& e) {
        CHECK((e.code() == Errc::DecryptionFailed || e.code() == Errc::MalformedValue));
      }
    }
  }
  std::vector<uint8_t> short_value(kDeterministicOverhead - 1);
  REQUIRE_ERROR(parse_deterministic(ByteView(short_value)), Errc::MalformedValue,
                "deterministic value too short");
  auto v0 = good;
  v0[20] = v0[21] = v0[22] = v0[23] = 0;
  REQUIRE_ERROR(parse_deterministic(ByteView(v0)), Errc::MalformedValue, "key version 0");
  auto envelope_like = good;
  envelope_like[1] = 1;
  REQUIRE_ERROR(parse_deterministic(ByteView(envelope_like)), Errc::MalformedValue,
                "unknown deterministic algorithm");
}
