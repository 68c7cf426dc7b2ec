#include "core/secure_memory.hpp"

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/rand.h>
#include <sys/mman.h>
#include <unistd.h>

#include <climits>
#include <cstdlib>
#include <cstring>

#include "core/error.hpp"

namespace colcrypt {

namespace {

size_t page_size() {
  static const size_t size = [] {
    long n = sysconf(_SC_PAGESIZE);
    return n > 0 ? static_cast<size_t>(n) : size_t{4096};
  }();
  return size;
}

// Secrets get whole pages of their own: mlock/munlock and MADV_DONTDUMP work
// per page, and a page shared with another allocation could be unlocked by
// that allocation's release.
size_t rounded_to_pages(size_t n) {
  const size_t page = page_size();
  if (n > SIZE_MAX - page) throw Error(Errc::InvalidArgument, "secret too large");
  return (n + page - 1) / page * page;
}

}  // namespace

void secure_zero(void* p, size_t n) {
  if (p != nullptr && n > 0) OPENSSL_cleanse(p, n);
}

bool constant_time_equal(ByteView a, ByteView b) {
  if (a.size != b.size) return false;
  if (a.size == 0) return true;
  return CRYPTO_memcmp(a.data, b.data, a.size) == 0;
}

void random_bytes(uint8_t* out, size_t n) {
  while (n > 0) {
    const size_t chunk = n > size_t{INT_MAX} ? size_t{INT_MAX} : n;
    if (RAND_bytes(out, static_cast<int>(chunk)) != 1) {
      ERR_clear_error();
      throw Error(Errc::CryptoFailure, "RAND_bytes failed");
    }
    out += chunk;
    n -= chunk;
  }
}

SecretBytes::SecretBytes(size_t size) {
  if (size == 0) return;
  const size_t capacity = rounded_to_pages(size);
  void* p = std::aligned_alloc(page_size(), capacity);
  if (p == nullptr) throw std::bad_alloc();
  std::memset(p, 0, capacity);
  // Best effort: RLIMIT_MEMLOCK or a missing capability may refuse; the
  // secret is still wiped on release.
  locked_ = mlock(p, capacity) == 0;
#ifdef MADV_DONTDUMP
  (void)madvise(p, capacity, MADV_DONTDUMP);
#endif
  data_ = static_cast<uint8_t*>(p);
  size_ = size;
}

SecretBytes::SecretBytes(const uint8_t* data, size_t size) : SecretBytes(size) {
  if (size == 0) return;
  // The delegated constructor has completed, so the destructor frees the pages.
  if (data == nullptr) throw Error(Errc::InvalidArgument, "null secret source");
  std::memcpy(data_, data, size);
}

SecretBytes::~SecretBytes() { release(); }

SecretBytes::SecretBytes(SecretBytes&& other) noexcept
    : data_(other.data_), size_(other.size_), locked_(other.locked_) {
  other.data_ = nullptr;
  other.size_ = 0;
  other.locked_ = false;
}

SecretBytes& SecretBytes::operator=(SecretBytes&& other) noexcept {
  if (this != &other) {
    release();
    data_ = other.data_;
    size_ = other.size_;
    locked_ = other.locked_;
    other.data_ = nullptr;
    other.size_ = 0;
    other.locked_ = false;
  }
  return *this;
}

SecretBytes SecretBytes::random(size_t size) {
  SecretBytes s(size);
  random_bytes(s.data_, size);
  return s;
}

void SecretBytes::release() noexcept {
  if (data_ != nullptr) {
    const size_t capacity = (size_ + page_size() - 1) / page_size() * page_size();
    OPENSSL_cleanse(data_, capacity);
#ifdef MADV_DODUMP
    (void)madvise(data_, capacity, MADV_DODUMP);
#endif
    if (locked_) (void)munlock(data_, capacity);
    std::free(data_);
  }
  data_ = nullptr;
  size_ = 0;
  locked_ = false;
}

}  // namespace colcrypt
