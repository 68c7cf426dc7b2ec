#include "fixtures.hpp"

#include <array>

#include "core/aead.hpp"
#include "core/deterministic.hpp"

namespace colcrypt::fuzz {

namespace {

std::array<uint8_t, 64> pattern(uint8_t seed) {
  std::array<uint8_t, 64> bytes{};
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<uint8_t>(seed + 37 * i);
  return bytes;
}

const std::vector<std::vector<uint8_t>>& plaintexts() {
  static const std::vector<std::vector<uint8_t>> texts = [] {
    std::vector<std::vector<uint8_t>> t;
    for (std::string s : {std::string(), std::string("123-45-6789"), std::string("a"),
                          std::string(100, 'x'), std::string("{\"ssn\": \"078-05-1120\"}")})
      t.emplace_back(s.begin(), s.end());
    return t;
  }();
  return texts;
}

}  // namespace

const KeyId& test_key_id() {
  static const KeyId id = [] {
    KeyId k{};
    const auto p = pattern(0x5a);
    std::copy(p.begin(), p.begin() + k.size(), k.begin());
    return k;
  }();
  return id;
}

ByteView test_key() {
  static const auto k = pattern(1);
  return ByteView(k.data(), 32);
}

ByteView test_siv_key() {
  static const auto k = pattern(2);
  return ByteView(k.data(), 64);
}

ByteView test_kek() {
  static const auto k = pattern(3);
  return ByteView(k.data(), 32);
}

ByteView test_context() { return ByteView::of("public.patients.ssn"); }

const std::vector<SealedFixture>& envelope_fixtures() {
  static const std::vector<SealedFixture> fixtures = [] {
    std::vector<SealedFixture> out;
    AeadKey plain_key(test_key());
    AeadKey derived_key(
        derive_value_key(test_key(), test_key_id(), kTestKeyVersion, test_context()).view());
    uint8_t n = 0;
    for (const auto& text : plaintexts()) {
      for (Algorithm algorithm : {Algorithm::Aes256Gcm, Algorithm::Aes256GcmDerived}) {
        std::array<uint8_t, AeadKey::kNonceSize> nonce{};
        nonce.fill(++n);
        SealedFixture f{text, std::vector<uint8_t>(sealed_size(text.size()))};
        detail::seal_with_nonce(algorithm == Algorithm::Aes256Gcm ? plain_key : derived_key,
                                test_key_id(), kTestKeyVersion,
                                n % 2 ? PayloadType::Text : PayloadType::Bytes, test_context(),
                                ByteView(text), nonce.data(), f.value.data(), algorithm);
        out.push_back(std::move(f));
      }
    }
    return out;
  }();
  return fixtures;
}

const std::vector<SealedFixture>& deterministic_fixtures() {
  static const std::vector<SealedFixture> fixtures = [] {
    std::vector<SealedFixture> out;
    int n = 0;
    for (const auto& text : plaintexts()) {
      SealedFixture f{text, std::vector<uint8_t>(text.size() + kDeterministicOverhead)};
      seal_deterministic(test_siv_key(), test_key_id(), 1,
                         ++n % 2 ? PayloadType::Text : PayloadType::Bytes, test_context(),
                         ByteView(text), f.value.data());
      out.push_back(std::move(f));
    }
    return out;
  }();
  return fixtures;
}

}  // namespace colcrypt::fuzz
