// Shared by the envelope and deterministic targets: the fuzz input read as
// edits of a held, valid value.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace colcrypt::fuzz {

// data[0] picks a fixture (index modulo count) and how many bytes to cut from
// its end (bits 5..7); then each pair (position, xor) flips bits of the
// value, and bytes past the value's end are appended where a position's high
// bit asks for it.
inline std::vector<uint8_t> mutate_fixture(const std::vector<std::vector<uint8_t>>& fixtures,
                                           const uint8_t* data, size_t size, size_t& chosen) {
  chosen = size > 0 ? data[0] % fixtures.size() : 0;
  std::vector<uint8_t> value = fixtures[chosen];
  if (size == 0) return value;
  const size_t cut = data[0] >> 5;
  value.resize(value.size() > cut ? value.size() - cut : 0);
  for (size_t i = 1; i + 1 < size; i += 2) {
    if (value.empty() || (data[i] & 0x80) != 0) {
      value.push_back(data[i + 1]);
      continue;
    }
    value[(data[i] * 131u + i) % value.size()] ^= data[i + 1];
  }
  return value;
}

}  // namespace colcrypt::fuzz
