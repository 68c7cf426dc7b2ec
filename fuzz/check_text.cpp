#include <string>
#include <string_view>
#include <vector>

#include "checks.hpp"
#include "core/envelope.hpp"
#include "core/error.hpp"

namespace colcrypt::fuzz {

bool check_text(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);

  // The input as text: what decodes re-encodes to exactly the same text
  // (one spelling per value), and only MalformedValue is ever thrown.
  std::vector<uint8_t> decoded(decoded_size_bound(text.size()));
  try {
    const size_t n = decode_text(text, decoded.data(), decoded.size());
    if (n > decoded.size()) return false;
    if (encode_text(ByteView(decoded.data(), n)) != text) return false;
  } catch (const Error& e) {
    if (e.code() != Errc::MalformedValue) return false;
  }

  // The input as bytes: its text form decodes back to it.
  const std::string encoded = encode_text(ByteView(data, size));
  if (encoded.size() != text_size(size)) return false;
  std::vector<uint8_t> back(decoded_size_bound(encoded.size()));
  try {
    const size_t n = decode_text(encoded, back.data(), back.size());
    back.resize(n);
  } catch (const Error&) {
    return false;
  }
  return back == std::vector<uint8_t>(data, data + size);
}

}  // namespace colcrypt::fuzz
