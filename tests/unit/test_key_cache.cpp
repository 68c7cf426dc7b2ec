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

#include "core/envelope.hpp"
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
  pg::decrypt_value(s, parse_header(ByteView(value)), ByteView(value), ByteView::of("ctx"), out.data());
}

// Every test leaves the cache empty and on its real clock.
struct CacheReset {
  ~CacheReset() {
    pg::clear_key_cache();
    pg::set_key_cache_clock(nullptr);
  }
};

}  // namespace

TEST_CASE("key cache: the TTL expires on the cache clock's time", "[key_cache]") {
  OneKeyKeyd keyd;
  CacheReset reset;
  pg::clear_key_cache();
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
  pg::clear_key_cache();
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
  pg::clear_key_cache();
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
  pg::clear_key_cache();
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

TEST_CASE("key cache: a key name keyd sends is checked before it is cached", "[key_cache]") {
  // Names reach error messages and the privilege check: one that is not a
  // valid key name is a protocol error, whichever function asked first.
  OneKeyKeyd keyd("bad name; DROP");
  CacheReset reset;
  pg::clear_key_cache();
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
