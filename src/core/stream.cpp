#include "core/stream.hpp"

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "core/kdf.hpp"

namespace colcrypt::stream {

namespace {

constexpr size_t kWrapAadSize = 68;    // header bytes [0, 68) authenticated by the wrap
constexpr size_t kChunkInfoSize = 32;  // header bytes [0, 32) bound into the chunk key
constexpr char kChunkKeyLabel[] = "colcrypt-file v1 chunk key";

void put_u32(uint8_t* p, uint32_t v) {
  p[0] = static_cast<uint8_t>(v >> 24);
  p[1] = static_cast<uint8_t>(v >> 16);
  p[2] = static_cast<uint8_t>(v >> 8);
  p[3] = static_cast<uint8_t>(v);
}

uint32_t get_u32(const uint8_t* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}

[[noreturn]] void refuse(StreamErrc reason, const std::string& message) {
  throw StreamError(reason, message);
}

void check_chunk_size(uint32_t chunk_size) {
  if (chunk_size < kMinChunkSize || chunk_size > kMaxChunkSize) {
    throw Error(Errc::InvalidArgument, "chunk size " + std::to_string(chunk_size) +
                                           " is outside [" + std::to_string(kMinChunkSize) + ", " +
                                           std::to_string(kMaxChunkSize) + "]");
  }
}

std::vector<uint8_t> wrap_aad(const std::array<uint8_t, kFileHeaderSize>& encoded,
                              ByteView context) {
  std::vector<uint8_t> aad(encoded.begin(), encoded.begin() + kWrapAadSize);
  if (context.size) aad.insert(aad.end(), context.data, context.data + context.size);
  return aad;
}

// Seals data_key into header (whose other fields are set) under version_key.
void wrap_into(FileHeader& header, ByteView version_key, ByteView data_key, ByteView context) {
  random_bytes(header.wrap_nonce.data(), header.wrap_nonce.size());
  const std::vector<uint8_t> aad = wrap_aad(encode_file_header(header), context);
  aes_gcm_seal(version_key, ByteView(header.wrap_nonce), ByteView(aad), data_key,
               header.wrapped_key.data(), header.wrap_tag.data());
}

// Reads until n bytes or the end of the input.
size_t read_full(const Source& source, uint8_t* buffer, size_t n) {
  size_t got = 0;
  while (got < n) {
    const size_t r = source(buffer + got, n - got);
    if (r == 0) break;
    got += r;
  }
  return got;
}

std::string chunk_text(uint64_t index) { return "chunk " + std::to_string(index); }

}  // namespace

const char* stream_errc_name(StreamErrc code) {
  switch (code) {
    case StreamErrc::NotAStream:
      return "NotAStream";
    case StreamErrc::UnsupportedVersion:
      return "UnsupportedVersion";
    case StreamErrc::MalformedHeader:
      return "MalformedHeader";
    case StreamErrc::HeaderAuthFailed:
      return "HeaderAuthFailed";
    case StreamErrc::ChunkAuthFailed:
      return "ChunkAuthFailed";
    case StreamErrc::Truncated:
      return "Truncated";
    case StreamErrc::TrailingData:
      return "TrailingData";
  }
  return "?";
}

StreamError::StreamError(StreamErrc reason, const std::string& message)
    : Error(reason == StreamErrc::NotAStream || reason == StreamErrc::UnsupportedVersion ||
                    reason == StreamErrc::MalformedHeader
                ? Errc::MalformedValue
                : Errc::DecryptionFailed,
            message),
      reason_(reason) {}

std::array<uint8_t, kFileHeaderSize> encode_file_header(const FileHeader& h) {
  std::array<uint8_t, kFileHeaderSize> out{};
  uint8_t* p = out.data();
  std::memcpy(p, kMagic.data(), kMagic.size());
  p[8] = kStreamFormatVersion;
  p[9] = kStreamAlgorithm;
  p[10] = p[11] = 0;
  put_u32(p + 12, h.chunk_size);
  std::memcpy(p + 16, h.key_id.data(), kKeyIdSize);
  put_u32(p + 32, h.key_version);
  std::memcpy(p + 36, h.salt.data(), kSaltSize);
  std::memcpy(p + 68, h.wrap_nonce.data(), h.wrap_nonce.size());
  std::memcpy(p + 80, h.wrapped_key.data(), kDataKeySize);
  std::memcpy(p + 112, h.wrap_tag.data(), kGcmTagSize);
  return out;
}

FileHeader parse_file_header(ByteView bytes) {
  const size_t magic_seen = std::min(bytes.size, kMagic.size());
  if (magic_seen == 0 || std::memcmp(bytes.data, kMagic.data(), magic_seen) != 0) {
    if (bytes.size == 0) refuse(StreamErrc::Truncated, "the input is empty");
    refuse(StreamErrc::NotAStream, "not a colcrypt-file file (wrong magic bytes)");
  }
  if (bytes.size < kFileHeaderSize) {
    refuse(StreamErrc::Truncated, "the input ends inside the header (" +
                                      std::to_string(bytes.size) + " of " +
                                      std::to_string(kFileHeaderSize) + " bytes)");
  }
  const uint8_t* p = bytes.data;
  if (p[8] != kStreamFormatVersion) {
    refuse(StreamErrc::UnsupportedVersion,
           "unsupported colcrypt-file format version " + std::to_string(p[8]));
  }
  if (p[9] != kStreamAlgorithm) {
    refuse(StreamErrc::UnsupportedVersion,
           "unsupported colcrypt-file algorithm " + std::to_string(p[9]));
  }
  if (p[10] != 0 || p[11] != 0) refuse(StreamErrc::MalformedHeader, "reserved header bytes set");
  FileHeader h;
  h.chunk_size = get_u32(p + 12);
  if (h.chunk_size < kMinChunkSize || h.chunk_size > kMaxChunkSize) {
    refuse(StreamErrc::MalformedHeader,
           "chunk size " + std::to_string(h.chunk_size) + " out of range");
  }
  std::memcpy(h.key_id.data(), p + 16, kKeyIdSize);
  h.key_version = get_u32(p + 32);
  if (h.key_version == 0) refuse(StreamErrc::MalformedHeader, "key version 0");
  std::memcpy(h.salt.data(), p + 36, kSaltSize);
  std::memcpy(h.wrap_nonce.data(), p + 68, h.wrap_nonce.size());
  std::memcpy(h.wrapped_key.data(), p + 80, kDataKeySize);
  std::memcpy(h.wrap_tag.data(), p + 112, kGcmTagSize);
  return h;
}

FileHeader new_header(ByteView version_key, const KeyId& key_id, uint32_t key_version,
                      ByteView context, uint32_t chunk_size, SecretBytes& data_key) {
  check_chunk_size(chunk_size);
  if (key_version == 0) throw Error(Errc::InvalidArgument, "key version must be >= 1");
  FileHeader h;
  h.chunk_size = chunk_size;
  h.key_id = key_id;
  h.key_version = key_version;
  random_bytes(h.salt.data(), h.salt.size());
  SecretBytes key = SecretBytes::random(kDataKeySize);
  wrap_into(h, version_key, key.view(), context);
  data_key = std::move(key);
  return h;
}

SecretBytes unwrap_data_key(const FileHeader& header, ByteView version_key, ByteView context) {
  const std::vector<uint8_t> aad = wrap_aad(encode_file_header(header), context);
  SecretBytes key(kDataKeySize);
  if (!aes_gcm_open(version_key, ByteView(header.wrap_nonce), ByteView(aad),
                    ByteView(header.wrapped_key), ByteView(header.wrap_tag), key.data())) {
    refuse(StreamErrc::HeaderAuthFailed,
           "the file's data key does not unwrap: wrong context, or the header was altered");
  }
  return key;
}

FileHeader rewrap_header(const FileHeader& header, ByteView old_version_key,
                         ByteView new_version_key, uint32_t new_version, ByteView context) {
  if (new_version == 0) throw Error(Errc::InvalidArgument, "key version must be >= 1");
  const SecretBytes key = unwrap_data_key(header, old_version_key, context);
  FileHeader out = header;
  out.key_version = new_version;
  wrap_into(out, new_version_key, key.view(), context);
  return out;
}

namespace {

SecretBytes chunk_key(const FileHeader& header, ByteView data_key) {
  if (data_key.size != kDataKeySize) {
    throw Error(Errc::InvalidArgument, "a data key must be 32 bytes");
  }
  const auto encoded = encode_file_header(header);
  std::vector<uint8_t> info(kChunkKeyLabel, kChunkKeyLabel + sizeof kChunkKeyLabel - 1);
  info.insert(info.end(), encoded.begin(), encoded.begin() + kChunkInfoSize);
  return hkdf_sha256(data_key, ByteView(header.salt), ByteView(info), AeadKey::kKeySize);
}

void chunk_nonce(uint64_t index, bool final, uint8_t nonce[AeadKey::kNonceSize]) {
  nonce[0] = nonce[1] = nonce[2] = 0;
  for (int i = 0; i < 8; ++i) nonce[3 + i] = static_cast<uint8_t>(index >> (56 - 8 * i));
  nonce[11] = final ? 1 : 0;
}

}  // namespace

ChunkCipher::ChunkCipher(const FileHeader& header, ByteView data_key)
    : key_(chunk_key(header, data_key).view()) {}

void ChunkCipher::seal(uint64_t index, bool final, ByteView plaintext, uint8_t* out) {
  uint8_t nonce[AeadKey::kNonceSize];
  chunk_nonce(index, final, nonce);
  key_.seal(nonce, ByteView(), ByteView(), plaintext, out, out + plaintext.size);
}

bool ChunkCipher::open(uint64_t index, bool final, ByteView record, uint8_t* out) {
  if (record.size < kGcmTagSize) return false;
  uint8_t nonce[AeadKey::kNonceSize];
  chunk_nonce(index, final, nonce);
  const size_t n = record.size - kGcmTagSize;
  return key_.open(nonce, ByteView(), ByteView(), ByteView(record.data, n), record.data + n, out);
}

uint64_t encrypt(const FileHeader& header, ByteView data_key, const Source& source,
                 const Sink& sink, const Progress& progress) {
  check_chunk_size(header.chunk_size);
  const size_t chunk = header.chunk_size;
  ChunkCipher cipher(header, data_key);
  const auto encoded = encode_file_header(header);
  sink(encoded.data(), encoded.size());

  // Two plaintext buffers: the next chunk is read before the current one is
  // sealed, because only its absence says that the current one is the last.
  SecretBytes current(chunk), next(chunk);
  std::vector<uint8_t> record(chunk + kGcmTagSize);
  size_t have = read_full(source, current.data(), chunk);
  uint64_t total = 0;
  for (uint64_t index = 0;; ++index) {
    size_t next_have = 0;
    bool final = have < chunk;
    if (!final) {
      next_have = read_full(source, next.data(), chunk);
      final = next_have == 0;
    }
    cipher.seal(index, final, ByteView(current.data(), have), record.data());
    sink(record.data(), have + kGcmTagSize);
    total += have;
    if (progress) progress(total);
    if (final) return total;
    std::swap(current, next);
    have = next_have;
  }
}

uint64_t decrypt(const Source& source, const Unwrap& unwrap, const Sink& sink,
                 const Progress& progress) {
  std::array<uint8_t, kFileHeaderSize> encoded{};
  const size_t header_have = read_full(source, encoded.data(), encoded.size());
  const FileHeader header = parse_file_header(ByteView(encoded.data(), header_have));
  SecretBytes data_key = unwrap(header);
  ChunkCipher cipher(header, data_key.view());
  data_key = SecretBytes();

  const size_t record_size = size_t{header.chunk_size} + kGcmTagSize;
  std::vector<uint8_t> current(record_size), next(record_size);
  SecretBytes plain(header.chunk_size);
  size_t have = read_full(source, current.data(), record_size);
  uint64_t consumed = kFileHeaderSize + have;
  uint64_t total = 0;
  for (uint64_t index = 0;; ++index) {
    const ByteView record(current.data(), have);
    if (have < record_size) {
      // Only the last chunk may be short.
      if (have < kGcmTagSize) {
        refuse(StreamErrc::Truncated,
               index == 0 && have == 0
                   ? std::string("the input ends after the header, before any chunk")
                   : "the input ends " +
                         std::string(have == 0 ? "after " + chunk_text(index - 1)
                                               : "inside " + chunk_text(index)) +
                         ", before the last chunk");
      }
      if (!cipher.open(index, true, record, plain.data())) {
        refuse(StreamErrc::ChunkAuthFailed,
               chunk_text(index) +
                   " (the last) does not verify: the file was altered or cut inside it");
      }
      sink(plain.data(), have - kGcmTagSize);
      total += have - kGcmTagSize;
      if (progress) progress(consumed);
      return total;
    }
    // A full chunk is the last one exactly when nothing follows it.
    const size_t next_have = read_full(source, next.data(), record_size);
    consumed += next_have;
    if (next_have == 0) {
      if (cipher.open(index, true, record, plain.data())) {
        sink(plain.data(), header.chunk_size);
        total += header.chunk_size;
        if (progress) progress(consumed);
        return total;
      }
      if (cipher.open(index, false, record, plain.data())) {
        secure_zero(plain.data(), plain.size());
        refuse(StreamErrc::Truncated,
               "the input ends after " + chunk_text(index) + ", before the last chunk");
      }
      refuse(StreamErrc::ChunkAuthFailed, chunk_text(index) + " does not verify: altered");
    }
    if (!cipher.open(index, false, record, plain.data())) {
      if (cipher.open(index, true, record, plain.data())) {
        secure_zero(plain.data(), plain.size());
        refuse(StreamErrc::TrailingData,
               "data follows the last chunk (" + chunk_text(index) + "): appended or spliced");
      }
      refuse(StreamErrc::ChunkAuthFailed,
             chunk_text(index) +
                 " does not verify: altered, reordered, duplicated, dropped or from another file");
    }
    sink(plain.data(), header.chunk_size);
    total += header.chunk_size;
    if (progress) progress(consumed - next_have);
    std::swap(current, next);
    have = next_have;
  }
}

}  // namespace colcrypt::stream
