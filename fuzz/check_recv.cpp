#include <cstring>

#include "checks.hpp"
#include "core/deterministic.hpp"
#include "core/envelope.hpp"
#include "core/error.hpp"

namespace colcrypt::fuzz {

namespace {

// docs/format.md's rules, written out independently of parse_header.
bool valid_by_the_spec(const uint8_t* p, size_t size) {
  if (size < 36 + 16 || size - 52 > kMaxPlaintextSize) return false;
  const uint32_t version =
      uint32_t{p[20]} << 24 | uint32_t{p[21]} << 16 | uint32_t{p[22]} << 8 | uint32_t{p[23]};
  return p[0] == 1 && (p[1] == 1 || p[1] == 3) && p[2] <= 1 && p[3] == 0 && version != 0;
}

}  // namespace

// What colcrypt.encrypted's recv (src/pg/type_io.cpp) runs on binary input.
bool check_recv(const uint8_t* data, size_t size) {
  const ByteView in(data, size);
  bool accepted = false;
  EnvelopeHeader h;
  try {
    h = parse_header(in);
    accepted = true;
  } catch (const Error& e) {
    if (e.code() != Errc::MalformedValue) return false;
  }
  if (accepted != valid_by_the_spec(data, size)) return false;
  if (!accepted) return true;

  // The header holds the bytes it was read from.
  if (h.format_version != data[0] || static_cast<uint8_t>(h.algorithm) != data[1] ||
      static_cast<uint8_t>(h.payload) != data[2] ||
      std::memcmp(h.key_id.data(), data + 4, kKeyIdSize) != 0 ||
      std::memcmp(h.nonce.data(), data + 24, h.nonce.size()) != 0 ||
      h.key_version != (uint32_t{data[20]} << 24 | uint32_t{data[21]} << 16 |
                        uint32_t{data[22]} << 8 | uint32_t{data[23]}))
    return false;
  if (opened_size(in) != size - kEnvelopeOverhead) return false;

  // An envelope is never also a deterministic value (decrypt_deterministic
  // and decrypt must not both claim one value).
  try {
    parse_deterministic(in);
    return false;
  } catch (const Error& e) {
    return e.code() == Errc::MalformedValue;
  }
}

}  // namespace colcrypt::fuzz
