#include "core/nonce.hpp"

#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <new>

#include "core/error.hpp"
#include "core/secure_memory.hpp"

namespace colcrypt {

namespace {

// One page per thread. The bookkeeping lives inside the page on purpose: with
// MADV_WIPEONFORK the kernel hands a forked child a zeroed page, so `armed`
// reads 0 there and the child refills before its first draw, whatever way it
// was forked (fork(), clone(), a library that bypasses pthread_atfork).
constexpr size_t kPageSize = 4096;
constexpr size_t kHeaderBytes = 16;
constexpr size_t kBatchNonces = (kPageSize - kHeaderBytes) / kNonceBytes;  // 340
constexpr size_t kBatchBytes = kBatchNonces * kNonceBytes;

struct BatchPage {
  uint32_t armed;  // 1 after a successful refill; 0 when empty or wiped by fork
  uint32_t next;   // offset of the next unused nonce in bytes
  pid_t pid;       // the process that drew these bytes
  uint32_t unused;
  uint8_t bytes[kBatchBytes];
};
static_assert(sizeof(BatchPage) <= kPageSize, "a batch fits one page");

// Bumped in every child by the pthread_atfork handler: a second, independent
// fork signal (it covers fork() through libc even where the kernel lacks
// MADV_WIPEONFORK).
std::atomic<uint64_t> fork_generation{0};

void on_fork_child() { fork_generation.fetch_add(1, std::memory_order_relaxed); }

bool register_fork_handler() {
  if (pthread_atfork(nullptr, nullptr, on_fork_child) != 0) {
    throw Error(Errc::CryptoFailure, "pthread_atfork failed: nonces would not be fork-safe");
  }
  return true;
}

class ThreadBatch {
 public:
  ThreadBatch() = default;
  ~ThreadBatch() {
    if (page_ != nullptr) munmap(page_, kPageSize);
  }
  ThreadBatch(const ThreadBatch&) = delete;
  ThreadBatch& operator=(const ThreadBatch&) = delete;

  void draw(uint8_t* out) {
    static const bool registered = register_fork_handler();
    (void)registered;
    if (page_ == nullptr) map_page();
    const uint64_t generation = fork_generation.load(std::memory_order_relaxed);
    // Without the kernel's wipe, a forked child is recognised by its pid on
    // every draw (a system call, so only as the fallback).
    const bool pid_changed = !wiped_on_fork_ && page_->pid != getpid();
    if (page_->armed != 1 || page_->next + kNonceBytes > kBatchBytes || generation != generation_ ||
        pid_changed) {
      refill(generation);
    }
    std::memcpy(out, page_->bytes + page_->next, kNonceBytes);
    page_->next += static_cast<uint32_t>(kNonceBytes);
  }

  bool wiped_on_fork() {
    if (page_ == nullptr) map_page();
    return wiped_on_fork_;
  }

 private:
  void map_page() {
    void* p = mmap(nullptr, kPageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
#ifdef MADV_WIPEONFORK
    wiped_on_fork_ = madvise(p, kPageSize, MADV_WIPEONFORK) == 0;
#endif
    page_ = static_cast<BatchPage*>(p);  // zero-filled: armed == 0
  }

  void refill(uint64_t generation) {
    // Disarm first: if RAND_bytes throws, the next draw refills again rather
    // than hand out bytes of the old batch.
    page_->armed = 0;
    page_->next = static_cast<uint32_t>(kBatchBytes);
    random_bytes(page_->bytes, kBatchBytes);
    page_->pid = getpid();
    page_->next = 0;
    page_->armed = 1;
    generation_ = generation;
  }

  BatchPage* page_ = nullptr;
  bool wiped_on_fork_ = false;
  uint64_t generation_ = 0;
};

ThreadBatch& this_thread_batch() {
  thread_local ThreadBatch batch;
  return batch;
}

}  // namespace

void fresh_nonce(uint8_t out[kNonceBytes]) { this_thread_batch().draw(out); }

namespace detail {
size_t nonces_per_batch() { return kBatchNonces; }
bool nonce_batch_wiped_on_fork() { return this_thread_batch().wiped_on_fork(); }
}  // namespace detail

}  // namespace colcrypt
