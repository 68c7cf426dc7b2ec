// Key derivation through OpenSSL's EVP_KDF / EVP_MAC.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>

#include "core/bytes.hpp"
#include "core/secure_memory.hpp"

namespace colcrypt {

constexpr uint32_t kPbkdf2DefaultIterations = 600000;

// HKDF-SHA256 (RFC 5869, extract then expand). Throws Errc::InvalidArgument
// when length is 0 or above 255 * 32.
SecretBytes hkdf_sha256(ByteView ikm, ByteView salt, ByteView info, size_t length);

// PBKDF2-HMAC-SHA256. Throws Errc::InvalidArgument when iterations or length is 0.
SecretBytes pbkdf2_sha256(ByteView password, ByteView salt, uint32_t iterations, size_t length);

// HMAC-SHA256 over data; the full 32-byte tag.
std::array<uint8_t, 32> hmac_sha256(ByteView key, ByteView data);

}  // namespace colcrypt
