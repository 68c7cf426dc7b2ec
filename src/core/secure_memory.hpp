// Owners for secret bytes: locked in memory where the system allows it, and
// wiped (OPENSSL_cleanse) whenever they are released or moved from.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/bytes.hpp"

namespace colcrypt {

// Wipes n bytes in a way the compiler cannot elide.
void secure_zero(void* p, size_t n);

// Constant-time comparison; false when sizes differ.
bool constant_time_equal(ByteView a, ByteView b);

// Fills out with bytes from OpenSSL's CSPRNG; throws Errc::CryptoFailure.
void random_bytes(uint8_t* out, size_t n);

class SecretBytes {
 public:
  SecretBytes() = default;
  explicit SecretBytes(size_t size);  // zero-filled
  SecretBytes(const uint8_t* data, size_t size);
  explicit SecretBytes(ByteView v) : SecretBytes(v.data, v.size) {}
  ~SecretBytes();
  SecretBytes(SecretBytes&& other) noexcept;
  SecretBytes& operator=(SecretBytes&& other) noexcept;
  SecretBytes(const SecretBytes&) = delete;
  SecretBytes& operator=(const SecretBytes&) = delete;

  static SecretBytes random(size_t size);

  uint8_t* data() { return data_; }
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  ByteView view() const { return {data_, size_}; }

 private:
  void release() noexcept;
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
  bool locked_ = false;
};

// Many small secrets of one size sharing locked pages: a SecretBytes each
// would lock a whole page per 32-byte key, and RLIMIT_MEMLOCK (8 MiB by
// default) runs out at about 2,000 of them. The pages are SecretBytes (locked
// where the limit allows, excluded from core dumps, wiped on release); they
// are added as slots are needed and kept, wiped, until the slab is destroyed,
// so a bounded cache's peak bounds them. A slot is wiped when it is released.
// Not thread-safe; the slab must outlive its slots.
class SecretSlab {
 public:
  // One slot: move-only, zero-filled when acquired, wiped and handed back to
  // its slab when destroyed or assigned to.
  class Slot {
   public:
    Slot() = default;
    ~Slot() { release(); }
    Slot(Slot&& other) noexcept;
    Slot& operator=(Slot&& other) noexcept;
    Slot(const Slot&) = delete;
    Slot& operator=(const Slot&) = delete;

    uint8_t* data() { return data_; }
    const uint8_t* data() const { return data_; }
    size_t size() const { return slab_ != nullptr ? slab_->slot_size_ : 0; }
    bool empty() const { return data_ == nullptr; }
    ByteView view() const { return {data_, size()}; }

   private:
    friend class SecretSlab;
    Slot(SecretSlab* slab, uint8_t* data) : slab_(slab), data_(data) {}
    void release() noexcept;
    SecretSlab* slab_ = nullptr;
    uint8_t* data_ = nullptr;
  };

  explicit SecretSlab(size_t slot_size);  // 1 byte to a page
  SecretSlab(const SecretSlab&) = delete;
  SecretSlab& operator=(const SecretSlab&) = delete;

  Slot acquire();                 // zero-filled
  Slot acquire(ByteView secret);  // a copy of secret (slot_size bytes)

  size_t slot_size() const { return slot_size_; }
  size_t slots_in_use() const { return in_use_; }
  size_t pages() const { return pages_.size(); }

 private:
  size_t slot_size_;
  std::vector<SecretBytes> pages_;
  std::vector<uint8_t*> free_;  // wiped slots
  size_t in_use_ = 0;
};

}  // namespace colcrypt
