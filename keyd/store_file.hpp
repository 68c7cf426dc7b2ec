// The file backend of the key store: keystore.json (0600) in a private
// directory (0700), flock()ed while open, the whole content authenticated by
// an HMAC under a key derived from the KEK, every write atomic (temp file,
// fsync, rename, fsync of the directory). docs/operations.md, "Key store".
#pragma once
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "keyd/store_backend.hpp"

namespace colcrypt::keyd {

class FileStoreBackend : public StoreBackend {
 public:
  // Opens the store in dir: checks ownership and modes, takes the lock
  // (StoreInUse), removes a stale temp file. read_only: none of that (a
  // running keyd may hold the lock); the content is checked all the same.
  static std::unique_ptr<FileStoreBackend> open(const std::string& dir, bool read_only);
  // Creates dir (0700) if missing and locks it; AlreadyExists if it holds a store.
  static std::unique_ptr<FileStoreBackend> create(const std::string& dir);
  ~FileStoreBackend() override;

  std::string location() const override { return file_path(); }
  std::string dir() const override { return dir_; }
  std::string file_path() const;
  KekParams read_params() override;
  std::vector<KeyRecord> read_keys(ByteView kek) override;
  void initialize(const KekParams& params, const std::vector<KeyRecord>& keys,
                  ByteView kek) override;
  void save(const KekParams& params, const std::vector<KeyRecord>& keys, bool exact_usage,
            ByteView kek) override;
  bool keeps_audit_mark() const override { return true; }
  AuditMark audit_mark() const override { return mark_; }
  void set_audit_mark(const AuditMark& mark) override { mark_ = mark; }

 private:
  explicit FileStoreBackend(std::string dir) : dir_(std::move(dir)) {}
  std::string dir_;
  int lock_fd_ = -1;
  bool read_only_ = false;
  nlohmann::json body_;  // the file read by read_params, without its checksum
  AuditMark mark_;       // as read by read_keys, or set since
};

// KeyStore::exists.
bool file_store_exists(const std::string& dir);

// The text of keystore.json holding `keys` (what a save writes).
std::string store_file_text(const KekParams& params, const std::vector<KeyRecord>& keys,
                            bool exact_usage, ByteView kek, const AuditMark& mark = {});

}  // namespace colcrypt::keyd
