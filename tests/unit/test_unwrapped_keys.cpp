// keyd's cache of unwrapped keys (keyd/unwrapped_keys.hpp).
#include <catch2/catch.hpp>
#include <vector>

#include "keyd/unwrapped_keys.hpp"

using namespace colcrypt;
using colcrypt::keyd::UnwrappedKeys;

namespace {

KeyId id_of(uint8_t n) {
  KeyId id{};
  id.fill(n);
  return id;
}

std::vector<uint8_t> bytes(uint8_t fill, size_t n) { return std::vector<uint8_t>(n, fill); }

std::vector<uint8_t> copy(ByteView v) { return std::vector<uint8_t>(v.data, v.data + v.size); }

}  // namespace

TEST_CASE("unwrapped keys: served only for the wrapped form they came from", "[keyd][unwrapped]") {
  UnwrappedKeys cache(4);
  const auto wrapped = bytes(0xAA, 60), key = bytes(0x11, 32);
  CHECK(cache.find(id_of(1), 1, ByteView(wrapped)).empty());
  cache.insert(id_of(1), 1, ByteView(wrapped), ByteView(key));
  CHECK(copy(cache.find(id_of(1), 1, ByteView(wrapped))) == key);
  // Another version, another key id, another (rewrapped) or no wrapped form: a miss.
  CHECK(cache.find(id_of(1), 2, ByteView(wrapped)).empty());
  CHECK(cache.find(id_of(2), 1, ByteView(wrapped)).empty());
  auto rewrapped = wrapped;
  rewrapped[59] ^= 1;
  CHECK(cache.find(id_of(1), 1, ByteView(rewrapped)).empty());
  CHECK(cache.find(id_of(1), 1, ByteView()).empty());  // a destroyed version keeps no wrapped key
  // Nothing is cached without a wrapped form to check against.
  cache.insert(id_of(3), 1, ByteView(), ByteView(key));
  CHECK(cache.size() == 1);
  CHECK_THROWS(cache.insert(id_of(4), 1, ByteView(wrapped), ByteView(bytes(0x11, 16))));
}

TEST_CASE("unwrapped keys: bounded, oldest out first, clear forgets all", "[keyd][unwrapped]") {
  UnwrappedKeys cache(3);
  const auto wrapped = bytes(0xAA, 60);
  for (uint8_t v = 1; v <= 5; ++v) {
    cache.insert(id_of(7), v, ByteView(wrapped), ByteView(bytes(v, 32)));
    CHECK(cache.size() == std::min<size_t>(v, 3));
  }
  CHECK(cache.capacity() == 3);
  CHECK(cache.find(id_of(7), 1, ByteView(wrapped)).empty());
  CHECK(cache.find(id_of(7), 2, ByteView(wrapped)).empty());
  for (uint8_t v = 3; v <= 5; ++v)
    CHECK(copy(cache.find(id_of(7), v, ByteView(wrapped))) == bytes(v, 32));
  // Replacing an entry takes no other slot.
  cache.insert(id_of(7), 4, ByteView(wrapped), ByteView(bytes(0x44, 32)));
  CHECK(cache.size() == 3);
  CHECK(copy(cache.find(id_of(7), 4, ByteView(wrapped))) == bytes(0x44, 32));
  CHECK(copy(cache.find(id_of(7), 3, ByteView(wrapped))) == bytes(3, 32));
  // clear wipes the key bytes where they were, not only the index.
  const uint8_t* where = cache.find(id_of(7), 5, ByteView(wrapped)).data;
  cache.clear();
  CHECK(cache.size() == 0);
  CHECK(cache.find(id_of(7), 5, ByteView(wrapped)).empty());
  CHECK(copy(ByteView(where, 32)) == bytes(0, 32));
  cache.insert(id_of(8), 1, ByteView(wrapped), ByteView(bytes(9, 32)));
  CHECK(copy(cache.find(id_of(8), 1, ByteView(wrapped))) == bytes(9, 32));
}
