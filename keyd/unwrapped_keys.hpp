// keyd's cache of unwrapped data keys. Unwrapping (one AES-256-GCM open under
// the KEK, with its own cipher context) was about 6% of keyd's CPU per fetch
// (bench/ANALYSIS.md); the cache keeps the plain key bytes of the versions
// keyd served recently, so a fetch copies 32 bytes instead.
//
// Safety does not rest on invalidation alone: an entry is only served for
// the exact wrapped form it was unwrapped from (a destroyed version has none,
// so it misses and the store refuses it), and callers keep checking the
// version's state before they ask. On top of that the server clears the whole
// cache on every admin request and every reload, and destroy wipes it at once.
//
// Every key byte lives in a SecretSlab, 128 keys to a page of locked,
// non-dumpable memory (mlock where the limit allows, MADV_DONTDUMP); an
// evicted or cleared slot is wiped. The cache is bounded: `capacity`
// entries, first-in first-out beyond that.
#pragma once
#include <cstddef>
#include <cstdint>
#include <unordered_map>
#include <vector>

#include "core/bytes.hpp"
#include "core/envelope.hpp"
#include "core/secure_memory.hpp"

namespace colcrypt::keyd {

class UnwrappedKeys {
 public:
  // 1,024 versions x 32 bytes: 32 KiB locked when full, far below RLIMIT_MEMLOCK.
  static constexpr size_t kDefaultCapacity = 1024;
  static constexpr size_t kKeySize = AeadKey::kKeySize;

  explicit UnwrappedKeys(size_t capacity = kDefaultCapacity);

  // The key bytes of (id, version), valid until the next insert or clear;
  // empty when not cached or cached for another wrapped form.
  ByteView find(const KeyId& id, uint32_t version, ByteView wrapped) const;
  // Remembers key (kKeySize bytes) as the unwrapping of wrapped; replaces an
  // entry of the same (id, version), else evicts the oldest one when full.
  void insert(const KeyId& id, uint32_t version, ByteView wrapped, ByteView key);
  // Wipes and forgets everything.
  void clear() noexcept;

  size_t size() const { return index_.size(); }
  size_t capacity() const { return slots_.size(); }

 private:
  struct Ref {
    KeyId id{};
    uint32_t version = 0;
    bool operator==(const Ref& o) const { return version == o.version && id == o.id; }
  };
  struct RefHash {
    size_t operator()(const Ref& r) const noexcept;
  };
  struct Slot {
    Ref ref;
    std::vector<uint8_t> wrapped;  // not secret: the form the store keeps on disk
    SecretSlab::Slot key;          // empty: the slot is unused
  };
  void wipe(size_t slot) noexcept;

  SecretSlab keys_{kKeySize};  // before slots_: it outlives their keys
  std::vector<Slot> slots_;
  std::unordered_map<Ref, size_t, RefHash> index_;
  size_t next_ = 0;  // the next slot to fill (the oldest once full)
};

}  // namespace colcrypt::keyd
