#include "core/kdf.hpp"

#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/params.h>

#include "core/error.hpp"
#include "core/openssl_util.hpp"

namespace colcrypt {

namespace {

constexpr size_t kSha256Size = 32;

// OSSL_PARAM octet strings need a non-null pointer even when empty.
void* octets(ByteView v) {
  static uint8_t empty = 0;
  return v.size == 0 ? &empty : const_cast<uint8_t*>(v.data);
}

char kSha256Name[] = "SHA256";

EVP_KDF* fetched_kdf(const char* name) {
  EVP_KDF* kdf = EVP_KDF_fetch(nullptr, name, nullptr);
  if (kdf == nullptr) ossl::fail("EVP_KDF_fetch");
  return kdf;
}

SecretBytes derive(EVP_KDF* kdf, const OSSL_PARAM params[], size_t length) {
  ossl::KdfCtxPtr ctx(EVP_KDF_CTX_new(kdf));
  if (!ctx) ossl::fail("EVP_KDF_CTX_new");
  SecretBytes out(length);
  if (EVP_KDF_derive(ctx.get(), out.data(), out.size(), params) != 1) {
    ossl::fail("EVP_KDF_derive");
  }
  return out;
}

}  // namespace

SecretBytes hkdf_sha256(ByteView ikm, ByteView salt, ByteView info, size_t length) {
  if (length == 0) throw Error(Errc::InvalidArgument, "HKDF output length must not be 0");
  if (length > 255 * kSha256Size) {
    throw Error(Errc::InvalidArgument, "HKDF-SHA256 output length above 8160 bytes");
  }
  static const ossl::KdfPtr kdf(fetched_kdf("HKDF"));
  OSSL_PARAM params[5];
  size_t n = 0;
  params[n++] = OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, kSha256Name, 0);
  params[n++] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, octets(ikm), ikm.size);
  // An absent salt is the RFC 5869 default (HashLen zero bytes), the same as an empty one.
  if (salt.size > 0) {
    params[n++] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SALT, octets(salt), salt.size);
  }
  if (info.size > 0) {
    params[n++] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, octets(info), info.size);
  }
  params[n] = OSSL_PARAM_construct_end();
  return derive(kdf.get(), params, length);
}

SecretBytes pbkdf2_sha256(ByteView password, ByteView salt, uint32_t iterations, size_t length) {
  if (iterations == 0) throw Error(Errc::InvalidArgument, "PBKDF2 iterations must not be 0");
  if (length == 0) throw Error(Errc::InvalidArgument, "PBKDF2 output length must not be 0");
  static const ossl::KdfPtr kdf(fetched_kdf("PBKDF2"));
  uint64_t iter = iterations;
  // pkcs5 = 1 turns off the SP 800-132 lower bounds: the caller chooses the
  // parameters (keyd enforces its own minimum iteration count).
  int pkcs5 = 1;
  OSSL_PARAM params[] = {
      OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, kSha256Name, 0),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_PASSWORD, octets(password), password.size),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SALT, octets(salt), salt.size),
      OSSL_PARAM_construct_uint64(OSSL_KDF_PARAM_ITER, &iter),
      OSSL_PARAM_construct_int(OSSL_KDF_PARAM_PKCS5, &pkcs5),
      OSSL_PARAM_construct_end(),
  };
  return derive(kdf.get(), params, length);
}

struct HmacSha256::Impl {
  ossl::MacCtxPtr ctx;
};

HmacSha256::HmacSha256(ByteView key) : impl_(std::make_unique<Impl>()) {
  static const ossl::MacPtr mac(EVP_MAC_fetch(nullptr, "HMAC", nullptr));
  if (!mac) ossl::fail("EVP_MAC_fetch(HMAC)");
  impl_->ctx.reset(EVP_MAC_CTX_new(mac.get()));
  if (!impl_->ctx) ossl::fail("EVP_MAC_CTX_new");
  OSSL_PARAM params[] = {
      OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, kSha256Name, 0),
      OSSL_PARAM_construct_end(),
  };
  // A non-null key pointer: EVP_MAC_init treats a null key as "keep the old one".
  if (EVP_MAC_init(impl_->ctx.get(), static_cast<const unsigned char*>(octets(key)), key.size,
                   params) != 1) {
    ossl::fail("EVP_MAC_init");
  }
}

HmacSha256::~HmacSha256() = default;
HmacSha256::HmacSha256(HmacSha256&&) noexcept = default;
HmacSha256& HmacSha256::operator=(HmacSha256&&) noexcept = default;

std::array<uint8_t, 32> HmacSha256::mac(ByteView part1, ByteView part2, ByteView part3) {
  EVP_MAC_CTX* ctx = impl_->ctx.get();
  // A fresh start under the key set in the constructor (also after a failure).
  if (EVP_MAC_init(ctx, nullptr, 0, nullptr) != 1) ossl::fail("EVP_MAC_init");
  for (ByteView part : {part1, part2, part3}) {
    if (part.size > 0 && EVP_MAC_update(ctx, part.data, part.size) != 1) {
      ossl::fail("EVP_MAC_update");
    }
  }
  std::array<uint8_t, 32> tag{};
  size_t tag_len = 0;
  if (EVP_MAC_final(ctx, tag.data(), &tag_len, tag.size()) != 1 || tag_len != tag.size()) {
    ossl::fail("EVP_MAC_final");
  }
  return tag;
}

std::array<uint8_t, 32> hmac_sha256(ByteView key, ByteView data) {
  return HmacSha256(key).mac(data);
}

}  // namespace colcrypt
