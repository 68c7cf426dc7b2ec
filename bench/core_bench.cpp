// Core micro-benchmarks (Google Benchmark): the colcrypt envelope against raw
// OpenSSL EVP AES-256-GCM with a reused, keyed context, on the same sizes.
//
// The baseline does the GCM work an envelope needs and nothing else: a
// context keyed once, per value only the IV, the 36-byte AAD the envelope
// authenticates (its header), the plaintext and the tag. It takes its IV from
// a counter, so what the ratio shows is everything colcrypt adds: header
// building and checking, the nonce draw, the argument checks.
// BM_EnvelopeSealRandPerValue keeps the old nonce source (one RAND_bytes per
// value) to show what batching saves. bench/run.sh turns the medians into ratios.
//
// BM_CacheClockBoottime against BM_CacheClockCoarse: what the backend key
// cache's TTL clock (src/pg/key_cache.cpp, CLOCK_BOOTTIME) costs per value
// against the CLOCK_MONOTONIC_COARSE it replaced: an encryption read the
// coarse clock twice (primary version, then the version's key) and reads
// CLOCK_BOOTTIME once.
#include <benchmark/benchmark.h>
#include <openssl/evp.h>
#include <time.h>

#include <cstring>
#include <stdexcept>
#include <vector>

#include "core/envelope.hpp"
#include "core/secure_memory.hpp"

namespace {

using colcrypt::AeadKey;
using colcrypt::ByteView;
using colcrypt::KeyId;
using colcrypt::PayloadType;

const std::vector<uint8_t> kKey(32, 0x5c);
const KeyId kKeyId = {0x0f, 0x1e, 0x2d, 0x3c, 0x4b, 0x5a, 0x49, 0x78,
                      0x87, 0x96, 0xa5, 0xb4, 0xc3, 0xd2, 0xe1, 0xf0};

struct EvpCtx {
  EVP_CIPHER_CTX* ctx = EVP_CIPHER_CTX_new();
  ~EvpCtx() { EVP_CIPHER_CTX_free(ctx); }
};

void check(int ok, const char* what) {
  if (ok != 1) throw std::runtime_error(what);
}

void BM_EvpSeal(benchmark::State& state) {
  const size_t n = static_cast<size_t>(state.range(0));
  std::vector<uint8_t> plain(n, 0x61), out(n + 16), aad(colcrypt::kHeaderSize, 0x01);
  EvpCtx c;
  check(EVP_EncryptInit_ex(c.ctx, EVP_aes_256_gcm(), nullptr, kKey.data(), nullptr), "init");
  uint8_t iv[12] = {};
  uint64_t counter = 0;
  for (auto _ : state) {
    ++counter;
    std::memcpy(iv, &counter, sizeof counter);
    int len = 0;
    check(EVP_EncryptInit_ex(c.ctx, nullptr, nullptr, nullptr, iv), "iv");
    check(EVP_EncryptUpdate(c.ctx, nullptr, &len, aad.data(), static_cast<int>(aad.size())), "aad");
    check(EVP_EncryptUpdate(c.ctx, out.data(), &len, plain.data(), static_cast<int>(n)), "update");
    check(EVP_EncryptFinal_ex(c.ctx, out.data() + n, &len), "final");
    check(EVP_CIPHER_CTX_ctrl(c.ctx, EVP_CTRL_AEAD_GET_TAG, 16, out.data() + n), "tag");
    benchmark::DoNotOptimize(out.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * n));
}

void BM_EvpOpen(benchmark::State& state) {
  const size_t n = static_cast<size_t>(state.range(0));
  std::vector<uint8_t> plain(n, 0x61), sealed(n + 16), out(n), aad(colcrypt::kHeaderSize, 0x01);
  EvpCtx c;
  const uint8_t iv[12] = {1};
  int len = 0;
  check(EVP_EncryptInit_ex(c.ctx, EVP_aes_256_gcm(), nullptr, kKey.data(), iv), "init");
  check(EVP_EncryptUpdate(c.ctx, nullptr, &len, aad.data(), static_cast<int>(aad.size())), "aad");
  check(EVP_EncryptUpdate(c.ctx, sealed.data(), &len, plain.data(), static_cast<int>(n)), "enc");
  check(EVP_EncryptFinal_ex(c.ctx, sealed.data() + n, &len), "final");
  check(EVP_CIPHER_CTX_ctrl(c.ctx, EVP_CTRL_AEAD_GET_TAG, 16, sealed.data() + n), "tag");
  EvpCtx d;
  check(EVP_DecryptInit_ex(d.ctx, EVP_aes_256_gcm(), nullptr, kKey.data(), nullptr), "init");
  for (auto _ : state) {
    check(EVP_DecryptInit_ex(d.ctx, nullptr, nullptr, nullptr, iv), "iv");
    check(EVP_CIPHER_CTX_ctrl(d.ctx, EVP_CTRL_AEAD_SET_TAG, 16, sealed.data() + n), "settag");
    check(EVP_DecryptUpdate(d.ctx, nullptr, &len, aad.data(), static_cast<int>(aad.size())), "aad");
    check(EVP_DecryptUpdate(d.ctx, out.data(), &len, sealed.data(), static_cast<int>(n)), "dec");
    check(EVP_DecryptFinal_ex(d.ctx, out.data() + n, &len), "verify");
    benchmark::DoNotOptimize(out.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * n));
}

void BM_EnvelopeSeal(benchmark::State& state) {
  const size_t n = static_cast<size_t>(state.range(0));
  std::vector<uint8_t> plain(n, 0x61), out(colcrypt::sealed_size(n));
  AeadKey key(ByteView(kKey.data(), kKey.size()));
  for (auto _ : state) {
    colcrypt::seal(key, kKeyId, 1, PayloadType::Text, ByteView(), ByteView(plain.data(), n),
                   out.data());
    benchmark::DoNotOptimize(out.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * n));
}

void BM_EnvelopeSealRandPerValue(benchmark::State& state) {
  const size_t n = static_cast<size_t>(state.range(0));
  std::vector<uint8_t> plain(n, 0x61), out(colcrypt::sealed_size(n));
  AeadKey key(ByteView(kKey.data(), kKey.size()));
  for (auto _ : state) {
    uint8_t nonce[AeadKey::kNonceSize];
    colcrypt::random_bytes(nonce, sizeof nonce);
    colcrypt::detail::seal_with_nonce(key, kKeyId, 1, PayloadType::Text, ByteView(),
                                      ByteView(plain.data(), n), nonce, out.data());
    benchmark::DoNotOptimize(out.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * n));
}

void BM_EnvelopeOpen(benchmark::State& state) {
  const size_t n = static_cast<size_t>(state.range(0));
  std::vector<uint8_t> plain(n, 0x61), env(colcrypt::sealed_size(n)), out(n);
  AeadKey key(ByteView(kKey.data(), kKey.size()));
  colcrypt::seal(key, kKeyId, 1, PayloadType::Text, ByteView(), ByteView(plain.data(), n),
                 env.data());
  for (auto _ : state) {
    colcrypt::open(key, ByteView(env.data(), env.size()), ByteView(), out.data());
    benchmark::DoNotOptimize(out.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * n));
}

int64_t clock_ms(clockid_t clock) {
  struct timespec ts;
  clock_gettime(clock, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
}

void BM_CacheClockCoarse(benchmark::State& state) {
  for (auto _ : state) {
    benchmark::DoNotOptimize(clock_ms(CLOCK_MONOTONIC_COARSE));
    benchmark::DoNotOptimize(clock_ms(CLOCK_MONOTONIC_COARSE));
  }
}

void BM_CacheClockBoottime(benchmark::State& state) {
  for (auto _ : state) benchmark::DoNotOptimize(clock_ms(CLOCK_BOOTTIME));
}

}  // namespace

#define SIZES Arg(16)->Arg(1024)->Arg(65536)
// 9 bytes: one raw seal of the bulk-encrypt workload's values, the per-row
// floor its target compares with (bench/run.sh).
BENCHMARK(BM_EvpSeal)->Arg(9)->SIZES;
BENCHMARK(BM_EnvelopeSeal)->SIZES;
BENCHMARK(BM_EnvelopeSealRandPerValue)->SIZES;
BENCHMARK(BM_EvpOpen)->SIZES;
BENCHMARK(BM_EnvelopeOpen)->SIZES;
BENCHMARK(BM_CacheClockCoarse);
BENCHMARK(BM_CacheClockBoottime);

BENCHMARK_MAIN();
