// Pending plaintext (see pending.hpp). Postgres-free.
#include "pg/pending.hpp"

#include <cstring>
#include <memory>

#include "core/aead.hpp"
#include "core/error.hpp"
#include "core/secure_memory.hpp"

#ifdef POSTGRES_H
#error "src/pg/pending.cpp must stay Postgres-free"
#endif

namespace colcrypt::pg {
namespace {

constexpr uint8_t kMagic[kPendingMagicSize] = {0, 'C', 'C', 'P', 'E', 'N', 'D', '1'};

// Created on first use, never destroyed by a static destructor (see
// key_cache.cpp): clear_pending_key() wipes it at backend exit.
AeadKey* the_key = nullptr;

AeadKey& pending_key() {
  if (the_key == nullptr) {
    SecretBytes bytes = SecretBytes::random(AeadKey::kKeySize);
    the_key = new AeadKey(bytes.view());
  }
  return *the_key;
}

}  // namespace

bool is_pending(ByteView value) noexcept {
  return value.size >= kPendingMagicSize && std::memcmp(value.data, kMagic, kPendingMagicSize) == 0;
}

void seal_pending(ByteView plaintext, uint8_t* out) {
  std::memcpy(out, kMagic, kPendingMagicSize);
  uint8_t* nonce = out + kPendingMagicSize;
  random_bytes(nonce, AeadKey::kNonceSize);
  pending_key().seal(nonce, ByteView(kMagic, kPendingMagicSize), ByteView(), plaintext,
                     out + kPendingMagicSize + AeadKey::kNonceSize,
                     out + kPendingMagicSize + AeadKey::kNonceSize + plaintext.size);
}

void open_pending(ByteView value, uint8_t* out) {
  if (!is_pending(value) || value.size < kPendingOverhead)
    throw Error(Errc::MalformedValue, "not a pending plaintext");
  const size_t n = value.size - kPendingOverhead;
  const uint8_t* nonce = value.data + kPendingMagicSize;
  const uint8_t* ciphertext = nonce + AeadKey::kNonceSize;
  if (!pending_key().open(nonce, ByteView(kMagic, kPendingMagicSize), ByteView(),
                          ByteView(ciphertext, n), ciphertext + n, out))
    throw Error(Errc::MalformedValue,
                "the plaintext was given to colcrypt.encrypted in another session or "
                "statement context that no longer exists");
}

void clear_pending_key() noexcept {
  delete the_key;
  the_key = nullptr;
}

}  // namespace colcrypt::pg
