#include "core/envelope.hpp"

#include <cstring>

#include "core/error.hpp"
#include "core/kdf.hpp"
#include "core/nonce.hpp"
#include "core/secure_memory.hpp"

namespace colcrypt {

namespace {

constexpr size_t kKeyIdOffset = 4;
constexpr size_t kKeyVersionOffset = 20;
constexpr size_t kNonceOffset = 24;

[[noreturn]] void malformed(const std::string& why) { throw Error(Errc::MalformedValue, why); }

void put_u32be(uint8_t* p, uint32_t v) {
  p[0] = static_cast<uint8_t>(v >> 24);
  p[1] = static_cast<uint8_t>(v >> 16);
  p[2] = static_cast<uint8_t>(v >> 8);
  p[3] = static_cast<uint8_t>(v);
}

uint32_t get_u32be(const uint8_t* p) {
  return uint32_t{p[0]} << 24 | uint32_t{p[1]} << 16 | uint32_t{p[2]} << 8 | uint32_t{p[3]};
}

constexpr char kBase64Alphabet[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

// 0..63 for alphabet characters, 0xFF for everything else ('=' included).
struct Base64DecodeTable {
  uint8_t value[256];
  constexpr Base64DecodeTable() : value() {
    for (int i = 0; i < 256; ++i) value[i] = 0xFF;
    for (int i = 0; i < 64; ++i)
      value[static_cast<uint8_t>(kBase64Alphabet[i])] = static_cast<uint8_t>(i);
  }
};
constexpr Base64DecodeTable kBase64Decode;

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

}  // namespace

size_t sealed_size(size_t plaintext_size) { return plaintext_size + kEnvelopeOverhead; }

EnvelopeHeader parse_header(ByteView envelope) {
  if (envelope.size < kEnvelopeOverhead || envelope.data == nullptr) malformed("value too short");
  if (envelope.size - kEnvelopeOverhead > kMaxPlaintextSize) malformed("value too long");
  const uint8_t* p = envelope.data;
  if (p[0] != kFormatVersion) malformed("unsupported format version " + std::to_string(p[0]));
  if (p[1] != static_cast<uint8_t>(Algorithm::Aes256Gcm) &&
      p[1] != static_cast<uint8_t>(Algorithm::Aes256GcmDerived)) {
    malformed("unknown algorithm " + std::to_string(p[1]));
  }
  if (p[2] != static_cast<uint8_t>(PayloadType::Bytes) &&
      p[2] != static_cast<uint8_t>(PayloadType::Text)) {
    malformed("unknown payload type");
  }
  if (p[3] != 0) malformed("reserved byte not zero");
  EnvelopeHeader header;
  header.format_version = p[0];
  header.algorithm = static_cast<Algorithm>(p[1]);
  header.payload = static_cast<PayloadType>(p[2]);
  std::memcpy(header.key_id.data(), p + kKeyIdOffset, kKeyIdSize);
  header.key_version = get_u32be(p + kKeyVersionOffset);
  if (header.key_version == 0) malformed("key version 0");
  std::memcpy(header.nonce.data(), p + kNonceOffset, header.nonce.size());
  return header;
}

namespace detail {

void seal_with_nonce(AeadKey& key, const KeyId& key_id, uint32_t key_version, PayloadType payload,
                     ByteView context, ByteView plaintext, const uint8_t nonce[AeadKey::kNonceSize],
                     uint8_t* out, Algorithm algorithm) {
  if (plaintext.size > kMaxPlaintextSize) {
    throw Error(Errc::InvalidArgument, "plaintext too large for one value");
  }
  if (key_version == 0) throw Error(Errc::InvalidArgument, "key version 0");
  if (payload != PayloadType::Bytes && payload != PayloadType::Text) {
    throw Error(Errc::InvalidArgument, "unknown payload type");
  }
  out[0] = kFormatVersion;
  if (algorithm != Algorithm::Aes256Gcm && algorithm != Algorithm::Aes256GcmDerived) {
    throw Error(Errc::InvalidArgument, "unknown algorithm");
  }
  out[1] = static_cast<uint8_t>(algorithm);
  out[2] = static_cast<uint8_t>(payload);
  out[3] = 0;
  std::memcpy(out + kKeyIdOffset, key_id.data(), kKeyIdSize);
  put_u32be(out + kKeyVersionOffset, key_version);
  std::memcpy(out + kNonceOffset, nonce, AeadKey::kNonceSize);
  key.seal(out + kNonceOffset, ByteView(out, kHeaderSize), context, plaintext, out + kHeaderSize,
           out + kHeaderSize + plaintext.size);
}

}  // namespace detail

void seal(AeadKey& key, const KeyId& key_id, uint32_t key_version, PayloadType payload,
          ByteView context, ByteView plaintext, uint8_t* out, Algorithm algorithm) {
  static_assert(AeadKey::kNonceSize == kNonceBytes, "GCM nonces are 96 bits");
  uint8_t nonce[AeadKey::kNonceSize];
  fresh_nonce(nonce);
  detail::seal_with_nonce(key, key_id, key_version, payload, context, plaintext, nonce, out,
                          algorithm);
}

SecretBytes derive_value_key(ByteView version_key, const KeyId& key_id, uint32_t key_version,
                             ByteView context) {
  static constexpr std::string_view kSalt = "colcrypt derived key v1";
  if (version_key.size != AeadKey::kKeySize) {
    throw Error(Errc::InvalidArgument, "version keys are 32 bytes");
  }
  std::string info(kKeyIdSize + 4 + context.size, '\0');
  std::memcpy(info.data(), key_id.data(), kKeyIdSize);
  put_u32be(reinterpret_cast<uint8_t*>(info.data()) + kKeyIdSize, key_version);
  if (context.size > 0) std::memcpy(info.data() + kKeyIdSize + 4, context.data, context.size);
  SecretBytes key =
      hkdf_sha256(version_key, ByteView::of(kSalt), ByteView::of(info), AeadKey::kKeySize);
  secure_zero(info.data(), info.size());  // the context may be sensitive
  return key;
}

void open(AeadKey& key, ByteView envelope, ByteView context, uint8_t* out) {
  parse_header(envelope);
  const size_t n = opened_size(envelope);
  const uint8_t* p = envelope.data;
  if (!key.open(p + kNonceOffset, ByteView(p, kHeaderSize), context, ByteView(p + kHeaderSize, n),
                p + kHeaderSize + n, out)) {
    throw Error(Errc::DecryptionFailed, "decryption failed");
  }
}

size_t text_size(size_t envelope_size) { return kTextPrefix.size() + (envelope_size + 2) / 3 * 4; }

void encode_text(ByteView envelope, char* out) {
  std::memcpy(out, kTextPrefix.data(), kTextPrefix.size());
  out += kTextPrefix.size();
  const uint8_t* in = envelope.data;
  size_t left = envelope.size;
  for (; left >= 3; in += 3, left -= 3) {
    const uint32_t v = uint32_t{in[0]} << 16 | uint32_t{in[1]} << 8 | in[2];
    *out++ = kBase64Alphabet[v >> 18];
    *out++ = kBase64Alphabet[(v >> 12) & 63];
    *out++ = kBase64Alphabet[(v >> 6) & 63];
    *out++ = kBase64Alphabet[v & 63];
  }
  if (left == 1) {
    const uint32_t v = uint32_t{in[0]} << 16;
    *out++ = kBase64Alphabet[v >> 18];
    *out++ = kBase64Alphabet[(v >> 12) & 63];
    *out++ = '=';
    *out++ = '=';
  } else if (left == 2) {
    const uint32_t v = uint32_t{in[0]} << 16 | uint32_t{in[1]} << 8;
    *out++ = kBase64Alphabet[v >> 18];
    *out++ = kBase64Alphabet[(v >> 12) & 63];
    *out++ = kBase64Alphabet[(v >> 6) & 63];
    *out++ = '=';
  }
}

std::string encode_text(ByteView envelope) {
  std::string text(text_size(envelope.size), '\0');
  encode_text(envelope, text.data());
  return text;
}

size_t decoded_size_bound(size_t text_size) { return text_size / 4 * 3 + 3; }

size_t decode_text(std::string_view text, uint8_t* out, size_t out_capacity) {
  if (text.substr(0, kTextPrefix.size()) != kTextPrefix) {
    malformed("text value does not start with \"colcrypt:\"");
  }
  const std::string_view b64 = text.substr(kTextPrefix.size());
  if (b64.size() % 4 != 0) malformed("base64 length is not a multiple of 4");
  size_t padding = 0;
  if (!b64.empty() && b64[b64.size() - 1] == '=') padding = b64[b64.size() - 2] == '=' ? 2 : 1;
  const size_t decoded = b64.size() / 4 * 3 - padding;
  if (decoded > out_capacity) throw Error(Errc::InvalidArgument, "decode buffer too small");

  const auto* in = reinterpret_cast<const uint8_t*>(b64.data());
  const size_t full_groups = b64.size() / 4 - (padding > 0 ? 1 : 0);
  for (size_t g = 0; g < full_groups; ++g, in += 4) {
    const uint8_t a = kBase64Decode.value[in[0]], b = kBase64Decode.value[in[1]],
                  c = kBase64Decode.value[in[2]], d = kBase64Decode.value[in[3]];
    if ((a | b | c | d) & 0x80) malformed("invalid base64 character");
    const uint32_t v = uint32_t{a} << 18 | uint32_t{b} << 12 | uint32_t{c} << 6 | d;
    *out++ = static_cast<uint8_t>(v >> 16);
    *out++ = static_cast<uint8_t>(v >> 8);
    *out++ = static_cast<uint8_t>(v);
  }
  if (padding > 0) {
    // The last group: "xx==" carries 1 byte, "xxx=" 2; the unused low bits
    // must be zero so that only the canonical spelling decodes.
    const uint8_t a = kBase64Decode.value[in[0]], b = kBase64Decode.value[in[1]];
    const uint8_t c = padding == 2 ? 0 : kBase64Decode.value[in[2]];
    if ((a | b | c) & 0x80) malformed("invalid base64 character");
    const uint32_t v = uint32_t{a} << 18 | uint32_t{b} << 12 | uint32_t{c} << 6;
    if (padding == 2 ? (v & 0xFFFF) != 0 : (v & 0xFF) != 0) {
      malformed("non-canonical base64 (trailing bits not zero)");
    }
    *out++ = static_cast<uint8_t>(v >> 16);
    if (padding == 1) *out++ = static_cast<uint8_t>(v >> 8);
  }
  return decoded;
}

std::string format_key_id(const KeyId& id) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string s;
  s.reserve(36);
  for (size_t i = 0; i < id.size(); ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10) s.push_back('-');
    s.push_back(kHex[id[i] >> 4]);
    s.push_back(kHex[id[i] & 15]);
  }
  return s;
}

bool parse_key_id(std::string_view text, KeyId& out) {
  if (text.size() != 36) return false;
  KeyId id{};
  size_t byte = 0;
  for (size_t i = 0; i < text.size();) {
    if (i == 8 || i == 13 || i == 18 || i == 23) {
      if (text[i] != '-') return false;
      ++i;
      continue;
    }
    const int hi = hex_value(text[i]);
    const int lo = hex_value(text[i + 1]);
    if (hi < 0 || lo < 0) return false;
    id[byte++] = static_cast<uint8_t>(hi << 4 | lo);
    i += 2;
  }
  out = id;
  return true;
}

KeyId new_key_id() {
  KeyId id{};
  random_bytes(id.data(), id.size());
  id[6] = static_cast<uint8_t>((id[6] & 0x0F) | 0x40);  // version 4
  id[8] = static_cast<uint8_t>((id[8] & 0x3F) | 0x80);  // RFC 4122 variant
  return id;
}

bool valid_key_name(std::string_view name) {
  if (name.empty() || name.size() > kMaxKeyNameSize) return false;
  if (name[0] == '.' || name[0] == '-') return false;
  for (char c : name) {
    const bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                    c == '_' || c == '.' || c == '-';
    if (!ok) return false;
  }
  return true;
}

}  // namespace colcrypt
