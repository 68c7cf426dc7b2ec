// AES-GCM through OpenSSL EVP. Tags are always 128 bits.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>

#include "core/bytes.hpp"

namespace colcrypt {

constexpr size_t kGcmTagSize = 16;

// One-shot AES-GCM with any AES key size (16/24/32) and any non-empty IV.
// Used for key wrapping in keyd and for the Wycheproof tests. Throws
// Errc::InvalidArgument on a bad key or IV size.
void aes_gcm_seal(ByteView key, ByteView iv, ByteView aad, ByteView plaintext,
                  uint8_t* out_ciphertext, uint8_t out_tag[kGcmTagSize]);
// Returns false (and leaves out_plaintext wiped) when authentication fails or
// the tag is not 16 bytes. Throws Errc::InvalidArgument on a bad key or IV size.
bool aes_gcm_open(ByteView key, ByteView iv, ByteView aad, ByteView ciphertext, ByteView tag,
                  uint8_t* out_plaintext);

// An AES-256-GCM key whose key schedule is computed once, in the constructor,
// and reused for every value: per-value work is one EVP init with the nonce.
// Not thread-safe (one per backend / per thread). Wipes its schedule on release.
class AeadKey {
 public:
  static constexpr size_t kKeySize = 32;
  static constexpr size_t kNonceSize = 12;

  explicit AeadKey(ByteView key);  // throws Errc::InvalidArgument unless 32 bytes
  ~AeadKey();
  AeadKey(AeadKey&&) noexcept;
  AeadKey& operator=(AeadKey&&) noexcept;
  AeadKey(const AeadKey&) = delete;
  AeadKey& operator=(const AeadKey&) = delete;

  // The AAD is aad1 || aad2 (two parts so callers need not concatenate).
  // out_ciphertext receives plaintext.size bytes; sizes above INT_MAX work.
  void seal(const uint8_t nonce[kNonceSize], ByteView aad1, ByteView aad2, ByteView plaintext,
            uint8_t* out_ciphertext, uint8_t out_tag[kGcmTagSize]);
  // Returns false when authentication fails; out_plaintext is wiped then.
  bool open(const uint8_t nonce[kNonceSize], ByteView aad1, ByteView aad2, ByteView ciphertext,
            const uint8_t tag[kGcmTagSize], uint8_t* out_plaintext);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace colcrypt
