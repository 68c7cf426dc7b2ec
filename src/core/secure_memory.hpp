// Owners for secret bytes: locked in memory where the system allows it, and
// wiped (OPENSSL_cleanse) whenever they are released or moved from.
#pragma once
#include <cstddef>
#include <cstdint>

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

}  // namespace colcrypt
