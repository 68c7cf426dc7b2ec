// Batched nonces (core/nonce.hpp): never the same 12 bytes twice, not across
// batches, threads, nor a fork (through libc's fork() and through a raw fork
// system call that skips pthread_atfork handlers).
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <catch2/catch.hpp>
#include <set>
#include <thread>
#include <vector>

#include "core/envelope.hpp"
#include "core/nonce.hpp"

using namespace colcrypt;

namespace {

using Nonce = std::array<uint8_t, kNonceBytes>;

std::vector<Nonce> draw(size_t n) {
  std::vector<Nonce> v(n);
  for (auto& nonce : v) fresh_nonce(nonce.data());
  return v;
}

void require_distinct(const std::vector<Nonce>& a, const std::vector<Nonce>& b = {}) {
  std::set<Nonce> seen;
  for (const auto& n : a) REQUIRE(seen.insert(n).second);
  for (const auto& n : b) REQUIRE(seen.insert(n).second);
}

bool write_all(int fd, const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  while (n > 0) {
    const ssize_t w = write(fd, p, n);
    if (w <= 0) return false;
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

bool read_all(int fd, void* data, size_t n) {
  auto* p = static_cast<uint8_t*>(data);
  while (n > 0) {
    const ssize_t r = read(fd, p, n);
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

// Parent and child both draw `count` nonces after the fork, starting from a
// batch the parent had half used before it; returns the child's nonces.
template <typename Fork>
std::vector<Nonce> child_nonces_after(Fork do_fork, size_t count, std::vector<Nonce>& parent) {
  int fds[2];
  REQUIRE(pipe(fds) == 0);
  const pid_t pid = do_fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    close(fds[0]);
    int rc = 0;
    try {
      const std::vector<Nonce> mine = draw(count);
      if (!write_all(fds[1], mine.data(), mine.size() * kNonceBytes)) rc = 2;
    } catch (...) {
      rc = 3;
    }
    _exit(rc);
  }
  close(fds[1]);
  parent = draw(count);
  std::vector<Nonce> theirs(count);
  const bool complete = read_all(fds[0], theirs.data(), count * kNonceBytes);
  close(fds[0]);
  int status = 0;
  REQUIRE(waitpid(pid, &status, 0) == pid);
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) == 0);
  REQUIRE(complete);
  return theirs;
}

}  // namespace

TEST_CASE("nonces never repeat within a process, across many batches", "[nonce]") {
  const size_t n = detail::nonces_per_batch() * 300 + 7;
  require_distinct(draw(n));
}

TEST_CASE("a batch holds more than one nonce", "[nonce]") {
  // Otherwise the batching buys nothing and the benchmark target is moot.
  REQUIRE(detail::nonces_per_batch() >= 256);
}

TEST_CASE("threads draw from separate batches, no repeats", "[nonce]") {
  const size_t n = detail::nonces_per_batch() * 20;
  std::vector<Nonce> a, b;
  std::thread ta([&] { a = draw(n); });
  std::thread tb([&] { b = draw(n); });
  ta.join();
  tb.join();
  require_distinct(a, b);
}

TEST_CASE("parent and a fork()ed child never share nonces", "[nonce]") {
  const size_t half = detail::nonces_per_batch() / 2;
  const std::vector<Nonce> before = draw(half);  // the batch is now half used
  std::vector<Nonce> parent;
  const std::vector<Nonce> child =
      child_nonces_after([] { return fork(); }, detail::nonces_per_batch() * 2, parent);
  require_distinct(parent, child);
  require_distinct(before, child);
}

#ifdef SYS_fork
TEST_CASE("a child forked by the raw system call (no atfork handlers) gets fresh nonces",
          "[nonce]") {
  // The kernel's MADV_WIPEONFORK (or, without it, the getpid check) must
  // catch a fork that libc never saw.
  const size_t half = detail::nonces_per_batch() / 2;
  const std::vector<Nonce> before = draw(half);
  std::vector<Nonce> parent;
  const std::vector<Nonce> child = child_nonces_after(
      [] { return static_cast<pid_t>(syscall(SYS_fork)); }, detail::nonces_per_batch(), parent);
  require_distinct(parent, child);
  require_distinct(before, child);
}
#endif

TEST_CASE("sealed envelopes carry distinct nonces", "[nonce][envelope]") {
  std::vector<uint8_t> key_bytes(32, 0x42);
  AeadKey key(key_bytes);
  const KeyId id{};
  const uint8_t plain[3] = {'a', 'b', 'c'};
  std::set<std::vector<uint8_t>> nonces;
  std::vector<uint8_t> env(sealed_size(sizeof plain));
  for (size_t i = 0; i < detail::nonces_per_batch() * 3; ++i) {
    seal(key, id, 1, PayloadType::Bytes, ByteView(), ByteView(plain, sizeof plain), env.data());
    REQUIRE(nonces.insert(std::vector<uint8_t>(env.begin() + 24, env.begin() + 36)).second);
  }
}
