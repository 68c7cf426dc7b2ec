// The per-backend key cache and the C++ halves of the SQL functions that need
// a key. Postgres-free: callers in src/pg run these only through guarded()
// (guard.hpp); everything here reports failures by throwing.
//
// Cache: (key id, version) -> AES key schedule + name, and key name -> its
// primary (id, version). Both expire colcrypt.key_cache_ttl seconds after the
// fetch from keyd (0: nothing is kept past the call that fetched it). Evicted
// entries are destroyed and AeadKey wipes its schedule. One keyd exchange per
// key per TTL, never one per row; the last key used is remembered so that a
// scan over values of one key skips even the hash lookup.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "core/bytes.hpp"
#include "core/envelope.hpp"

namespace colcrypt::pg {

// A snapshot of the GUCs, taken by the Postgres side before the C++ part runs.
struct KeydSettings {
  const char* socket_path = nullptr;  // colcrypt.keyd_socket
  int timeout_ms = 5000;              // colcrypt.keyd_timeout
  int cache_ttl_s = 60;               // colcrypt.key_cache_ttl
  // Reads Postgres' interrupt flags; never throws, never longjmps.
  bool (*interrupted)() = nullptr;
  // Bracket each keyd exchange (pg_stat_activity shows the wait); plain stores.
  void (*wait_start)() = nullptr;
  void (*wait_end)() = nullptr;
};

// Seals plaintext under the primary version of key_name; writes
// sealed_size(plaintext.size) bytes to out.
void encrypt_value(const KeydSettings& settings, std::string_view key_name, PayloadType payload,
                   ByteView context, ByteView plaintext, uint8_t* out);

// Opens a structurally valid envelope with the key its header names; writes
// opened_size(envelope) bytes to out.
void decrypt_value(const KeydSettings& settings, ByteView envelope, ByteView context, uint8_t* out);

// The name of the key a header refers to. Key names are at most 63 bytes.
constexpr size_t kKeyNameCapacity = 64;
size_t key_name_of(const KeydSettings& settings, const EnvelopeHeader& header,
                   char (&out)[kKeyNameCapacity]);

// Drops (and wipes) every cached key: at backend exit.
void clear_key_cache() noexcept;
// Drops the entries older than ttl_s seconds: at transaction end.
void evict_expired_keys(int ttl_s) noexcept;

}  // namespace colcrypt::pg
