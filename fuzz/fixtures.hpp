// Fixed keys and the values sealed under them: the fuzz targets' "real
// values", from which make_seeds writes the committed seed corpora.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/envelope.hpp"
#include "core/secure_memory.hpp"

namespace colcrypt::fuzz {

struct SealedFixture {
  std::vector<uint8_t> plaintext;
  std::vector<uint8_t> value;  // envelope or deterministic value
};

const KeyId& test_key_id();
constexpr uint32_t kTestKeyVersion = 7;
ByteView test_key();      // 32 bytes, the version key
ByteView test_siv_key();  // 64 bytes
ByteView test_context();
ByteView test_kek();  // 32 bytes, keyd's master key (a key file)

// Envelopes under test_key() (and its derived key for test_context()),
// sealed with fixed nonces.
const std::vector<SealedFixture>& envelope_fixtures();
const std::vector<SealedFixture>& deterministic_fixtures();

}  // namespace colcrypt::fuzz
