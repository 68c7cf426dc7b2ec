#include "core/secure_memory.hpp"

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/rand.h>
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
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

// Returns whole pages to the system: undo what acquire_pages() set up.
void release_pages(void* p, size_t capacity, bool locked) noexcept {
#ifdef MADV_DODUMP
  (void)madvise(p, capacity, MADV_DODUMP);
#endif
  if (locked) (void)munlock(p, capacity);
  std::free(p);
}

// A few single-page secrets per thread are kept for reuse, already locked and
// excluded from core dumps, and wiped: per-value scratch secrets (re-encryption
// holds each plaintext in one) would otherwise pay mlock, munlock and two
// madvise system calls per value. A cached page is all zeros: it was zeroed
// when acquired and every byte a SecretBytes exposed was wiped on release.
// The cache never holds more pages than the thread once had live at the same
// time: a backend keeps a few; keyd's poll loop holds one key reply frame per
// request of a group-committed batch until it sends them (64 pages = 256 KiB
// locked at most, far below the usual 8 MiB RLIMIT_MEMLOCK).
constexpr size_t kCachedPages = 64;

struct PageCache {  // trivially destructible: valid until the thread is gone
  void* pages[kCachedPages];
  bool locked[kCachedPages];
  size_t count;
  uint64_t generation;
  bool closed;  // the thread is exiting: no more caching
};
thread_local PageCache page_cache;

// A forked child does not inherit memory locks: it drops the pages its
// parent cached (they hold no secret) rather than hand them out as locked.
std::atomic<uint64_t> fork_generation{0};
void on_fork_child() { fork_generation.fetch_add(1, std::memory_order_relaxed); }

void drain(PageCache& cache) noexcept {
  const bool same_process = cache.generation == fork_generation.load(std::memory_order_relaxed);
  for (size_t i = 0; i < cache.count; ++i) {
    if (same_process) {
      release_pages(cache.pages[i], page_size(), cache.locked[i]);
    } else {
      std::free(cache.pages[i]);  // not locked in this process
    }
  }
  cache.count = 0;
  cache.generation = fork_generation.load(std::memory_order_relaxed);
}

// Drains the thread's cache when the thread exits.
struct PageCacheCloser {
  ~PageCacheCloser() {
    drain(page_cache);
    page_cache.closed = true;
  }
};

bool take_cached_page(void*& p, bool& locked) noexcept {
  PageCache& cache = page_cache;
  if (cache.generation != fork_generation.load(std::memory_order_relaxed)) drain(cache);
  if (cache.count == 0) return false;
  --cache.count;
  p = cache.pages[cache.count];
  locked = cache.locked[cache.count];
  return true;
}

// Takes a wiped single page, or returns false (the caller releases it).
bool cache_page(void* p, bool locked) noexcept {
  static const bool registered = pthread_atfork(nullptr, nullptr, on_fork_child) == 0;
  if (!registered) return false;
  PageCache& cache = page_cache;
  if (cache.closed) return false;
  thread_local PageCacheCloser closer;  // registers the exit drain on first use
  (void)closer;
  if (cache.generation != fork_generation.load(std::memory_order_relaxed)) drain(cache);
  if (cache.count == kCachedPages) return false;
  cache.pages[cache.count] = p;
  cache.locked[cache.count] = locked;
  ++cache.count;
  return true;
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
  if (capacity == page_size()) {
    void* cached = nullptr;
    bool locked = false;
    if (take_cached_page(cached, locked)) {
      data_ = static_cast<uint8_t*>(cached);  // all zeros, locked as recorded
      size_ = size;
      locked_ = locked;
      return;
    }
  }
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
    // Only the bytes this secret exposed: the rest of its pages is still the
    // zeros they were acquired with, so a cached page stays all zeros. (keyd
    // spent 6% of a fetch wiping whole pages for 32-byte keys.)
    OPENSSL_cleanse(data_, size_);
    if (capacity != page_size() || !cache_page(data_, locked_)) {
      release_pages(data_, capacity, locked_);
    }
  }
  data_ = nullptr;
  size_ = 0;
  locked_ = false;
}

SecretSlab::SecretSlab(size_t slot_size) : slot_size_(slot_size) {
  if (slot_size == 0 || slot_size > page_size())
    throw Error(Errc::InvalidArgument, "secret slab slots must fit a page");
}

SecretSlab::Slot SecretSlab::acquire() {
  if (free_.empty()) {
    const size_t per_page = page_size() / slot_size_;
    // Room for every slot there will be: release() pushes without allocating.
    free_.reserve((pages_.size() + 1) * per_page);
    SecretBytes& page = pages_.emplace_back(page_size());
    for (size_t i = per_page; i-- > 0;) free_.push_back(page.data() + i * slot_size_);
  }
  uint8_t* slot = free_.back();
  free_.pop_back();
  ++in_use_;
  return Slot(this, slot);
}

SecretSlab::Slot SecretSlab::acquire(ByteView secret) {
  if (secret.size != slot_size_)
    throw Error(Errc::InvalidArgument, "secret of the wrong size for its slab");
  Slot slot = acquire();
  std::memcpy(slot.data(), secret.data, secret.size);
  return slot;
}

SecretSlab::Slot::Slot(Slot&& other) noexcept : slab_(other.slab_), data_(other.data_) {
  other.slab_ = nullptr;
  other.data_ = nullptr;
}

SecretSlab::Slot& SecretSlab::Slot::operator=(Slot&& other) noexcept {
  if (this != &other) {
    release();
    slab_ = other.slab_;
    data_ = other.data_;
    other.slab_ = nullptr;
    other.data_ = nullptr;
  }
  return *this;
}

void SecretSlab::Slot::release() noexcept {
  if (data_ == nullptr) return;
  OPENSSL_cleanse(data_, slab_->slot_size_);
  // Cannot fail: free_ was reserved for every slot of every page.
  slab_->free_.push_back(data_);
  --slab_->in_use_;
  slab_ = nullptr;
  data_ = nullptr;
}

}  // namespace colcrypt
