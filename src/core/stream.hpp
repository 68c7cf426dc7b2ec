// The colcrypt-file streaming format (docs/format.md, "Files"): a 128-byte
// header holding a random per-file data key wrapped under a keyd key version,
// then the content in chunks sealed with AES-256-GCM under a key derived from
// the data key, each chunk's nonce binding its index and whether it is the
// last (the STREAM construction of Tink's streaming AEAD and of age).
// Postgres-free and keyd-free: the caller supplies the version key.
//
//   off len field
//    0   8  magic 89 'C' 'C' 'F' 0D 0A 1A 0A
//    8   1  format version (1)
//    9   1  algorithm (1 = AES-256-GCM STREAM, chunk key from HKDF-SHA256)
//   10   2  reserved, 0
//   12   4  chunk size, u32 BE (plaintext bytes per chunk; 65536 by default)
//   16  16  key id
//   32   4  key version, u32 BE, >= 1
//   36  32  salt (random per file)
//   68  12  wrap nonce (random)
//   80  32  data key, AES-256-GCM under the version key,
//           AAD = bytes [0, 68) || context
//  112  16  wrap tag
//  128      chunks: ciphertext || 16-byte tag; every chunk but the last holds
//           exactly chunk-size bytes, the last 0..chunk-size bytes
//
// chunk key = HKDF-SHA256(ikm = data key, salt = salt,
//                         info = "colcrypt-file v1 chunk key" || bytes [0, 32))
// chunk nonce = 3 zero bytes || u64 BE chunk index || final flag (1 or 0)
// chunk AAD = empty
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

#include "core/aead.hpp"
#include "core/bytes.hpp"
#include "core/envelope.hpp"
#include "core/error.hpp"
#include "core/secure_memory.hpp"

namespace colcrypt::stream {

constexpr size_t kFileHeaderSize = 128;
constexpr uint8_t kStreamFormatVersion = 1;
constexpr uint8_t kStreamAlgorithm = 1;
constexpr std::array<uint8_t, 8> kMagic = {0x89, 'C', 'C', 'F', 0x0D, 0x0A, 0x1A, 0x0A};
// 64 KiB: docs/format.md explains the choice.
constexpr uint32_t kDefaultChunkSize = 65536;
// The bounds a header may name: the lower one keeps per-chunk overhead sane,
// the upper one bounds the memory a (hostile) header can make a reader take.
constexpr uint32_t kMinChunkSize = 16;
constexpr uint32_t kMaxChunkSize = 1u << 24;
constexpr size_t kSaltSize = 32;
constexpr size_t kDataKeySize = 32;

// Why a stream was refused. Each has its own exit code in colcrypt-file.
enum class StreamErrc {
  NotAStream,          // the magic is wrong: not a colcrypt-file file
  UnsupportedVersion,  // a later format version or algorithm
  MalformedHeader,     // reserved bytes, chunk size or key version out of range
  HeaderAuthFailed,    // the data key does not unwrap: wrong key, wrong context, altered header
  ChunkAuthFailed,     // a chunk does not verify: altered, reordered, duplicated, dropped,
                       // from another file, data appended, or cut inside the last chunk
  Truncated,           // the input ends inside the header or at a chunk boundary before the last
  TrailingData,        // bytes follow a last chunk that verified
};
const char* stream_errc_name(StreamErrc code);

// A refused stream. code() is DecryptionFailed for the authentication
// failures (HeaderAuthFailed, ChunkAuthFailed, Truncated, TrailingData) and
// MalformedValue for the others.
class StreamError : public Error {
 public:
  StreamError(StreamErrc reason, const std::string& message);
  StreamErrc reason() const { return reason_; }

 private:
  StreamErrc reason_;
};

struct FileHeader {
  uint32_t chunk_size = kDefaultChunkSize;
  KeyId key_id{};
  uint32_t key_version = 0;
  std::array<uint8_t, kSaltSize> salt{};
  std::array<uint8_t, AeadKey::kNonceSize> wrap_nonce{};
  std::array<uint8_t, kDataKeySize> wrapped_key{};
  std::array<uint8_t, kGcmTagSize> wrap_tag{};
};

std::array<uint8_t, kFileHeaderSize> encode_file_header(const FileHeader& header);
// Checks the structure only (throws StreamError NotAStream, UnsupportedVersion
// or MalformedHeader; Truncated when fewer than kFileHeaderSize bytes).
FileHeader parse_file_header(ByteView bytes);

// A new header for a new file: a random data key (returned in data_key) and
// salt, the data key wrapped under version_key. Throws InvalidArgument on a
// bad chunk size or key.
FileHeader new_header(ByteView version_key, const KeyId& key_id, uint32_t key_version,
                      ByteView context, uint32_t chunk_size, SecretBytes& data_key);
// The data key; throws StreamError HeaderAuthFailed when it does not unwrap.
SecretBytes unwrap_data_key(const FileHeader& header, ByteView version_key, ByteView context);
// The same file's header under another version: same data key, salt and
// chunk size (so the chunks stay valid), a fresh wrap nonce.
FileHeader rewrap_header(const FileHeader& header, ByteView old_version_key,
                         ByteView new_version_key, uint32_t new_version, ByteView context);

// Reads up to n bytes, fewer only at the end of the input (0: at the end).
using Source = std::function<size_t(uint8_t* buffer, size_t n)>;
using Sink = std::function<void(const uint8_t* data, size_t n)>;
// Called with the bytes of input consumed so far (for a progress display).
using Progress = std::function<void(uint64_t consumed)>;

// Encrypts everything source yields: writes the header, then the chunks.
// Memory: two chunks, whatever the input size. Returns the plaintext size.
uint64_t encrypt(const FileHeader& header, ByteView data_key, const Source& source,
                 const Sink& sink, const Progress& progress = {});

// Decrypts a whole stream: reads and parses the header, asks unwrap for the
// data key (it receives the header; it may fetch the version key and call
// unwrap_data_key), then writes each chunk's plaintext to sink only after
// that chunk verified. Returns normally only when the last chunk verified and
// nothing follows it; otherwise throws StreamError, and the plaintext already
// written must be discarded. Returns the plaintext size.
using Unwrap = std::function<SecretBytes(const FileHeader& header)>;
uint64_t decrypt(const Source& source, const Unwrap& unwrap, const Sink& sink,
                 const Progress& progress = {});

// Seals and opens single chunks (the building block of encrypt/decrypt,
// exposed for tests and benchmarks).
class ChunkCipher {
 public:
  ChunkCipher(const FileHeader& header, ByteView data_key);
  // Writes plaintext.size bytes of ciphertext then the tag to out (in may equal out).
  void seal(uint64_t index, bool final, ByteView plaintext, uint8_t* out);
  // record = ciphertext || tag; writes record.size - 16 bytes of plaintext
  // (in may equal out). false when it does not verify (out wiped then).
  bool open(uint64_t index, bool final, ByteView record, uint8_t* out);

 private:
  AeadKey key_;
};

}  // namespace colcrypt::stream
