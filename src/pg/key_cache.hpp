// The per-backend key cache and the C++ halves of the SQL functions that need
// a key. Postgres-free: callers in src/pg run these only through guarded()
// (guard.hpp); everything here reports failures by throwing.
//
// Cache: (key id, version) -> AES key schedule + name, and key name -> its
// primary (id, version). Both expire colcrypt.key_cache_ttl seconds after the
// fetch from keyd (0: nothing is kept past the call that fetched it), and each
// holds at most kKeyCacheCapacity versions (kKeyNameCacheCapacity names):
// beyond that the least recently
// used one leaves (a statement meeting more versions still works, with more
// keyd fetches). Key bytes live in locked slabs, 128 to a page (SecretSlab);
// the SIV and blind-index keys are derived on a version's first deterministic
// or blind-index use. Evicted entries are destroyed: their slots are wiped and
// AeadKey wipes its schedule. One keyd exchange per key per TTL, never one per
// row; the last key used is remembered so that a scan over values of one key
// skips even the hash lookup.
#pragma once
#include <time.h>

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "client/client.hpp"
#include "core/bytes.hpp"
#include "core/deterministic.hpp"
#include "core/envelope.hpp"

namespace colcrypt::pg {

// A snapshot of the GUCs, taken by the Postgres side before the C++ part runs.
struct KeydSettings {
  const char* socket_path = nullptr;  // colcrypt.keyd_socket
  int timeout_ms = 5000;              // colcrypt.keyd_timeout
  int cache_ttl_s = 60;               // colcrypt.key_cache_ttl
  int64_t keyd_uid = -1;              // colcrypt.keyd_uid; -1: unset (client.hpp, keyd_uid)
  // Reads Postgres' interrupt flags; never throws, never longjmps.
  bool (*interrupted)() = nullptr;
  // Bracket each keyd exchange (pg_stat_activity shows the wait); plain stores.
  void (*wait_start)() = nullptr;
  void (*wait_end)() = nullptr;
};

// Seals plaintext under the primary version of key_name; writes
// sealed_size(plaintext.size) bytes to out.
// Algorithm::Aes256GcmDerived seals under the per-context key derived from
// the primary version (derived keys, docs/rotation.md); decrypt_value and
// verify_value open both kinds.
void encrypt_value(const KeydSettings& settings, std::string_view key_name, PayloadType payload,
                   ByteView context, ByteView plaintext, uint8_t* out,
                   Algorithm algorithm = Algorithm::Aes256Gcm);

// Opens a structurally valid envelope with the key its header (parse_header
// of this envelope, which the caller has already made) names; writes
// opened_size(envelope) bytes to out.
void decrypt_value(const KeydSettings& settings, const EnvelopeHeader& header, ByteView envelope,
                   ByteView context, uint8_t* out);

// Checks that a sealed value belongs where it is being stored: its key is
// named expected_key_name and it authenticates with context. scratch receives
// the plaintext (opened_size bytes) and is wiped before this returns or throws.
// Throws SqlError(InvalidArgument) when the key or the context differs.
void verify_value(const KeydSettings& settings, ByteView envelope, ByteView context,
                  std::string_view expected_key_name, uint8_t* scratch);

// The blind index of data under key_name: HMAC-SHA256 with a key derived by
// HKDF-SHA256 from version 1 of the named key (never the encryption key
// itself): ikm = the version's key bytes, salt = "colcrypt blind index",
// info = key id. Version 1 so that rotation does not change the index.
constexpr size_t kBlindIndexSize = 32;
void blind_index(const KeydSettings& settings, std::string_view key_name, ByteView data,
                 uint8_t (&out)[kBlindIndexSize]);

// Deterministic values (docs/columns.md, core/deterministic.hpp): AES-256-SIV
// under a 64-byte key derived by HKDF-SHA256 from version 1 of the named key
// (salt "colcrypt deterministic", info = key id), so that rotation keeps
// equal plaintexts equal.
using colcrypt::kDeterministicOverhead;
void encrypt_deterministic(const KeydSettings& settings, std::string_view key_name,
                           PayloadType payload, ByteView context, ByteView plaintext, uint8_t* out);
// Structure check without a key; throws Errc::MalformedValue.
void check_deterministic(ByteView value);
// The key name of a structurally valid deterministic value.
size_t deterministic_key_name(const KeydSettings& settings, ByteView value, char (&out)[64]);
// Opens a deterministic value into out (value.size - kDeterministicOverhead
// bytes); throws Errc::DecryptionFailed (one message) when it does not
// authenticate.
void decrypt_deterministic(const KeydSettings& settings, ByteView value, ByteView context,
                           uint8_t* out);

// Tells keyd (best effort, errors ignored) that the extension refused role
// the use of key_name, so that keyd's log records it.
void report_denial(const KeydSettings& settings, const char* key_name, const char* privilege,
                   const char* role, const char* database) noexcept;

// The name of the key a header refers to. Key names are at most 63 bytes.
constexpr size_t kKeyNameCapacity = 64;
size_t key_name_of(const KeydSettings& settings, const EnvelopeHeader& header,
                   char (&out)[kKeyNameCapacity]);

// The version encrypt_value would use now for key_name (the cached primary,
// fetched when missing). For colcrypt.rewrap (src/pg/lifecycle.cpp).
uint32_t primary_version(const KeydSettings& settings, std::string_view key_name);

// The clock the TTL counts on: CLOCK_BOOTTIME, in milliseconds. It keeps
// counting while the machine is suspended, where CLOCK_MONOTONIC stops: a
// backend resumed after a long suspend fetches its keys again instead of
// encrypting under a version that keyd retired or destroyed meanwhile. It is
// read once per value (about 30 ns of CPU; the two CLOCK_MONOTONIC_COARSE
// reads it replaced took 16 ns: bench/core_bench.cpp, BM_CacheClock*).
int64_t boottime_ms() noexcept;
// How boottime_ms reads the kernel's clocks: clock_gettime. Tests replace it
// with clocks of their own, e.g. one where a suspend moves CLOCK_BOOTTIME
// and no other clock; nullptr restores clock_gettime.
using ClockGettime = int (*)(clockid_t, struct timespec*);
void set_key_cache_clock(ClockGettime clock_gettime_fn) noexcept;

// The keyd client's options for these settings.
client::ClientOptions client_options(const KeydSettings& settings);

// The most key versions a backend caches. A full cache takes 128 KiB of
// locked memory for the key bytes (plus 64 bytes per version used for
// deterministic values) and about 11 MB in all: 2.6 kB per version, mostly
// AeadKey's two OpenSSL cipher contexts (bench/ANALYSIS.md).
constexpr size_t kKeyCacheCapacity = 4096;
// The most key names (name -> primary, about 100 bytes each, no secret). Far
// higher: an evicted name takes with it the uses keyd already charged to its
// block, so a backend cycling through more names than this would spend a
// version's usage cap in a few dozen encryptions.
constexpr size_t kKeyNameCacheCapacity = 65536;

// What the cache holds now: for tests and the memory benchmark.
struct KeyCacheSize {
  size_t versions = 0;
  size_t names = 0;
  size_t secret_slots = 0;  // slab slots in use: key bytes and SIV keys
};
KeyCacheSize key_cache_size() noexcept;

// Drops (and wipes) every cached key: at backend exit.
void clear_key_cache() noexcept;
// Drops the entries older than ttl_s seconds: at transaction end.
void evict_expired_keys(int ttl_s) noexcept;

}  // namespace colcrypt::pg
