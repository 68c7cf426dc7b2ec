// Key derivation through OpenSSL's EVP_KDF / EVP_MAC.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>

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

// HMAC-SHA256 under one key for many messages: the key is set up once, each
// mac() only hashes (keyd's audit chain MACs every entry). The OpenSSL
// context holds the key's pads; it is freed (and cleansed) with the object.
class HmacSha256 {
 public:
  explicit HmacSha256(ByteView key);
  ~HmacSha256();
  HmacSha256(HmacSha256&&) noexcept;
  HmacSha256& operator=(HmacSha256&&) noexcept;
  HmacSha256(const HmacSha256&) = delete;
  HmacSha256& operator=(const HmacSha256&) = delete;

  // The tag of part1 || part2 || part3.
  std::array<uint8_t, 32> mac(ByteView part1, ByteView part2 = {}, ByteView part3 = {});

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace colcrypt
