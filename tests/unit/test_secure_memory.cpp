#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cstring>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "core/error.hpp"
#include "core/secure_memory.hpp"
#include "support.hpp"

using namespace colcrypt;

TEST_CASE("SecretBytes construction", "[secure_memory]") {
  SecretBytes empty;
  REQUIRE(empty.empty());
  REQUIRE(empty.data() == nullptr);

  SecretBytes zeros(100);
  REQUIRE(zeros.size() == 100);
  for (size_t i = 0; i < zeros.size(); ++i) REQUIRE(zeros.data()[i] == 0);

  const uint8_t src[5] = {1, 2, 3, 4, 5};
  SecretBytes copy(src, sizeof src);
  REQUIRE(copy.size() == 5);
  REQUIRE(std::memcmp(copy.data(), src, 5) == 0);
  REQUIRE(constant_time_equal(copy.view(), ByteView(src, 5)));

  SecretBytes from_view(ByteView(src, 3));
  REQUIRE(from_view.size() == 3);
  REQUIRE(from_view.data()[2] == 3);

  REQUIRE_ERRC(SecretBytes(nullptr, 4), Errc::InvalidArgument);
  REQUIRE(SecretBytes(nullptr, 0).empty());
}

TEST_CASE("SecretBytes moves leave the source empty", "[secure_memory]") {
  const uint8_t src[4] = {9, 8, 7, 6};
  SecretBytes a(src, 4);
  const uint8_t* storage = a.data();
  SecretBytes b(std::move(a));
  REQUIRE(a.empty());  // NOLINT(bugprone-use-after-move)
  REQUIRE(a.data() == nullptr);
  REQUIRE(b.data() == storage);
  REQUIRE(b.size() == 4);

  SecretBytes c(10);
  c = std::move(b);
  REQUIRE(b.empty());  // NOLINT(bugprone-use-after-move)
  REQUIRE(c.size() == 4);
  REQUIRE(c.data()[0] == 9);
  c = SecretBytes();
  REQUIRE(c.empty());
}

TEST_CASE("random bytes", "[secure_memory]") {
  std::set<std::string> seen;
  for (int i = 0; i < 8; ++i) {
    SecretBytes r = SecretBytes::random(32);
    REQUIRE(r.size() == 32);
    seen.insert(std::string(reinterpret_cast<const char*>(r.data()), r.size()));
  }
  REQUIRE(seen.size() == 8);
  random_bytes(nullptr, 0);  // nothing to do, must not fail
  REQUIRE(SecretBytes::random(0).empty());
}

TEST_CASE("constant_time_equal and secure_zero", "[secure_memory]") {
  const uint8_t a[3] = {1, 2, 3}, b[3] = {1, 2, 4};
  REQUIRE(constant_time_equal(ByteView(a, 3), ByteView(a, 3)));
  REQUIRE_FALSE(constant_time_equal(ByteView(a, 3), ByteView(b, 3)));
  REQUIRE_FALSE(constant_time_equal(ByteView(a, 3), ByteView(a, 2)));
  REQUIRE(constant_time_equal(ByteView(), ByteView()));
  uint8_t buf[16];
  std::memset(buf, 0xFF, sizeof buf);
  secure_zero(buf, sizeof buf);
  for (uint8_t x : buf) REQUIRE(x == 0);
  secure_zero(nullptr, 0);
}

TEST_CASE("every Errc has a distinct name", "[error]") {
  const Errc all[] = {
      Errc::InvalidArgument, Errc::MalformedValue, Errc::DecryptionFailed,    Errc::CryptoFailure,
      Errc::KeyNotFound,     Errc::KeyUnavailable, Errc::PermissionDenied,    Errc::KeydUnavailable,
      Errc::KeydTimeout,     Errc::Cancelled,      Errc::ProtocolError,       Errc::AlreadyExists,
      Errc::StoreCorrupt,    Errc::WrongMasterKey, Errc::InsecurePermissions, Errc::Io,
      Errc::Internal};
  std::set<std::string> names;
  for (Errc e : all) {
    const std::string name = errc_name(e);
    REQUIRE_FALSE(name.empty());
    REQUIRE(name != "unknown error");
    names.insert(name);
  }
  REQUIRE(names.size() == sizeof all / sizeof all[0]);
  const Error err(Errc::KeyNotFound, "key 'x' not found");
  REQUIRE(err.code() == Errc::KeyNotFound);
  REQUIRE(std::string(err.what()) == "key 'x' not found");
}

TEST_CASE("SecretBytes reuses wiped pages: a new secret never sees an old one", "[secure_memory]") {
  // Single-page secrets are cached per thread after release; whatever page a
  // new secret gets must be all zeros, whatever the previous owner wrote.
  const uint8_t* first = nullptr;
  {
    SecretBytes a(4000);
    std::memset(a.data(), 0xAA, a.size());
    first = a.data();
  }
  bool reused = false;
  for (size_t size : {size_t{4000}, size_t{1}, size_t{100}, size_t{4096}}) {
    SecretBytes b(size);
    reused = reused || b.data() == first;
    for (size_t i = 0; i < b.size(); ++i) REQUIRE(b.data()[i] == 0);
    std::memset(b.data(), 0x55, b.size());
  }
  REQUIRE(reused);  // the cache works (else re-encryption pays 4 system calls per value)
  // More live secrets than the cache holds, released together, then reused.
  {
    std::vector<SecretBytes> many;
    for (int i = 0; i < 10; ++i) {
      many.emplace_back(64);
      std::memset(many.back().data(), 0x77, 64);
    }
  }
  for (int i = 0; i < 10; ++i) {
    SecretBytes c(2048);
    for (size_t j = 0; j < c.size(); ++j) REQUIRE(c.data()[j] == 0);
  }
}

TEST_CASE("SecretBytes work in a forked child and in other threads", "[secure_memory]") {
  { SecretBytes warm(10); }  // the parent has a cached page now
  const pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    int rc = 0;
    for (int i = 0; i < 8 && rc == 0; ++i) {
      SecretBytes s(100);
      for (size_t j = 0; j < s.size(); ++j)
        if (s.data()[j] != 0) rc = 1;
      std::memset(s.data(), 0x11, s.size());
    }
    _exit(rc);
  }
  int status = 0;
  REQUIRE(waitpid(pid, &status, 0) == pid);
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) == 0);

  SecretBytes moved;
  std::thread t([&] {
    SecretBytes s(32);
    std::memset(s.data(), 0x22, s.size());
    moved = std::move(s);
  });
  t.join();
  REQUIRE(moved.size() == 32);
  REQUIRE(moved.data()[31] == 0x22);
  moved = SecretBytes();  // released on another thread than it was made on
  SecretBytes again(32);
  for (size_t j = 0; j < again.size(); ++j) REQUIRE(again.data()[j] == 0);
}

TEST_CASE("SecretSlab: many slots to a page, each wiped when released", "[secure_memory]") {
  REQUIRE_ERRC(SecretSlab(0), Errc::InvalidArgument);
  REQUIRE_ERRC(SecretSlab(size_t{1} << 20), Errc::InvalidArgument);
  SecretSlab slab(32);
  const size_t per_page = static_cast<size_t>(sysconf(_SC_PAGESIZE)) / 32;
  std::vector<SecretSlab::Slot> slots;
  std::set<const uint8_t*> seen;
  for (size_t i = 0; i < per_page + 1; ++i) {
    SecretSlab::Slot& slot = slots.emplace_back(slab.acquire());
    REQUIRE(slot.size() == 32);
    CHECK(std::all_of(slot.data(), slot.data() + 32, [](uint8_t b) { return b == 0; }));
    std::memset(slot.data(), 0x5A, 32);
    seen.insert(slot.data());
  }
  CHECK(seen.size() == per_page + 1);  // distinct slots
  CHECK(slab.pages() == 2);
  CHECK(slab.slots_in_use() == per_page + 1);

  // Released (destroyed, assigned to or moved over): wiped where it was.
  const uint8_t* where = slots[3].data();
  slots[3] = SecretSlab::Slot();
  CHECK(slots[3].empty());
  CHECK(std::all_of(where, where + 32, [](uint8_t b) { return b == 0; }));
  const uint8_t* moved_over = slots[4].data();
  slots[4] = std::move(slots[5]);
  CHECK(slots[5].empty());
  CHECK(std::all_of(moved_over, moved_over + 32, [](uint8_t b) { return b == 0; }));
  CHECK(slots[4].data()[0] == 0x5A);
  CHECK(slab.slots_in_use() == per_page - 1);

  // A freed slot is reused before a new page is taken.
  const uint8_t secret[32] = {1, 2, 3};
  SecretSlab::Slot again = slab.acquire(ByteView(secret, sizeof secret));
  CHECK((again.data() == where || again.data() == moved_over));
  CHECK(std::memcmp(again.data(), secret, 32) == 0);
  REQUIRE_ERRC(slab.acquire(ByteView(secret, 16)), Errc::InvalidArgument);
  const uint8_t* last = again.data();
  { SecretSlab::Slot gone = std::move(again); }
  CHECK(std::all_of(last, last + 32, [](uint8_t b) { return b == 0; }));
  slots.clear();
  CHECK(slab.slots_in_use() == 0);
  CHECK(slab.pages() == 2);  // kept, wiped, for the next slots
}
