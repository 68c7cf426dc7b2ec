#include "keyd/store.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <nlohmann/json.hpp>

#include "core/aead.hpp"
#include "core/kdf.hpp"

namespace colcrypt::keyd {
namespace {

using nlohmann::json;

constexpr const char* kFormatName = "colcrypt-keystore";
constexpr int kStoreFormatVersion = 1;
constexpr size_t kSaltSize = 32;
constexpr size_t kMaxStoreFileSize = 64u << 20;
constexpr std::string_view kKekCheckPlaintext = "colcrypt keystore KEK check v1";
constexpr std::string_view kKekCheckAad = "colcrypt-keystore-kek-check-v1";
constexpr std::string_view kWrapAadLabel = "colcrypt-keystore-wrap-v1";
constexpr std::string_view kMacInfo = "colcrypt-keystore-mac-v1";

std::string errno_text(int err) { return std::strerror(err); }

[[noreturn]] void corrupt(const std::string& path, const std::string& what) {
  throw Error(Errc::StoreCorrupt, "key store " + path + " is corrupted: " + what);
}

std::string join_path(const std::string& dir, const char* name) {
  if (!dir.empty() && dir.back() == '/') return dir + name;
  return dir + "/" + name;
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

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;  // upper case never appears in what keyd writes
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

json optional_time(const std::optional<int64_t>& t) {
  return t ? json(format_timestamp(*t)) : json(nullptr);
}

// Checks that path is owned by keyd's euid and gives nothing to group/others.
void check_private(const std::string& path, bool is_dir) {
  struct stat st {};
  int rc = is_dir ? ::stat(path.c_str(), &st) : ::lstat(path.c_str(), &st);
  if (rc != 0) {
    int err = errno;
    throw Error(Errc::Io, "cannot stat " + path + ": " + errno_text(err));
  }
  const char* what = is_dir ? "store directory " : "store file ";
  if (is_dir ? !S_ISDIR(st.st_mode) : !S_ISREG(st.st_mode)) {
    throw Error(
        Errc::InsecurePermissions,
        std::string(what) + path + (is_dir ? " is not a directory" : " is not a regular file"));
  }
  if (st.st_uid != ::geteuid()) {
    throw Error(Errc::InsecurePermissions,
                std::string(what) + path + " is owned by uid " + std::to_string(st.st_uid) +
                    ", not by colcrypt-keyd's uid " + std::to_string(::geteuid()));
  }
  if ((st.st_mode & 077) != 0) {
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
    throw Error(Errc::InsecurePermissions, std::string(what) + path + " has mode " + mode +
                                               "; group and others must have no access (chmod " +
                                               (is_dir ? "700 " : "600 ") + path + ")");
  }
}

int open_and_lock_dir(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    throw Error(Errc::Io, "cannot open store directory " + dir + ": " + errno_text(err));
  }
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    int err = errno;
    ::close(fd);
    if (err == EWOULDBLOCK) {
      throw StoreInUse("key store " + dir + " is in use by another colcrypt-keyd");
    }
    throw Error(Errc::Io, "cannot lock store directory " + dir + ": " + errno_text(err));
  }
  return fd;
}

void remove_stale_temp(const std::string& dir) {
  std::string tmp = join_path(dir, kStoreTempFileName);
  if (::unlink(tmp.c_str()) != 0 && errno != ENOENT) {
    int err = errno;
    throw Error(Errc::Io, "cannot remove stale " + tmp + ": " + errno_text(err));
  }
}

std::string read_file(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) {
    int err = errno;
    throw Error(Errc::Io, "cannot open key store " + path + ": " + errno_text(err));
  }
  std::string data;
  char buf[65536];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int err = errno;
      ::close(fd);
      throw Error(Errc::Io, "cannot read key store " + path + ": " + errno_text(err));
    }
    if (n == 0) break;
    data.append(buf, static_cast<size_t>(n));
    if (data.size() > kMaxStoreFileSize) {
      ::close(fd);
      corrupt(path, "file is larger than " + std::to_string(kMaxStoreFileSize) + " bytes");
    }
  }
  ::close(fd);
  return data;
}

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

KeyRecord parse_key(const std::string& path, const json& j) {
  KeyRecord k;
  k.id = parse_id_field(path, j.at("id"));
  k.name = j.at("name").get<std::string>();
  if (!valid_key_name(k.name)) corrupt(path, "invalid key name");
  k.algorithm = j.at("algorithm").get<std::string>();
  if (k.algorithm != "AES-256-GCM") corrupt(path, "unsupported algorithm for key '" + k.name + "'");
  k.created_at = *parse_time_field(path, j.at("created_at"), false);
  k.expires_at = parse_time_field(path, j.at("expires_at"), true);
  k.rotation_interval_days = j.at("rotation_interval_days").get<uint32_t>();
  k.last_used = parse_time_field(path, j.at("last_used"), true);
  k.usage_count = j.at("usage_count").get<uint64_t>();
  k.primary_version = j.at("primary_version").get<uint32_t>();
  // Fields added by the lifecycle work (issue 3) are optional: older stores open.
  k.max_uses_per_version = j.value("max_uses_per_version", kDefaultMaxUsesPerVersion);
  if (k.max_uses_per_version < 1 || k.max_uses_per_version > kMaxMaxUsesPerVersion) {
    corrupt(path, "invalid max_uses_per_version of key '" + k.name + "'");
  }
  for (const auto& jv : j.at("versions")) {
    KeyVersion v;
    v.version = jv.at("version").get<uint32_t>();
    auto state = state_from_name(jv.at("state").get<std::string>());
    if (!state) corrupt(path, "invalid state of key '" + k.name + "'");
    v.state = *state;
    v.created_at = *parse_time_field(path, jv.at("created_at"), false);
    v.usage_count = jv.value("usage_count", uint64_t{0});
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

void write_all(int fd, const std::string& data) {
  size_t done = 0;
  while (done < data.size()) {
    ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw errno;
    done += static_cast<size_t>(n);
  }
}

int64_t now_seconds() { return static_cast<int64_t>(std::time(nullptr)); }

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

bool KeyStore::exists(const std::string& dir) {
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) {
    int err = errno;
    if (err == ENOENT) return false;
    throw Error(Errc::Io, "cannot stat store directory " + dir + ": " + errno_text(err));
  }
  if (!S_ISDIR(st.st_mode)) {
    throw Error(Errc::InvalidArgument, "store path " + dir + " is not a directory");
  }
  std::string file = join_path(dir, kStoreFileName);
  if (::lstat(file.c_str(), &st) == 0) return true;
  DIR* d = ::opendir(dir.c_str());
  if (!d) {
    int err = errno;
    throw Error(Errc::Io, "cannot list store directory " + dir + ": " + errno_text(err));
  }
  std::string other;
  while (struct dirent* e = ::readdir(d)) {
    std::string_view name = e->d_name;
    if (name == "." || name == ".." || name == kStoreTempFileName) continue;
    other = std::string(name);
    break;
  }
  ::closedir(d);
  if (!other.empty()) {
    throw Error(Errc::InvalidArgument, "store directory " + dir + " has files (" + other +
                                           ") but no " + kStoreFileName +
                                           "; refusing to initialize a key store there");
  }
  return false;
}

KeyStore KeyStore::create(const std::string& dir, const MasterSecret& secret,
                          uint32_t pbkdf2_iterations) {
  if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) {
    int err = errno;
    throw Error(Errc::Io, "cannot create store directory " + dir + ": " + errno_text(err));
  }
  check_private(dir, true);
  KeyStore store;
  store.dir_ = dir;
  store.lock_fd_ = open_and_lock_dir(dir);
  if (exists(dir)) {
    throw Error(Errc::AlreadyExists, "a key store already exists in " + dir);
  }
  remove_stale_temp(dir);
  store.kek_source_ = secret.kind;
  if (secret.kind == MasterSecret::Kind::Password) {
    if (secret.bytes.empty()) throw Error(Errc::InvalidArgument, "the master password is empty");
    if (pbkdf2_iterations == 0) throw Error(Errc::InvalidArgument, "PBKDF2 iterations must be > 0");
    store.salt_.resize(kSaltSize);
    random_bytes(store.salt_.data(), store.salt_.size());
    store.pbkdf2_iterations_ = pbkdf2_iterations;
    store.kek_ = pbkdf2_sha256(secret.bytes.view(), ByteView(store.salt_), pbkdf2_iterations,
                               AeadKey::kKeySize);
  } else {
    if (secret.bytes.size() != AeadKey::kKeySize) {
      throw Error(Errc::InvalidArgument, "a master key file holds exactly 32 bytes");
    }
    store.kek_ = SecretBytes(secret.bytes.view());
  }
  store.mac_key_ = store_mac_key(store.kek_.view());
  store.kek_check_ = make_kek_check(store.kek_.view());
  store.save({});
  return store;
}

KeyStore KeyStore::open(const std::string& dir, const MasterSecret& secret) {
  return open_impl(dir, secret, false);
}

KeyStore KeyStore::open_read_only(const std::string& dir, const MasterSecret& secret) {
  return open_impl(dir, secret, true);
}

KeyStore KeyStore::open_impl(const std::string& dir, const MasterSecret& secret, bool read_only) {
  KeyStore store;
  store.dir_ = dir;
  if (!read_only) {
    check_private(dir, true);
    store.lock_fd_ = open_and_lock_dir(dir);
    remove_stale_temp(dir);
  }
  const std::string path = store.file_path();
  if (!read_only) check_private(path, false);
  const std::string raw = read_file(path);

  json doc;
  try {
    doc = json::parse(raw);
  } catch (const json::parse_error& e) {
    corrupt(path, "not valid JSON (at byte " + std::to_string(e.byte) + ")");
  } catch (const json::exception&) {
    // Not only parse_error: a number too large for a double ("8e4896") is an
    // out_of_range, which escaped and terminated keyd (found by fuzz/ store).
    corrupt(path, "not valid JSON (a number out of range)");
  }
  try {
    if (!doc.is_object() || doc.dump(2) + "\n" != raw) {
      corrupt(path, "the file was damaged or edited (it is not in the form colcrypt-keyd writes)");
    }
    json body = doc;
    std::string checksum = body.at("checksum").get<std::string>();
    body.erase("checksum");
    if (checksum != to_hex(ByteView(sha256(body.dump())))) {
      corrupt(path, "checksum mismatch (the file was damaged or edited)");
    }
    if (body.at("format").get<std::string>() != kFormatName)
      corrupt(path, "not a colcrypt key store");
    int version = body.at("format_version").get<int>();
    if (version != kStoreFormatVersion) {
      corrupt(path, "unsupported format version " + std::to_string(version));
    }
    const json& kek = body.at("kek");
    std::string source = kek.at("source").get<std::string>();
    if (source == "password") {
      if (kek.at("kdf").get<std::string>() != "PBKDF2-HMAC-SHA256") corrupt(path, "unknown KDF");
      store.kek_source_ = MasterSecret::Kind::Password;
      store.pbkdf2_iterations_ = kek.at("iterations").get<uint32_t>();
      auto salt = from_hex(kek.at("salt").get<std::string>());
      if (!salt || salt->size() != kSaltSize || store.pbkdf2_iterations_ == 0) {
        corrupt(path, "invalid PBKDF2 parameters");
      }
      store.salt_ = std::move(*salt);
    } else if (source == "keyfile") {
      store.kek_source_ = MasterSecret::Kind::KeyFile;
    } else {
      corrupt(path, "unknown KEK source");
    }
    auto check = from_hex(body.at("kek_check").get<std::string>());
    if (!check) corrupt(path, "invalid KEK check value");
    store.kek_check_ = std::move(*check);

    if (store.kek_source_ != secret.kind) {
      throw Error(Errc::WrongMasterKey,
                  "key store " + path + " is protected by a " +
                      (store.kek_source_ == MasterSecret::Kind::Password
                           ? "master password, but a master key file was given"
                           : "master key file, but a password was given"));
    }
    if (store.kek_source_ == MasterSecret::Kind::Password) {
      store.kek_ = pbkdf2_sha256(secret.bytes.view(), ByteView(store.salt_),
                                 store.pbkdf2_iterations_, AeadKey::kKeySize);
    } else {
      if (secret.bytes.size() != AeadKey::kKeySize) {
        throw Error(Errc::WrongMasterKey, "a master key file holds exactly 32 bytes");
      }
      store.kek_ = SecretBytes(secret.bytes.view());
    }
    if (!verify_kek_check(store.kek_.view(), store.kek_check_)) {
      throw Error(Errc::WrongMasterKey,
                  std::string("wrong master ") +
                      (store.kek_source_ == MasterSecret::Kind::Password ? "password" : "key") +
                      " for key store " + path);
    }
    store.mac_key_ = store_mac_key(store.kek_.view());
    std::string mac = body.at("mac").get<std::string>();
    body.erase("mac");
    auto expected = hmac_sha256(store.mac_key_.view(), ByteView::of(body.dump()));
    auto given = from_hex(mac);
    if (!given || !constant_time_equal(ByteView(*given), ByteView(expected))) {
      corrupt(path, "its MAC does not verify (the file was edited or damaged)");
    }
    if (body.contains("audit_mark")) {
      const json& mark = body.at("audit_mark");
      store.audit_mark_.seq = mark.at("seq").get<uint64_t>();
      store.audit_mark_.mac = mark.at("mac").get<std::string>();
      store.audit_mark_.size = mark.at("size").get<uint64_t>();
      if (store.audit_mark_.seq == 0) corrupt(path, "invalid audit mark");
    }
    for (const auto& jk : body.at("keys")) {
      KeyRecord k = parse_key(path, jk);
      if (store.find(k.name) || store.find(k.id)) corrupt(path, "duplicate key '" + k.name + "'");
      for (const auto& v : k.versions) {
        if (v.state == wire::KeyState::Destroyed) continue;
        if (unwrap_key(store.kek_.view(), k.id, v.version, ByteView(v.wrapped)).empty()) {
          corrupt(path, "wrapped key of '" + k.name + "' version " + std::to_string(v.version) +
                            " does not authenticate");
        }
      }
      store.keys_.push_back(std::move(k));
    }
  } catch (const json::exception&) {
    corrupt(path, "a field is missing or has the wrong type");
  }
  return store;
}

KeyStore::KeyStore(KeyStore&& other) noexcept
    : dir_(std::move(other.dir_)),
      lock_fd_(other.lock_fd_),
      kek_source_(other.kek_source_),
      salt_(std::move(other.salt_)),
      pbkdf2_iterations_(other.pbkdf2_iterations_),
      kek_check_(std::move(other.kek_check_)),
      kek_(std::move(other.kek_)),
      mac_key_(std::move(other.mac_key_)),
      keys_(std::move(other.keys_)),
      default_rotation_days_(other.default_rotation_days_),
      default_max_uses_(other.default_max_uses_),
      dirty_(other.dirty_),
      audit_mark_(std::move(other.audit_mark_)) {
  other.lock_fd_ = -1;
  other.dirty_ = false;
}

KeyStore& KeyStore::operator=(KeyStore&& other) noexcept {
  if (this != &other) {
    if (lock_fd_ >= 0) ::close(lock_fd_);
    dir_ = std::move(other.dir_);
    lock_fd_ = other.lock_fd_;
    kek_source_ = other.kek_source_;
    salt_ = std::move(other.salt_);
    pbkdf2_iterations_ = other.pbkdf2_iterations_;
    kek_check_ = std::move(other.kek_check_);
    kek_ = std::move(other.kek_);
    mac_key_ = std::move(other.mac_key_);
    keys_ = std::move(other.keys_);
    default_rotation_days_ = other.default_rotation_days_;
    default_max_uses_ = other.default_max_uses_;
    dirty_ = other.dirty_;
    audit_mark_ = std::move(other.audit_mark_);
    other.lock_fd_ = -1;
    other.dirty_ = false;
  }
  return *this;
}

KeyStore::~KeyStore() {
  if (lock_fd_ >= 0) ::close(lock_fd_);
}

std::string KeyStore::file_path() const { return join_path(dir_, kStoreFileName); }

const KeyRecord* KeyStore::find(std::string_view name) const {
  for (const auto& k : keys_) {
    if (k.name == name) return &k;
  }
  return nullptr;
}

const KeyRecord* KeyStore::find(const KeyId& id) const {
  for (const auto& k : keys_) {
    if (k.id == id) return &k;
  }
  return nullptr;
}

const KeyRecord& KeyStore::create_key(std::string_view name, const NewKeyOptions& options) {
  if (!valid_key_name(name)) {
    throw Error(Errc::InvalidArgument,
                "invalid key name: use 1 to 63 characters of A-Z a-z 0-9 _ . - "
                "(not starting with . or -)");
  }
  if (find(name)) {
    throw Error(Errc::AlreadyExists, "key '" + std::string(name) + "' already exists");
  }
  uint32_t days = options.rotation_interval_days.value_or(default_rotation_days_);
  if (days < 1 || days > kMaxRotationIntervalDays) {
    throw Error(Errc::InvalidArgument, "rotation interval must be between 1 and " +
                                           std::to_string(kMaxRotationIntervalDays) + " days");
  }
  const uint64_t max_uses = options.max_uses_per_version.value_or(default_max_uses_);
  if (max_uses < 1 || max_uses > kMaxMaxUsesPerVersion) {
    throw Error(Errc::InvalidArgument, "max uses per version must be between 1 and " +
                                           std::to_string(kMaxMaxUsesPerVersion));
  }
  const int64_t now = now_seconds();
  if (options.expires_at && *options.expires_at <= now) {
    throw Error(Errc::InvalidArgument, "expires_at is not in the future");
  }
  KeyRecord k;
  do {
    k.id = new_key_id();
  } while (find(k.id));
  k.name = std::string(name);
  k.created_at = now;
  k.expires_at = options.expires_at;
  k.rotation_interval_days = days;
  k.max_uses_per_version = max_uses;
  k.primary_version = 1;
  SecretBytes key = SecretBytes::random(AeadKey::kKeySize);
  KeyVersion first;
  first.version = 1;
  first.state = wire::KeyState::Active;
  first.created_at = now;
  first.wrapped = wrap_key(kek_.view(), k.id, 1, key.view());
  k.versions.push_back(std::move(first));

  std::vector<KeyRecord> next = keys_;
  next.push_back(std::move(k));
  save(next);
  keys_ = std::move(next);
  dirty_ = false;
  return keys_.back();
}

KeyRecord& KeyStore::mutable_key(std::string_view name, std::vector<KeyRecord>& keys) {
  for (auto& k : keys) {
    if (k.name == name) return k;
  }
  throw Error(Errc::KeyNotFound, "key '" + std::string(name) + "' not found");
}

void KeyStore::rotate_in_place(std::vector<KeyRecord>& next, size_t index, int64_t now) {
  KeyRecord& k = next[index];
  const uint32_t version = k.versions.back().version + 1;
  KeyVersion added;
  added.version = version;
  added.state = wire::KeyState::DecryptOnly;
  added.created_at = now;
  SecretBytes key = SecretBytes::random(AeadKey::kKeySize);
  added.wrapped = wrap_key(kek_.view(), k.id, version, key.view());
  k.versions.push_back(std::move(added));
  // Phase 1: published, decryptable, not yet used to encrypt.
  save(next);
  keys_ = next;
  // Phase 2: the new version becomes primary.
  for (auto& v : k.versions) {
    if (v.state == wire::KeyState::Active) {
      v.state = wire::KeyState::DecryptOnly;
      v.retired_at = now;
    }
  }
  k.versions.back().state = wire::KeyState::Active;
  k.primary_version = version;
  save(next);
  keys_ = std::move(next);
  dirty_ = false;
}

const KeyRecord& KeyStore::rotate_key(std::string_view name) {
  std::vector<KeyRecord> next = keys_;
  KeyRecord& k = mutable_key(name, next);
  const size_t index = static_cast<size_t>(&k - next.data());
  rotate_in_place(next, index, now_seconds());
  return keys_[index];
}

namespace {

KeyVersion& version_for_change(KeyRecord& k, uint32_t version, const char* action) {
  for (auto& v : k.versions) {
    if (v.version != version) continue;
    if (v.version == k.primary_version) {
      throw Error(Errc::InvalidArgument, "version " + std::to_string(version) + " of key '" +
                                             k.name + "' is the primary version; cannot " + action +
                                             " it (rotate the key first)");
    }
    return v;
  }
  throw Error(Errc::KeyNotFound, "key '" + k.name + "' has no version " + std::to_string(version));
}

}  // namespace

void KeyStore::check_retire_grace(const KeyRecord& key, uint32_t version, std::string_view action,
                                  const RetireGrace& grace) {
  if (grace.force) return;
  const KeyVersion* v = key.find_version(version);
  if (!v || !v->retired_at || v->state == wire::KeyState::Destroyed) return;
  const int64_t until = *v->retired_at + grace.grace_seconds;
  if (grace.now >= until) return;
  const int64_t wait = until - grace.now;
  throw Error(Errc::InvalidArgument,
              "version " + std::to_string(version) + " of key '" + key.name + "' was retired at " +
                  format_timestamp(*v->retired_at) + ", less than the retirement grace of " +
                  std::to_string(grace.grace_seconds) +
                  " s ago: a backend may still encrypt new rows under it from its cache "
                  "(colcrypt.key_cache_ttl), so " +
                  std::string(action) + " it after " + format_timestamp(until) + " (in " +
                  std::to_string(wait) + " s), or pass --force");
}

void KeyStore::check_derivation_pin(const KeyRecord& key, uint32_t version, std::string_view action,
                                    bool force) {
  if (force) return;
  const KeyVersion* v = key.find_version(version);
  if (!v || !v->keys_derived_values() || v->state == wire::KeyState::Destroyed) return;
  std::string what;
  std::string used;
  if (v->deterministic.first_used) {
    what = "deterministic values (colcrypt.encrypt_deterministic)";
    used = "deterministic values since " + format_timestamp(*v->deterministic.first_used) +
           ", last " +
           format_timestamp(v->deterministic.last_used.value_or(*v->deterministic.first_used));
  }
  if (v->blind_index.first_used) {
    what += std::string(what.empty() ? "" : " and ") + "blind indexes (colcrypt.blind_index)";
    used += std::string(used.empty() ? "" : "; ") + "blind indexes since " +
            format_timestamp(*v->blind_index.first_used) + ", last " +
            format_timestamp(v->blind_index.last_used.value_or(*v->blind_index.first_used));
  }
  const std::string v_text = "version " + std::to_string(version) + " of key '" + key.name + "'";
  throw Error(Errc::InvalidArgument,
              v_text + " keys " + what + " (" + used + "): they are always keyed from version " +
                  std::to_string(version) + ", rotation jobs do not re-encrypt them and no row " +
                  "count sees them, so " + (action == "disable" ? "disabling" : "destroying") +
                  " it makes all " + what + " of key '" + key.name + "' unusable" +
                  (action == "disable" ? " until it is enabled again" : " for ever") +
                  ". Keep this version (it encrypts nothing new), or first move those values to "
                  "another key (decrypt and re-encrypt them, rebuild the blind indexes), then "
                  "pass --force");
}

bool KeyStore::record_derivation(const KeyId& id, uint32_t version, wire::FetchPurpose purpose,
                                 int64_t now) {
  for (size_t ki = 0; ki < keys_.size(); ++ki) {
    if (keys_[ki].id != id) continue;
    for (size_t vi = 0; vi < keys_[ki].versions.size(); ++vi) {
      KeyVersion& v = keys_[ki].versions[vi];
      if (v.version != version) continue;
      DerivationUse& use =
          purpose == wire::FetchPurpose::BlindIndex ? v.blind_index : v.deterministic;
      if (use.first_used) {
        use.last_used = now;
        dirty_ = true;
        return false;
      }
      // The first use is on disk before any value keyed from it can exist.
      std::vector<KeyRecord> next = keys_;
      DerivationUse& fresh = purpose == wire::FetchPurpose::BlindIndex
                                 ? next[ki].versions[vi].blind_index
                                 : next[ki].versions[vi].deterministic;
      fresh.first_used = now;
      fresh.last_used = now;
      save(next);
      keys_ = std::move(next);
      dirty_ = false;
      return true;
    }
    break;
  }
  throw Error(Errc::KeyNotFound,
              "key " + format_key_id(id) + " has no version " + std::to_string(version));
}

const KeyRecord& KeyStore::disable_version(std::string_view name, uint32_t version,
                                           const RetireGrace& grace) {
  std::vector<KeyRecord> next = keys_;
  KeyRecord& k = mutable_key(name, next);
  KeyVersion& v = version_for_change(k, version, "disable");
  if (v.state == wire::KeyState::Destroyed) {
    throw Error(Errc::InvalidArgument,
                "version " + std::to_string(version) + " of key '" + k.name + "' is destroyed");
  }
  check_retire_grace(k, version, "disable", grace);
  check_derivation_pin(k, version, "disable", grace.force);
  v.state = wire::KeyState::Disabled;
  const size_t index = static_cast<size_t>(&k - next.data());
  save(next);
  keys_ = std::move(next);
  dirty_ = false;
  return keys_[index];
}

const KeyRecord& KeyStore::enable_version(std::string_view name, uint32_t version) {
  std::vector<KeyRecord> next = keys_;
  KeyRecord& k = mutable_key(name, next);
  KeyVersion& v = version_for_change(k, version, "enable");
  if (v.state == wire::KeyState::Destroyed) {
    throw Error(Errc::InvalidArgument, "version " + std::to_string(version) + " of key '" + k.name +
                                           "' is destroyed; that cannot be undone");
  }
  v.state = wire::KeyState::DecryptOnly;
  const size_t index = static_cast<size_t>(&k - next.data());
  save(next);
  keys_ = std::move(next);
  dirty_ = false;
  return keys_[index];
}

const KeyRecord& KeyStore::destroy_version(std::string_view name, uint32_t version,
                                           const RetireGrace& grace) {
  std::vector<KeyRecord> next = keys_;
  KeyRecord& k = mutable_key(name, next);
  KeyVersion& v = version_for_change(k, version, "destroy");
  if (v.state == wire::KeyState::Destroyed) {
    throw Error(Errc::InvalidArgument, "version " + std::to_string(version) + " of key '" + k.name +
                                           "' is already destroyed");
  }
  check_retire_grace(k, version, "destroy", grace);
  check_derivation_pin(k, version, "destroy", grace.force);
  v.state = wire::KeyState::Destroyed;
  v.destroyed_at = now_seconds();
  secure_zero(v.wrapped.data(), v.wrapped.size());
  v.wrapped.clear();
  const size_t index = static_cast<size_t>(&k - next.data());
  save(next);
  // The old copy in keys_ holds the wrapped bytes too: wipe before dropping it.
  for (auto& old : keys_) {
    for (auto& ov : old.versions) secure_zero(ov.wrapped.data(), ov.wrapped.size());
  }
  keys_ = std::move(next);
  dirty_ = false;
  return keys_[index];
}

UseGrant KeyStore::charge_uses(std::string_view name, uint64_t wanted, int64_t now) {
  const KeyRecord* current = find(name);
  if (!current) throw Error(Errc::KeyNotFound, "key '" + std::string(name) + "' not found");
  const size_t index = static_cast<size_t>(current - keys_.data());
  UseGrant grant;
  if (wanted == 0) {
    // A lookup that will not encrypt (blind index, deterministic values, a
    // rewrap's version check): the primary as it is, nothing charged, no
    // usage rotation even at the cap (the next encryption rotates), and no
    // expiry: expiry stops encryption, not searches over existing data.
    grant.version = current->primary_version;
    keys_[index].last_used = now;  // like record_use: in memory, flushed lazily
    dirty_ = true;
    return grant;
  }
  if (current->expires_at && *current->expires_at <= now) {
    throw Error(Errc::KeyUnavailable,
                "key '" + current->name + "' expired at " + format_timestamp(*current->expires_at));
  }
  if (current->primary().usage_count >= current->max_uses_per_version) {
    std::vector<KeyRecord> next = keys_;
    rotate_in_place(next, index, now);
    grant.rotated = true;
  }
  KeyRecord& k = keys_[index];
  KeyVersion& v = *std::find_if(k.versions.begin(), k.versions.end(), [&](const KeyVersion& x) {
    return x.version == k.primary_version;
  });
  const uint64_t left = k.max_uses_per_version - v.usage_count;
  grant.version = v.version;
  grant.granted = std::max<uint64_t>(1, std::min(wanted, left));
  v.usage_count += grant.granted;
  k.usage_count += grant.granted;
  k.last_used = now;
  dirty_ = true;
  if (v.usage_count > v.usage_persisted) {
    // Reserve ahead so that only every ~1/16 of the cap costs a synchronous write.
    const uint64_t slack = std::max<uint64_t>(1, k.max_uses_per_version / 16);
    v.usage_persisted = std::min(k.max_uses_per_version, v.usage_count + slack);
    try {
      save(keys_);
    } catch (...) {
      // Not on disk: take the grant back, the caller answers with an error.
      v.usage_count -= grant.granted;
      k.usage_count -= grant.granted;
      v.usage_persisted = v.usage_count;
      throw;
    }
  }
  if (v.usage_count >= k.max_uses_per_version) {
    std::vector<KeyRecord> next = keys_;
    rotate_in_place(next, index, now);
    grant.rotated = true;
  }
  return grant;
}

RotationReason KeyStore::rotation_due(const KeyRecord& key, int64_t now,
                                      int64_t day_seconds) const {
  const KeyVersion& primary = key.primary();
  if (primary.usage_count >= key.max_uses_per_version) return RotationReason::UsageCap;
  if (now - primary.created_at >= static_cast<int64_t>(key.rotation_interval_days) * day_seconds) {
    return RotationReason::Interval;
  }
  return RotationReason::None;
}

SecretBytes audit_mac_key(ByteView kek) {
  return hkdf_sha256(kek, {}, ByteView::of(std::string_view("colcrypt-audit-mac-v1")), 32);
}

SecretBytes KeyStore::audit_mac_key() const { return keyd::audit_mac_key(kek_.view()); }

SecretBytes KeyStore::unwrap(const KeyRecord& key, uint32_t version) const {
  const KeyVersion* v = key.find_version(version);
  if (!v) {
    throw Error(Errc::KeyNotFound,
                "key '" + key.name + "' has no version " + std::to_string(version));
  }
  if (v->state == wire::KeyState::Destroyed) {
    throw Error(Errc::KeyUnavailable,
                "version " + std::to_string(version) + " of key '" + key.name + "' is destroyed");
  }
  SecretBytes bytes = unwrap_key(kek_.view(), key.id, version, ByteView(v->wrapped));
  if (bytes.empty()) {
    throw Error(Errc::StoreCorrupt, "wrapped key of '" + key.name + "' version " +
                                        std::to_string(version) + " does not authenticate");
  }
  return bytes;
}

void KeyStore::record_use(const KeyId& id, int64_t now) {
  for (auto& k : keys_) {
    if (k.id == id) {
      k.last_used = now;
      dirty_ = true;
      return;
    }
  }
}

void KeyStore::flush(bool release_reservations) {
  if (release_reservations) {
    bool reserved = false;
    for (const auto& k : keys_) {
      for (const auto& v : k.versions) reserved = reserved || v.usage_persisted != v.usage_count;
    }
    if (!dirty_ && !reserved) return;
    releasing_ = true;
    try {
      save(keys_);
    } catch (...) {
      releasing_ = false;
      throw;
    }
    releasing_ = false;
    for (auto& k : keys_) {
      for (auto& v : k.versions) v.usage_persisted = v.usage_count;
    }
    dirty_ = false;
    return;
  }
  if (!dirty_) return;
  save(keys_);
  dirty_ = false;
}

void KeyStore::set_audit_mark(const AuditMark& mark) {
  if (mark.seq == 0 || mark == audit_mark_) return;
  audit_mark_ = mark;
  dirty_ = true;
}

SecretBytes store_mac_key(ByteView kek) { return hkdf_sha256(kek, {}, ByteView::of(kMacInfo), 32); }

std::string signed_store_text(nlohmann::json doc, ByteView mac_key) {
  doc.erase("mac");
  doc.erase("checksum");
  doc["mac"] = to_hex(ByteView(hmac_sha256(mac_key, ByteView::of(doc.dump()))));
  doc["checksum"] = to_hex(ByteView(sha256(doc.dump())));
  return doc.dump(2) + "\n";
}

std::string KeyStore::file_text() const { return serialize(keys_); }

std::string KeyStore::serialize(const std::vector<KeyRecord>& keys) const {
  json kek;
  if (kek_source_ == MasterSecret::Kind::Password) {
    kek = {{"source", "password"},
           {"kdf", "PBKDF2-HMAC-SHA256"},
           {"iterations", pbkdf2_iterations_},
           {"salt", to_hex(ByteView(salt_))}};
  } else {
    kek = {{"source", "keyfile"}};
  }
  json jkeys = json::array();
  for (const auto& k : keys) jkeys.push_back(key_to_json(k, releasing_));
  json doc = {{"format", kFormatName},
              {"format_version", kStoreFormatVersion},
              {"kek", std::move(kek)},
              {"kek_check", to_hex(ByteView(kek_check_))},
              {"keys", std::move(jkeys)}};
  if (audit_mark_.seq > 0) {
    doc["audit_mark"] = {
        {"seq", audit_mark_.seq}, {"mac", audit_mark_.mac}, {"size", audit_mark_.size}};
  }
  return signed_store_text(std::move(doc), mac_key_.view());
}

void KeyStore::save(const std::vector<KeyRecord>& keys) {
  const std::string text = serialize(keys);

  const std::string tmp = join_path(dir_, kStoreTempFileName);
  const std::string path = file_path();
  ::unlink(tmp.c_str());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) {
    int err = errno;
    throw Error(Errc::Io, "cannot write key store: cannot create " + tmp + ": " + errno_text(err));
  }
  const char* step = "write";
  try {
    if (::fchmod(fd, 0600) != 0) throw errno;
    write_all(fd, text);
    step = "fsync";
    if (::fsync(fd) != 0) throw errno;
    step = "close";
    int rc = ::close(fd);
    fd = -1;
    if (rc != 0) throw errno;
    step = "rename";
    if (::rename(tmp.c_str(), path.c_str()) != 0) throw errno;
  } catch (int err) {
    if (fd >= 0) ::close(fd);
    ::unlink(tmp.c_str());
    throw Error(Errc::Io, std::string("cannot write key store ") + path + " (" + step +
                              "): " + errno_text(err));
  }
  // The rename is only durable once the directory entry is.
  if (::fsync(lock_fd_) != 0) {
    int err = errno;
    throw Error(Errc::Io, "cannot fsync store directory " + dir_ + ": " + errno_text(err));
  }
}

}  // namespace colcrypt::keyd
