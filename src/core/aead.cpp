#include "core/aead.hpp"

#include <openssl/evp.h>

#include <climits>
#include <cstring>

#include "core/error.hpp"
#include "core/openssl_util.hpp"
#include "core/secure_memory.hpp"

namespace colcrypt {

namespace {

// Update calls take an int length: feed larger inputs in block-aligned chunks.
constexpr size_t kMaxUpdate = size_t{1} << 30;

// Fetched once per process: an explicit fetch avoids a provider lookup on
// every initialisation. Function-local statics are initialised thread-safely.
const EVP_CIPHER* gcm_cipher(size_t key_size) {
  static const ossl::CipherPtr aes128(EVP_CIPHER_fetch(nullptr, "AES-128-GCM", nullptr));
  static const ossl::CipherPtr aes192(EVP_CIPHER_fetch(nullptr, "AES-192-GCM", nullptr));
  static const ossl::CipherPtr aes256(EVP_CIPHER_fetch(nullptr, "AES-256-GCM", nullptr));
  const EVP_CIPHER* cipher = nullptr;
  switch (key_size) {
    case 16:
      cipher = aes128.get();
      break;
    case 24:
      cipher = aes192.get();
      break;
    case 32:
      cipher = aes256.get();
      break;
    default:
      throw Error(Errc::InvalidArgument, "AES key must be 16, 24 or 32 bytes");
  }
  if (cipher == nullptr) ossl::fail("EVP_CIPHER_fetch(AES-GCM)");
  return cipher;
}

void add_aad(EVP_CIPHER_CTX* ctx, ByteView aad) {
  size_t done = 0;
  while (done < aad.size) {
    const size_t chunk = aad.size - done > kMaxUpdate ? kMaxUpdate : aad.size - done;
    int outl = 0;
    if (EVP_CipherUpdate(ctx, nullptr, &outl, aad.data + done, static_cast<int>(chunk)) != 1) {
      ossl::fail("EVP_CipherUpdate(aad)");
    }
    done += chunk;
  }
}

void transform(EVP_CIPHER_CTX* ctx, ByteView in, uint8_t* out) {
  size_t done = 0;
  while (done < in.size) {
    const size_t chunk = in.size - done > kMaxUpdate ? kMaxUpdate : in.size - done;
    int outl = 0;
    if (EVP_CipherUpdate(ctx, out + done, &outl, in.data + done, static_cast<int>(chunk)) != 1 ||
        static_cast<size_t>(outl) != chunk) {
      ossl::fail("EVP_CipherUpdate");
    }
    done += chunk;
  }
}

void encrypt_rest(EVP_CIPHER_CTX* ctx, ByteView aad1, ByteView aad2, ByteView plaintext,
                  uint8_t* out_ciphertext, uint8_t out_tag[kGcmTagSize]) {
  add_aad(ctx, aad1);
  add_aad(ctx, aad2);
  transform(ctx, plaintext, out_ciphertext);
  uint8_t final_block[16];
  int outl = 0;
  if (EVP_EncryptFinal_ex(ctx, final_block, &outl) != 1 || outl != 0) {
    ossl::fail("EVP_EncryptFinal_ex");
  }
  if (EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, static_cast<int>(kGcmTagSize), out_tag) !=
      1) {
    ossl::fail("EVP_CTRL_AEAD_GET_TAG");
  }
}

// Returns whether the tag verified; out_plaintext is wiped when it did not.
bool decrypt_rest(EVP_CIPHER_CTX* ctx, ByteView aad1, ByteView aad2, ByteView ciphertext,
                  const uint8_t tag[kGcmTagSize], uint8_t* out_plaintext) {
  try {
    uint8_t expected_tag[kGcmTagSize];
    std::memcpy(expected_tag, tag, kGcmTagSize);
    if (EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, static_cast<int>(kGcmTagSize),
                            expected_tag) != 1) {
      ossl::fail("EVP_CTRL_AEAD_SET_TAG");
    }
    add_aad(ctx, aad1);
    add_aad(ctx, aad2);
    transform(ctx, ciphertext, out_plaintext);
    uint8_t final_block[16];
    int outl = 0;
    if (EVP_DecryptFinal_ex(ctx, final_block, &outl) == 1) return true;
  } catch (...) {
    secure_zero(out_plaintext, ciphertext.size);
    throw;
  }
  ERR_clear_error();
  secure_zero(out_plaintext, ciphertext.size);
  return false;
}

// A null nonce would make the re-initialisation keep the previous one: a
// nonce reuse, so it is refused rather than passed on.
void check_usable(bool has_impl, const uint8_t* nonce) {
  if (!has_impl) throw Error(Errc::InvalidArgument, "AeadKey used after move");
  if (nonce == nullptr) throw Error(Errc::InvalidArgument, "AES-GCM nonce missing");
}

ossl::CipherCtxPtr new_ctx() {
  ossl::CipherCtxPtr ctx(EVP_CIPHER_CTX_new());
  if (!ctx) ossl::fail("EVP_CIPHER_CTX_new");
  return ctx;
}

// A context keyed for one-shot use with an arbitrary IV length.
ossl::CipherCtxPtr one_shot_ctx(ByteView key, ByteView iv, bool encrypt) {
  const EVP_CIPHER* cipher = gcm_cipher(key.size);
  if (key.data == nullptr) throw Error(Errc::InvalidArgument, "AES key missing");
  if (iv.size == 0 || iv.data == nullptr) {
    throw Error(Errc::InvalidArgument, "AES-GCM IV must not be empty");
  }
  if (iv.size > size_t{INT_MAX}) throw Error(Errc::InvalidArgument, "AES-GCM IV too long");
  ossl::CipherCtxPtr ctx = new_ctx();
  const int enc = encrypt ? 1 : 0;
  if (EVP_CipherInit_ex(ctx.get(), cipher, nullptr, nullptr, nullptr, enc) != 1) {
    ossl::fail("EVP_CipherInit_ex");
  }
  if (EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_IVLEN, static_cast<int>(iv.size), nullptr) !=
      1) {
    // OpenSSL 3.0 caps GCM IVs at 128 bytes.
    ERR_clear_error();
    throw Error(Errc::InvalidArgument, "AES-GCM IV size not supported");
  }
  if (EVP_CipherInit_ex(ctx.get(), nullptr, nullptr, key.data, iv.data, enc) != 1) {
    ossl::fail("EVP_CipherInit_ex(key, iv)");
  }
  return ctx;
}

}  // namespace

void aes_gcm_seal(ByteView key, ByteView iv, ByteView aad, ByteView plaintext,
                  uint8_t* out_ciphertext, uint8_t out_tag[kGcmTagSize]) {
  ossl::CipherCtxPtr ctx = one_shot_ctx(key, iv, true);
  encrypt_rest(ctx.get(), aad, ByteView(), plaintext, out_ciphertext, out_tag);
}

bool aes_gcm_open(ByteView key, ByteView iv, ByteView aad, ByteView ciphertext, ByteView tag,
                  uint8_t* out_plaintext) {
  ossl::CipherCtxPtr ctx = one_shot_ctx(key, iv, false);
  if (tag.size != kGcmTagSize || tag.data == nullptr) {
    secure_zero(out_plaintext, ciphertext.size);
    return false;
  }
  return decrypt_rest(ctx.get(), aad, ByteView(), ciphertext, tag.data, out_plaintext);
}

struct AeadKey::Impl {
  ossl::CipherCtxPtr enc;
  ossl::CipherCtxPtr dec;
};

AeadKey::AeadKey(ByteView key) {
  if (key.size != kKeySize || key.data == nullptr) {
    throw Error(Errc::InvalidArgument, "AES-256-GCM key must be 32 bytes");
  }
  const EVP_CIPHER* cipher = gcm_cipher(kKeySize);
  auto impl = std::make_unique<Impl>();
  impl->enc = new_ctx();
  impl->dec = new_ctx();
  // The key schedule is computed here, once; seal/open only set the nonce.
  if (EVP_EncryptInit_ex(impl->enc.get(), cipher, nullptr, key.data, nullptr) != 1) {
    ossl::fail("EVP_EncryptInit_ex(key)");
  }
  if (EVP_DecryptInit_ex(impl->dec.get(), cipher, nullptr, key.data, nullptr) != 1) {
    ossl::fail("EVP_DecryptInit_ex(key)");
  }
  impl_ = std::move(impl);
}

// EVP_CIPHER_CTX_free wipes the key schedule.
AeadKey::~AeadKey() = default;
AeadKey::AeadKey(AeadKey&&) noexcept = default;
AeadKey& AeadKey::operator=(AeadKey&&) noexcept = default;

void AeadKey::seal(const uint8_t nonce[kNonceSize], ByteView aad1, ByteView aad2,
                   ByteView plaintext, uint8_t* out_ciphertext, uint8_t out_tag[kGcmTagSize]) {
  check_usable(impl_ != nullptr, nonce);
  EVP_CIPHER_CTX* ctx = impl_->enc.get();
  if (EVP_EncryptInit_ex(ctx, nullptr, nullptr, nullptr, nonce) != 1) {
    ossl::fail("EVP_EncryptInit_ex(nonce)");
  }
  encrypt_rest(ctx, aad1, aad2, plaintext, out_ciphertext, out_tag);
}

bool AeadKey::open(const uint8_t nonce[kNonceSize], ByteView aad1, ByteView aad2,
                   ByteView ciphertext, const uint8_t tag[kGcmTagSize], uint8_t* out_plaintext) {
  check_usable(impl_ != nullptr, nonce);
  if (tag == nullptr) throw Error(Errc::InvalidArgument, "AES-GCM tag missing");
  EVP_CIPHER_CTX* ctx = impl_->dec.get();
  if (EVP_DecryptInit_ex(ctx, nullptr, nullptr, nullptr, nonce) != 1) {
    ossl::fail("EVP_DecryptInit_ex(nonce)");
  }
  return decrypt_rest(ctx, aad1, aad2, ciphertext, tag, out_plaintext);
}

}  // namespace colcrypt
