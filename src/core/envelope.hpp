// The colcrypt value envelope: the bytes stored in an `encrypted` datum.
// docs/format.md describes it byte for byte; keep the two in step.
//
//   off len field
//    0   1  format version (1)
//    1   1  algorithm (1 = AES-256-GCM under the version key,
//                      3 = AES-256-GCM under a per-context key derived with
//                          HKDF from the version key: derive_value_key;
//                      2 is taken by the deterministic AES-SIV values of
//                      docs/columns.md, which are not envelopes)
//    2   1  payload type (0 = bytes, 1 = text)
//    3   1  reserved, must be 0
//    4  16  key id
//   20   4  key version, big-endian, >= 1
//   24  12  nonce (random, from OpenSSL's CSPRNG, in batches: core/nonce.hpp)
//   36   n  ciphertext (n = plaintext length)
//  36+n 16  GCM tag
//
// AAD = bytes [0, 36) || caller context bytes.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "core/aead.hpp"
#include "core/bytes.hpp"
#include "core/secure_memory.hpp"

namespace colcrypt {

constexpr uint8_t kFormatVersion = 1;
constexpr size_t kKeyIdSize = 16;
constexpr size_t kHeaderSize = 36;
constexpr size_t kEnvelopeOverhead = kHeaderSize + kGcmTagSize;
// Largest plaintext a value may carry (Postgres' 1 GB varlena limit bounds it anyway).
constexpr size_t kMaxPlaintextSize = (size_t{1} << 30) - 1;

enum class Algorithm : uint8_t { Aes256Gcm = 1, Aes256GcmDerived = 3 };
enum class PayloadType : uint8_t { Bytes = 0, Text = 1 };

using KeyId = std::array<uint8_t, kKeyIdSize>;

struct EnvelopeHeader {
  uint8_t format_version = kFormatVersion;
  Algorithm algorithm = Algorithm::Aes256Gcm;
  PayloadType payload = PayloadType::Bytes;
  KeyId key_id{};
  uint32_t key_version = 0;
  std::array<uint8_t, AeadKey::kNonceSize> nonce{};
};

size_t sealed_size(size_t plaintext_size);

// Validates the structure (size, version, algorithm, payload type, reserved
// byte, version >= 1) and returns the header. Throws Errc::MalformedValue with
// a message that says which check failed. Does not authenticate.
EnvelopeHeader parse_header(ByteView envelope);

// Plaintext size of a structurally valid envelope (call parse_header first).
inline size_t opened_size(ByteView envelope) { return envelope.size - kEnvelopeOverhead; }

// Encrypts plaintext under key, drawing a fresh random nonce, and writes exactly
// sealed_size(plaintext.size) bytes to out.
// algorithm only names what `key` is (Aes256GcmDerived: the caller passes
// derive_value_key(...) for this context); it is written to byte 1.
void seal(AeadKey& key, const KeyId& key_id, uint32_t key_version, PayloadType payload,
          ByteView context, ByteView plaintext, uint8_t* out,
          Algorithm algorithm = Algorithm::Aes256Gcm);

// The key of a derived-key value (algorithm 3; docs/format.md): HKDF-SHA256
// with ikm = the version's key bytes, salt = "colcrypt derived key v1",
// info = key id || version (u32 BE) || context. One context's key reveals
// nothing about another's or about the version key; a new version (a
// rotation) gives every context a new key.
SecretBytes derive_value_key(ByteView version_key, const KeyId& key_id, uint32_t key_version,
                             ByteView context);

namespace detail {
// seal() with a caller-chosen nonce. Only for seal() itself and for
// deterministic tests / the worked example in docs/format.md: a nonce must
// never be used twice with one key.
void seal_with_nonce(AeadKey& key, const KeyId& key_id, uint32_t key_version, PayloadType payload,
                     ByteView context, ByteView plaintext, const uint8_t nonce[AeadKey::kNonceSize],
                     uint8_t* out, Algorithm algorithm = Algorithm::Aes256Gcm);
}  // namespace detail

// Authenticates and decrypts into out (opened_size bytes). Throws
// Errc::MalformedValue for a structurally invalid envelope and
// Errc::DecryptionFailed, with one generic message, for every authentication
// failure. The caller must pass the key named by the header's id and version.
void open(AeadKey& key, ByteView envelope, ByteView context, uint8_t* out);

// Canonical text form of an envelope: "colcrypt:" followed by standard base64
// (RFC 4648, with padding, no line breaks).
constexpr std::string_view kTextPrefix = "colcrypt:";
size_t text_size(size_t envelope_size);
void encode_text(ByteView envelope, char* out);  // writes text_size(envelope.size) chars
std::string encode_text(ByteView envelope);
// Strict inverse of encode_text: rejects a missing prefix, characters outside
// the alphabet, whitespace, bad padding and non-zero trailing bits. Returns the
// number of bytes written to out (capacity out_capacity) or throws
// Errc::MalformedValue. decoded_size_bound() gives a safe capacity.
size_t decoded_size_bound(size_t text_size);
size_t decode_text(std::string_view text, uint8_t* out, size_t out_capacity);

// Key ids print as UUIDs (8-4-4-4-12 lowercase hex).
std::string format_key_id(const KeyId& id);
bool parse_key_id(std::string_view text, KeyId& out);
KeyId new_key_id();  // random, with UUID version 4 / variant bits set

// Key names: 1..63 bytes of [A-Za-z0-9_.-], not starting with '.' or '-'.
constexpr size_t kMaxKeyNameSize = 63;
bool valid_key_name(std::string_view name);

}  // namespace colcrypt
