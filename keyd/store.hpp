// colcrypt-keyd's key store: one JSON file (keystore.json, 0600) in a private
// directory (0700), every data key wrapped with AES-256-GCM under the KEK, the
// whole content authenticated with an HMAC under a key derived from the KEK,
// and every write atomic (temp file, fsync, rename, fsync of the directory).
// docs/operations.md describes the format and its guarantees.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/envelope.hpp"
#include "core/error.hpp"
#include "core/secure_memory.hpp"
#include "core/wire.hpp"

namespace colcrypt::keyd {

constexpr const char* kStoreFileName = "keystore.json";
constexpr const char* kStoreTempFileName = "keystore.json.tmp";
constexpr uint32_t kDefaultRotationIntervalDays = 90;
constexpr uint32_t kMaxRotationIntervalDays = 36500;
constexpr uint32_t kMinPbkdf2Iterations = 100000;
constexpr uint32_t kMinInsecurePbkdf2Iterations = 1000;
// nonce || ciphertext || tag of a 32-byte key.
constexpr size_t kWrappedKeySize = AeadKey::kNonceSize + AeadKey::kKeySize + kGcmTagSize;

// Thrown when another process holds the store's lock (another colcrypt-keyd).
class StoreInUse : public Error {
 public:
  explicit StoreInUse(const std::string& message) : Error(Errc::Io, message) {}
};

// The master secret keyd was started with.
struct MasterSecret {
  enum class Kind { Password, KeyFile };
  Kind kind = Kind::Password;
  SecretBytes bytes;  // the password, or the 32 raw bytes of the key file
};

struct KeyVersion {
  uint32_t version = 0;
  wire::KeyState state = wire::KeyState::Active;
  int64_t created_at = 0;        // Unix seconds, UTC
  std::vector<uint8_t> wrapped;  // kWrappedKeySize bytes; not secret without the KEK
};

struct KeyRecord {
  KeyId id{};
  std::string name;
  std::string algorithm = "AES-256-GCM";
  int64_t created_at = 0;
  std::optional<int64_t> expires_at;
  uint32_t rotation_interval_days = kDefaultRotationIntervalDays;
  std::optional<int64_t> last_used;
  uint64_t usage_count = 0;
  uint32_t primary_version = 0;
  std::vector<KeyVersion> versions;  // ascending by version

  const KeyVersion* find_version(uint32_t version) const;
};

struct NewKeyOptions {
  std::optional<uint32_t> rotation_interval_days;  // default: the store's default
  std::optional<int64_t> expires_at;
};

class KeyStore {
 public:
  // True when dir holds a store file. Throws Errc::InvalidArgument when dir
  // exists and has other files but no store (refusing to initialize there).
  static bool exists(const std::string& dir);

  // Opens an existing store. Throws InsecurePermissions, StoreCorrupt,
  // WrongMasterKey, StoreInUse or Io.
  static KeyStore open(const std::string& dir, const MasterSecret& secret);
  // Initializes a new store in a missing or empty directory (created 0700).
  // pbkdf2_iterations applies to password-protected stores only.
  static KeyStore create(const std::string& dir, const MasterSecret& secret,
                         uint32_t pbkdf2_iterations);

  KeyStore(KeyStore&&) noexcept;
  KeyStore& operator=(KeyStore&&) noexcept;
  ~KeyStore();

  const std::string& dir() const { return dir_; }
  std::string file_path() const;
  const std::vector<KeyRecord>& keys() const { return keys_; }
  const KeyRecord* find(std::string_view name) const;
  const KeyRecord* find(const KeyId& id) const;
  MasterSecret::Kind kek_source() const { return kek_source_; }
  uint32_t pbkdf2_iterations() const { return pbkdf2_iterations_; }

  // Default rotation interval for new keys (ENCRYPTION_ROTATION_INTERVAL_DAYS
  // as read by the daemon, else kDefaultRotationIntervalDays).
  void set_default_rotation_interval_days(uint32_t days) { default_rotation_days_ = days; }

  // Mutations are written to disk before they become visible: when the write
  // fails, the exception propagates and the store in memory is unchanged.
  // create_key throws AlreadyExists or InvalidArgument; rotate_key KeyNotFound.
  const KeyRecord& create_key(std::string_view name, const NewKeyOptions& options);
  const KeyRecord& rotate_key(std::string_view name);

  // The key bytes of one version, unwrapped (throws StoreCorrupt if the
  // wrapped key does not authenticate).
  SecretBytes unwrap(const KeyRecord& key, uint32_t version) const;

  // Usage bookkeeping: updated in memory, written by flush() (called lazily).
  void record_use(const KeyId& id, int64_t now);
  bool dirty() const { return dirty_; }
  void flush();  // writes the store if there are unsaved usage updates

 private:
  KeyStore() = default;
  void save(const std::vector<KeyRecord>& keys);  // atomic write of the whole store

  std::string dir_;
  int lock_fd_ = -1;  // the store directory, flock()ed while the store is open
  MasterSecret::Kind kek_source_ = MasterSecret::Kind::Password;
  std::vector<uint8_t> salt_;
  uint32_t pbkdf2_iterations_ = 0;
  std::vector<uint8_t> kek_check_;
  SecretBytes kek_;
  SecretBytes mac_key_;
  std::vector<KeyRecord> keys_;
  uint32_t default_rotation_days_ = kDefaultRotationIntervalDays;
  bool dirty_ = false;
};

// Wrapping of one data key under the KEK; the AAD binds the key id and the
// version, so a wrapped key moved to another key or version fails to open.
std::vector<uint8_t> wrap_key(ByteView kek, const KeyId& id, uint32_t version, ByteView key);
// Returns an empty SecretBytes when the wrapped key does not authenticate.
SecretBytes unwrap_key(ByteView kek, const KeyId& id, uint32_t version, ByteView wrapped);

// Timestamps in the store and the admin protocol: "2026-11-29T14:00:00Z".
std::string format_timestamp(int64_t unix_seconds);
// Accepts "YYYY-MM-DD", "YYYY-MM-DDTHH:MM[:SS]" followed by "Z" or "+HH:MM" /
// "-HH:MM" (a missing zone means UTC). Returns nullopt when it does not parse.
std::optional<int64_t> parse_timestamp(std::string_view text);

}  // namespace colcrypt::keyd
