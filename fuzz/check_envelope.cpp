#include <algorithm>
#include <vector>

#include "checks.hpp"
#include "core/aead.hpp"
#include "core/envelope.hpp"
#include "core/error.hpp"
#include "fixtures.hpp"
#include "mutate.hpp"

namespace colcrypt::fuzz {

namespace {

struct Opened {
  bool ok = false;
  bool well_failed = false;  // failed with the documented error
  std::vector<uint8_t> plaintext;
};

// Opens value as the extension does: the header names the algorithm, the
// key is the test key (or its derived key for the test context).
Opened open_value(const std::vector<uint8_t>& value) {
  Opened r;
  const ByteView in(value.data(), value.size());
  try {
    const EnvelopeHeader h = parse_header(in);
    r.plaintext.resize(opened_size(in));
    if (h.algorithm == Algorithm::Aes256GcmDerived) {
      AeadKey key(derive_value_key(test_key(), h.key_id, h.key_version, test_context()).view());
      open(key, in, test_context(), r.plaintext.data());
    } else {
      AeadKey key(test_key());
      open(key, in, test_context(), r.plaintext.data());
    }
    r.ok = true;
  } catch (const Error& e) {
    r.well_failed = e.code() == Errc::MalformedValue || e.code() == Errc::DecryptionFailed;
  }
  return r;
}

std::vector<std::vector<uint8_t>> fixture_values() {
  std::vector<std::vector<uint8_t>> v;
  for (const auto& f : envelope_fixtures()) v.push_back(f.value);
  return v;
}

}  // namespace

bool check_envelope(const uint8_t* data, size_t size) {
  // 1. The input itself: only what seal() made opens.
  const std::vector<uint8_t> input(data, data + size);
  const Opened direct = open_value(input);
  if (!direct.ok && !direct.well_failed) return false;
  if (direct.ok) {
    const auto& fixtures = envelope_fixtures();
    const bool sealed_by_us = std::any_of(fixtures.begin(), fixtures.end(), [&](const auto& f) {
      return f.value == input && f.plaintext == direct.plaintext;
    });
    if (!sealed_by_us) return false;
  }

  // 2. The input as edits of a valid value: it opens only unchanged, and then
  // to the original plaintext.
  static const std::vector<std::vector<uint8_t>> values = fixture_values();
  size_t chosen = 0;
  const std::vector<uint8_t> mutated = mutate_fixture(values, data, size, chosen);
  const Opened edited = open_value(mutated);
  if (!edited.ok) return edited.well_failed;
  return mutated == values[chosen] && edited.plaintext == envelope_fixtures()[chosen].plaintext;
}

}  // namespace colcrypt::fuzz
