// The per-backend key cache (see key_cache.hpp). Postgres-free on purpose: it
// owns C++ objects and throws, so it must never see a Postgres header.
#include "pg/key_cache.hpp"

#include <time.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <list>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>

#include "client/client.hpp"
#include "core/aead.hpp"
#include "core/deterministic.hpp"
#include "core/envelope.hpp"
#include "core/error.hpp"
#include "core/kdf.hpp"
#include "core/secure_memory.hpp"
#include "core/wire.hpp"
#include "pg/guard.hpp"

#ifdef POSTGRES_H
#error "src/pg/key_cache.cpp must stay Postgres-free"
#endif

namespace colcrypt::pg {
namespace {

ClockGettime read_clock = ::clock_gettime;

int64_t now_ms() noexcept { return boottime_ms(); }

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

// A hash map of at most `capacity` items that drops the least recently used
// one to make room. Items live in a list, so a pointer to one stays valid
// until that item is removed; on_remove(item) hears of every removal first.
template <typename K, typename V, typename Hash = std::hash<K>>
class LruMap {
 public:
  using Item = std::pair<const K, V>;

  // At least 2: putting an item never evicts the one put or found just before.
  explicit LruMap(size_t capacity) : capacity_(std::max<size_t>(capacity, 2)) {}

  // k's item, now the most recently used; nullptr when absent.
  Item* find(const K& k) {
    auto it = index_.find(k);
    if (it == index_.end()) return nullptr;
    items_.splice(items_.begin(), items_, it->second);
    return &*it->second;
  }

  // Puts (k, v) first, in place of k's item if there is one; when full, the
  // least recently used item leaves to make room.
  template <typename OnRemove>
  Item& put(const K& k, V&& v, OnRemove&& on_remove) {
    if (auto it = index_.find(k); it != index_.end()) {
      on_remove(*it->second);
      items_.erase(it->second);
      index_.erase(it);
    } else if (items_.size() >= capacity_) {
      on_remove(items_.back());
      index_.erase(items_.back().first);
      items_.pop_back();
    }
    items_.emplace_front(k, std::move(v));
    try {
      index_.emplace(k, items_.begin());
    } catch (...) {
      items_.pop_front();
      throw;
    }
    return items_.front();
  }

  template <typename Pred, typename OnRemove>
  void remove_if(Pred&& pred, OnRemove&& on_remove) {
    for (auto it = items_.begin(); it != items_.end();) {
      if (!pred(*it)) {
        ++it;
        continue;
      }
      on_remove(*it);
      index_.erase(it->first);
      it = items_.erase(it);
    }
  }

  void clear() noexcept {
    index_.clear();
    items_.clear();
  }
  size_t size() const { return items_.size(); }
  bool empty() const { return items_.empty(); }

 private:
  size_t capacity_;
  std::list<Item> items_;  // most recently used first
  std::unordered_map<K, typename std::list<Item>::iterator, Hash> index_;
};

struct KeyEntry {
  AeadKey key;
  KeyId id;
  std::string name;
  int64_t fetched_ms;
  // The key bytes, in the cache's locked slab: derived-key values
  // (algorithm 3) derive from them, and so do the two keys below.
  SecretSlab::Slot version_key;
  // Derived on first use (KeyCache::siv_key, blind_mac): most versions only
  // ever encrypt and decrypt.
  SecretSlab::Slot siv_key;             // HKDF of the key bytes for deterministic values
  std::optional<HmacSha256> blind_mac;  // keyed with the HKDF for blind indexes (key_cache.hpp)
  // Bits (1 << wire::FetchPurpose) of the purposes keyd was told of when it
  // served this entry: the first deterministic or blind-index use of a cached
  // version fetches it again with its purpose, so that keyd always knows.
  unsigned reported = 0;
};

unsigned purpose_bit(wire::FetchPurpose p) { return 1u << static_cast<unsigned>(p); }

// Opens with the version key, or with the per-context key of a derived-key
// value (core/envelope.hpp derive_value_key).
void open_with(KeyEntry& entry, const EnvelopeHeader& header, ByteView envelope, ByteView context,
               uint8_t* out) {
  if (header.algorithm != Algorithm::Aes256GcmDerived)
    return open(entry.key, envelope, context, out);
  AeadKey derived(
      derive_value_key(entry.version_key.view(), header.key_id, header.key_version, context)
          .view());
  open(derived, envelope, context, out);
}

constexpr std::string_view kDeterministicSalt = "colcrypt deterministic";

constexpr std::string_view kBlindIndexSalt = "colcrypt blind index";

struct PrimaryEntry {
  VersionRef ref;
  int64_t fetched_ms;
  // Encryptions left of the block keyd charged for this fetch (issue 3): the
  // backend fetches again when it runs out, so a version never exceeds its cap.
  // A lookup's fetch asked for none and has none: the next encryption fetches
  // a real block.
  uint64_t uses_left = 0;
  uint32_t asked = 0;  // the block size this fetch asked for (0: a lookup)
};

// Uses asked for per fetch: kUseBlock first; a backend that spends a whole
// block before its cache entry expires (a bulk load) asks for twice as many
// next time, up to kMaxUseBlock. keyd charges blocks whole and cuts them to
// --max-block-uses and to 1/64 of the key's cap, so what a backend takes
// with it when it exits stays a small share of a version. With a TTL of 0
// nothing outlives the call, so a block would be charged and thrown away:
// such a backend asks for 1. A lookup that will not encrypt (blind index,
// deterministic values, rewrap's version check) asks for 0: keyd charges
// nothing for it.
constexpr uint32_t kUseBlock = 1024;
constexpr uint32_t kMaxUseBlock = 65536;

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
      if (dynamic_cast<const client::UntrustedKeyd*>(&e) != nullptr)
        throw SqlError(Errc::KeydUnavailable,
                       "refusing colcrypt-keyd at " + socket + ": it runs as an unexpected user",
                       e.what(),
                       "If colcrypt-keyd really runs as that uid, a superuser sets "
                       "colcrypt.keyd_uid to it (docs/operations.md).");
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
    case Errc::Io:  // a socket error, or keyd cannot serve keys now (its audit log)
      throw SqlError(Errc::ProtocolError, "colcrypt-keyd could not serve " + what, e.what());
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

// The backend keeps one connection to keyd between fetches: a statement
// meeting several key versions, a block refill or a TTL refresh costs no new
// connection (keyd closes it when idle; client::Client then reconnects).
client::Client& backend_client() {
  static client::Client client{client::ClientOptions{}};
  return client;
}

class KeyCache {
 public:
  // The key for an envelope header's (id, version). purpose: what the key is
  // for; keyd records deterministic and blind-index uses (wire::FetchPurpose).
  KeyEntry& by_version(const KeydSettings& s, const VersionRef& ref,
                       wire::FetchPurpose purpose = wire::FetchPurpose::Decrypt) {
    return by_version_at(s, ref, purpose, now_ms());
  }

  // by_version at a time the caller read: primary() reads the clock once per
  // value, not once for the name and again for its version.
  KeyEntry& by_version_at(const KeydSettings& s, const VersionRef& ref, wire::FetchPurpose purpose,
                          int64_t now) {
    const unsigned bit = purpose == wire::FetchPurpose::Decrypt ? 0 : purpose_bit(purpose);
    // last_ is always the most recently used entry: no reordering needed.
    if (last_ != nullptr && last_->first == ref &&
        fresh(last_->second.fetched_ms, s.cache_ttl_s, now) &&
        (last_->second.reported & bit) == bit)
      return last_->second;
    KeyMap::Item* found = keys_.find(ref);
    unsigned reported = bit;
    if (found != nullptr && fresh(found->second.fetched_ms, s.cache_ttl_s, now)) {
      if ((found->second.reported & bit) == bit) {
        last_ = found;
        return found->second;
      }
      reported |= found->second.reported;
    }
    const std::string what = describe(ref);
    wire::KeyReply reply = fetch(
        s, what, [&](client::Client& c) { return c.fetch_version(ref.id, ref.version, purpose); });
    if (reply.id != ref.id || reply.version != ref.version)
      throw SqlError(Errc::ProtocolError, "invalid reply from colcrypt-keyd for " + what,
                     "keyd answered with a different key or version");
    // Checked once here, so that every name the cache holds is valid (a
    // primary's reply must carry the valid name it was asked for).
    if (!valid_key_name(reply.name))
      throw SqlError(Errc::ProtocolError, "invalid reply from colcrypt-keyd for " + what,
                     "the key name is not a valid key name");
    if (reply.state == wire::KeyState::Disabled || reply.state == wire::KeyState::Destroyed)
      throw SqlError(Errc::KeyUnavailable, what + " is not available",
                     std::string("the version is ") + wire::key_state_name(reply.state));
    KeyEntry& entry = store(std::move(reply), s.cache_ttl_s, now);
    entry.reported = reported;
    return entry;
  }

  // The primary version of a named key; consume: one encryption is taken
  // from the block keyd granted (a new block is fetched when none is left).
  // Without consume this is a lookup: a fetch asks keyd for 0 uses.
  KeyEntry& primary(const KeydSettings& s, std::string_view name, VersionRef& ref,
                    bool consume = false) {
    const int64_t now = now_ms();
    if (last_primary_ != nullptr && last_primary_->first == name &&
        fresh(last_primary_->second.fetched_ms, s.cache_ttl_s, now) &&
        (!consume || last_primary_->second.uses_left > 0)) {
      ref = last_primary_->second.ref;
      if (consume) --last_primary_->second.uses_left;
      return by_version_at(s, ref, wire::FetchPurpose::Decrypt, now);
    }
    if (!valid_key_name(name))
      throw SqlError(Errc::InvalidArgument, "invalid colcrypt key name",
                     "Key names are 1 to 63 characters from A-Z, a-z, 0-9, '_', '.' and '-', "
                     "and do not start with '.' or '-'.");
    std::string key(name);
    PrimaryMap::Item* found = primaries_.find(key);
    if (found != nullptr && fresh(found->second.fetched_ms, s.cache_ttl_s, now) &&
        (!consume || found->second.uses_left > 0)) {
      last_primary_ = found;
      ref = found->second.ref;
      if (consume) --found->second.uses_left;
      return by_version_at(s, ref, wire::FetchPurpose::Decrypt, now);
    }
    const std::string what = describe(name);
    uint32_t ask = !consume ? 0 : s.cache_ttl_s > 0 ? kUseBlock : 1;
    if (consume && s.cache_ttl_s > 0 && found != nullptr && found->second.uses_left == 0 &&
        fresh(found->second.fetched_ms, s.cache_ttl_s, now)) {
      ask = std::min(kMaxUseBlock, std::max(kUseBlock, found->second.asked * 2));
    }
    uint64_t granted = 0;
    wire::KeyReply reply = fetch(s, what, [&](client::Client& c) {
      wire::KeyGrantReply grant = c.fetch_primary_block(name, ask);
      granted = grant.granted;
      return std::move(grant.key);
    });
    if (reply.name != name)
      throw SqlError(Errc::ProtocolError, "invalid reply from colcrypt-keyd for " + what,
                     "keyd answered with a key of another name");
    if (reply.state != wire::KeyState::Active)
      throw SqlError(Errc::KeyUnavailable, what + " has no active primary version",
                     std::string("its primary version is ") + wire::key_state_name(reply.state));
    ref = VersionRef{reply.id, reply.version};
    KeyEntry& entry = store(std::move(reply), s.cache_ttl_s, now);
    // store() may have evicted expired names (and freed `found`); the entry
    // it returns is the most recently used: putting a name evicts no version.
    last_primary_ = &primaries_.put(
        key, PrimaryEntry{ref, now, consume ? granted - 1 : granted, ask}, Forget{this});
    return entry;
  }

  // The SIV key of entry's version for deterministic values (key_cache.hpp).
  ByteView siv_key(KeyEntry& entry) {
    if (entry.siv_key.empty()) {
      const SecretBytes derived = hkdf_sha256(
          entry.version_key.view(), ByteView::of(kDeterministicSalt), ByteView(entry.id), 64);
      entry.siv_key = siv_keys_.acquire(derived.view());
    }
    return entry.siv_key.view();
  }

  // The blind-index MAC of entry's version (key_cache.hpp).
  HmacSha256& blind_mac(KeyEntry& entry) {
    if (!entry.blind_mac) {
      entry.blind_mac.emplace(hkdf_sha256(entry.version_key.view(), ByteView::of(kBlindIndexSalt),
                                          ByteView(entry.id), 32)
                                  .view());
    }
    return *entry.blind_mac;
  }

  void clear() noexcept {
    last_ = nullptr;
    last_primary_ = nullptr;
    keys_.clear();
    primaries_.clear();
  }

  void evict_expired(int ttl_s, int64_t now) noexcept {
    if (keys_.empty() && primaries_.empty()) return;
    keys_.remove_if([&](const auto& item) { return !fresh(item.second.fetched_ms, ttl_s, now); },
                    Forget{this});
    primaries_.remove_if(
        [&](const auto& item) { return !fresh(item.second.fetched_ms, ttl_s, now); }, Forget{this});
  }

  KeyCacheSize size() const {
    return {keys_.size(), primaries_.size(),
            version_keys_.slots_in_use() + siv_keys_.slots_in_use()};
  }

 private:
  using KeyMap = LruMap<VersionRef, KeyEntry, VersionRefHash>;
  using PrimaryMap = LruMap<std::string, PrimaryEntry>;

  // Hears of every removal from the maps: last_ and last_primary_ never dangle.
  struct Forget {
    KeyCache* cache;
    void operator()(const KeyMap::Item& item) const noexcept {
      if (cache->last_ == &item) cache->last_ = nullptr;
    }
    void operator()(const PrimaryMap::Item& item) const noexcept {
      if (cache->last_primary_ == &item) cache->last_primary_ = nullptr;
    }
  };

  template <typename Request>
  static wire::KeyReply fetch(const KeydSettings& s, const std::string& what, Request&& request) {
    client::Client& client = backend_client();
    wire::KeyReply reply;
    try {
      WaitReport waiting(s);
      client.set_options(client_options(s));
      reply = request(client);
    } catch (const Error& e) {
      rethrow_keyd_failure(e, s, what);
    }
    if (reply.key.size() != AeadKey::kKeySize)
      throw SqlError(Errc::ProtocolError, "invalid reply from colcrypt-keyd for " + what,
                     "the key has " + std::to_string(reply.key.size()) + " bytes, not 32");
    return reply;
  }

  // Caches a fetched version as the most recently used entry. When the cache
  // is full the least recently used entry leaves (its secrets wiped). A
  // KeyEntry& is used only until its caller's next call into the cache that
  // may fetch (encrypt_deterministic and blind_index discard what primary()
  // returns before by_version()); even so the entry got just before is the
  // most recently used but one, which a capacity of 2 or more never evicts.
  KeyEntry& store(wire::KeyReply reply, int ttl_s, int64_t now) {
    // A fetch is rare (once per key per TTL): the moment to drop stale keys.
    evict_expired(ttl_s, now);
    const VersionRef ref{reply.id, reply.version};
    AeadKey key(reply.key.view());  // the key schedule, computed once per fetch
    SecretSlab::Slot version_key = version_keys_.acquire(reply.key.view());
    // put() tells Forget first: last_ may point at the item it
    // replaces (found by ASan in pg_regress: a backend's new use block for
    // the version it holds) or evicts.
    KeyMap::Item& item =
        keys_.put(ref,
                  KeyEntry{std::move(key), reply.id, std::move(reply.name), now,
                           std::move(version_key), SecretSlab::Slot(), std::nullopt},
                  Forget{this});
    last_ = &item;
    return item.second;
  }

  // Declared before the maps: the slabs outlive the slots of their entries.
  SecretSlab version_keys_{AeadKey::kKeySize};  // 128 to a locked page
  SecretSlab siv_keys_{64};                     // 64 to a locked page
  KeyMap keys_{kKeyCacheCapacity};
  PrimaryMap primaries_{kKeyNameCacheCapacity};
  KeyMap::Item* last_ = nullptr;
  PrimaryMap::Item* last_primary_ = nullptr;
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
                   ByteView context, ByteView plaintext, uint8_t* out, Algorithm algorithm) {
  CallScope scope(settings);
  VersionRef ref;
  KeyEntry& entry = cache().primary(settings, key_name, ref, /*consume=*/true);
  if (algorithm != Algorithm::Aes256GcmDerived) {
    seal(entry.key, ref.id, ref.version, payload, context, plaintext, out);
    return;
  }
  AeadKey derived(derive_value_key(entry.version_key.view(), ref.id, ref.version, context).view());
  seal(derived, ref.id, ref.version, payload, context, plaintext, out, algorithm);
}

void decrypt_value(const KeydSettings& settings, const EnvelopeHeader& header, ByteView envelope,
                   ByteView context, uint8_t* out) {
  CallScope scope(settings);
  KeyEntry& entry = cache().by_version(settings, VersionRef{header.key_id, header.key_version});
  open_with(entry, header, envelope, context, out);
}

void verify_value(const KeydSettings& settings, ByteView envelope, ByteView context,
                  std::string_view expected_key_name, uint8_t* scratch) {
  CallScope scope(settings);
  const EnvelopeHeader header = parse_header(envelope);
  KeyEntry& entry = cache().by_version(settings, VersionRef{header.key_id, header.key_version});
  const std::string hint =
      "Assign the plaintext (or the value decrypted with colcrypt.decrypt_field()) instead: "
      "the column encrypts it under its own key and binding.";
  if (entry.name != expected_key_name)
    throw SqlError(Errc::InvalidArgument, "value is encrypted under another key than the column's",
                   "The value's key is \"" + entry.name + "\", the column's key is \"" +
                       std::string(expected_key_name) + "\".",
                   hint);
  const size_t n = opened_size(envelope);
  try {
    open_with(entry, header, envelope, context, scratch);
  } catch (const Error& e) {
    if (e.code() != Errc::DecryptionFailed) throw;
    throw SqlError(Errc::InvalidArgument, "value was not encrypted for this column",
                   "It does not authenticate with the column's binding (it was made by "
                   "colcrypt.encrypt_field() or copied from another column).",
                   hint);
  }
  secure_zero(scratch, n);
}

namespace {

VersionRef deterministic_ref(ByteView value) {
  const DeterministicHeader header = parse_deterministic(value);
  return VersionRef{header.key_id, header.key_version};
}

}  // namespace

void check_deterministic(ByteView value) { parse_deterministic(value); }

void encrypt_deterministic(const KeydSettings& settings, std::string_view key_name,
                           PayloadType payload, ByteView context, ByteView plaintext,
                           uint8_t* out) {
  CallScope scope(settings);
  VersionRef ref;
  cache().primary(settings, key_name, ref);
  ref.version = 1;  // the first version: equal plaintexts stay equal across rotations
  KeyEntry& entry = cache().by_version(settings, ref, wire::FetchPurpose::Deterministic);
  seal_deterministic(cache().siv_key(entry), ref.id, ref.version, payload, context, plaintext, out);
}

size_t deterministic_key_name(const KeydSettings& settings, ByteView value, char (&out)[64]) {
  CallScope scope(settings);
  const KeyEntry& entry =
      cache().by_version(settings, deterministic_ref(value), wire::FetchPurpose::Deterministic);
  static_assert(sizeof out > kMaxKeyNameSize, "room for every valid name");  // valid: by_version_at
  std::memcpy(out, entry.name.data(), entry.name.size());
  out[entry.name.size()] = '\0';
  return entry.name.size();
}

void decrypt_deterministic(const KeydSettings& settings, ByteView value, ByteView context,
                           uint8_t* out) {
  CallScope scope(settings);
  KeyEntry& entry =
      cache().by_version(settings, deterministic_ref(value), wire::FetchPurpose::Deterministic);
  open_deterministic(cache().siv_key(entry), value, context, out);
}

void report_denial(const KeydSettings& settings, const char* key_name, const char* privilege,
                   const char* role, const char* database) noexcept {
  try {
    client::ClientOptions options = client_options(settings);
    // A report must not hold up the error for long.
    options.timeout_ms = settings.timeout_ms < 1000 ? settings.timeout_ms : 1000;
    wire::DenialReport report{key_name, privilege, role, database};
    client::Client(std::move(options)).report_denial(report);
  } catch (...) {
    // keyd down or an old keyd: the denial still stands, Postgres logs it.
  }
}

void blind_index(const KeydSettings& settings, std::string_view key_name, ByteView data,
                 uint8_t (&out)[kBlindIndexSize]) {
  CallScope scope(settings);
  VersionRef ref;
  cache().primary(settings, key_name, ref);
  KeyEntry& first =
      cache().by_version(settings, VersionRef{ref.id, 1}, wire::FetchPurpose::BlindIndex);
  const std::array<uint8_t, 32> mac = cache().blind_mac(first).mac(data);
  std::memcpy(out, mac.data(), kBlindIndexSize);
}

size_t key_name_of(const KeydSettings& settings, const EnvelopeHeader& header,
                   char (&out)[kKeyNameCapacity]) {
  CallScope scope(settings);
  const KeyEntry& entry =
      cache().by_version(settings, VersionRef{header.key_id, header.key_version});
  static_assert(kKeyNameCapacity > kMaxKeyNameSize,
                "room for every valid name");  // valid: by_version_at
  std::memcpy(out, entry.name.data(), entry.name.size());
  out[entry.name.size()] = '\0';
  return entry.name.size();
}

uint32_t primary_version(const KeydSettings& settings, std::string_view key_name) {
  CallScope scope(settings);
  VersionRef ref;
  cache().primary(settings, key_name, ref);
  return ref.version;
}

void clear_key_cache() noexcept {
  if (the_cache != nullptr) the_cache->clear();
}

client::ClientOptions client_options(const KeydSettings& settings) {
  client::ClientOptions options;
  options.socket_path = settings.socket_path;
  options.timeout_ms = settings.timeout_ms;
  options.interrupted = settings.interrupted;
  if (settings.keyd_uid >= 0) options.keyd_uid = static_cast<uid_t>(settings.keyd_uid);
  return options;
}

int64_t boottime_ms() noexcept {
  struct timespec ts {};
  read_clock(CLOCK_BOOTTIME, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
}

void set_key_cache_clock(ClockGettime clock_gettime_fn) noexcept {
  read_clock = clock_gettime_fn != nullptr ? clock_gettime_fn : ::clock_gettime;
}

void evict_expired_keys(int ttl_s) noexcept {
  if (the_cache != nullptr) the_cache->evict_expired(ttl_s, now_ms());
}

KeyCacheSize key_cache_size() noexcept {
  return the_cache != nullptr ? the_cache->size() : KeyCacheSize{};
}

}  // namespace colcrypt::pg
