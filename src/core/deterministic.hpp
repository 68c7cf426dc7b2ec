// The deterministic value format (docs/columns.md): AES-256-SIV, so equal
// plaintexts under one key and context give equal values. Postgres-free, so
// that the format can be fuzzed and tested without a server; src/pg keys it
// (the 64-byte SIV key from version 1 of the named key).
//
//   off len
//    0   1  format 1
//    1   1  algorithm 2 (AES-256-SIV)
//    2   1  payload type (0 bytes, 1 text)
//    3   1  reserved 0
//    4  16  key id
//   20   4  key version (big-endian, >= 1)
//   24  16  SIV
//   40 n+1  AES-SIV ciphertext of (payload type byte || plaintext)
// AAD = bytes [0, 24) || context.
#pragma once
#include <cstddef>
#include <cstdint>

#include "core/bytes.hpp"
#include "core/envelope.hpp"

namespace colcrypt {

constexpr uint8_t kDeterministicAlgorithm = 2;
constexpr size_t kDeterministicHeaderSize = 24;
constexpr size_t kDeterministicOverhead = 41;  // header, SIV, the payload type byte

struct DeterministicHeader {
  PayloadType payload = PayloadType::Bytes;
  KeyId key_id{};
  uint32_t key_version = 0;
};

// Structure check without a key; throws Errc::MalformedValue saying which
// check failed.
DeterministicHeader parse_deterministic(ByteView value);

// Writes plaintext.size + kDeterministicOverhead bytes to out. siv_key: 64 bytes.
void seal_deterministic(ByteView siv_key, const KeyId& key_id, uint32_t key_version,
                        PayloadType payload, ByteView context, ByteView plaintext, uint8_t* out);

// Opens into out (value.size - kDeterministicOverhead bytes). Throws
// Errc::MalformedValue for a bad structure and Errc::DecryptionFailed (one
// message) when the value does not authenticate under siv_key and context.
void open_deterministic(ByteView siv_key, ByteView value, ByteView context, uint8_t* out);

}  // namespace colcrypt
