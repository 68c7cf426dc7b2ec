// The store's records in their persisted form (JSON, as keystore.json and
// the database backend's rows hold them), timestamps, key wrapping and the
// KEK check: shared by the file and database backends.
#include "keyd/store_format.hpp"

#include <openssl/evp.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <ctime>

#include "core/aead.hpp"
#include "core/kdf.hpp"

namespace colcrypt::keyd {
namespace {

using nlohmann::json;
using store_format::corrupt;

constexpr std::string_view kKekCheckPlaintext = "colcrypt keystore KEK check v1";
constexpr std::string_view kKekCheckAad = "colcrypt-keystore-kek-check-v1";
constexpr std::string_view kWrapAadLabel = "colcrypt-keystore-wrap-v1";
constexpr std::string_view kMacInfo = "colcrypt-keystore-mac-v1";

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;  // upper case never appears in what keyd writes
}

std::vector<uint8_t> wrap_aad(const KeyId& id, uint32_t version) {
  std::vector<uint8_t> aad(kWrapAadLabel.size() + id.size() + 4);
  std::memcpy(aad.data(), kWrapAadLabel.data(), kWrapAadLabel.size());
  std::memcpy(aad.data() + kWrapAadLabel.size(), id.data(), id.size());
  uint8_t* v = aad.data() + kWrapAadLabel.size() + id.size();
  v[0] = static_cast<uint8_t>(version >> 24);
  v[1] = static_cast<uint8_t>(version >> 16);
  v[2] = static_cast<uint8_t>(version >> 8);
  v[3] = static_cast<uint8_t>(version);
  return aad;
}

json optional_time(const std::optional<int64_t>& t) {
  return t ? json(format_timestamp(*t)) : json(nullptr);
}

// Checks that path is owned by keyd's euid and gives nothing to group/others.

KeyId parse_id_field(const std::string& path, const json& j) {
  KeyId id{};
  if (!parse_key_id(j.get<std::string>(), id)) corrupt(path, "invalid key id");
  return id;
}

std::optional<int64_t> parse_time_field(const std::string& path, const json& j, bool nullable) {
  if (nullable && j.is_null()) return std::nullopt;
  auto t = parse_timestamp(j.get<std::string>());
  if (!t) corrupt(path, "invalid timestamp");
  return t;
}

int64_t days_from_civil(int64_t y, unsigned m, unsigned d) {
  y -= m <= 2;
  const int64_t era = (y >= 0 ? y : y - 399) / 400;
  const unsigned yoe = static_cast<unsigned>(y - era * 400);
  const unsigned doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
  const unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
  return era * 146097 + static_cast<int64_t>(doe) - 719468;
}

bool read_digits(std::string_view& s, size_t n, int& out) {
  if (s.size() < n) return false;
  out = 0;
  for (size_t i = 0; i < n; ++i) {
    if (s[i] < '0' || s[i] > '9') return false;
    out = out * 10 + (s[i] - '0');
  }
  s.remove_prefix(n);
  return true;
}

bool eat(std::string_view& s, char c) {
  if (s.empty() || s.front() != c) return false;
  s.remove_prefix(1);
  return true;
}

}  // namespace

namespace store_format {

[[noreturn]] void corrupt(const std::string& path, const std::string& what) {
  throw Error(Errc::StoreCorrupt, "key store " + path + " is corrupted: " + what);
}

std::string to_hex(ByteView bytes) {
  static const char digits[] = "0123456789abcdef";
  std::string out;
  out.reserve(bytes.size * 2);
  for (size_t i = 0; i < bytes.size; ++i) {
    out.push_back(digits[bytes.data[i] >> 4]);
    out.push_back(digits[bytes.data[i] & 0xf]);
  }
  return out;
}

std::optional<std::vector<uint8_t>> from_hex(std::string_view text) {
  if (text.size() % 2 != 0) return std::nullopt;
  std::vector<uint8_t> out(text.size() / 2);
  for (size_t i = 0; i < out.size(); ++i) {
    int hi = hex_value(text[2 * i]);
    int lo = hex_value(text[2 * i + 1]);
    if (hi < 0 || lo < 0) return std::nullopt;
    out[i] = static_cast<uint8_t>(hi << 4 | lo);
  }
  return out;
}

std::array<uint8_t, 32> sha256(std::string_view data) {
  std::array<uint8_t, 32> out{};
  unsigned int len = 0;
  if (EVP_Digest(data.data(), data.size(), out.data(), &len, EVP_sha256(), nullptr) != 1 ||
      len != out.size()) {
    throw Error(Errc::CryptoFailure, "SHA-256 failed");
  }
  return out;
}

std::vector<uint8_t> make_kek_check(ByteView kek) {
  std::vector<uint8_t> out(AeadKey::kNonceSize + kKekCheckPlaintext.size() + kGcmTagSize);
  random_bytes(out.data(), AeadKey::kNonceSize);
  aes_gcm_seal(kek, ByteView(out.data(), AeadKey::kNonceSize), ByteView::of(kKekCheckAad),
               ByteView::of(kKekCheckPlaintext), out.data() + AeadKey::kNonceSize,
               out.data() + AeadKey::kNonceSize + kKekCheckPlaintext.size());
  return out;
}

bool verify_kek_check(ByteView kek, const std::vector<uint8_t>& check) {
  if (check.size() != AeadKey::kNonceSize + kKekCheckPlaintext.size() + kGcmTagSize) return false;
  std::vector<uint8_t> plain(kKekCheckPlaintext.size());
  bool ok = aes_gcm_open(
      kek, ByteView(check.data(), AeadKey::kNonceSize), ByteView::of(kKekCheckAad),
      ByteView(check.data() + AeadKey::kNonceSize, plain.size()),
      ByteView(check.data() + AeadKey::kNonceSize + plain.size(), kGcmTagSize), plain.data());
  return ok && constant_time_equal(ByteView(plain), ByteView::of(kKekCheckPlaintext));
}

// States are spelled as wire::key_state_name spells them ("decrypt-only", ...).

std::optional<wire::KeyState> state_from_name(std::string_view name) {
  for (auto s : {wire::KeyState::Active, wire::KeyState::DecryptOnly, wire::KeyState::Disabled,
                 wire::KeyState::Destroyed}) {
    if (name == wire::key_state_name(s)) return s;
  }
  return std::nullopt;
}

KeyRecord parse_key(const std::string& path, const json& j) {
  KeyRecord k;
  k.id = parse_id_field(path, j.at("id"));
  k.name = j.at("name").get<std::string>();
  if (!valid_key_name(k.name)) corrupt(path, "invalid key name");
  k.algorithm = j.at("algorithm").get<std::string>();
  if (k.algorithm != "AES-256-GCM") corrupt(path, "unsupported algorithm for key '" + k.name + "'");
  k.created_at = *parse_time_field(path, j.at("created_at"), false);
  k.expires_at = parse_time_field(path, j.at("expires_at"), true);
  k.rotation_interval_days =
      unsigned_field<uint32_t>(path, j.at("rotation_interval_days"), "rotation_interval_days");
  k.last_used = parse_time_field(path, j.at("last_used"), true);
  k.usage_count = unsigned_field<uint64_t>(path, j.at("usage_count"), "usage_count");
  k.primary_version = unsigned_field<uint32_t>(path, j.at("primary_version"), "primary_version");
  // Fields added by the lifecycle work (issue 3) are optional: older stores open.
  k.max_uses_per_version = optional_unsigned_field<uint64_t>(
      path, j, "max_uses_per_version", kDefaultMaxUsesPerVersion, "max_uses_per_version");
  if (k.max_uses_per_version < 1 || k.max_uses_per_version > kMaxMaxUsesPerVersion) {
    corrupt(path, "invalid max_uses_per_version of key '" + k.name + "'");
  }
  for (const auto& jv : j.at("versions")) {
    KeyVersion v;
    v.version = unsigned_field<uint32_t>(path, jv.at("version"), "version number");
    auto state = state_from_name(jv.at("state").get<std::string>());
    if (!state) corrupt(path, "invalid state of key '" + k.name + "'");
    v.state = *state;
    v.created_at = *parse_time_field(path, jv.at("created_at"), false);
    v.usage_count = optional_unsigned_field<uint64_t>(path, jv, "usage_count", 0, "usage_count");
    v.usage_persisted = v.usage_count;
    if (jv.contains("destroyed_at")) {
      v.destroyed_at = parse_time_field(path, jv.at("destroyed_at"), true);
    }
    if (jv.contains("retired_at")) {
      v.retired_at = parse_time_field(path, jv.at("retired_at"), true);
    }
    for (auto [field, use] :
         {std::pair{"deterministic", &v.deterministic}, std::pair{"blind_index", &v.blind_index}}) {
      if (!jv.contains(field)) continue;
      use->first_used = parse_time_field(path, jv.at(field).at("first_used"), false);
      use->last_used = parse_time_field(path, jv.at(field).at("last_used"), false);
    }
    if (v.state == wire::KeyState::Destroyed) {
      if (!jv.at("wrapped").is_null()) {
        corrupt(path, "destroyed version of key '" + k.name + "' still has key bytes");
      }
    } else {
      auto wrapped = from_hex(jv.at("wrapped").get<std::string>());
      if (!wrapped || wrapped->size() != kWrappedKeySize) {
        corrupt(path, "invalid wrapped key of key '" + k.name + "'");
      }
      v.wrapped = std::move(*wrapped);
    }
    if (v.version == 0 || (!k.versions.empty() && v.version <= k.versions.back().version)) {
      corrupt(path, "versions of key '" + k.name + "' are not ascending");
    }
    k.versions.push_back(std::move(v));
  }
  const KeyVersion* primary = k.find_version(k.primary_version);
  if (!primary || primary->state != wire::KeyState::Active) {
    corrupt(path, "key '" + k.name + "' has no active primary version");
  }
  // A store written before retired_at existed: a version older than the
  // primary was retired by the rotation that created its successor.
  for (size_t i = 0; i + 1 < k.versions.size(); ++i) {
    KeyVersion& v = k.versions[i];
    if (!v.retired_at && v.version < k.primary_version) {
      v.retired_at = k.versions[i + 1].created_at;
    }
  }
  return k;
}

// The persisted form: the admin metadata plus each version's wrapped key,
// with usage counts as charged. exact_usage: write the usage counts
// themselves (a clean stop), else the reservations already charged (never
// less than the counts).
json key_to_json(const KeyRecord& k, bool exact_usage) {
  json j = key_metadata_json(k);
  uint64_t reserved_extra = 0;
  for (size_t i = 0; i < k.versions.size(); ++i) {
    const KeyVersion& v = k.versions[i];
    const uint64_t charged =
        exact_usage ? v.usage_count : std::max(v.usage_count, v.usage_persisted);
    reserved_extra += charged - v.usage_count;
    json& jv = j["versions"][i];
    jv["usage_count"] = charged;
    jv["wrapped"] =
        v.state == wire::KeyState::Destroyed ? json(nullptr) : json(to_hex(ByteView(v.wrapped)));
  }
  j["usage_count"] = k.usage_count + reserved_extra;
  return j;
}

}  // namespace store_format

using namespace store_format;

json key_metadata_json(const KeyRecord& k) {
  json versions = json::array();
  for (const auto& v : k.versions) {
    json jv = {{"version", v.version},
               {"state", wire::key_state_name(v.state)},
               {"created_at", format_timestamp(v.created_at)},
               {"usage_count", v.usage_count}};
    if (v.destroyed_at) jv["destroyed_at"] = format_timestamp(*v.destroyed_at);
    if (v.retired_at) jv["retired_at"] = format_timestamp(*v.retired_at);
    for (auto [field, use] :
         {std::pair{"deterministic", &v.deterministic}, std::pair{"blind_index", &v.blind_index}}) {
      if (use->first_used) {
        jv[field] = {{"first_used", format_timestamp(*use->first_used)},
                     {"last_used", format_timestamp(use->last_used.value_or(*use->first_used))}};
      }
    }
    versions.push_back(std::move(jv));
  }
  return {{"id", format_key_id(k.id)},
          {"name", k.name},
          {"algorithm", k.algorithm},
          {"created_at", format_timestamp(k.created_at)},
          {"expires_at", optional_time(k.expires_at)},
          {"rotation_interval_days", k.rotation_interval_days},
          {"last_used", optional_time(k.last_used)},
          {"usage_count", k.usage_count},
          {"primary_version", k.primary_version},
          {"max_uses_per_version", k.max_uses_per_version},
          {"versions", std::move(versions)}};
}

const KeyVersion* KeyRecord::find_version(uint32_t version) const {
  for (const auto& v : versions) {
    if (v.version == version) return &v;
  }
  return nullptr;
}

std::string format_timestamp(int64_t unix_seconds) {
  std::time_t t = static_cast<std::time_t>(unix_seconds);
  std::tm tm{};
  if (!::gmtime_r(&t, &tm)) return "1970-01-01T00:00:00Z";
  // Four digits of year, always: strftime's %Y writes year 999 as "999",
  // which parse_timestamp (and so the next start of keyd) would refuse.
  char buf[48];
  std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02dZ", tm.tm_year + 1900, tm.tm_mon + 1,
                tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec);
  return buf;
}

std::optional<int64_t> parse_timestamp(std::string_view s) {
  int year, month, day, hour = 0, minute = 0, second = 0;
  if (!read_digits(s, 4, year) || !eat(s, '-') || !read_digits(s, 2, month) || !eat(s, '-') ||
      !read_digits(s, 2, day)) {
    return std::nullopt;
  }
  if (month < 1 || month > 12 || day < 1) return std::nullopt;
  static const int kDays[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
  bool leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
  if (day > kDays[month - 1] + (month == 2 && leap ? 1 : 0)) return std::nullopt;
  int64_t offset = 0;
  if (!s.empty()) {
    if (!eat(s, 'T') && !eat(s, ' ')) return std::nullopt;
    if (!read_digits(s, 2, hour) || !eat(s, ':') || !read_digits(s, 2, minute)) {
      return std::nullopt;
    }
    if (eat(s, ':') && !read_digits(s, 2, second)) return std::nullopt;
    if (eat(s, '.')) {  // fractional seconds: accepted, dropped
      size_t n = 0;
      while (n < s.size() && s[n] >= '0' && s[n] <= '9') ++n;
      if (n == 0) return std::nullopt;
      s.remove_prefix(n);
    }
    if (hour > 23 || minute > 59 || second > 60) return std::nullopt;
    if (eat(s, 'Z')) {
    } else if (!s.empty() && (s.front() == '+' || s.front() == '-')) {
      int sign = s.front() == '-' ? -1 : 1;
      s.remove_prefix(1);
      int oh, om = 0;
      if (!read_digits(s, 2, oh)) return std::nullopt;
      if (eat(s, ':')) {
        if (!read_digits(s, 2, om)) return std::nullopt;
      } else if (!s.empty() && !read_digits(s, 2, om)) {
        return std::nullopt;
      }
      if (oh > 23 || om > 59) return std::nullopt;
      offset = sign * (oh * 3600 + om * 60);
    }
  }
  if (!s.empty()) return std::nullopt;
  const int64_t t =
      days_from_civil(year, static_cast<unsigned>(month), static_cast<unsigned>(day)) * 86400 +
      hour * 3600 + minute * 60 + second - offset;
  // A zone offset or a leap second must not leave years 0000..9999: what
  // format_timestamp writes must parse again.
  static const int64_t kFirst = days_from_civil(0, 1, 1) * 86400;
  static const int64_t kLast = days_from_civil(10000, 1, 1) * 86400 - 1;
  if (t < kFirst || t > kLast) return std::nullopt;
  return t;
}

std::vector<uint8_t> wrap_key(ByteView kek, const KeyId& id, uint32_t version, ByteView key) {
  if (key.size != AeadKey::kKeySize) {
    throw Error(Errc::InvalidArgument, "data keys are 32 bytes");
  }
  std::vector<uint8_t> out(kWrappedKeySize);
  random_bytes(out.data(), AeadKey::kNonceSize);
  auto aad = wrap_aad(id, version);
  aes_gcm_seal(kek, ByteView(out.data(), AeadKey::kNonceSize), ByteView(aad), key,
               out.data() + AeadKey::kNonceSize, out.data() + AeadKey::kNonceSize + key.size);
  return out;
}

SecretBytes unwrap_key(ByteView kek, const KeyId& id, uint32_t version, ByteView wrapped) {
  if (wrapped.size != kWrappedKeySize) return {};
  SecretBytes key(AeadKey::kKeySize);
  auto aad = wrap_aad(id, version);
  if (!aes_gcm_open(kek, ByteView(wrapped.data, AeadKey::kNonceSize), ByteView(aad),
                    ByteView(wrapped.data + AeadKey::kNonceSize, AeadKey::kKeySize),
                    ByteView(wrapped.data + AeadKey::kNonceSize + AeadKey::kKeySize, kGcmTagSize),
                    key.data())) {
    return {};
  }
  return key;
}
SecretBytes store_mac_key(ByteView kek) { return hkdf_sha256(kek, {}, ByteView::of(kMacInfo), 32); }

SecretBytes audit_mac_key(ByteView kek) {
  return hkdf_sha256(kek, {}, ByteView::of(std::string_view("colcrypt-audit-mac-v1")), 32);
}

}  // namespace colcrypt::keyd
