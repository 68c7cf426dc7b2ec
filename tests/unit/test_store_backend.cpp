// The key store's backend interface (keyd/store_backend.hpp) without a
// database: the one lifecycle drives any backend; a read-only backend (a
// standby's database) refuses every change and every usage lease; records
// re-read by a backend's poll replace the loaded ones without losing counts
// keyd has not written; copy_to (store migrate) writes the records as they are.
#include <catch2/catch.hpp>
#include <memory>
#include <string>
#include <vector>

#include "core/error.hpp"
#include "keyd/store.hpp"
#include "keyd/store_backend.hpp"
#include "keyd/store_file.hpp"

using namespace colcrypt;
using namespace colcrypt::keyd;

namespace {

// Keeps what it is given, in memory; the test flips its role.
struct MemoryBackend : StoreBackend {
  struct State {
    KekParams params;
    std::vector<KeyRecord> keys;
    int saves = 0;
    bool read_only = false;
    bool reload_next_poll = false;
    bool role_changed = false;
  };
  std::shared_ptr<State> state = std::make_shared<State>();

  std::string location() const override { return "memory"; }
  KekParams read_params() override { return state->params; }
  std::vector<KeyRecord> read_keys(ByteView) override { return state->keys; }
  void initialize(const KekParams& params, const std::vector<KeyRecord>& keys, ByteView) override {
    state->params = params;
    state->keys = keys;
  }
  void save(const KekParams& params, const std::vector<KeyRecord>& keys, bool, ByteView) override {
    state->params = params;
    state->keys = keys;
    ++state->saves;
  }
  bool read_only() const override { return state->read_only; }
  std::string read_only_reason() const override { return "a standby; the primary writes"; }
  StorePoll poll(ByteView, bool force) override {
    StorePoll p;
    p.role_changed = state->role_changed;
    state->role_changed = false;
    if (state->reload_next_poll || force) {
      p.reloaded = true;
      p.keys = state->keys;
      state->reload_next_poll = false;
    }
    return p;
  }
};

MasterSecret key_file_secret() {
  MasterSecret s;
  s.kind = MasterSecret::Kind::KeyFile;
  s.bytes = SecretBytes(32);
  for (size_t i = 0; i < 32; ++i) s.bytes.data()[i] = 0x5a;
  return s;
}

}  // namespace

TEST_CASE("one lifecycle on any backend: every change is saved before it is visible",
          "[store-backend]") {
  auto backend = std::make_unique<MemoryBackend>();
  auto state = backend->state;
  KeyStore store = KeyStore::create(std::move(backend), key_file_secret(), 1000);
  store.create_key("k", {});
  CHECK(state->keys.size() == 1);
  store.rotate_key("k");
  CHECK(state->keys[0].versions.size() == 2);
  CHECK(state->keys[0].primary_version == 2);
  // Reopening through the interface verifies the KEK check and every wrapped key.
  auto again = std::make_unique<MemoryBackend>();
  again->state = state;
  KeyStore reopened = KeyStore::open(std::move(again), key_file_secret());
  REQUIRE(reopened.find("k"));
  const SecretBytes a = reopened.unwrap(*reopened.find("k"), 2);
  const SecretBytes b = store.unwrap(*store.find("k"), 2);
  CHECK(std::vector<uint8_t>(a.data(), a.data() + a.size()) ==
        std::vector<uint8_t>(b.data(), b.data() + b.size()));
  // A wrapped key moved to another version is refused by every backend.
  std::swap(state->keys[0].versions[0].wrapped, state->keys[0].versions[1].wrapped);
  auto moved = std::make_unique<MemoryBackend>();
  moved->state = state;
  try {
    KeyStore::open(std::move(moved), key_file_secret());
    FAIL("a swapped wrapped key was accepted");
  } catch (const Error& e) {
    CHECK(e.code() == Errc::StoreCorrupt);
  }
}

TEST_CASE("a read-only backend refuses changes and usage leases, serves what it has",
          "[store-backend]") {
  auto backend = std::make_unique<MemoryBackend>();
  auto state = backend->state;
  KeyStore store = KeyStore::create(std::move(backend), key_file_secret(), 1000);
  store.create_key("k", {});
  state->read_only = true;
  const int saves = state->saves;
  CHECK(store.read_only());
  auto refused = [&](auto&& change, Errc code) {
    try {
      change();
      FAIL("a change was allowed on a read-only store");
    } catch (const Error& e) {
      CHECK(e.code() == code);
      CHECK(std::string(e.what()).find("standby") != std::string::npos);
    }
  };
  refused([&] { store.create_key("other", {}); }, Errc::PermissionDenied);
  refused([&] { store.rotate_key("k"); }, Errc::PermissionDenied);
  refused([&] { store.charge_uses("k", 1, 1000); }, Errc::KeyUnavailable);
  CHECK(state->saves == saves);
  // Lookups and decryption still work; last_used stays in memory.
  CHECK(store.charge_uses("k", 0, 1000).version == 1);
  CHECK_FALSE(store.unwrap(*store.find("k"), 1).empty());
  store.flush();
  CHECK(state->saves == saves);
  CHECK_FALSE(store.dirty());
}

TEST_CASE("records re-read by poll replace the loaded ones, keeping unwritten counts",
          "[store-backend]") {
  auto backend = std::make_unique<MemoryBackend>();
  auto state = backend->state;
  KeyStore store = KeyStore::create(std::move(backend), key_file_secret(), 1000);
  store.create_key("k", {});
  store.charge_uses("k", 5, 1000);
  // Another writer (the primary) rotated: the backend holds a newer record
  // whose usage count of version 1 is lower than what this keyd granted.
  std::vector<KeyRecord> newer = state->keys;
  newer[0].versions[0].usage_count = 0;
  newer[0].usage_count = 0;
  state->keys = newer;
  state->reload_next_poll = true;
  state->role_changed = true;
  KeyStore::PollResult r = store.poll();
  CHECK(r.reloaded);
  CHECK(r.role_changed);
  CHECK(store.find("k")->versions[0].usage_count >= 5);
  CHECK_FALSE(store.poll().reloaded);
}

TEST_CASE("copy_to writes the records as they are, wrapped keys included", "[store-backend]") {
  auto backend = std::make_unique<MemoryBackend>();
  KeyStore store = KeyStore::create(std::move(backend), key_file_secret(), 1000);
  store.create_key("a", {});
  store.rotate_key("a");
  MemoryBackend copy;
  store.copy_to(copy);
  REQUIRE(copy.state->keys.size() == 1);
  CHECK(copy.state->keys[0].versions[1].wrapped == store.find("a")->versions[1].wrapped);
  CHECK(copy.state->params.check == store.kek_params().check);
  const std::vector<uint8_t> kek(32, 0x5a);
  CHECK(store_file_text(copy.state->params, copy.state->keys, false, ByteView(kek)) ==
        store.file_text());
}
