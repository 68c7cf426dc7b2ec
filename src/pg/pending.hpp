// "Pending plaintext": what the input function of colcrypt.encrypted makes of
// text that is not a sealed value ("colcrypt:" + base64), when Postgres calls
// it without the column's type modifier (an INSERT literal, an untyped
// parameter). The typmod coercion that Postgres applies next seals it under
// the column's key; every other consumer (output, send, decrypt, storage in a
// column without a key) refuses it.
//
// A pending datum never holds the plaintext itself: it is sealed with
// AES-256-GCM under a random key that exists only in this backend's memory and
// dies with it. Should one ever reach a table (a path no check covers), the
// table holds bytes nobody can decrypt, never plaintext. Layout:
//
//   off len
//    0   8  magic "\0CCPEND1" (byte 0 = 0 is never a format version)
//    8  12  nonce (random)
//   20   n  ciphertext
//  20+n 16  tag
//
// Postgres-free; the functions throw colcrypt::Error (run them through guarded()).
#pragma once
#include <cstddef>
#include <cstdint>

#include "core/bytes.hpp"

namespace colcrypt::pg {

constexpr size_t kPendingMagicSize = 8;
constexpr size_t kPendingOverhead = kPendingMagicSize + 12 + 16;

// True when the bytes start with the pending magic. Never throws.
bool is_pending(ByteView value) noexcept;

inline size_t pending_size(size_t plaintext_size) { return plaintext_size + kPendingOverhead; }

// Writes pending_size(plaintext.size) bytes to out.
void seal_pending(ByteView plaintext, uint8_t* out);

// Opens a pending datum made by this backend into out (value.size -
// kPendingOverhead bytes). Throws Errc::MalformedValue for one made by another
// backend (or altered): it can never be opened again.
void open_pending(ByteView value, uint8_t* out);

// Wipes the backend's pending key (at exit).
void clear_pending_key() noexcept;

}  // namespace colcrypt::pg
