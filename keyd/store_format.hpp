// Private to the key store and its backends (store.cpp, store_file.cpp,
// store_db.cpp): the records' persisted JSON form and the helpers around it.
#pragma once
#include <array>
#include <cstdint>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "keyd/store.hpp"

namespace colcrypt::keyd::store_format {

constexpr size_t kSaltSize = 32;

// Throws StoreCorrupt: "key store <where> is corrupted: <what>".
[[noreturn]] void corrupt(const std::string& where, const std::string& what);
std::string to_hex(ByteView bytes);
// Lower-case hex only (what keyd writes); nullopt otherwise.
std::optional<std::vector<uint8_t>> from_hex(std::string_view text);
std::array<uint8_t, 32> sha256(std::string_view data);
std::vector<uint8_t> make_kek_check(ByteView kek);
bool verify_kek_check(ByteView kek, const std::vector<uint8_t>& check);
std::optional<wire::KeyState> state_from_name(std::string_view name);
// One key as stored: its metadata, each version's wrapped key (hex, null once
// destroyed), usage counts as charged (exact_usage: the counts themselves, a
// clean stop; else the reservations, never less).
nlohmann::json key_to_json(const KeyRecord& k, bool exact_usage);
// The inverse, validating every field (StoreCorrupt naming `where`). The
// caller catches nlohmann::json::exception (a missing or mistyped field).
KeyRecord parse_key(const std::string& where, const nlohmann::json& j);

// A whole number that fits T. nlohmann's get<T>() would wrap a negative or
// too large integer and cast a float out of range (undefined behaviour, found
// by the store fuzz target), so anything else is a corrupt store.
template <typename T>
T unsigned_field(const std::string& where, const nlohmann::json& j, const std::string& what) {
  if (!j.is_number_unsigned() || j.get<uint64_t>() > std::numeric_limits<T>::max()) {
    corrupt(where, "invalid " + what);
  }
  return static_cast<T>(j.get<uint64_t>());
}

// The same for an optional field: `fallback` when j has no `field`.
template <typename T>
T optional_unsigned_field(const std::string& where, const nlohmann::json& j, const char* field,
                          T fallback, const std::string& what) {
  return j.contains(field) ? unsigned_field<T>(where, j.at(field), what) : fallback;
}

}  // namespace colcrypt::keyd::store_format
