// Locating and reading the Wycheproof vectors shared by the [wycheproof] tests.
#pragma once
#include <catch2/catch.hpp>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/error.hpp"

// Asserts that expr throws colcrypt::Error with the given Errc.
#define REQUIRE_ERRC(expr, errc)                                                         \
  do {                                                                                   \
    try {                                                                                \
      (void)(expr);                                                                      \
      FAIL("expected colcrypt::Error(" << colcrypt::errc_name(errc) << "): " #expr);     \
    } catch (const colcrypt::Error& e_) {                                                \
      REQUIRE(std::string(colcrypt::errc_name(e_.code())) == colcrypt::errc_name(errc)); \
    }                                                                                    \
  } while (0)

// The same, also checking the exact message.
#define REQUIRE_ERROR(expr, errc, message)                                               \
  do {                                                                                   \
    try {                                                                                \
      (void)(expr);                                                                      \
      FAIL("expected colcrypt::Error(" << colcrypt::errc_name(errc) << "): " #expr);     \
    } catch (const colcrypt::Error& e_) {                                                \
      REQUIRE(std::string(colcrypt::errc_name(e_.code())) == colcrypt::errc_name(errc)); \
      REQUIRE(std::string(e_.what()) == std::string(message));                           \
    }                                                                                    \
  } while (0)

namespace colcrypt::test {

// The directory holding the Wycheproof JSON files, or "" when absent:
// $COLCRYPT_VECTORS_DIR if set, else <repo>/../shared/vectors; either may hold
// the files directly or in a wycheproof/ subdirectory.
std::string wycheproof_dir();
// Where we looked, for the message printed when the vectors are missing.
std::string wycheproof_search_description();
// Parses <wycheproof_dir>/name; FAILs (never passes silently) when missing.
nlohmann::json load_wycheproof(const std::string& name);

std::vector<uint8_t> unhex(const std::string& hex);
std::string hex(const uint8_t* data, size_t n);
template <class Bytes>
std::string hex(const Bytes& b) {
  return hex(b.data(), b.size());
}

}  // namespace colcrypt::test
