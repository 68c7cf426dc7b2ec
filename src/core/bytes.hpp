// Non-owning views of byte ranges: C++17 has no std::span.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace colcrypt {

struct ByteView {
  const uint8_t* data = nullptr;
  size_t size = 0;

  ByteView() = default;
  ByteView(const uint8_t* d, size_t n) : data(d), size(n) {}
  ByteView(const std::vector<uint8_t>& v) : data(v.data()), size(v.size()) {}  // NOLINT
  template <size_t N>
  ByteView(const std::array<uint8_t, N>& a) : data(a.data()), size(N) {}  // NOLINT
  static ByteView of(std::string_view s) {
    return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
  }
  bool empty() const { return size == 0; }
};

}  // namespace colcrypt
