#include "core/deterministic.hpp"

#include <cstring>
#include <string>

#include "core/error.hpp"
#include "core/secure_memory.hpp"
#include "core/siv.hpp"

namespace colcrypt {

namespace {

[[noreturn]] void malformed(const char* why) { throw Error(Errc::MalformedValue, why); }

// header || context, the AAD of both directions.
std::string associated_data(const uint8_t* header, ByteView context) {
  std::string aad(reinterpret_cast<const char*>(header), kDeterministicHeaderSize);
  if (context.size > 0) aad.append(reinterpret_cast<const char*>(context.data), context.size);
  return aad;
}

}  // namespace

DeterministicHeader parse_deterministic(ByteView value) {
  if (value.data == nullptr || value.size < kDeterministicOverhead)
    malformed("deterministic value too short");
  const uint8_t* p = value.data;
  if (p[0] != kFormatVersion) malformed("unsupported deterministic format");
  if (p[1] != kDeterministicAlgorithm) malformed("unknown deterministic algorithm");
  if (p[2] != static_cast<uint8_t>(PayloadType::Bytes) &&
      p[2] != static_cast<uint8_t>(PayloadType::Text))
    malformed("unknown payload type");
  if (p[3] != 0) malformed("reserved byte not zero");
  DeterministicHeader header;
  header.payload = static_cast<PayloadType>(p[2]);
  std::memcpy(header.key_id.data(), p + 4, kKeyIdSize);
  header.key_version =
      uint32_t{p[20]} << 24 | uint32_t{p[21]} << 16 | uint32_t{p[22]} << 8 | uint32_t{p[23]};
  if (header.key_version == 0) malformed("key version 0");
  return header;
}

void seal_deterministic(ByteView siv_key, const KeyId& key_id, uint32_t key_version,
                        PayloadType payload, ByteView context, ByteView plaintext, uint8_t* out) {
  if (key_version == 0) throw Error(Errc::InvalidArgument, "key version 0");
  if (payload != PayloadType::Bytes && payload != PayloadType::Text)
    throw Error(Errc::InvalidArgument, "unknown payload type");
  out[0] = kFormatVersion;
  out[1] = kDeterministicAlgorithm;
  out[2] = static_cast<uint8_t>(payload);
  out[3] = 0;
  std::memcpy(out + 4, key_id.data(), kKeyIdSize);
  out[20] = static_cast<uint8_t>(key_version >> 24);
  out[21] = static_cast<uint8_t>(key_version >> 16);
  out[22] = static_cast<uint8_t>(key_version >> 8);
  out[23] = static_cast<uint8_t>(key_version);
  // The payload type byte first: OpenSSL 3.0 cannot seal an empty plaintext.
  SecretBytes data(plaintext.size + 1);
  data.data()[0] = static_cast<uint8_t>(payload);
  if (plaintext.size > 0) std::memcpy(data.data() + 1, plaintext.data, plaintext.size);
  const std::string aad = associated_data(out, context);
  aes_siv_seal(siv_key, ByteView::of(aad), data.view(), out + kDeterministicHeaderSize,
               out + kDeterministicHeaderSize + kSivSize);
}

void open_deterministic(ByteView siv_key, ByteView value, ByteView context, uint8_t* out) {
  parse_deterministic(value);
  const size_t n = value.size - kDeterministicOverhead;
  SecretBytes data(n + 1);
  const std::string aad = associated_data(value.data, context);
  if (!aes_siv_open(siv_key, ByteView::of(aad), value.data + kDeterministicHeaderSize,
                    ByteView(value.data + kDeterministicHeaderSize + kSivSize, n + 1),
                    data.data()) ||
      data.data()[0] != value.data[2])
    throw Error(Errc::DecryptionFailed, "decryption failed");
  if (n > 0) std::memcpy(out, data.data() + 1, n);
}

}  // namespace colcrypt
