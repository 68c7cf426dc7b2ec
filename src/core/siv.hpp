// AES-SIV (RFC 5297) through OpenSSL 3.0's EVP "AES-xxx-SIV": deterministic
// authenticated encryption, used for colcrypt's deterministic values
// (docs/columns.md). One associated-data component.
#pragma once
#include <cstddef>
#include <cstdint>

#include "core/bytes.hpp"

namespace colcrypt {

constexpr size_t kSivSize = 16;  // the synthetic IV, which is also the tag

// key: 32, 48 or 64 bytes (AES-128/192/256-SIV; two keys of half the size).
// Writes the SIV to out_siv and plaintext.size bytes to out_ciphertext. The
// AAD component is always passed, even when empty. Throws
// Errc::InvalidArgument on a bad key size or an empty plaintext (OpenSSL 3.0
// cannot seal one: callers prefix their data with a type byte).
void aes_siv_seal(ByteView key, ByteView aad, ByteView plaintext, uint8_t out_siv[kSivSize],
                  uint8_t* out_ciphertext);

// Returns false (out_plaintext wiped) when authentication fails; throws
// Errc::InvalidArgument on a bad key size or an empty ciphertext.
bool aes_siv_open(ByteView key, ByteView aad, const uint8_t siv[kSivSize], ByteView ciphertext,
                  uint8_t* out_plaintext);

}  // namespace colcrypt
