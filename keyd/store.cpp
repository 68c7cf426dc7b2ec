#include "keyd/store.hpp"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <ctime>

#include "core/aead.hpp"
#include "core/kdf.hpp"
#include "keyd/store_backend.hpp"
#include "keyd/store_file.hpp"
#include "keyd/store_format.hpp"

namespace colcrypt::keyd {
namespace {

using namespace store_format;

int64_t now_seconds() { return static_cast<int64_t>(std::time(nullptr)); }

// The KEK from the master secret and the store's parameters, its check verified.
SecretBytes derive_kek(const KekParams& params, const MasterSecret& secret,
                       const std::string& where) {
  if (params.source != secret.kind) {
    throw Error(Errc::WrongMasterKey, "key store " + where + " is protected by a " +
                                          (params.source == MasterSecret::Kind::Password
                                               ? "master password, but a master key file was given"
                                               : "master key file, but a password was given"));
  }
  SecretBytes kek;
  if (params.source == MasterSecret::Kind::Password) {
    kek = pbkdf2_sha256(secret.bytes.view(), ByteView(params.salt), params.iterations,
                        AeadKey::kKeySize);
  } else {
    if (secret.bytes.size() != AeadKey::kKeySize) {
      throw Error(Errc::WrongMasterKey, "a master key file holds exactly 32 bytes");
    }
    kek = SecretBytes(secret.bytes.view());
  }
  if (!verify_kek_check(kek.view(), params.check)) {
    throw Error(Errc::WrongMasterKey,
                std::string("wrong master ") +
                    (params.source == MasterSecret::Kind::Password ? "password" : "key") +
                    " for key store " + where);
  }
  return kek;
}

// What every backend's records must satisfy beyond their own checks.
void check_records(const std::vector<KeyRecord>& keys, ByteView kek, const std::string& where) {
  for (size_t i = 0; i < keys.size(); ++i) {
    const KeyRecord& k = keys[i];
    for (size_t j = 0; j < i; ++j) {
      if (keys[j].name == k.name || keys[j].id == k.id) {
        corrupt(where, "duplicate key '" + k.name + "'");
      }
    }
    for (const auto& v : k.versions) {
      if (v.state == wire::KeyState::Destroyed) continue;
      if (unwrap_key(kek, k.id, v.version, ByteView(v.wrapped)).empty()) {
        corrupt(where, "wrapped key of '" + k.name + "' version " + std::to_string(v.version) +
                           " does not authenticate");
      }
    }
  }
}

}  // namespace

bool KeyStore::exists(const std::string& dir) { return file_store_exists(dir); }

KeyStore::KeyStore() = default;
KeyStore::KeyStore(KeyStore&&) noexcept = default;
KeyStore& KeyStore::operator=(KeyStore&&) noexcept = default;
KeyStore::~KeyStore() = default;

KeyStore KeyStore::create(const std::string& dir, const MasterSecret& secret,
                          uint32_t pbkdf2_iterations) {
  return create(FileStoreBackend::create(dir), secret, pbkdf2_iterations);
}

KeyStore KeyStore::open(const std::string& dir, const MasterSecret& secret) {
  return open(FileStoreBackend::open(dir, false), secret);
}

KeyStore KeyStore::open_read_only(const std::string& dir, const MasterSecret& secret) {
  return open(FileStoreBackend::open(dir, true), secret);
}

KeyStore KeyStore::create(std::unique_ptr<StoreBackend> backend, const MasterSecret& secret,
                          uint32_t pbkdf2_iterations) {
  KeyStore store;
  store.backend_ = std::move(backend);
  store.params_.source = secret.kind;
  if (secret.kind == MasterSecret::Kind::Password) {
    if (secret.bytes.empty()) throw Error(Errc::InvalidArgument, "the master password is empty");
    if (pbkdf2_iterations == 0) throw Error(Errc::InvalidArgument, "PBKDF2 iterations must be > 0");
    store.params_.salt.resize(kSaltSize);
    random_bytes(store.params_.salt.data(), store.params_.salt.size());
    store.params_.iterations = pbkdf2_iterations;
    store.kek_ = pbkdf2_sha256(secret.bytes.view(), ByteView(store.params_.salt), pbkdf2_iterations,
                               AeadKey::kKeySize);
  } else {
    if (secret.bytes.size() != AeadKey::kKeySize) {
      throw Error(Errc::InvalidArgument, "a master key file holds exactly 32 bytes");
    }
    store.kek_ = SecretBytes(secret.bytes.view());
  }
  store.params_.check = make_kek_check(store.kek_.view());
  store.backend_->initialize(store.params_, {}, store.kek_.view());
  return store;
}

KeyStore KeyStore::open(std::unique_ptr<StoreBackend> backend, const MasterSecret& secret) {
  KeyStore store;
  store.backend_ = std::move(backend);
  store.params_ = store.backend_->read_params();
  const std::string where = store.backend_->location();
  store.kek_ = derive_kek(store.params_, secret, where);
  std::vector<KeyRecord> keys = store.backend_->read_keys(store.kek_.view());
  check_records(keys, store.kek_.view(), where);
  store.keys_ = std::move(keys);
  return store;
}

void KeyStore::copy_to(StoreBackend& destination) const {
  destination.initialize(params_, keys_, kek_.view());
}

std::string KeyStore::dir() const { return backend_->dir(); }
std::string KeyStore::location() const { return backend_->location(); }
bool KeyStore::read_only() const { return backend_->read_only(); }
std::string KeyStore::read_only_reason() const { return backend_->read_only_reason(); }

void KeyStore::check_writable() const {
  if (backend_->read_only()) throw Error(Errc::PermissionDenied, backend_->read_only_reason());
}

void KeyStore::save(const std::vector<KeyRecord>& keys) {
  check_writable();
  backend_->save(params_, keys, releasing_, kek_.view());
}

void KeyStore::adopt(std::vector<KeyRecord> keys) {
  check_records(keys, kek_.view(), backend_->location());
  // What this keyd counted but did not write yet stays counted: a re-read
  // never lowers a usage count or forgets a use.
  for (auto& k : keys) {
    const KeyRecord* old = find(k.id);
    if (!old) continue;
    if (old->last_used && (!k.last_used || *k.last_used < *old->last_used)) {
      k.last_used = old->last_used;
    }
    for (auto& v : k.versions) {
      const KeyVersion* ov = old->find_version(v.version);
      // After a failover the same version number may be another key (the
      // new primary's own rotation): its uses are not the lost one's.
      if (!ov || ov->wrapped != v.wrapped) continue;
      if (ov->usage_count > v.usage_count) {
        k.usage_count += ov->usage_count - v.usage_count;
        v.usage_count = ov->usage_count;
      }
    }
  }
  for (auto& old : keys_) {
    for (auto& ov : old.versions) secure_zero(ov.wrapped.data(), ov.wrapped.size());
  }
  keys_ = std::move(keys);
}

KeyStore::PollResult KeyStore::poll(bool force_reload) {
  StorePoll found = backend_->poll(kek_.view(), force_reload);
  PollResult result;
  result.role_changed = found.role_changed;
  if (found.reloaded) {
    adopt(std::move(found.keys));
    result.reloaded = true;
  }
  return result;
}

std::optional<StoreRewind> KeyStore::take_rewind() { return backend_->take_rewind(); }

std::string KeyStore::file_text() const {
  return store_file_text(params_, keys_, releasing_, kek_.view(), backend_->audit_mark());
}

std::string KeyStore::records_text() const {
  return store_file_text(params_, keys_, false, kek_.view());
}

AuditMark KeyStore::audit_mark() const { return backend_->audit_mark(); }

void KeyStore::set_audit_mark(const AuditMark& mark) {
  if (!backend_->keeps_audit_mark() || mark.seq == 0 || mark == backend_->audit_mark()) return;
  backend_->set_audit_mark(mark);
  dirty_ = true;
}

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
  if (read_only()) {
    // A lease must be reserved in the database before a key goes out.
    throw Error(Errc::KeyUnavailable,
                "standby: encrypt on the primary (" + read_only_reason() + ")");
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
  // A standby's keyd keeps last_used in memory only: the primary owns the rows.
  if (read_only()) {
    dirty_ = false;
    return;
  }
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
}  // namespace colcrypt::keyd
