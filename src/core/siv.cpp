// AES-SIV through OpenSSL EVP (see siv.hpp).
#include "core/siv.hpp"

#include <climits>

#include "core/error.hpp"
#include "core/openssl_util.hpp"
#include "core/secure_memory.hpp"

namespace colcrypt {
namespace {

const uint8_t kEmpty[1] = {0};

ossl::CipherPtr fetch_siv(size_t key_size) {
  const char* name = nullptr;
  switch (key_size) {
    case 32:
      name = "AES-128-SIV";
      break;
    case 48:
      name = "AES-192-SIV";
      break;
    case 64:
      name = "AES-256-SIV";
      break;
    default:
      throw Error(Errc::InvalidArgument, "AES-SIV keys are 32, 48 or 64 bytes");
  }
  ossl::CipherPtr cipher(EVP_CIPHER_fetch(nullptr, name, nullptr));
  if (!cipher) ossl::fail("EVP_CIPHER_fetch(AES-SIV)");
  return cipher;
}

void check_sizes(ByteView aad, size_t data_size) {
  if (aad.size > static_cast<size_t>(INT_MAX) || data_size > static_cast<size_t>(INT_MAX))
    throw Error(Errc::InvalidArgument, "AES-SIV input too large");
  // OpenSSL 3.0 cannot finish an AES-SIV operation without data (its
  // issue #17268); colcrypt's deterministic values never have an empty one.
  if (data_size == 0)
    throw Error(Errc::InvalidArgument, "AES-SIV needs at least one byte of plaintext");
}

}  // namespace

void aes_siv_seal(ByteView key, ByteView aad, ByteView plaintext, uint8_t out_siv[kSivSize],
                  uint8_t* out_ciphertext) {
  ossl::CipherPtr cipher = fetch_siv(key.size);
  check_sizes(aad, plaintext.size);
  ossl::CipherCtxPtr ctx(EVP_CIPHER_CTX_new());
  if (!ctx) ossl::fail("EVP_CIPHER_CTX_new");
  if (EVP_EncryptInit_ex2(ctx.get(), cipher.get(), key.data, nullptr, nullptr) != 1)
    ossl::fail("EVP_EncryptInit_ex2(AES-SIV)");
  int len = 0;
  // One AAD component, even an empty one (OpenSSL >= 3.0.10 counts it).
  if (EVP_EncryptUpdate(ctx.get(), nullptr, &len, aad.size ? aad.data : kEmpty, int(aad.size)) != 1)
    ossl::fail("EVP_EncryptUpdate(AES-SIV AAD)");
  if (EVP_EncryptUpdate(ctx.get(), out_ciphertext, &len, plaintext.data, int(plaintext.size)) != 1)
    ossl::fail("EVP_EncryptUpdate(AES-SIV)");
  if (EVP_EncryptFinal_ex(ctx.get(), out_ciphertext + plaintext.size, &len) != 1)
    ossl::fail("EVP_EncryptFinal_ex(AES-SIV)");
  if (EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_AEAD_GET_TAG, int(kSivSize), out_siv) != 1)
    ossl::fail("EVP_CTRL_AEAD_GET_TAG(AES-SIV)");
}

bool aes_siv_open(ByteView key, ByteView aad, const uint8_t siv[kSivSize], ByteView ciphertext,
                  uint8_t* out_plaintext) {
  ossl::CipherPtr cipher = fetch_siv(key.size);
  check_sizes(aad, ciphertext.size);
  ossl::CipherCtxPtr ctx(EVP_CIPHER_CTX_new());
  if (!ctx) ossl::fail("EVP_CIPHER_CTX_new");
  if (EVP_DecryptInit_ex2(ctx.get(), cipher.get(), key.data, nullptr, nullptr) != 1)
    ossl::fail("EVP_DecryptInit_ex2(AES-SIV)");
  uint8_t tag[kSivSize];
  for (size_t i = 0; i < kSivSize; ++i) tag[i] = siv[i];
  if (EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_AEAD_SET_TAG, int(kSivSize), tag) != 1)
    ossl::fail("EVP_CTRL_AEAD_SET_TAG(AES-SIV)");
  int len = 0;
  bool ok =
      EVP_DecryptUpdate(ctx.get(), nullptr, &len, aad.size ? aad.data : kEmpty, int(aad.size)) == 1;
  // The tag is checked here: the update fails when it does not match.
  if (ok)
    ok = EVP_DecryptUpdate(ctx.get(), out_plaintext, &len, ciphertext.data, int(ciphertext.size)) ==
         1;
  if (ok) ok = EVP_DecryptFinal_ex(ctx.get(), out_plaintext + ciphertext.size, &len) == 1;
  if (!ok) {
    ERR_clear_error();
    secure_zero(out_plaintext, ciphertext.size);
  }
  return ok;
}

}  // namespace colcrypt
