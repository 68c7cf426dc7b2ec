// The extension's backend key cache (src/pg/key_cache.cpp, Postgres-free)
// against a fake keyd: its TTL counts on CLOCK_BOOTTIME, read through a
// clock_gettime that tests replace with a fake machine's clocks (a suspend
// moves CLOCK_BOOTTIME and no other clock).
#include <time.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "core/deterministic.hpp"
#include "core/envelope.hpp"
#include "core/kdf.hpp"
#include "core/wire.hpp"
#include "fake_keyd.hpp"
#include "pg/key_cache.hpp"

using namespace colcrypt;
using colcrypt::test::Answer;
using colcrypt::test::FakeKeyd;

namespace {

// The fake machine's clocks: fake_now ms since boot, of which fake_suspended
// were spent suspended (CLOCK_BOOTTIME counts them, CLOCK_MONOTONIC and its
// coarse form do not).
std::atomic<int64_t> fake_now{0};
std::atomic<int64_t> fake_suspended{0};
int fake_clock(clockid_t id, struct timespec* ts) {
  const int64_t ms =
      id == CLOCK_BOOTTIME ? fake_now.load() : fake_now.load() - fake_suspended.load();
  ts->tv_sec = ms / 1000;
  ts->tv_nsec = (ms % 1000) * 1000000;
  return 0;
}

int64_t ms_of(const timespec& ts) {
  return static_cast<int64_t>(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
}

// A keyd serving one key "k" (version 1), counting the fetches of each kind.
class OneKeyKeyd {
 public:
  explicit OneKeyKeyd(std::string name = "k")
      : id_(new_key_id()),
        name_(std::move(name)),
        keyd_([this](const wire::Frame& f) -> Answer { return answer(f); }) {}
  const std::string& path() const { return keyd_.path(); }
  const KeyId& id() const { return id_; }
  int primary_fetches() const { return primary_fetches_; }
  int version_fetches() const { return version_fetches_; }

 private:
  std::vector<uint8_t> answer(const wire::Frame& f) {
    wire::KeyReply r;
    r.id = id_;
    r.version = 1;
    r.state = wire::KeyState::Active;
    r.name = name_;
    r.key = SecretBytes(32);
    std::memset(r.key.data(), 0x11, 32);
    SecretBytes frame;
    if (f.type == wire::MsgType::FetchPrimaryBlock) {
      uint32_t wanted = 0;
      wire::decode_fetch_primary_block(ByteView(f.body), wanted);
      ++primary_fetches_;
      frame = wire::encode_key_grant(r, wanted);
    } else if (f.type == wire::MsgType::FetchVersion) {
      ++version_fetches_;
      frame = wire::encode_key_reply(r);
    } else {
      return wire::encode_failure(wire::FailureCode::BadRequest, "unexpected request");
    }
    return std::vector<uint8_t>(frame.data(), frame.data() + frame.size());
  }

  KeyId id_;
  std::string name_;
  std::atomic<int> primary_fetches_{0};
  std::atomic<int> version_fetches_{0};
  FakeKeyd keyd_;  // last: its thread calls answer(), so it stops first
};

pg::KeydSettings settings_for(const std::string& path, int ttl_s) {
  pg::KeydSettings s;
  s.socket_path = path.c_str();
  s.timeout_ms = 3000;
  s.cache_ttl_s = ttl_s;
  return s;
}

std::vector<uint8_t> encrypt(const pg::KeydSettings& s) {
  const ByteView plaintext = ByteView::of("4111 1111 1111 1111");
  std::vector<uint8_t> out(sealed_size(plaintext.size));
  pg::encrypt_value(s, "k", PayloadType::Text, ByteView::of("ctx"), plaintext, out.data());
  return out;
}

void decrypt(const pg::KeydSettings& s, const std::vector<uint8_t>& value) {
  std::vector<uint8_t> out(opened_size(ByteView(value)));
  pg::decrypt_value(s, parse_header(ByteView(value)), ByteView(value), ByteView::of("ctx"),
                    out.data());
}

// Every test starts and leaves with the cache empty, and leaves it on its real clock.
struct CacheReset {
  CacheReset() { pg::clear_key_cache(); }
  ~CacheReset() {
    pg::clear_key_cache();
    pg::set_key_cache_clock(nullptr);
  }
};

}  // namespace

TEST_CASE("key cache: the TTL expires on the cache clock's time", "[key_cache]") {
  OneKeyKeyd keyd;
  CacheReset reset;
  pg::set_key_cache_clock(fake_clock);
  const pg::KeydSettings s = settings_for(keyd.path(), 60);
  fake_now = 5'000'000;

  const std::vector<uint8_t> value = encrypt(s);
  CHECK(keyd.primary_fetches() == 1);
  decrypt(s, value);  // the version came with the primary
  CHECK(keyd.version_fetches() == 0);

  fake_now += 59'999;  // 1 ms short of the TTL: everything still cached
  encrypt(s);
  decrypt(s, value);
  CHECK(keyd.primary_fetches() == 1);
  CHECK(keyd.version_fetches() == 0);

  fake_now += 1;  // the TTL on the dot: the primary is fetched again
  encrypt(s);
  CHECK(keyd.primary_fetches() == 2);

  fake_now += 60'000;  // and the version a decryption needs
  decrypt(s, value);
  CHECK(keyd.version_fetches() == 1);
  decrypt(s, value);
  CHECK(keyd.version_fetches() == 1);
}

TEST_CASE("key cache: a new use block for the version it holds replaces the cached entry",
          "[key_cache]") {
  // The block of 1024 uses runs out while the version is cached (and is the
  // last one used): the fetch of the next block stores the same version
  // again. Under ASan this read freed memory (key_cache.cpp, store()).
  OneKeyKeyd keyd;
  CacheReset reset;
  pg::set_key_cache_clock(fake_clock);
  const pg::KeydSettings s = settings_for(keyd.path(), 60);
  fake_now = 1'000;
  std::vector<uint8_t> value;
  for (int i = 0; i < 1025; ++i) {
    value = encrypt(s);
    decrypt(s, value);
  }
  CHECK(keyd.primary_fetches() == 2);
  CHECK(keyd.version_fetches() == 0);
  decrypt(s, value);
}

TEST_CASE("key cache: time the machine spent suspended counts", "[key_cache]") {
  // A night in suspend moves CLOCK_BOOTTIME by eight hours and the monotonic
  // clocks not at all: the entries fetched before it must be stale.
  OneKeyKeyd keyd;
  CacheReset reset;
  pg::set_key_cache_clock(fake_clock);
  const pg::KeydSettings s = settings_for(keyd.path(), 60);
  fake_now = 1'000;
  fake_suspended = 0;
  const std::vector<uint8_t> value = encrypt(s);
  decrypt(s, value);
  CHECK(keyd.version_fetches() == 0);  // the primary's entry serves it
  fake_now += 8LL * 3600 * 1000;
  fake_suspended += 8LL * 3600 * 1000;
  timespec monotonic{};
  fake_clock(CLOCK_MONOTONIC, &monotonic);
  REQUIRE(ms_of(monotonic) == 1'000);  // a clock that stopped would still say fresh
  decrypt(s, value);
  CHECK(keyd.version_fetches() == 1);
  encrypt(s);
  CHECK(keyd.primary_fetches() == 2);
}

TEST_CASE("key cache: the real clock is CLOCK_BOOTTIME", "[key_cache]") {
  timespec before;
  timespec after;
  clock_gettime(CLOCK_BOOTTIME, &before);
  const int64_t now = pg::boottime_ms();
  clock_gettime(CLOCK_BOOTTIME, &after);
  CHECK(ms_of(before) <= now);
  CHECK(now <= ms_of(after));
  // On a machine that was ever suspended, CLOCK_MONOTONIC lags behind by the
  // time spent suspended, and this tells the two apart.
  timespec monotonic;
  clock_gettime(CLOCK_MONOTONIC, &monotonic);
  if (ms_of(after) - ms_of(monotonic) > 1000) CHECK(now - ms_of(monotonic) > 1000);
}

TEST_CASE("key cache: without an injected clock the TTL runs in real time", "[key_cache]") {
  OneKeyKeyd keyd;
  CacheReset reset;
  pg::set_key_cache_clock(fake_clock);
  pg::set_key_cache_clock(nullptr);  // back to boottime_ms
  const pg::KeydSettings s = settings_for(keyd.path(), 1);
  encrypt(s);
  encrypt(s);
  CHECK(keyd.primary_fetches() == 1);
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));
  encrypt(s);
  CHECK(keyd.primary_fetches() == 2);
}

namespace {

// A keyd serving keys "k0", "k1", ...: key n has the id n_id(n), its primary
// is version `primary`, and it serves any version v with key bytes
// key_bytes(n, v). Counts the fetches of each kind.
class ManyKeysKeyd {
 public:
  ManyKeysKeyd() : keyd_([this](const wire::Frame& f) -> Answer { return answer(f); }) {}
  const std::string& path() const { return keyd_.path(); }
  int primary_fetches() const { return primary_fetches_; }
  int version_fetches() const { return version_fetches_; }
  int fetches() const { return primary_fetches_ + version_fetches_; }
  std::atomic<uint32_t> primary{1};

  static KeyId id_of(uint32_t n) {
    KeyId id{};
    for (size_t i = 0; i < id.size(); ++i) id[i] = static_cast<uint8_t>(0xA0 + i * 7);
    std::memcpy(id.data(), &n, sizeof n);
    return id;
  }
  static std::vector<uint8_t> key_bytes(uint32_t n, uint32_t version) {
    std::vector<uint8_t> key(32, static_cast<uint8_t>(n * 31 + version));
    std::memcpy(key.data(), &version, sizeof version);
    std::memcpy(key.data() + 8, &n, sizeof n);
    return key;
  }

 private:
  std::vector<uint8_t> reply_for(uint32_t n, uint32_t version, bool grant, uint32_t wanted) {
    wire::KeyReply r;
    r.id = id_of(n);
    r.version = version;
    r.state = wire::KeyState::Active;
    r.name = "k" + std::to_string(n);
    const std::vector<uint8_t> key = key_bytes(n, version);
    r.key = SecretBytes(ByteView(key));
    SecretBytes frame = grant ? wire::encode_key_grant(r, wanted) : wire::encode_key_reply(r);
    return std::vector<uint8_t>(frame.data(), frame.data() + frame.size());
  }
  std::vector<uint8_t> answer(const wire::Frame& f) {
    KeyId id{};
    uint32_t version = 0;
    if (f.type == wire::MsgType::FetchPrimaryBlock) {
      uint32_t wanted = 0;
      const std::string name = wire::decode_fetch_primary_block(ByteView(f.body), wanted);
      ++primary_fetches_;
      return reply_for(static_cast<uint32_t>(std::stoul(name.substr(1))), primary, true, wanted);
    }
    if (f.type == wire::MsgType::FetchVersion) {
      wire::decode_fetch_version(ByteView(f.body), id, version);
    } else if (f.type == wire::MsgType::FetchVersionFor) {
      wire::FetchPurpose purpose{};
      wire::decode_fetch_version_for(ByteView(f.body), id, version, purpose);
    } else {
      return wire::encode_failure(wire::FailureCode::BadRequest, "unexpected request");
    }
    ++version_fetches_;
    uint32_t n = 0;
    std::memcpy(&n, id.data(), sizeof n);
    return reply_for(n, version, false, 0);
  }

  std::atomic<int> primary_fetches_{0};
  std::atomic<int> version_fetches_{0};
  FakeKeyd keyd_;  // last: its thread calls answer(), so it stops first
};

std::string hex(const uint8_t* p, size_t n) {
  static const char* digits = "0123456789abcdef";
  std::string s;
  for (size_t i = 0; i < n; ++i) {
    s += digits[p[i] >> 4];
    s += digits[p[i] & 15];
  }
  return s;
}

std::vector<uint8_t> deterministic(const pg::KeydSettings& s, const std::string& name,
                                   std::string_view plaintext) {
  std::vector<uint8_t> out(plaintext.size() + pg::kDeterministicOverhead);
  pg::encrypt_deterministic(s, name, PayloadType::Text, ByteView::of("ctx"),
                            ByteView::of(plaintext), out.data());
  return out;
}

std::string blind(const pg::KeydSettings& s, const std::string& name, std::string_view data) {
  uint8_t out[pg::kBlindIndexSize];
  pg::blind_index(s, name, ByteView::of(data), out);
  return hex(out, sizeof out);
}

// A value sealed under version v of key n, as keyd would have it sealed.
std::vector<uint8_t> sealed_under(uint32_t n, uint32_t version) {
  const std::string plaintext = "v" + std::to_string(version);
  std::vector<uint8_t> out(sealed_size(plaintext.size()));
  AeadKey key(ByteView(ManyKeysKeyd::key_bytes(n, version)));
  seal(key, ManyKeysKeyd::id_of(n), version, PayloadType::Text, ByteView::of("ctx"),
       ByteView::of(plaintext), out.data());
  return out;
}

std::string decrypted(const pg::KeydSettings& s, const std::vector<uint8_t>& value) {
  std::vector<uint8_t> out(opened_size(ByteView(value)));
  pg::decrypt_value(s, parse_header(ByteView(value)), ByteView(value), ByteView::of("ctx"),
                    out.data());
  return std::string(out.begin(), out.end());
}

// Versions first..last of key n: one value under each.
std::vector<std::vector<uint8_t>> values_of(uint32_t n, uint32_t first, uint32_t last) {
  std::vector<std::vector<uint8_t>> values;
  for (uint32_t v = first; v <= last; ++v) values.push_back(sealed_under(n, v));
  return values;
}

constexpr uint32_t kCapacity = static_cast<uint32_t>(pg::kKeyCacheCapacity);

}  // namespace

TEST_CASE("key cache: bounded; a statement meeting more versions still works", "[key_cache]") {
  ManyKeysKeyd keyd;
  CacheReset reset;
  const pg::KeydSettings s = settings_for(keyd.path(), 3600);
  const uint32_t last = kCapacity + 100;
  const auto values = values_of(1, 1, last);
  for (uint32_t v = 1; v <= last; ++v)
    REQUIRE(decrypted(s, values[v - 1]) == "v" + std::to_string(v));
  CHECK(keyd.version_fetches() == static_cast<int>(last));
  CHECK(pg::key_cache_size().versions == pg::kKeyCacheCapacity);
  // The evicted entries gave their key bytes back (wiped: SecretSlab).
  CHECK(pg::key_cache_size().secret_slots == pg::kKeyCacheCapacity);
  // The newest kCapacity versions are the ones kept.
  for (uint32_t v = last; v > last - kCapacity; --v)
    REQUIRE(decrypted(s, values[v - 1]) == "v" + std::to_string(v));
  CHECK(keyd.version_fetches() == static_cast<int>(last));
  CHECK(decrypted(s, values[0]) == "v1");
  CHECK(keyd.version_fetches() == static_cast<int>(last) + 1);
  pg::clear_key_cache();
  CHECK(pg::key_cache_size().versions == 0);
  CHECK(pg::key_cache_size().secret_slots == 0);
}

TEST_CASE("key cache: the least recently used version leaves first", "[key_cache]") {
  ManyKeysKeyd keyd;
  CacheReset reset;
  pg::set_key_cache_clock(fake_clock);
  fake_now = 10'000;
  const pg::KeydSettings s = settings_for(keyd.path(), 60);
  const auto values = values_of(1, 1, kCapacity + 2);
  for (uint32_t v = 1; v <= kCapacity; ++v) decrypted(s, values[v - 1]);
  REQUIRE(keyd.version_fetches() == static_cast<int>(kCapacity));
  CHECK(decrypted(s, values[0]) == "v1");  // a hit: version 1 is now the most recently used
  CHECK(keyd.version_fetches() == static_cast<int>(kCapacity));
  CHECK(decrypted(s, values[kCapacity]) == "v" + std::to_string(kCapacity + 1));  // evicts 2
  CHECK(decrypted(s, values[0]) == "v1");
  CHECK(keyd.version_fetches() == static_cast<int>(kCapacity) + 1);
  CHECK(decrypted(s, values[1]) == "v2");  // fetched again, evicting 3
  CHECK(keyd.version_fetches() == static_cast<int>(kCapacity) + 2);
  CHECK(decrypted(s, values[3]) == "v4");
  CHECK(keyd.version_fetches() == static_cast<int>(kCapacity) + 2);
  CHECK(decrypted(s, values[2]) == "v3");
  CHECK(keyd.version_fetches() == static_cast<int>(kCapacity) + 3);
  CHECK(pg::key_cache_size().versions == pg::kKeyCacheCapacity);

  // The TTL still applies on top, and its eviction wipes as well; the last
  // version and name used leave with the rest (ASan: nothing points at them).
  const ByteView plaintext = ByteView::of("x");
  std::vector<uint8_t> fresh(sealed_size(plaintext.size));
  pg::encrypt_value(s, "k1", PayloadType::Text, ByteView::of("ctx"), plaintext, fresh.data());
  CHECK(keyd.primary_fetches() == 1);
  fake_now += 60'000;
  pg::evict_expired_keys(60);
  CHECK(pg::key_cache_size().versions == 0);
  CHECK(pg::key_cache_size().names == 0);
  CHECK(pg::key_cache_size().secret_slots == 0);
  CHECK(decrypted(s, fresh) == "x");
  CHECK(keyd.version_fetches() == static_cast<int>(kCapacity) + 4);
  pg::encrypt_value(s, "k1", PayloadType::Text, ByteView::of("ctx"), plaintext, fresh.data());
  CHECK(keyd.primary_fetches() == 2);
}

TEST_CASE("key cache: bounded key names, least recently used first", "[key_cache]") {
  ManyKeysKeyd keyd;
  CacheReset reset;
  const pg::KeydSettings s = settings_for(keyd.path(), 3600);
  const ByteView plaintext = ByteView::of("x");
  std::vector<uint8_t> out(sealed_size(plaintext.size));
  auto encrypt_under = [&](uint32_t n) {
    pg::encrypt_value(s, "k" + std::to_string(n), PayloadType::Text, ByteView::of("ctx"), plaintext,
                      out.data());
  };
  // Names are bounded far above versions (an evicted name loses the uses
  // keyd charged to it): the versions map is full long before.
  const uint32_t names = static_cast<uint32_t>(pg::kKeyNameCacheCapacity);
  static_assert(pg::kKeyNameCacheCapacity > pg::kKeyCacheCapacity, "names outlive versions");
  for (uint32_t n = 0; n < names; ++n) encrypt_under(n);
  REQUIRE(keyd.primary_fetches() == static_cast<int>(names));
  encrypt_under(0);      // a hit: k0 is now the most recently used
  encrypt_under(names);  // evicts k1
  CHECK(keyd.primary_fetches() == static_cast<int>(names) + 1);
  CHECK(pg::key_cache_size().names == pg::kKeyNameCacheCapacity);
  CHECK(pg::key_cache_size().versions == pg::kKeyCacheCapacity);
  encrypt_under(0);
  CHECK(keyd.primary_fetches() == static_cast<int>(names) + 1);
  encrypt_under(1);
  CHECK(keyd.primary_fetches() == static_cast<int>(names) + 2);
  CHECK(decrypted(s, out) == "x");
  // k0's version had left the versions map: its first name hit fetched the
  // version (a lookup keyd charges no uses for), the second found it.
  CHECK(keyd.version_fetches() == 1);
}

TEST_CASE("key cache: deterministic values and blind indexes stay byte-identical", "[key_cache]") {
  // Stored data depends on these bytes: the expected values were computed by
  // the cache before it derived the SIV and blind-index keys lazily, and are
  // checked against the derivation documented in key_cache.hpp as well.
  ManyKeysKeyd keyd;
  keyd.primary = 3;  // rotated: both derive from version 1 all the same
  CacheReset reset;
  const auto fill = values_of(1, 1, kCapacity);
  for (int ttl : {60, 0, 3600}) {
    const pg::KeydSettings s = settings_for(keyd.path(), ttl);
    if (ttl == 3600) {
      // A full cache: the primary and then version 1 of k7 each evict one.
      for (const auto& value : fill) decrypted(s, value);
      REQUIRE(pg::key_cache_size().versions == pg::kKeyCacheCapacity);
    }
    const std::vector<uint8_t> det = deterministic(s, "k7", "4111 1111 1111 1111");
    CHECK(hex(det.data(), det.size()) ==
          "0102010007000000bcc3cad1d8dfe6edf4fb0209000000013468c3729b37a4c9980bf60515b"
          "dbdaf7dc52322de41fb9d410711cbd5f05224f3d23499");
    CHECK(blind(s, "k7", "alice@example.com") ==
          "782441608ae99476edc80ece705530c0a33f9d9260fd4b0478ab3bd9113acd82");

    const KeyId id = ManyKeysKeyd::id_of(7);
    const std::vector<uint8_t> v1 = ManyKeysKeyd::key_bytes(7, 1);
    std::vector<uint8_t> expected(det.size());
    seal_deterministic(
        hkdf_sha256(ByteView(v1), ByteView::of("colcrypt deterministic"), ByteView(id), 64).view(),
        id, 1, PayloadType::Text, ByteView::of("ctx"), ByteView::of("4111 1111 1111 1111"),
        expected.data());
    CHECK(det == expected);
    const std::array<uint8_t, 32> mac =
        HmacSha256(hkdf_sha256(ByteView(v1), ByteView::of("colcrypt blind index"), ByteView(id), 32)
                       .view())
            .mac(ByteView::of("alice@example.com"));
    CHECK(blind(s, "k7", "alice@example.com") == hex(mac.data(), mac.size()));

    std::vector<uint8_t> opened(det.size() - pg::kDeterministicOverhead);
    pg::decrypt_deterministic(s, ByteView(det), ByteView::of("ctx"), opened.data());
    CHECK(std::string(opened.begin(), opened.end()) == "4111 1111 1111 1111");
  }
}

TEST_CASE("key cache: the SIV and blind-index keys are derived on first use only", "[key_cache]") {
  ManyKeysKeyd keyd;
  CacheReset reset;
  const pg::KeydSettings s = settings_for(keyd.path(), 3600);
  const auto values = values_of(7, 1, 3);
  for (const auto& value : values) decrypted(s, value);
  CHECK(pg::key_cache_size().versions == 3);
  CHECK(pg::key_cache_size().secret_slots == 3);  // the key bytes only
  const std::string index = blind(s, "k7", "a");
  CHECK(pg::key_cache_size().secret_slots == 3);  // its MAC key lives in the HMAC context
  const std::vector<uint8_t> det = deterministic(s, "k7", "a");
  CHECK(pg::key_cache_size().secret_slots == 4);  // and version 1's SIV key
  CHECK(deterministic(s, "k7", "a") == det);
  CHECK(blind(s, "k7", "a") == index);
  CHECK(pg::key_cache_size().secret_slots == 4);
  CHECK(pg::key_cache_size().versions == 3);
  pg::clear_key_cache();
  CHECK(pg::key_cache_size().secret_slots == 0);
}

TEST_CASE("key cache: a key name keyd sends is checked before it is cached", "[key_cache]") {
  // Names reach error messages and the privilege check: one that is not a
  // valid key name is a protocol error, whichever function asked first.
  OneKeyKeyd keyd("bad name; DROP");
  CacheReset reset;
  const pg::KeydSettings s = settings_for(keyd.path(), 60);
  EnvelopeHeader header{};
  header.key_id = keyd.id();
  header.key_version = 1;
  char name[pg::kKeyNameCapacity];
  try {
    pg::key_name_of(s, header, name);
    FAIL("an invalid name was accepted");
  } catch (const Error& e) {
    CHECK(e.code() == Errc::ProtocolError);
    CHECK(std::string(e.what()).find("DROP") == std::string::npos);
    CHECK(keyd.version_fetches() == 1);
  }
}
