#include <algorithm>
#include <cstring>
#include <vector>

#include "checks.hpp"
#include "core/deterministic.hpp"
#include "core/error.hpp"
#include "fixtures.hpp"
#include "mutate.hpp"

namespace colcrypt::fuzz {

namespace {

struct Opened {
  bool ok = false;
  bool well_failed = false;
  std::vector<uint8_t> plaintext;
};

Opened open_value(const std::vector<uint8_t>& value) {
  Opened r;
  const ByteView in(value.data(), value.size());
  try {
    const DeterministicHeader h = parse_deterministic(in);
    // The header decodes to fields that encode back to the same bytes.
    std::vector<uint8_t> again(kDeterministicOverhead);
    seal_deterministic(test_siv_key(), h.key_id, h.key_version, h.payload, {}, {}, again.data());
    if (std::memcmp(again.data(), value.data(), kDeterministicHeaderSize) != 0) return r;
    r.plaintext.resize(value.size() - kDeterministicOverhead + 1);  // +1: never a 0-size buffer
    open_deterministic(test_siv_key(), in, test_context(), r.plaintext.data());
    r.plaintext.pop_back();
    r.ok = true;
  } catch (const Error& e) {
    r.well_failed = e.code() == Errc::MalformedValue || e.code() == Errc::DecryptionFailed;
  }
  return r;
}

std::vector<std::vector<uint8_t>> fixture_values() {
  std::vector<std::vector<uint8_t>> v;
  for (const auto& f : deterministic_fixtures()) v.push_back(f.value);
  return v;
}

}  // namespace

bool check_deterministic(const uint8_t* data, size_t size) {
  // 1. Whatever opens is what seal_deterministic makes of its plaintext (the
  // form is deterministic, so this is an exact re-encoding) and is a fixture.
  const std::vector<uint8_t> input(data, data + size);
  const Opened direct = open_value(input);
  if (!direct.ok && !direct.well_failed) return false;
  if (direct.ok) {
    const DeterministicHeader h = parse_deterministic(ByteView(input.data(), input.size()));
    std::vector<uint8_t> again(input.size());
    seal_deterministic(test_siv_key(), h.key_id, h.key_version, h.payload, test_context(),
                       ByteView(direct.plaintext), again.data());
    if (again != input) return false;
    const auto& fixtures = deterministic_fixtures();
    if (std::none_of(fixtures.begin(), fixtures.end(),
                     [&](const auto& f) { return f.value == input; }))
      return false;
  }

  // 2. Edits of a held value never open to anything but the original.
  static const std::vector<std::vector<uint8_t>> values = fixture_values();
  size_t chosen = 0;
  const std::vector<uint8_t> mutated = mutate_fixture(values, data, size, chosen);
  const Opened edited = open_value(mutated);
  if (!edited.ok) return edited.well_failed;
  return mutated == values[chosen] &&
         edited.plaintext == deterministic_fixtures()[chosen].plaintext;
}

}  // namespace colcrypt::fuzz
