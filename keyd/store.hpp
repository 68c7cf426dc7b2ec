// colcrypt-keyd's key store: the keys, their versions and their lifecycle,
// every data key wrapped with AES-256-GCM under the KEK. Where the records
// live is a StoreBackend (keyd/store_backend.hpp): one MACed JSON file
// (keystore.json, store_file.cpp) or MACed rows in a Postgres schema
// (store_db.cpp). docs/operations.md describes both and their guarantees.
#pragma once
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
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
// Encryptions allowed per key version before keyd rotates the key. The default
// is the seed's demo value; docs/rotation.md recommends 2^28 for production,
// and the ceiling keeps every version far below the 2^32 random-nonce limit
// of NIST SP 800-38D.
constexpr uint64_t kDefaultMaxUsesPerVersion = 10000;
constexpr uint64_t kMaxMaxUsesPerVersion = uint64_t{1} << 31;
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

// When a version was first and last fetched to key deterministic values or
// blind indexes (wire::FetchPurpose). Such values are always keyed from
// version 1 and no row count can find them, so keyd remembers it: disabling
// or destroying a version with a recorded use needs --force.
struct DerivationUse {
  std::optional<int64_t> first_used;  // on disk before the first such fetch is answered
  std::optional<int64_t> last_used;   // kept in memory, written by flush()
};

// What turns the master secret into the KEK, and the value that tells a
// wrong master secret from a damaged store.
struct KekParams {
  MasterSecret::Kind source = MasterSecret::Kind::Password;
  std::vector<uint8_t> salt;   // PBKDF2 salt (password stores)
  uint32_t iterations = 0;     // PBKDF2 iterations (password stores)
  std::vector<uint8_t> check;  // AES-GCM of a fixed text under the KEK
};

class StoreBackend;

// A database store taken at a lower generation than keyd had seen, because
// the database's timeline went up (a failover or a point-in-time restore).
struct StoreRewind {
  int64_t old_timeline = 0, old_generation = 0;
  int64_t new_timeline = 0, new_generation = 0;
};

struct KeyVersion {
  uint32_t version = 0;
  wire::KeyState state = wire::KeyState::Active;
  int64_t created_at = 0;        // Unix seconds, UTC
  std::vector<uint8_t> wrapped;  // kWrappedKeySize bytes; empty once destroyed
  // Encryptions charged to this version (granted to backends, used or not).
  uint64_t usage_count = 0;
  // What the file on disk already charges (usage_count plus a reservation):
  // a crash of keyd can over-count, never under-count (see charge_uses).
  uint64_t usage_persisted = 0;
  std::optional<int64_t> destroyed_at;
  // When this version stopped being primary (the rotation that replaced it);
  // nullopt for the primary and for a version that never was primary. A store
  // written before this field existed: a retired version gets its successor's
  // created_at (the instant of the rotation that retired it).
  std::optional<int64_t> retired_at;
  DerivationUse deterministic;  // colcrypt.encrypt_deterministic and its decryption
  DerivationUse blind_index;    // colcrypt.blind_index
  bool keys_derived_values() const {
    return deterministic.first_used.has_value() || blind_index.first_used.has_value();
  }
};

struct KeyRecord {
  KeyId id{};
  std::string name;
  std::string algorithm = "AES-256-GCM";
  int64_t created_at = 0;
  std::optional<int64_t> expires_at;
  uint32_t rotation_interval_days = kDefaultRotationIntervalDays;
  std::optional<int64_t> last_used;
  uint64_t usage_count = 0;  // encryptions charged over all versions
  uint32_t primary_version = 0;
  uint64_t max_uses_per_version = kDefaultMaxUsesPerVersion;
  std::vector<KeyVersion> versions;  // ascending by version

  const KeyVersion* find_version(uint32_t version) const;
  const KeyVersion& primary() const { return *find_version(primary_version); }
};

// How disable_version / destroy_version check the retirement grace: a backend
// may keep encrypting under a primary it cached for up to colcrypt.key_cache_ttl
// seconds after a rotation, so a retired version may be disabled or destroyed
// only once retired_at + grace_seconds has passed (rows = 0 is not enough).
struct RetireGrace {
  int64_t now = 0;            // Unix seconds, UTC
  int64_t grace_seconds = 0;  // colcrypt-keyd --retire-grace-seconds
  bool force = false;         // --force: skip the check
};

struct NewKeyOptions {
  std::optional<uint32_t> rotation_interval_days;  // default: the store's default
  std::optional<int64_t> expires_at;
  std::optional<uint64_t> max_uses_per_version;  // default: the store's default
};

// The result of charge_uses: encrypt at most `granted` values with `version`.
struct UseGrant {
  uint32_t version = 0;
  uint64_t granted = 0;
  bool rotated = false;  // the key was rotated to serve (or after) this grant
};

// Where the audit log stood when keyd last made it durable (AuditLog::
// durable_mark): its last entry's seq and mac, and the log's size then. The
// key store keeps it (under the store's MAC) so that a log cut back and an
// old copy of its head restored are found: the log must still hold this
// entry at this offset, and the head must not name an earlier one.
struct AuditMark {
  uint64_t seq = 0;  // 0: none recorded (a new store, or one written before marks)
  std::string mac;
  uint64_t size = 0;
  bool operator==(const AuditMark& o) const {
    return seq == o.seq && mac == o.mac && size == o.size;
  }
};

// Why a key is due for automatic rotation (KeyStore::rotation_due).
enum class RotationReason { None, Interval, UsageCap };

class KeyStore {
 public:
  // True when dir holds a store file. Throws Errc::InvalidArgument when dir
  // exists and has other files but no store (refusing to initialize there).
  static bool exists(const std::string& dir);

  // Opens an existing store. Throws InsecurePermissions, StoreCorrupt,
  // WrongMasterKey, StoreInUse or Io.
  static KeyStore open(const std::string& dir, const MasterSecret& secret);
  // Opens an existing store for reading only (colcrypt-keyctl's offline
  // audit verify): no lock (a running keyd may hold it), no cleanup, no
  // ownership or mode check; the same checks of content and master secret.
  // Must never be written (flush, mutations).
  static KeyStore open_read_only(const std::string& dir, const MasterSecret& secret);
  // Initializes a new store in a missing or empty directory (created 0700).
  // pbkdf2_iterations applies to password-protected stores only.
  static KeyStore create(const std::string& dir, const MasterSecret& secret,
                         uint32_t pbkdf2_iterations);
  // The same on any backend (the database backend: keyd/store_db.hpp).
  static KeyStore open(std::unique_ptr<StoreBackend> backend, const MasterSecret& secret);
  static KeyStore create(std::unique_ptr<StoreBackend> backend, const MasterSecret& secret,
                         uint32_t pbkdf2_iterations);

  KeyStore(KeyStore&&) noexcept;
  KeyStore& operator=(KeyStore&&) noexcept;
  ~KeyStore();

  // The directory of a file store (empty for the database backend).
  std::string dir() const;
  // Where the store lives: the store file, or "database ..." (messages, audit).
  std::string location() const;
  std::string file_path() const { return location(); }
  // The database backend on a standby (or unreachable): fetches of loaded
  // keys only; every change throws Error(PermissionDenied, reason).
  bool read_only() const;
  std::string read_only_reason() const;
  // The database backend's periodic look (keyd's loop, about once a second,
  // and at once when a fetch names a key or version not loaded):
  // role_changed when it became writable or read-only; reloaded when the
  // records were re-read (verified) and replaced. A failed re-read throws
  // (StoreCorrupt: tampered rows) and keeps the records keyd has.
  struct PollResult {
    bool role_changed = false;
    bool reloaded = false;
  };
  PollResult poll(bool force_reload = false);
  // See StoreBackend::take_rewind.
  std::optional<StoreRewind> take_rewind();
  const KekParams& kek_params() const { return params_; }
  // Writes these records, as they are (wrapped keys copied, never unwrapped),
  // and the KEK parameters into a new store (colcrypt-keyctl store migrate).
  void copy_to(StoreBackend& destination) const;
  const std::vector<KeyRecord>& keys() const { return keys_; }
  const KeyRecord* find(std::string_view name) const;
  const KeyRecord* find(const KeyId& id) const;
  MasterSecret::Kind kek_source() const { return params_.source; }
  uint32_t pbkdf2_iterations() const { return params_.iterations; }

  // Default rotation interval for new keys (ENCRYPTION_ROTATION_INTERVAL_DAYS
  // as read by the daemon, else kDefaultRotationIntervalDays).
  void set_default_rotation_interval_days(uint32_t days) { default_rotation_days_ = days; }
  void set_default_max_uses_per_version(uint64_t uses) { default_max_uses_ = uses; }

  // Mutations are written to disk before they become visible: when the write
  // fails, the exception propagates and the store in memory is unchanged.
  // create_key throws AlreadyExists or InvalidArgument; rotate_key KeyNotFound.
  const KeyRecord& create_key(std::string_view name, const NewKeyOptions& options);
  // A rotation publishes the new version decrypt-only (written to disk), then
  // makes it primary (written again): a reader never sees a primary that
  // was not first published as decryptable.
  const KeyRecord& rotate_key(std::string_view name);

  // Version state machine (docs/rotation.md):
  //   active (primary) -> decrypt-only        by rotate_key
  //   decrypt-only     -> disabled            by disable_version (reversible)
  //   disabled         -> decrypt-only        by enable_version
  //   decrypt-only | disabled -> destroyed    by destroy_version (irreversible:
  //                                           the wrapped key bytes are erased)
  // The primary version can be neither disabled nor destroyed. Invalid
  // transitions throw InvalidArgument; unknown keys or versions KeyNotFound.
  // disable and destroy also throw InvalidArgument (check_retire_grace) while
  // the version is inside its retirement grace, unless grace.force.
  const KeyRecord& disable_version(std::string_view name, uint32_t version,
                                   const RetireGrace& grace);
  const KeyRecord& enable_version(std::string_view name, uint32_t version);
  const KeyRecord& destroy_version(std::string_view name, uint32_t version,
                                   const RetireGrace& grace);
  // Throws InvalidArgument, saying how long to wait and why, when `version` of
  // `key` was retired less than grace.grace_seconds before grace.now (and
  // grace.force is false). `action` is "disable" or "destroy".
  static void check_retire_grace(const KeyRecord& key, uint32_t version, std::string_view action,
                                 const RetireGrace& grace);

  // Throws InvalidArgument, saying what breaks and how to proceed, when
  // `version` of `key` has keyed deterministic values or blind indexes (a
  // recorded DerivationUse) and force is false. `action`: "disable"/"destroy".
  static void check_derivation_pin(const KeyRecord& key, uint32_t version, std::string_view action,
                                   bool force);

  // Records that a backend fetched `version` of key `id` for `purpose`
  // (Deterministic or BlindIndex). The first such use of a version is
  // written to disk before this returns (throws when it cannot be: the
  // caller must then refuse the fetch); later ones update last_used in
  // memory. Returns true for the first use. KeyNotFound for an unknown key
  // or version.
  bool record_derivation(const KeyId& id, uint32_t version, wire::FetchPurpose purpose,
                         int64_t now);

  // Charges up to `wanted` encryptions to the primary version of `name` and
  // returns what was granted (at least 1). wanted 0 is a lookup: the primary
  // version, granted 0, nothing charged or saved, never a rotation. A version never gets more than
  // its key's max_uses_per_version: when the primary's cap is reached the key
  // is rotated (before the grant if nothing is left, after it if the grant
  // used the rest). The charge is on disk before this returns whenever it
  // exceeds the previous reservation (so a crash never under-counts).
  // Throws KeyNotFound, or KeyUnavailable when the key expired.
  UseGrant charge_uses(std::string_view name, uint64_t wanted, int64_t now);

  // Whether the key's primary version is due for rotation at `now`: its age
  // reached rotation_interval_days * day_seconds, or its usage reached the cap.
  RotationReason rotation_due(const KeyRecord& key, int64_t now, int64_t day_seconds) const;

  // The key bytes of one version, unwrapped (throws StoreCorrupt if the
  // wrapped key does not authenticate).
  SecretBytes unwrap(const KeyRecord& key, uint32_t version) const;

  // last_used bookkeeping on every fetch: updated in memory, written by
  // flush() (called lazily).
  void record_use(const KeyId& id, int64_t now);
  bool dirty() const { return dirty_; }
  // Writes the store if there are unsaved updates. release_reservations
  // (a clean stop) writes the exact usage counts instead of the reservations.
  void flush(bool release_reservations = false);

  // Key for the audit log's MAC chain (HKDF of the KEK, its own label).
  SecretBytes audit_mac_key() const;
  // The audit log's mark (AuditMark) as of the last save or set_audit_mark.
  // A new mark makes the store dirty: the next flush() writes it.
  // Only the file store keeps a mark (StoreBackend::keeps_audit_mark); with
  // another backend audit_mark() is empty and set_audit_mark does nothing.
  AuditMark audit_mark() const;
  void set_audit_mark(const AuditMark& mark);

  // The file a save would write now (tests, the store's fuzz target).
  std::string file_text() const;
  // The same without the audit mark, which belongs to one host's log and is
  // not copied: what a store and its copy share (store migrate compares it).
  std::string records_text() const;

 private:
  KeyStore();
  void save(const std::vector<KeyRecord>& keys);  // atomic write of the whole store
  void check_writable() const;                    // PermissionDenied on a read-only backend
  void adopt(std::vector<KeyRecord> keys);        // records re-read by the backend

  std::unique_ptr<StoreBackend> backend_;
  KekParams params_;
  SecretBytes kek_;
  std::vector<KeyRecord> keys_;
  uint32_t default_rotation_days_ = kDefaultRotationIntervalDays;
  uint64_t default_max_uses_ = kDefaultMaxUsesPerVersion;
  bool dirty_ = false;
  bool releasing_ = false;  // save() writes exact usage instead of reservations

  KeyRecord& mutable_key(std::string_view name, std::vector<KeyRecord>& keys);
  void rotate_in_place(std::vector<KeyRecord>& next, size_t index, int64_t now);
};

// The store file's MAC key (HKDF of the KEK) and its signing: doc (without
// "mac" and "checksum") gains both and is printed as keyd writes it.
SecretBytes store_mac_key(ByteView kek);
std::string signed_store_text(nlohmann::json doc, ByteView mac_key);
// The audit log's MAC key (KeyStore::audit_mac_key of a store under kek).
SecretBytes audit_mac_key(ByteView kek);

// Wrapping of one data key under the KEK; the AAD binds the key id and the
// version, so a wrapped key moved to another key or version fails to open.
std::vector<uint8_t> wrap_key(ByteView kek, const KeyId& id, uint32_t version, ByteView key);
// Returns an empty SecretBytes when the wrapped key does not authenticate.
SecretBytes unwrap_key(ByteView kek, const KeyId& id, uint32_t version, ByteView wrapped);

// A key's metadata as the admin protocol shows it (no key material); the
// store file adds each version's wrapped key to the same form.
nlohmann::json key_metadata_json(const KeyRecord& k);

// Timestamps in the store and the admin protocol: "2026-11-29T14:00:00Z".
std::string format_timestamp(int64_t unix_seconds);
// Accepts "YYYY-MM-DD", "YYYY-MM-DDTHH:MM[:SS]" followed by "Z" or "+HH:MM" /
// "-HH:MM" (a missing zone means UTC). Returns nullopt when it does not parse.
std::optional<int64_t> parse_timestamp(std::string_view text);

}  // namespace colcrypt::keyd
