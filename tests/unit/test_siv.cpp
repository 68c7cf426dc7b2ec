// AES-SIV (core/siv.hpp): Wycheproof's aes_siv_cmac_test.json through the
// wrapper, every case counted against the file's numberOfTests.
#include <catch2/catch.hpp>
#include <vector>

#include "core/siv.hpp"
#include "support.hpp"

using namespace colcrypt;
using colcrypt::test::hex;
using colcrypt::test::load_wycheproof;
using colcrypt::test::unhex;

TEST_CASE("Wycheproof AES-SIV-CMAC through aes_siv_seal/open", "[wycheproof][siv]") {
  const nlohmann::json doc = load_wycheproof("aes_siv_cmac_test.json");
  size_t valid = 0, invalid = 0, bad_key = 0, skipped = 0;
  for (const auto& group : doc["testGroups"]) {
    const int key_bits = group["keySize"].get<int>();
    for (const auto& t : group["tests"]) {
      const int id = t["tcId"].get<int>();
      const std::string result = t["result"].get<std::string>();
      const auto key = unhex(t["key"].get<std::string>());
      const auto aad = unhex(t["aad"].get<std::string>());
      const auto msg = unhex(t["msg"].get<std::string>());
      const auto ct = unhex(t["ct"].get<std::string>());
      INFO("tcId " << id << " (" << key_bits << "-bit key, " << result << ")");
      REQUIRE(key.size() * 8 == static_cast<size_t>(key_bits));
      if (key.size() != 32 && key.size() != 48 && key.size() != 64) {
        REQUIRE(result == "invalid");
        std::vector<uint8_t> out(msg.size() + 1);
        uint8_t siv[kSivSize];
        REQUIRE_ERRC(aes_siv_seal(key, aad, msg, siv, out.data()), Errc::InvalidArgument);
        ++bad_key;
        continue;
      }
      if (msg.empty()) {
        // OpenSSL 3.0 cannot seal or open an empty plaintext (issue #17268):
        // the wrapper refuses it; colcrypt never has one (type byte prefix).
        uint8_t siv[kSivSize];
        REQUIRE_ERRC(aes_siv_seal(key, aad, msg, siv, nullptr), Errc::InvalidArgument);
        ++skipped;
        continue;
      }
      if (result == "valid") {
        std::vector<uint8_t> sealed(msg.size());
        uint8_t siv[kSivSize];
        aes_siv_seal(key, aad, msg, siv, sealed.data());
        CHECK(hex(siv, kSivSize) + hex(sealed) == t["ct"].get<std::string>());
        // deterministic: the same input seals to the same output
        std::vector<uint8_t> again(msg.size());
        uint8_t siv2[kSivSize];
        aes_siv_seal(key, aad, msg, siv2, again.data());
        CHECK(hex(siv2, kSivSize) + hex(again) == hex(siv, kSivSize) + hex(sealed));
      }
      std::vector<uint8_t> opened(ct.size() >= kSivSize ? ct.size() - kSivSize : 0, 0xAA);
      const bool ok =
          ct.size() > kSivSize &&
          aes_siv_open(key, aad, ct.data(), ByteView(ct.data() + kSivSize, ct.size() - kSivSize),
                       opened.data());
      if (result == "valid") {
        REQUIRE(ok);
        REQUIRE(opened == msg);
        ++valid;
      } else {
        REQUIRE(result == "invalid");
        REQUIRE_FALSE(ok);
        if (ct.size() > kSivSize)
          for (uint8_t b : opened) REQUIRE(b == 0);
        ++invalid;
      }
    }
  }
  CHECK(valid + invalid + bad_key + skipped == doc["numberOfTests"].get<size_t>());
  if (skipped > 0)
    WARN("aes_siv_cmac_test.json: " << skipped
                                    << " empty-plaintext cases SKIPPED (OpenSSL 3.0 cannot "
                                       "seal them; the wrapper refuses them, as checked)");
  CHECK(valid > 0);
  CHECK(invalid > 0);
}

TEST_CASE("AES-SIV refuses bad key sizes and detects any flipped bit", "[siv]") {
  std::vector<uint8_t> key(64);
  for (size_t i = 0; i < key.size(); ++i) key[i] = uint8_t(i);
  const std::vector<uint8_t> aad = {1, 2, 3};
  const std::vector<uint8_t> msg = {'h', 'e', 'l', 'l', 'o'};
  std::vector<uint8_t> ct(msg.size());
  uint8_t siv[kSivSize];
  aes_siv_seal(key, aad, msg, siv, ct.data());
  for (size_t bit = 0; bit < (kSivSize + ct.size()) * 8; ++bit) {
    std::vector<uint8_t> s(siv, siv + kSivSize);
    std::vector<uint8_t> c = ct;
    if (bit < kSivSize * 8)
      s[bit / 8] ^= uint8_t(1 << (bit % 8));
    else
      c[bit / 8 - kSivSize] ^= uint8_t(1 << (bit % 8));
    std::vector<uint8_t> out(msg.size());
    CHECK_FALSE(aes_siv_open(key, aad, s.data(), c, out.data()));
  }
  std::vector<uint8_t> out(msg.size());
  CHECK_FALSE(aes_siv_open(key, std::vector<uint8_t>{1, 2, 4}, siv, ct, out.data()));
  REQUIRE_ERRC(aes_siv_seal(std::vector<uint8_t>(16), aad, msg, siv, ct.data()),
               Errc::InvalidArgument);
  // an empty AAD component is one component; an empty plaintext is refused
  uint8_t siv_empty_aad[kSivSize];
  std::vector<uint8_t> c2(msg.size());
  aes_siv_seal(key, std::vector<uint8_t>{}, msg, siv_empty_aad, c2.data());
  CHECK(aes_siv_open(key, std::vector<uint8_t>{}, siv_empty_aad, c2, out.data()));
  CHECK(out == msg);
  REQUIRE_ERRC(aes_siv_seal(key, aad, std::vector<uint8_t>{}, siv, nullptr), Errc::InvalidArgument);
}
