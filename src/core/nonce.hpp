// Fresh 96-bit AES-GCM nonces for envelope::seal, drawn from OpenSSL's CSPRNG
// in batches: one RAND_bytes call per page of nonces instead of one per value
// (RAND_bytes costs about as much for 12 bytes as for 4 KiB, and more than
// the AES-GCM work on a short value). docs/format.md ("Nonces") gives the
// uniqueness argument, fork safety included.
#pragma once
#include <cstddef>
#include <cstdint>

namespace colcrypt {

constexpr size_t kNonceBytes = 12;

// Writes 12 bytes that this process has never handed out before and that no
// process forked from it (or that it was forked from) hands out. Each thread
// keeps its own batch; not async-signal-safe. Throws Errc::CryptoFailure when
// the CSPRNG fails (the batch is then left empty, never reused).
void fresh_nonce(uint8_t out[kNonceBytes]);

namespace detail {
// For tests: how many nonces one RAND_bytes call provides, and whether this
// thread's batch is wiped by the kernel on fork (MADV_WIPEONFORK) or, where
// that is unsupported, checked against getpid() on every draw.
size_t nonces_per_batch();
bool nonce_batch_wiped_on_fork();
}  // namespace detail

}  // namespace colcrypt
