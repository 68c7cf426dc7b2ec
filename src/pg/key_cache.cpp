// The per-backend key cache (see key_cache.hpp). Postgres-free on purpose: it
// owns C++ objects and throws, so it must never see a Postgres header.
#include "pg/key_cache.hpp"

#include <time.h>

#include <cstring>
#include <string>
#include <unordered_map>
#include <utility>

#include "core/aead.hpp"
#include "core/envelope.hpp"
#include "core/error.hpp"
#include "core/wire.hpp"
#include "keyd/client.hpp"
#include "pg/guard.hpp"

#ifdef POSTGRES_H
#error "src/pg/key_cache.cpp must stay Postgres-free"
#endif

namespace colcrypt::pg {
namespace {

// CLOCK_MONOTONIC_COARSE: a few ns per read, millisecond-ish resolution, which
// is plenty for a TTL counted in seconds and cheap enough to read per row.
int64_t now_ms() noexcept {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
}

bool fresh(int64_t fetched_ms, int ttl_s, int64_t now) noexcept {
  return ttl_s > 0 && now - fetched_ms < static_cast<int64_t>(ttl_s) * 1000;
}

struct VersionRef {
  KeyId id{};
  uint32_t version = 0;
  bool operator==(const VersionRef& o) const noexcept { return version == o.version && id == o.id; }
};

struct VersionRefHash {
  size_t operator()(const VersionRef& r) const noexcept {
    // Key ids are random (UUID v4): a few of their bytes hash well enough.
    uint64_t a;
    uint64_t b;
    std::memcpy(&a, r.id.data(), 8);
    std::memcpy(&b, r.id.data() + 8, 8);
    return static_cast<size_t>(a ^ (b * 0x9E3779B97F4A7C15ull) ^ r.version);
  }
};

struct KeyEntry {
  AeadKey key;
  std::string name;
  int64_t fetched_ms;
};

struct PrimaryEntry {
  VersionRef ref;
  int64_t fetched_ms;
};

std::string describe(const VersionRef& ref) {
  return "colcrypt key " + format_key_id(ref.id) + " version " + std::to_string(ref.version);
}

std::string describe(std::string_view name) { return "colcrypt key \"" + std::string(name) + "\""; }

// Turns a keyd client failure into the error SQL shows: a message naming the
// key (or keyd's socket), keyd's own words in the detail.
[[noreturn]] void rethrow_keyd_failure(const Error& e, const KeydSettings& s,
                                       const std::string& what) {
  const std::string socket = std::string("\"") + s.socket_path + "\"";
  switch (e.code()) {
    case Errc::Cancelled:
      throw Error(Errc::Cancelled, "colcrypt-keyd request interrupted");
    case Errc::KeyNotFound:
      throw SqlError(Errc::KeyNotFound, what + " not found");
    case Errc::KeyUnavailable:
      throw SqlError(Errc::KeyUnavailable, what + " is not available", e.what());
    case Errc::PermissionDenied:
      throw SqlError(Errc::PermissionDenied, "colcrypt-keyd refused access to " + what, e.what(),
                     "colcrypt-keyd serves keys only to the uids given with --allow-uid; the "
                     "database server's uid must be one of them.");
    case Errc::KeydUnavailable:
      throw SqlError(Errc::KeydUnavailable, "could not connect to colcrypt-keyd at " + socket,
                     e.what(),
                     "Check that colcrypt-keyd is running and that colcrypt.keyd_socket names "
                     "its socket.");
    case Errc::KeydTimeout:
      throw SqlError(Errc::KeydTimeout,
                     "colcrypt-keyd at " + socket + " did not answer within " +
                         std::to_string(s.timeout_ms) + " ms",
                     e.what(), "colcrypt.keyd_timeout sets this limit.");
    case Errc::ProtocolError:
      throw SqlError(Errc::ProtocolError, "invalid reply from colcrypt-keyd at " + socket,
                     e.what());
    case Errc::InvalidArgument:
      throw SqlError(Errc::InvalidArgument, "colcrypt-keyd rejected the request for " + what,
                     e.what());
    default:
      throw SqlError(Errc::Internal, "colcrypt-keyd request for " + what + " failed", e.what());
  }
}

// Reports a wait for keyd while it lasts.
class WaitReport {
 public:
  explicit WaitReport(const KeydSettings& s) : end_(s.wait_end) {
    if (s.wait_start != nullptr) s.wait_start();
  }
  ~WaitReport() {
    if (end_ != nullptr) end_();
  }
  WaitReport(const WaitReport&) = delete;
  WaitReport& operator=(const WaitReport&) = delete;

 private:
  void (*end_)();
};

class KeyCache {
 public:
  // The key for an envelope header's (id, version).
  KeyEntry& by_version(const KeydSettings& s, const VersionRef& ref) {
    const int64_t now = now_ms();
    if (last_ != nullptr && last_->first == ref &&
        fresh(last_->second.fetched_ms, s.cache_ttl_s, now))
      return last_->second;
    auto it = keys_.find(ref);
    if (it != keys_.end() && fresh(it->second.fetched_ms, s.cache_ttl_s, now)) {
      last_ = &*it;
      return it->second;
    }
    const std::string what = describe(ref);
    wire::KeyReply reply =
        fetch(s, what, [&](keyd::Client& c) { return c.fetch_version(ref.id, ref.version); });
    if (reply.id != ref.id || reply.version != ref.version)
      throw SqlError(Errc::ProtocolError, "invalid reply from colcrypt-keyd for " + what,
                     "keyd answered with a different key or version");
    if (reply.state == wire::KeyState::Disabled || reply.state == wire::KeyState::Destroyed)
      throw SqlError(Errc::KeyUnavailable, what + " is not available",
                     std::string("the version is ") + wire::key_state_name(reply.state));
    return store(std::move(reply), s.cache_ttl_s, now);
  }

  // The primary version of a named key (for encryption).
  KeyEntry& primary(const KeydSettings& s, std::string_view name, VersionRef& ref) {
    const int64_t now = now_ms();
    if (last_primary_ != nullptr && last_primary_->first == name &&
        fresh(last_primary_->second.fetched_ms, s.cache_ttl_s, now)) {
      ref = last_primary_->second.ref;
      return by_version(s, ref);
    }
    if (!valid_key_name(name))
      throw SqlError(Errc::InvalidArgument, "invalid colcrypt key name",
                     "Key names are 1 to 63 characters from A-Z, a-z, 0-9, '_', '.' and '-', "
                     "and do not start with '.' or '-'.");
    std::string key(name);
    auto it = primaries_.find(key);
    if (it != primaries_.end() && fresh(it->second.fetched_ms, s.cache_ttl_s, now)) {
      last_primary_ = &*it;
      ref = it->second.ref;
      return by_version(s, ref);
    }
    const std::string what = describe(name);
    wire::KeyReply reply = fetch(s, what, [&](keyd::Client& c) { return c.fetch_primary(name); });
    if (reply.name != name)
      throw SqlError(Errc::ProtocolError, "invalid reply from colcrypt-keyd for " + what,
                     "keyd answered with a key of another name");
    if (reply.state != wire::KeyState::Active)
      throw SqlError(Errc::KeyUnavailable, what + " has no active primary version",
                     std::string("its primary version is ") + wire::key_state_name(reply.state));
    ref = VersionRef{reply.id, reply.version};
    KeyEntry& entry = store(std::move(reply), s.cache_ttl_s, now);
    // store() may have evicted expired names (and invalidated `it`).
    auto [slot, inserted] = primaries_.insert_or_assign(std::move(key), PrimaryEntry{ref, now});
    (void)inserted;
    last_primary_ = &*slot;
    return entry;
  }

  void clear() noexcept {
    last_ = nullptr;
    last_primary_ = nullptr;
    keys_.clear();
    primaries_.clear();
  }

  void evict_expired(int ttl_s, int64_t now) noexcept {
    if (keys_.empty() && primaries_.empty()) return;
    for (auto it = keys_.begin(); it != keys_.end();) {
      if (fresh(it->second.fetched_ms, ttl_s, now)) {
        ++it;
      } else {
        if (last_ == &*it) last_ = nullptr;
        it = keys_.erase(it);
      }
    }
    for (auto it = primaries_.begin(); it != primaries_.end();) {
      if (fresh(it->second.fetched_ms, ttl_s, now)) {
        ++it;
      } else {
        if (last_primary_ == &*it) last_primary_ = nullptr;
        it = primaries_.erase(it);
      }
    }
  }

 private:
  using KeyMap = std::unordered_map<VersionRef, KeyEntry, VersionRefHash>;
  using PrimaryMap = std::unordered_map<std::string, PrimaryEntry>;

  template <typename Request>
  static wire::KeyReply fetch(const KeydSettings& s, const std::string& what, Request&& request) {
    keyd::ClientOptions options;
    options.socket_path = s.socket_path;
    options.timeout_ms = s.timeout_ms;
    options.interrupted = s.interrupted;
    wire::KeyReply reply;
    try {
      WaitReport waiting(s);
      keyd::Client client(std::move(options));
      reply = request(client);
    } catch (const Error& e) {
      rethrow_keyd_failure(e, s, what);
    }
    if (reply.key.size() != AeadKey::kKeySize)
      throw SqlError(Errc::ProtocolError, "invalid reply from colcrypt-keyd for " + what,
                     "the key has " + std::to_string(reply.key.size()) + " bytes, not 32");
    return reply;
  }

  KeyEntry& store(wire::KeyReply reply, int ttl_s, int64_t now) {
    // A fetch is rare (once per key per TTL): the moment to drop stale keys.
    evict_expired(ttl_s, now);
    const VersionRef ref{reply.id, reply.version};
    AeadKey key(reply.key.view());  // the key schedule, computed once per fetch
    keys_.erase(ref);
    if (last_ != nullptr && last_->first == ref) last_ = nullptr;
    auto [it, inserted] = keys_.emplace(ref, KeyEntry{std::move(key), std::move(reply.name), now});
    (void)inserted;
    last_ = &*it;
    return it->second;
  }

  KeyMap keys_;
  PrimaryMap primaries_;
  KeyMap::value_type* last_ = nullptr;
  PrimaryMap::value_type* last_primary_ = nullptr;
};

// Created on first use and never destroyed: a static destructor would run at
// exit(), after OpenSSL's own atexit cleanup. The backend's on_proc_exit
// callback wipes it instead (clear_key_cache).
KeyCache* the_cache = nullptr;

KeyCache& cache() {
  if (the_cache == nullptr) the_cache = new KeyCache();
  return *the_cache;
}

// With colcrypt.key_cache_ttl = 0 nothing outlives the call that fetched it,
// whether that call succeeds or throws.
class CallScope {
 public:
  explicit CallScope(const KeydSettings& s) : ttl_s_(s.cache_ttl_s) {}
  ~CallScope() {
    if (ttl_s_ <= 0) clear_key_cache();
  }
  CallScope(const CallScope&) = delete;
  CallScope& operator=(const CallScope&) = delete;

 private:
  int ttl_s_;
};

}  // namespace

void encrypt_value(const KeydSettings& settings, std::string_view key_name, PayloadType payload,
                   ByteView context, ByteView plaintext, uint8_t* out) {
  CallScope scope(settings);
  VersionRef ref;
  KeyEntry& entry = cache().primary(settings, key_name, ref);
  seal(entry.key, ref.id, ref.version, payload, context, plaintext, out);
}

void decrypt_value(const KeydSettings& settings, ByteView envelope, ByteView context,
                   uint8_t* out) {
  CallScope scope(settings);
  const EnvelopeHeader header = parse_header(envelope);
  KeyEntry& entry = cache().by_version(settings, VersionRef{header.key_id, header.key_version});
  open(entry.key, envelope, context, out);
}

size_t key_name_of(const KeydSettings& settings, const EnvelopeHeader& header,
                   char (&out)[kKeyNameCapacity]) {
  CallScope scope(settings);
  const KeyEntry& entry =
      cache().by_version(settings, VersionRef{header.key_id, header.key_version});
  if (!valid_key_name(entry.name) || entry.name.size() >= kKeyNameCapacity)
    throw SqlError(Errc::ProtocolError, "invalid reply from colcrypt-keyd",
                   "the key name is not a valid key name");
  std::memcpy(out, entry.name.data(), entry.name.size());
  out[entry.name.size()] = '\0';
  return entry.name.size();
}

void clear_key_cache() noexcept {
  if (the_cache != nullptr) the_cache->clear();
}

void evict_expired_keys(int ttl_s) noexcept {
  if (the_cache != nullptr) the_cache->evict_expired(ttl_s, now_ms());
}

}  // namespace colcrypt::pg
