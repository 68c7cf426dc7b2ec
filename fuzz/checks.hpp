// The property each fuzz target checks, as plain functions: the libFuzzer
// entry points (fuzz_target.cpp) and the unit tests' replay of the corpora
// and of every committed regression input (tests/unit/test_fuzz_regressions.cpp)
// call the same code. A check returns false when a property fails (the fuzz
// entry point then aborts, so libFuzzer saves the input); memory errors and
// undefined behaviour are the sanitizers' to catch.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace colcrypt::fuzz {

// Envelopes (algorithms 1 and 3) under the fixed test key: an envelope that
// opens is exactly one that seal() made (a fixture), and a mutated fixture
// never opens to anything else.
bool check_envelope(const uint8_t* data, size_t size);
// The AES-SIV deterministic form, the same properties.
bool check_deterministic(const uint8_t* data, size_t size);
// The text form "colcrypt:" + base64: what decodes re-encodes to the same text.
bool check_text(const uint8_t* data, size_t size);
// The binary (recv) form: parse_header accepts exactly what docs/format.md
// allows, and an accepted envelope is never taken for a deterministic value.
bool check_recv(const uint8_t* data, size_t size);
// keyd's wire codec: frames cut the same however the bytes arrive, and every
// body that decodes re-encodes to the same bytes.
bool check_wire(const uint8_t* data, size_t size);
// keyd's key store file: opens or fails as StoreCorrupt; a store that opens is
// written back in a form that reopens to the same text.
bool check_store(const uint8_t* data, size_t size);
// keyd's audit log verifier: hostile files are rejected without a crash; a
// chain keyd wrote verifies, and a mutated one verifies only as the same events.
bool check_audit(const uint8_t* data, size_t size);

struct Target {
  const char* name;  // fuzz/corpus/NAME, fuzz/regressions/NAME, colcrypt-fuzz-NAME
  bool (*check)(const uint8_t*, size_t);
};
const std::vector<Target>& targets();

}  // namespace colcrypt::fuzz
